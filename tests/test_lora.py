"""Region LoRA, QLoRA and the hybrid 4-bit-outside / full-precision-inside mode on tiny HF-native LVLMs."""

import pytest
import torch
from torch import nn

from vr_plugin import (
    apply_region_lora,
    load_for_region,
    load_region_state,
    merge_region_lora,
    read_region,
    region_lora_config,
    region_param_groups,
    save_region_adapter,
    save_region_state,
    select_layers,
)
from vr_plugin.quant import quantized_layers
from vr_plugin.tiny import available, build_model, example_inputs

from .common import (
    LlavaSynthetic,
    changed,
    collate,
    forward,
    freeze_vision,
    portable_4bit_path,
    requires_cpu_bnb,
    snapshot,
)
from .matrix import LEGACY_ARCHS as ARCHS
from .matrix import PATHS

peft = pytest.importorskip("peft")
LLAMA_LINEARS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"} | {
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
}
VLMS = [a for a in ("llava", "qwen2_vl") if available(a)]
# bitsandbytes' CPU kernels need in-features divisible by its 64-element quantization blocks (and, on CPUs with
# AVX512-BF16, out-features divisible by 32 for the eval-mode repacking): real models are; 4-bit tests use width 64
BNB_HIDDEN = 64


def _lora_modules(model):
    return {n for n, m in model.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})) > 0}


@pytest.mark.parametrize("arch", ARCHS)
def test_adapters_exactly_on_region_linears(arch):
    model = build_model(arch)
    config = region_lora_config(model, "uniform_0.25", r=4)
    wrapped = peft.get_peft_model(model, config)
    path = PATHS[arch].layers
    expected = {f"base_model.model.{path}.{i}.{sub}" for i in select_layers("uniform_0.25", 8) for sub in LLAMA_LINEARS}
    assert _lora_modules(wrapped) == expected and len(expected) == 2 * 7


@pytest.mark.parametrize("arch", VLMS)
def test_target_kinds_and_projector_in_full_precision(arch):
    model = build_model(arch)
    freeze_vision(model)
    wrapped, plan = apply_region_lora(model, "1,4", r=4, target=["q_proj", "v_proj"])
    path = PATHS[arch].layers
    assert _lora_modules(wrapped) == {f"base_model.model.{path}.{i}.self_attn.{k}_proj" for i in (1, 4) for k in "qv"}
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    assert len(lora) == 2 * 2 * 2
    projector = trainable - lora
    assert projector and all("modules_to_save" in n for n in projector)
    assert all(any(k in n for k in ("multi_modal_projector", "merger")) for n in projector)
    assert read_region(wrapped).layers == [1, 4] and plan.layers == [1, 4]


def test_no_adapter_is_an_error():
    model = build_model("llama")
    with pytest.raises(ValueError, match="selects no layer"):
        region_lora_config(model, "none")
    with pytest.raises(ValueError, match=r"matches no linear module.*q_proj"):
        region_lora_config(model, "uniform_0.25", target=["qkv_proj"])


def test_vision_encoder_linears_never_targeted():
    model = build_model("llava")
    wrapped = peft.get_peft_model(model, region_lora_config(model, "all", r=2))
    assert not [n for n in _lora_modules(wrapped) if "vision" in n or "projector" in n or "lm_head" in n]


@pytest.mark.parametrize("arch", VLMS)
def test_training_step_updates_only_adapters_and_projector(arch):
    model = build_model(arch)
    freeze_vision(model)
    wrapped, plan = apply_region_lora(model, "uniform_0.25", r=4, lora_dropout=0.0)
    optimizer = torch.optim.AdamW(region_param_groups(wrapped, lr=1e-2, projector_lr=1e-3))
    before = snapshot(wrapped)
    wrapped.train()
    wrapped(**example_inputs(model.config)).loss.backward()
    optimizer.step()
    moved = changed(before, wrapped)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    lora_b = {n for n in trainable if "lora_B" in n}
    assert moved <= trainable and lora_b <= moved  # B starts at zero: it must move
    assert {n for n in moved if "lora_" not in n} == {n for n in trainable if "modules_to_save" in n}


def test_param_groups_learning_rates():
    model = build_model("llava")
    freeze_vision(model)
    from vr_plugin import apply_visual_region

    apply_visual_region(model, "uniform_0.25")
    groups = region_param_groups(model, lr=2e-4, projector_lr=2e-5, weight_decay=0.1)
    by_name = {(g["name"], g["weight_decay"]): g for g in groups}
    assert by_name[("projector", 0.1)]["lr"] == 2e-5
    assert by_name[("main", 0.1)]["lr"] == 2e-4 and by_name[("main", 0.0)]["lr"] == 2e-4
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])
    assert all(p.ndim == 1 for p in by_name[("main", 0.0)]["params"])  # norms are not decayed


