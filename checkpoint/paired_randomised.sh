# The randomised scans of the paired models' training and validation data (scripts/make_dataset.py
# flags; sourced by checkpoint/paired_common.sh, train_paired_skip.sh, train_paired_noisy.sh and
# tune_flips.sh): every anatomy class and tracer, MLEM 100 without PSF and 1.65 mm voxels held
# out; make_randomised makes such a dataset unless it is there; sampler_flags are the training
# flags shared by the posterior sampler's stages 3 and 4; tune_ensembles fits its ensembles.
randomised=(--randomise --anatomies whole_body brain dead_leaves --detail
            --tracers FDG PSMA DOTATATE FAPI --hold_out mlem100_nopsf 1.65)

# make_randomised OUT SUBJECTS SEED [make_dataset.py flags...], on 2 ranks
make_randomised() {
  local out="$1" subjects="$2" seed="$3"
  shift 3
  [ -e "$out/manifest.json" ] || mpiexec -n 2 python scripts/make_dataset.py --out "$out" \
    --subjects "$subjects" --seed "$seed" "${randomised[@]}" "$@"
}

sampler_flags=(--cond paired --voxel_mm 3.3 --patch_size 16 48 48
               --batch_size 2 --num_channels 16 --channel_mult 1,2,4 --num_res_blocks 1 --attention_resolutions ""
               --use_scale_shift_norm True --resblock_updown True --learn_sigma False --normalisation sqrt
               --diffusion_steps 1000 --noise_schedule linear --predict_xstart True --predict_residual True
               --x0_skip_sigma 0.025 --schedule_sampler low:150:0.5
               --grad_clip 1.0 --ema_rate 0.999 --precision bf16 --threads 1 --log_interval 50
               --val_interval 1000 --val_patches 4)

# tune_ensembles CHECKPOINT OUT_JSON [tune_spread.py flags...]: on the validation subjects of
# $data/gd_val4, how far to pool a 4-member ensemble's variance and the blend width per input
# that makes its std match the error of its image, recorded in CHECKPOINT's sidecar
tune_ensembles() {
  local checkpoint="$1" out="$2"
  shift 2
  python scripts/tune_spread.py --val "$data/gd_val4" --paired "$checkpoint" --sigmas 0.005 0.01 0.02 0.04 0.08 \
    --std_fwhms_mm 0 4 8 12 16 --members 4 --z_range 8 56 --threads 1 --precision bf16 --seed 0 --out "$out" "$@"
  python scripts/package_checkpoint.py "$checkpoint" --update --sampling "$(python -c "import json, sys
d = json.load(open(sys.argv[1]))
print(json.dumps({key: d[key] for key in ('ensemble_spread', 'std_fwhm_mm')}))" "$out")"
}
