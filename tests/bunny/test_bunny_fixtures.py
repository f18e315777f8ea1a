"""The tiny Bunny backbones, in process: Bunny's own loader and preprocessing agree with :mod:`.fixtures`.

Pins what region-freezing tests rely on: where the decoder layers are, which LoRA suffixes Bunny targets, and that
Bunny's label masking keeps exactly the answer and the end-of-turn token.  Bunny stack only (``VR_STACK=bunny``).
"""

import importlib
import json

import pytest
import torch

from vr_plugin import find_decoder_layers

from .fixtures import MODEL_TYPES, backbone, bunny_ready, bunny_repo, workspace_factory

pytestmark = pytest.mark.skipif(not bunny_ready(), reason="needs VR_BUNNY_REPO (a Bunny checkout) and VR_STACK=bunny")
IGNORE_INDEX = -100


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """``workspace(model_type)``: the tiny Bunny ingredients of that backbone, built once per module."""
    return workspace_factory(tmp_path_factory)


@pytest.fixture(scope="module")
def bunny():
    """Bunny's train module (imports every Bunny model class)."""
    bunny_repo()
    return importlib.import_module("bunny.train.train")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_layers_and_lora_targets(bunny, workspace, model_type):
    spec = backbone(model_type)
    model = getattr(bunny, spec.bunny_class).from_pretrained(workspace(model_type)["llm"])
    assert set(bunny.find_all_linear_names(model)) == set(spec.lora_targets)
    layers = model.get_submodule(spec.layers)
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == 8
    assert {type(layer).__name__ for layer in layers} == {spec.layer_class}
    assert find_decoder_layers(model).name == spec.layers
    indices = [getattr(layer.self_attn, "layer_idx", None) for layer in layers]
    assert indices == (list(range(8)) if spec.layer_idx else [None] * 8)
    assert all(getattr(layer, "num_hidden_layers", None) == (8 if spec.depth_scaled else None) for layer in layers)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_labels_keep_only_the_answer(bunny, workspace, model_type):
    import transformers
    from bunny import conversation
    from bunny.util.data_utils import DataArguments, LazySupervisedDataset

    paths = workspace(model_type)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        paths["llm"], model_max_length=256, padding_side="right", use_fast=True
    )
    if tokenizer.pad_token is None:  # as train() does: pad with unk, or (llama3-8b) with eos
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    template = conversation.conv_templates[backbone(model_type).version]
    previous, conversation.default_conversation = conversation.default_conversation, template
    try:
        processor = transformers.SiglipImageProcessor.from_pretrained(paths["siglip"])
        args = DataArguments(data_path=paths["data"], image_folder=paths["images"], image_aspect_ratio="pad")
        args.image_processor = processor
        sample = LazySupervisedDataset(paths["data"], tokenizer, args)[0]
    finally:
        conversation.default_conversation = previous
    with open(paths["data"], encoding="utf-8") as handle:
        answer = json.load(handle)[0]["conversations"][1]["value"]
    kept = sample["labels"][sample["labels"] != IGNORE_INDEX]
    assert tokenizer.decode(kept).strip() == answer + template.sep2
