"""LLaMA-Factory (0.9.x): the visual region from the training YAML.

``python -m vr_plugin.integrations.llamafactory train cfg.yaml [key=value ...]`` takes what
``llamafactory-cli train`` takes (a YAML or JSON file, then OmegaConf ``key=value`` overrides) plus two keys::

    visual_region: uniform_0.25                  # or explicit indices "1,5,9"
    visual_region_layers_path: model.language_model.layers   # optional, only where auto-detection fails

It pops them, checks them against the model's ``config.json`` and against LLaMA-Factory's own freezing options
(before any weights load; a conflict is one ``ValueError`` naming the option), and runs LLaMA-Factory's own training
(``llamafactory.train.tuner.run_exp``) with a :class:`LlamaFactoryRegionCallback`.

What trains, by ``finetuning_type``:

* ``full`` and ``freeze``: the region layers of the LLM (the region replaces freeze tuning's "last N layers":
  ``freeze_trainable_layers`` / ``freeze_trainable_modules`` / ``freeze_extra_modules`` are refused); the
  projector iff ``freeze_multi_modal_projector: false`` and the vision tower iff ``freeze_vision_tower: false``
  (LLaMA-Factory's settings win, with its defaults: both frozen); embeddings, final norm and lm_head are frozen.
* ``lora``: LLaMA-Factory builds the adapters, on exactly the region layers' linear modules (``lora_target`` is
  rewritten to their fully qualified names: ``all`` or the kinds you listed, e.g. ``q_proj,v_proj``); never on the
  vision tower (``freeze_vision_tower: false`` is refused). With ``freeze_multi_modal_projector: false`` the
  projector trains in full precision (added to ``additional_target``, peft's ``modules_to_save``).

The region is recorded in the saved ``config.json`` (full / freeze) or in ``visual_region.json`` beside the adapter
(LoRA), and in every checkpoint; ``region_plan.json`` in ``output_dir`` lists every trainable parameter.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence

from ..callback import RegionFreezeCallback
from ..record import RegionRecord, save_region_file

__all__ = [
    "REGION_KEYS",
    "RegionOptions",
    "LlamaFactoryRegionCallback",
    "read_config",
    "prepare",
    "train",
    "main",
]

logger = logging.getLogger(__name__)

SPEC_KEY = "visual_region"
LAYERS_PATH_KEY = "visual_region_layers_path"
REGION_KEYS = (SPEC_KEY, LAYERS_PATH_KEY)

FINETUNING_TYPES = ("full", "freeze", "lora")
STAGES = ("pt", "sft", "dpo", "kto")

# LLaMA-Factory options that pick trainable parameters themselves: with a region, setting them is an error.
_PICKS_LAYERS = {
    "freeze_trainable_layers": "the visual region replaces freeze tuning's 'last N layers'",
    "freeze_extra_modules": "the visual region decides which LLM modules outside the decoder layers train (none)",
}
# Boolean options that, when true, would fight the region.
_FIGHTS_WHEN_TRUE = {
    "freeze_language_model": "the visual region trains LLM layers",
    "use_llama_pro": "LLaMA Pro adds and trains its own expanded layers",
    "use_badam": "BAdam switches the trainable block itself",
    "use_galore": "GaLore builds its optimizer from its own target modules",
    "use_apollo": "APOLLO builds its optimizer from its own target modules",
}

USAGE = "usage: python -m vr_plugin.integrations.llamafactory train CONFIG.yaml|CONFIG.json [key=value ...]"


@dataclass(frozen=True)
class RegionOptions:
    """The vr_plugin keys of a LLaMA-Factory config, and what the run makes of them."""

    spec: Any
    layers_path: Optional[str]
    layers: tuple
    finetuning_type: str


def read_config(argv: Sequence[str]) -> dict:
    """The config ``llamafactory-cli train`` would read from ``argv``: a YAML / JSON file, merged with OmegaConf
    ``key=value`` overrides."""
    from omegaconf import OmegaConf

    if not argv or not str(argv[0]).endswith((".yaml", ".yml", ".json")):
        raise ValueError(f"expected a .yaml, .yml or .json config file, got {argv[0] if argv else 'nothing'!r}")
    path = os.path.abspath(argv[0])
    if not os.path.isfile(path):
        raise ValueError(f"config file {argv[0]!r} does not exist")
    if path.endswith(".json"):
        import json

        with open(path, encoding="utf-8") as handle:
            base = OmegaConf.create(json.load(handle))
    else:
        base = OmegaConf.load(path)
    merged = OmegaConf.merge(base, OmegaConf.from_cli(list(argv[1:])))
    return OmegaConf.to_container(merged)


def _defaults() -> dict:
    """LLaMA-Factory's defaults of its fine-tuning options (``FinetuningArguments``)."""
    from llamafactory.hparams import FinetuningArguments

    simple = (bool, int, str, type(None))
    return {f.name: f.default for f in fields(FinetuningArguments) if isinstance(f.default, simple)}


