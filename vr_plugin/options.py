"""Run options, defined once: dataclasses that validate themselves, and the command-line flags made from them.

* :class:`RegionSwitches` -- what trains beside the region layers (embeddings, lm_head, norm, projector) and where
  the layers are; shared by :class:`RegionOptions` (``vr-plugin train``/``sweep``) and
  :class:`vr_plugin.args.RegionArguments` (the LLaVA / Bunny argument hooks).
* :class:`RegionOptions`, :class:`LoraOptions`, :class:`QuantOptions`, :class:`MemoryOptions`,
  :class:`DataOptions` -- the parts of :class:`vr_plugin.training.RegionTrainingConfig`, which is all of them.

Each field's ``metadata`` carries its help text and its ``choices`` (``add_argument`` keywords only, as
``transformers.HfArgumentParser`` passes them through); ``NEGATIVE_FLAGS`` names a switch's opposite
(``--freeze_projector`` sets ``tune_projector`` false).
:func:`add_option_flags` turns any of these dataclasses into ``argparse`` flags, so the defaults, choices and help
live here and nowhere else. Pure Python (no torch import), so parsers stay instant.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from .loss import DEFAULT_LOSS_CHUNK
from .spec import ACCEPTED_FORMS, DEFAULT_SPEC

__all__ = [
    "DTYPE_NAMES",
    "LORA_DEFAULTS",
    "QUANT_FROZEN",
    "DataOptions",
    "LoraOptions",
    "MemoryOptions",
    "QuantOptions",
    "RegionOptions",
    "RegionSwitches",
    "add_option_flags",
    "to_bool",
]

DTYPE_NAMES = ("float32", "bfloat16", "float16")
QUANT_FROZEN = ("nf4", "fp4", "int8")  # hybrid: how the layers outside the region are stored
LORA_DEFAULTS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target": "all-linear"}
# a switch's opposite on the command line (a field's metadata must hold add_argument keywords only:
# transformers.HfArgumentParser passes it through)
NEGATIVE_FLAGS = {"tune_projector": "--freeze_projector"}


def _help(text: str, **extra: Any) -> dict:
    return {"metadata": {"help": text, **extra}}


@dataclass
class RegionSwitches:
    """What trains beside the region's layers, and where the decoder layers are."""

    tune_embeddings: bool = field(default=False, **_help("With a region: also train the input embeddings."))
    tune_lm_head: bool = field(default=False, **_help("With a region: also train lm_head."))
    tune_norm: bool = field(default=False, **_help("With a region: also train the LLM's final norm."))
    tune_projector: bool = field(default=True, **_help("With a region: train the multimodal projector."))
    layers_path: Optional[str] = field(
        default=None, **_help("Dotted path of the LLM decoder ModuleList, if discovery needs help.")
    )

    def region_options(self) -> dict:
        """Keyword arguments for :func:`vr_plugin.apply_visual_region` / ``RegionFreezeCallback``."""
        names = ("tune_embeddings", "tune_lm_head", "tune_norm", "tune_projector", "layers_path")
        return {name: getattr(self, name) for name in names}


@dataclass
class RegionOptions(RegionSwitches):
    """The region of a ``vr-plugin train`` run (default: the paper's ``uniform_0.25``)."""

    visual_region: str = field(
        default=DEFAULT_SPEC, **_help(f"Region spec (default: {DEFAULT_SPEC}); see `vr-plugin select --help`.")
    )
    tune_vision_tower: bool = field(default=False, **_help("Train the vision tower too."))
    projector_lr: Optional[float] = field(
        default=None, **_help("Learning rate of the projector (default: --learning_rate).")
    )

    def __post_init__(self) -> None:
        if not str(self.visual_region).strip():
            raise ValueError(f"visual_region {self.visual_region!r} is empty. Accepted forms: {ACCEPTED_FORMS}.")
        if self.projector_lr is not None and self.projector_lr <= 0:
            raise ValueError(f"projector_lr must be > 0, got {self.projector_lr}")


