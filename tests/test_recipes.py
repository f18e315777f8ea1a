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