def test_param_groups_with_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from vr_plugin import RegionFreezeCallback, apply_visual_region

    from .common import LlavaSynthetic, collate

    model = build_model("llava")
    freeze_vision(model)
    apply_visual_region(model, "2")
    optimizer = torch.optim.AdamW(region_param_groups(model, lr=1e-2, projector_lr=0.0))
    args = TrainingArguments(str(tmp_path), max_steps=2, report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=LlavaSynthetic(model.config, n=4),
        data_collator=collate,
        optimizers=(optimizer, None),
        callbacks=[RegionFreezeCallback("2")],
    )
    before = snapshot(model)
    trainer.train()
    moved = changed(before, model)
    assert moved == {n for n, _ in model.named_parameters() if n.startswith(f"{PATHS['llava'].layers}.2.")}


def _save(model, directory):
    model.save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("arch", VLMS)
def test_save_load_merge_round_trip(tmp_path, arch):
    base_dir = _save(build_model(arch), tmp_path / "base")
    model = type(build_model(arch)).from_pretrained(base_dir)
    freeze_vision(model)
    wrapped, _ = apply_region_lora(model, "uniform_0.25", r=4, lora_dropout=0.0)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    inputs = example_inputs(model.config)
    wrapped.train()
    for _ in range(2):
        forward(wrapped, inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    wrapped.eval()
    with torch.no_grad():
        trained = forward(wrapped, inputs).logits
    save_region_adapter(wrapped, tmp_path / "adapter")
    assert read_region(str(tmp_path / "adapter")).layers == select_layers("uniform_0.25", 8)

    fresh = type(model).from_pretrained(base_dir)
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    merged = merge_region_lora(loaded).eval()
    with torch.no_grad():
        assert torch.allclose(forward(merged, inputs).logits, trained, atol=1e-5)
    assert not _lora_modules(merged)


def _quantized_linears(model, path, index):
    layer = model.get_submodule(f"{path}.{index}")
    return {type(m).__name__ for m in layer.modules() if isinstance(m, nn.Linear)}


@requires_cpu_bnb
@pytest.mark.parametrize("arch", VLMS)
def test_qlora_region(tmp_path, arch):
    from vr_plugin import load_quantized, prepare_qlora

    base_dir = _save(build_model(arch, hidden=BNB_HIDDEN), tmp_path / "base")
    model = load_quantized(base_dir, "nf4", dtype=torch.float32)
    wrapped, plan = prepare_qlora(model, "uniform_0.25", r=4, gradient_checkpointing=False)
    core_path = PATHS[arch].layers
    path = f"base_model.model.{core_path}"
    for index in range(8):  # every LLM layer is 4-bit; only region layers carry adapters
        assert "Linear4bit" in _quantized_linears(wrapped, path, index)
    assert {n.split(core_path + ".")[1].split(".")[0] for n in _lora_modules(wrapped)} == {"1", "7"}
    wrapped.train()
    wrapped(**example_inputs(model.config)).loss.backward()
    graded = {n for n, p in wrapped.named_parameters() if p.grad is not None}
    assert graded == set(plan.trainable_names) and all("lora_" in n or "modules_to_save" in n for n in graded)
    assert all(p.dtype == torch.float32 for n, p in wrapped.named_parameters() if p.requires_grad)


@requires_cpu_bnb
@pytest.mark.parametrize("arch", VLMS)
def test_hybrid_full_region_on_4bit_model(tmp_path, arch):
    base = build_model(arch, hidden=BNB_HIDDEN)
    base_dir = _save(base, tmp_path / "base")
    model, plan = load_for_region(base_dir, "uniform_0.25", "nf4", dtype=torch.float32)
    assert quantized_layers(model) == {i: i not in (1, 7) for i in range(8)}
    freeze_vision(model)
    plan_trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    path = PATHS[arch].layers
    region = {n for n, _ in model.named_parameters() if n.startswith((f"{path}.1.", f"{path}.7."))}
    assert region <= plan_trainable
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in region)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = example_inputs(model.config)
    before = snapshot(model)
    model.train()
    forward(model, inputs).loss.backward()
    optimizer.step()
    projector = {n for n, _ in model.named_parameters() if any(n.startswith(p) for p in PATHS[arch].projector)}
    assert changed(before, model) == region | projector

    # the hybrid checkpoint reloads as the same hybrid, region in full precision
    model.eval()
    portable_4bit_path(model)  # the same kernel on every CPU: exact comparisons hold everywhere
    with torch.no_grad():
        trained = forward(model, inputs).logits
    model.save_pretrained(tmp_path / "hybrid")
    reloaded = portable_4bit_path(type(base).from_pretrained(tmp_path / "hybrid").eval())
    assert quantized_layers(reloaded) == quantized_layers(model)
    with torch.no_grad():
        assert torch.allclose(forward(reloaded, inputs).logits, trained, atol=1e-5)
    assert read_region(reloaded).layers == [1, 7]

    # the trained region, exported in full precision, goes onto the unquantized base
    save_region_state(model, tmp_path / "region")
    full = type(base).from_pretrained(base_dir)
    record = load_region_state(full, tmp_path / "region")
    assert record.layers == [1, 7] and read_region(full).layers == [1, 7]
    trained_params = dict(model.named_parameters())
    for name, param in full.named_parameters():
        if name in region | projector:
            assert torch.equal(param, trained_params[name])


