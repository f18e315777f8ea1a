"""Every VLM family of the matrix, one set of assertions: discover, freeze, LoRA, QLoRA, hybrid, score, prune + reload.

The support table in the README is this file: each column is one test here, run on each row of tests/matrix.py.
"""

import pytest
import torch

from vr_plugin import apply_visual_region, find_decoder_layers, load_for_region, map_parameters, region_lora_config
from vr_plugin.locate import unwrap_model, visual_entry_layers
from vr_plugin.prune import prune_outside_region
from vr_plugin.quant import quantized_layers
from vr_plugin.score import score_layers
from vr_plugin.tiny import build_model, example_inputs

from .common import changed, forward, freeze_vision, requires_cpu_bnb, snapshot
from .matrix import cases

peft = pytest.importorskip("peft")
BNB_HIDDEN = 64  # bitsandbytes' CPU kernels want in-features divisible by its 64-element blocks, as real models have


def _model(case, hidden=32):
    return build_model(case.name, hidden=hidden).eval()


def _run(case, model, inputs, **kwargs):
    """The forward a test measures: the model's own, or its language model's on the text (case.forward False)."""
    if case.forward:
        return forward(model, inputs, **kwargs)
    text = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "labels")}
    return unwrap_model(model).language_model(**text, **kwargs)


def _scored(case, model):
    """The module scoring and generation run on: the model, or its language model (case.forward False)."""
    return model if case.forward else unwrap_model(model).language_model


def _lora_layers(model, case):
    """Decoder-layer indices that carry LoRA adapters (names relative to the PeftModel)."""
    prefix = f"base_model.model.{case.layers}."
    found = set()
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and len(module.lora_A) and name.startswith(prefix):
            found.add(int(name[len(prefix) :].split(".")[0]))
        elif hasattr(module, "lora_A") and len(module.lora_A):
            found.add(name)  # an adapter outside the decoder layers: always wrong
    return found


@pytest.mark.parametrize("case", cases())
def test_discover(case):
    model = _model(case)
    location = find_decoder_layers(model)
    assert location.name == case.layers and len(location.layers) == 8
    for info in map_parameters(model):
        if info.name.startswith(case.layers + "."):
            assert info.group == "layer" and info.layer == int(info.name[len(case.layers) + 1 :].split(".")[0])
        elif info.name.startswith(case.projector):
            assert info.group == "projector", info.name
        elif case.vision and info.name.startswith(case.vision):
            assert info.group == "vision", info.name
        else:
            assert info.group in ("embeddings", "norm", "lm_head"), (info.name, info.group)
    assert sorted(visual_entry_layers(model)) == list(case.entry)


