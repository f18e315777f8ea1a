"""ms-swift 4.x (``swift sft``): the visual region through swift's own extension points.

* ``python -m vr_plugin.integrations.swift sft --visual_region uniform_0.25 <any swift sft flags>``: checks the
  region against the model's ``config.json`` and the flags against swift's own freezing options before any weights
  load, restricts LoRA to the region layers (``--target_regex``), then runs swift's own ``swift sft`` entry point
  with the region callback (``--external_plugins`` :data:`PLUGIN_FILE` ``--callbacks visual_region``);
* ``VISUAL_REGION=uniform_0.25 swift sft --external_plugins <PLUGIN_FILE> --callbacks visual_region ...``: the same
  callback on the plain ``swift`` command (checked when the trainer is built; LoRA needs ``--target_regex`` from
  ``python -m vr_plugin.integrations.swift target_regex ...``).

The region decides which LLM decoder layers train; the vision tower and the projector stay as swift's
``--freeze_vit`` / ``--freeze_aligner`` set them (swift's defaults freeze both), and nothing the user froze is
unfrozen.  swift is imported lazily: only :func:`register` and :func:`main` need it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

from ...callback import RegionFreezeCallback
from ...locate import find_decoder_layers, map_parameters, unwrap_model
from ...region import check_region_spec, resolve_region
from ...spec import describe_indices

__all__ = [
    "CALLBACK_NAME",
    "CONFLICTING_OPTIONS",
    "PLUGIN_FILE",
    "SPEC_ENV",
    "SwiftRegionCallback",
    "lora_target_regex",
    "main",
    "prepare_argv",
    "register",
]

CALLBACK_NAME = "visual_region"
SPEC_ENV = "VISUAL_REGION"
PLUGIN_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugin.py")
COMMANDS = ("sft",)
TUNER_TYPES = ("full", "lora")
# swift's own choice of trainable LLM parameters: the region makes that choice, so these are refused beside it
CONFLICTING_OPTIONS = (
    "--freeze_llm",
    "--freeze_parameters",
    "--freeze_parameters_regex",
    "--freeze_parameters_ratio",
    "--trainable_parameters",
    "--trainable_parameters_regex",
    "--target_regex",
)
_FALSE = ("false", "0", "no", "n", "f", "off")
_NONE = ("", "none", "[]")

# full: region layers train, the rest of the LLM is frozen, vision tower / projector stay as swift set them
FULL_OPTIONS = {"tune_projector": None, "tune_vision_tower": None}
# LoRA: the adapters already sit on the region (--target_regex); record and verify, change nothing swift set
LORA_OPTIONS = {**FULL_OPTIONS, "tune_embeddings": None, "tune_norm": None, "tune_lm_head": None}


def _has_adapters(model: Any) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def _refuse_unfreezing(model: Any, spec: str) -> None:
    """Full tuning: a region layer that swift froze (``--freeze_llm``, ``--freeze_parameters*``) stays frozen."""
    region = resolve_region(unwrap_model(model), spec)
    location = find_decoder_layers(unwrap_model(model), region.layers_path)
    for index in region.layers:
        for name, param in location.layers[index].named_parameters():
            if param.is_floating_point() and not param.requires_grad:
                raise ValueError(
                    f"--visual_region {spec}: swift froze {location.name}.{index}.{name} inside the region before "
                    "the region applied; drop swift's own layer freezing (--freeze_llm, --freeze_parameters*, "
                    "--trainable_parameters*): the region decides which LLM layers train"
                )


def _check_adapters(model: Any, spec: str, layers: list) -> None:
    """LoRA: no adapter in an LLM decoder layer outside the region."""
    outside = [
        info.name
        for info in map_parameters(unwrap_model(model))
        if info.group == "layer" and info.layer not in layers and "lora_" in info.name
    ]
    if outside:
        raise ValueError(
            f"--visual_region {spec}: {len(outside)} LoRA tensors sit outside region layers "
            f"[{describe_indices(layers)}] "
            f"(e.g. {outside[0]}); pass --target_regex from `python -m vr_plugin.integrations.swift target_regex "
            "--model ... --visual_region ...` or run `python -m vr_plugin.integrations.swift sft ...`"
        )


class SwiftRegionCallback(RegionFreezeCallback):
    """:class:`vr_plugin.RegionFreezeCallback` as swift's ``callbacks_map`` builds it: ``Cls(args, trainer)``.

    The spec comes from ``spec=`` or the ``VISUAL_REGION`` environment variable (the launcher sets it, so every
    rank of a ``NPROC_PER_NODE`` run sees it).  Full tuning: region layers train, the rest of the LLM is frozen,
    vision tower and projector stay as swift's ``--freeze_vit`` / ``--freeze_aligner`` left them.  LoRA: nothing is
    changed; the adapters must sit on region layers only.
    """

    def __init__(self, args: Any = None, trainer: Any = None, spec: Optional[str] = None, **options: Any) -> None:
        spec = spec if spec is not None else os.environ.get(SPEC_ENV, "")
        if not spec.strip():
            raise ValueError(
                f"--callbacks {CALLBACK_NAME} needs the region: set {SPEC_ENV}=<spec> (e.g. uniform_0.25) or run "
                "`python -m vr_plugin.integrations.swift sft --visual_region <spec> ...`"
            )
        super().__init__(spec.strip(), **options)
        self.user_options = dict(options)

    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        lora = model is not None and _has_adapters(model)
        self.options = {**(LORA_OPTIONS if lora else FULL_OPTIONS), **self.user_options}
        if model is not None and not lora:
            _refuse_unfreezing(model, self.spec)
        super().on_init_end(args, state, control, model=model, optimizer=optimizer, **kwargs)
        if lora:
            _check_adapters(model, self.plan.spec, self.plan.layers)


def register() -> None:
    """Put :class:`SwiftRegionCallback` into ``swift.callbacks.callbacks_map`` as ``visual_region``."""
    from swift.callbacks import callbacks_map

    callbacks_map[CALLBACK_NAME] = SwiftRegionCallback


def _pop_values(argv: list, name: str) -> Optional[list]:
    """Remove every ``name [values...]`` / ``name=value`` from ``argv``; their values (``None`` if absent)."""
    found, index = None, 0
    while index < len(argv):
        token = argv[index]
        if token == name or token.startswith(name + "="):
            found = found or []
            end = index + 1
            if "=" in token:
                found.append(token.split("=", 1)[1])
            else:
                while end < len(argv) and not argv[end].startswith("--"):
                    end += 1
                found += argv[index + 1 : end]
            del argv[index:end]
        else:
            index += 1
    return found


def _values(argv: list, name: str) -> Optional[list]:
    """The values of ``name`` in ``argv`` (last occurrence wins, as in swift's parser), or ``None``."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument(name, nargs="*", default=None)
    known, _ = parser.parse_known_args(argv)
    return getattr(known, name.lstrip("-"))


def _flag(argv: list, name: str, default: bool) -> bool:
    values = _values(argv, name)
    if values is None:
        return default
    return not values or values[-1].lower() not in _FALSE


def _check_conflicts(argv: list) -> None:
    """swift's own layer-freezing options, given with an effect, beside ``--visual_region``: refused."""
    for name in CONFLICTING_OPTIONS:
        values = _values(argv, name)
        if values is None:
            continue
        if name == "--freeze_llm":
            active = _flag(argv, name, False)
        elif name == "--freeze_parameters_ratio":
            active = bool(values) and float(values[-1]) != 0.0
        else:
            active = any(v.strip().lower() not in _NONE for v in values)
        if active:
            raise ValueError(
                f"{' '.join([name, *values])} conflicts with --visual_region: the region decides which LLM layers "
                "train (remove it; --freeze_vit / --freeze_aligner / --target_modules / --modules_to_save are kept)"
            )


def _lora_kinds(argv: list) -> Any:
    """swift's ``--target_modules`` as module kinds for the region (``all-linear`` by default)."""
    kinds = _values(argv, "--target_modules") or ["all-linear"]
    if "all-linear" in kinds:
        if len(kinds) > 1:
            raise ValueError(f"--target_modules {' '.join(kinds)}: with --visual_region give all-linear alone")
        return "all-linear"
    special = [k for k in kinds if k.startswith("all-")]
    if special:
        raise ValueError(f"--target_modules {special[0]} is not supported with --visual_region; use all-linear")
    return kinds


def _linear_names(core: Any, group: str) -> list:
    """Qualified names of the ``nn.Linear`` modules holding parameters of ``group`` (``projector``, ``vision``)."""
    from torch import nn

    owners = {info.name.rsplit(".", 1)[0] for info in map_parameters(core) if info.group == group}
    return sorted(name for name in owners if isinstance(core.get_submodule(name), nn.Linear))


def lora_target_regex(
    model: str, spec: str, target: Any = "all-linear", freeze_vit: bool = True, freeze_aligner: bool = True
) -> str:
    """swift's ``--target_regex`` for ``spec``: the region layers' linear modules of the LLM, from the config alone.

    Built on the meta device (no weights).  As in swift's own ``all-linear``, ``--freeze_aligner false`` adds the
    projector's linear modules and ``--freeze_vit false`` the vision tower's; vision blocks never get the region's.
    """
    import re

    from transformers import AutoConfig

    from ...layer_map import meta_model
    from ...lora import region_targets

    core = meta_model(AutoConfig.from_pretrained(model))
    pattern = region_targets(core, spec, target).regex()
    extra = (_linear_names(core, "projector") if not freeze_aligner else []) + (
        _linear_names(core, "vision") if not freeze_vit else []
    )
    return "|".join([f"(?:{pattern})", *(re.escape(name) for name in extra)]) if extra else pattern


def prepare_argv(argv: list) -> tuple:
    """``(command, swift argv, environment)`` for ``sft --visual_region SPEC <swift flags>``; raises ``ValueError``
    on a bad spec or conflicting flags, reading only the model's config."""
    if not argv or argv[0] not in COMMANDS:
        got = argv[0] if argv else "nothing"
        raise ValueError(f"expected a swift command ({', '.join(COMMANDS)}) first, got {got!r}")
    command, rest = argv[0], list(argv[1:])
    if rest and rest[0].endswith((".yaml", ".yml", ".json")):
        from swift.cli.main import parse_yaml_args

        parse_yaml_args(rest)  # swift's own expansion: a `visual_region:` key becomes --visual_region
    spec = (_pop_values(rest, "--visual_region") or [None])[-1]
    if not spec:
        raise ValueError("--visual_region SPEC is required (e.g. uniform_0.25)")
    _check_conflicts(rest)
    tuner = (_values(rest, "--tuner_type") or ["lora"])[-1]
    if tuner not in TUNER_TYPES:
        raise ValueError(f"--tuner_type {tuner}: the visual region supports {' and '.join(TUNER_TYPES)}")
    model = (_values(rest, "--model") or [None])[-1]
    if not model:
        raise ValueError("--model is required with --visual_region (its config.json gives the LLM's depth)")
    layers = check_region_spec(model, spec)
    if tuner == "lora":
        regex = lora_target_regex(
            model, spec, _lora_kinds(rest), _flag(rest, "--freeze_vit", True), _flag(rest, "--freeze_aligner", True)
        )
        rest += ["--target_regex", regex]
    plugins = (_pop_values(rest, "--external_plugins") or []) + [PLUGIN_FILE]
    callbacks = [c for c in (_pop_values(rest, "--callbacks") or []) if c != CALLBACK_NAME] + [CALLBACK_NAME]
    rest += ["--external_plugins", *plugins, "--callbacks", *callbacks]
    print(f"vr_plugin: --visual_region {spec} -> LLM layers [{describe_indices(layers)}] ({tuner})", file=sys.stderr)
    return command, rest, {SPEC_ENV: spec}


def _print_regex(argv: list) -> None:
    """``target_regex --model DIR --visual_region SPEC [--target_modules ...]``: print swift's --target_regex."""
    spec = (_values(argv, "--visual_region") or [None])[-1]
    model = (_values(argv, "--model") or [None])[-1]
    if not spec or not model:
        raise ValueError("target_regex needs --model DIR and --visual_region SPEC")
    check_region_spec(model, spec)
    freeze_vit, freeze_aligner = _flag(argv, "--freeze_vit", True), _flag(argv, "--freeze_aligner", True)
    print(lora_target_regex(model, spec, _lora_kinds(argv), freeze_vit, freeze_aligner))


def main(argv: Optional[list] = None) -> None:
    """``python -m vr_plugin.integrations.swift sft --visual_region SPEC ...``: check, then run ``swift sft``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "target_regex":
            _print_regex(argv[1:])
            return
        command, swift_argv, env = prepare_argv(argv)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    from swift.cli.main import cli_main

    os.environ.update(env)
    sys.argv = ["swift", command, *swift_argv]
    cli_main()
