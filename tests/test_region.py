"""vr_plugin.region: the region resolved once and handed to freezing, LoRA, hybrid loading and pruning."""

import pytest
import torch

from vr_plugin import apply_visual_region, load_for_region, region_lora_config
from vr_plugin.prune import prune_outside_region
from vr_plugin.region import Region, resolve_region
from vr_plugin.tiny import build_model

from .common import requires_cpu_bnb


def test_resolved_once_then_passed_along(monkeypatch):
    import vr_plugin.locate
    import vr_plugin.region
    import vr_plugin.spec

    model = build_model("mllama")
    region = resolve_region(model, "uniform_0.25")
    assert region == Region("uniform_0.25", (1, 7), 8, "model.language_model.layers", region.visual_entry)
    assert sorted(region.visual_entry) == [3, 6]
    parsed = []  # every parse of a spec goes through select_layers: none may happen once the region is resolved
    monkeypatch.setattr(vr_plugin.spec, "select_layers", lambda *a: parsed.append(a) or [])
    monkeypatch.setattr(vr_plugin.region, "select_layers", lambda *a: parsed.append(a) or [])
    plan = apply_visual_region(model, region)
    config = region_lora_config(model, region, r=2)
    assert plan.layers == [1, 7] and plan.spec == "uniform_0.25" and not parsed
    assert config.target_modules and vr_plugin.locate.find_decoder_layers(model).name == region.layers_path


def test_a_region_of_another_depth_is_refused():
    region = resolve_region(build_model("llava", num_layers=12), "uniform_0.25")
    with pytest.raises(ValueError, match="resolved for 12 decoder layers; this model has 8"):
        apply_visual_region(build_model("llava"), region)
    with pytest.raises(ValueError, match="resolved for 12 decoder layers; this model has 8"):
        prune_outside_region(build_model("llava"), region=region, remove=[2])


def test_prune_keeps_a_given_region(tmp_path):
    model = build_model("llava")
    record = prune_outside_region(model, region=resolve_region(model, "1,7"), remove=[2, 3])
    assert record.removed == [2, 3] and model.config.visual_region["spec"] == "1,7"
    with pytest.raises(ValueError, match=r"layers \[1\] are in the visual region"):
        prune_outside_region(build_model("llava"), region=resolve_region(build_model("llava"), "1,7"), remove=[1])


@requires_cpu_bnb
def test_hybrid_load_takes_a_region(tmp_path):
    from vr_plugin.quant import quantized_layers

    base = build_model("llava", hidden=64)
    base.save_pretrained(tmp_path)
    model, plan = load_for_region(str(tmp_path), resolve_region(base, "uniform_0.25"), "nf4", dtype=torch.float32)
    assert quantized_layers(model) == {i: i not in (1, 7) for i in range(8)} and plan.layers == [1, 7]
