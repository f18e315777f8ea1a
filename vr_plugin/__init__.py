"""vr_plugin: tune (and prune around) the visual region of an LVLM's LLM.

``select_layers`` is pure Python; everything else imports torch on first use,
so ``import vr_plugin`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._logging import setup_logging
from .spec import select_layers

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily)
_LAZY = {
    "find_decoder_layers": "locate",
    "map_parameters": "locate",
    "DecoderLayers": "locate",
    "num_layers_from_config": "locate",
    "apply_visual_region": "freeze",
    "RegionPlan": "freeze",
    "RegionFreezeCallback": "callback",
    "read_region": "record",
    "read_pruning": "record",
    "region_lora_config": "lora",
    "apply_region_lora": "lora",
    "prepare_qlora": "lora",
    "region_param_groups": "lora",
    "load_for_region": "quant",
    "load_quantized": "quant",
    "bnb_config": "quant",
    "save_region_state": "export",
    "load_region_state": "export",
    "save_region_adapter": "export",
    "merge_region_lora": "export",
    "RegionArguments": "args",
    "add_region_args": "args",
    "score_layers": "score",
    "load_scores": "score",
    "prune_outside_region": "prune",
    "RegionTrainer": "training",
    "chunked_loss": "loss",
    "fsdp_config": "distributed",
}

__all__ = ["__version__", "select_layers", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from .args import RegionArguments, add_region_args  # noqa: F401
    from .callback import RegionFreezeCallback  # noqa: F401
    from .distributed import fsdp_config  # noqa: F401
    from .export import load_region_state, merge_region_lora, save_region_adapter, save_region_state  # noqa: F401
    from .freeze import RegionPlan, apply_visual_region  # noqa: F401
    from .locate import DecoderLayers, find_decoder_layers, map_parameters, num_layers_from_config  # noqa: F401
    from .lora import apply_region_lora, prepare_qlora, region_lora_config, region_param_groups  # noqa: F401
    from .loss import chunked_loss  # noqa: F401
    from .prune import prune_outside_region  # noqa: F401
    from .quant import bnb_config, load_for_region, load_quantized  # noqa: F401
    from .record import read_pruning, read_region  # noqa: F401
    from .score import load_scores, score_layers  # noqa: F401
    from .training import RegionTrainer  # noqa: F401

setup_logging()


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vr_plugin' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
