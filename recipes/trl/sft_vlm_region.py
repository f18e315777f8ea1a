"""Visual-region SFT of a vision-language model with TRL: ``trl/examples/scripts/sft_vlm.py`` plus the region.

Same flags as TRL's VLM SFT example (``ScriptArguments``, ``SFTConfig``, ``ModelConfig``; ``--config recipe.yaml``
works too), plus ``--visual_region`` (default ``uniform_0.25``), ``--projector_lr``, ``--tune_vision_tower`` and
``--layers_path``. Only the region's decoder layers and the multimodal projector train; with ``--use_peft`` LoRA
adapters go on the region layers only (``--lora_r``, ``--lora_alpha``, ``--lora_dropout``,
``--lora_target_modules`` keep their meaning), with ``--load_in_4bit`` / ``--load_in_8bit`` on a quantized LLM
whose projector, vision tower and lm_head stay in full precision (QLoRA). The region is checked against the
model's config before any weights load; the saved ``config.json`` (a LoRA adapter: ``visual_region.json``) records
it, and ``region_plan.json`` lists every trained tensor.

    # full-parameter region tuning (run from the vr_plugin checkout, or give the path to this file)
    accelerate launch --config_file trl/examples/accelerate_configs/deepspeed_zero3.yaml \\
        recipes/trl/sft_vlm_region.py \\
        --dataset_name HuggingFaceH4/llava-instruct-mix-vsft \\
        --model_name_or_path llava-hf/llava-1.5-7b-hf \\
        --visual_region uniform_0.25 --projector_lr 2e-5 \\
        --gradient_accumulation_steps 8 \\
        --output_dir LLaVA-1.5-7B-SFT-VR \\
        --dtype bfloat16

    # region LoRA: add
        --use_peft --lora_r 128 --lora_alpha 256 --learning_rate 2e-4 --projector_lr 2e-5
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class RegionArguments:
    """The visual region's flags (the rest are TRL's)."""

    visual_region: str = field(
        default="uniform_0.25",
        metadata={"help": "region spec: uniform_0.25, uniform_8, 1,5,9, ... (vr-plugin select --help)"},
    )
    projector_lr: Optional[float] = field(
        default=None, metadata={"help": "learning rate of the multimodal projector (default: --learning_rate)"}
    )
    tune_vision_tower: bool = field(default=False, metadata={"help": "train the vision tower too"})
    layers_path: Optional[str] = field(default=None, metadata={"help": "dotted path of the LLM decoder layers"})


def check_args(model_args: Any, region_args: RegionArguments) -> list:
    """Raise ``ValueError`` for bad flags, from the model's config only (no weights); returns the region layers."""
    from vr_plugin.region import check_region_spec

    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required (a model directory or hub id)")
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not model_args.use_peft:
        raise ValueError("--load_in_4bit / --load_in_8bit train LoRA adapters on a quantized base: add --use_peft")
    if (model_args.load_in_4bit or model_args.load_in_8bit) and model_args.dtype not in ("bfloat16", "auto", None):
        raise ValueError(
            f"--dtype {model_args.dtype} with a quantized base: TRL keeps QLoRA's trainable weights in bfloat16, "
            "so load in bfloat16 too (--dtype bfloat16)"
        )
    if region_args.projector_lr is not None and region_args.projector_lr <= 0:
        raise ValueError(f"--projector_lr must be > 0, got {region_args.projector_lr}")
    return check_region_spec(model_args.model_name_or_path, region_args.visual_region)


def load_model(model_args: Any, region_args: RegionArguments) -> Any:
    """The model, as TRL's example loads it; quantized through vr_plugin (full-precision projector) for QLoRA."""
    import torch
    from transformers import AutoModelForImageTextToText

    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    kwargs = dict(revision=model_args.model_revision, attn_implementation=model_args.attn_implementation)
    if model_args.load_in_4bit or model_args.load_in_8bit:
        from vr_plugin.quant import load_quantized

        kind = model_args.bnb_4bit_quant_type if model_args.load_in_4bit else "int8"
        dtype = torch.bfloat16 if dtype in ("auto", None) else dtype
        path, layers_path = model_args.model_name_or_path, region_args.layers_path
        return load_quantized(path, kind, dtype=dtype, layers_path=layers_path, **kwargs)
    return AutoModelForImageTextToText.from_pretrained(model_args.model_name_or_path, dtype=dtype, **kwargs)


def lora_options(model_args: Any) -> dict:
    """``region_lora_config`` options from TRL's ``--lora_*`` flags (targets: kinds within the region layers)."""
    options: dict = dict(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
    )
    targets = model_args.lora_target_modules
    if targets:
        options["target"] = "all-linear" if list(targets) == ["all-linear"] else list(targets)
    if model_args.lora_modules_to_save:
        options["modules_to_save"] = list(model_args.lora_modules_to_save)
    return options


def main(argv: Optional[list] = None) -> None:
    """Parse the flags, check the region, load, train only the region, save."""
    from datasets import load_dataset
    from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

    from vr_plugin.integrations.trl import RegionSFTTrainer, region_sft_kwargs

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, RegionArguments))
    script_args, training_args, model_args, region_args = parser.parse_args_and_config(args=argv)
    training_args.max_length = None  # as TRL's example: truncation could cut image tokens
    try:
        check_args(model_args, region_args)
    except ValueError as error:
        parser.error(str(error))

    model = load_model(model_args, region_args)
    dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    region = region_sft_kwargs(
        model,
        region_args.visual_region,
        lora=model_args.use_peft,
        tune_vision_tower=region_args.tune_vision_tower,
        layers_path=region_args.layers_path,
        **(lora_options(model_args) if model_args.use_peft else {}),
    )
    trainer = RegionSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        projector_lr=region_args.projector_lr,
        **region,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)


if __name__ == "__main__":
    main()
