"""Run by tests/test_distributed.py under `deepspeed --num_gpus 2` (CPU): ZeRO-2/3 + RegionFreezeCallback.

Every rank writes ``<result>.<rank>.json`` with what it saw, so the test can compare ranks:

* ``region``: train with the callback (checkpoint at the last step), then resume from that checkpoint with the same
  region (one more step) and try to resume with another region (a clear error before anything loads); under ZeRO-3
  also score layers (Block Influence inside the engine and on a ``zero.Init``-partitioned model, weight change);
* ``lora``: LoRA on the region layers (``vr_plugin.apply_region_lora``) trained through the same Trainer.
"""

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, LlavaForConditionalGeneration, Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.common import LlavaSynthetic, collate, freeze_vision  # noqa: E402
from vr_plugin import RegionFreezeCallback, apply_region_lora, find_decoder_layers, score_layers  # noqa: E402
from vr_plugin.callback import _innermost, optimizer_parameters  # noqa: E402
from vr_plugin.distributed import gathered, zero3_partitioned  # noqa: E402
from vr_plugin.locate import numel  # noqa: E402


@dataclass
class Extra:
    model_dir: str = field(default="")
    result: str = field(default="")
    stage: int = field(default=2)
    spec: str = field(default="uniform_0.25")
    other_spec: str = field(default="0,6")
    mode: str = field(default="region")
    late: bool = field(default=False)


def _whole(model):
    """Every parameter, gathered (ZeRO-3) and copied: {name: tensor} (a collective)."""
    with gathered(model.parameters()):
        return {name: p.detach().clone() for name, p in model.named_parameters()}


def _digest(weights, names):
    sha = hashlib.sha256()
    for name in sorted(names):
        sha.update(name.encode())
        sha.update(weights[name].float().numpy().tobytes())
    return sha.hexdigest()


def _optimizer_state(optimizer):
    """Numbers of fp32 master elements and of Adam ``exp_avg`` elements this rank holds (ZeRO partitions)."""
    holder = _innermost(optimizer)
    partitions = getattr(holder, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
    if partitions is None:
        partitions = getattr(holder, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    inner = getattr(holder, "optimizer", holder)
    state = [s["exp_avg"].numel() for s in inner.state.values() if "exp_avg" in s]
    return {"fp32": sum(p.numel() for p in partitions or []), "exp_avg": sum(state), "zero": type(holder).__name__}


def _load(extra):
    model = LlavaForConditionalGeneration.from_pretrained(extra.model_dir)  # ZeRO-3: partitioned while loading
    freeze_vision(model)
    return model


def _trainer(model, args, callbacks):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # a later Trainer in this process builds its own Accelerator (DeepSpeed plugin)
    return Trainer(
        model=model,
        args=args,
        train_dataset=LlavaSynthetic(model.config, n=8),
        data_collator=collate,
        callbacks=callbacks,
    )


def _train_report(trainer, callback, initial):
    model = trainer.model
    final = _whole(model)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    held = optimizer_parameters(trainer.optimizer)
    return {
        "trainable": trainable,
        "plan_trainable": callback.plan.trainable,
        "plan_total": callback.plan.total,
        "held_numel": sum(numel(p) for p in held),
        "held_is_plan": {id(p) for p in held} == {id(p) for p in callback.plan.trainable_params},
        "optimizer": _optimizer_state(trainer.optimizer),
        "changed": sorted(n for n in final if not torch.equal(final[n], initial[n])),
        "trained_digest": _digest(final, trainable),
        "frozen_digest": _digest(final, [n for n in final if n not in trainable]),
        "partitioned": zero3_partitioned(model),
        "engine_layers": find_decoder_layers(trainer.model_wrapped).name,
        "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }


def run_region(extra, args):
    model = _load(extra)
    initial = _whole(model)
    callback = RegionFreezeCallback(extra.spec)
    trainer = _trainer(model, args, None if extra.late else [callback])
    if extra.late:
        trainer.add_callback(callback)
    trainer.train()
    report = _train_report(trainer, callback, initial)
    trainer.save_model(os.path.join(args.output_dir, "final"))

    if zero3_partitioned(model):  # score under ZeRO-3: inside the engine, on a zero.Init model, weight change
        batches = [collate([s]) for s in LlavaSynthetic(model.config, n=2, seed=1)]
        base = LlavaForConditionalGeneration.from_pretrained(extra.model_dir)
        report["base_partitioned"] = zero3_partitioned(base)
        report["bi_trained"] = score_layers(model, batches, "bi", progress=False)
        report["bi_base"] = score_layers(base, batches, "bi", progress=False)
        scores_out = os.path.join(args.output_dir, f"scores.{os.environ.get('RANK', '0')}.json")
        report["weight_change"] = score_layers(
            model, metric="weight_change", reference=base, progress=False, out=scores_out
        )

    resumed_model = _load(extra)
    resumed = _trainer(resumed_model, _more_steps(args, 1), [RegionFreezeCallback(extra.spec)])
    resumed.train(resume_from_checkpoint=True)
    report["resumed_step"] = resumed.state.global_step
    report["resumed_loss"] = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    report["resumed_changed"] = sorted(n for n, w in _whole(resumed_model).items() if not torch.equal(w, initial[n]))
    try:
        _trainer(_load(extra), _more_steps(args, 1), [RegionFreezeCallback(extra.other_spec)])
        report["other_region_error"] = None
    except ValueError as error:
        report["other_region_error"] = str(error)
    return report


def _more_steps(args, steps):
    args.max_steps += steps
    return args


def run_lora(extra, args):
    peft_model, plan = apply_region_lora(_load(extra), extra.spec, r=4, lora_alpha=8, lora_dropout=0.0)
    initial = _whole(peft_model)
    callback = RegionFreezeCallback(extra.spec, tune_projector=None)  # peft already chose: adapters + projector
    trainer = _trainer(peft_model, args, [callback])
    trainer.train()
    report = _train_report(trainer, callback, initial)
    report["plan_before_trainer"] = plan.trainable
    return report


def main():
    extra, args = HfArgumentParser((Extra, TrainingArguments)).parse_args_into_dataclasses()
    args.deepspeed = {
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": extra.stage, "stage3_gather_16bit_weights_on_model_save": True},
    }
    args.__post_init__()  # builds the HF DeepSpeed config: ZeRO-3 partitions the model inside from_pretrained
    report = run_lora(extra, args) if extra.mode == "lora" else run_region(extra, args)
    with open(f"{extra.result}.{os.environ.get('RANK', '0')}.json", "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main()
