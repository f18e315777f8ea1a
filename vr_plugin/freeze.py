"""Freeze everything of the LLM outside the visual region: :func:`apply_visual_region`."""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from .backends.bitsandbytes import is_quantized_param
from .backends.processes import is_main_process
from .locate import DecoderLayers, find_decoder_layers, map_parameters, numel, unwrap_model
from .record import write_region
from .region import as_region
from .spec import describe_indices

__all__ = ["RegionPlan", "GroupCount", "apply_visual_region", "region_layer_names"]

logger = logging.getLogger(__name__)

# What each report group is called, in display order.
REPORT_GROUPS = ("region layers", "other layers", "projector", "vision tower", "embeddings", "norm", "lm_head", "other")
_REPORT_NAME = {
    "projector": "projector",
    "vision": "vision tower",
    "embeddings": "embeddings",
    "norm": "norm",
    "lm_head": "lm_head",
    "other": "other",
}


@dataclass
class GroupCount:
    """Trainable and total parameter counts of one group."""

    trainable: int = 0
    total: int = 0


@dataclass
class RegionPlan:
    """What :func:`apply_visual_region` did: the region, and who trains."""

    spec: str
    layers: list
    num_layers: int
    layers_path: str
    groups: dict
    trainable_names: list
    trainable_params: list = field(repr=False, default_factory=list)

    @property
    def trainable(self) -> int:
        return sum(g.trainable for g in self.groups.values())

    @property
    def total(self) -> int:
        return sum(g.total for g in self.groups.values())

    @property
    def trainable_share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def summary(self) -> str:
        """One line: spec, indices, trainable share."""
        return (
            f"visual region {self.spec!r}: {len(self.layers)}/{self.num_layers} layers "
            f"[{describe_indices(self.layers)}] of {self.layers_path}; trainable "
            f"{self.trainable:,}/{self.total:,} parameters ({100 * self.trainable_share:.2f}%)"
        )

    def table(self) -> str:
        """A small text table of trainable/total parameters per group."""
        rows = [f"{'group':<14}{'trainable':>16}{'total':>16}"]
        for name in REPORT_GROUPS:
            count = self.groups.get(name)
            if count and count.total:
                rows.append(f"{name:<14}{count.trainable:>16,}{count.total:>16,}")
        rows.append(f"{'all':<14}{self.trainable:>16,}{self.total:>16,}")
        return "\n".join(rows)


def _adapter_names(model: nn.Module) -> set:
    """Name components of adapter parameters when the model carries PEFT adapters."""
    names = set()
    for module in model.modules():
        if any(cls.__name__ == "BaseTunerLayer" for cls in type(module).__mro__):
            names.update(getattr(module, "adapter_layer_names", ()))
    return names


def _trainable_dtype(param: torch.Tensor) -> bool:
    return param.dtype.is_floating_point and not is_quantized_param(param)


def _reentrant_checkpointing(location: DecoderLayers, owner: Optional[nn.Module]) -> bool:
    """Whether the decoder will run reentrant activation checkpointing (needs grad-requiring inputs)."""
    for module in [owner, *location.layers]:
        if module is None or not getattr(module, "gradient_checkpointing", False):
            continue
        func = getattr(module, "_gradient_checkpointing_func", None)
        if isinstance(func, functools.partial):
            return bool(func.keywords.get("use_reentrant", True))
        return True
    return False


def _install_input_grad_hook(model: nn.Module, location: DecoderLayers) -> None:
    """Make the embedding output require grad when reentrant checkpointing runs.

    Reentrant ``torch.utils.checkpoint`` only back-propagates into a layer whose
    *input* requires grad; with frozen embeddings nothing does, and the region
    layers would get no gradient.  Non-reentrant checkpointing needs nothing, so
    the hook stays idle there (and autograd stops below the lowest region layer).
    """
    core = unwrap_model(model)
    getter = getattr(core, "get_input_embeddings", None)
    try:
        embed = getter() if getter else None
    except NotImplementedError:
        embed = None
    if embed is None or getattr(embed, "_vr_input_grad_hook", None) is not None:
        return
    owner_name = location.name.rpartition(".")[0]
    owner = model.get_submodule(owner_name) if owner_name else model

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if (
            module.training
            and torch.is_grad_enabled()
            and isinstance(output, torch.Tensor)
            and not output.requires_grad
            and output.is_floating_point()
            and _reentrant_checkpointing(location, owner)
        ):
            output.requires_grad_(True)

    embed._vr_input_grad_hook = embed.register_forward_hook(hook)


def is_rank_zero() -> bool:
    """The main process of the run (:func:`vr_plugin.backends.processes.is_main_process`)."""
    return is_main_process()


def region_layer_names(model: nn.Module, layers: Iterable[int], location: Optional[DecoderLayers] = None) -> list:
    """Qualified module names (relative to ``model``) of the given decoder layers."""
    location = location or find_decoder_layers(model)
    return [f"{location.name}.{i}" for i in layers]


def _check_tied(core: nn.Module, params: list, tune_embeddings: bool, tune_lm_head: bool) -> None:
    """Refuse contradicting choices for an lm_head tied to the input embeddings."""
    embed_ids = {id(p.param) for p in params if p.group == "embeddings"}
    head = core.get_output_embeddings() if hasattr(core, "get_output_embeddings") else None
    tied = head is not None and getattr(head, "weight", None) is not None and id(head.weight) in embed_ids
    if tied and tune_embeddings != tune_lm_head:
        raise ValueError(
            f"lm_head is tied to the input embeddings in {type(core).__name__}; tune_embeddings={tune_embeddings} and "
            f"tune_lm_head={tune_lm_head} contradict each other. Set both to the same value."
        )


