#!/usr/bin/env bash
# Recipe (issue: a paired model that generalises), first stage: the diversified training data,
# then the v-prediction paired model (sqrt model space, no residual shortcut; not shipped, see
# checkpoint/README.md) and, beside it on the other core with half its steps, the supervised
# 3D U-Net baseline of the same size (one step, x0 as a residual on the low-dose input): its
# step-550 weights start checkpoint/train_paired.sh. 1,100 steps take about 46 min.
#   bash checkpoint/train_paired_v.sh [DATA_DIR] [RUN_DIR]
# Both runs resume from their log directories when rerun.
source "$(dirname "${BASH_SOURCE[0]}")/recipe_env.sh"
data="${1:-data}"
runs="${2:-runs}"
source checkpoint/paired_common.sh
mkdir -p "$runs"
python scripts/train.py "${common[@]}" --predict_v True --log_dir "$runs/paired_v" \
  --lr_anneal_steps "${PAIRED_STEPS:-1100}" > "$runs/paired_v.log" 2>&1 &
python scripts/train.py "${common[@]}" "${unet_flags[@]}" --log_dir "$runs/unet" \
  --lr_anneal_steps "$(( ${PAIRED_STEPS:-1100} / 2 ))" > "$runs/unet.log" 2>&1 &
wait