@requires_cpu_bnb
def test_region_trainer_trains_a_hybrid_model(tmp_path):
    """The plain Trainer refuses bitsandbytes models without adapters; RegionTrainer sees a hybrid and trains it."""
    from transformers import Trainer, TrainingArguments

    from vr_plugin import RegionTrainer

    base_dir = _save(build_model("llava", hidden=BNB_HIDDEN), tmp_path / "base")
    model, _ = load_for_region(base_dir, "uniform_0.25", "nf4", dtype=torch.float32)
    freeze_vision(model)
    args = TrainingArguments(
        str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, use_cpu=True,
        report_to="none", save_strategy="no", remove_unused_columns=False,
    )  # fmt: skip
    data = LlavaSynthetic(model.config, n=4)
    with pytest.raises(ValueError, match="quantized"):
        Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
    before = snapshot(model)
    RegionTrainer(model=model, args=args, train_dataset=data, data_collator=collate).train()
    path, projector = PATHS["llava"].layers, PATHS["llava"].projector
    expected = {
        n for n, _ in model.named_parameters() if n.startswith((f"{path}.1.", f"{path}.7.", *projector))
    }  # exactly the region layers (full precision) and the projector
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert changed(before, model) == expected  # the nf4 layers outside the region are bit-identical


@requires_cpu_bnb
@pytest.mark.parametrize("arch", VLMS)
def test_4bit_eval_forward_takes_this_cpus_path(tmp_path, arch):
    """The eval-mode, no-grad 4-bit forward as inference runs it: on AVX512-BF16 CPUs bitsandbytes repacks the
    weights and computes in bfloat16, elsewhere it keeps its portable kernel; both agree to bfloat16 precision."""
    base_dir = _save(build_model(arch, hidden=BNB_HIDDEN), tmp_path / "base")
    model, _ = load_for_region(base_dir, "uniform_0.25", "nf4", dtype=torch.float32)
    inputs = example_inputs(model.config, labels=False)
    model.eval()
    with torch.no_grad():
        native = forward(model, inputs).logits  # repacks on such CPUs
        again = forward(model, inputs).logits  # the repacked weights serve every later call
    portable, _ = load_for_region(base_dir, "uniform_0.25", "nf4", dtype=torch.float32)
    with torch.no_grad():
        reference = forward(portable_4bit_path(portable.eval()), inputs).logits
    assert torch.isfinite(native).all() and torch.equal(native, again)
    assert torch.allclose(native, reference, atol=2e-2, rtol=2e-2)
    model.save_pretrained(tmp_path / "saved")  # saving after the eval forward unpacks the weights again
    reloaded = type(build_model(arch)).from_pretrained(tmp_path / "saved")
    assert quantized_layers(reloaded) == {i: i not in (1, 7) for i in range(8)}


@requires_cpu_bnb
def test_hybrid_int8_loads_and_runs(tmp_path):
    base_dir = _save(build_model("llava", hidden=BNB_HIDDEN), tmp_path / "base")
    model, _ = load_for_region(base_dir, "uniform_0.25", "int8", dtype=torch.float32)
    assert quantized_layers(model) == {i: i not in (1, 7) for i in range(8)}
    assert _quantized_linears(model, PATHS["llava"].layers, 0) == {"Linear8bitLt"}
    with torch.no_grad():
        assert torch.isfinite(model(**example_inputs(model.config)).logits).all()


@requires_cpu_bnb
def test_quantized_projector_is_refused(tmp_path):
    from vr_plugin import bnb_config

    base_dir = _save(build_model("llava", hidden=BNB_HIDDEN), tmp_path / "base")
    everything = bnb_config("nf4", compute_dtype=torch.float32, skip_modules=["lm_head"])
    model = type(build_model("llava", hidden=BNB_HIDDEN)).from_pretrained(base_dir, quantization_config=everything)
    with pytest.raises(ValueError, match="projector .* is quantized"):
        region_lora_config(model, "uniform_0.25")


def test_hybrid_bad_kind(tmp_path):
    base_dir = _save(build_model("llama", hidden=BNB_HIDDEN), tmp_path / "base")
    with pytest.raises(ValueError, match="not one of nf4, fp4, int8"):
        load_for_region(base_dir, "uniform_0.25", "int4")
