# Sourced first by the checkpoint/train_*.sh recipes: strict mode, the repository root as the
# working directory, the toolkit's environment set up (scripts/setup_env.sh) and first on PATH.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash scripts/setup_env.sh
export PATH="$repo/.venv/bin:$PATH"
