#!/bin/bash
# vr_plugin recipe: QLoRA on the visual region of Bunny-Llama-3-8B-V on ONE 24 GB GPU (RTX 3090 / 4090 / A5000).
#
# Mirrors Bunny's script/train/finetune_lora.sh (BAAI-DCAI/Bunny 08273ac) for data, LoRA rank, learning rates and
# schedule. Run it from your Bunny checkout. Bunny's train() passes load_in_4bit together with a quantization_config,
# which transformers accepts only before 4.44: use Bunny with transformers 4.38-4.43 for --bits 4.
# Changes (each checked by tests/test_recipes.py):
#   launcher      deepspeed --num_gpus 1 --module vr_plugin.integrations.bunny.train
#   added         --visual_region uniform_0.25   (8 of Llama-3-8B's 32 layers: 1,5,9,13,19,23,27,31; LoRA only there)
#   added         --bits 4                       (nf4, double quant: Bunny's defaults --quant_type / --double_quant)
#   MODEL_TYPE    from the environment, default llama3-8b (the paper's main model); --version follows it
#   --deepspeed   ./script/deepspeed/zero2.json  (one GPU: nothing to shard; 4-bit weights do not go with ZeRO-3)
#   batch         4 per step x 32 accumulation = 128, the original global batch (8 x 2 x 8 GPUs)
#   OUTPUT_DIR    bunny-lora-vr25-qlora-$MODEL_TYPE   (keeps 'lora' for Bunny's model builder)

MODEL_TYPE=${MODEL_TYPE:-llama3-8b}
case $MODEL_TYPE in
    phi-3) VERSION=phi3 ;;
    minicpm) VERSION=minicpm ;;
    llama3-8b) VERSION=llama ;;
    *) VERSION=bunny ;;
esac

PRETRAIN_DIR=bunny-$MODEL_TYPE-pretrain
OUTPUT_DIR=bunny-lora-vr25-qlora-$MODEL_TYPE

mkdir -p ./checkpoints-$MODEL_TYPE/$OUTPUT_DIR

deepspeed --num_gpus 1 --module vr_plugin.integrations.bunny.train \
    --visual_region uniform_0.25 \
    --bits 4 \
    --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \
    --deepspeed ./script/deepspeed/zero2.json \
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
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 32 \
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
