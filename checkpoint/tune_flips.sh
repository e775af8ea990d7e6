#!/usr/bin/env bash
# The test-time flips of a shipped paired checkpoint or U-Net (sourced by the checkpoint/train_paired*.sh
# recipes, with $data and $runs set): the cheapest of none / x / xy / zxy within 0.05 dB of the best
# one-member PSNR on 12 validation volumes (4 subjects of seed 301 x 3 DRFs, slices 16-48; 2.5 min
# on 2 threads), merged into its sidecar (sampling.flips).
#   tune_flips CHECKPOINT RESPACING
tune_flips() {
  local checkpoint="$1" respacing="$2" name
  name="$(basename "$checkpoint" .pt)"
  source checkpoint/paired_randomised.sh
  make_randomised "$data/gd_val4" 4 301 --split 0 1 0
  python scripts/tune_sampler.py --val "$data/gd_val4" --paired "$checkpoint" --respacings "$respacing" \
    --flip_options none x xy zxy --members 2 --z_range 16 48 --threads 2 --precision bf16 --seed 0 \
    --out "$runs/flips_$name.json"
  local flips
  flips="$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["rows"][0]["flips"])' "$runs/flips_$name.json")"
  python scripts/package_checkpoint.py "$checkpoint" --update --sampling "{\"flips\": \"$flips\"}"
}
