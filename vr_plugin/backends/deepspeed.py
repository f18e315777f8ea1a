"""DeepSpeed: ZeRO-3 partitioned parameters, gathering, logical sizes, and where its optimizer keeps parameters."""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

__all__ = ["gathered", "is_zero3_param", "logical_numel", "optimizer_parameters", "zero3_hooked", "zero3_partitioned"]

# Attributes under which DeepSpeed optimizers keep the model's own (16-bit) parameters.
_OPTIMIZER_GROUPS = ("bit16_groups", "fp16_groups", "bf16_groups")


def is_zero3_param(param: torch.Tensor) -> bool:
    """Whether ``param`` is partitioned by ZeRO-3 (its data lives in shards across ranks)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_status")


def zero3_partitioned(model: nn.Module) -> bool:
    """Whether ``model`` holds DeepSpeed ZeRO-3 partitioned parameters (built in ``zero.Init`` or by an engine)."""
    return any(is_zero3_param(p) for p in model.parameters())


def zero3_hooked(module: nn.Module) -> bool:
    """Whether a DeepSpeed ZeRO-3 engine registered ``module``, so its forward gathers its own parameters."""
    return isinstance(getattr(module, "ds_id", None), int)


def logical_numel(param: torch.Tensor) -> Optional[int]:
    """The full element count of a ZeRO-3 partition (``None`` for an ordinary tensor)."""
    count = getattr(param, "ds_numel", None)
    return int(count) if count else None


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Make ZeRO-3-partitioned ``params`` whole inside the block (read-only), re-partition them after.

    A collective: every rank must enter it with the same parameters. Ordinary tensors pass through unchanged.
    """
    params = [p for p in params if is_zero3_param(p)]
    if not params:
        yield
        return
    from deepspeed import zero

    with zero.GatheredParameters(params):
        yield


def optimizer_parameters(optimizer: Any) -> Optional[list]:
    """The parameter groups a DeepSpeed optimizer trains (lists of the model's parameters), ``None`` for others."""
    for attr in _OPTIMIZER_GROUPS:
        groups = getattr(optimizer, attr, None)
        if groups:
            return groups
    return None
