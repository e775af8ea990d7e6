"""Run a Python script under a real ``mpiexec -n N`` and collect one JSON result per rank."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "RESULT "


def mpiexec_path():
    """The ``mpiexec`` next to this interpreter (the venv's mpich), else the one on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")


def run_mpi(script, tmp_path, n=2, timeout=120, args=()):
    """
    Run ``script`` (Python source) on ``n`` ranks and return the per-rank results, sorted by
    rank. The script reports with ``print("RESULT " + json.dumps({...,"rank": r}))``.
    Fails the test (with both output streams) on a non-zero exit or a timeout.
    """
    mpiexec = mpiexec_path()
    if mpiexec is None:
        pytest.skip("mpiexec not found")
    path = Path(tmp_path) / "mpi_script.py"
    path.write_text(textwrap.dedent(script))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [mpiexec, "-n", str(n), sys.executable, str(path), *map(str, args)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpiexec timed out after {timeout} s\nstdout:\n{exc.stdout}\nstderr:\n{exc.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"mpiexec exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    # the ranks share one stdout pipe, so another rank's output can land on the same line:
    # decode the JSON object that follows each RESULT marker and ignore the rest
    decoder = json.JSONDecoder()
    results = [
        decoder.raw_decode(chunk)[0]
        for chunk in proc.stdout.split(RESULT_PREFIX)[1:]
    ]
    assert len(results) == n, f"expected {n} results, got:\n{proc.stdout}\n{proc.stderr}"
    return sorted(results, key=lambda r: r["rank"])
