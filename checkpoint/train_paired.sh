#!/usr/bin/env bash
# Recipe of the U-Net baseline (checkpoint/demo_unet.pt) and the second stage of the paired
# diffusion model (packaged as $RUN_DIR/demo_paired_stage2.pt, the shipped demo_paired.pt until
# 2026-12-07; checkpoint/train_paired_skip.sh trains the shipped model from it). Both start from the step-550 U-Net of
# checkpoint/train_paired_v.sh (run here when absent; $INIT overrides, e.g. an earlier release
# of demo_unet.pt, which holds those weights):
#   - the diffusion model: x0 prediction as a residual on the low-dose input, t uniform over
#     1000 linear steps, its x_t input weights zeroed at the start (checkpoints.warm_start), so
#     it starts as the U-Net and learns to use x_t: PAIRED_STEPS (default 3600) steps;
#   - the U-Net, trained on with at most half the diffusion model's total budget:
#     UNET_STEPS (default 1500) steps, 550 + 1500 against 550 + 3600.
# One core each, side by side (0.9 s per step on this run's AVX2 machine). Both resume from their log directories.
#   bash checkpoint/train_paired.sh [DATA_DIR] [RUN_DIR]
source "$(dirname "${BASH_SOURCE[0]}")/recipe_env.sh"
data="${1:-data}"
runs="${2:-runs}"
init="${INIT:-$runs/unet/model000550.pt}"
[ -e "$init" ] || PAIRED_STEPS=1100 bash checkpoint/train_paired_v.sh "$data" "$runs"
source checkpoint/paired_common.sh
paired_steps="${PAIRED_STEPS:-3600}"; unet_steps="${UNET_STEPS:-1500}"
python scripts/train.py "${common[@]}" --predict_xstart True --predict_residual True \
  --init_from "$init" --log_dir "$runs/paired_x0" --lr_anneal_steps "$paired_steps" \
  > "$runs/paired_x0.log" 2>&1 &
python scripts/train.py "${common[@]}" "${unet_flags[@]}" --init_from "$init" \
  --log_dir "$runs/unet_long" --lr_anneal_steps "$unet_steps" > "$runs/unet_long.log" 2>&1 &
wait
paired="$runs/paired_x0/model$(printf %06d "$paired_steps").pt"
# the sampler default: the cheapest respacing within 0.05 dB of the best one-member PSNR on the
# validation subjects (4-member ensembles)
python scripts/tune_sampler.py --val "$data/gd_val" --paired "$paired" --respacings ddim5 ddim10 10 \
  --members 4 --z_range 8 56 --threads 2 --out "$runs/sampler_paired.json"
respacing="$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["rows"][0]["respacing"])' \
  "$runs/sampler_paired.json")"
# slabs of the training depth (16) overlapping by 4: on the validation subjects 0.02-0.03 dB below
# an overlap of 8 at 0.7x the time (checkpoint/README.md)
python scripts/package_checkpoint.py "$paired" --name demo_paired_stage2 --dest "$runs" --training_data "$training_data" \
  --sampling "{\"timestep_respacing\": \"$respacing\", \"patch_overlap\": 4}" \
  --training_data '{"reproduce": "bash checkpoint/train_paired.sh"}'
python scripts/package_checkpoint.py "$runs/unet_long/model$(printf %06d "$unet_steps").pt" --name demo_unet \
  --training_data "$training_data" --training_data '{"reproduce": "bash checkpoint/train_paired.sh"}'
source checkpoint/tune_flips.sh
tune_flips checkpoint/demo_unet.pt ""
