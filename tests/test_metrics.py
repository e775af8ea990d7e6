"""Metrics against hand-computed values."""

import csv
import io
import json
import math
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from guided_diffusion.evaluation import files, metrics


def ramp_volume(shape=(10, 9, 8)):
    """Positive smooth volume with values 1 + x + y/2 + z/4 (SUV)."""
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    return 1.0 + x + y / 2.0 + z / 4.0


def test_constant_offset_gives_exact_rmse_nrmse_psnr():
    ref = ramp_volume()
    den = ref + 0.5
    assert metrics.rmse(ref, den) == pytest.approx(0.5, abs=1e-12)
    value_range = ref.max() - ref.min()
    assert metrics.nrmse(ref, den) == pytest.approx(0.5 / value_range, rel=1e-12)
    assert metrics.psnr(ref, den) == pytest.approx(20 * math.log10(ref.max() / 0.5), rel=1e-12)
    # published: 10 log10(peak^2 / MSE) is the same number for an unclipped pair
    assert metrics.psnr(ref, den, convention="published") == pytest.approx(
        10 * math.log10(ref.max() ** 2 / 0.25), rel=1e-12
    )


def test_scaled_image_udpet_ssim_is_one_and_rmse_is_rms_of_reference():
    ref = ramp_volume()
    den = 2.0 * ref
    assert metrics.rmse(ref, den) == pytest.approx(np.sqrt(np.mean(ref**2)), rel=1e-12)
    # UDPET SSIM divides each image by its own max: a pure scaling is invisible
    assert metrics.ssim(ref, den) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ssim(ref, den, convention="published") < 0.999


def test_identical_images():
    ref = ramp_volume()
    assert metrics.psnr(ref, ref.copy()) == math.inf
    assert metrics.psnr(ref, ref.copy(), convention="published") == 100.0
    assert metrics.nrmse(ref, ref.copy()) == 0.0
    for convention in metrics.CONVENTIONS:
        assert metrics.ssim(ref, ref.copy(), convention=convention) == pytest.approx(1.0)


def test_published_convention_clips_like_the_published_script():
    ref = ramp_volume()
    ref[0, 0, 0] = 20.0  # above the SUV ceiling 16: compared as 16, but the PSNR peak stays 20
    den = ref.copy()
    den[1, 1, 1] = -2.0  # negative voxel: compared as 0
    den[0, 0, 0] = 16.0
    n = ref.size
    mse = ref[1, 1, 1] ** 2 / n
    assert metrics.psnr(ref, den, convention="published") == pytest.approx(
        10 * math.log10(20.0**2 / mse), rel=1e-12
    )
    assert metrics.psnr(ref, den, convention="published", peak=16.0) == pytest.approx(
        10 * math.log10(16.0**2 / mse), rel=1e-12
    )
    ref_c, den_c = np.minimum(ref, 16), np.maximum(den, 0)
    assert metrics.ssim(ref, den, convention="published") == pytest.approx(
        structural_similarity(ref_c, den_c, win_size=7, data_range=16.0), rel=1e-12
    )


def test_mask_restricts_every_metric():
    ref = ramp_volume()
    mask = np.zeros(ref.shape, dtype=bool)
    mask[2:8, 2:7, 2:6] = True
    den = ref.copy()
    den[~mask] += 3.0  # error only outside the body
    assert metrics.rmse(ref, den, mask) == 0.0
    assert metrics.psnr(ref, den, mask) == math.inf
    den[mask] += 0.25
    inside = ref[mask]
    assert metrics.nrmse(ref, den, mask) == pytest.approx(0.25 / (inside.max() - inside.min()))
    assert metrics.psnr(ref, den, mask) == pytest.approx(20 * math.log10(inside.max() / 0.25))
    _, ssim_map = structural_similarity(
        ref / ref.max(), den / den.max(), win_size=7, data_range=1.0, full=True
    )
    interior = np.zeros(ref.shape, dtype=bool)
    interior[3:-3, 3:-3, 3:-3] = True
    assert metrics.ssim(ref, den, mask) == pytest.approx(ssim_map[mask & interior].mean())


def test_ssim_drops_with_noise_and_thin_volumes_use_a_smaller_window():
    rng = np.random.default_rng(0)
    ref = ramp_volume((12, 12, 5))
    noisy = ref + rng.normal(0, 1.0, ref.shape)
    value = metrics.ssim(ref, noisy)
    assert 0 < value < 0.95
    assert value == pytest.approx(
        structural_similarity(ref / ref.max(), noisy / noisy.max(), win_size=5, data_range=1.0)
    )


