"""Helpers for tests/hosts/test_llamafactory.py: a tiny Llava, LLaVA-format data registered for LLaMA-Factory, a
config writer and tensor-by-tensor checkpoint comparisons. Imports no LLaMA-Factory module."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from vr_plugin.synthetic import make_vqa_dataset
from vr_plugin.tiny import save_tiny_lvlm

NUM_LAYERS = 8
DATASET = "vr_vqa"

# How LLaMA-Factory reads the LLaVA-format file make_vqa_dataset writes (sharegpt's default from/value tags).
DATASET_INFO = {
    DATASET: {
        "file_name": "train.json",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "images": "image"},
    }
}


def make_workspace(root: Path) -> dict:
    """Tiny Llava (8 LLM layers), 8 VQA records with images, their dataset_info.json, and a config-only copy of the
    model directory (no weights: anything that tried to load them would fail)."""
    model = Path(save_tiny_lvlm("llava", str(root / "model"), num_layers=NUM_LAYERS, hidden=64))
    paths = make_vqa_dataset(str(root / "data"), n_train=8, n_test=0)
    data = Path(paths["train"]).parent
    (data / "dataset_info.json").write_text(json.dumps(DATASET_INFO), encoding="utf-8")
    config_only = root / "config_only"
    config_only.mkdir()
    shutil.copy(model / "config.json", config_only / "config.json")
    return {"model": model, "data": data, "images": Path(paths["images"]), "config_only": config_only}


def write_config(path: Path, workspace: dict, **keys) -> Path:
    """A LLaMA-Factory training YAML for 2 CPU steps on the tiny Llava (``keys`` override or add entries)."""
    config = {
        "model_name_or_path": str(workspace["model"]),
        "template": "llava",
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "full",
        "dataset": DATASET,
        "dataset_dir": str(workspace["data"]),
        "media_dir": str(workspace["images"]),
        "cutoff_len": 256,
        "output_dir": str(path.parent / "out"),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 2,
        "max_steps": 2,
        "learning_rate": 1.0e-3,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 2,
        "report_to": "none",
        "use_cpu": True,
        "preprocessing_num_workers": 1,
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    config.update(keys)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def load_weights(directory: Path, name: str = "model.safetensors") -> dict:
    """The tensors of a saved checkpoint file."""
    return load_file(str(Path(directory) / name))


def changed_keys(before: dict, after: dict) -> set:
    """Keys whose tensors are not bit-identical (both files must hold the same keys)."""
    assert set(before) == set(after), sorted(set(before) ^ set(after))
    return {key for key in before if not torch.equal(before[key], after[key])}


def llm_layer(key: str):
    """The LLM decoder-layer index a tensor name belongs to (``None`` for vision tower, projector, embeddings...)."""
    match = re.search(r"language_model\.(?:model\.)?layers\.(\d+)\.", key)
    return int(match.group(1)) if match else None


def expected_changes(keys, layers, projector: bool) -> set:
    """Every tensor of the given LLM layers, plus the projector's when it trains."""
    wanted = set(layers)
    return {k for k in keys if llm_layer(k) in wanted or (projector and "multi_modal_projector" in k)}
