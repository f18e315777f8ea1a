"""axolotl 0.19 with ``plugins: [vr_plugin.integrations.axolotl.VisualRegionPlugin]``: the real ``axolotl train``
CLI on the tiny local Llava, 2 steps on CPU, full fine-tuning and LoRA; checkpoints compared tensor by tensor.

Runs only inside the axolotl stack (tests/hosts/stack_axolotl.py, ``VR_STACK=axolotl``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import pytest

from ..stacks import current

pytestmark = [
    pytest.mark.stack,
    pytest.mark.slow,
    pytest.mark.skipif(current() != "axolotl", reason="runs in the axolotl stack (tests/hosts/stack_axolotl.py)"),
]

REGION = [1, 7]  # uniform_0.25 on 8 layers
RECORD = {"spec": "uniform_0.25", "layers": REGION, "num_layers": 8}
LINEAR_KINDS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
# axolotl's fused LoRA kernels know no attention class for model_type llava ("turn off lora kernels"): off
LORA = {
    "adapter": "lora",
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "lora_target_linear": True,
    **{f"lora_{kind}_kernel": False for kind in ("mlp", "qkv", "o", "embedding")},
}
_LAYER = re.compile(r"(?:^|\.)language_model\.(?:model\.)?layers\.(\d+)\.")


def llm_layer(name: str) -> Optional[int]:
    """The LLM decoder layer a tensor name belongs to (``None`` outside the LLM's layers)."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def is_projector(name: str) -> bool:
    """Whether a tensor belongs to the multimodal projector."""
    return "multi_modal_projector" in name.split(".")


def load_tensors(path) -> dict:
    """All tensors of a safetensors file."""
    from safetensors.torch import load_file

    return load_file(str(path))


def changed_names(before: dict, after: dict) -> set:
    """Names whose tensors are not bit-identical (the two hold the same names)."""
    import torch

    assert set(before) == set(after), sorted(set(before) ^ set(after))[:5]
    return {name for name in before if not torch.equal(before[name], after[name])}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from .axolotl_fixtures import make_data, make_model

    root = tmp_path_factory.mktemp("axolotl")
    return {"root": root, "model": make_model(root / "model"), "data": make_data(root / "data")}


def run_ok(work: dict, name: str, **overrides) -> Path:
    """``axolotl train`` on the tiny Llava with the plugin; the run must succeed. Returns its output_dir."""
    from .axolotl_fixtures import axolotl_train, base_config, write_config

    out = work["root"] / name
    config = write_config(base_config(work["model"], work["data"], out, **overrides), work["root"] / f"{name}.yml")
    run = axolotl_train(config, cwd=work["root"])
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    return out


@pytest.fixture(scope="module")
def full_run(work):
    return run_ok(work, "full")


@pytest.fixture(scope="module")
def lora_run(work):
    return run_ok(work, "lora", **LORA)


def test_full_run_changes_exactly_region_layers_and_projector(work, full_run):
    base = load_tensors(work["model"] / "model.safetensors")
    trained = load_tensors(full_run / "model.safetensors")
    changed = changed_names(base, trained)
    expected = {n for n in base if llm_layer(n) in REGION or is_projector(n)}
    assert changed == expected, (sorted(changed - expected)[:5], sorted(expected - changed)[:5])
    assert any(llm_layer(n) == 1 for n in changed) and any(is_projector(n) for n in changed)


def test_full_run_records_region(full_run):
    from transformers import AutoModelForImageTextToText

    from vr_plugin.record import read_region

    assert json.loads((full_run / "config.json").read_text())["visual_region"] == RECORD
    assert json.loads((full_run / "checkpoint-2" / "config.json").read_text())["visual_region"] == RECORD
    assert json.loads((full_run / "checkpoint-2" / "visual_region.json").read_text()) == RECORD
    assert json.loads((full_run / "visual_region.json").read_text()) == RECORD
    plan = json.loads((full_run / "region_plan.json").read_text())
    assert plan["layers"] == REGION and plan["trainable_names"]
    assert all(llm_layer(n) in REGION or is_projector(n) for n in plan["trainable_names"])
    reloaded = AutoModelForImageTextToText.from_pretrained(str(full_run))
    assert read_region(reloaded).layers == REGION


def test_lora_adapters_only_in_region_layers(lora_run):
    adapter = load_tensors(lora_run / "adapter_model.safetensors")
    lora = [n for n in adapter if ".lora_A." in n or ".lora_B." in n]
    placed = {(llm_layer(n), n.split(".lora_")[0].rsplit(".", 1)[-1]) for n in lora}
    assert placed == {(layer, kind) for layer in REGION for kind in LINEAR_KINDS}
    assert len(lora) == 2 * len(REGION) * len(LINEAR_KINDS)
    others = [n for n in adapter if n not in lora]
    assert others and all(is_projector(n) for n in others), others[:5]  # the projector, via modules_to_save
    assert not any("vision_tower" in n for n in adapter)
    assert any(adapter[n].abs().sum() > 0 for n in lora if ".lora_B." in n)  # trained (lora_B starts at zero)
    config = json.loads((lora_run / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str) and "language_model" in config["target_modules"]
    assert any("multi_modal_projector" in m for m in config["modules_to_save"])


def test_lora_merged_changes_exactly_region_linears_and_projector(work, lora_run):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(str(work["model"])).state_dict()
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(str(work["model"])), str(lora_run))
    merged = model.merge_and_unload().state_dict()
    changed = changed_names(base, merged)
    expected = {
        n
        for n in base
        if is_projector(n) or (llm_layer(n) in REGION and n.endswith(".weight") and n.split(".")[-2] in LINEAR_KINDS)
    }
    assert changed == expected, (sorted(changed - expected)[:5], sorted(expected - changed)[:5])


def test_lora_records_region(lora_run):
    from vr_plugin.record import read_region

    assert json.loads((lora_run / "visual_region.json").read_text()) == RECORD
    assert json.loads((lora_run / "checkpoint-2" / "visual_region.json").read_text()) == RECORD
    assert read_region(str(lora_run)).layers == REGION


def failing_run(work: dict, name: str, **overrides) -> str:
    """``axolotl train`` on a base_model directory holding only config.json: it must stop with the plugin's message,
    before the tokenizer, processor or weights load (any of them would fail there) and before output_dir exists."""
    from .axolotl_fixtures import axolotl_train, base_config, config_only, write_config

    bare = config_only(work["model"], work["root"] / "config-only")
    out = work["root"] / name
    config = write_config(base_config(bare, work["data"], out, **overrides), work["root"] / f"{name}.yml")
    # --launcher python: the same CLI and config loading without accelerate's extra process (half the start-up)
    run = axolotl_train(config, work["root"], "--launcher", "python", timeout=180)
    assert run.returncode != 0
    assert not out.exists()
    return run.stdout + run.stderr


def test_bad_spec_fails_before_weights_load(work):
    output = failing_run(work, "bad-spec", visual_region="uniform_banana")
    assert re.search(r"ValueError: visual_region: .*'uniform_banana'", output), output[-3000:]


def test_conflict_fails_before_weights_load(work):
    output = failing_run(work, "conflict", unfrozen_parameters=["^lm_head.weight$"])
    assert "ValueError: visual_region cannot be combined with unfrozen_parameters" in output, output[-3000:]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"visual_region": "1,5,9,40"}, "visual_region: "),
        ({"plugins": ["axolotl.integrations.spectrum.SpectrumPlugin"]}, "Spectrum plugin"),
        ({"freeze_mm_modules": True}, "freeze_mm_modules"),
        ({"adapter": "lora", "lora_target_linear": True, "peft_layers_to_transform": [0]}, "peft_layers_to_transform"),
        ({"adapter": "lora", "lora_target_modules": "q_proj|v_proj"}, "lora_target_modules"),
        ({"adapter": "lora", "lora_target_linear": True, "visual_region_tune_norm": True}, "lora_modules_to_save"),
        ({"visual_region": None}, "visual_region is not set"),
        ({**LORA, "visual_region": "none"}, "selects no layer"),
    ],
)
def test_load_cfg_refuses_before_weights_load(work, overrides, message):
    """axolotl's own config loader (what ``axolotl train`` runs first) refuses these, one line naming the option."""
    from axolotl.cli.config import load_cfg

    from .axolotl_fixtures import PLUGIN, base_config, config_only, write_config

    bare = config_only(work["model"], work["root"] / "config-only")
    if "plugins" in overrides:
        overrides = dict(overrides, plugins=[PLUGIN, *overrides["plugins"]])
    cfg = base_config(bare, work["data"], work["root"] / "never", **overrides)
    path = write_config(cfg, work["root"] / "refused.yml")
    with pytest.raises(ValueError) as error:
        load_cfg(str(path))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("recipe", ["llava-1.5-7b-visual-region.yml", "llava-1.5-7b-visual-region-lora.yml"])
def test_recipe_passes_axolotl_validation(work, recipe):
    """Each recipe in recipes/axolotl goes through axolotl's config loader with the plugin (model, data and the
    GPU-only switches swapped for the tiny local ones)."""
    import yaml
    from axolotl.cli.config import load_cfg

    from ..stacks import ROOT
    from .axolotl_fixtures import write_config

    cfg = yaml.safe_load((ROOT / "recipes" / "axolotl" / recipe).read_text())
    local = {"base_model": str(work["model"]), "output_dir": str(work["root"] / "recipe-out")}
    local["datasets"] = [{"path": str(work["data"]), "ds_type": "json", "type": "chat_template"}]
    cfg.update(local, bf16=False, tf32=False, flash_attention=False, optimizer="adamw_torch")
    loaded = load_cfg(str(write_config(cfg, work["root"] / recipe)))
    assert loaded.visual_region == "uniform_0.25" and loaded.plugins == [cfg["plugins"][0]]
    assert loaded.visual_region_tune_projector is True and loaded.visual_region_tune_vision_tower is False