def test_bad_input_raises():
    ref = ramp_volume()
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.psnr(ref, ref[:-1])
    with pytest.raises(ValueError, match="convention"):
        metrics.psnr(ref, ref, convention="other")
    with pytest.raises(ValueError, match="NaN"):
        metrics.rmse(ref, np.full(ref.shape, np.nan))
    with pytest.raises(ValueError, match="integers"):
        metrics.voi_statistics(ref, np.full(ref.shape, 0.5))
    with pytest.raises(ValueError, match="no voxel"):
        metrics.rmse(ref, ref, np.zeros(ref.shape, dtype=bool))


def labelled_phantom():
    """4x4x4 volume: label 1 = 8 voxels with values 1..8, label 2 = 4 voxels of 3.0, rest 0.5."""
    image = np.full((4, 4, 4), 0.5)
    labels = np.zeros((4, 4, 4), dtype=np.int16)
    labels[:2, :2, :2] = 1
    image[:2, :2, :2] = np.arange(1, 9, dtype=np.float64).reshape(2, 2, 2)
    labels[3, :, 3] = 2
    image[3, :, 3] = 3.0
    return image, labels


def test_voi_statistics_known_means_maxima_and_tlm_units():
    image, labels = labelled_phantom()
    voxel_mm = (2.0, 2.0, 2.5)  # 10 mm^3 = 0.01 mL per voxel
    stats = metrics.voi_statistics(image, labels, voxel_mm)
    assert sorted(stats) == [1, 2]
    assert stats[1]["suvmax"] == 8.0
    assert stats[1]["suvmean"] == pytest.approx(4.5)
    assert stats[1]["n_voxels"] == 8
    assert stats[1]["volume_ml"] == pytest.approx(0.08)
    assert stats[1]["tlm"] == pytest.approx(4.5 * 0.08)
    assert stats[2]["suvmean"] == pytest.approx(3.0)
    assert stats[2]["tlm"] == pytest.approx(3.0 * 0.04)


def test_voi_bias_of_a_scaled_image():
    ref, labels = labelled_phantom()
    den = ref * 1.1
    den[labels == 2] = 2.4  # -20 % on label 2
    bias = metrics.voi_bias(ref, den, labels, voxel_mm=1.0)
    for quantity in ("suvmax", "suvmean", "tlm"):
        assert bias[1][f"{quantity}_bias_pct"] == pytest.approx(10.0)
        assert bias[2][f"{quantity}_bias_pct"] == pytest.approx(-20.0)
    assert bias[1]["suvmean_ref"] == pytest.approx(4.5)
    assert bias[1]["suvmean_den"] == pytest.approx(4.95)


def sphere_phantom(shape=(21, 21, 21), radius=3.0, background=1.0, lesion=4.0):
    grid = np.indices(shape).astype(np.float64)
    centre = (np.array(shape) - 1) / 2.0
    distance = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(axis=0))
    lesion_labels = (distance <= radius).astype(np.int16)
    image = np.where(lesion_labels > 0, lesion, background)
    return image, lesion_labels


def test_crc_is_one_for_a_perfect_image_and_half_for_halved_contrast():
    ref, lesion_labels = sphere_phantom()
    lesion = lesion_labels == 1
    background = ~lesion
    assert metrics.contrast_recovery(ref, ref.copy(), lesion, background) == pytest.approx(1.0)
    den = np.where(lesion, 2.5, 1.0)  # contrast 1.5 instead of 3
    assert metrics.contrast_recovery(ref, den, lesion, background) == pytest.approx(0.5)
    detect = metrics.lesion_detectability(ref, ref.copy(), lesion_labels, voxel_mm=2.0)
    assert detect[1]["crc"] == pytest.approx(1.0)
    assert detect[1]["bv_den"] == 0.0


def test_background_variability_of_alternating_values():
    image = np.where(np.indices((4, 4, 4)).sum(axis=0) % 2 == 0, 0.9, 1.1)
    assert metrics.background_variability(image, np.ones(image.shape, bool)) == pytest.approx(0.1)


