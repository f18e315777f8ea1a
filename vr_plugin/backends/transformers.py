"""transformers internals: which Auto class maps a config, and the Trainer's quantization check (private API)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import transformers

__all__ = ["auto_class_for", "hybrid_quantized_allowed"]

AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM")


def auto_class_for(config: Any) -> Any:
    """The first Auto class of :data:`AUTO_CLASSES` whose mapping knows ``config``'s type (``None`` if none)."""
    for name in AUTO_CLASSES:
        auto = getattr(transformers, name, None)
        if auto is not None and type(config) in auto._model_mapping:
            return auto
    return None


@contextlib.contextmanager
def hybrid_quantized_allowed() -> Iterator[None]:
    """Let the Trainer accept a hybrid model: quantized outside the region, with full-precision layers to train.

    The Trainer refuses every bitsandbytes model without PEFT adapters, as it cannot tell a hybrid (whose region
    layers are full precision) from a purely quantized one; its check is skipped while the Trainer is built, and
    only for a model that has full-precision parameters to train.
    """
    import transformers.trainer as trainer_module

    check = getattr(trainer_module, "validate_quantization_for_training", None)
    if check is None:
        raise ValueError(
            f"the Trainer of transformers {transformers.__version__} refuses quantized models without adapters, so "
            "--quantize_frozen (hybrid) cannot train with it; use --lora --bits 4, or transformers >= 5"
        )

    def allow_hybrid(model: Any) -> None:
        trainable = [p for p in model.parameters() if p.requires_grad and p.dtype.is_floating_point]
        if not trainable:
            check(model)

    trainer_module.validate_quantization_for_training = allow_hybrid
    try:
        yield
    finally:
        trainer_module.validate_quantization_for_training = check
