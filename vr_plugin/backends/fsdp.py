"""FSDP through accelerate: the active plugin and flat-parameter units (private attributes touched here only)."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["active_plugin", "flat_params_without_orig"]


def active_plugin() -> Any:
    """accelerate's active FSDP plugin (set from ``TrainingArguments.fsdp_config`` or ``accelerate launch``)."""
    try:
        from accelerate.state import AcceleratorState
    except ImportError:  # pragma: no cover - accelerate comes with transformers' Trainer
        return None
    return AcceleratorState._shared_state.get("fsdp_plugin")


def flat_params_without_orig(model: nn.Module) -> bool:
    """Whether an FSDP1 unit of ``model`` flattens its parameters without keeping the original ones."""
    for module in model.modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            handle = getattr(module, "_handle", None)
            if handle is not None and not getattr(handle, "_use_orig_params", True):
                return True
    return False
