"""Inputs for the axolotl tests: the tiny local Llava, a chat_template dataset with image paths, and YAML configs
the way a user writes them for ``axolotl train cfg.yml``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

PLUGIN = "vr_plugin.integrations.axolotl.VisualRegionPlugin"
SPEC = "uniform_0.25"
NUM_LAYERS = 8


def make_model(directory: Path) -> Path:
    """The tiny Llava (8 LLM layers, width 64) with tokenizer, processor and chat template."""
    from vr_plugin.tiny import save_tiny_lvlm

    return Path(save_tiny_lvlm("llava", str(directory), num_layers=NUM_LAYERS, hidden=64))


def config_only(model_dir: Path, directory: Path) -> Path:
    """A copy of the model's ``config.json`` and nothing else: loading weights or a tokenizer from it fails, so a
    run that stops with the plugin's own message stopped before anything loaded."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_dir / "config.json", directory / "config.json")
    return directory


def make_data(directory: Path, n: int = 8) -> Path:
    """``n`` synthetic VQA records as axolotl chat_template messages (user: image path + question)."""
    from vr_plugin.synthetic import make_vqa_dataset

    paths = make_vqa_dataset(str(directory), n_train=n, n_test=1, seed=0)
    with open(paths["train"], encoding="utf-8") as handle:
        records = json.load(handle)
    out = directory / "messages.jsonl"
    with open(out, "w", encoding="utf-8") as handle:
        for record in records:
            question = record["conversations"][0]["value"].replace("<image>", "").strip()
            image = os.path.join(paths["images"], record["image"])
            user = [{"type": "image", "path": image}, {"type": "text", "text": question}]
            answer = [{"type": "text", "text": record["conversations"][1]["value"]}]
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return out


def base_config(model_dir: Path, data: Path, output_dir: Path, **overrides) -> dict:
    """A 2-step CPU axolotl config on the tiny Llava with the plugin and ``visual_region: uniform_0.25``."""
    cfg = {
        "base_model": str(model_dir),
        "processor_type": "AutoProcessor",
        "chat_template": "llava",
        "skip_prepare_dataset": True,
        "remove_unused_columns": False,
        "sample_packing": False,
        "datasets": [{"path": str(data), "ds_type": "json", "type": "chat_template"}],
        "output_dir": str(output_dir),
        "sequence_len": 256,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 2,
        "num_epochs": 1,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "learning_rate": 0.01,
        "weight_decay": 0.0,
        "save_strategy": "steps",
        "save_steps": 2,
        "logging_steps": 1,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "seed": 0,
        "dataset_processes": 1,
        "plugins": [PLUGIN],
        "visual_region": SPEC,
    }
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}


def write_config(cfg: dict, path: Path) -> Path:
    """Write ``cfg`` as YAML."""
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def axolotl_train(config: Path, cwd: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``axolotl train cfg.yml [extra]``: the real CLI (by default it runs ``accelerate launch``, so the venv's bin
    goes on PATH)."""
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [os.path.join(bin_dir, "axolotl"), "train", str(config), *extra],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
