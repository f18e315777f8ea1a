"""Region arguments for command lines: a dataclass for ``transformers.HfArgumentParser`` and ``add_region_args``.

Both define the same flags::

    --visual_region SPEC        region spec (see vr_plugin.spec), e.g. uniform_0.25
    --tune_layers 1,5,9,...     explicit layer indices (instead of --visual_region)
    --tune_embeddings / --tune_lm_head / --tune_norm BOOL   also train these (default False)
    --tune_projector BOOL       train the multimodal projector (default True)
    --layers_path PATH          where the decoder layers are, if discovery needs help

Host training scripts whose ``train()`` unpacks a fixed number of dataclasses (LLaVA, Bunny) get these fields by
*extending* one of their dataclasses (:func:`extend_arguments`), never by adding a new one.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from .options import RegionSwitches, add_option_flags
from .spec import ACCEPTED_FORMS

__all__ = ["RegionArguments", "add_region_args", "extend_arguments", "region_arguments_from"]

_LAYER_LIST = re.compile(r"^\s*-?\d+\s*(,\s*-?\d+\s*)*$")


@dataclass
class RegionArguments(RegionSwitches):
    """The visual region flags (usable alone with ``HfArgumentParser`` or mixed into another arguments dataclass).

    Without ``visual_region`` / ``tune_layers`` the host trains as it always did; the switches (``tune_projector``,
    ...) and their defaults are :class:`vr_plugin.options.RegionSwitches`, shared with ``vr-plugin train``.
    """

    visual_region: Optional[str] = field(
        default=None, metadata={"help": f"Train only this visual region of the LLM. Accepted forms: {ACCEPTED_FORMS}."}
    )
    tune_layers: Optional[str] = field(
        default=None, metadata={"help": "Train only these decoder layers, e.g. 1,5,9,13 (instead of --visual_region)."}
    )

    def __post_init__(self) -> None:
        check_region_arguments(self)
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()

    @property
    def region_spec(self) -> Optional[str]:
        """The spec to apply (``--visual_region`` or ``--tune_layers``), or ``None`` when neither was given."""
        return self.visual_region or self.tune_layers


REGION_FIELDS = tuple(f.name for f in dataclasses.fields(RegionArguments))


def check_region_arguments(args: Any) -> None:
    """Raise ``ValueError`` for contradictory or malformed region flags (the layer count is checked later)."""
    region, layers = getattr(args, "visual_region", None), getattr(args, "tune_layers", None)
    if region and layers:
        raise ValueError(
            f"--visual_region {region!r} and --tune_layers {layers!r} both given; use one: --visual_region takes a "
            "spec (uniform_0.25, 1::4, ...), --tune_layers an explicit list (1,5,9)"
        )
    if layers is not None and not _LAYER_LIST.match(str(layers)):
        raise ValueError(f"--tune_layers {layers!r} is not a comma-separated list of layer indices like 1,5,9,13")
    if region is not None and not str(region).strip():
        raise ValueError(f"--visual_region {region!r} is empty. Accepted forms: {ACCEPTED_FORMS}.")
    bits = getattr(args, "bits", 16)  # LLaVA/Bunny-style quantization flags, where the host has them
    if (region or layers) and isinstance(bits, int) and bits < 16 and not getattr(args, "lora_enable", False):
        raise ValueError(
            f"--visual_region/--tune_layers {region or layers!r} with --bits {bits} needs --lora_enable True: "
            f"{bits}-bit weights cannot be trained directly, so the region trains through LoRA adapters (QLoRA). "
            "For full-parameter region training on a quantized base use vr_plugin.load_for_region (hybrid mode)."
        )


def extend_arguments(base: type) -> type:
    """A dataclass subclass of ``base`` (e.g. LLaVA's ``TrainingArguments``) with the region fields added.

    The class lives in this module as ``<Base>WithRegion`` so that instances pickle (the Trainer saves its
    arguments); a host integration may re-home it under the base's own name.
    """
    if not dataclasses.is_dataclass(base):
        raise TypeError(f"{base!r} is not a dataclass")
    if any(f.name in REGION_FIELDS for f in dataclasses.fields(base)):
        return base  # already has them (e.g. a patched LLaVA checkout)
    name = f"{base.__name__}WithRegion"
    existing = globals().get(name)
    if isinstance(existing, type) and existing.__bases__ == (RegionArguments, base):
        return existing
    if existing is not None:
        name = f"{name}_{id(base):x}"
    extended = dataclasses.make_dataclass(name, [], bases=(RegionArguments, base))
    extended.__module__ = __name__
    globals()[name] = extended
    return extended


def add_region_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the region flags to an ``argparse`` parser (same names and defaults as :class:`RegionArguments`)."""
    add_option_flags(parser.add_argument_group("visual region (vr_plugin)"), RegionArguments, underscore_only=True)
    return parser


def region_arguments_from(namespace: argparse.Namespace) -> RegionArguments:
    """The :class:`RegionArguments` of a namespace parsed with :func:`add_region_args` (validated)."""
    return RegionArguments(**{name: getattr(namespace, name) for name in REGION_FIELDS})
