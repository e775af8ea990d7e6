# Shared by checkpoint/train_paired*.sh (sourced, with $data set): the diversified training
# data and the training flags of the 16-channel paired models and the U-Net baseline.
# 80 training and 6 validation subjects: every anatomy class and tracer, randomised scans,
# MLEM-100 without PSF and 1.65 mm voxels held out (about 20 + 3 min on 2 ranks).
source checkpoint/paired_randomised.sh
make_randomised "$data/gd_train" 80 300 --split 1 0 0
make_randomised "$data/gd_val" 6 301 --split 0 1 0

# 16 channels and 16x48x48 patches: 2.5 s per step on one AVX2 core in fp32 (BENCHMARKS.md).
common=(--cond paired --data_dir "$data/gd_train" --voxel_mm 3.3 --patch_size 16 48 48
        --batch_size 2 --num_channels 16 --channel_mult 1,2,4 --num_res_blocks 1
        --attention_resolutions "" --use_scale_shift_norm True --resblock_updown True
        --learn_sigma False --normalisation sqrt --diffusion_steps 1000 --noise_schedule linear
        --lr 2e-4 --grad_clip 1.0 --ema_rate 0.999 --ema_warmup False --precision auto --threads 1
        --log_interval 50 --save_interval 200 --seed 0
        --val_dir "$data/gd_val" --val_interval 600 --val_patches 4)
unet_flags=(--regression True --predict_xstart True --predict_residual True)
# the model card's dataset record (scripts/package_checkpoint.py --training_data)
training_data='{"generator": "scripts/make_dataset.py", "description": "80 randomised subjects (seed 300): whole body, head and dead-leaves anatomy, FDG/PSMA/DOTATATE/FAPI, random OSEM/MLEM reconstructions with and without PSF, post-filters, 2D / SSRB, native voxels 2-4 mm resampled to 3.3 mm, 3 DRFs per subject in 2-200; MLEM 100 without PSF and 1.65 mm held out: 240 low/full pairs",
 "commands": ["mpiexec -n 2 python scripts/make_dataset.py --out data/gd_train --subjects 80 --seed 300 --randomise --anatomies whole_body brain dead_leaves --detail --tracers FDG PSMA DOTATATE FAPI --hold_out mlem100_nopsf 1.65 --split 1 0 0"]}'