def test_background_shell_distances_in_mm():
    lesion_labels = np.zeros((1, 1, 30), dtype=np.int16)
    lesion_labels[0, 0, 10] = 1
    lesion_labels[0, 0, 20] = 2
    shell = metrics.lesion_background_shell(lesion_labels, 1, voxel_mm=2.0, gap_mm=3.0, width_mm=6.0)
    # distances from voxel 10 in mm: 2 * |z - 10|; shell = (3, 9] mm -> |dz| in {2, 3, 4}
    assert np.nonzero(shell[0, 0])[0].tolist() == [6, 7, 8, 12, 13, 14]
    allowed = np.zeros_like(shell)
    allowed[0, 0, :10] = True
    limited = metrics.lesion_background_shell(lesion_labels, 1, 2.0, 3.0, 6.0, allowed)
    assert np.nonzero(limited[0, 0])[0].tolist() == [6, 7, 8]
    # (3, 19] mm reaches z = 19, but that voxel lies within the 3 mm gap of lesion 2 at z = 20
    wide = metrics.lesion_background_shell(lesion_labels, 1, 2.0, 3.0, 16.0)
    assert np.nonzero(wide[0, 0])[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8] + list(range(12, 19))


def test_evaluate_pair_collects_everything():
    ref, lesion_labels = sphere_phantom((15, 15, 15), radius=2.0)
    organ_labels = np.ones(ref.shape, dtype=np.int16)
    den = ref * 0.9
    result = metrics.evaluate_pair(ref, den, organ_labels, lesion_labels, voxel_mm=2.0)
    assert result["convention"] == "udpet"
    assert result["rmse"] == pytest.approx(0.1 * np.sqrt(np.mean(ref**2)))
    assert result["psnr"] == pytest.approx(metrics.psnr(ref, den))
    assert result["ssim"] == pytest.approx(1.0)  # pure scaling
    assert result["lesions"][1]["suvmean_bias_pct"] == pytest.approx(-10.0)
    assert result["lesions"][1]["crc"] == pytest.approx(1.0)
    assert result["organs"][1]["tlm_bias_pct"] == pytest.approx(-10.0)
    assert result["summary"]["lesion_suvmax_bias_pct"] == pytest.approx(-10.0)
    assert result["summary"]["organ_suvmean_bias_pct"] == pytest.approx(-10.0)
    bare = metrics.evaluate_pair(ref, den)
    assert bare["lesions"] == {} and math.isnan(bare["summary"]["lesion_crc"])


# ----------------------------------------------------------------------------- evaluation.files, scripts/evaluate.py

EVALUATE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "scripts", "evaluate.py")


