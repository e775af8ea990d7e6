#!/usr/bin/env bash
# Set up the environment (first run only) and run the test suite.
#   ./run_tests.sh            fast suite + MPI tests + a small end-to-end demo run (what CI runs)
#   ./run_tests.sh --all      also the tests marked slow
#   ./run_tests.sh -k name    extra arguments go to pytest
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$repo"
bash scripts/setup_env.sh
venv="${VENV:-$repo/.venv}"
export PATH="$venv/bin:$PATH"
marker=(-m "not slow")
if [ "${1:-}" = "--all" ]; then marker=(); shift; fi
exec "$venv/bin/python" -m pytest "${marker[@]}" "$@"
