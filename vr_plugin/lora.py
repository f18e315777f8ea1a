"""LoRA / QLoRA restricted to the visual region, and parameter groups for region / projector learning rates.

Targets are the fully qualified names of the linear modules inside the region layers, joined into one
anchored regular expression (peft full-matches a string ``target_modules`` against every module name), so
LoRA can never land on a vision encoder layer that happens to share a suffix such as ``q_proj``.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .backends.bitsandbytes import is_quantized_linear, is_quantized_model
from .locate import PROJECTOR_KEYS, find_decoder_layers, map_parameters, unwrap_model
from .options import LORA_DEFAULTS
from .region import as_region, spec_text
from .spec import describe_indices

# LoRA's defaults, defined once: region_lora_config, RegionTrainingConfig and the vr-plugin train flags use them.

__all__ = [
    "LORA_DEFAULTS",
    "RegionTargets",
    "region_targets",
    "region_lora_config",
    "apply_region_lora",
    "prepare_qlora",
    "region_param_groups",
]

logger = logging.getLogger(__name__)

_ADAPTER_LAYER_MARKERS = ("base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def _is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` (incl. bitsandbytes' quantized linear maps, which subclass it) or HF's GPT-2 ``Conv1D``.

    A Linear subclass with a forward of its own that returns something else (Llama 4's MoE router returns scores
    and indices) is no LoRA target: peft's wrapper expects one tensor back.
    """
    if is_quantized_linear(module) or type(module).__name__ == "Conv1D":
        return True
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


class RegionTargets:
    """The linear modules LoRA will wrap: per region layer, their names relative to the model."""

    def __init__(self, layers_name: str, per_layer: OrderedDict[int, list], shapes: dict):
        self.layers_name = layers_name
        self.per_layer = per_layer
        self.shapes = shapes  # full name -> (in_features, out_features)

    @property
    def names(self) -> list:
        """Fully qualified module names, layer by layer."""
        return [f"{self.layers_name}.{i}.{sub}" for i, subs in self.per_layer.items() for sub in subs]

    def regex(self) -> str:
        """One anchored regex matching exactly :attr:`names` (compact when every layer has the same modules)."""
        layer_sets = {tuple(subs) for subs in self.per_layer.values()}
        if len(layer_sets) == 1:
            subs = next(iter(layer_sets))
            indices = "|".join(str(i) for i in self.per_layer)
            modules = "|".join(re.escape(s) for s in subs)
            return rf"{re.escape(self.layers_name)}\.(?:{indices})\.(?:{modules})"
        return "|".join(re.escape(name) for name in self.names)

    def lora_parameters(self, r: int) -> int:
        """Parameters LoRA of rank ``r`` adds: r * (in + out) per wrapped module."""
        return sum(r * (fan_in + fan_out) for fan_in, fan_out in self.shapes.values())


def region_targets(
    model: nn.Module,
    spec: Union[str, Iterable[int]],
    target: Union[str, Sequence[str]] = "all-linear",
    layers_path: Optional[str] = None,
) -> RegionTargets:
    """The linear modules inside the region layers that LoRA should wrap (names relative to the unwrapped model).

    ``target`` is ``"all-linear"`` or module kinds (last name component), e.g. ``["q_proj", "v_proj"]``.
    Raises ``ValueError`` when the region is empty or a region layer would receive no adapter.
    """
    core = unwrap_model(model)
    resolved = as_region(core, spec, layers_path)
    location = find_decoder_layers(core, layers_path or resolved.layers_path)
    indices = list(resolved.layers)
    if not indices:
        raise ValueError(f"visual region {resolved.spec!r} selects no layer, so LoRA would have nothing to adapt")
    kinds = None if target == "all-linear" else {target} if isinstance(target, str) else set(target)
    per_layer: OrderedDict = OrderedDict()
    shapes = {}
    available = set()
    for index in indices:
        chosen = []
        for sub, module in location.layers[index].named_modules():
            if not sub or not _is_linear(module) or any(m in sub.split(".") for m in _ADAPTER_LAYER_MARKERS):
                continue
            kind = sub.rsplit(".", 1)[-1]
            available.add(kind)
            if kinds is None or kind in kinds:
                chosen.append(sub)
                weight = module.weight
                fan_in = getattr(module, "in_features", None) or weight.shape[0]
                fan_out = getattr(module, "out_features", None) or weight.shape[1]
                shapes[f"{location.name}.{index}.{sub}"] = (int(fan_in), int(fan_out))
        per_layer[index] = chosen
    empty = [i for i, subs in per_layer.items() if not subs]
    if empty:
        raise ValueError(
            f"LoRA target {target!r} matches no linear module in region layers {empty} of {location.name}; "
            f"linear modules there: {sorted(available) or 'none'}"
        )
    if kinds is not None and kinds - available:
        raise ValueError(
            f"LoRA target kinds {sorted(kinds - available)} exist in no region layer; available: {sorted(available)}"
        )
    return RegionTargets(location.name, per_layer, shapes)


def projector_modules(model: nn.Module) -> list:
    """Names (relative to the unwrapped model) of the projector's top modules, e.g. ``model.multi_modal_projector``."""
    core = unwrap_model(model)
    names = []
    for info in map_parameters(core):
        if info.group != "projector":
            continue
        parts = info.name.split(".")
        cut = next(i for i, part in enumerate(parts) if part in PROJECTOR_KEYS)
        name = ".".join(parts[: cut + 1])
        if name != info.name and isinstance(core.get_submodule(name), nn.ModuleList):  # Qwen3-VL's DeepStack
            name = ".".join(parts[: cut + 2])  # mergers: one module per entry
        if name != info.name and name not in names:  # a module, not a bare parameter like image_newline
            names.append(name)
    return names


