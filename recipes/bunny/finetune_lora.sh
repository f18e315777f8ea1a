#!/bin/bash
# vr_plugin recipe: the visual region for Bunny's LoRA visual instruction tuning, any backbone; LoRA only on the region.
#
# Mirrors Bunny's script/train/finetune_lora.sh (BAAI-DCAI/Bunny 08273ac) flag for flag: same DeepSpeed config, data,
# learning rate, batch sizes and schedule. Run it from your Bunny checkout, like the original.
# Changes (each checked by tests/test_recipes.py):
#   launcher      deepspeed --module vr_plugin.integrations.bunny.train  (Bunny's own train(), unmodified)
#   added         --visual_region uniform_0.25   (32-layer backbones: 1,5,9,13,19,23,27,31; vr-plugin select shows others)
#   MODEL_TYPE    from the environment (default phi-2, as the original): MODEL_TYPE=llama3-8b bash finetune_lora.sh
#   --version     follows MODEL_TYPE as Bunny's README requires: phi-3 -> phi3, minicpm -> minicpm,
#                 llama3-8b -> llama, the others -> bunny (the original hard-codes bunny)
#   OUTPUT_DIR    bunny-lora-vr25-$MODEL_TYPE   (keeps 'lora' for Bunny's model builder)

MODEL_TYPE=${MODEL_TYPE:-phi-2}
case $MODEL_TYPE in
    phi-3) VERSION=phi3 ;;
    minicpm) VERSION=minicpm ;;
    llama3-8b) VERSION=llama ;;
    *) VERSION=bunny ;;
esac

PRETRAIN_DIR=bunny-$MODEL_TYPE-pretrain
OUTPUT_DIR=bunny-lora-vr25-$MODEL_TYPE

mkdir -p ./checkpoints-$MODEL_TYPE/$OUTPUT_DIR

deepspeed --module vr_plugin.integrations.bunny.train \
    --visual_region uniform_0.25 \
    --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \
    --deepspeed ./script/deepspeed/zero3.json \
    --model_name_or_path /path/to/base_llm_model \
    --model_type $MODEL_TYPE \
    --version $VERSION \
    --data_path ./data/finetune/bunny_695k.json \
    --image_folder ./data/finetune/images \
    --vision_tower /path/to/siglip-so400m-patch14-384 \
    --pretrain_mm_mlp_adapter ./checkpoints-pretrain/$PRETRAIN_DIR/mm_projector.bin \
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
