#!/usr/bin/env bash
# `pip install -e .` in a fresh virtual environment, then import the package and run
# `scripts/test.py --help` from outside the checkout: what a notebook user does.
#
#   bash scripts/check_install.sh          # TORCH_SPEC as in setup_env.sh (default torch==2.13.0)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
"$python" -m venv "$scratch/venv"
pip=("$scratch/venv/bin/python" -m pip install --quiet)
"${pip[@]}" "$torch_spec"            # first: a plain `torch` requirement would fetch a CUDA build
"${pip[@]}" -e "$repo"
cd "$scratch"
"$scratch/venv/bin/python" -c "import guided_diffusion, guided_diffusion.sampling.settings, guided_diffusion.evaluation.metrics; print('[check_install] import guided_diffusion: ok')"
"$scratch/venv/bin/python" "$repo/scripts/test.py" --help > /dev/null
echo "[check_install] pip install -e . and scripts/test.py --help: ok"
