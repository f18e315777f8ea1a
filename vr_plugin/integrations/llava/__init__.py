"""LLaVA (haotian-liu/LLaVA at c121f04 == PyPI ``llava-torch`` 1.2.2.post1).

* ``python -m vr_plugin.integrations.llava.train <LLaVA's flags> --visual_region uniform_0.25`` (or under
  ``deepspeed --module``) runs LLaVA's own, unmodified ``llava.train.train.train()`` with the region;
* ``patches/llava.patch`` adds the same flags to a LLaVA checkout through :func:`region_callbacks` and
  :func:`region_lora_targets`;
* ``python -m vr_plugin.integrations.llava.run --prune 4 --prune_scores scores.json llava.eval.<script> ...`` runs
  LLaVA's eval / serve scripts on a model pruned outside its region (:func:`patch_loader`);
* ``python -m vr_plugin.integrations.llava.score`` scores a LLaVA checkpoint's layers on calibration images.
"""

from __future__ import annotations

from typing import Any

from ...args import RegionArguments
from ..llava_family import attention_implementation, patch_train_module, region_callbacks, region_lora_targets
from ..llava_family import patch_loader as _patch_loader

__all__ = ["RegionArguments", "patch_loader", "patch_train", "region_callbacks", "region_lora_targets", "train"]

TRAIN_MODULE = "llava.train.train"
BUILDER_MODULE = "llava.model.builder"


def patch_train() -> Any:
    """Import ``llava.train.train`` and patch it for the region flags; return the module."""
    import llava.train.train as module

    patch_train_module(module, "LLaVATrainer")
    return module


def train() -> None:
    """LLaVA's ``train()`` with the region flags; ``flash_attention_2`` only where flash-attn and a GPU exist."""
    patch_train().train(attn_implementation=attention_implementation())


def patch_loader(**kwargs: Any) -> Any:
    """Prune every model ``llava.model.builder.load_pretrained_model`` returns (see ``llava_family.patch_loader``)."""
    import importlib

    return _patch_loader(importlib.import_module(BUILDER_MODULE), **kwargs)
