"""Run by tests/test_distributed.py under `deepspeed --num_gpus 2` (CPU): ZeRO-2/3 + RegionFreezeCallback."""

import json
import os
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser, LlavaForConditionalGeneration, Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.common import LlavaSynthetic, collate  # noqa: E402
from vr_plugin import RegionFreezeCallback, find_decoder_layers  # noqa: E402
from vr_plugin.callback import optimizer_parameters  # noqa: E402
from vr_plugin.locate import numel  # noqa: E402


@dataclass
class Extra:
    model_dir: str = field(default="")
    result: str = field(default="")
    stage: int = field(default=2)
    spec: str = field(default="uniform_0.25")
    late: bool = field(default=False)


def main():
    extra, args = HfArgumentParser((Extra, TrainingArguments)).parse_args_into_dataclasses()
    args.deepspeed = {
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": extra.stage, "stage3_gather_16bit_weights_on_model_save": True},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": 0.0}},
    }
    args.__post_init__()  # builds the HF DeepSpeed config: ZeRO-3 partitions the model inside from_pretrained
    model = LlavaForConditionalGeneration.from_pretrained(extra.model_dir)
    model.model.vision_tower.requires_grad_(False)
    callback = RegionFreezeCallback(extra.spec)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=LlavaSynthetic(model.config, n=8),
        data_collator=collate,
        callbacks=None if extra.late else [callback],
    )
    if extra.late:
        trainer.add_callback(callback)
    trainer.train()
    held = optimizer_parameters(trainer.optimizer)
    report = {
        "plan_trainable": callback.plan.trainable,
        "plan_total": callback.plan.total,
        "held_numel": sum(numel(p) for p in held),
        "held_is_plan": {id(p) for p in held} == {id(p) for p in callback.plan.trainable_params},
        "engine_layers": find_decoder_layers(trainer.model_wrapped).name,
    }
    trainer.save_model(os.path.join(args.output_dir, "final"))
    with open(f"{extra.result}.{os.environ.get('RANK', '0')}.json", "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main()