def run_evaluate(*args):
    return subprocess.run([sys.executable, EVALUATE, *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def evaluation_inputs(tmp_path):
    """Two subjects in the published npz layout; method "gauss" (npz + manifest DRF 4) and
    method "noisy" (NIfTI named ..._drf10, paired in sorted order); one lesion label file."""
    full, lesion_labels = sphere_phantom((12, 12, 12), radius=2.0)
    rng = np.random.default_rng(3)
    (tmp_path / "ref").mkdir()
    (tmp_path / "gauss").mkdir()
    (tmp_path / "noisy").mkdir()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    expected = {}
    for subject, scale in (("subjA", 1.0), ("subjB", 1.5)):
        reference = (full * scale).astype(np.float32)
        low = (reference + rng.normal(0, 0.4, reference.shape)).astype(np.float32)
        np.savez(tmp_path / "ref" / f"{subject}.npz", np.stack([low, reference]))
        gauss = (0.9 * reference).astype(np.float32)
        np.savez(tmp_path / "gauss" / f"{subject}.npz", gauss[None])
        nib.save(nib.Nifti1Image(low, affine), tmp_path / "noisy" / f"{subject}_drf10.nii.gz")
        expected[("gauss", subject)] = metrics.evaluate_pair(
            reference, gauss, lesion_labels=lesion_labels, voxel_mm=2.0)
        expected[("noisy", subject)] = metrics.evaluate_pair(
            reference, low, lesion_labels=lesion_labels, voxel_mm=2.0)
    (tmp_path / "gauss" / "manifest.json").write_text(json.dumps(
        {"volumes": [{"file": "subjA.npz", "drf": 4}, {"file": "subjB.npz", "drf": 4}]}))
    np.savez(tmp_path / "lesions.npz", lesion_labels)
    return tmp_path, expected


def test_evaluate_files_pairs_by_name_or_order_and_finds_the_drf(evaluation_inputs):
    root, expected = evaluation_inputs
    records = files.evaluate_files(root / "ref", [root / "gauss", root / "noisy"], ["gauss", "noisy"],
                                   lesion_labels=root / "lesions.npz", voxel_mm=[2.0])
    assert len(records) == 4
    for record in records:
        want = expected[(record["method"], record["subject"])]
        assert record["drf"] == (4.0 if record["method"] == "gauss" else 10.0)
        assert record["reference"].endswith(record["subject"] + ".npz")
        for key in ("psnr", "ssim", "nrmse"):
            assert record[key] == pytest.approx(want[key], rel=1e-5)
    summary = {(row["method"], row["drf"]): row for row in files.summarise(records)}
    assert set(summary) == {("gauss", 4.0), ("noisy", 10.0)} and summary["gauss", 4.0]["n"] == 2
    psnrs = [r["psnr"] for r in records if r["method"] == "noisy"]
    assert summary["noisy", 10.0]["psnr"]["mean"] == pytest.approx(np.mean(psnrs))
    assert summary["noisy", 10.0]["psnr"]["sd"] == pytest.approx(np.std(psnrs, ddof=1))
    assert summary["gauss", 4.0]["lesion_suvmean_bias_pct"]["mean"] == pytest.approx(-10.0, abs=1e-3)
    with pytest.raises(ValueError, match="2 --method names for 1 --denoised"):
        files.evaluate_files(root / "ref", [root / "gauss"], ["a", "b"])


def test_evaluate_script_end_to_end(evaluation_inputs):
    root, expected = evaluation_inputs
    out = root / "out"
    result = run_evaluate(
        "--reference", root / "ref", "--denoised", root / "gauss", "--method", "gauss",
        "--denoised", root / "noisy", "--method", "noisy", "--lesion_labels", root / "lesions.npz",
        "--voxel_mm", 2.0, "--json", out / "r.json", "--csv", out / "r.csv",
        "--markdown", out / "r.md", "--plot", out / "r.png",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "r.json").read_text())
    assert len(report["records"]) == 4
    for record in report["records"]:
        want = expected[(record["method"], record["subject"])]
        assert record["drf"] == (4.0 if record["method"] == "gauss" else 10.0)
        for key in ("psnr", "ssim", "nrmse"):
            assert record[key] == pytest.approx(want[key], rel=1e-5)
        assert record["lesions"]["1"]["suvmean_bias_pct"] == pytest.approx(
            want["lesions"][1]["suvmean_bias_pct"], rel=1e-4)
    rows = list(csv.DictReader(io.StringIO((out / "r.csv").read_text())))
    assert len(rows) == 4 and {r["method"] for r in rows} == {"gauss", "noisy"}
    markdown = (out / "r.md").read_text()
    assert "| gauss | 4 | 2 |" in markdown and "| noisy | 10 | 2 |" in markdown
    assert "-10.0 ± 0.0" in markdown  # gauss = 0.9 x reference: lesion SUVmean bias -10 %
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(out)) == ["r.csv", "r.json", "r.md", "r.png"]


def test_evaluate_script_rejects_bad_input_naming_the_file(evaluation_inputs):
    root, _ = evaluation_inputs
    small = np.zeros((2, 8, 8, 8), dtype=np.float32)
    (root / "bad").mkdir()
    np.savez(root / "bad" / "subjA.npz", small)
    result = run_evaluate("--reference", root / "ref" / "subjA.npz", "--denoised", root / "bad")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "shape mismatch" in result.stderr
    assert "subjA.npz" in result.stderr
    with pytest.raises(ValueError, match="missing.npz"):
        files.evaluate_files(root / "ref", [root / "missing.npz"])


def test_uncertainty_calibration_known_values():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0.5, 2.0, (8, 8, 8))
    error = rng.normal(0.0, 0.3, ref.shape)
    mean = ref + error
    # a std equal to |error| ranks perfectly, and its mean over the RMSE is E|e| / sqrt(E e^2)
    exact = metrics.uncertainty_calibration(ref, mean, np.abs(error))
    assert exact["rank_correlation"] == pytest.approx(1.0)
    assert exact["std_over_rmse"] == pytest.approx(np.abs(error).mean() / np.sqrt((error ** 2).mean()))
    # twice the RMSE everywhere: ratio 2, no ranking to speak of
    flat = metrics.uncertainty_calibration(ref, mean, np.full(ref.shape, 2 * np.sqrt((error ** 2).mean())))
    assert flat["std_over_rmse"] == pytest.approx(2.0) and math.isnan(flat["rank_correlation"])
    # an anti-ranked std correlates negatively; a mask restricts the voxels
    inverse = metrics.uncertainty_calibration(ref, mean, 1.0 / (np.abs(error) + 0.1), mask=ref > 1.0)
    assert inverse["rank_correlation"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.uncertainty_calibration(ref, mean, np.abs(error)[:4])
