"""The out-of-distribution matrix on tiny inputs: cells, held-out marks, seeds, one real run."""

import json
import subprocess
import sys

import numpy as np
import pytest

from guided_diffusion.evaluation import robustness
from tests.mpi_helpers import REPO


def test_cells_vary_one_factor_and_mark_the_held_out_settings():
    cells = robustness.default_cells()
    reference = cells[0]
    assert reference.factor == "reference" and not reference.held_out()
    for cell in cells[1:]:
        changed = [name for name in ("anatomy", "tracer", "scan", "drf") if getattr(cell, name) != getattr(reference, name)]
        assert len(changed) == 1, cell.label()
    held = {tag for cell in cells for tag in cell.held_out()}
    assert held == set(robustness.HELD_OUT)
    assert len(robustness.default_cells(quick=True)) == 3


def test_matrix_subjects_are_distinct_and_reproducible():
    seeds = [robustness.subject_seed(role, k) for role in ("val", "test") for k in range(4)]
    assert len(set(seeds)) == len(seeds)
    assert robustness.subject_seed("test", 1) == robustness.subject_seed("test", 1)


def test_a_cell_runs_end_to_end_on_tiny_volumes(tmp_path, make_tiny_checkpoint):
    paired = make_tiny_checkpoint(tmp_path / "paired.pt", "paired", respacing="ddim3", voxel_mm=3.3)
    cell = robustness.Cell(anatomy="dead_leaves")
    methods = robustness.load_methods([str(paired)], device="cpu", precision="fp32",
                                      given=dict(patch_overlap=2))
    result = robustness.run_cell(cell, methods, n_val=1, n_test=1, fov_scale=0.25, bm3d=False, members=2,
                                 log=lambda _: None)
    assert set(result["methods"]) == {"low_dose", "gaussian", "paired", "paired (1 sample)"}
    # two members from different noise differ: their std is positive and tracks the error somewhat
    calibration = result["calibration"]["paired"]
    assert calibration["std_over_rmse"]["mean"] > 0 and -1 <= calibration["rank_correlation"]["mean"] <= 1
    for summary in result["methods"].values():
        assert np.isfinite(summary["psnr"]["mean"]) and 0 < summary["ssim"]["mean"] <= 1
    # the tuned Gaussian is the best FWHM on the validation subject: never worse than FWHM 0 there
    assert result["tuned"]["gaussian"]["sigma_mm"] >= 0
    labels, names, gains = robustness.gains_over_gaussian([result])
    assert names == ["low_dose", "paired", "paired (1 sample)"] and gains.shape == (1, 3)
    robustness.heat_map(tmp_path / "map.png", [result])
    assert (tmp_path / "map.png").stat().st_size > 1000
    table = robustness.markdown([result])
    assert "dead_leaves" in table and "std / RMSE" in table


@pytest.mark.slow
def test_the_script_writes_json_table_and_heat_map(tmp_path, make_tiny_checkpoint):
    paired = make_tiny_checkpoint(tmp_path / "paired.pt", "paired", respacing="ddim3", voxel_mm=3.3)
    out = tmp_path / "matrix.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "robustness.py"), "--quick", "--cells", "0",
                           "--model", str(paired), "--json", str(out), "--threads", "1", "--patch_overlap", "2"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["complete"] and report["cells"][0]["cell"]["factor"] == "reference"
    assert (tmp_path / "matrix.md").exists() and (tmp_path / "matrix.png").exists()
