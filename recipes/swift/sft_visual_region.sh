#!/usr/bin/env bash
# Mirrors ms-swift's examples/train/multimodal/ocr.sh (ms-swift 4.6) flag for flag.
# Changes:
#   - `swift sft` -> `python -m vr_plugin.integrations.swift sft --visual_region "$REGION"` (checks the region against
#     the model's config.json and the flags before any weights load, then runs swift's own `swift sft`);
#   - the model is LLaVA-1.5-7B-hf (`--model_type llava1_5_hf`) instead of Qwen2.5-VL-7B (drops MAX_PIXELS);
#   - `--freeze_aligner false`: the projector trains beside the region, as in the paper (swift's default freezes it);
#     `--freeze_vit true` is kept: the vision tower stays frozen;
#   - TUNER=full|lora (default lora); full uses lr 1e-5 and no LoRA flags. With lora the launcher adds
#     `--target_regex` for the region layers' linear modules (never vision blocks).
# Refused beside the region (the region decides which LLM layers train): --freeze_llm, --freeze_parameters*,
# --trainable_parameters*, --target_regex.
# Usage: TUNER=full REGION=uniform_0.25 bash sft_visual_region.sh [more swift sft flags]
set -euo pipefail
TUNER=${TUNER:-lora}
REGION=${REGION:-uniform_0.25}
MODEL=${MODEL:-llava-hf/llava-1.5-7b-hf}
if [ "$TUNER" = lora ]; then
    TUNER_FLAGS=(--learning_rate 1e-4 --lora_rank 8 --lora_alpha 32 --target_modules all-linear)
else
    TUNER_FLAGS=(--learning_rate 1e-5)
fi

CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} \
python -m vr_plugin.integrations.swift sft --visual_region "$REGION" \
    --model "$MODEL" \
    --model_type llava1_5_hf \
    --dataset 'AI-ModelScope/LaTeX_OCR:human_handwrite#20000' \
    --load_from_cache_file true \
    --split_dataset_ratio 0.01 \
    --tuner_type "$TUNER" \
    --torch_dtype bfloat16 \
    --num_train_epochs 1 \
    --per_device_train_batch_size 1 \
    --per_device_eval_batch_size 1 \
    "${TUNER_FLAGS[@]}" \
    --freeze_vit true \
    --freeze_aligner false \
    --gradient_accumulation_steps 16 \
    --eval_steps 50 \
    --save_steps 50 \
    --save_total_limit 2 \
    --logging_steps 5 \
    --max_length 4096 \
    --output_dir "output/vr-$TUNER" \
    --warmup_ratio 0.05 \
    --dataloader_num_workers 4 \
    "$@"
