#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything the toolkit needs.
#
#   bash scripts/setup_env.sh            # .venv in the repository root
#
# Environment overrides:
#   VENV=/path/to/venv       where to put the environment (default: <repo>/.venv)
#   PYTHON=python3.11        interpreter used to create it (default: python3)
#   TORCH_SPEC="torch==2.13.0"  the torch requirement installed first. The default is a CPU build;
#                            on a GPU machine use e.g. TORCH_SPEC="torch==2.13.0" with
#                            PIP_INDEX_URL/PIP_EXTRA_INDEX_URL pointing at the CUDA wheels you want.
# The script is idempotent: it re-installs only when requirements.txt or TORCH_SPEC changed.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
stamp="$venv/.toolkit-installed"
want="$(cat "$repo/requirements.txt" "$repo/pyproject.toml"; echo "$torch_spec")"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment in $venv"
  "$python" -m venv "$venv"
fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing $torch_spec, requirements.txt and the toolkit (pip install -e .) (first run takes a few minutes)"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "$torch_spec"
"$venv/bin/python" -m pip install --quiet -r "$repo/requirements.txt"
# the toolkit itself, editable (scripts and notebooks import guided_diffusion from the checkout)
"$venv/bin/python" -m pip install --quiet --no-deps -e "$repo"
"$venv/bin/python" -c "import torch, mpi4py, numpy, scipy, nibabel; print('[setup] torch', torch.__version__)"
printf '%s' "$want" > "$stamp"
