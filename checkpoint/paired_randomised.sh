# The randomised scans of the paired models' training and validation data (scripts/make_dataset.py
# flags; sourced by checkpoint/paired_common.sh and checkpoint/train_paired_skip.sh): every
# anatomy class and tracer, MLEM 100 without PSF and 1.65 mm voxels held out.
randomised=(--randomise --anatomies whole_body brain dead_leaves --detail
            --tracers FDG PSMA DOTATATE FAPI --hold_out mlem100_nopsf 1.65)
