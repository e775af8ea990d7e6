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


def test_validation_cases_are_the_reference_scans_validation_subjects_per_drf():
    cases = list(robustness.validation_cases([4.0, 50.0], n_val=1, fov_scale=0.25))
    assert [c["drf"] for c in cases] == [4.0, 50.0]
    # the subjects that tune the baselines (never a test subject), the same one at both doses
    assert {c["name"] for c in cases} == {f"s{robustness.subject_seed('val', 0)}"}
    np.testing.assert_array_equal(cases[0]["full"], cases[1]["full"])
    # the higher DRF is the noisier input
    errors = [np.sqrt(np.mean((c["low"] - c["full"])[c["mask"]] ** 2)) for c in cases]
    assert errors[1] > 2 * errors[0]
    assert cases[1]["acquisition"]["total_counts"] < cases[0]["acquisition"]["total_counts"] / 10


def test_bcdpm_tuning_on_the_matrix_validation_subjects(tmp_path, make_tiny_checkpoint):
    from guided_diffusion.evaluation import metrics, tuning
    from guided_diffusion.evaluation.methods import DiffusionMethod, case_seeds

    prior = make_tiny_checkpoint(tmp_path / "prior.pt", "none", respacing="ddim3", voxel_mm=3.3,
                                 sampling=dict(bc_start=True))
    method = DiffusionMethod(str(prior), "bcdpm", dict(patch_overlap=2, bc_steps=2, hot_voxels=None,
                                                      fusion_kappa=0.0), device="cpu", precision="fp32")
    grid = [dict(bc_steps=l, bc_sigma_mm=4.0, bc_lambda=lam, hot_voxels="input") for l in (1, 2) for lam in (0.0, 0.3)]
    cases = robustness.validation_cases([4.0, 50.0], n_val=1, fov_scale=0.25)
    scores, table = tuning.tune_bcdpm_on_cases(method, cases, grid)
    assert len(scores) == 2 * len(grid) and len({s["volume"] for s in scores}) == 2
    assert [row["drf"] for row in table] == [4.0, 50.0] and table[0]["noise_index"] < table[1]["noise_index"]
    for row in table:  # each row is the grid point with the best PSNR at its DRF
        mine = [s for s in scores if s["drf"] == row["drf"]]
        assert row["psnr"] == max(s["psnr"] for s in mine)
        assert row["members"] == 1
    # tuned on 2-member means: each point is scored by the mean of the members' seeds
    case = next(robustness.validation_cases([50.0], n_val=1, fov_scale=0.25))
    scores, table = tuning.tune_bcdpm_on_cases(method, [case], grid[-1:], members=2)
    mean = method.denoise(case, case_seeds(0, case, "bcdpm", 2), **grid[-1])[0]
    assert scores[0]["psnr"] == pytest.approx(metrics.psnr(case["full"], mean, mask=case["mask"]), abs=1e-9)
    assert scores[0]["members"] == table[0]["members"] == 2
    one = method.denoise(case, case_seeds(0, case, "bcdpm", 1), **grid[-1])[0]
    assert not np.allclose(one, mean)  # BC-DPM's members differ


def test_the_oracle_and_the_psnr_bound_of_a_cell():
    assert robustness.psnr_bound(30.0, 1) == pytest.approx(30.0 + 10 * np.log10(2.0))
    result = robustness.run_cell(robustness.Cell(anatomy="dead_leaves"), {}, n_val=1, n_test=1, fov_scale=0.25,
                                 bm3d=False, oracle_draws=4, log=lambda _: None)
    psnr = {name: summary["psnr"]["mean"] for name, summary in result["methods"].items()}
    assert set(psnr) == {"low_dose", "gaussian", "oracle"}
    assert psnr["oracle"] > psnr["gaussian"] >= psnr["low_dose"]
    assert result["psnr_bound"] == pytest.approx(psnr["oracle"] + 10 * np.log10(1.25))
    table = robustness.markdown([result])
    assert "PSNR bound" in table and f"{result['psnr_bound']:.2f}" in table
