"""Bunny's real train() with the visual region, for every backbone: launcher full and LoRA, patched source tree,
--unfreeze_vision_tower, pruning (MiniCPM's depth-scaled residuals), Bunny's loader and eval wrapper.

Needs a Bunny checkout (``VR_BUNNY_REPO``) and the ``bunny`` stack (``VR_STACK=bunny``); skipped otherwise.
"""

import json
import math
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from ..common import quantize_linears_nf4
from .fixtures import (
    MODEL_TYPES,
    backbone,
    bunny_ready,
    bunny_repo,
    finetune_flags,
    logged_losses,
    run_bunny,
    workspace_factory,
)

pytestmark = pytest.mark.skipif(not bunny_ready(), reason="needs VR_BUNNY_REPO (a Bunny checkout) and VR_STACK=bunny")

LAUNCHER = "vr_plugin.integrations.bunny.train"
JOBS = int(os.environ.get("VR_BUNNY_JOBS", min(2, os.cpu_count() or 1)))
REGION = (1, 7)  # uniform_0.25 on the fixtures' 8 layers


def _flags(paths, model_type, out, lora):
    flags = finetune_flags(paths, model_type, out, lora=lora, steps=2)
    flags[flags.index("--warmup_ratio") + 1] = "0"  # the first step already moves every trainable tensor
    flags[flags.index("--learning_rate") + 1] = "1e-3"
    return [*flags, "--visual_region", "uniform_0.25"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return workspace_factory(tmp_path_factory)


@pytest.fixture(scope="module")
def runs(request, workspace, tmp_path_factory):
    """Every (model_type, lora) launcher run of this module, started up front ``JOBS`` at a time."""
    pool = ThreadPoolExecutor(max_workers=JOBS)
    started = {}
    for model_type in MODEL_TYPES:
        for lora in (False, True):
            run_dir = tmp_path_factory.mktemp("run")
            out = str(run_dir / (("bunny-lora-vr25-" if lora else "bunny-vr25-") + model_type))
            flags = _flags(workspace(model_type), model_type, out, lora)
            started[model_type, lora] = (pool.submit(run_bunny, flags, cwd=str(run_dir), module=LAUNCHER), out)
    yield started
    pool.shutdown(wait=True, cancel_futures=True)


def _result(runs, model_type, lora):
    future, out = runs[model_type, lora]
    run = future.result()
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]
    assert "tokenization mismatch" not in log
    losses = logged_losses(log)
    assert losses and all(math.isfinite(x) and x > 0 for x in losses), losses
    with open(os.path.join(out, "region_plan.json")) as handle:
        plan = json.load(handle)
    return out, log, plan


def _region_prefixes(prefix=""):
    return tuple(f"{prefix}model.layers.{i}." for i in REGION)


def _saved(out):
    tensors = {}
    for name in os.listdir(out):
        if name.endswith(".safetensors") and not name.startswith("adapter"):
            tensors.update(load_file(os.path.join(out, name)))
    return tensors


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_full_parameter_region(runs, workspace, model_type):
    out, log, plan = _result(runs, model_type, lora=False)
    assert "visual region 'uniform_0.25': 2/8 layers [1,7] of model.layers" in log
    trainable = set(plan["trainable_names"])
    assert trainable == {n for n in trainable if n.startswith(_region_prefixes()) or "mm_projector" in n}
    assert {n.split(".")[2] for n in trainable if n.startswith("model.layers.")} == {"1", "7"}
    assert any("mm_projector" in n for n in trainable)

    paths = workspace(model_type)
    initial = dict(load_file(os.path.join(paths["llm"], "model.safetensors")))
    initial.update(torch.load(paths["projector"], map_location="cpu"))
    final = _saved(out)
    common = [k for k in initial if k in final]  # (Bunny drops Phi's lm_head.bias, as with the real phi-2)
    moved = {k for k in common if not torch.equal(final[k], initial[k].to(final[k].dtype))}
    assert moved <= trainable, sorted(moved - trainable)  # frozen weights are bit-identical
    matrices = {n for n in trainable if n.endswith("weight") and final[n].dim() == 2}
    assert matrices <= moved, sorted(matrices - moved)  # every trained matrix did train
    siglip = load_file(os.path.join(paths["siglip"], "model.safetensors"))
    vision = {k: v for k, v in final.items() if "vision_tower" in k}
    assert len(vision) == len(siglip) and all(
        torch.equal(vision[k], siglip[k.split("vision_tower.vision_tower.")[-1]].to(vision[k].dtype)) for k in vision
    )
    with open(os.path.join(out, "config.json")) as handle:
        assert json.load(handle)["visual_region"] == {"spec": "uniform_0.25", "layers": [1, 7], "num_layers": 8}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_lora_region(runs, model_type):
    out, log, plan = _result(runs, model_type, lora=True)
    adapter = load_file(os.path.join(out, "adapter_model.safetensors"))
    suffixes = set(backbone(model_type).lora_targets)
    layers = {k.split("model.layers.")[1].split(".")[0] for k in adapter}
    modules = {k.split("model.layers.")[1].split(".")[-3] for k in adapter}
    assert layers == {"1", "7"} and modules == suffixes and len(adapter) == 2 * 2 * len(suffixes)
    assert not [k for k in adapter if "vision" in k]
    trainable = set(plan["trainable_names"])
    assert {n for n in trainable if "lora_" not in n} == {n for n in trainable if "mm_projector" in n} != set()
    assert all(n.startswith(_region_prefixes("base_model.model.")) for n in trainable if "lora_" in n)
    non_lora = torch.load(os.path.join(out, "non_lora_trainables.bin"), map_location="cpu")
    assert non_lora and all("mm_projector" in k for k in non_lora)
    with open(os.path.join(out, "config.json")) as handle:
        assert json.load(handle)["visual_region"]["layers"] == [1, 7]


