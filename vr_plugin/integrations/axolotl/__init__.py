"""axolotl plugin: tune only the visual region.

In the axolotl YAML::

    plugins:
      - vr_plugin.integrations.axolotl.VisualRegionPlugin
    visual_region: uniform_0.25

Hooks (axolotl's ``BasePlugin``):

* ``register`` -- the raw config, before pydantic and before anything loads: the spec is checked against the
  base model's ``config.json``; options that decide what trains by themselves (``unfrozen_parameters``,
  ``freeze_mm_modules``, the Spectrum plugin, ``peft_layers_to_transform`` ...) are refused, one line each;
* ``get_input_args`` -- the ``visual_region*`` keys (:class:`.args.VisualRegionArgs`);
* ``post_model_build`` -- with ``adapter: lora`` / ``qlora``: before the adapter is built, ``lora_target_modules``
  becomes an anchored pattern over the region layers' linear modules of the LLM (never a vision block) and the
  projector joins ``lora_modules_to_save``;
* ``add_callbacks_pre_trainer`` -- :class:`vr_plugin.RegionFreezeCallback`: freezes before the optimizer exists,
  checks the optimizer, writes ``region_plan.json`` and ``visual_region.json`` into checkpoints, and records the
  region in ``model.config`` (so in every saved ``config.json``);
* ``post_train`` -- ``visual_region.json`` beside the final model / adapter in ``output_dir``.

This module imports axolotl: only configs that list the plugin import it.
"""

from __future__ import annotations

from typing import Any

from axolotl.integrations.base import BasePlugin
from axolotl.utils.logging import get_logger

from ...backends.processes import is_main_process
from .args import LORA_ADAPTERS, PLUGIN_NAME, VisualRegionArgs, check_config, region_options

__all__ = ["VisualRegionPlugin", "VisualRegionArgs", "lora_placement", "PLUGIN_NAME"]

# axolotl shows INFO only from loggers under "axolotl" (others: warnings and errors), so the plugin reports there
logger = get_logger("axolotl.integrations.vr_plugin")


def lora_placement(cfg: Any, model: Any, kinds: Any) -> dict:
    """The ``lora_target_modules`` / ``lora_target_linear`` / ``lora_modules_to_save`` values that put the adapters
    on the region layers only (``kinds``: ``"all-linear"`` or module kinds such as ``["q_proj", "v_proj"]``)."""
    from vr_plugin.lora import projector_modules, region_targets

    targets = region_targets(model, cfg.visual_region, kinds, cfg.get("visual_region_layers_path"))
    to_save = list(cfg.get("lora_modules_to_save") or [])
    if cfg.get("visual_region_tune_projector", True) is not False:
        to_save += [name for name in projector_modules(model) if name not in to_save]
    return {
        "lora_target_modules": targets.regex(),
        "lora_target_linear": False,
        "lora_modules_to_save": to_save or None,
    }


class VisualRegionPlugin(BasePlugin):
    """Tune only the visual region of the LLM (``visual_region: uniform_0.25``), full or LoRA."""

    def __init__(self) -> None:
        super().__init__()
        self.layers: list = []
        self.lora_kinds: Any = None  # what the user's YAML asked LoRA to target, read once

    def get_input_args(self) -> str:
        """The pydantic model of the ``visual_region*`` keys."""
        return "vr_plugin.integrations.axolotl.args.VisualRegionArgs"

    def register(self, cfg: dict) -> None:
        """Check the region and the options around it on the raw config, before any weights load."""
        self.layers = check_config(cfg)
        if cfg.get("adapter") in LORA_ADAPTERS:
            self.lora_kinds = "all-linear" if cfg.get("lora_target_linear") else cfg.get("lora_target_modules")
            self.lora_kinds = self.lora_kinds or "all-linear"

    def post_model_build(self, cfg: Any, model: Any) -> None:
        """With LoRA: aim the adapters at the region layers before axolotl builds the peft config."""
        if cfg.get("adapter") not in LORA_ADAPTERS:
            return
        if self.lora_kinds is None:  # register() ran on another instance (a config built in Python)
            self.lora_kinds = "all-linear" if cfg.get("lora_target_linear") else cfg.get("lora_target_modules")
        placement = lora_placement(cfg, model, self.lora_kinds or "all-linear")
        for key, value in placement.items():
            cfg[key] = value
        logger.info(
            "visual region %r: LoRA targets %s, modules_to_save %s",
            cfg.visual_region,
            placement["lora_target_modules"],
            placement["lora_modules_to_save"],
        )

    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list:
        """:class:`vr_plugin.RegionFreezeCallback`, handed to the Trainer's constructor (freezes in on_init_end)."""
        from vr_plugin.callback import RegionFreezeCallback

        return [RegionFreezeCallback(cfg.visual_region, **region_options(cfg))]

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        """Log the plan (region, trainable share per group) that the callback applied in on_init_end."""
        from vr_plugin.callback import RegionFreezeCallback

        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, RegionFreezeCallback) and callback.plan is not None:
                logger.info("%s\n%s", callback.plan.summary(), callback.plan.table())

    def post_train(self, cfg: Any, model: Any) -> None:
        """Write ``visual_region.json`` beside the saved model or adapter in ``output_dir``."""
        from vr_plugin.locate import unwrap_model
        from vr_plugin.record import read_region, save_region_file

        record = read_region(unwrap_model(model))
        if record is not None and cfg.get("output_dir") and is_main_process():
            save_region_file(str(cfg.output_dir), record)
