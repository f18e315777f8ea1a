"""LLaMA-Factory 0.9.5 with the visual region: its own run_exp (through the launcher) on a tiny local Llava.

Runs only inside the ``llamafactory`` stack (tests/hosts/stack_llamafactory.py); tests/test_stacks.py starts it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ..stacks import ROOT, current
from .llamafactory_helpers import (
    NUM_LAYERS,
    changed_keys,
    expected_changes,
    llm_layer,
    load_weights,
    make_workspace,
    write_config,
)

pytestmark = [
    pytest.mark.stack,
    pytest.mark.skipif(current() != "llamafactory", reason="runs in the llamafactory stack (tests/test_stacks.py)"),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("lf"))


def launch(config, *overrides) -> int:
    """``python -m vr_plugin.integrations.llamafactory train CONFIG k=v ...``, in this process."""
    from vr_plugin.integrations.llamafactory import main

    return main(["train", str(config), *overrides])


@pytest.fixture(scope="module")
def full_run(workspace, tmp_path_factory):
    """finetuning_type: full with the projector unfrozen (LLaMA-Factory's flag), region uniform_0.25."""
    config = write_config(
        tmp_path_factory.mktemp("full") / "cfg.yaml",
        workspace,
        visual_region="uniform_0.25",
        freeze_multi_modal_projector=False,
    )
    assert launch(config) == 0
    return config.parent / "out"


def test_full_changes_exactly_region_and_projector(workspace, full_run):
    base = load_weights(workspace["model"])
    trained = load_weights(full_run)
    changed = changed_keys(base, trained)
    assert changed == expected_changes(base, [1, 7], projector=True)  # uniform_0.25 of 8 layers: 1, 7
    assert all("vision_tower" not in k and "embed_tokens" not in k and "lm_head" not in k for k in changed)


def test_full_records_region_everywhere(full_run):
    from vr_plugin.record import read_region

    for directory in (full_run, full_run / "checkpoint-2"):
        record = read_region(directory)
        assert (record.spec, record.layers, record.num_layers) == ("uniform_0.25", [1, 7], NUM_LAYERS)
    config = json.loads((full_run / "config.json").read_text())
    assert config["visual_region"]["layers"] == [1, 7]
    plan = json.loads((full_run / "region_plan.json").read_text())
    trainable = plan["trainable_names"]
    assert {llm_layer(n) for n in trainable if "multi_modal_projector" not in n} == {1, 7}
    assert any("multi_modal_projector" in n for n in trainable)


def test_freeze_region_replaces_last_layers_and_respects_tower_and_projector_flags(workspace, tmp_path):
    """finetuning_type: freeze would train layers 6, 7 (freeze_trainable_layers' default 2); the region (given as a
    key=value override, as llamafactory-cli takes them) trains 2, 4 instead. LLaMA-Factory's flags decide the rest:
    freeze_multi_modal_projector keeps its default (true: projector frozen), freeze_vision_tower: false trains it."""
    config = write_config(tmp_path / "cfg.yaml", workspace, finetuning_type="freeze", freeze_vision_tower=False)
    assert launch(config, "visual_region=2,4") == 0
    base = load_weights(workspace["model"])
    changed = changed_keys(base, load_weights(tmp_path / "out"))
    vision = {k for k in base if "vision_tower" in k}
    assert changed - vision == expected_changes(base, [2, 4], projector=False)
    assert changed & vision  # the tower trained (its tensors past vision_feature_layer -2 get no gradient)
    plan = json.loads((tmp_path / "out" / "region_plan.json").read_text())
    trainable = set(plan["trainable_names"])
    assert {llm_layer(n) for n in trainable if "vision_tower" not in n} == {2, 4}  # no projector, no embeddings
    assert len([n for n in trainable if "vision_tower" in n]) == len(vision)
    from vr_plugin.record import read_region

    assert read_region(tmp_path / "out").layers == [2, 4]


def test_lora_adapters_only_in_region_layers(workspace, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from vr_plugin.record import read_region

    config = write_config(
        tmp_path / "cfg.yaml",
        workspace,
        finetuning_type="lora",
        visual_region="uniform_0.25",
        freeze_multi_modal_projector=False,
        learning_rate=1.0e-2,
    )
    assert launch(config) == 0
    out = tmp_path / "out"
    adapter = load_weights(out, "adapter_model.safetensors")
    lora = {k for k in adapter if ".lora_" in k}
    assert {llm_layer(k) for k in lora} == {1, 7}
    assert all("language_model" in k for k in lora)  # never a vision-tower q_proj
    assert len(lora) == 2 * 7 * 2  # two layers, 7 linear modules each, lora_A + lora_B
    assert all(adapter[k].abs().sum() > 0 for k in lora if ".lora_B." in k)  # trained away from zero
    assert set(adapter) - lora == {k for k in adapter if "multi_modal_projector" in k} != set()
    for directory in (out, out / "checkpoint-2"):
        assert read_region(directory).layers == [1, 7]
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert {llm_layer(t) for t in targets} == {1, 7}

    base = AutoModelForImageTextToText.from_pretrained(str(workspace["model"]))
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    after = dict(merged.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    linear = {n for n in expected_changes(before, [1, 7], projector=False) if "_proj." in n}
    assert changed == linear | {n for n in before if "multi_modal_projector" in n}


@pytest.mark.parametrize(
    "keys, option",
    [
        ({"visual_region": "uniform_1.5"}, "visual_region"),
        ({"visual_region": "bogus"}, "visual_region"),
        ({"visual_region": "1,99"}, "visual_region"),
        ({"visual_region": None, "visual_region_layers_path": "model.layers"}, "visual_region_layers_path"),
        ({"freeze_trainable_layers": 2}, "freeze_trainable_layers"),
        ({"freeze_trainable_modules": "mlp"}, "freeze_trainable_modules"),
        ({"freeze_extra_modules": "embed_tokens"}, "freeze_extra_modules"),
        ({"freeze_language_model": True}, "freeze_language_model"),
        ({"use_llama_pro": True}, "use_llama_pro"),
        ({"finetuning_type": "oft"}, "finetuning_type"),
        ({"stage": "ppo"}, "stage"),
        ({"finetuning_type": "lora", "freeze_vision_tower": False}, "freeze_vision_tower"),
        ({"finetuning_type": "lora", "lora_target": "c_attn"}, "lora_target"),
        ({"finetuning_type": "lora", "adapter_name_or_path": "/no/such/adapter"}, "adapter_name_or_path"),
    ],
)
def test_bad_input_is_refused_before_weights_load(workspace, tmp_path, capsys, keys, option):
    """Against a model directory holding only config.json: any weight loading would fail differently."""
    keys = {"visual_region": "uniform_0.25", **keys}
    config = write_config(tmp_path / "cfg.yaml", workspace, model_name_or_path=str(workspace["config_only"]), **keys)
    assert launch(config) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"error: {option}:"), message
    assert not (tmp_path / "out").exists()


def test_cli_refuses_conflict_in_one_line(workspace, tmp_path):
    """The real command line (``python -m``), a conflict given as an override."""
    config = write_config(tmp_path / "cfg.yaml", workspace, model_name_or_path=str(workspace["config_only"]))
    command = [sys.executable, "-m", "vr_plugin.integrations.llamafactory", "train", str(config)]
    run = subprocess.run(
        [*command, "visual_region=uniform_0.25", "freeze_trainable_layers=4"],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("error: freeze_trainable_layers: 4 conflicts with visual_region"), lines[-5:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recipe", ["llava1_5_full_region.yaml", "llava1_5_lora_region.yaml"])
def test_recipes_pass_the_checks(workspace, recipe):
    """recipes/llamafactory/*.yaml, pointed at the tiny model's config: no conflict, the region resolved."""
    from vr_plugin.integrations.llamafactory import prepare, read_config

    path = ROOT / "recipes" / "llamafactory" / recipe
    args, callbacks = prepare(read_config([str(path), f"model_name_or_path={workspace['config_only']}"]))
    assert "visual_region" not in args and len(callbacks) == 1
    assert callbacks[0].spec == "uniform_0.25"
    if "lora" in recipe:
        assert {llm_layer(t) for t in args["lora_target"].split(",")} == {1, 7}
        assert args["additional_target"] == "model.multi_modal_projector"


def test_callback_upcasts_half_precision_region_like_llamafactory():
    """A bf16 model: the region's tensors become fp32 (LLaMA-Factory upcasts the tensors it trains), the rest not."""
    from vr_plugin.integrations.llamafactory import LlamaFactoryRegionCallback
    from vr_plugin.tiny import build_model

    model = build_model("llava", NUM_LAYERS, 64).to(torch.bfloat16)
    plan = LlamaFactoryRegionCallback("2,4", tune_projector=True, tune_vision_tower=False).apply(model)
    fp32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert fp32 == set(plan.trainable_names) and {llm_layer(n) for n in fp32} == {2, 4, None}
    no_upcast = build_model("llava", NUM_LAYERS, 64).to(torch.bfloat16)
    LlamaFactoryRegionCallback("2,4", upcast=False).apply(no_upcast)
    assert all(p.dtype == torch.bfloat16 for p in no_upcast.parameters())


def test_callback_refuses_adapters_outside_the_region():
    """LoRA mode checks LLaMA-Factory's adapters: suffix targets also hit other layers (and the vision tower)."""
    from peft import LoraConfig, get_peft_model

    from vr_plugin.integrations.llamafactory import LlamaFactoryRegionCallback
    from vr_plugin.tiny import build_model

    model = get_peft_model(build_model("llava", NUM_LAYERS, 64), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(RuntimeError, match="LoRA adapters outside visual region"):
        LlamaFactoryRegionCallback("2,4", lora=True, tune_projector=None).apply(model)
