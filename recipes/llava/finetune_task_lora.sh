#!/bin/bash
# vr_plugin recipe: the visual region for LoRA fine-tuning of LLaVA-1.5-13B on your own task data; LoRA only on the region layers.
#
# Mirrors LLaVA's scripts/v1_5/finetune_task_lora.sh (haotian-liu/LLaVA c121f04) flag for flag: same DeepSpeed config,
# data, learning rates, batch sizes and schedule. Run it from your LLaVA checkout, like the original.
# Changes (each checked by tests/test_recipes.py):
#   launcher      deepspeed --module vr_plugin.integrations.llava.train  (LLaVA's own train(), unmodified;
#                 flash_attention_2 where flash-attn is installed, as train_mem.py)
#   added         --visual_region uniform_0.25   (13B: 10 of 40 layers, 1,5,9,13,17,23,27,31,35,39;
#                 the paper used 9 layers on 13B: --visual_region uniform_9; 7B: 1,5,9,13,19,23,27,31)
#   --output_dir  ./checkpoints/llava-v1.5-13b-task-vr25-lora   (keeps 'llava' and 'lora' for LLaVA's model builder)

deepspeed --module vr_plugin.integrations.llava.train \
    --visual_region uniform_0.25 \
    --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \
    --deepspeed ./scripts/zero3.json \
    --model_name_or_path liuhaotian/llava-v1.5-13b \
    --version v1 \
    --data_path ./playground/data/llava_v1_5_mix665k.json \
    --image_folder ./playground/data \
    --vision_tower openai/clip-vit-large-patch14-336 \
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --bf16 True \
    --output_dir ./checkpoints/llava-v1.5-13b-task-vr25-lora \
    --num_train_epochs 1 \
    --per_device_train_batch_size 16 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 1 \
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
