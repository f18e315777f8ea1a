"""apply_visual_region: exact trainable sets over the architecture matrix, options, errors, checkpointing."""

import re

import pytest
import torch

from vr_plugin import apply_visual_region, read_region, select_layers
from vr_plugin.tiny import available, build_model, example_inputs

from .common import freeze_vision
from .matrix import LEGACY_ARCHS as ARCHS
from .matrix import PATHS


def _names_under(model, prefixes):
    return {n for n, _ in model.named_parameters() if any(n.startswith(p) for p in prefixes)}


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _layer_prefixes(arch, indices):
    return [f"{PATHS[arch].layers}.{i}." for i in indices]


@pytest.fixture
def frozen_vision():
    """Build a model whose vision tower is frozen by its 'loader', as LLaVA/Bunny/HF recipes do."""

    def make(arch, **kw):
        model = build_model(arch, **kw)
        freeze_vision(model)
        return model

    return make


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", ["uniform_0.25", "1,4", "none", "last_3"])
def test_exact_trainable_set(frozen_vision, arch, spec):
    model = frozen_vision(arch)
    region = select_layers(spec, 8)
    expected = _names_under(model, _layer_prefixes(arch, region) + PATHS[arch].projector)
    if not expected:  # 'none' on a text-only model
        with pytest.raises(ValueError, match="leaves nothing to train"):
            apply_visual_region(model, spec)
        return
    plan = apply_visual_region(model, spec)
    assert _trainable(model) == expected
    assert set(plan.trainable_names) == expected and plan.layers == region
    assert plan.trainable == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert plan.total == sum(p.numel() for p in model.parameters())
    assert plan.groups["region layers"].trainable == plan.groups["region layers"].total
    assert plan.groups["other layers"].trainable == 0
    assert abs(plan.trainable_share - plan.trainable / plan.total) < 1e-12


def test_vision_tower_left_as_caller_set_it():
    model = build_model("llava")  # fresh model: vision tower trainable
    apply_visual_region(model, "uniform_0.25")
    assert _names_under(model, ["model.vision_tower."]) <= _trainable(model)
    apply_visual_region(model, "uniform_0.25", tune_vision_tower=False)
    assert not _names_under(model, ["model.vision_tower."]) & _trainable(model)


def test_switches(frozen_vision):
    model = frozen_vision("llava")
    path = PATHS["llava"].layers
    base = path.rsplit(".layers", 1)[0]
    apply_visual_region(model, "1", tune_embeddings=True, tune_norm=True, tune_lm_head=True, tune_projector=False)
    expected = _names_under(model, [f"{path}.1.", f"{base}.embed_tokens.", f"{base}.norm."])
    expected |= {n for n, _ in model.named_parameters() if "lm_head" in n}
    assert _trainable(model) == expected
    # None leaves the projector as it was (frozen now)
    apply_visual_region(model, "2", tune_projector=None)
    assert _trainable(model) == _names_under(model, [f"{path}.2."])


def test_region_recorded_in_config_and_saved(tmp_path):
    model = build_model("qwen2_vl" if available("qwen2_vl") else "llava")
    apply_visual_region(model, "uniform_0.25")
    assert model.config.visual_region == {"spec": "uniform_0.25", "layers": [1, 7], "num_layers": 8}
    model.save_pretrained(tmp_path)
    record = read_region(str(tmp_path))
    assert record.layers == [1, 7] and record.spec == "uniform_0.25" and record.num_layers == 8
    reloaded = type(model).from_pretrained(tmp_path)
    assert read_region(reloaded).layers == [1, 7]


def test_list_spec_is_recorded_as_text():
    model = build_model("llama")
    plan = apply_visual_region(model, [6, 2])
    assert plan.spec == "6,2" and plan.layers == [2, 6]


