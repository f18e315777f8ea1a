#!/bin/bash
# vr_plugin recipe: QLoRA on the visual region of LLaVA-1.5-7B on ONE 24 GB GPU (RTX 3090 / 4090 / A5000).
#
# Mirrors LLaVA's scripts/v1_5/finetune_lora.sh (haotian-liu/LLaVA c121f04) for data, template, LoRA rank,
# learning rates and schedule, with the 4-bit base of LLaVA's scripts/finetune_qlora.sh. Run it from your LLaVA
# checkout. transformers 4.37 (LLaVA's pin) is needed for --bits: transformers >= 4.44 rejects how LLaVA's train()
# passes load_in_4bit together with a quantization_config.
# Changes (each checked by tests/test_recipes.py):
#   launcher      deepspeed --num_gpus 1 --module vr_plugin.integrations.llava.train
#   added         --visual_region uniform_0.25   (8 of 32 layers: 1,5,9,13,19,23,27,31, LoRA only there)
#   added         --bits 4                        (nf4, double quant: LLaVA's defaults --quant_type / --double_quant)
#   --deepspeed   ./scripts/zero2.json            (one GPU: nothing to shard; ZeRO-2 as in finetune_qlora.sh)
#   --model_name_or_path lmsys/vicuna-7b-v1.5, --pretrain_mm_mlp_adapter of the 7B pretrain
#   batch         4 per step x 32 accumulation = 128, the original global batch (16 x 8 GPUs)
#   --output_dir  ./checkpoints/llava-v1.5-7b-vr25-qlora   (keeps 'llava' and 'lora' for LLaVA's model builder)

deepspeed --num_gpus 1 --module vr_plugin.integrations.llava.train \
    --visual_region uniform_0.25 \
    --bits 4 \
    --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \
    --deepspeed ./scripts/zero2.json \
    --model_name_or_path lmsys/vicuna-7b-v1.5 \
    --version v1 \
    --data_path ./playground/data/llava_v1_5_mix665k.json \
    --image_folder ./playground/data \
    --vision_tower openai/clip-vit-large-patch14-336 \
    --pretrain_mm_mlp_adapter ./checkpoints/llava-v1.5-7b-pretrain/mm_projector.bin \
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --bf16 True \
    --output_dir ./checkpoints/llava-v1.5-7b-vr25-qlora \
    --num_train_epochs 1 \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 32 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 50000 \
    --save_total_limit 1 \
    --learning_rate 2e-4 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --tf32 True \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to wandb