def _flag(args: dict, key: str, defaults: dict) -> bool:
    """A boolean option as LLaMA-Factory reads it (YAML booleans, or ``true`` / ``false`` strings)."""
    value = args.get(key, defaults.get(key))
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, bool) or value is None:
        return bool(value)
    raise ValueError(f"{key}: expected true or false, got {value!r}")


def _check_conflicts(args: dict, defaults: dict, finetuning_type: str) -> None:
    """Refuse LLaMA-Factory options that would silently fight the region (one line, naming the option)."""
    if finetuning_type not in FINETUNING_TYPES:
        raise ValueError(
            f"finetuning_type: {finetuning_type!r} cannot be combined with {SPEC_KEY}; use one of {FINETUNING_TYPES}"
        )
    stage = args.get("stage", defaults.get("stage"))
    if stage not in STAGES:
        raise ValueError(f"stage: {stage!r} cannot be combined with {SPEC_KEY}; use one of {STAGES}")
    for key, why in _PICKS_LAYERS.items():
        if args.get(key) is not None:
            raise ValueError(f"{key}: {args[key]!r} conflicts with {SPEC_KEY} ({why}); remove one of the two")
    modules = args.get("freeze_trainable_modules")
    if modules is not None and str(modules).strip() != "all":
        raise ValueError(
            f"freeze_trainable_modules: {modules!r} conflicts with {SPEC_KEY} (the region trains whole decoder "
            "layers); remove it or set it to 'all'"
        )
    for key, why in _FIGHTS_WHEN_TRUE.items():
        if _flag(args, key, defaults):
            raise ValueError(f"{key}: true conflicts with {SPEC_KEY} ({why}); set it to false or remove the region")
    if finetuning_type == "lora" and not _flag(args, "freeze_vision_tower", defaults):
        raise ValueError(
            f"freeze_vision_tower: false conflicts with {SPEC_KEY} and finetuning_type: lora (region adapters sit in "
            "LLM layers only, never in the vision tower); set freeze_vision_tower: true or use finetuning_type: full"
        )


def _check_resumed_adapter(args: dict, layers: tuple) -> None:
    """A LoRA run that resumes ``adapter_name_or_path`` keeps that adapter's targets: it must have this region."""
    from ..record import read_region

    adapters = args.get("adapter_name_or_path")
    if not adapters or _flag(args, "create_new_adapter", {}):
        return
    last = str(adapters).split(",")[-1].strip()
    saved = read_region(last) if os.path.isdir(last) else None
    if saved is None or sorted(saved.layers) != sorted(layers):
        found = "no visual region" if saved is None else f"region {saved.spec!r} (layers {saved.layers})"
        raise ValueError(
            f"adapter_name_or_path: {last!r} has {found}, but {SPEC_KEY} selects layers {list(layers)}; LLaMA-Factory "
            "would keep training that adapter's own targets (set create_new_adapter: true for a new region adapter)"
        )


def _lora_arguments(args: dict, options: RegionOptions, defaults: dict) -> dict:
    """``lora_target`` (and ``additional_target``) for LLaMA-Factory, resolved from the region on a meta-device model
    built from the config (no weights read)."""
    from transformers import AutoConfig

    from ..layer_map import meta_model
    from ..lora import projector_modules, region_targets

    remote = bool(args.get("trust_remote_code"))
    config = AutoConfig.from_pretrained(args["model_name_or_path"], trust_remote_code=remote)
    model = meta_model(config)
    kinds = [k.strip() for k in str(args.get("lora_target", defaults.get("lora_target", "all"))).split(",")]
    target = "all-linear" if kinds == ["all"] else kinds
    try:
        targets = region_targets(model, options.layers, target, options.layers_path)
    except ValueError as error:
        raise ValueError(f"lora_target: {error}") from None
    extra = {"lora_target": ",".join(targets.names)}
    if not _flag(args, "freeze_multi_modal_projector", defaults):
        given = [m.strip() for m in str(args.get("additional_target") or "").split(",") if m.strip()]
        wanted = given + [name for name in projector_modules(model) if name not in given]
        extra["additional_target"] = ",".join(wanted)
    return extra


