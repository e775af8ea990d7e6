#!/usr/bin/env bash
# Reproduce the shipped demo checkpoints (checkpoint/demo_paired.pt, checkpoint/demo_prior.pt):
# simulate the training data, then train both models side by side (one core each).
#   bash checkpoint/train_demo_checkpoints.sh [DATA_DIR] [RUN_DIR]
# The shipped weights come from the run documented in checkpoint/README.md (same commands and
# wall-clock budgets: the paired model 33 min with 2 threads, the prior 50 min with 1 thread
# beside other jobs; the checkpoints used are listed there).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash scripts/setup_env.sh
export PATH="$repo/.venv/bin:$PATH"
data="${1:-data/demo_train}"
runs="${2:-runs/demo}"

# Training subjects (train split only; seeds differ from the demo / validation / test subjects).
mpiexec -n 2 python scripts/make_dataset.py --out "$data/train_fdg" --subjects 16 --seed 100 \
  --tracers FDG --split 1 0 0
mpiexec -n 2 python scripts/make_dataset.py --out "$data/train_mix" --subjects 6 --seed 200 \
  --tracers PSMA DOTATATE FAPI --split 1 0 0

# Small 3D UNet, published block layout (scale-shift norm, res-block up/down-sampling, X/Y-only
# resampling, no attention), x0-prediction for few-step sampling, full-plane axial slabs.
common=(--data_dir "$data" --voxel_mm 3.3 --patch_size 10 160 100 --batch_size 1
        --num_channels 24 --channel_mult 1,2,4 --num_res_blocks 1 --attention_resolutions ""
        --use_scale_shift_norm True --resblock_updown True --learn_sigma False
        --predict_xstart True --diffusion_steps 1000 --noise_schedule linear
        --lr 2e-4 --grad_clip 1.0 --ema_rate 0.999 --precision bf16
        --log_interval 50 --max_steps 100000 --seed 0)
# The paired model predicts x0 as a correction to the low-dose input (--predict_residual).
timeout 33m python scripts/train.py --cond paired --predict_residual True --threads 2 \
  --save_interval 200 --log_dir "$runs/paired" "${common[@]}" || [ $? -eq 124 ]
# The prior is trained on the low-noise end only (t < 200 of 1000): BC-DPM with --bc_start uses it
# in the last l of 100 respaced steps (t <= 10 * l), so that is where the training time goes.
timeout 50m python scripts/train.py --cond none --dims 3 --in_channels 1 --unet_layout published3d \
  --threads 1 --save_interval 250 --log_dir "$runs/prior" --schedule_sampler uniform:200 "${common[@]}" || [ $? -eq 124 ]
echo "latest checkpoints:"; ls -1t "$runs"/paired/model*.pt | head -1; ls -1t "$runs"/prior/model*.pt | head -1
