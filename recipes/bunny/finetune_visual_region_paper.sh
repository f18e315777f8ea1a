#!/bin/bash
# vr_plugin recipe: the paper's published setting (arXiv 2412.12785, ACL 2025) for Bunny-Llama-3-8B-V.
#
# Mirrors Bunny's script/train/finetune_lora.sh (BAAI-DCAI/Bunny 08273ac) with the settings of the paper's own
# script/train/finetune_visual_region.sh (SiyuanWangw/Visual-Region 08faeae, whose line continuations are broken
# as committed): LoRA r=128, alpha=256 on layers 1,5,9,13,19,23,27,31 of Llama-3-8B only, lr 2e-4, projector lr
# 2e-5, ZeRO-3, 8 GPUs x 8 per device x 2 accumulation = 128, bf16 + tf32, 1 epoch, cosine, warmup 0.03.
# Run it from your Bunny checkout with the public stage-1 projector BoyaWu10/bunny-pretrain-llama3-8b-siglip.
# Changes (each checked by tests/test_recipes.py):
#   launcher      deepspeed --module vr_plugin.integrations.bunny.train
#   added         --tune_layers 1,5,9,13,19,23,27,31   (the paper code's --layer_selection; = uniform_0.25 here)
#   MODEL_TYPE    llama3-8b, --version llama (Bunny's README for Llama-3)
#   paths         Meta-Llama-3-8B-Instruct, siglip-so400m-patch14-384, the stage-1 projector above
#   OUTPUT_DIR    bunny-lora-vr-paper-llama3-8b

MODEL_TYPE=llama3-8b
OUTPUT_DIR=bunny-lora-vr-paper-$MODEL_TYPE

mkdir -p ./checkpoints-$MODEL_TYPE/$OUTPUT_DIR

deepspeed --module vr_plugin.integrations.bunny.train \
    --tune_layers 1,5,9,13,19,23,27,31 \
    --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \
    --deepspeed ./script/deepspeed/zero3.json \
    --model_name_or_path /path/to/Meta-Llama-3-8B-Instruct \
    --model_type $MODEL_TYPE \
    --version llama \
    --data_path ./data/finetune/bunny_695k.json \
    --image_folder ./data/finetune/images \
    --vision_tower /path/to/siglip-so400m-patch14-384 \
    --pretrain_mm_mlp_adapter /path/to/bunny-pretrain-llama3-8b-siglip/mm_projector.bin \
    --mm_projector_type mlp2x_gelu \
    --image_aspect_ratio pad \
    --group_by_modality_length False \
    --bf16 True \
    --output_dir ./checkpoints-$MODEL_TYPE/$OUTPUT_DIR \
    --num_train_epochs 1 \
    --per_device_train_batch_size 8 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 2 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 500 \
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
    --report_to none | tee 2>&1 ./checkpoints-$MODEL_TYPE/$OUTPUT_DIR/log.txt
