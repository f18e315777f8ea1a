"""The scoring side of the LLaVA-family hooks: calibration batches built as the host's eval scripts build them
(:func:`host_prompt_batches`) and the ``score`` command of each integration (:func:`score_main`)."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch

__all__ = ["host_prompt_batches", "score_main"]


def host_prompt_batches(
    host: Any,
    tokenizer: Any,
    image_processor: Any,
    model: Any,
    json_path: str,
    image_folder: str,
    conv_mode: str,
    limit: Optional[int] = None,
) -> Any:
    """Batches of one as the host's eval scripts build them (conversation template, ``tokenizer_image_token``,
    ``process_images``), from the human turns of a LLaVA-format file; for :func:`vr_plugin.score_layers`.

    ``host`` names the host's modules: ``conversation``, ``mm_utils`` and ``constants``.
    """
    import inspect

    from PIL import Image

    from ...data import load_conversations, record_images

    constants, conversation, mm_utils = host.constants, host.conversation, host.mm_utils
    takes_sizes = "image_sizes" in inspect.signature(type(model).forward).parameters  # LLaVA yes, Bunny no
    if conv_mode not in conversation.conv_templates:
        raise ValueError(f"--conv-mode {conv_mode!r} unknown; choose from {sorted(conversation.conv_templates)}")
    for record in load_conversations(json_path)[:limit]:
        question = "\n".join(
            t["value"].replace(constants.DEFAULT_IMAGE_TOKEN, "").strip()
            for t in record["conversations"]
            if t["from"] in ("human", "user")
        )
        images = record_images(record)
        conv = conversation.conv_templates[conv_mode].copy()
        conv.append_message(conv.roles[0], (constants.DEFAULT_IMAGE_TOKEN + "\n" if images else "") + question)
        conv.append_message(conv.roles[1], None)
        ids = mm_utils.tokenizer_image_token(
            conv.get_prompt(), tokenizer, constants.IMAGE_TOKEN_INDEX, return_tensors="pt"
        ).unsqueeze(0)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if images:
            image = Image.open(os.path.join(image_folder, images[0])).convert("RGB")
            batch["images"] = mm_utils.process_images([image], image_processor, model.config).to(model.dtype)
            if takes_sizes:
                batch["image_sizes"] = [image.size]
        yield batch


def score_main(
    host: Any,
    argv: list,
    prog: str,
    default_conv_mode: str,
    load: Callable[[Any], tuple],
    add_arguments: Optional[Callable[[Any], None]] = None,
) -> dict:
    """``score`` entry of an integration: load a checkpoint with ``load(namespace) -> (tokenizer, model,
    image_processor)`` (the host's builder), score its layers on calibration prompts, write the JSON report."""
    import argparse

    from ...score import METRICS, score_layers

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Score the LLM layers of a checkpoint on calibration "
        "images (for pruning outside the visual region).",
    )
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--data", required=True, help="LLaVA-format JSON whose human turns are the prompts")
    parser.add_argument("--images", required=True, help="image folder")
    parser.add_argument("--metric", default="bi", choices=[m for m in METRICS if m != "weight_change"])
    parser.add_argument("--out", required=True, help="scores JSON to write")
    parser.add_argument("--conv-mode", default=default_conv_mode)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N records")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if add_arguments is not None:
        add_arguments(parser)
    ns = parser.parse_args(argv)
    tokenizer, model, image_processor = load(ns)
    if ns.device == "cpu":
        model = model.float()  # the builders load fp16; score in fp32 on CPU
    batches = list(
        host_prompt_batches(host, tokenizer, image_processor, model, ns.data, ns.images, ns.conv_mode, ns.limit)
    )
    return score_layers(
        model,
        batches,
        ns.metric,
        out=ns.out,
        model_id=ns.model_path,
        data_description=f"{ns.data} ({len(batches)} records, images {ns.images})",
    )
