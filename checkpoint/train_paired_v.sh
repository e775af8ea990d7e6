#!/usr/bin/env bash
# Recipe (issue: a paired model that generalises): the diversified training data, then the
# v-prediction paired model (sqrt model space, no residual shortcut) and, beside it on the other
# core with half its steps, the supervised 3D U-Net baseline of the same size (one step, x0 as a
# residual on the low-dose input). 16 channels and 16x48x48 patches: 2.5 s per step on one
# AVX2 core in fp32 (BENCHMARKS.md), so 1,100 steps take about 46 min.
#   bash checkpoint/train_paired_v.sh [DATA_DIR] [RUN_DIR]
# Both runs resume from their log directories when rerun.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash scripts/setup_env.sh
export PATH="$repo/.venv/bin:$PATH"
data="${1:-data}"
runs="${2:-runs}"

# 80 training and 6 validation subjects: every anatomy class and tracer, randomised scans,
# MLEM-100 without PSF and 1.65 mm voxels held out (about 20 + 3 min on 2 ranks).
randomised=(--randomise --anatomies whole_body brain dead_leaves --detail
            --tracers FDG PSMA DOTATATE FAPI --hold_out mlem100_nopsf 1.65)
[ -e "$data/gd_train/manifest.json" ] || mpiexec -n 2 python scripts/make_dataset.py --out "$data/gd_train" \
  --subjects 80 --seed 300 "${randomised[@]}" --split 1 0 0
[ -e "$data/gd_val/manifest.json" ] || mpiexec -n 2 python scripts/make_dataset.py --out "$data/gd_val" \
  --subjects 6 --seed 301 "${randomised[@]}" --split 0 1 0
mkdir -p "$runs"

common=(--cond paired --data_dir "$data/gd_train" --voxel_mm 3.3 --patch_size 16 48 48
        --batch_size 2 --num_channels 16 --channel_mult 1,2,4 --num_res_blocks 1
        --attention_resolutions "" --use_scale_shift_norm True --resblock_updown True
        --learn_sigma False --normalisation sqrt --diffusion_steps 1000 --noise_schedule linear
        --lr 2e-4 --grad_clip 1.0 --ema_rate 0.999 --precision auto --threads 1
        --log_interval 50 --save_interval 200 --seed 0
        --val_dir "$data/gd_val" --val_interval 600 --val_patches 4)
python scripts/train.py "${common[@]}" --predict_v True --log_dir "$runs/paired_v" \
  --lr_anneal_steps "${PAIRED_STEPS:-1100}" > "$runs/paired_v.log" 2>&1 &
python scripts/train.py "${common[@]}" --regression True --predict_xstart True --predict_residual True --log_dir "$runs/unet" \
  --lr_anneal_steps "$(( ${PAIRED_STEPS:-1100} / 2 ))" > "$runs/unet.log" 2>&1 &
wait
# Ship the U-Net's raw step-550 weights (the v-prediction model is not shipped: checkpoint/README.md);
# the sidecar's training_data description, commands and reproduce entries were then added by hand.
python scripts/package_checkpoint.py "$runs/unet/model$(printf %06d $(( ${PAIRED_STEPS:-1100} / 2 ))).pt" --name demo_unet