def test_unfreeze_vision_tower_with_lora_never_adapts_siglip(workspace, tmp_path):
    model_type = "qwen1.5-1.8b"
    out = str(tmp_path / "bunny-lora-vr25-vision")
    flags = _flags(workspace(model_type), model_type, out, lora=True) + ["--unfreeze_vision_tower", "True"]
    run = run_bunny(flags, cwd=str(tmp_path), module=LAUNCHER)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    with open(os.path.join(out, "region_plan.json")) as handle:
        trainable = set(json.load(handle)["trainable_names"])
    assert any("vision_tower" in n for n in trainable)  # Bunny's own choice, left alone
    assert not [n for n in trainable if "vision_tower" in n and "lora_" in n]
    adapter = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert {k.split("model.layers.")[1].split(".")[0] for k in adapter} == {"1", "7"}
    non_lora = torch.load(os.path.join(out, "non_lora_trainables.bin"), map_location="cpu")
    assert any("vision_tower" in k for k in non_lora) and any("mm_projector" in k for k in non_lora)


def test_patched_source_tree_and_bad_flags(workspace, tmp_path):
    repo = os.environ["VR_BUNNY_REPO"]
    source = tmp_path / "bunny-src"
    shutil.copytree(os.path.join(repo, "bunny"), source / "bunny", ignore=shutil.ignore_patterns("__pycache__"))
    patch = os.path.join(os.path.dirname(__file__), "..", "..", "patches", "bunny.patch")
    subprocess.run(["patch", "-p1", "-i", os.path.abspath(patch)], cwd=source, check=True, capture_output=True)
    model_type = "phi-3"
    out = str(tmp_path / "bunny-vr25-patched")
    run = run_bunny(_flags(workspace(model_type), model_type, out, lora=False), cwd=str(tmp_path), repo=str(source))
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    assert "visual region 'uniform_0.25'" in run.stderr  # the patched copy ran
    with open(os.path.join(out, "region_plan.json")) as handle:
        assert {n.split(".")[2] for n in json.load(handle)["trainable_names"] if n.startswith("model.layers")} == {
            "1",
            "7",
        }
    flags = _flags(workspace(model_type), model_type, str(tmp_path / "bunny-bits"), lora=False) + ["--bits", "4"]
    bad = run_bunny(flags, cwd=str(tmp_path), module=LAUNCHER)
    assert bad.returncode != 0 and "needs --lora_enable True" in bad.stderr


def _bunny_batch(paths, model_type, tokenizer, processor, model):
    from types import SimpleNamespace

    from bunny import constants, conversation
    from bunny.util import mm_utils

    from vr_plugin.integrations.llava_family import host_prompt_batches

    host = SimpleNamespace(constants=constants, conversation=conversation, mm_utils=mm_utils)
    version = backbone(model_type).version
    batch = next(
        host_prompt_batches(host, tokenizer, processor, model, paths["test"], paths["images"], version, limit=1)
    )
    return batch


