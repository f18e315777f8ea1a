"""Visual instruction tuning of HF-native LVLMs (Llava, LLaVA-NeXT, Qwen2-VL, ...) with the visual region.

:func:`train` is what ``vr-plugin train`` runs: the model and its own processor from a directory (or hub id), a
LLaVA-format conversation file through :class:`vr_plugin.data.ConversationDataset` (labels on the assistant turns
only), and a ``transformers.Trainer`` with :class:`vr_plugin.RegionFreezeCallback` passed to its constructor.

Modes (``RegionTrainingConfig``):

* full-parameter region tuning (default): region layers and projector train, the rest is frozen;
* ``lora=True``: LoRA adapters on the region layers only, projector in full precision (``modules_to_save``);
* ``lora=True, bits=4`` (or 8): QLoRA, the LLM loaded through bitsandbytes (:func:`vr_plugin.load_quantized`);
* ``quantize_frozen='nf4'``: hybrid, the layers outside the region in 4-bit, the region in full precision.

The vision tower is frozen unless ``tune_vision_tower`` (as LLaVA's recipes do). The final save writes the region
into ``config.json`` (LoRA: the adapter in peft's format plus ``visual_region.json``, and with ``merge_lora`` a merged
model under ``merged/``), the processor beside it, and ``trainer_state.json`` with the loss history. Multi-GPU and
multi-node runs go through the launchers the Trainer supports (``torchrun``, ``accelerate launch``, ``deepspeed``).

:func:`load_model` loads what :func:`train` (or :func:`vr_plugin.prune_outside_region`) wrote, for evaluation,
scoring and pruning; :func:`save_model` writes a model with its processor.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import transformers
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .backends.processes import is_main_process
from .backends.transformers import hybrid_quantized_allowed, runtime_layout
from .callback import RegionFreezeCallback
from .freeze import RegionPlan
from .lora import region_param_groups
from .model_io import ADAPTER_CONFIG, save_model
from .options import DTYPE_NAMES, DataOptions, LoraOptions, MemoryOptions, QuantOptions, RegionOptions
from .record import RegionRecord, read_region, save_region_file, write_region

__all__ = [
    "DTYPES",
    "RegionTrainer",
    "RegionTrainingConfig",
    "TrainResult",
    "check_model_dir",
    "load_model",
    "save_model",
    "train",
]

logger = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass
class RegionTrainingConfig(MemoryOptions, QuantOptions, LoraOptions, RegionOptions, DataOptions):
    """What to train, apart from the ``transformers.TrainingArguments`` (optimizer, schedule, batch, ...).

    The fields are those of :mod:`vr_plugin.options` (data, region, LoRA, quantization, memory), each part checking
    its own values on construction; this class adds the checks across parts (which of full / LoRA / QLoRA / hybrid).
    """

    def __post_init__(self) -> None:
        for part in (DataOptions, RegionOptions, LoraOptions, QuantOptions, MemoryOptions):
            part.__post_init__(self)
        if self.bits and not self.lora:
            raise ValueError(
                f"bits={self.bits} trains LoRA adapters on a quantized base (QLoRA): add --lora, or use "
                "--quantize_frozen nf4 for full-parameter region tuning with the frozen layers quantized"
            )
        if self.quantize_frozen and self.lora:
            raise ValueError(
                "quantize_frozen keeps the region in full precision for full-parameter tuning; drop --lora"
            )
        if self.merge_lora and (not self.lora or self.bits):
            raise ValueError("merge_lora merges LoRA into a full-precision base: it needs --lora and no --bits")

    def validate(self) -> None:
        """Raise ``FileNotFoundError`` for a missing model, conversation file or image folder, before anything loads."""
        check_model_dir(self.model)
        if not os.path.isfile(self.data):
            raise FileNotFoundError(f"conversation file {self.data!r} does not exist")
        if self.images is not None and not os.path.isdir(self.images):
            raise FileNotFoundError(f"image folder {self.images!r} does not exist")


@dataclass
class TrainResult:
    """What :func:`train` did and where it went."""

    output_dir: str
    plan: RegionPlan
    metrics: dict
    log_history: list
    saved: list = field(default_factory=list)
    main_process: bool = True  # False on the other ranks of a distributed run


def check_model_dir(path: str) -> None:
    """Raise ``FileNotFoundError`` unless ``path`` is a model directory (``config.json`` or a peft adapter).

    A path that does not exist locally and looks like a hub id (``org/name``) passes: ``from_pretrained`` resolves it.
    """
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", ADAPTER_CONFIG)):
            raise FileNotFoundError(f"{path!r} is a directory but holds no config.json (nor a peft {ADAPTER_CONFIG})")
        return
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"model directory {path!r} does not exist")


def _processor_source(path: str, base: str) -> str:
    names = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
    return path if any(os.path.isfile(os.path.join(path, n)) for n in names) else base


def load_model(path: str, dtype: Optional[torch.dtype] = None, device: Optional[str] = None) -> tuple:
    """``(model, processor)`` from a model directory, a peft adapter directory (merged into its base) or hub id.

    The model class comes from the config (:func:`vr_plugin.quant.model_class_for`); the processor is the
    directory's own (an adapter directory without one uses its base model's). ``device``: ``cpu``, ``cuda``, ...
    (default: the first GPU when there is one).
    """
    from .data import load_processor
    from .export import merge_region_lora
    from .model_io import adapter_base, load_plain

    check_model_dir(path)
    base = adapter_base(path)
    if base is not None:
        from peft import PeftModel

        check_model_dir(base)
        peft_model = PeftModel.from_pretrained(load_plain(base, dtype), path)
        record = read_region(path)
        model = merge_region_lora(peft_model)
        if record is not None:
            write_region(model.config, record.spec, record.layers, record.num_layers)
        processor = load_processor(_processor_source(path, base))
    else:
        model = load_plain(path, dtype)
        processor = load_processor(path)
    if getattr(model, "hf_quantizer", None) is None:
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.eval(), processor


def _tied_aliases(model: Any) -> set:
    """Parameter names that alias another parameter (tied weights): a checkpoint may leave them out."""
    seen, aliases = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return aliases


class RegionTrainer(Trainer):
    """``Trainer`` whose optimizer gives the projector its own learning rate (``projector_lr``, LLaVA's
    ``mm_projector_lr``) through :func:`vr_plugin.region_param_groups`, and which accepts hybrid models
    (:func:`vr_plugin.load_for_region`: quantized outside the region, full precision inside); otherwise the plain
    ``Trainer``. ``hybrid`` defaults to "the model is a bitsandbytes model without PEFT adapters". ``loss_chunk``:
    the training loss N labelled positions at a time, never the whole logits (:func:`vr_plugin.chunked_loss`).

    Its ``checkpoint-*`` directories keep the runtime parameter names, so ``resume_from_checkpoint`` restores the
    weights exactly (with the plain Trainer of transformers 5 they do not come back); a checkpoint that loads only
    partially stops the run with the missing and unexpected keys named, instead of a warning.
    """

    def __init__(
        self,
        *args: Any,
        projector_lr: Optional[float] = None,
        hybrid: Optional[bool] = None,
        loss_chunk: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        self.projector_lr, self.loss_chunk = projector_lr, loss_chunk
        model = kwargs.get("model", args[0] if args else None)
        if hybrid is None:
            hybrid = getattr(model, "hf_quantizer", None) is not None and not hasattr(model, "peft_config")
        if not hybrid:
            super().__init__(*args, **kwargs)
        else:
            with hybrid_quantized_allowed():
                super().__init__(*args, **kwargs)
        if loss_chunk is not None:
            self._check_loss_chunk(model)

    def _check_loss_chunk(self, model: Any) -> None:
        """``loss_chunk`` computes the model's own loss: refused where the Trainer would compute another one."""
        from .loss import check_chunkable

        if self.label_smoother is not None or self.compute_loss_func is not None:
            raise ValueError(
                "loss_chunk computes the model's own loss: drop label_smoothing_factor / compute_loss_func"
            )
        check_chunkable(model)

    def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False, **kwargs: Any) -> Any:
        """The Trainer's loss; in training with ``loss_chunk``, computed by :func:`vr_plugin.loss.chunked_loss`
        (the returned outputs' logits are then empty)."""
        if self.loss_chunk is None or not model.training or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, **kwargs)
        from .loss import chunked_loss

        with chunked_loss(model, self.loss_chunk) as probe:
            result = super().compute_loss(model, inputs, return_outputs, **kwargs)
        if probe.calls != 1:
            raise RuntimeError(f"loss_chunk: the model computed {probe.calls} losses in one forward, expected 1")
        return result

    def create_optimizer(self, model: Any = None) -> Any:
        if self.projector_lr is None or self.optimizer is not None:  # transformers < 5 takes no model argument
            return super().create_optimizer() if model is None else super().create_optimizer(model)
        opt_model = self.model if model is None else model
        groups = region_param_groups(
            opt_model, lr=self.args.learning_rate, projector_lr=self.projector_lr, weight_decay=self.args.weight_decay
        )
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self._writing_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._writing_checkpoint = False

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        if not getattr(self, "_writing_checkpoint", False):  # the final model keeps the hub's original layout
            return super()._save(output_dir, state_dict)
        with runtime_layout(self.model):
            return super()._save(output_dir, state_dict)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        from .backends.bitsandbytes import is_quant_state_key
        from .resume import ResumeError

        aliases = _tied_aliases(self.model)
        missing = [k for k in load_result.missing_keys if k not in aliases]
        unexpected = [k for k in load_result.unexpected_keys if not is_quant_state_key(k)]  # frozen 4-bit layers
        if missing or unexpected:
            raise ResumeError(
                f"the checkpoint's weights do not match the model: {len(missing)} missing keys "
                f"{missing[:3]}{' ...' if len(missing) > 3 else ''}, {len(unexpected)} unexpected keys "
                f"{unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}; resume from a checkpoint this model's "
                "training wrote (vr-plugin train / vr_plugin.RegionTrainer), or start without --resume_from_checkpoint"
            )
        super()._issue_warnings_after_load(load_result)


