"""Tiny local LLaVA ingredients: Vicuna-style Llama + sentencepiece tokenizer, CLIP tower, projector, data.

Everything is built here and saved to a directory, then loaded by LLaVA's own code with ``from_pretrained``.
Works on transformers 4.37 (the LLaVA stack).
"""

from __future__ import annotations

import os

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from vr_plugin.synthetic import make_vqa_dataset

from ..common import train_sentencepiece

HIDDEN = 64
VISION_HIDDEN = 32
IMAGE = 32


def sentencepiece_tokenizer(out_dir: str, vocab_size: int = 400):
    """Train a Llama-style sentencepiece BPE model (byte fallback, <unk>/<s>/</s> = 0/1/2) and save a LlamaTokenizer."""
    from transformers import LlamaTokenizer

    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "spm")
    model_file = train_sentencepiece(prefix, vocab_size)
    tokenizer = LlamaTokenizer(vocab_file=model_file, legacy=False)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def vicuna_dir(out_dir: str, num_layers: int = 8, seed: int = 0) -> str:
    """A tiny Vicuna-style LlamaForCausalLM with its tokenizer, saved with save_pretrained."""
    tokenizer = sentencepiece_tokenizer(out_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def clip_dir(out_dir: str, seed: int = 0) -> str:
    """A tiny CLIP vision tower with its image processor (folder name contains 'clip', as LLaVA expects)."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=2 * VISION_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=8,
        projection_dim=VISION_HIDDEN,
    )
    CLIPVisionModel(config).save_pretrained(out_dir, safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}, do_center_crop=True
    ).save_pretrained(out_dir)
    return out_dir


def projector_bin(path: str, seed: int = 0) -> str:
    """A stage-1 ``mm_projector.bin`` (mlp2x_gelu) like LLaVA's pretrain output."""
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential(torch.nn.Linear(VISION_HIDDEN, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, HIDDEN))
    torch.save({f"model.mm_projector.{k}": v for k, v in mlp.state_dict().items()}, path)
    return path


def llava_workspace(root: str, num_layers: int = 8, n_train: int = 16) -> dict:
    """Everything a LLaVA finetune run needs, under ``root``."""
    paths = {
        "vicuna": vicuna_dir(os.path.join(root, "vicuna-tiny"), num_layers),
        "clip": clip_dir(os.path.join(root, "clip-vit-tiny")),
        "projector": projector_bin(os.path.join(root, "mm_projector.bin")),
    }
    data = make_vqa_dataset(os.path.join(root, "data"), n_train=n_train, n_test=4, image_size=IMAGE)
    paths.update(data=data["train"], images=data["images"], test=data["test"], calibration=data["calibration"])
    return paths


def finetune_flags(paths: dict, output_dir: str, *, lora: bool = False, steps: int = 2) -> list:
    """LLaVA's scripts/v1_5/finetune(_lora).sh flags, shrunk to a CPU run of a few steps."""
    flags = [
        "--model_name_or_path", paths["vicuna"],
        "--version", "v1",
        "--data_path", paths["data"],
        "--image_folder", paths["images"],
        "--vision_tower", paths["clip"],
        "--pretrain_mm_mlp_adapter", paths["projector"],
        "--mm_projector_type", "mlp2x_gelu",
        "--mm_vision_select_layer", "-2",
        "--mm_use_im_start_end", "False",
        "--mm_use_im_patch_token", "False",
        "--image_aspect_ratio", "pad",
        "--group_by_modality_length", "True",
        "--bf16", "False",
        "--output_dir", output_dir,
        "--max_steps", str(steps),
        "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1",
        "--evaluation_strategy", "no",
        "--save_strategy", "no",
        "--learning_rate", "1e-2",
        "--weight_decay", "0.",
        "--warmup_ratio", "0.03",
        "--lr_scheduler_type", "cosine",
        "--logging_steps", "1",
        "--model_max_length", "256",
        "--gradient_checkpointing", "True",
        "--dataloader_num_workers", "0",
        "--lazy_preprocess", "True",
        "--report_to", "none",
        "--seed", "0",
    ]  # fmt: skip
    if lora:
        flags += ["--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--mm_projector_lr", "2e-3"]
    return flags
