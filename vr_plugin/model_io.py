"""Model I/O, written once: the Auto class of a config, the dtype keyword, an adapter's base, plain loading, saving.

:func:`vr_plugin.quant.load_quantized` / :func:`~vr_plugin.quant.load_for_region` (bitsandbytes) and
:func:`vr_plugin.training.load_model` (directories ``vr-plugin`` writes, adapters merged) build on these;
result files go through :func:`vr_plugin.io.write_json`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

import torch
import transformers
from packaging import version

__all__ = ["ADAPTER_CONFIG", "adapter_base", "dtype_kwargs", "load_plain", "model_class_for", "save_model"]

ADAPTER_CONFIG = "adapter_config.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name
_NEW_DTYPE_KWARG = version.parse(transformers.__version__) >= version.parse("4.56")


def model_class_for(config: Any) -> Any:
    """The Auto class that builds ``config``'s model with a head: image-text-to-text, vision2seq or causal LM."""
    from .backends.transformers import auto_class_for

    auto = auto_class_for(config)
    if auto is not None:
        return auto
    raise ValueError(f"no Auto model class knows config type {type(config).__name__}; pass model_cls=")


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s dtype keyword: ``dtype=`` on transformers >= 4.56, ``torch_dtype=`` before."""
    return {"dtype" if _NEW_DTYPE_KWARG else "torch_dtype": dtype}


def _looks_local(name: str) -> bool:
    """Whether a model name is a local path rather than a hub id ``org/name``.

    Absolute, ``./``/``../``/``~`` paths and anything not shaped ``org/name`` are local; so is an ``org/name`` whose
    ``org`` is a directory here (``runs/base`` next to ``runs/``).
    """
    if os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or not _HUB_ID.match(name):
        return True
    return os.path.isdir(name.split("/")[0])


def adapter_base(path: str) -> Optional[str]:
    """The base model a peft adapter directory names (``None`` when ``path`` is no adapter-only directory).

    Raises ``FileNotFoundError`` when that base is a local path that does not exist, ``ValueError`` when the
    adapter config cannot be read.
    """
    adapter = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(adapter) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    with open(adapter, encoding="utf-8") as handle:
        try:
            base = json.load(handle).get("base_model_name_or_path")
        except (json.JSONDecodeError, AttributeError) as error:
            raise ValueError(f"{adapter} is not a peft adapter config ({error})") from None
    if not base:
        raise ValueError(f"{adapter} names no base_model_name_or_path to put the adapter on")
    if not os.path.exists(os.path.expanduser(base)) and _looks_local(base):
        raise FileNotFoundError(
            f"adapter {path} names base model {base!r} (base_model_name_or_path), which does not exist here; "
            f"put the base model there or set base_model_name_or_path in {adapter} to where it is"
        )
    return os.path.expanduser(base)


def load_plain(path: str, dtype: Optional[torch.dtype] = None, **kwargs: Any) -> Any:
    """``from_pretrained`` of ``path`` through the Auto class its config names (full precision, no adapters)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False))
    extra = dtype_kwargs(dtype) if dtype is not None else {}
    return model_class_for(config).from_pretrained(path, **extra, **kwargs)


def save_model(model: Any, processor: Any, out_dir: str) -> str:
    """``save_pretrained`` of the model (its config carries the region / pruning record) and of its processor."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    if processor is not None:
        processor.save_pretrained(out_dir)
    return out_dir
