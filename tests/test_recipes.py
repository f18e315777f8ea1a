"""Recipes mirror the host codebases' scripts flag for flag, except for their documented changes."""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def parse_script(text: str) -> tuple:
    """``(launcher tokens, {flag: value})`` of the (first) training command in a shell script."""
    joined = re.sub(r"\\\n", " ", text)
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith(("deepspeed", "python", "torchrun", "accelerate")):
            break
    else:
        raise AssertionError("no training command found")
    tokens = shlex.split(line.split(" 2>&1")[0].split(" | ")[0])
    first = next(
        i
        for i, t in enumerate(tokens)
        if t.startswith("--")
        and tokens[i - 1] not in ("--num_gpus",)
        and not (i > 0 and tokens[i - 1] == "--module")
        and t not in ("--module", "--num_gpus")
    )
    launcher, rest = tokens[:first], tokens[first:]
    flags, i = {}, 0
    while i < len(rest):
        name = rest[i]
        assert name.startswith("--"), (name, rest)
        if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            flags[name] = rest[i + 1]
            i += 2
        else:
            flags[name] = "True"
            i += 1
    return launcher, flags


# LLaVA's scripts/v1_5/*.sh at haotian-liu/LLaVA c121f04 (the flags, not the files; see the VR_LLAVA_REPO check).
LLAVA_FINETUNE = {
    "--deepspeed": "./scripts/zero3.json", "--model_name_or_path": "lmsys/vicuna-13b-v1.5", "--version": "v1",
    "--data_path": "./playground/data/llava_v1_5_mix665k.json", "--image_folder": "./playground/data",
    "--vision_tower": "openai/clip-vit-large-patch14-336",
    "--pretrain_mm_mlp_adapter": "./checkpoints/llava-v1.5-13b-pretrain/mm_projector.bin",
    "--mm_projector_type": "mlp2x_gelu", "--mm_vision_select_layer": "-2", "--mm_use_im_start_end": "False",
    "--mm_use_im_patch_token": "False", "--image_aspect_ratio": "pad", "--group_by_modality_length": "True",
    "--bf16": "True", "--output_dir": "./checkpoints/llava-v1.5-13b", "--num_train_epochs": "1",
    "--per_device_train_batch_size": "16", "--per_device_eval_batch_size": "4", "--gradient_accumulation_steps": "1",
    "--evaluation_strategy": "no", "--save_strategy": "steps", "--save_steps": "50000", "--save_total_limit": "1",
    "--learning_rate": "2e-5", "--weight_decay": "0.", "--warmup_ratio": "0.03", "--lr_scheduler_type": "cosine",
    "--logging_steps": "1", "--tf32": "True", "--model_max_length": "2048", "--gradient_checkpointing": "True",
    "--dataloader_num_workers": "4", "--lazy_preprocess": "True", "--report_to": "wandb",
}  # fmt: skip
LORA = {"--lora_enable": "True", "--lora_r": "128", "--lora_alpha": "256", "--mm_projector_lr": "2e-5"}
TASK = {"--model_name_or_path": "liuhaotian/llava-v1.5-13b"}
LLAVA_ORIGINALS = {
    "finetune": LLAVA_FINETUNE,
    "finetune_lora": {
        **LLAVA_FINETUNE, **LORA, "--learning_rate": "2e-4", "--output_dir": "./checkpoints/llava-v1.5-13b-lora",
    },
    "finetune_task": {
        **{k: v for k, v in LLAVA_FINETUNE.items() if k != "--pretrain_mm_mlp_adapter"}, **TASK,
        "--output_dir": "./checkpoints/llava-v1.5-13b-task",
    },
    "finetune_task_lora": {
        **{k: v for k, v in LLAVA_FINETUNE.items() if k != "--pretrain_mm_mlp_adapter"}, **TASK, **LORA,
        "--learning_rate": "2e-4", "--output_dir": "./checkpoints/llava-v1.5-13b-task-lora",
    },
}  # fmt: skip
LLAVA_LAUNCHER = ["deepspeed", "--module", "vr_plugin.integrations.llava.train"]
# recipe -> (original, documented changes)
LLAVA_RECIPES = {
    "finetune": ("finetune", {"--visual_region": "uniform_0.25", "--output_dir": "./checkpoints/llava-v1.5-13b-vr25"}),
    "finetune_lora": (
        "finetune_lora",
        {"--visual_region": "uniform_0.25", "--output_dir": "./checkpoints/llava-v1.5-13b-vr25-lora"},
    ),
    "finetune_task": (
        "finetune_task",
        {"--visual_region": "uniform_0.25", "--output_dir": "./checkpoints/llava-v1.5-13b-task-vr25"},
    ),
    "finetune_task_lora": (
        "finetune_task_lora",
        {"--visual_region": "uniform_0.25", "--output_dir": "./checkpoints/llava-v1.5-13b-task-vr25-lora"},
    ),
    "finetune_qlora_24gb": (
        "finetune_lora",
        {
            "--visual_region": "uniform_0.25", "--bits": "4", "--deepspeed": "./scripts/zero2.json",
            "--model_name_or_path": "lmsys/vicuna-7b-v1.5",
            "--pretrain_mm_mlp_adapter": "./checkpoints/llava-v1.5-7b-pretrain/mm_projector.bin",
            "--per_device_train_batch_size": "4", "--gradient_accumulation_steps": "32",
            "--output_dir": "./checkpoints/llava-v1.5-7b-vr25-qlora",
        },
    ),
}  # fmt: skip


