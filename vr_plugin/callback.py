"""``RegionFreezeCallback``: the visual region for any ``transformers.Trainer``."""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Optional, Union

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .backends.deepspeed import optimizer_parameters as deepspeed_groups
from .distributed import check_fsdp
from .freeze import RegionPlan, apply_visual_region
from .io import write_json
from .locate import unwrap_model
from .record import RegionRecord, check_resume_region, save_region_file

__all__ = ["PLAN_FILE", "RegionFreezeCallback", "optimizer_parameters", "verify_optimizer", "write_plan"]

PLAN_FILE = "region_plan.json"

logger = logging.getLogger(__name__)


def _innermost(optimizer: Any) -> Any:
    """Look through accelerate / DeepSpeed wrappers down to the object that holds the model's parameters."""
    for _ in range(8):
        if deepspeed_groups(optimizer) is not None:
            return optimizer
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            return optimizer
        optimizer = inner
    return optimizer


def optimizer_parameters(optimizer: Any) -> list:
    """The model parameters an optimizer updates (also for DeepSpeed ZeRO-1/2/3 and accelerate wrappers)."""
    holder = _innermost(optimizer)
    groups = deepspeed_groups(holder)
    if groups is not None:
        return [p for group in groups for p in group]
    return [p for group in holder.param_groups for p in group["params"]]


# Name components wrappers insert between a model's own module names (FSDP1 units, activation checkpointing).
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def _clean_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def _wanted_ids(plan: RegionPlan, model: Any) -> set:
    """The plan's trainable tensors as ``model`` holds them now: FSDP2 (and other wrappers) replace parameter
    objects after the plan was made, so they are looked up again by name where every name still resolves."""
    if model is not None:
        current = {_clean_name(n): p for n, p in model.named_parameters()}
        if all(name in current for name in plan.trainable_names):
            return {id(current[name]) for name in plan.trainable_names}
    return {id(p) for p in plan.trainable_params}


def verify_optimizer(optimizer: Any, plan: RegionPlan, model: Any = None) -> None:
    """Raise ``RuntimeError`` unless ``optimizer`` holds exactly the plan's trainable parameters (looked up by name
    in ``model`` when given, so FSDP's replaced parameters count as the same)."""
    held = {id(p) for p in optimizer_parameters(optimizer)}
    wanted = _wanted_ids(plan, model)
    if held == wanted:
        return
    names = {}
    if model is not None:
        names = {id(p): _clean_name(n) for n, p in model.named_parameters()}
    extra = sorted(names.get(i, "<unnamed>") for i in held - wanted)
    missing = sorted(names.get(i, "<unnamed>") for i in wanted - held)
    raise RuntimeError(
        f"The optimizer does not hold exactly the visual region's trainable parameters ({plan.spec!r}): "
        f"{len(extra)} frozen tensors are in it (e.g. {extra[:5]}), {len(missing)} trainable ones are missing "
        f"(e.g. {missing[:5]}). Freeze before the optimizer is built: pass RegionFreezeCallback to "
        "Trainer(callbacks=[...]) instead of trainer.add_callback(...)."
    )


def _drop_frozen(optimizer: Any, world_size: int) -> int:
    """Remove frozen tensors from an already-built (not yet stepped) torch optimizer."""
    holder = _innermost(optimizer)
    if deepspeed_groups(holder) is not None or world_size > 1:
        engine = "a DeepSpeed engine" if deepspeed_groups(holder) is not None else f"{world_size} distributed ranks"
        raise RuntimeError(
            "RegionFreezeCallback was attached after the Trainer built its optimizer "
            f"({engine} "
            "already registered every parameter), so the region cannot be applied safely. Pass it to the "
            "constructor: Trainer(..., callbacks=[RegionFreezeCallback(...)])."
        )
    dropped = 0
    for group in holder.param_groups:
        keep = [p for p in group["params"] if p.requires_grad]
        stepped = [p for p in group["params"] if not p.requires_grad and holder.state.get(p)]
        if stepped:
            raise RuntimeError("RegionFreezeCallback: the optimizer has already stepped frozen parameters")
        dropped += len(group["params"]) - len(keep)
        group["params"] = keep
    return dropped


def write_plan(plan: RegionPlan, path: str) -> str:
    """Write what trains (spec, layers, per-group counts, every trainable parameter name) as JSON."""
    data = {
        "spec": plan.spec,
        "layers": plan.layers,
        "num_layers": plan.num_layers,
        "layers_path": plan.layers_path,
        "trainable": plan.trainable,
        "total": plan.total,
        "groups": {name: {"trainable": c.trainable, "total": c.total} for name, c in plan.groups.items()},
        "trainable_names": plan.trainable_names,
    }
    return write_json(path, data, indent=1)


