#!/usr/bin/env bash
# Reproduce the shipped BC-DPM prior (checkpoint/demo_prior.pt): simulate its training data,
# train it, tune BC-DPM's settings on the validation subjects and package it.
#   bash checkpoint/train_prior.sh [DATA_DIR] [RUN_DIR]
# demo_prior.pt is model002500.pt of the prior run (500 steps at a constant learning rate, then
# resumed with the learning rate annealed linearly to 0 at step 2,500), with BC-DPM's l, lambda,
# Gaussian sigma and hot-voxel mode tuned per noise level on the validation subjects.
# (The paired model once trained beside it on the same data was replaced by
# checkpoint/train_paired.sh's; its recipe is in the git history of this file.)
source "$(dirname "${BASH_SOURCE[0]}")/recipe_env.sh"
data="${1:-data/demo_train}"
runs="${2:-runs/demo}"

# Training subjects (train split only; seeds differ from the demo / validation / test subjects).
mpiexec -n 2 python scripts/make_dataset.py --out "$data/train_fdg" --subjects 16 --seed 100 \
  --tracers FDG --split 1 0 0
mpiexec -n 2 python scripts/make_dataset.py --out "$data/train_mix" --subjects 6 --seed 200 \
  --tracers PSMA DOTATATE FAPI --split 1 0 0
# Validation subjects (BC-DPM tuning here; the quality report's Gaussian sigma in checkpoint/README.md).
mpiexec -n 2 python scripts/make_dataset.py --out "$data/val" --subjects 2 --seed 800 \
  --tracers FDG PSMA --split 0 1 0

# Small 3D UNet, published block layout (scale-shift norm, res-block up/down-sampling, X/Y-only
# resampling, no attention), x0-prediction, full-plane axial slabs.
common=(--data_dir "$data" --voxel_mm 3.3 --patch_size 10 160 100 --batch_size 1
        --num_channels 24 --channel_mult 1,2,4 --num_res_blocks 1 --attention_resolutions ""
        --use_scale_shift_norm True --resblock_updown True --learn_sigma False
        --predict_xstart True --diffusion_steps 1000 --noise_schedule linear
        --lr 2e-4 --grad_clip 1.0 --ema_rate 0.999 --ema_warmup False --precision bf16
        --log_interval 50 --seed 0)
# The prior is trained on the low-noise end only (t < 200 of 1000): BC-DPM with --bc_start uses it
# in the last l of 100 respaced steps (t <= 10 * l), so that is where the training time goes.
prior=(--cond none --dims 3 --in_channels 1 --unet_layout published3d --threads 1
       --save_interval 250 --log_dir "$runs/prior" --schedule_sampler uniform:200)
python scripts/train.py "${prior[@]}" "${common[@]}" --max_steps 500
# Continued from model000500.pt with the learning rate decaying linearly to 0 at step 2500.
python scripts/train.py "${prior[@]}" "${common[@]}" --lr_anneal_steps 2500
# The prior is sampled on slabs of its training depth (10 slices): on deeper slabs its group
# norms see other statistics and its x0 estimate degrades. BC-DPM starts at step l from the
# diffused input (l = 3 where the tuning table below does not say otherwise).
prior_sampling='{"timestep_respacing": "100", "bc_start": true, "bc_steps": 3, "trained_max_t": 200,
  "patch_z": 10, "patch_overlap": 4}'
python scripts/package_checkpoint.py "$runs/prior/model002500.pt" --name demo_prior --sampling "$prior_sampling"
# BC-DPM's l, lambda, Gaussian-filter sigma and hot-voxel mode per noise level, tuned on the
# validation subjects (first subject, FDG and PSMA, a slab of 48 slices through liver, kidneys
# and lesions), recorded in the prior's sidecar (~12 min). A first grid (l 1 or 3, lambda 0 / 0.1
# / 0.3, sigma 1.5-10 mm, rescale pass) chose l = 1 at every DRF: checkpoint/README.md.
python scripts/tune_bcdpm.py --val "$data/val" --prior checkpoint/demo_prior.pt --max_subjects 1 \
  --z_range 120 168 --bc_steps 1 --lambdas 0 0.1 --sigmas_mm 1.5 2.25 3 4.5 6 10 \
  --hot_voxels rescale input --precision bf16 --threads 2 --seed 0 --out "$runs/bcdpm_tuning.json"
tuning=$(python -c "import json, sys; print(json.dumps({'bc_tuning': json.load(open(sys.argv[1]))['bc_tuning']}))" \
  "$runs/bcdpm_tuning.json")
python scripts/package_checkpoint.py "$runs/prior/model002500.pt" --name demo_prior \
  --sampling "$prior_sampling" --sampling "$tuning"
