"""The layer map of a model directory, from its config alone: :func:`layer_map` (``vr-plugin inspect``).

The model is built on the meta device (no weights are read or allocated), so a 13B checkpoint maps as fast as a
tiny one; :func:`vr_plugin.find_decoder_layers` and :func:`vr_plugin.apply_visual_region` (``record=False``) then
work on it exactly as on the real model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .freeze import RegionPlan
from .record import PruningRecord, RegionRecord, read_pruning, read_region
from .spec import DEFAULT_SPEC, describe_indices

__all__ = ["LayerMap", "layer_map", "meta_model", "depth_strip"]


@dataclass
class LayerMap:
    """Where a model's LLM layers are, which form the region, and what would train."""

    path: str
    model_class: str
    num_layers: int
    layers_path: str
    spec_source: str
    plan: RegionPlan
    recorded: Optional[RegionRecord]
    pruning: Optional[PruningRecord]
    visual_entry: dict = field(default_factory=dict)

    def render(self) -> str:
        """A few lines of text: model, depth, region, depth strip, parameters per group, trainable share."""
        plan = self.plan
        lines = [
            f"model        {self.path} ({self.model_class})",
            f"LLM depth    {self.num_layers} decoder layers at {self.layers_path}",
            f"region       {plan.spec!r} ({self.spec_source}): "
            f"{len(plan.layers)} layers [{describe_indices(plan.layers)}]",
            f"depth        {depth_strip(self.num_layers, plan.layers, entry=self.visual_entry)}   "
            f"(# region, . frozen{', v visual entry, V both' if self.visual_entry else ''}; layer 0 left)",
        ]
        for index, why in self.visual_entry.items():
            lines.append(f"visual entry layer {index}: {why} (kept by prune)")
        if self.recorded is not None and self.spec_source != "recorded in the config":
            lines.append(f"recorded     {self.recorded.spec!r}: layers [{describe_indices(self.recorded.layers)}]")
        if self.pruning is not None:
            lines.append(
                f"pruned       layers [{describe_indices(self.pruning.removed)}] of the original "
                f"{self.pruning.original_num_layers} removed"
            )
        lines += ["", plan.table(), "", f"trainable    {100 * plan.trainable_share:.2f}% of all parameters"]
        return "\n".join(lines)


def depth_strip(num_layers: int, region: list, pruned: Optional[list] = None, entry: Any = ()) -> str:
    """One character per layer: ``#`` region, ``.`` outside, ``x`` pruned; ``v`` a visual-entry layer outside the
    region, ``V`` one inside."""
    region, pruned, entry = set(region), set(pruned or []), set(entry)

    def mark(i: int) -> str:
        if i in pruned:
            return "x"
        if i in entry:
            return "V" if i in region else "v"
        return "#" if i in region else "."

    return "".join(mark(i) for i in range(num_layers))


def _config_path(path: str) -> str:
    """The directory whose config describes the model: a peft adapter's base, else ``path`` itself.

    Raises ``FileNotFoundError`` when an adapter's base model is a local path that does not exist.
    """
    from .model_io import adapter_base

    return adapter_base(path) or path


def meta_model(config: Any) -> Any:
    """The model of ``config`` (with its head) on the meta device: structure and shapes, no memory."""
    import torch

    from .model_io import model_class_for

    with torch.device("meta"):
        return model_class_for(config).from_config(config)


def layer_map(
    path: str, spec: Optional[str] = None, *, tune_vision_tower: bool = False, layers_path: Optional[str] = None
) -> LayerMap:
    """The :class:`LayerMap` of a model directory (or hub id) from its config, for ``spec``.

    Without ``spec`` the region recorded in the config is shown (else ``uniform_0.25``). Trainable counts are those
    of full-parameter region tuning as ``vr-plugin train`` runs it (vision tower frozen unless ``tune_vision_tower``).
    """
    import logging

    from transformers import AutoConfig

    from .freeze import apply_visual_region
    from .locate import find_decoder_layers, visual_entry_layers

    config = AutoConfig.from_pretrained(_config_path(path))
    recorded = read_region(path) or read_region(config)
    model = meta_model(config)
    location = find_decoder_layers(model, layers_path)
    if spec is not None:
        source = "--visual_region"
    elif recorded is not None:
        spec, source = recorded.spec, "recorded in the config"
    else:
        spec, source = DEFAULT_SPEC, "default"
    if recorded is not None and spec == recorded.spec and recorded.num_layers == len(location.layers):
        spec_or_layers: Any = recorded.layers  # the recorded indices (e.g. renumbered after pruning)
    else:
        spec_or_layers = spec
    from ._logging import log_levels

    with log_levels(logging.WARNING, logger="vr_plugin.freeze"):  # the plan is rendered here, not logged
        plan = apply_visual_region(
            model, spec_or_layers, tune_vision_tower=tune_vision_tower, layers_path=layers_path, record=False
        )
    plan.spec = spec
    return LayerMap(
        path=path,
        model_class=type(model).__name__,
        num_layers=len(location.layers),
        layers_path=location.name,
        spec_source=source,
        plan=plan,
        recorded=recorded,
        pruning=read_pruning(path) or read_pruning(config),
        visual_entry=visual_entry_layers(config),
    )