def _local_path(path: str) -> str:
    return os.path.abspath(path) if os.path.isdir(path) else path


def _load_for_training(config: RegionTrainingConfig) -> Any:
    from .model_io import load_plain
    from .quant import load_for_region, load_quantized

    dtype = DTYPES[config.dtype]
    path = _local_path(config.model)  # an absolute base path in the adapter config, so adapters load anywhere
    if config.bits:
        return load_quantized(path, "nf4" if config.bits == 4 else "int8", dtype=dtype, layers_path=config.layers_path)
    if config.quantize_frozen:
        model, _ = load_for_region(
            path, config.visual_region, config.quantize_frozen, dtype=dtype, layers_path=config.layers_path, apply=False
        )
        return model
    return load_plain(path, dtype)


class _BarOnly(ProgressCallback):
    """The Trainer's progress bar without the log dictionaries it prints below it."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        return None


def _is_main_process(trainer: Any) -> bool:
    """Rank 0 of the run. ``torch.distributed``'s rank is asked too: under DeepSpeed's CPU accelerator the
    TrainingArguments of transformers 5.x report process 0 of 1 on every rank."""
    return trainer.is_world_process_zero() and is_main_process()


def _model_and_callback(config: RegionTrainingConfig, args: Any) -> tuple:
    """The model to train (LoRA-wrapped when asked) and the callback that freezes everything but the region.

    The region is resolved once here and the :class:`vr_plugin.region.Region` goes to LoRA and the callback.
    """
    from .region import resolve_region

    model = _load_for_training(config)
    region = resolve_region(model, config.visual_region, config.layers_path)
    options: dict = dict(
        tune_vision_tower=config.tune_vision_tower,
        tune_projector=config.tune_projector,
        tune_embeddings=config.tune_embeddings,
        tune_lm_head=config.tune_lm_head,
        tune_norm=config.tune_norm,
        layers_path=config.layers_path,
    )
    if config.lora:
        from .lora import apply_region_lora, prepare_qlora

        target = config.lora_target if config.lora_target == "all-linear" else config.lora_target.split(",")
        lora = dict(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target=target,
            train_projector=config.tune_projector,
            layers_path=config.layers_path,
        )
        if config.bits:
            model, _ = prepare_qlora(model, region, args.gradient_checkpointing, **lora)
        else:
            model, _ = apply_region_lora(model, region, **lora)
        options["tune_projector"] = None  # peft's modules_to_save decide: the projector copy trains, not the original
    return model, RegionFreezeCallback(region, **options)


def _save_extras(config: RegionTrainingConfig, trainer: Any, plan: RegionPlan, processor: Any) -> list:
    """On the main process, after the model is saved: trainer state, region file, merged model, region state."""
    output_dir = trainer.args.output_dir
    saved = [output_dir]
    trainer.save_state()
    if config.lora:
        save_region_file(output_dir, RegionRecord(plan.spec, plan.layers, plan.num_layers))
    if config.merge_lora:
        from .export import merge_region_lora

        merged_dir = os.path.join(output_dir, "merged")
        save_model(merge_region_lora(trainer.model), processor, merged_dir)
        saved.append(merged_dir)
    if config.quantize_frozen:
        from .export import save_region_state

        saved.append(save_region_state(trainer.model, output_dir))
    return saved


def train(
    config: RegionTrainingConfig, args: Any, *, print_logs: bool = True, records: Optional[list] = None
) -> TrainResult:
    """Visual instruction tuning of ``config.model`` on ``config.data``, only the visual region learning.

    ``args`` is a ``transformers.TrainingArguments`` (``remove_unused_columns`` is turned off: samples carry the
    processor's image keys). ``print_logs=False`` keeps the Trainer's log lines (loss, learning rate) off the console;
    they are still in the result and ``trainer_state.json``. ``records``: ``config.data`` already read by
    :func:`vr_plugin.data.validate_conversations` (else it is validated here, every image opened, before any weights
    load). Returns a :class:`TrainResult`; the model is saved to ``args.output_dir``.
    """
    from transformers import AutoConfig

    from .data import Collator, ConversationDataset, load_processor, validate_conversations
    from .locate import num_layers_from_config
    from .spec import select_layers

    config.validate()
    select_layers(config.visual_region, num_layers_from_config(AutoConfig.from_pretrained(config.model)))  # fail fast
    if records is None:
        records, skipped = validate_conversations(config.data, config.images, config.skip_bad_images)
        if skipped:
            logger.warning("skipped %d records of %s with unreadable images", skipped, config.data)
    args.remove_unused_columns = False
    if not args.label_names:
        args.label_names = ["labels"]  # a PeftModel's forward hides them from the Trainer's signature check
    processor = load_processor(config.model)
    dataset = ConversationDataset(
        records, config.images, processor, max_length=config.max_length, cache=config.cache_data, source=config.data
    )
    transformers.set_seed(args.seed)  # before the model: LoRA's random init is then the same in every run
    model, callback = _model_and_callback(config, args)
    trainer = RegionTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=Collator(processor),
        processing_class=processor,
        callbacks=[callback],
        projector_lr=config.projector_lr,
        hybrid=bool(config.quantize_frozen),
        loss_chunk=config.loss_chunk,
    )
    if not print_logs:
        trainer.remove_callback(PrinterCallback)
        if trainer.pop_callback(ProgressCallback) is not None:
            trainer.add_callback(_BarOnly)
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    main_process = _is_main_process(trainer)
    saved = _save_extras(config, trainer, callback.plan, processor) if main_process else [args.output_dir]
    return TrainResult(
        args.output_dir,
        callback.plan,
        dict(result.metrics),
        list(trainer.state.log_history),
        saved,
        main_process=main_process,
    )
