"""transformers internals: which Auto class maps a config, and the Trainer's quantization check (private API)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import transformers

__all__ = ["auto_class_for", "hybrid_quantized_allowed", "original_names", "runtime_layout"]

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


@contextlib.contextmanager
def runtime_layout(model: Any) -> Iterator[None]:
    """Make ``model.save_pretrained`` keep the runtime parameter names (transformers >= 5 reverts them to the
    checkpoint's original layout by default, which the Trainer's resume cannot load)."""
    import functools
    import inspect

    save = getattr(type(model), "save_pretrained", None)
    keeps_names = save is None or "save_original_format" not in inspect.signature(save).parameters
    if keeps_names or hasattr(model, "peft_config"):
        yield
        return
    model.save_pretrained = functools.partial(save, model, save_original_format=False)
    try:
        yield
    finally:
        del model.save_pretrained


def original_names(model: Any, names: list) -> dict:
    """``{runtime name: name in an original-layout checkpoint}`` for parameters ``names`` of ``model``."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5 saves runtime names
        return {name: name for name in names}
    mapping = {}
    params = dict(model.named_parameters())
    for name in names:  # one at a time: a renaming maps one key to one key; a converter (fused experts) may not
        reverted = revert_weight_conversion(model, {name: params[name]})
        mapping[name] = next(iter(reverted)) if len(reverted) == 1 else name
    return mapping
