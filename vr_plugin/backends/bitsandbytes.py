"""bitsandbytes: every test of its class names and quantization state (imported by name only, never required)."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

__all__ = [
    "QUANTIZED_LINEARS",
    "is_quant_state_key",
    "is_quantized_linear",
    "is_quantized_model",
    "is_quantized_param",
    "logical_shape",
    "require",
]

QUANTIZED_LINEARS = ("Linear4bit", "Linear8bitLt")  # subclasses of nn.Linear
_QUANTIZED_PARAMS = ("Params4bit", "Int8Params")
# What bitsandbytes stores beside a quantized weight in a state dict (its quantization state, not a parameter).
_QUANT_STATE_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".weight_format")


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear map."""
    return type(module).__name__ in QUANTIZED_LINEARS


def is_quantized_model(model: nn.Module) -> bool:
    """Whether any linear map of ``model`` is quantized by bitsandbytes."""
    return any(is_quantized_linear(m) for m in model.modules())


def is_quantized_param(param: Any) -> bool:
    """Whether ``param`` holds bitsandbytes-quantized data (4-bit packed or 8-bit), not trainable floats."""
    return type(param).__name__ in _QUANTIZED_PARAMS


def logical_shape(param: Any) -> Optional[tuple]:
    """The unquantized shape of a packed 4-bit weight (``None`` for any other tensor)."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return tuple(shape) if shape is not None else None


def is_quant_state_key(key: str) -> bool:
    """Whether a state-dict ``key`` is bitsandbytes' quantization state of a weight (``...weight.absmax``, ...)."""
    return key.endswith(_QUANT_STATE_SUFFIXES) or ".quant_state.bitsandbytes__" in key


def require(why: str) -> None:
    """Raise ``ImportError`` (``name="bitsandbytes"``) saying ``why`` it is needed, if it cannot be imported."""
    import importlib

    try:
        importlib.import_module("bitsandbytes")
    except ImportError:
        raise ImportError(f"{why}, and bitsandbytes cannot be imported", name="bitsandbytes") from None
