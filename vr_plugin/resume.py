"""Resume that keeps the trained weights: :func:`verify_resumed_weights`.

transformers 5 saves a checkpoint in the checkpoint's original key layout (``save_pretrained`` reverts its weight
conversions, e.g. ``model.language_model.layers.*`` back to ``language_model.model.layers.*`` for Llava), while the
Trainer resumes by ``load_state_dict(strict=False)`` under the runtime names: every key misses, a warning is logged
and training continues from the base weights. :class:`vr_plugin.RegionTrainer` writes its checkpoints in the
runtime layout and stops on a partial load; :class:`vr_plugin.RegionFreezeCallback` runs
:func:`verify_resumed_weights` when a run resumes, so a plain ``Trainer`` stops too instead of training on.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["ResumeError", "checkpoint_keys", "resumed_checkpoint", "saved_names", "verify_resumed_weights"]

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


class ResumeError(ValueError):
    """A run resumed from a checkpoint whose weights did not (all) come back."""


def resumed_checkpoint(args: Any, global_step: int) -> Optional[str]:
    """The checkpoint directory a run with ``args`` resumed from at ``global_step`` (``None`` if none is found)."""
    resume = getattr(args, "resume_from_checkpoint", None)
    if isinstance(resume, str) and os.path.isdir(resume):
        return resume
    output_dir = getattr(args, "output_dir", None)
    candidate = os.path.join(output_dir or "", f"checkpoint-{global_step}")
    return candidate if output_dir and os.path.isdir(candidate) else None


def checkpoint_keys(directory: str) -> dict:
    """``{key: safetensors file}`` of a checkpoint's full model weights (empty for adapter-only checkpoints)."""
    index = os.path.join(directory, SAFE_INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
        return {key: os.path.join(directory, name) for key, name in weight_map.items()}
    single = os.path.join(directory, SAFE_WEIGHTS)
    if not os.path.isfile(single):
        return {}
    from safetensors import safe_open

    with safe_open(single, "pt") as handle:
        return {key: single for key in handle.keys()}


def saved_names(model: nn.Module, names: list) -> dict:
    """``{runtime name: name in an original-layout checkpoint}`` for parameters ``names`` of ``model``."""
    from .backends.transformers import original_names

    return original_names(model, names)


def _read(files: dict, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(files[key], "pt") as handle:
        return handle.get_tensor(key)


def verify_resumed_weights(model: nn.Module, checkpoint: str, names: list) -> None:
    """Raise :class:`ResumeError` unless parameters ``names`` of ``model`` hold ``checkpoint``'s values.

    Each parameter is looked up under its runtime name and under its original-layout name. Adapter-only
    checkpoints (peft loads those itself) are not checked.
    """
    files = checkpoint_keys(checkpoint)
    if not files:
        return
    params = dict(model.named_parameters())
    lost = []
    for name, saved in saved_names(model, names).items():
        key = name if name in files else saved
        if key not in files:
            lost.append(f"{name} (not in the checkpoint)")
        elif not torch.equal(_read(files, key).to(params[name].dtype), params[name].detach().cpu()):
            lost.append(f"{name} (saved as {key}, not loaded)")
    if lost:
        raise ResumeError(
            f"resuming from {checkpoint} did not restore {len(lost)} of {len(names)} trained parameters, e.g. "
            f"{'; '.join(lost[:3])}: the checkpoint's keys do not match the model's, so the Trainer would continue "
            "from the base weights. Train with vr_plugin.RegionTrainer (vr-plugin train), which writes checkpoints "
            "that resume, or resume from a checkpoint it wrote"
        )