def prepare(args: dict) -> tuple:
    """Split a LLaMA-Factory config into ``(args for run_exp, callbacks)``; checks everything before weights load.

    Without ``visual_region`` the config passes through unchanged (no callbacks).
    """
    args = dict(args)
    spec = args.pop(SPEC_KEY, None)
    layers_path = args.pop(LAYERS_PATH_KEY, None)
    if spec is None:
        if layers_path is not None:
            raise ValueError(f"{LAYERS_PATH_KEY}: {layers_path!r} given without {SPEC_KEY}")
        return args, []
    from ..region import check_region_spec

    if not args.get("model_name_or_path"):
        raise ValueError(f"model_name_or_path: missing; {SPEC_KEY} is checked against the model's config")
    defaults = _defaults()
    finetuning_type = str(args.get("finetuning_type", defaults.get("finetuning_type")))
    _check_conflicts(args, defaults, finetuning_type)
    layers = tuple(check_region_spec(args["model_name_or_path"], spec, option=SPEC_KEY))
    options = RegionOptions(spec, layers_path, layers, finetuning_type)
    if finetuning_type == "lora":
        _check_resumed_adapter(args, layers)
        args.update(_lora_arguments(args, options, defaults))
        callback = LlamaFactoryRegionCallback(spec, lora=True, layers_path=layers_path, tune_projector=None)
    else:
        callback = LlamaFactoryRegionCallback(
            spec,
            upcast=not _flag(args, "pure_bf16", defaults),
            layers_path=layers_path,
            tune_projector=not _flag(args, "freeze_multi_modal_projector", defaults),
            tune_vision_tower=not _flag(args, "freeze_vision_tower", defaults),
        )
    logger.info("LLaMA-Factory with visual region %r: layers %s (%s)", spec, list(layers), finetuning_type)
    return args, [callback]


def _adapter_outside(model: Any, plan: Any) -> list:
    """Names of LoRA modules that are not inside a region layer."""
    inside = tuple(f"{plan.layers_path}.{i}." for i in plan.layers)
    names = {name.rsplit(".lora_", 1)[0] for name, _ in model.named_parameters() if ".lora_" in name}
    return sorted(name for name in names if not (name + ".").startswith(inside))


class LlamaFactoryRegionCallback(RegionFreezeCallback):
    """:class:`vr_plugin.RegionFreezeCallback` for LLaMA-Factory's trainers.

    Full / freeze: freezes the LLM outside the region after LLaMA-Factory's own freezing, and upcasts newly trainable
    half-precision tensors to fp32 as LLaMA-Factory does for its own (``upcast``; off with ``pure_bf16``).
    LoRA (``lora=True``): LLaMA-Factory built the adapters; this checks that every adapter sits in a region layer,
    leaves what peft made trainable as it is, and writes ``visual_region.json`` beside the final adapter.
    """

    def __init__(self, spec: Any, lora: bool = False, upcast: bool = True, **options: Any) -> None:
        super().__init__(spec, **options)
        self.lora = lora
        self.upcast = upcast

    def apply(self, model: Any) -> Any:
        """Apply the region to ``model`` (see the class docstring) and return the plan."""
        if self.lora:
            from ..locate import map_parameters

            params = map_parameters(model)
            for group in ("embeddings", "norm", "lm_head"):  # e.g. additional_target: embed_tokens stays trainable
                self.options[f"tune_{group}"] = any(i.param.requires_grad for i in params if i.group == group)
        plan = super().apply(model)
        outside = _adapter_outside(model, plan) if self.lora else []
        if outside:
            raise RuntimeError(f"LoRA adapters outside visual region {plan.spec!r} layers {plan.layers}: {outside[:5]}")
        if self.upcast and not self.lora:
            self._upcast(plan)
        return plan

    @staticmethod
    def _upcast(plan: Any) -> None:
        import torch
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():  # LLaMA-Factory keeps ZeRO-3 parameters as the engine holds them
            return
        for param in plan.trainable_params:
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.to(torch.float32)

    def on_train_end(self, args, state, control, **kwargs):
        if self.lora and self.plan is not None and state.is_world_process_zero and args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            save_region_file(args.output_dir, RegionRecord(self.plan.spec, self.plan.layers, self.plan.num_layers))


def train(args: dict) -> None:
    """Run LLaMA-Factory's own training (``run_exp``) on a config dict with the region applied."""
    from llamafactory.train.tuner import run_exp

    run_args, callbacks = prepare(args)
    run_exp(run_args, callbacks=callbacks)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m vr_plugin.integrations.llamafactory train CONFIG [key=value ...]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE + "\n\n" + (__doc__ or "").strip())
        return 0 if argv else 2
    if argv[0] != "train":
        print(f"error: unknown command {argv[0]!r} (only 'train')\n{USAGE}", file=sys.stderr)
        return 2
    import importlib.util

    if importlib.util.find_spec("llamafactory") is None:
        print("error: LLaMA-Factory is not installed here (pip install 'llamafactory>=0.9,<0.10')", file=sys.stderr)
        return 2
    try:
        run_args, callbacks = prepare(read_config(argv[1:]))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from llamafactory.train.tuner import run_exp

    run_exp(run_args, callbacks=callbacks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
