#!/usr/bin/env bash
# Batch denoising with the 3D diffusion model on N MPI ranks.
#
#   ./test_DDPM_3d_mpi.sh                  # demo: simulate a low-dose whole-body phantom and
#                                          # denoise it with the shipped checkpoint -> results/demo/
#   BASE_SAMPLES=scans/ SAVE_DIR=out ./test_DDPM_3d_mpi.sh     # your own volumes
#   ./test_DDPM_3d_mpi.sh --num_ensemble 4 --cond_mode hybrid   # extra flags go to scripts/test.py
#
# Variables (environment):
#   NPROC         MPI ranks (default 2)
#   MODEL_PATH    checkpoint .pt (default: checkpoint/demo_paired.pt, with its .json flags)
#   BASE_SAMPLES  input file / directory / list (default: a simulated demo phantom)
#   SAVE_DIR      output directory (default results/demo)
#   COND_MODE     paired | bcdpm | hybrid (default paired; bcdpm uses checkpoint/demo_prior.pt)
#   STEPS         timestep respacing, e.g. ddim10 or 100 (default: the checkpoint's)
#   DEMO_SEED, DEMO_DRF, DEMO_TRACER   the simulated demo subject (default 2026, 10, FDG)
#   DEMO_FOV_MM   demo field of view "X Y Z" in mm (default: the generator's whole body)
#   MPIEXEC       launcher (default mpiexec from the environment; Open MPI as root may need
#                 MPIEXEC="mpiexec --allow-run-as-root --oversubscribe")
#   SKIP_SETUP=1  use the current python instead of the project's .venv
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$repo"

if [ "${SKIP_SETUP:-0}" != 1 ]; then
  bash scripts/setup_env.sh
  export PATH="${VENV:-$repo/.venv}/bin:$PATH"
fi
python="$(command -v python)"

NPROC="${NPROC:-2}"
SAVE_DIR="${SAVE_DIR:-results/demo}"
COND_MODE="${COND_MODE:-paired}"
MPIEXEC="${MPIEXEC:-mpiexec}"
if [ "$COND_MODE" = bcdpm ]; then default_model=checkpoint/demo_prior.pt; else default_model=checkpoint/demo_paired.pt; fi
MODEL_PATH="${MODEL_PATH:-$default_model}"

extra=()
if [ -z "${BASE_SAMPLES:-}" ]; then
  demo_seed="${DEMO_SEED:-2026}"; demo_drf="${DEMO_DRF:-10}"; demo_tracer="${DEMO_TRACER:-FDG}"
  data_dir="$SAVE_DIR/input"
  fov=()
  if [ -n "${DEMO_FOV_MM:-}" ]; then read -r -a fov_values <<< "$DEMO_FOV_MM"; fov=(--fov_mm "${fov_values[@]}"); fi
  echo "[demo] simulating a low-dose (DRF $demo_drf) $demo_tracer whole-body phantom (seed $demo_seed) in $data_dir"
  "$MPIEXEC" -n 1 "$python" scripts/make_dataset.py --out "$data_dir" --subjects 1 --seed "$demo_seed" \
    --drf "$demo_drf" --tracers "$demo_tracer" --split 0 0 1 "${fov[@]}"
  BASE_SAMPLES="$data_dir/s0000/s0000_${demo_tracer}_drf${demo_drf}.npz"
fi
if [ -n "${STEPS:-}" ]; then extra+=(--timestep_respacing "$STEPS"); fi

echo "[demo] denoising $BASE_SAMPLES on $NPROC rank(s) ($COND_MODE) with $MODEL_PATH"
"$MPIEXEC" -n "$NPROC" "$python" scripts/test.py --model_path "$MODEL_PATH" --base_samples "$BASE_SAMPLES" \
  --save_dir "$SAVE_DIR" --cond_mode "$COND_MODE" ${extra[@]+"${extra[@]}"} "$@"

name="$(basename "$BASE_SAMPLES")"; name="${name%.npz}"; name="${name%.nii.gz}"; name="${name%.nii}"
echo
echo "[demo] results in $SAVE_DIR/:"
ls -1 "$SAVE_DIR" | grep -E "^${name}" | sed 's/^/    /'
if [ -f "$SAVE_DIR/$name.png" ]; then echo "[demo] picture: $SAVE_DIR/$name.png"; fi
case "$BASE_SAMPLES" in
  *.npz)
    if "$python" -c "import numpy as np, sys; sys.exit(0 if np.load(sys.argv[1])['arr_0'].shape[0] > 1 else 1)" "$BASE_SAMPLES" 2>/dev/null; then
      echo "[demo] image quality against the full-dose image (low dose vs denoised):"
      "$python" scripts/evaluate.py --reference "$BASE_SAMPLES" --denoised "$BASE_SAMPLES" \
        --denoised "$SAVE_DIR/${name}_denoised.npz" --method low_dose --method denoised \
        --json "$SAVE_DIR/${name}_metrics.json" --markdown "$SAVE_DIR/${name}_metrics.md" >/dev/null
      cat "$SAVE_DIR/${name}_metrics.md"
    fi
    ;;
esac
