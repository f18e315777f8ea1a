"""The region under sharded training: DeepSpeed ZeRO-3 parameter gathering and FSDP settings.

* :func:`gathered` -- a context that makes ZeRO-3-partitioned parameters whole (a collective: every rank enters
  it with the same parameters); a no-op for ordinary tensors (it and the two below live in
  :mod:`vr_plugin.backends.deepspeed`);
* :func:`zero3_partitioned` / :func:`zero3_hooked` -- whether a model's parameters are ZeRO-3 partitioned, and
  whether a DeepSpeed engine fetches them itself during forward;
* :func:`fsdp_config` -- ``TrainingArguments(fsdp=True, fsdp_config=...)`` that wraps each decoder layer in its own
  FSDP unit (the class comes from :func:`vr_plugin.find_decoder_layers`) and keeps the original parameters;
* :func:`check_fsdp` -- what :class:`vr_plugin.RegionFreezeCallback` runs before the model is wrapped: FSDP1 must
  use ``use_orig_params=True`` when frozen and trainable parameters share a unit.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from torch import nn

from .backends.deepspeed import gathered, zero3_hooked, zero3_partitioned
from .backends.fsdp import active_plugin, flat_params_without_orig
from .locate import find_decoder_layers, unwrap_model

__all__ = ["check_fsdp", "fsdp_config", "gathered", "zero3_hooked", "zero3_partitioned"]

logger = logging.getLogger(__name__)


def _decoder_layer_classes(model: nn.Module, layers_path: Optional[str]) -> list:
    layers = find_decoder_layers(model, layers_path).layers
    names = []
    for layer in layers:
        if type(layer).__name__ not in names:
            names.append(type(layer).__name__)
    return names


def fsdp_config(model: nn.Module, version: int = 2, layers_path: Optional[str] = None, **overrides: Any) -> dict:
    """An ``fsdp_config`` for ``TrainingArguments(fsdp=True, fsdp_config=...)``: one FSDP unit per decoder layer.

    Auto-wrap is ``TRANSFORMER_BASED_WRAP`` on the decoder-layer class found by :func:`vr_plugin.find_decoder_layers`,
    so region and frozen layers never share a unit; FSDP1 (``version=1``) also gets ``use_orig_params=True``, which
    frozen parameters beside trainable ones (embeddings and projector in the root unit) need. ``overrides`` are
    copied in as given; ``use_orig_params=False`` with FSDP1 is refused.
    """
    if version not in (1, 2):
        raise ValueError(f"FSDP version {version!r} is not supported; use 1 or 2")
    config: dict = {
        "version": version,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": _decoder_layer_classes(unwrap_model(model), layers_path),
    }
    if version == 1:
        config["use_orig_params"] = True
    config.update(overrides)
    if version == 1 and str(config.get("use_orig_params")).lower() == "false":
        raise ValueError(
            "fsdp_config: use_orig_params=False cannot train a visual region with FSDP1 (frozen and trainable "
            "parameters share the root unit, and FSDP1 flattens only tensors of uniform requires_grad); "
            "leave use_orig_params=True"
        )
    return config


def check_fsdp(model: Optional[nn.Module] = None, args: Any = None) -> Optional[str]:
    """Make FSDP safe for a visual region before the model is wrapped; return a one-line summary (``None``: no FSDP).

    FSDP1 with ``use_orig_params=False`` flattens each unit's parameters into one tensor that is either trainable or
    not, so a unit holding frozen and trainable parameters cannot be built: the flag is switched to ``True`` on the
    accelerate plugin (and in ``args.fsdp_config``) with a warning. A model already wrapped that way raises
    ``ValueError``. FSDP2 keeps per-parameter ``requires_grad`` and needs nothing.
    """
    if model is not None and flat_params_without_orig(model):
        raise ValueError(
            "the model is already wrapped by FSDP1 with use_orig_params=False, which cannot hold frozen and trainable "
            "parameters in one unit; wrap it with use_orig_params=True (fsdp_config={'use_orig_params': True}, "
            "or vr_plugin.fsdp_config(model, version=1))"
        )
    plugin = active_plugin()
    if plugin is None:
        return None
    version = int(getattr(plugin, "fsdp_version", 1) or 1)
    if version == 1 and not getattr(plugin, "use_orig_params", True):
        logger.warning(
            "FSDP1 with use_orig_params=False cannot hold the visual region's frozen and trainable parameters in "
            "one unit; setting use_orig_params=True"
        )
        plugin.use_orig_params = True
        config = getattr(args, "fsdp_config", None)
        if isinstance(config, dict):
            config["use_orig_params"] = True
    wrap = getattr(plugin, "transformer_cls_names_to_wrap", None)
    wrapped = ",".join(wrap) if isinstance(wrap, (list, tuple)) else wrap
    if not wrapped and model is not None:
        logger.info(
            "FSDP wraps by %s; one unit per decoder layer keeps region and frozen layers apart: "
            "fsdp_config=vr_plugin.fsdp_config(model) (transformer_layer_cls_to_wrap=%s)",
            getattr(plugin, "auto_wrap_policy", None) or "no auto-wrap policy",
            _decoder_layer_classes(unwrap_model(model), None),
        )
    return f"FSDP{version}, use_orig_params={getattr(plugin, 'use_orig_params', True)}, wrap {wrapped or 'default'}"
