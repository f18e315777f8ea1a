#!/bin/bash
# vr_plugin recipe: evaluate a region-tuned checkpoint with lmms-eval, pruned outside its visual region in memory.
#
# Mirrors the llava_hf example of lmms-eval 0.7.3 (lmms_eval/models/simple/llava_hf.py's docstring):
#   accelerate launch --num_processes=8 --main_process_port 12345 -m lmms_eval --model llava_hf \
#       --model_args pretrained=llava-hf/llava-1.5-7b-hf --tasks seedbench --batch_size 1 --output_path ./logs/ --log_samples
# Changes:
#   launcher      -m vr_plugin.integrations.lmms_eval (registers vr_pruned, then runs lmms-eval's own CLI)
#   --model       vr_pruned (lmms-eval's llava_hf, its model pruned by vr_plugin.prune.prune_outside_region)
#   --model_args  pretrained=$MODEL (a vr-plugin train output), scores=$SCORES, remove=$REMOVE (vr-plugin prune's
#                 flags; layers=2;3 instead of scores/remove)
#   before it     vr-plugin score writes $SCORES once (calibration prompts of your data)
# Run it where lmms-eval and vr_plugin are installed (pip install lmms-eval==0.7.3 && pip install -e vr_plugin).

MODEL=${MODEL:-./runs/vr}
SCORES=${SCORES:-$MODEL/scores.json}
REMOVE=${REMOVE:-4}
TASKS=${TASKS:-seedbench}
CALIBRATION=${CALIBRATION:-./playground/data/calibration.json}
IMAGES=${IMAGES:-./playground/data}
NUM_PROCESSES=${NUM_PROCESSES:-8}

[ -f "$SCORES" ] || vr-plugin score --model "$MODEL" --data "$CALIBRATION" --images "$IMAGES" --out "$SCORES"

accelerate launch --num_processes=$NUM_PROCESSES --main_process_port 12345 -m vr_plugin.integrations.lmms_eval \
    --model vr_pruned \
    --model_args pretrained=$MODEL,scores=$SCORES,remove=$REMOVE \
    --tasks $TASKS \
    --batch_size 1 \
    --output_path ./logs/ \
    --log_samples
