"""The training side of the LLaVA-family hooks: region flags on the host's ``TrainingArguments``, LoRA targets
restricted to the region, and the Trainer built with :class:`HostRegionCallback` (:func:`patch_train_module`)."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import torch

from ...args import RegionArguments, check_region_arguments, extend_arguments
from ...callback import RegionFreezeCallback
from ...distributed import gathered
from ...locate import unwrap_model
from ...lora import region_targets

__all__ = [
    "HostRegionCallback",
    "attention_implementation",
    "patch_train_module",
    "region_callbacks",
    "region_lora_targets",
    "region_options",
    "region_spec",
]

logger = logging.getLogger(__name__)

# The training arguments most recently parsed by a patched host script (find_all_linear_names gets only the model).
_ACTIVE: dict = {"args": None}


def region_spec(args: Any) -> Optional[str]:
    """``--visual_region`` or ``--tune_layers`` of the parsed host arguments (``None``: no region requested)."""
    return getattr(args, "visual_region", None) or getattr(args, "tune_layers", None)


def region_options(args: Any) -> dict:
    """``apply_visual_region`` options of the host arguments (``--freeze_mm_mlp_adapter``: projector stays frozen)."""
    options = RegionArguments.region_options(args)
    if getattr(args, "freeze_mm_mlp_adapter", False):
        options["tune_projector"] = False
    return options


def region_lora_targets(model: torch.nn.Module, args: Any) -> Optional[str]:
    """The anchored regex of the region layers' linear modules for ``LoraConfig(target_modules=...)``, or ``None``."""
    spec = region_spec(args)
    if spec is None:
        return None
    return region_targets(model, spec, layers_path=getattr(args, "layers_path", None)).regex()


def _gathered(param: torch.Tensor) -> torch.Tensor:
    """A CPU copy of a parameter, gathering it first under DeepSpeed ZeRO-3 (a collective: every rank calls it)."""
    with gathered([param]):
        return param.data.detach().cpu().clone()


class HostRegionCallback(RegionFreezeCallback):
    """``RegionFreezeCallback`` plus what LLaVA-family scripts need.

    * (as ``RegionFreezeCallback``) refuses, before DeepSpeed loads anything, to auto-resume a ``checkpoint-*``
      trained with another region;
    * makes intermediate LoRA checkpoints loadable: ``config.json`` (with the region) and
      ``non_lora_trainables.bin`` (the projector) beside the adapter, as the scripts write only at the end.
    """

    def on_save(self, args, state, control, model=None, **kwargs):
        super().on_save(args, state, control, model=model, **kwargs)
        if model is None or not hasattr(model, "peft_config"):
            return
        trainables = {n: _gathered(p) for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
        if state.is_world_process_zero:
            directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(directory, exist_ok=True)
            unwrap_model(model).config.save_pretrained(directory)
            torch.save(trainables, os.path.join(directory, "non_lora_trainables.bin"))


def region_callbacks(args: Any) -> list:
    """``[HostRegionCallback]`` when the host arguments ask for a region, else ``[]``."""
    spec = region_spec(args)
    if spec is None:
        return []
    check_region_arguments(args)
    if getattr(args, "tune_mm_mlp_adapter", False):
        raise ValueError(
            f"--visual_region {spec!r} is for visual instruction tuning; with --tune_mm_mlp_adapter True "
            "(projector pretraining) the LLM is frozen anyway"
        )
    return [HostRegionCallback(spec, **region_options(args))]


def _region_trainer(base: type) -> type:
    """A subclass of the host's Trainer that passes :func:`region_callbacks` to the constructor."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)  # Trainer(model, args, ...)
        extra = region_callbacks(training_args)
        if extra:
            kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + extra
        base.__init__(self, *args, **kwargs)

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})


def patch_train_module(module: Any, trainer_name: str) -> None:
    """Patch a LLaVA-family ``train`` module in place so its unmodified ``train()`` honours the region flags.

    ``trainer_name`` is its Trainer subclass (``LLaVATrainer`` / ``BunnyTrainer``). Idempotent.
    """
    if getattr(module, "_vr_plugin_patched", False):
        return
    extended = extend_arguments(module.TrainingArguments)
    if extended is not module.TrainingArguments:
        parent_post_init: Callable = extended.__post_init__

        def __post_init__(self: Any) -> None:
            parent_post_init(self)  # RegionArguments' checks, then the host's own
            _ACTIVE["args"] = self

        extended.__post_init__ = __post_init__
        # home the class under the host's own name so Trainer can pickle the arguments (training_args.bin)
        extended.__module__, extended.__qualname__ = module.__name__, "TrainingArguments"
        module.TrainingArguments = extended

    original_targets = module.find_all_linear_names

    def find_all_linear_names(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        targets = region_lora_targets(model, _ACTIVE["args"]) if _ACTIVE["args"] is not None else None
        return targets if targets is not None else original_targets(model, *args, **kwargs)

    module.find_all_linear_names = find_all_linear_names
    setattr(module, trainer_name, _region_trainer(getattr(module, trainer_name)))
    module._vr_plugin_patched = True


def attention_implementation() -> Optional[str]:
    """``flash_attention_2`` where flash-attn and a GPU are there, else ``None`` (transformers' default), logged."""
    choice = os.environ.get("VR_ATTN_IMPLEMENTATION")
    if choice:
        return None if choice == "default" else choice
    try:
        import flash_attn  # noqa: F401

        if torch.cuda.is_available():
            return "flash_attention_2"
        reason = "no CUDA device"
    except ImportError:
        reason = "flash-attn is not installed"
    logger.info("attention: %s, so the model uses transformers' default instead of flash_attention_2", reason)
    return None
