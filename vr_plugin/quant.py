"""Hybrid loading: the LLM outside the region in 4-bit / 8-bit (bitsandbytes), the region, projector and vision
tower in full precision, so the region can be tuned with full parameters on one consumer GPU.

The layer count and the module names must be known *before* the weights load (they form bitsandbytes' skip
list), so the model is first built on the meta device from its config, where :mod:`vr_plugin.locate` finds
the decoder layers exactly as it would on the real model.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from .backends.bitsandbytes import is_quantized_linear
from .freeze import RegionPlan, apply_visual_region
from .locate import find_decoder_layers, map_parameters
from .model_io import dtype_kwargs, model_class_for
from .region import as_region

__all__ = [
    "QUANT_KINDS",
    "bnb_config",
    "load_quantized",
    "load_for_region",
    "model_class_for",
    "quantized_layers",
]

logger = logging.getLogger(__name__)

QUANT_KINDS = ("nf4", "fp4", "int8")


def _skip_patterns(names: Iterable[str]) -> list:
    """Module names in the form the installed transformers' bitsandbytes matcher expects.

    transformers >= 5 matches patterns as regexes up to a module boundary ("layers.1" does not match
    "layers.11"); older releases test plain substrings, where a trailing dot keeps "layers.1." off "layers.11".
    """
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module  # noqa: F401

        return [re.escape(n) for n in names]
    except ImportError:
        return [n + "." for n in names]


def bnb_config(
    kind: str = "nf4",
    compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    skip_modules: Optional[list] = None,
):
    """A ``BitsAndBytesConfig`` for ``kind`` in ``nf4`` / ``fp4`` (4-bit) or ``int8``."""
    from transformers import BitsAndBytesConfig

    if kind not in QUANT_KINDS:
        raise ValueError(f"quantization {kind!r} is not one of {', '.join(QUANT_KINDS)}")
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip_modules,
    )


def _quantizable(module: nn.Module) -> bool:
    return type(module) is nn.Linear or is_quantized_linear(module)


def quantized_layers(model: nn.Module, layers_path: Optional[str] = None) -> dict:
    """Per decoder layer: ``True`` if all its linear modules are bitsandbytes-quantized, ``False`` if none is."""
    location = find_decoder_layers(model, layers_path)
    states = {}
    for index, layer in enumerate(location.layers):
        # plain linear maps only: transformers keeps some Linear subclasses (Llama 4's router) in full precision
        kinds = {is_quantized_linear(m) for m in layer.modules() if _quantizable(m)}
        states[index] = kinds.pop() if len(kinds) == 1 else None
    return states


def _config_and_class(path: str, model_cls: Any, kwargs: dict) -> tuple:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False))
    return config, model_cls or model_class_for(config)


def _full_precision_modules(skeleton: nn.Module, location: Any, region: Iterable[int]) -> list:
    """Modules kept out of bitsandbytes: the given region layers, projector, vision tower and lm_head.

    A bare parameter of those groups that sits on a module holding the decoder layers too (LLaVA-NeXT's
    ``model.image_newline``) names no module to keep: keeping ``model`` would keep every layer out.
    """
    keep = {f"{location.name}.{i}" for i in region}
    for info in map_parameters(skeleton, location):
        owner = info.name.rpartition(".")[0]
        if info.group in ("projector", "vision", "lm_head") and owner and not location.name.startswith(owner + "."):
            keep.add(owner)
    keep.add("lm_head")
    return sorted(keep)


def load_quantized(
    path: str,
    kind: str = "nf4",
    *,
    keep_region: Union[str, Iterable[int], None] = None,
    model_cls: Any = None,
    dtype: torch.dtype = torch.bfloat16,
    compute_dtype: Optional[torch.dtype] = None,
    layers_path: Optional[str] = None,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Load ``path`` with its LLM decoder layers in ``kind`` (nf4 / fp4 / int8) via bitsandbytes.

    The projector, vision tower and lm_head stay in ``dtype`` (the QLoRA base). With ``keep_region`` (a
    spec) those decoder layers stay in full precision too: the hybrid base. The result is checked layer by
    layer against the plan; a mismatch raises instead of training something else than asked.
    """
    from accelerate import init_empty_weights

    config, model_cls = _config_and_class(path, model_cls, from_pretrained_kwargs)
    with init_empty_weights():  # names and depth before any weight loads
        skeleton = model_cls.from_config(config)
    location = find_decoder_layers(skeleton, layers_path)
    region = list(as_region(skeleton, keep_region, layers_path).layers) if keep_region is not None else []
    keep = _full_precision_modules(skeleton, location, region)
    del skeleton
    quant = bnb_config(kind, compute_dtype or dtype, skip_modules=_skip_patterns(keep))
    model = model_cls.from_pretrained(path, quantization_config=quant, **dtype_kwargs(dtype), **from_pretrained_kwargs)

    states = quantized_layers(model, layers_path)
    wrong = [i for i, quantized in states.items() if quantized is not (i not in region)]
    if wrong:
        raise RuntimeError(
            f"loading {path} with {kind}: layers {wrong} are not quantized as planned "
            f"(full precision: {region or 'none'}); per-layer state {states}"
        )
    logger.info(
        "loaded %s: %d/%d decoder layers in %s, full precision: %s",
        path,
        len(states) - len(region),
        len(states),
        kind,
        region or "none",
    )
    return model


def load_for_region(
    path: str,
    spec: Union[str, Iterable[int]],
    quantize_frozen: Optional[str] = "nf4",
    *,
    model_cls: Any = None,
    dtype: torch.dtype = torch.bfloat16,
    compute_dtype: Optional[torch.dtype] = None,
    layers_path: Optional[str] = None,
    apply: bool = True,
    region_options: Optional[dict] = None,
    **from_pretrained_kwargs: Any,
) -> tuple:
    """Hybrid load: the LLM outside the region quantized; region, projector, vision tower, lm_head in ``dtype``.

    ``quantize_frozen``: ``nf4`` / ``fp4`` / ``int8``, or ``None`` for a plain full-precision load. With
    ``apply`` the region is frozen as by :func:`apply_visual_region` (options in ``region_options``), ready
    for full-parameter training of the region. Returns ``(model, plan)`` (``plan`` is ``None`` without ``apply``).
    """
    if quantize_frozen is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(
            path, trust_remote_code=from_pretrained_kwargs.get("trust_remote_code", False)
        )
        kwargs = dict(from_pretrained_kwargs)
        kwargs.update(dtype_kwargs(dtype))
        model = (model_cls or model_class_for(config)).from_pretrained(path, **kwargs)
    else:
        model = load_quantized(
            path,
            quantize_frozen,
            keep_region=spec,
            model_cls=model_cls,
            dtype=dtype,
            compute_dtype=compute_dtype,
            layers_path=layers_path,
            **from_pretrained_kwargs,
        )
    plan: Optional[RegionPlan] = None
    if apply:
        plan = apply_visual_region(model, spec, layers_path=layers_path, **(region_options or {}))
    return model, plan
