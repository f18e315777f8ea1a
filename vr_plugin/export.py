"""Saving and loading what region training produced.

* :func:`save_region_state` / :func:`load_region_state`: the trained region layers and projector in full
  precision (a small safetensors file), e.g. from a hybrid 4-bit run, to put onto the full-precision base;
* :func:`save_region_adapter`: a peft adapter in peft's own format plus ``visual_region.json``;
* :func:`merge_region_lora`: fold region LoRA back into the base for inference (region record kept).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any, Optional

import torch
from torch import nn

from .backends.bitsandbytes import is_quantized_param
from .locate import find_decoder_layers, map_parameters, unwrap_model
from .record import REGION_KEY, RegionRecord, read_region, save_region_file, write_region

__all__ = ["save_region_state", "load_region_state", "save_region_adapter", "merge_region_lora"]

STATE_FILE = "region_state.safetensors"


def _region_record(model: nn.Module) -> RegionRecord:
    record = read_region(unwrap_model(model))
    if record is None:
        raise ValueError("the model carries no visual region record; apply the region first (apply_visual_region)")
    return record


def save_region_state(model: nn.Module, out_dir: str, include_projector: bool = True) -> str:
    """Write the region layers' (and the projector's) weights, in their training precision, to ``out_dir``.

    Names are relative to the unwrapped model, so the file loads onto any model of the same architecture
    (e.g. the full-precision base of a hybrid run). The region record goes into the file's metadata.
    """
    from safetensors.torch import save_file

    core = unwrap_model(model)
    record = _region_record(core)
    location = find_decoder_layers(core)
    region = set(record.layers)
    tensors = {}
    for info in map_parameters(core, location):
        if (info.group == "layer" and info.layer in region) or (include_projector and info.group == "projector"):
            if is_quantized_param(info.param):
                raise ValueError(f"{info.name} is quantized; the region must be kept in full precision to export it")
            tensors[info.name] = info.param.detach().to("cpu").contiguous()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, STATE_FILE)
    meta = {REGION_KEY: json.dumps(asdict(record))}
    save_file(tensors, path, metadata=meta)
    save_region_file(out_dir, record)
    return path


def load_region_state(model: nn.Module, path: str, dtype: Optional[torch.dtype] = None) -> RegionRecord:
    """Copy a :func:`save_region_state` file into ``model`` (strict: every tensor must exist with its shape)."""
    from safetensors import safe_open

    core = unwrap_model(model)
    file = os.path.join(path, STATE_FILE) if os.path.isdir(path) else path
    params = dict(core.named_parameters())
    with safe_open(file, framework="pt") as handle:
        meta = handle.metadata() or {}
        missing = [k for k in handle.keys() if k not in params]
        if missing:
            raise KeyError(f"{file} has tensors the model lacks: {missing[:5]}")
        with torch.no_grad():
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                target = params[key]
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(
                        f"{key}: shape {tuple(tensor.shape)} in {file}, {tuple(target.shape)} in the model"
                    )
                target.copy_(tensor.to(dtype or target.dtype))
    record = RegionRecord.from_dict(json.loads(meta[REGION_KEY]))
    write_region(core.config, record.spec, record.layers, record.num_layers)
    return record


def save_region_adapter(peft_model: Any, out_dir: str, **kwargs: Any) -> None:
    """``peft_model.save_pretrained`` (peft's format) plus ``visual_region.json`` beside it."""
    peft_model.save_pretrained(out_dir, **kwargs)
    save_region_file(out_dir, _region_record(peft_model))


def merge_region_lora(peft_model: Any) -> nn.Module:
    """Merge the region LoRA (and modules_to_save copies) into the base model and return it."""
    record = read_region(unwrap_model(peft_model))
    merged = peft_model.merge_and_unload()
    if record is not None and read_region(merged) is None:
        write_region(merged.config, record.spec, record.layers, record.num_layers)
    return merged
