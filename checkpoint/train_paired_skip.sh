#!/usr/bin/env bash
# Recipe of the paired diffusion model's third stage, the posterior sampler (the shipped
# checkpoint/demo_paired.pt until 2026-12-07 late; now the start of checkpoint/train_paired_noisy.sh,
# which ships its interpolation with a fourth stage). Packaged as $RUN_DIR/demo_paired_stage3.pt.
# It starts from the second stage's residual x0 model (checkpoint/train_paired.sh, run here when absent; $INIT overrides, e.g. the previous release of
# checkpoint/demo_paired.pt, which holds those weights) and trains on with its x0 estimate
# blended with x_t by noise level (--x0_skip_sigma 0.025: x0 = c x_t / sqrt(abar) + (1 - c) model,
# c = s^2 / (s^2 + 1 / abar - 1); half x_t at t ~ 5 of 1000, under 5 % above t ~ 30). The second
# stage's model ignored x_t, so its ensemble members were identical; s is the typical error of
# its estimate (model units), so the blend alone starts as a linear posterior sampler around it
# (on validation volumes s = 0.02 under-disperses an ensemble, 0.035 over-disperses it: BENCHMARKS.md),
# and training teaches the model where the error is larger or smaller. Half the training draws
# at t < 150, lr 1e-4 annealed to 0, bf16 autocast with fp32 master weights, one core.
#   bash checkpoint/train_paired_skip.sh [DATA_DIR] [RUN_DIR]
# Resumes from its log directory when rerun.
source "$(dirname "${BASH_SOURCE[0]}")/recipe_env.sh"
data="${1:-data}"
runs="${2:-runs}"
init="${INIT:-$runs/demo_paired_stage2.pt}"
[ -e "$init" ] || bash checkpoint/train_paired.sh "$data" "$runs"
source checkpoint/paired_randomised.sh
steps="${SKIP_STEPS:-9000}"
# the first 40 training subjects of the seed-300 set (subject i depends only on (seed, i)) and 4
# validation subjects: 10 + 1 min on 2 ranks
make_randomised "$data/gd_train40" 40 300 --split 1 0 0
make_randomised "$data/gd_val4" 4 301 --split 0 1 0
skip=("${sampler_flags[@]}" --data_dir "$data/gd_train40" --val_dir "$data/gd_val4" --lr 1e-4
      --lr_anneal_steps "$steps" --save_interval 250 --seed 2)
python scripts/train.py "${skip[@]}" --init_from "$init" --log_dir "$runs/paired_skip" > "$runs/paired_skip.log" 2>&1
# one member: the posterior-mean estimate in one evaluation at t = 999; ensembles: posterior
# samples, ancestral with the posterior variance on 10 log-spaced steps (checkpoint/README.md)
training_data='{"generator": "scripts/make_dataset.py", "description": "stage 3 (posterior sampler, x0 blended with x_t): the first 40 of the 80 randomised subjects of stages 1-2 (seed 300): whole body, head and dead-leaves anatomy, FDG/PSMA/DOTATATE/FAPI, random OSEM/MLEM reconstructions with and without PSF, post-filters, 2D / SSRB, native voxels 2-4 mm resampled to 3.3 mm, 3 DRFs per subject in 2-200: 120 low/full pairs; MLEM 100 without PSF and 1.65 mm held out. Stages 1-2 (the start): 80 subjects, 240 pairs (checkpoint/train_paired.sh)", "commands": ["mpiexec -n 2 python scripts/make_dataset.py --out data/gd_train40 --subjects 40 --seed 300 --randomise --anatomies whole_body brain dead_leaves --detail --tracers FDG PSMA DOTATATE FAPI --hold_out mlem100_nopsf 1.65 --split 1 0 0"], "reproduce": "bash checkpoint/train_paired_skip.sh"}'
package=(python scripts/package_checkpoint.py "$runs/paired_skip/ema_0.999_$(printf %06d "$steps").pt"
         --name demo_paired_stage3 --dest "$runs" --flags '{"sigma_small": true}' --training_data "$training_data"
         --sampling '{"timestep_respacing": "log2@999", "ensemble_respacing": "log10", "patch_overlap": 4}')
"${package[@]}"
# the ensembles' std pooling and blend width per input: the smallest s that calibrates a 4-member
# ensemble on each validation volume, fitted against the input's noise index (50 min on one
# core), into the sidecar
tune_ensembles "$runs/demo_paired_stage3.pt" "$runs/spread_tuning.json"