@pytest.mark.skipif(not available("paligemma"), reason="no PaliGemma")
def test_tied_embeddings_must_agree():
    model = build_model("paligemma")  # Gemma ties lm_head to the embeddings
    with pytest.raises(ValueError, match="tied to the input embeddings"):
        apply_visual_region(model, "uniform_0.25", tune_lm_head=True)
    apply_visual_region(model, "uniform_0.25", tune_lm_head=True, tune_embeddings=True)
    assert PATHS["paligemma"].layers.replace("layers", "embed_tokens.weight") in _trainable(model)


def test_nothing_to_train_is_an_error():
    with pytest.raises(ValueError, match="leaves nothing to train"):
        apply_visual_region(build_model("llava"), "none", tune_projector=False, tune_vision_tower=False)


def test_freezing_nothing_warns():
    with pytest.warns(UserWarning, match="froze nothing"):
        apply_visual_region(build_model("llama"), "all", tune_embeddings=True, tune_lm_head=True, tune_norm=True)


def test_bad_spec_names_model_depth():
    with pytest.raises(ValueError, match="8 decoder layers"):
        apply_visual_region(build_model("llama"), "uniform_9")


def test_peft_adapters_only_inside_region():
    peft = pytest.importorskip("peft")
    model = build_model("llava")
    # LoRA on every LLM layer (anchored: never the CLIP encoder's q/v)
    anchored = re.escape(PATHS["llava"].layers) + r"\.\d+\.self_attn\.(q_proj|v_proj)"
    config = peft.LoraConfig(r=2, target_modules=anchored)
    wrapped = peft.get_peft_model(model, config)
    apply_visual_region(wrapped, "uniform_0.25")
    prefix = "base_model.model." + PATHS["llava"].layers
    trainable = _trainable(wrapped)
    lora = {n for n in trainable if "lora_" in n}
    assert lora and all(n.startswith((f"{prefix}.1.", f"{prefix}.7.")) for n in lora)
    assert len(lora) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    projector = ["base_model.model." + p for p in PATHS["llava"].projector]
    assert trainable - lora == _names_under(wrapped, projector)


def test_warns_about_adapters_in_the_vision_tower(caplog):
    peft = pytest.importorskip("peft")
    model = build_model("llava")
    freeze_vision(model)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # suffixes
    with caplog.at_level("WARNING", logger="vr_plugin"):
        apply_visual_region(wrapped, "uniform_0.25")
    assert "adapters in the vision tower" in caplog.text


@pytest.mark.parametrize("arch", [a for a in ("llava", "qwen2_vl") if available(a)])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_reaches_region(frozen_vision, arch, reentrant):
    model = frozen_vision(arch)
    plan = apply_visual_region(model, "uniform_0.25")
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model(**example_inputs(model.config)).loss.backward()
    graded = {n for n, p in model.named_parameters() if p.grad is not None}
    assert graded == set(plan.trainable_names)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in graded and "layers" in n)


def test_reentrant_checkpointing_without_hf_input_hook():
    """Our own hook makes reentrant checkpointing work even when nothing else marks the inputs."""
    model = build_model("llama")
    apply_visual_region(model, "last_2")
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if hasattr(model, "_require_grads_hook"):
        model.disable_input_require_grads()  # transformers' own hook, if it installed one
    model(**example_inputs(model.config)).loss.backward()
    region = [p for n, p in model.named_parameters() if n.startswith(("model.layers.6.", "model.layers.7."))]
    assert region and all(p.grad is not None for p in region)


@pytest.mark.skipif(not available("llava"), reason="no Llava")
def test_frozen_layers_get_no_grad_without_checkpointing(frozen_vision):
    model = frozen_vision("llava")
    apply_visual_region(model, "last_2")
    embedded = {}
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: embedded.setdefault("out", o))
    model.train()
    model(**example_inputs(model.config)).loss.backward()
    assert not embedded["out"].requires_grad  # autograd never reaches below the region
    assert all(p.grad is None for n, p in model.named_parameters() if ".layers.0." in n)
    assert torch.is_grad_enabled()