@pytest.mark.parametrize("model_type", ["minicpm", "llama3-8b", "stablelm-2"])
def test_pruned_through_bunny_loader(runs, workspace, model_type, tmp_path):
    """Prune a trained checkpoint, save it, reload it with Bunny's own builder: same logits, same generation.

    MiniCPM scales residuals by its depth; StableLM has no layer_idx (legacy cache by position).
    """
    from bunny.model.builder import load_pretrained_model

    from vr_plugin import find_decoder_layers, prune_outside_region, read_region

    out, _, _ = _result(runs, model_type, lora=False)
    tokenizer, model, processor, _ = load_pretrained_model(out, None, os.path.basename(out), model_type, device="cpu")
    model = model.float().eval()
    batch = _bunny_batch(workspace(model_type), model_type, tokenizer, processor, model)
    layers = find_decoder_layers(model).layers

    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def forward(net):  # a fresh copy of the inputs each time: Bunny's forward edits them in place
        inputs = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
        return net(**inputs, use_cache=False).logits

    handles = [layers[i].register_forward_hook(identity, with_kwargs=True) for i in (2, 4)]
    with torch.no_grad():
        reference = forward(model)
    for handle in handles:
        handle.remove()
    prune_outside_region(model, remove=[2, 4])
    assert read_region(model).layers == [1, 5]
    with torch.no_grad():
        pruned = forward(model)
    assert torch.allclose(pruned, reference, atol=1e-4)
    with torch.no_grad():  # Bunny's builder loads fp16: round the weights so the reload holds the same values
        for param in model.parameters():
            param.copy_(param.half().float())
        expected = forward(model)
    saved = str(tmp_path / f"bunny-vr25-{model_type}-pruned")
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    _, reloaded, _, _ = load_pretrained_model(saved, None, os.path.basename(saved), model_type, device="cpu")
    with torch.no_grad():
        assert torch.allclose(forward(reloaded.float().eval()), expected, atol=1e-5)
    assert len(find_decoder_layers(reloaded).layers) == 6 and read_region(reloaded).layers == [1, 5]


def test_score_command_and_pruned_serve_cli(runs, workspace, tmp_path):
    """Bunny's own serve.cli, run on a trained checkpoint pruned at load by vr_plugin's wrapper."""
    model_type = "qwen1.5-1.8b"
    out, _, _ = _result(runs, model_type, lora=False)
    paths = workspace(model_type)
    scores = str(tmp_path / "scores.json")
    run = run_bunny(
        ["--model-path", out, "--model-type", model_type, "--data", paths["calibration"], "--images", paths["images"],
         "--out", scores, "--device", "cpu", "--conv-mode", backbone(model_type).version],
        cwd=str(tmp_path),
        module="vr_plugin.integrations.bunny.score",
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    with open(scores) as handle:
        report = json.load(handle)
    assert report["metric"] == "bi" and sorted(map(int, report["scores"])) == list(range(8))
    image = os.path.join(paths["images"], sorted(os.listdir(paths["images"]))[0])
    cli = run_bunny(
        ["--prune", "2", "--prune_scores", scores, "bunny.serve.cli", "--model-path", out, "--model-type", model_type,
         "--image-file", image, "--device", "cpu", "--max-new-tokens", "4", "--conv-mode", "bunny"],
        cwd=str(tmp_path),
        module="vr_plugin.integrations.bunny.run",
        stdin="What colour are the shapes?\n",
    )  # fmt: skip
    output = cli.stdout + cli.stderr
    assert cli.returncode == 0 and "pruned 2 layers" in output, output[-4000:]


@pytest.mark.parametrize("model_type", ["phi-3", "llama3-8b"])
def test_qlora_region_same_targets_and_trainable_set(workspace, model_type):
    """Bunny's --bits 4 path (prepare_model_for_kbit_training + LoRA) on real nf4 layers, in process.

    Bunny's train() hands from_pretrained both load_in_4bit and a quantization_config, which transformers >= 4.44
    rejects, so the decoder's linears are quantized with bitsandbytes directly; the rest is what train() does.
    """

    bunny_repo()  # importable in this process too
    import bunny.model as bunny_model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from vr_plugin.args import RegionArguments
    from vr_plugin.integrations.bunny import region_callbacks, region_lora_targets

    args = RegionArguments(visual_region="uniform_0.25")
    model_cls = getattr(bunny_model, backbone(model_type).bunny_class)

    def build(bits):
        model = model_cls.from_pretrained(workspace(model_type)["llm"])
        if bits == 4:
            quantize_linears_nf4(model.model.layers)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        targets = region_lora_targets(model, args)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
        model.get_model().mm_projector = torch.nn.Linear(32, 64)  # built after the wrap, as in train()
        region_callbacks(args)[0].apply(model)
        return model, targets

    full, full_targets = build(16)
    quantized, quantized_targets = build(4)
    assert full_targets == quantized_targets
    names = {n for n, p in full.named_parameters() if p.requires_grad}
    assert names == {n for n, p in quantized.named_parameters() if p.requires_grad}
    assert {n.split("layers.")[1].split(".")[0] for n in names if "lora_" in n} == {"1", "7"}
    ids = torch.randint(3, 100, (1, 8))
    quantized(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in quantized.named_parameters() if p.requires_grad and "lora_" in n)
