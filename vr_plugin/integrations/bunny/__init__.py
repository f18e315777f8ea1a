"""Bunny (BAAI-DCAI/Bunny at 08273ac), every backbone: phi-1.5, phi-2, phi-3, stablelm-2, qwen1.5-1.8b, minicpm,
llama3-8b. Bunny is not on PyPI: put its checkout on ``PYTHONPATH`` (or ``pip install --no-deps -e`` it).

* ``python -m vr_plugin.integrations.bunny.train <Bunny's flags> --visual_region uniform_0.25`` (or under
  ``deepspeed --module``) runs Bunny's own, unmodified ``bunny.train.train.train()`` with the region;
* ``patches/bunny.patch`` adds the same flags to a Bunny checkout;
* ``python -m vr_plugin.integrations.bunny.run --prune 4 --prune_scores scores.json bunny.eval.<script> ...`` runs
  Bunny's eval / serve scripts on a model pruned outside its region;
* ``python -m vr_plugin.integrations.bunny.score`` scores a Bunny checkpoint's layers on calibration images.

MiniCPM scales residuals by ``scale_depth / sqrt(num_hidden_layers)``: pruning rescales its layers so the pruned
model (in memory, saved, reloaded by Bunny's builder) computes exactly what the layers it keeps computed before.
"""

from __future__ import annotations

from typing import Any

from ...args import RegionArguments
from ..llava_family import patch_loader as _patch_loader
from ..llava_family import patch_train_module, region_callbacks, region_lora_targets

__all__ = ["RegionArguments", "patch_loader", "patch_train", "region_callbacks", "region_lora_targets", "train"]

TRAIN_MODULE = "bunny.train.train"
BUILDER_MODULE = "bunny.model.builder"


def patch_train() -> Any:
    """Import ``bunny.train.train`` and patch it for the region flags; return the module."""
    import bunny.train.train as module

    patch_train_module(module, "BunnyTrainer")
    return module


def train() -> None:
    """Bunny's ``train()`` with the region flags."""
    patch_train().train()


def patch_loader(**kwargs: Any) -> Any:
    """Prune every model ``bunny.model.builder.load_pretrained_model`` returns (see ``llava_family.patch_loader``)."""
    import importlib

    return _patch_loader(importlib.import_module(BUILDER_MODULE), **kwargs)