@pytest.mark.parametrize("case", cases())
def test_freeze_exact_trainable_set(case):
    model = _model(case)
    plan = apply_visual_region(model, "uniform_0.25", tune_vision_tower=False)
    names = [n for n, _ in model.named_parameters()]
    expected = case.region_names(names) | case.projector_names(names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected == set(plan.trainable_names)
    before = snapshot(model)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _run(case, model, example_inputs(model.config)).loss.backward()
    optimizer.step()
    assert changed(before, model) <= expected and case.region_names(changed(before, model))


@pytest.mark.parametrize("case", cases())
def test_lora_only_in_region_layers(case):
    model = _model(case)
    region = sorted({1, 7, *case.entry[:1]})  # a visual-entry layer in the region gets adapters like any other
    wrapped = peft.get_peft_model(model, region_lora_config(model, region, r=4))
    assert _lora_layers(wrapped, case) == set(region)
    layers = find_decoder_layers(wrapped).layers
    for index in region:  # every linear module of a region layer is wrapped, whatever the layer's kind
        plain = [n for n, m in layers[index].named_modules() if type(m) is torch.nn.Linear]  # (no MoE router)
        plain = [n for n in plain if not n.endswith("base_layer") and ".lora_" not in n]
        assert plain == [], (index, plain)
    wrapped.train()
    _run(case, wrapped, example_inputs(model.config)).loss.backward()
    graded = {n for n, p in wrapped.named_parameters() if p.grad is not None}
    assert graded and all("lora_" in n or "modules_to_save" in n for n in graded)


@pytest.mark.parametrize("case", cases())
def test_score_every_layer(case):
    model = _model(case)
    inputs = example_inputs(model.config, labels=False)
    if not case.forward:
        inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    scores = score_layers(_scored(case, model), [inputs], "bi", progress=False)
    assert sorted(scores) == list(range(8)) and torch.isfinite(torch.tensor(list(scores.values()))).all()


def _scores_preferring_entry(case):
    """Scores that rank the visual-entry layers lowest: unprotected, they would be the ones removed."""
    return {i: (0.0 if i in case.entry else 1.0 + i / 10) for i in range(8)}


@pytest.mark.parametrize("case", cases())
def test_prune_save_reload(tmp_path, case):
    model = _model(case)
    apply_visual_region(model, "uniform_0.25")  # region [1, 7] recorded in the config
    record = prune_outside_region(model, remove=2, scores=_scores_preferring_entry(case))
    assert not set(record.removed) & ({1, 7} | set(case.entry)) and len(record.removed) == 2
    assert sorted(record.protected) == list(case.entry)
    model.save_pretrained(tmp_path)
    reloaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reloaded.eval()
    inputs = example_inputs(model.config, labels=False)  # image + text
    with torch.no_grad():
        expected = _run(case, model, inputs, use_cache=False).logits
        assert torch.equal(_run(case, reloaded, inputs, use_cache=False).logits, expected)
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    single = example_inputs(model.config, batch=1, labels=False)
    if not case.forward:
        single = {k: single[k] for k in ("input_ids", "attention_mask")}
    generator = _scored(case, reloaded)
    with torch.no_grad():
        assert torch.equal(generator.generate(**single, use_cache=True, **kwargs),
                           generator.generate(**single, use_cache=False, **kwargs))  # fmt: skip
    assert sorted(visual_entry_layers(reloaded)) == [record.kept.index(i) for i in case.entry]


@pytest.mark.parametrize("case", cases(where=lambda c: c.entry))
def test_visual_entry_layers_refused_unless_allowed(case):
    model = _model(case)
    layer = case.entry[-1]
    with pytest.raises(ValueError, match=rf"layers \[{layer}\] are where visual features enter the LLM"):
        prune_outside_region(model, remove=[layer], region="none")
    assert len(find_decoder_layers(model).layers) == 8  # nothing changed
    record = prune_outside_region(model, remove=[layer], region="none", allow_visual_entry=True)
    assert record.removed == [layer] and not record.protected


def _save(case, directory, hidden=BNB_HIDDEN):
    model = build_model(case.name, hidden=hidden)
    model.save_pretrained(directory)
    return str(directory), type(model)


@requires_cpu_bnb
@pytest.mark.parametrize("case", cases())
def test_qlora_adapters_on_4bit_region(tmp_path, case):
    from vr_plugin import load_quantized, prepare_qlora

    base_dir, _ = _save(case, tmp_path / "base")
    model = load_quantized(base_dir, "nf4", dtype=torch.float32)
    assert all(quantized_layers(model).values())  # every LLM layer in 4-bit
    freeze_vision(model)
    wrapped, plan = prepare_qlora(model, "uniform_0.25", r=4, gradient_checkpointing=False)
    assert _lora_layers(wrapped, case) == {1, 7}
    wrapped.train()
    _run(case, wrapped, example_inputs(model.config)).loss.backward()
    graded = {n for n, p in wrapped.named_parameters() if p.grad is not None}
    assert graded and graded <= set(plan.trainable_names)
    assert all("lora_" in n or "modules_to_save" in n for n in graded)


@requires_cpu_bnb
@pytest.mark.parametrize("case", cases())
def test_hybrid_4bit_outside_region(tmp_path, case):
    region = sorted({1, 7, *case.entry[:1]})
    base_dir, _ = _save(case, tmp_path / "base")
    model, plan = load_for_region(base_dir, region, "nf4", dtype=torch.float32)
    assert quantized_layers(model) == {i: i not in region for i in range(8)}
    freeze_vision(model)
    names = [n for n, _ in model.named_parameters()]
    expected = case.region_names(names, region) | case.projector_names(names)
    before = snapshot(model)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _run(case, model, example_inputs(model.config)).loss.backward()
    optimizer.step()
    moved = changed(before, model)
    assert moved <= expected and case.region_names(moved, region)
    model.eval()  # the 4-bit eval forward (bitsandbytes repacks weights here on AVX512-BF16 CPUs)
    with torch.no_grad():
        assert torch.isfinite(_run(case, model, example_inputs(model.config, labels=False)).logits).all()


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    from vr_plugin.synthetic import make_vqa_dataset

    return make_vqa_dataset(str(tmp_path_factory.mktemp("vqa")), n_train=8, n_test=3)


def _cli(*argv):
    from vr_plugin.cli import main

    return main([str(a) for a in argv])


@pytest.mark.parametrize("case", cases(where=lambda c: c.processor))
def test_cli_train_eval_score_prune(tmp_path, vqa, case):
    """``vr-plugin train / eval / score / prune`` on the family's own processor and chat template."""
    from transformers import AutoModelForImageTextToText

    from vr_plugin import read_pruning
    from vr_plugin.tiny import save_tiny_lvlm

    base = save_tiny_lvlm(case.name, str(tmp_path / "base"))
    run, images = tmp_path / "run", vqa["images"]
    assert _cli("train", "--model", base, "--data", vqa["train"], "--images", images, "--output", run,
                "--max_steps", 2, "--per_device_train_batch_size", 2, "--learning_rate", 1e-2,
                "--save_strategy", "no", "--seed", 0) == 0  # fmt: skip
    fresh = dict(AutoModelForImageTextToText.from_pretrained(base).named_parameters())
    expected = case.region_names(fresh) | case.projector_names(fresh)
    trained = AutoModelForImageTextToText.from_pretrained(run)  # everything else bit-identical to the base
    assert expected and {n for n, p in trained.named_parameters() if not torch.equal(p, fresh[n])} == expected
    assert _cli("eval", "--model", run, "--data", vqa["test"], "--images", images, "--out", tmp_path / "e.json",
                "--max_new_tokens", 3, "--batch_size", 2) == 0  # fmt: skip
    scores = tmp_path / "scores.json"
    assert _cli("score", "--model", run, "--data", vqa["calibration"], "--images", images, "--out", scores,
                "--limit", 4, "--batch_size", 2) == 0  # fmt: skip
    pruned = tmp_path / "pruned"
    assert _cli("prune", "--model", run, "--scores", scores, "--remove", 2, "--output", pruned) == 0
    record = read_pruning(str(pruned))
    assert len(record.kept) == 6 and not set(record.removed) & ({1, 7} | set(case.entry))
    assert _cli("eval", "--model", pruned, "--data", vqa["test"], "--images", images, "--out", tmp_path / "p.json",
                "--max_new_tokens", 3) == 0  # fmt: skip


@pytest.mark.parametrize("case", cases(where=lambda c: c.entry and c.processor))
def test_inspect_marks_visual_entry_layers(tmp_path, case, capsys):
    from vr_plugin.tiny import save_tiny_lvlm

    base = save_tiny_lvlm(case.name, str(tmp_path / "base"))
    assert _cli("inspect", base) == 0
    out = capsys.readouterr().out
    marks = {(False, False): ".", (True, False): "#", (False, True): "v", (True, True): "V"}
    strip = "".join(marks[(i in (1, 7), i in case.entry)] for i in range(8))
    assert f"depth        {strip}   (# region, . frozen, v visual entry, V both; layer 0 left)" in out
    assert all(f"visual entry layer {i}: " in out for i in case.entry)
