"""Scoring and pruning LLaVA's own LlavaLlamaForCausalLM, and LLaVA's loader / eval scripts on pruned models."""

import os
import types

import pytest
import torch

from vr_plugin import apply_visual_region, find_decoder_layers, prune_outside_region, read_pruning, read_region
from vr_plugin.score import load_scores, score_layers

from .conftest import read_json, run_llava

QUESTION = "What colour are the shapes?"


@pytest.fixture(scope="module")
def checkpoint(workspace, tmp_path_factory):
    """A LLaVA checkpoint (Vicuna + CLIP + projector) with the region recorded, as LLaVA training leaves it."""
    from llava.model import LlavaLlamaForCausalLM
    from transformers import AutoTokenizer

    model = LlavaLlamaForCausalLM.from_pretrained(workspace["vicuna"])
    model_args = types.SimpleNamespace(
        vision_tower=workspace["clip"],
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        pretrain_mm_mlp_adapter=workspace["projector"],
        mm_patch_merge_type="flat",
        mm_projector_type="mlp2x_gelu",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
    )
    model.get_model().initialize_vision_modules(model_args)
    model.config.update({"image_aspect_ratio": "pad", "use_cache": True, "mm_use_im_start_end": False})
    model.config.mm_use_im_patch_token = False  # as LLaVA's train() records them
    apply_visual_region(model, "uniform_0.25")
    path = str(tmp_path_factory.mktemp("ckpt") / "llava-tiny-vr25")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(workspace["vicuna"], use_fast=False).save_pretrained(path)
    return path


def _load(path):
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(path, None, get_model_name_from_path(path), device="cpu")
    return tokenizer, model.float().eval(), processor


def _inputs(workspace, tokenizer, processor, model):
    from types import SimpleNamespace

    from llava import constants, conversation, mm_utils

    from vr_plugin.integrations.llava_family import host_prompt_batches

    host = SimpleNamespace(constants=constants, conversation=conversation, mm_utils=mm_utils)
    batch = next(
        host_prompt_batches(
            host, tokenizer, processor, model, workspace["test"], workspace["images"], "vicuna_v1", limit=1
        )
    )
    return batch


def _identity_hooks(model, removed):
    layers = find_decoder_layers(model).layers

    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return [layers[i].register_forward_hook(hook, with_kwargs=True) for i in removed]


def test_pruned_llava_logits_generation_and_reload(workspace, checkpoint, tmp_path):
    tokenizer, model, processor = _load(checkpoint)
    batch = _inputs(workspace, tokenizer, processor, model)
    removed = [0, 3, 5]  # outside the region [1, 7]; kept [1, 2, 4, 6, 7] is not contiguous
    handles = _identity_hooks(model, removed)
    with torch.no_grad():
        reference = model(**batch, use_cache=False).logits
    for handle in handles:
        handle.remove()
    record = prune_outside_region(model, remove=removed)
    assert record.kept == [1, 2, 4, 6, 7] and read_region(model).layers == [0, 4]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(5))
    with torch.no_grad():
        assert torch.allclose(model(**batch, use_cache=False).logits, reference, atol=1e-5)  # (a)
        args = dict(images=batch["images"], image_sizes=batch["image_sizes"], do_sample=False)
        cached = model.generate(batch["input_ids"], use_cache=True, max_new_tokens=6, min_new_tokens=6, **args)
        uncached = model.generate(batch["input_ids"], use_cache=False, max_new_tokens=6, min_new_tokens=6, **args)
    assert torch.equal(cached, uncached)  # (b)

    with torch.no_grad():  # (weights loaded in fp16 by LLaVA's builder, so the reload holds the same values)
        expected = model(**batch, use_cache=False).logits
    saved = str(tmp_path / "llava-tiny-vr25-pruned")
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    _, reloaded, _ = _load(saved)  # (c) through LLaVA's own loader, no vr_plugin code involved
    assert len(reloaded.model.layers) == 5 and read_pruning(reloaded).removed == removed
    with torch.no_grad():
        assert torch.equal(reloaded(**batch, use_cache=False).logits, expected)


def test_region_layers_are_never_removed(workspace, checkpoint):
    _, model, _ = _load(checkpoint)
    scores = {i: float(i) for i in range(8)}
    scores[1] = scores[7] = -5.0
    assert prune_outside_region(model, remove=2, scores=scores).removed == [0, 2]
    _, other, _ = _load(checkpoint)
    with pytest.raises(ValueError, match="in the visual region"):
        prune_outside_region(other, remove=[7])


def test_image_token_scores_use_the_spliced_positions(workspace, checkpoint):
    tokenizer, model, processor = _load(checkpoint)
    batch = _inputs(workspace, tokenizer, processor, model)
    image = score_layers(model, [batch], "bi_image", progress=False)
    text = score_layers(model, [batch], "bi_text", progress=False)
    start = (batch["input_ids"][0] == -200).nonzero().item()  # LLaVA's IMAGE_TOKEN_INDEX placeholder
    patches = 16  # 32x32 image, 8x8 patches, CLS dropped
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True, use_cache=False).hidden_states
    cos = torch.nn.functional.cosine_similarity(states[3][0], states[4][0], dim=-1)
    mask = torch.zeros_like(cos, dtype=torch.bool)
    mask[start : start + patches] = True
    assert cos.shape[0] == batch["input_ids"].shape[1] - 1 + patches
    assert abs(image[3] - (1 - cos[mask].mean().item())) < 1e-5
    assert abs(text[3] - (1 - cos[~mask].mean().item())) < 1e-5


def test_score_command_and_pruned_serve_cli(workspace, checkpoint, tmp_path):
    scores = str(tmp_path / "scores.json")
    run_llava(
        ["-m", "vr_plugin.integrations.llava.score", "--model-path", checkpoint, "--data", workspace["calibration"],
         "--images", workspace["images"], "--out", scores, "--metric", "bi", "--device", "cpu"],
        cwd=str(tmp_path),
    )  # fmt: skip
    report = load_scores(scores)
    assert report.metric == "bi" and sorted(report.scores) == list(range(8)) and report.model == checkpoint
    image = os.path.join(workspace["images"], read_json(workspace["test"])[0]["image"])
    run = run_llava(
        ["-m", "vr_plugin.integrations.llava.run", "--prune", "2", "--prune_scores", scores, "llava.serve.cli",
         "--model-path", checkpoint, "--image-file", image, "--device", "cpu", "--max-new-tokens", "4",
         "--conv-mode", "vicuna_v1"],
        cwd=str(tmp_path),
        env={"PYTHONUNBUFFERED": "1"},
        check=False,
        input_text=QUESTION + "\n",
    )  # fmt: skip
    output = run.stdout + run.stderr
    assert "pruned 2 layers" in output, output[-3000:]
    assert "ASSISTANT" in output and "exit" in output.lower(), output[-3000:]


def test_patch_loader_reaches_already_imported_scripts(checkpoint):
    import llava.eval.model_vqa_loader as eval_script
    import llava.model.builder as builder

    from vr_plugin.integrations.llava import patch_loader

    original = builder.load_pretrained_model
    try:
        wrapper = patch_loader(remove=[2, 3])
        assert eval_script.load_pretrained_model is wrapper and builder.load_pretrained_model is wrapper
        _, model, _, _ = eval_script.load_pretrained_model(checkpoint, None, "llava-tiny-vr25", device="cpu")
        assert len(model.model.layers) == 6 and read_pruning(model).removed == [2, 3]
    finally:
        builder.load_pretrained_model = original
        eval_script.load_pretrained_model = original
