"""Layer discovery and parameter grouping on tiny config-built models of every architecture."""

import pytest
import torch
from torch import nn

from vr_plugin import find_decoder_layers, map_parameters, num_layers_from_config
from vr_plugin.locate import unwrap_model
from vr_plugin.tiny import ARCHITECTURES, available, build_config, build_model

from .matrix import LEGACY_ARCHS as ARCHS
from .matrix import PATHS


@pytest.fixture(scope="module")
def models():
    return {a: build_model(a) for a in ARCHITECTURES if available(a)}


@pytest.mark.parametrize("arch", ARCHS)
def test_finds_llm_layers_never_vision(models, arch):
    model = models[arch]
    layers, name = find_decoder_layers(model)
    assert name == PATHS[arch].layers
    assert model.get_submodule(name) is layers and len(layers) == 8
    vision = PATHS[arch].vision
    if vision:
        assert not name.startswith(vision)
        vision_layer_types = {type(m) for n, m in model.named_modules() if n.startswith(vision)}
        assert type(layers[0]) not in vision_layer_types


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_groups(models, arch):
    model = models[arch]
    path, projector, vision = PATHS[arch]
    groups = {info.name: info for info in map_parameters(model)}
    assert set(groups) == {n for n, _ in model.named_parameters()}
    for name, info in groups.items():
        if name.startswith(path + "."):
            assert info.group == "layer" and info.layer == int(name[len(path) + 1 :].split(".")[0])
        elif any(name.startswith(p) for p in projector):
            assert info.group == "projector", name
        elif vision and name.startswith(vision):
            assert info.group == "vision", name
        else:
            assert info.group in ("embeddings", "norm", "lm_head"), name
    assert {i.group for i in groups.values()} >= {"layer", "embeddings", "norm"}


@pytest.mark.parametrize("arch", ARCHS)
def test_depth_from_config(arch):
    assert num_layers_from_config(build_config(arch, num_layers=6)) == 6


def test_peft_wrapped(models):
    peft = pytest.importorskip("peft")
    model = build_model("llava")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    layers, name = find_decoder_layers(wrapped)
    path = PATHS["llava"].layers
    assert name == f"base_model.model.{path}"
    assert wrapped.get_submodule(name) is layers is model.get_submodule(path)
    assert unwrap_model(wrapped) is model


def test_compiled_and_data_parallel_wrappers(models):
    arch = "qwen2_vl" if available("qwen2_vl") else "llava"
    model = models[arch]
    compiled = torch.compile(model)
    layers, name = find_decoder_layers(compiled)
    path = PATHS[arch].layers
    assert name == f"_orig_mod.{path}" and layers is model.get_submodule(path)
    dp = nn.DataParallel(model)
    assert find_decoder_layers(dp).name == f"module.{path}"


def test_ddp_wrapper(models, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29531")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(models["llama"])
        assert find_decoder_layers(ddp).name == "module.model.layers"
    finally:
        dist.destroy_process_group()


def test_explicit_path(models):
    model = models["llava"]
    path = PATHS["llava"].layers
    assert find_decoder_layers(model, path).layers is model.get_submodule(path)
    compiled = torch.compile(model)
    # relative to the wrapper or to the model inside it
    assert find_decoder_layers(compiled, path).name == f"_orig_mod.{path}"
    with pytest.raises(LookupError, match="does not name a non-empty nn.ModuleList") as info:
        find_decoder_layers(model, path.replace("layers", "norm"))
    assert "encoder.layers (2 x CLIPEncoderLayer)" in str(info.value)


class VisionOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_tower = nn.Module()
        self.vision_tower.encoder = nn.Module()
        self.vision_tower.encoder.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
        self.head = nn.Linear(2, 2)


class CustomLM(nn.Module):
    """Unknown layout: the decoder is whatever ModuleList sits beside the token embedding."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.tok = nn.Embedding(10, 4)
        self.backbone.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(5)])
        self.backbone.extras = nn.ModuleList([nn.Linear(4, 4)])
        self.image_encoder = nn.Module()
        self.image_encoder.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(7)])

    def get_input_embeddings(self):
        return self.backbone.tok


def test_error_lists_module_lists_and_never_picks_vision():
    with pytest.raises(LookupError) as info:
        find_decoder_layers(VisionOnly())
    message = str(info.value)
    assert "vision_tower.encoder.layers (3 x Linear)" in message and "layers_path=" in message


def test_structural_fallback_needs_a_single_candidate():
    model = CustomLM()
    with pytest.raises(LookupError, match="several candidates"):
        find_decoder_layers(model)
    del model.backbone.extras
    layers, name = find_decoder_layers(model)
    assert name == "backbone.blocks" and len(layers) == 5