def _all_recipes():
    return sorted(RECIPES.glob("*/*.sh"))


@pytest.mark.parametrize("path", _all_recipes(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_is_valid_bash_and_documents_itself(path):
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "Mirrors" in text and "Changes" in text, f"{path} must say what it mirrors and what it changes"
    assert os.access(path, os.X_OK)


@pytest.mark.parametrize("name", sorted(LLAVA_RECIPES))
def test_llava_recipes_match_originals_except_documented_changes(name):
    launcher, flags = parse_script((RECIPES / "llava" / f"{name}.sh").read_text())
    original_name, changes = LLAVA_RECIPES[name]
    assert [t for t in launcher if t not in ("--num_gpus", "1")] == LLAVA_LAUNCHER
    assert flags == {**LLAVA_ORIGINALS[original_name], **changes}
    # the builder-relevant substrings survive in the output directory
    assert "llava" in flags["--output_dir"] and ("lora" in flags["--output_dir"]) == ("--lora_enable" in flags)


@pytest.mark.skipif(not os.environ.get("VR_LLAVA_REPO"), reason="set VR_LLAVA_REPO to a LLaVA checkout")
@pytest.mark.parametrize("name", sorted(LLAVA_ORIGINALS))
def test_llava_originals_table_matches_a_real_checkout(name):
    script = Path(os.environ["VR_LLAVA_REPO"]) / "scripts" / "v1_5" / f"{name}.sh"
    launcher, flags = parse_script(script.read_text())
    assert launcher == ["deepspeed", "llava/train/train_mem.py"] and flags == LLAVA_ORIGINALS[name]


def run_with_stub(script: Path, tmp_path: Path, env: dict = None) -> tuple:
    """Run a recipe with a stub ``deepspeed`` that records its argv: bash itself expands the variables."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "deepspeed"
    stub.write_text(
        '#!/usr/bin/env python3\nimport json, os, sys\njson.dump(sys.argv[1:], open(os.environ["DUMP"], "w"))\n'
    )
    stub.chmod(0o755)
    dump = tmp_path / "argv.json"
    environment = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", DUMP=str(dump), **(env or {}))
    subprocess.run(["bash", str(script)], cwd=tmp_path, env=environment, check=True, capture_output=True)
    argv = __import__("json").loads(dump.read_text())
    text = "deepspeed " + " ".join(shlex.quote(a) for a in argv)
    launcher, flags = parse_script(text)
    return launcher, flags


# Bunny's script/train/finetune_full.sh and finetune_lora.sh at BAAI-DCAI/Bunny 08273ac (MODEL_TYPE=phi-2).
BUNNY_FULL = {
    "--deepspeed": "./script/deepspeed/zero3.json", "--model_name_or_path": "/path/to/base_llm_model",
    "--model_type": "phi-2", "--version": "bunny", "--data_path": "./data/finetune/bunny_695k.json",
    "--image_folder": "./data/finetune/images", "--vision_tower": "/path/to/siglip-so400m-patch14-384",
    "--pretrain_mm_mlp_adapter": "./checkpoints-pretrain/bunny-phi-2-pretrain/mm_projector.bin",
    "--mm_projector_type": "mlp2x_gelu", "--image_aspect_ratio": "pad", "--group_by_modality_length": "False",
    "--bf16": "True", "--output_dir": "./checkpoints-phi-2/bunny-phi-2", "--num_train_epochs": "1",
    "--per_device_train_batch_size": "8", "--per_device_eval_batch_size": "4", "--gradient_accumulation_steps": "2",
    "--evaluation_strategy": "no", "--save_strategy": "steps", "--save_steps": "500", "--save_total_limit": "1",
    "--learning_rate": "2e-5", "--weight_decay": "0.", "--warmup_ratio": "0.03", "--lr_scheduler_type": "cosine",
    "--logging_steps": "1", "--tf32": "True", "--model_max_length": "2048", "--gradient_checkpointing": "True",
    "--dataloader_num_workers": "4", "--lazy_preprocess": "True", "--report_to": "none",
}  # fmt: skip
BUNNY_ORIGINALS = {
    "finetune_full": BUNNY_FULL,
    "finetune_lora": {
        **BUNNY_FULL,
        **LORA,
        "--learning_rate": "2e-4",
        "--output_dir": "./checkpoints-phi-2/bunny-lora-phi-2",
    },
}
BUNNY_VERSIONS = {"phi-1.5": "bunny", "phi-2": "bunny", "phi-3": "phi3", "stablelm-2": "bunny",
                  "qwen1.5-1.8b": "bunny", "minicpm": "minicpm", "llama3-8b": "llama"}  # fmt: skip
BUNNY_LAUNCHER = ["deepspeed", "--module", "vr_plugin.integrations.bunny.train"]


def _per_type(flags: dict, model_type: str, lora: bool, prefix: str) -> dict:
    out = f"./checkpoints-{model_type}/{prefix}{model_type}"
    return {
        **flags,
        "--model_type": model_type,
        "--version": BUNNY_VERSIONS[model_type],
        "--pretrain_mm_mlp_adapter": f"./checkpoints-pretrain/bunny-{model_type}-pretrain/mm_projector.bin",
        "--output_dir": out,
    }


@pytest.mark.parametrize("model_type", sorted(BUNNY_VERSIONS))
@pytest.mark.parametrize("name", ["finetune_full", "finetune_lora"])
def test_bunny_recipes_match_originals_except_documented_changes(tmp_path, name, model_type):
    launcher, flags = run_with_stub(RECIPES / "bunny" / f"{name}.sh", tmp_path, {"MODEL_TYPE": model_type})
    assert launcher == BUNNY_LAUNCHER
    lora = name == "finetune_lora"
    expected = _per_type(BUNNY_ORIGINALS[name], model_type, lora, "bunny-lora-vr25-" if lora else "bunny-vr25-")
    assert flags == {**expected, "--visual_region": "uniform_0.25"}


def test_bunny_qlora_and_paper_recipes(tmp_path):
    launcher, flags = run_with_stub(RECIPES / "bunny" / "finetune_qlora_24gb.sh", tmp_path)
    assert [t for t in launcher if t not in ("--num_gpus", "1")] == BUNNY_LAUNCHER
    expected = _per_type(BUNNY_ORIGINALS["finetune_lora"], "llama3-8b", True, "bunny-lora-vr25-qlora-")
    assert flags == {
        **expected, "--visual_region": "uniform_0.25", "--bits": "4", "--deepspeed": "./script/deepspeed/zero2.json",
        "--per_device_train_batch_size": "4", "--gradient_accumulation_steps": "32",
    }  # fmt: skip
    launcher, flags = run_with_stub(RECIPES / "bunny" / "finetune_visual_region_paper.sh", tmp_path)
    assert launcher == BUNNY_LAUNCHER
    assert flags == {
        **BUNNY_ORIGINALS["finetune_lora"],
        "--tune_layers": "1,5,9,13,19,23,27,31", "--model_type": "llama3-8b", "--version": "llama",
        "--model_name_or_path": "/path/to/Meta-Llama-3-8B-Instruct",
        "--pretrain_mm_mlp_adapter": "/path/to/bunny-pretrain-llama3-8b-siglip/mm_projector.bin",
        "--output_dir": "./checkpoints-llama3-8b/bunny-lora-vr-paper-llama3-8b",
    }  # fmt: skip
    from vr_plugin import select_layers

    assert select_layers("uniform_0.25", 32) == [int(i) for i in flags["--tune_layers"].split(",")]


@pytest.mark.skipif(not os.environ.get("VR_BUNNY_REPO"), reason="set VR_BUNNY_REPO to a Bunny checkout")
@pytest.mark.parametrize("name", sorted(BUNNY_ORIGINALS))
def test_bunny_originals_table_matches_a_real_checkout(tmp_path, name):
    script = Path(os.environ["VR_BUNNY_REPO"]) / "script" / "train" / f"{name}.sh"
    launcher, flags = run_with_stub(script, tmp_path)
    assert launcher == ["deepspeed", "bunny/train/train.py"] and flags == BUNNY_ORIGINALS[name]