@dataclass
class LoraOptions:
    """LoRA on the region's layers instead of full parameters."""

    lora: bool = field(default=False, **_help("LoRA adapters on the region layers instead of full weights."))
    lora_r: int = field(default=LORA_DEFAULTS["r"], **_help(f"LoRA rank (default: {LORA_DEFAULTS['r']})."))
    lora_alpha: int = field(
        default=LORA_DEFAULTS["lora_alpha"], **_help(f"LoRA alpha (default: {LORA_DEFAULTS['lora_alpha']}).")
    )
    lora_dropout: float = field(
        default=LORA_DEFAULTS["lora_dropout"], **_help(f"LoRA dropout (default: {LORA_DEFAULTS['lora_dropout']}).")
    )
    lora_target: str = field(
        default=LORA_DEFAULTS["target"], **_help("'all-linear' or module kinds like q_proj,v_proj.")
    )
    merge_lora: bool = field(default=False, **_help("Also save the LoRA merged model under merged/."))

    def __post_init__(self) -> None:
        for name in ("lora_r", "lora_alpha"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class QuantOptions:
    """QLoRA (``bits``) or hybrid (``quantize_frozen``) loading."""

    bits: Optional[int] = field(
        default=None, **_help("QLoRA: load the LLM in 4-bit nf4 / 8-bit (needs --lora).", choices=(4, 8))
    )
    quantize_frozen: Optional[str] = field(
        default=None, **_help("Hybrid: the layers outside the region quantized.", choices=QUANT_FROZEN)
    )

    def __post_init__(self) -> None:
        if self.bits not in (None, 4, 8):
            raise ValueError(f"bits={self.bits} is not supported; use 4 (nf4) or 8 (int8)")
        if self.quantize_frozen not in (None, *QUANT_FROZEN):
            raise ValueError(f"quantize_frozen={self.quantize_frozen!r} is not one of {', '.join(QUANT_FROZEN)}")
        if self.bits and self.quantize_frozen:
            raise ValueError("give either bits (QLoRA) or quantize_frozen (hybrid), not both")
        if self.bits or self.quantize_frozen:
            from .backends.bitsandbytes import require

            require("--bits / --quantize_frozen load the LLM through bitsandbytes")


@dataclass
class MemoryOptions:
    """How a training step spends memory beyond what loading decides."""

    loss_chunk: Optional[int] = field(
        default=None,
        **_help(
            "Compute the loss N labelled positions at a time, never the whole logits over the vocabulary "
            f"(at Llama-3's 128k vocabulary and 2048 positions, N={DEFAULT_LOSS_CHUNK} saves 2.7 GB)."
        ),
    )

    def __post_init__(self) -> None:
        if self.loss_chunk is not None and self.loss_chunk < 1:
            raise ValueError(f"loss_chunk must be >= 1 positions, got {self.loss_chunk}")


@dataclass
class DataOptions:
    """The model and the conversations to train it on."""

    model: str = field(**_help("Model directory or hub id of an HF-native LVLM."))
    data: str = field(**_help("LLaVA-format conversation file (.json or .jsonl)."))
    images: Optional[str] = field(default=None, **_help("Folder the records' image names are relative to."))
    max_length: Optional[int] = field(default=None, **_help("Truncate samples to this many tokens."))
    cache_data: bool = field(default=False, **_help("Keep encoded samples in memory after first use (small data)."))
    dtype: str = field(default="float32", **_help("Weights dtype.", choices=DTYPE_NAMES))
    skip_bad_images: bool = field(
        default=False,
        **_help("Drop records whose images are missing or unreadable (counted) instead of stopping."),
    )

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")


def to_bool(value: str) -> bool:
    """``true``/``false`` (and 1/0, yes/no) from the command line."""
    lowered = str(value).lower()
    if lowered in ("true", "1", "yes", "y", "t"):
        return True
    if lowered in ("false", "0", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean (true/false)")


_TYPES = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[float]": float}


def _flag_kwargs(f: dataclasses.Field) -> dict:
    """``add_argument`` keywords for one dataclass field."""
    meta = f.metadata
    kwargs: dict = {"dest": f.name, "help": meta.get("help")}
    if f.default is not dataclasses.MISSING:
        kwargs["default"] = f.default
    else:
        kwargs["required"] = True
    if f.type in (bool, "bool"):
        kwargs.update(type=to_bool, nargs="?", const=True, metavar="BOOL")
    else:
        kwargs["type"] = _TYPES.get(str(f.type), str)
    if "choices" in meta:
        kwargs["choices"] = meta["choices"]
    return kwargs


def add_option_flags(
    parser: Any,
    options: type,
    exclude: Iterable[str] = (),
    only: Optional[Iterable[str]] = None,
    underscore_only: bool = False,
) -> list:
    """Add one flag per field of the dataclass ``options`` (``--name`` and ``--name-with-dashes``); return the dests.

    Booleans take an optional value (``--tune_norm``, ``--tune_norm false``); a field whose metadata names a
    ``negative`` flag gets it too (``--freeze_projector``). ``only`` / ``exclude`` pick fields by name;
    ``underscore_only``: no dashed alias (host parsers).
    """
    added, exclude = [], set(exclude)
    for f in dataclasses.fields(options):
        if f.name in exclude or (only is not None and f.name not in only):
            continue
        names = [f"--{f.name}"]
        if not underscore_only and "_" in f.name:
            names.append(f"--{f.name.replace('_', '-')}")
        parser.add_argument(*names, **_flag_kwargs(f))
        negative = NEGATIVE_FLAGS.get(f.name)
        if negative:
            parser.add_argument(negative, dest=f.name, action="store_false", help=f"Opposite of --{f.name}.")
        added.append(f.name)
    return added