def _decide(info: Any, region: set, adapter_parts: set, choice: dict) -> tuple:
    """``(report group, trainable?)`` of one parameter; ``None`` leaves its ``requires_grad`` as it is."""
    if info.group == "layer":
        inside = info.layer in region
        report = "region layers" if inside else "other layers"
        want = inside and any(part in adapter_parts for part in info.name.split(".")) if adapter_parts else inside
    else:
        report, want = _REPORT_NAME[info.group], choice[info.group]
    if "original_module" in info.name.split("."):
        want = False  # peft's frozen original beside a modules_to_save copy
    return report, want


def _check_plan(plan: RegionPlan, model_name: str, params: list, adapter_parts: set, tune_projector: Any) -> None:
    """Nothing fails silently: a region that trains nothing, freezes nothing, or whose adapters sit elsewhere."""
    if not plan.trainable_params:
        raise ValueError(
            f"visual region {plan.spec!r} on {model_name} leaves nothing to train "
            f"(region layers [{describe_indices(plan.layers)}], tune_projector={tune_projector}). "
            "Select some layers or keep the projector trainable."
        )
    if plan.trainable == plan.total:
        warnings.warn(f"visual region {plan.spec!r} froze nothing: every parameter is trainable", stacklevel=3)
    if plan.layers and adapter_parts and plan.groups["region layers"].trainable == 0:
        raise ValueError(
            f"visual region {plan.spec!r}: the model carries PEFT adapters but none inside region layers "
            f"[{describe_indices(plan.layers)}]; build the LoRA config with vr_plugin.region_lora_config."
        )
    vision_adapters = [p.name for p in params if p.group == "vision" and adapter_parts & set(p.name.split("."))]
    if vision_adapters:
        logger.warning(
            "PEFT put %d adapters in the vision tower (e.g. %s): suffix target_modules also match the vision "
            "encoder. vr_plugin.region_lora_config targets only the region layers.",
            len(vision_adapters),
            vision_adapters[0],
        )


def _set_requires_grad(params: list, region: set, adapter_parts: set, choice: dict) -> tuple:
    """Decide and set ``requires_grad`` for every parameter; return (group counts, trainable names, parameters)."""
    groups = {name: GroupCount() for name in REPORT_GROUPS}
    trainable_names, trainable_params = [], []
    for info in params:
        p = info.param
        report, want = _decide(info, region, adapter_parts, choice)
        if want is not None:
            p.requires_grad_(bool(want) and _trainable_dtype(p))
        count = groups[report]
        count.total += numel(p)
        if p.requires_grad:
            count.trainable += numel(p)
            trainable_names.append(info.name)
            trainable_params.append(p)
    return groups, trainable_names, trainable_params


def apply_visual_region(
    model: nn.Module,
    spec: Union[str, Iterable[int]],
    *,
    tune_embeddings: bool = False,
    tune_norm: bool = False,
    tune_lm_head: bool = False,
    tune_projector: Optional[bool] = True,
    tune_vision_tower: Optional[bool] = None,
    layers_path: Optional[str] = None,
    record: bool = True,
) -> RegionPlan:
    """Freeze every LLM parameter outside the region selected by ``spec``.

    * region decoder layers: trainable (with PEFT adapters present: only the
      adapters inside the region; base weights stay frozen);
    * other decoder layers and other LLM parameters: frozen;
    * embeddings / final norm / lm_head: frozen unless ``tune_*`` says otherwise;
    * multimodal projector: trainable by default (``None`` leaves it as is);
    * vision tower: left as the caller set it (``True``/``False`` force it).

    The spec and the selected indices are recorded in ``model.config`` (saved
    with every checkpoint).  Returns a :class:`RegionPlan` with per-group
    counts (DeepSpeed ZeRO-3 aware).  Call it before the optimizer exists.
    """
    resolved = as_region(model, spec, layers_path)  # a Region passes as it is: no re-parsing, no new search
    location = find_decoder_layers(model, layers_path or resolved.layers_path)
    num_layers, indices = resolved.num_layers, list(resolved.layers)
    region = set(indices)
    adapter_parts = _adapter_names(model)
    params = map_parameters(model, location)

    choice = {
        "embeddings": tune_embeddings,
        "norm": tune_norm,
        "lm_head": tune_lm_head,
        "projector": tune_projector,
        "vision": tune_vision_tower,
        "other": False,
    }
    core = unwrap_model(model)
    _check_tied(core, params, tune_embeddings, tune_lm_head)

    groups, trainable_names, trainable_params = _set_requires_grad(params, region, adapter_parts, choice)
    plan = RegionPlan(
        spec=resolved.spec,
        layers=indices,
        num_layers=num_layers,
        layers_path=location.name,
        groups=groups,
        trainable_names=trainable_names,
        trainable_params=trainable_params,
    )
    _check_plan(plan, type(core).__name__, params, adapter_parts, tune_projector)
    if region and not tune_embeddings:
        _install_input_grad_hook(model, location)
    if record:
        write_region(core.config, plan.spec, indices, num_layers)
    if is_rank_zero():
        logger.info("%s\n%s", plan.summary(), plan.table())
    return plan
