"""LLaVA's real train() (llava-torch 1.2.2.post1) with the visual region: launcher, LoRA, patched source tree."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ..common import free_port, quantize_linears_nf4
from ..llava.fixtures import finetune_flags
from .conftest import read_json, run_llava

REGION = ("model.layers.1.", "model.layers.7.")  # uniform_0.25 on 8 layers
LAUNCHER = ["-m", "vr_plugin.integrations.llava.train"]


def _flags(workspace, out, **kw):
    flags = finetune_flags(workspace, out, steps=3, **kw)
    flags[flags.index("--warmup_ratio") + 1] = "0"  # every trainable tensor moves from the first step
    return flags


def _initial_weights(workspace):
    """What training starts from: the Vicuna LLM, the stage-1 projector, the CLIP tower (LLaVA key names)."""
    weights = dict(load_file(os.path.join(workspace["vicuna"], "model.safetensors")))
    weights.update(torch.load(workspace["projector"]))
    clip = load_file(os.path.join(workspace["clip"], "model.safetensors"))
    weights.update({f"model.vision_tower.vision_tower.{k}": v for k, v in clip.items()})
    return weights


def _changed(workspace, out_dir):
    final = load_file(os.path.join(out_dir, "model.safetensors"))
    initial = _initial_weights(workspace)
    assert set(initial) <= set(final), sorted(set(initial) - set(final))[:5]
    return {k for k, v in initial.items() if not torch.equal(final[k], v.to(final[k].dtype))}, initial


def _expected_full(initial):
    return {k for k in initial if k.startswith(REGION) or "mm_projector" in k}


def _load_with_llava_builder(model_path, model_base=None):
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model

    name = get_model_name_from_path(model_path)
    return load_pretrained_model(model_path, model_base, name, device="cpu")


def test_launcher_full_parameter_region(workspace, tmp_path):
    out = str(tmp_path / "llava-vr25")  # LLaVA's builder branches on 'llava' in the directory name
    run = run_llava([*LAUNCHER, *_flags(workspace, out), "--visual_region", "uniform_0.25"], cwd=str(tmp_path))
    assert "visual region 'uniform_0.25': 2/8 layers [1,7]" in run.stderr
    changed, initial = _changed(workspace, out)
    assert changed == _expected_full(initial)  # frozen weights bit-identical; region layers + projector trained
    assert read_json(os.path.join(out, "config.json"))["visual_region"] == {
        "spec": "uniform_0.25",
        "layers": [1, 7],
        "num_layers": 8,
    }
    tokenizer, model, image_processor, _ = _load_with_llava_builder(out)
    assert len(model.model.layers) == 8 and model.config.visual_region["layers"] == [1, 7]


def test_launcher_lora_region(workspace, tmp_path):
    out = str(tmp_path / "llava-vr25-lora")
    flags = _flags(workspace, out, lora=True)
    run_llava([*LAUNCHER, *flags, "--visual_region", "uniform_0.25"], cwd=str(tmp_path))
    adapter = load_file(os.path.join(out, "adapter_model.safetensors"))
    layers = {k.split("model.layers.")[1].split(".")[0] for k in adapter}
    assert layers == {"1", "7"} and len(adapter) == 2 * 7 * 2  # 7 linears x (A, B) in each region layer
    assert all("lora_" in k and "vision" not in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # trained (B starts at zero)
    non_lora = torch.load(os.path.join(out, "non_lora_trainables.bin"))
    assert non_lora and all("mm_projector" in k for k in non_lora)
    target = read_json(os.path.join(out, "adapter_config.json"))["target_modules"]
    assert target.startswith(r"model\.layers\.(?:1|7)\.")
    assert read_json(os.path.join(out, "config.json"))["visual_region"]["layers"] == [1, 7]
    _, model, _, _ = _load_with_llava_builder(out, model_base=workspace["vicuna"])  # LoRA merged by LLaVA's builder
    assert len(model.model.layers) == 8


def test_patched_source_tree(workspace, tmp_path):
    import llava

    source = tmp_path / "src"
    shutil.copytree(os.path.dirname(llava.__file__), source / "llava", ignore=shutil.ignore_patterns("__pycache__"))
    patch = os.path.join(os.path.dirname(__file__), "..", "..", "patches", "llava.patch")
    subprocess.run(["patch", "-p1", "-i", os.path.abspath(patch)], cwd=source, check=True, capture_output=True)
    out = str(tmp_path / "llava-vr25-patched")
    flags = _flags(workspace, out)
    run = run_llava(["-m", "llava.train.train", *flags, "--visual_region", "uniform_0.25"], cwd=str(source))
    assert "visual region 'uniform_0.25'" in run.stderr  # the patched copy ran, not the installed one
    changed, initial = _changed(workspace, out)
    assert changed == _expected_full(initial)
    assert read_json(os.path.join(out, "config.json"))["visual_region"]["layers"] == [1, 7]


def test_tune_layers_and_conflicts(workspace, tmp_path):
    out = str(tmp_path / "llava-layers")
    run = run_llava([*LAUNCHER, *_flags(workspace, out), "--tune_layers", "2,5"], cwd=str(tmp_path))
    assert "2/8 layers [2,5]" in run.stderr
    bad = run_llava(
        [*LAUNCHER, *_flags(workspace, out), "--tune_layers", "2,5", "--visual_region", "uniform_0.25"],
        cwd=str(tmp_path),
        check=False,
    )
    assert bad.returncode != 0 and "both given; use one" in bad.stderr
    quantized = run_llava(
        [*LAUNCHER, *_flags(workspace, out), "--visual_region", "uniform_0.25", "--bits", "4"],
        cwd=str(tmp_path),
        check=False,
    )
    assert quantized.returncode != 0 and "needs --lora_enable True" in quantized.stderr


def test_resume_with_another_region_fails(workspace, tmp_path):
    out = str(tmp_path / "llava-resume")
    flags = _flags(workspace, out)
    flags[flags.index("--save_strategy") + 1] = "steps"
    flags[flags.index("--max_steps") + 1] = "1"
    run_llava([*LAUNCHER, *flags, "--save_steps", "1", "--visual_region", "uniform_0.25"], cwd=str(tmp_path))
    assert read_json(os.path.join(out, "checkpoint-1", "visual_region.json"))["layers"] == [1, 7]
    again = run_llava([*LAUNCHER, *flags, "--tune_layers", "0,6"], cwd=str(tmp_path), check=False)
    assert again.returncode != 0 and "Cannot resume from" in again.stderr and "'uniform_0.25'" in again.stderr


def test_lora_checkpoints_carry_config_and_projector(workspace, tmp_path):
    out = str(tmp_path / "llava-lora-ckpt")
    flags = _flags(workspace, out, lora=True)
    flags[flags.index("--save_strategy") + 1] = "steps"
    run_llava([*LAUNCHER, *flags, "--save_steps", "2", "--visual_region", "uniform_0.25"], cwd=str(tmp_path))
    checkpoint = os.path.join(out, "checkpoint-2")
    assert read_json(os.path.join(checkpoint, "config.json"))["visual_region"]["layers"] == [1, 7]
    assert all("mm_projector" in k for k in torch.load(os.path.join(checkpoint, "non_lora_trainables.bin")))


@pytest.mark.skipif(not __import__("importlib").util.find_spec("bitsandbytes"), reason="no bitsandbytes")
def test_qlora_region_same_targets_and_trainable_set(workspace):
    """LLaVA's --bits 4 path (prepare_model_for_kbit_training + LoRA) on real nf4 layers, in process.

    transformers 4.37.2 refuses to quantize without a GPU inside from_pretrained, so the decoder's linears are
    quantized with bitsandbytes directly; everything after that is what LLaVA's train() does for --bits 4.
    """
    from llava.model import LlavaLlamaForCausalLM
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from vr_plugin.args import RegionArguments
    from vr_plugin.integrations.llava import region_callbacks, region_lora_targets
    from vr_plugin.integrations.llava_family import region_options

    args = RegionArguments(visual_region="uniform_0.25")

    def build(bits):
        model = LlavaLlamaForCausalLM.from_pretrained(workspace["vicuna"])
        if bits == 4:
            quantize_linears_nf4(model.model.layers)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        targets = region_lora_targets(model, args)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
        model.get_model().mm_projector = torch.nn.Linear(32, 64)  # as initialize_vision_modules adds it
        region_callbacks(args)[0].apply(model)
        return model, targets

    full, full_targets = build(16)
    quantized, quantized_targets = build(4)
    assert full_targets == quantized_targets
    assert type(quantized.base_model.model.model.layers[1].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    names = {n for n, p in full.named_parameters() if p.requires_grad}
    assert names == {n for n, p in quantized.named_parameters() if p.requires_grad}
    assert {n.split("layers.")[1].split(".")[0] for n in names if "lora_" in n} == {"1", "7"}
    assert region_options(args)["tune_projector"] is True
    ids = torch.randint(3, 100, (1, 8))
    quantized(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in quantized.named_parameters() if p.requires_grad and "lora_" in n)


def test_deepspeed_module_launch_two_ranks(workspace, tmp_path):
    """``deepspeed --module vr_plugin.integrations.llava.train --deepspeed zero2.json`` on two CPU ranks.

    Both ranks get the region and train. On this stack no ZeRO engine runs on CPU: without ``--use_cpu``
    transformers 4.37 / accelerate 0.27 initialise NCCL ("Distributed package doesn't have NCCL built in"); with it,
    accelerate drops the DeepSpeed plugin and the ranks train under DDP. The run then ends at LLaVA's final save,
    which calls torch.cuda.synchronize() (safe_save_model_for_hf_trainer). ZeRO-2/3 engines with the region are
    tested under transformers 5 in tests/test_distributed.py.
    """
    import json as _json

    config = tmp_path / "zero2.json"
    config.write_text(_json.dumps({  # LLaVA's scripts/zero2.json, with the batch sizes spelled out for CPU ranks
        "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                              "sub_group_size": 1e9, "reduce_bucket_size": "auto"},
    }))  # fmt: skip
    out = str(tmp_path / "llava-vr25-ds")
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    command = [launcher, "--num_gpus", "2", "--master_port", str(free_port()),
               "--module", "vr_plugin.integrations.llava.train",
               *_flags(workspace, out), "--visual_region", "uniform_0.25", "--deepspeed", str(config),
               "--use_cpu", "True", "--ddp_backend", "gloo"]  # fmt: skip
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    log = run.stdout + run.stderr
    assert log.count("visual region 'uniform_0.25': 2/8 layers [1,7]") == 2, log[-4000:]  # one line per rank
    assert log.count("'loss':") == 3, log[-4000:]  # every step trained
    assert read_json(os.path.join(out, "region_plan.json"))["layers"] == [1, 7]
    assert run.returncode == 0 or "Torch not compiled with CUDA enabled" in log, log[-4000:]