def _resume_candidates(args: Any) -> list:
    """Checkpoints a run with ``args`` resumes from: ``--resume_from_checkpoint DIR`` and the last ``checkpoint-*``
    in ``output_dir`` (what ``resume_from_checkpoint=True`` and LLaVA-style auto-resume pick)."""
    found = []
    resume = getattr(args, "resume_from_checkpoint", None)
    if isinstance(resume, str) and os.path.isdir(resume):
        found.append(resume)
    output_dir = getattr(args, "output_dir", None)
    if output_dir and os.path.isdir(output_dir):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(output_dir)
        if last:
            found.append(last)
    return found


class RegionFreezeCallback(TrainerCallback):
    """Tune only the visual region in a ``transformers.Trainer`` run.

    Freezes in ``on_init_end`` (before the optimizer or a DeepSpeed engine
    exists); there it also refuses to resume a checkpoint trained with another
    region, before the Trainer or DeepSpeed loads any state, and lets FSDP keep
    the original parameters (:func:`vr_plugin.distributed.check_fsdp`).
    Verifies in ``on_train_begin`` that the optimizer holds exactly the plan's
    parameters, logs one line and writes ``region_plan.json`` (every
    trainable parameter) into ``output_dir``, and writes ``visual_region.json``
    into every checkpoint.  ``spec`` and ``options`` are those of
    :func:`vr_plugin.apply_visual_region`.
    """

    def __init__(self, spec: Union[str, Iterable[int]], **options: Any) -> None:
        self.spec = spec
        self.options = options
        self.plan: Optional[RegionPlan] = None

    def apply(self, model: Any) -> RegionPlan:
        """Freeze ``model`` now (idempotent for the same model)."""
        self.plan = apply_visual_region(model, self.spec, **self.options)
        return self.plan

    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise RuntimeError("RegionFreezeCallback needs the Trainer's model in on_init_end")
        self.apply(model)
        self.check_resume(args)
        check_fsdp(model, args)
        if optimizer is not None:  # Trainer(optimizers=(opt, sched)) built it before us
            _drop_frozen(optimizer, getattr(args, "world_size", 1))

    def check_resumed_weights(self, args: Any, state: Any, model: Any) -> None:
        """Raise :class:`vr_plugin.resume.ResumeError` if the trained parameters did not come back on resume.

        Skipped where an engine restores its own state (DeepSpeed, FSDP) and for adapter checkpoints (peft).
        """
        from .resume import resumed_checkpoint, verify_resumed_weights

        checkpoint = resumed_checkpoint(args, state.global_step)
        if checkpoint is None or model is None or getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            return
        core = unwrap_model(model)
        trained = [n for n, p in core.named_parameters() if p.requires_grad]
        if not hasattr(core, "peft_config") and trained:
            verify_resumed_weights(core, checkpoint, trained)

    def check_resume(self, args: Any) -> None:
        """Raise ``ValueError`` if a checkpoint this run would resume from was trained with another region."""
        for checkpoint in _resume_candidates(args):
            check_resume_region(checkpoint, self.plan.layers, self.plan.spec)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.plan is None:
            logger.warning("RegionFreezeCallback was added after the Trainer was built; freezing now")
            self.apply(model)
            if optimizer is not None:
                _drop_frozen(optimizer, getattr(args, "world_size", 1))
        if state.global_step > 0:  # resumed from a checkpoint named only in trainer.train(resume_from_checkpoint=...)
            self.check_resume(args)
            self.check_resumed_weights(args, state, model)
        if optimizer is not None:
            verify_optimizer(optimizer, self.plan, model)
        else:
            logger.warning("RegionFreezeCallback: no optimizer visible in on_train_begin; not verified")
        if state.is_world_process_zero:
            logger.info(self.plan.summary())
            if getattr(args, "output_dir", None):
                write_plan(self.plan, os.path.join(args.output_dir, PLAN_FILE))

    def on_save(self, args, state, control, **kwargs):
        if self.plan is not None and state.is_world_process_zero:
            directory = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            save_region_file(directory, RegionRecord(self.plan.spec, self.plan.layers, self.plan.num_layers))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # an adapter directory has no config.json to carry the region: write visual_region.json where the final
        # save of a peft model goes (the Trainer's output_dir), whichever Trainer subclass saves it
        if self.plan is not None and state.is_world_process_zero and hasattr(unwrap_model(model), "peft_config"):
            save_region_file(args.output_dir, RegionRecord(self.plan.spec, self.plan.layers, self.plan.num_layers))
