"""TRL's ``SFTTrainer`` with the visual region: full-parameter or region LoRA, and a projector learning rate.

Two pieces, both optional and both one line in a TRL script:

* :func:`region_sft_kwargs` -- the ``SFTTrainer`` keyword arguments that train only the region:
  ``callbacks`` (a :class:`vr_plugin.RegionFreezeCallback`) and, with ``lora=True``, a ``peft_config`` whose adapters
  sit on the region layers only (:func:`vr_plugin.region_lora_config`; the projector trains in full through
  ``modules_to_save``). Works with the plain ``trl.SFTTrainer``::

      trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=data, processing_class=processor,
                           **region_sft_kwargs(model, "uniform_0.25", lora=True))

* :class:`RegionSFTTrainer` -- ``SFTTrainer`` with :class:`vr_plugin.training.RegionTrainer`'s extras, the same
  code: ``projector_lr`` (the projector's own learning rate, LLaVA's ``mm_projector_lr``, through
  :func:`vr_plugin.region_param_groups`), strict resume, hybrid-quantized models; and ``save_model`` writes
  ``visual_region.json`` beside a LoRA adapter, which has no ``config.json`` to carry the region.

trl is imported only when :class:`RegionSFTTrainer` is first looked up, so this module imports without it.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Optional, Union

from ..callback import RegionFreezeCallback
from ..lora import region_lora_config
from ..record import RegionRecord, save_region_file
from ..region import resolve_region

__all__ = ["RegionSFTTrainer", "region_callback", "region_sft_kwargs", "region_sft_trainer_class"]

RegionSFTTrainer: type  # built on first access by the module's __getattr__ (imports trl then)


def region_sft_kwargs(
    model: Any,
    spec: Union[str, Iterable[int]],
    lora: bool = False,
    *,
    tune_vision_tower: Optional[bool] = False,
    tune_projector: bool = True,
    tune_embeddings: bool = False,
    tune_lm_head: bool = False,
    tune_norm: bool = False,
    layers_path: Optional[str] = None,
    **lora_options: Any,
) -> dict:
    """``SFTTrainer`` keyword arguments that train only the visual region ``spec`` of ``model`` (an instance).

    ``{"callbacks": [RegionFreezeCallback]}`` for full-parameter region tuning; with ``lora=True`` also
    ``"peft_config"``: a LoRA config with adapters on the region layers only (``lora_options``: ``r``,
    ``lora_alpha``, ``lora_dropout``, ``target`` ... of :func:`vr_plugin.region_lora_config`). The vision tower is
    frozen by default, as in ``vr-plugin train`` and LLaVA's recipes (``tune_vision_tower=None`` leaves it as
    loaded); the other ``tune_*`` are those of :func:`vr_plugin.apply_visual_region`. Pass a list of your own
    callbacks by extending ``kwargs["callbacks"]``.
    """
    if lora_options and not lora:
        raise ValueError(f"LoRA options {sorted(lora_options)} were given with lora=False; pass lora=True or drop them")
    region = resolve_region(model, spec, layers_path)  # resolved once, for the LoRA targets and the callback
    options: dict = dict(
        tune_vision_tower=tune_vision_tower,
        tune_projector=tune_projector,
        tune_embeddings=tune_embeddings,
        tune_lm_head=tune_lm_head,
        tune_norm=tune_norm,
        layers_path=layers_path,
    )
    if not lora:
        return {"callbacks": [RegionFreezeCallback(region, **options)]}
    peft_config = region_lora_config(
        model, region, train_projector=tune_projector, layers_path=layers_path, **lora_options
    )
    options["tune_projector"] = None  # peft's modules_to_save decide: the projector copy trains, not the original
    return {"callbacks": [RegionFreezeCallback(region, **options)], "peft_config": peft_config}


def region_callback(trainer: Any) -> Optional[RegionFreezeCallback]:
    """The :class:`vr_plugin.RegionFreezeCallback` among ``trainer``'s callbacks (``None`` if there is none)."""
    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RegionFreezeCallback)]
    return found[0] if found else None


@functools.cache
def region_sft_trainer_class() -> type:
    """:class:`RegionSFTTrainer`, built on the installed ``trl.SFTTrainer`` (imports trl)."""
    from trl import SFTTrainer

    from ..training import RegionTrainer

    class RegionSFTTrainer(RegionTrainer, SFTTrainer):
        """``trl.SFTTrainer`` with ``projector_lr`` (and ``hybrid``) of :class:`vr_plugin.training.RegionTrainer`.

        Give it the region through :func:`region_sft_kwargs` (or your own ``RegionFreezeCallback`` /
        ``peft_config``); ``save_model`` adds ``visual_region.json`` to a LoRA adapter directory.
        """

        def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
            super().save_model(output_dir, _internal_call)
            callback = region_callback(self)
            if callback is None or callback.plan is None or not hasattr(self.model, "peft_config"):
                return
            if self.args.should_save:
                plan = callback.plan
                record = RegionRecord(plan.spec, plan.layers, plan.num_layers)
                save_region_file(output_dir or self.args.output_dir, record)

    RegionSFTTrainer.__module__ = __name__
    RegionSFTTrainer.__qualname__ = "RegionSFTTrainer"  # importable by name: pickles
    return RegionSFTTrainer


def __getattr__(name: str) -> Any:
    if name == "RegionSFTTrainer":
        return region_sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
