"""The YAML keys :class:`~vr_plugin.integrations.axolotl.VisualRegionPlugin` adds to an axolotl config, and the
checks run on the raw config before any weights load (pydantic and vr_plugin only: no axolotl import here)."""

from __future__ import annotations

import os
from typing import Any, List, Mapping, Optional, Union

from pydantic import BaseModel, Field

__all__ = ["VisualRegionArgs", "PLUGIN_NAME", "LORA_ADAPTERS", "check_config", "region_options"]

PLUGIN_NAME = "vr_plugin.integrations.axolotl.VisualRegionPlugin"
LORA_ADAPTERS = ("lora", "qlora")

# Options under which axolotl (or another plugin) decides itself what trains: with a region they would fight it.
_FREEZING_OPTIONS = {
    "unfrozen_parameters": "the region freezes everything outside its layers; remove unfrozen_parameters",
    "freeze_mm_modules": "it freezes the projector the region trains; remove it (visual_region_tune_projector: "
    "false keeps the projector frozen)",
}
# LoRA options that place adapters by themselves: the plugin places them on the region layers.
_LORA_PLACEMENT = {
    "peft_layers_to_transform": "the plugin puts the adapters on the region layers; remove peft_layers_to_transform",
    "peft_layers_pattern": "the plugin puts the adapters on the region layers; remove peft_layers_pattern",
    "lora_target_parameters": "parameter-level LoRA would land outside the region; remove lora_target_parameters",
}
# Full fine-tuning switches a LoRA run cannot honour (peft saves only adapters and modules_to_save).
_FULL_ONLY = ("tune_vision_tower", "tune_embeddings", "tune_lm_head", "tune_norm")


class VisualRegionArgs(BaseModel):
    """Config keys of the visual-region plugin (``plugins: [vr_plugin.integrations.axolotl.VisualRegionPlugin]``)."""

    visual_region: Optional[Union[str, List[int]]] = Field(
        default=None,
        json_schema_extra={"description": "decoder layers to tune: uniform_0.25, 1,5,9, first_4, ... (vr_plugin)"},
    )
    visual_region_tune_projector: bool = True
    visual_region_tune_vision_tower: bool = False
    visual_region_tune_embeddings: bool = False
    visual_region_tune_lm_head: bool = False
    visual_region_tune_norm: bool = False
    visual_region_layers_path: Optional[str] = None


def _plugins(cfg: Mapping) -> list:
    return [str(p) for p in (cfg.get("plugins") or [])]


def _check_spec_type(spec: Any) -> None:
    if spec is None:
        raise ValueError(
            f"visual_region is not set although {PLUGIN_NAME} is in plugins; add e.g. visual_region: uniform_0.25"
        )
    ok_list = isinstance(spec, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec)
    if not (isinstance(spec, str) or ok_list):
        raise ValueError(
            f"visual_region: {spec!r} is neither a spec string (uniform_0.25, 1,5,9, first_4, ...) nor a list of "
            "layer indices"
        )


def _check_conflicts(cfg: Mapping) -> None:
    """Refuse options that decide what trains by themselves, one line naming the option."""
    for option, why in _FREEZING_OPTIONS.items():
        if cfg.get(option):
            raise ValueError(f"visual_region cannot be combined with {option}: {why}")
    spectrum = [p for p in _plugins(cfg) if "spectrum" in p.lower()]
    if spectrum:
        raise ValueError(
            f"visual_region cannot be combined with the Spectrum plugin ({spectrum[0]} in plugins): both decide "
            "which layers train; remove one of them"
        )


def _check_adapter(cfg: Mapping) -> None:
    adapter = cfg.get("adapter")
    if adapter is None:
        return
    if adapter not in LORA_ADAPTERS:
        raise ValueError(f"visual_region: adapter {adapter!r} is not supported; use adapter: lora, qlora or none")
    for option, why in _LORA_PLACEMENT.items():
        if cfg.get(option) is not None:
            raise ValueError(f"visual_region cannot be combined with {option}: {why}")
    targets = cfg.get("lora_target_modules")
    if isinstance(targets, str):
        raise ValueError(
            f"visual_region: lora_target_modules {targets!r} is a pattern; with a region give module kinds "
            "(e.g. [q_proj, v_proj]) or lora_target_linear: true, and the plugin anchors them to the region layers"
        )
    for name in _FULL_ONLY:
        if cfg.get(f"visual_region_{name}"):
            raise ValueError(
                f"visual_region_{name} is for full fine-tuning; with adapter: {adapter} list the module in "
                "lora_modules_to_save instead"
            )


def _model_config(cfg: Mapping) -> Any:
    """The base model's config (``config.json`` only: no weights)."""
    from transformers import AutoConfig

    source = cfg.get("base_model_config") or cfg.get("base_model")
    if not source:
        raise ValueError("visual_region: the config names no base_model, so the region cannot be checked")
    try:
        return AutoConfig.from_pretrained(
            source, trust_remote_code=bool(cfg.get("trust_remote_code")), revision=cfg.get("revision_of_model")
        )
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"visual_region: cannot read the model config of base_model {source!r}: {reason}") from None


def check_config(cfg: Mapping) -> list:
    """Check a raw axolotl config (a dict, before pydantic) for the region; return the layers it selects.

    Reads only the base model's ``config.json``. A bad spec, a conflicting option or an unsupported adapter raises
    a one-line ``ValueError`` naming the option.
    """
    from vr_plugin.record import check_resume_region
    from vr_plugin.region import check_region_spec, spec_text

    spec = cfg.get("visual_region")
    _check_spec_type(spec)
    _check_conflicts(cfg)
    _check_adapter(cfg)
    layers = check_region_spec(_model_config(cfg), spec, option="visual_region")
    if cfg.get("adapter") and not layers:
        raise ValueError(
            f"visual_region: {spec_text(spec)!r} selects no layer, so adapter: {cfg['adapter']} has nothing to adapt"
        )
    lora_dir = cfg.get("lora_model_dir")
    if cfg.get("adapter") and lora_dir and os.path.isdir(str(lora_dir)):
        check_resume_region(str(lora_dir), layers, spec_text(spec))
    return layers


def region_options(cfg: Mapping) -> dict:
    """``RegionFreezeCallback`` / ``apply_visual_region`` options from a (validated) config.

    With an adapter peft has already decided what trains besides the adapters (``lora_modules_to_save``, which
    the plugin extends by the projector), so those groups are left as they are (``None``).
    """
    options: dict = {"layers_path": cfg.get("visual_region_layers_path")}
    if cfg.get("adapter"):
        options.update({f"tune_{g}": None for g in ("projector", "vision_tower", "embeddings", "lm_head", "norm")})
        return options
    defaults = VisualRegionArgs()
    for name in ("projector", "vision_tower", "embeddings", "lm_head", "norm"):
        key = f"visual_region_tune_{name}"
        value = cfg.get(key)
        options[f"tune_{name}"] = bool(getattr(defaults, key) if value is None else value)
    return options