def region_lora_config(
    model: nn.Module,
    spec: Union[str, Iterable[int]],
    r: int = LORA_DEFAULTS["r"],
    lora_alpha: int = LORA_DEFAULTS["lora_alpha"],
    lora_dropout: float = LORA_DEFAULTS["lora_dropout"],
    target: Union[str, Sequence[str]] = LORA_DEFAULTS["target"],
    train_projector: bool = True,
    layers_path: Optional[str] = None,
    **peft_kwargs: Any,
):
    """A ``peft.LoraConfig`` whose adapters sit exactly on the region layers' linear modules.

    ``target_modules`` is an anchored regex over fully qualified names (never vision-tower, projector or
    lm_head modules). With ``train_projector`` the projector modules go to ``modules_to_save`` so they train
    in full precision and are saved in peft's own format. Works with peft 0.4 to current.
    """
    from peft import LoraConfig

    targets = region_targets(model, spec, target, layers_path)
    modules_to_save = list(peft_kwargs.pop("modules_to_save", None) or [])
    if train_projector:
        core = unwrap_model(model)
        for name in projector_modules(core):
            quantized = [n for n, m in core.get_submodule(name).named_modules() if is_quantized_linear(m)]
            if quantized:
                raise ValueError(
                    f"the projector {name} is quantized ({name}.{quantized[0]}); it must train in full precision: "
                    "load with vr_plugin.load_quantized, which keeps projector, vision tower and lm_head unquantized"
                )
            if name not in modules_to_save:
                modules_to_save.append(name)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=targets.regex(),
        modules_to_save=modules_to_save or None,
        **peft_kwargs,
    )
    per_layer = ", ".join(f"{i}:{len(subs)}" for i, subs in targets.per_layer.items())
    logger.info(
        "region LoRA %r: %d adapters on layers [%s] of %s (adapters per layer %s), %s LoRA parameters at r=%d; "
        "full-precision modules: %s",
        spec_text(spec),
        len(targets.names),
        describe_indices(targets.per_layer),
        targets.layers_name,
        per_layer,
        f"{targets.lora_parameters(r):,}",
        r,
        modules_to_save or "none",
    )
    return config


def apply_region_lora(
    model: nn.Module,
    spec: Union[str, Iterable[int]],
    layers_path: Optional[str] = None,
    **lora_kwargs: Any,
):
    """``get_peft_model`` with :func:`region_lora_config`; records the region and returns ``(peft_model, plan)``."""
    from peft import get_peft_model

    from .freeze import apply_visual_region

    config = region_lora_config(model, spec, layers_path=layers_path, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    # peft already froze everything but the adapters and modules_to_save; this records the region in the
    # config, freezes nothing more (projector left as peft set it) and reports the trainable counts.
    plan = apply_visual_region(peft_model, spec, layers_path=layers_path, tune_projector=None)
    return peft_model, plan


def prepare_qlora(
    model: nn.Module,
    spec: Union[str, Iterable[int]],
    gradient_checkpointing: bool = True,
    layers_path: Optional[str] = None,
    **lora_kwargs: Any,
):
    """QLoRA on the region: ``prepare_model_for_kbit_training`` on a 4/8-bit model, then region LoRA.

    The projector trains in full precision (fp32) through ``modules_to_save``. Returns ``(peft_model, plan)``.
    """
    from peft import prepare_model_for_kbit_training

    quantized = is_quantized_model(model)
    if not quantized:
        raise ValueError(
            "prepare_qlora expects a model loaded with bitsandbytes (vr_plugin.load_quantized(path, 'nf4')); "
            "for a full-precision model use apply_region_lora"
        )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return apply_region_lora(model, spec, layers_path=layers_path, **lora_kwargs)


def _no_decay(name: str, param: torch.Tensor) -> bool:
    lowered = name.lower()
    return param.ndim < 2 or "norm" in lowered or lowered.endswith(".bias")


def region_param_groups(
    model: nn.Module,
    lr: float,
    projector_lr: Optional[float] = None,
    vision_lr: Optional[float] = None,
    weight_decay: float = 0.0,
) -> list:
    """Optimizer parameter groups of the trainable parameters: region (and everything else) at ``lr``,
    projector at ``projector_lr``, vision tower at ``vision_lr`` (each defaulting to ``lr``), with biases and
    norm weights exempt from weight decay. Pass to any torch optimizer, or to ``Trainer(optimizers=...)``.

    >>> torch.optim.AdamW(region_param_groups(model, lr=2e-4, projector_lr=2e-5))  # doctest: +SKIP
    """
    lrs = {"projector": projector_lr, "vision": vision_lr}
    buckets: OrderedDict = OrderedDict()
    for info in map_parameters(model):
        if not info.param.requires_grad:
            continue
        group_lr = lrs.get(info.group) if lrs.get(info.group) is not None else lr
        decay = 0.0 if _no_decay(info.name, info.param) else weight_decay
        role = info.group if info.group in lrs and lrs[info.group] is not None else "main"
        key = (role, group_lr, decay)
        bucket = buckets.setdefault(key, {"params": [], "lr": group_lr, "weight_decay": decay, "name": f"{role}"})
        bucket["params"].append(info.param)
    if not buckets:
        raise ValueError("region_param_groups: the model has no trainable parameter (apply the region first)")
    return list(buckets.values())
