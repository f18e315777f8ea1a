"""Data for the ms-swift tests: the tiny Llava and a synthetic VQA set in swift's ``messages`` + ``images`` form."""

from __future__ import annotations

import json
import os

from vr_plugin.synthetic import make_vqa_dataset
from vr_plugin.tiny import save_tiny_lvlm

ROLES = {"human": "user", "gpt": "assistant"}


def swift_dataset(out_dir: str, n_train: int = 8) -> str:
    """Write ``n_train`` synthetic VQA records as swift's JSONL (``messages``, ``images``); return its path."""
    paths = make_vqa_dataset(os.path.join(out_dir, "vqa"), n_train=n_train, n_test=0)
    with open(paths["train"], encoding="utf-8") as handle:
        records = json.load(handle)
    target = os.path.join(out_dir, "train.jsonl")
    with open(target, "w", encoding="utf-8") as handle:
        for record in records:
            messages = [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in record["conversations"]]
            image = os.path.join(paths["images"], record["image"])
            handle.write(json.dumps({"messages": messages, "images": [image]}) + "\n")
    return target


def tiny_llava(out_dir: str) -> str:
    """The tiny local Llava (8 LLM layers, width 64) with tokenizer, processor and chat template."""
    return save_tiny_lvlm("llava", out_dir, num_layers=8, hidden=64)
