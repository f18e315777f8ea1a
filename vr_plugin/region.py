"""The region, resolved once per model: :func:`resolve_region` gives a :class:`Region`.

A run names its region once (``uniform_0.25``, ``1,5,9``); the spec is parsed and the decoder layers are found
here, and the resulting value travels to freezing (:func:`vr_plugin.apply_visual_region`), LoRA
(:func:`vr_plugin.region_lora_config`), hybrid loading (:func:`vr_plugin.load_for_region`), the callback and
pruning, which take it wherever they take a spec and then neither re-parse the spec nor search for the layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

from torch import nn

from .locate import find_decoder_layers, visual_entry_layers
from .spec import select_layers

__all__ = ["Region", "as_region", "check_region_spec", "resolve_region", "spec_text"]


@dataclass(frozen=True)
class Region:
    """A region of one model: the spec as given, its layers, the depth, where the layers are, where images enter."""

    spec: str
    layers: tuple  # sorted decoder-layer indices (current numbering)
    num_layers: int
    layers_path: str  # qualified name of the decoder ModuleList, relative to the model it was resolved on
    visual_entry: dict = field(default_factory=dict)  # {layer: why} (vr_plugin.locate.visual_entry_layers)


def spec_text(spec: Union[str, Iterable[int], Region]) -> str:
    """The spec as it is recorded: the string stripped, or the indices comma-separated."""
    if isinstance(spec, Region):
        return spec.spec
    return spec.strip() if isinstance(spec, str) else ",".join(str(int(i)) for i in spec)


def resolve_region(model: nn.Module, spec: Union[str, Iterable[int]], layers_path: Optional[str] = None) -> Region:
    """Parse ``spec`` against ``model``'s decoder depth and find its layers, once."""
    location = find_decoder_layers(model, layers_path)
    depth = len(location.layers)
    indices = tuple(select_layers(spec, depth))
    return Region(spec_text(spec), indices, depth, location.name, visual_entry_layers(model))


def as_region(model: nn.Module, spec: Union[str, Iterable[int], Region], layers_path: Optional[str] = None) -> Region:
    """``spec`` resolved on ``model`` -- or, if it already is a :class:`Region`, checked against ``model``'s depth."""
    if not isinstance(spec, Region):
        return resolve_region(model, spec, layers_path)
    depth = len(find_decoder_layers(model, layers_path or spec.layers_path).layers)
    if depth != spec.num_layers:
        raise ValueError(
            f"region {spec.spec!r} was resolved for {spec.num_layers} decoder layers; this model has {depth}"
        )
    return spec


def location_of(model: nn.Module, region: Region, layers_path: Optional[str] = None) -> Any:
    """The :class:`~vr_plugin.locate.DecoderLayers` of ``region`` in ``model`` (wrappers looked through)."""
    return find_decoder_layers(model, layers_path or region.layers_path)


def check_region_spec(model: Any, spec: Union[str, Iterable[int]], option: str = "--visual_region") -> list:
    """The layers ``spec`` selects on ``model`` (a model directory, hub id or config), read from its config only.

    For host integrations and launchers: call it before any weights load; a bad spec raises ``ValueError`` naming
    ``option``, the value and the accepted forms.
    """
    from transformers import AutoConfig, PretrainedConfig

    from .locate import num_layers_from_config

    config = model if isinstance(model, PretrainedConfig) else AutoConfig.from_pretrained(model)
    try:
        return select_layers(spec, num_layers_from_config(config))
    except ValueError as error:
        raise ValueError(f"{option}: {error}") from None
