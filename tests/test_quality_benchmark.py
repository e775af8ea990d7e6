"""The evaluation package's quality report, tuning and benchmark (guided_diffusion.evaluation
.quality / .tuning / .benchmarking / .cases / .methods) on a tiny make_dataset.py dataset with
tiny random checkpoints, tested directly; a few end-to-end runs of their scripts; the
dataset-manifest reader and the BC-DPM acquisition settings."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from guided_diffusion import fp16_util
from guided_diffusion.evaluation import baselines, benchmarking, cases, metrics, quality, speed, tuning
from guided_diffusion.evaluation.methods import DiffusionMethod
from guided_diffusion.pet import dataset_manifest, volumes
from guided_diffusion.pet.filters import fwhm_to_sigma
from guided_diffusion.pet.geometry import get_preset
from guided_diffusion.sampling import settings
from guided_diffusion.sampling.guidance import LowDoseAcquisition
from guided_diffusion.sampling.patches import PatchGrid
from guided_diffusion.script_util import sr_create_model_and_diffusion
from tests.mpi_helpers import REPO, mpiexec_path

SCRIPTS = REPO / "scripts"
VOXEL_MM = 12.0
DRFS = (4.0, 20.0)
Z_RANGE = (20, 48)  # the test subject's lesions lie at slices 22-44
FWHM_GRID = (0.0, 6.0, 12.0, 24.0)


def _run(script, *args, timeout=300):
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three 40x24x80 subjects at 12 mm (one per split), DRF 4 and 20, noisy enough to matter."""
    out = tmp_path_factory.mktemp("quality_dataset")
    _run("make_dataset.py", "--out", out, "--subjects", 3, "--seed", 0, "--voxel_mm", VOXEL_MM,
         "--fov_mm", 480, 288, 960, "--drf", *DRFS, "--split", 1, 1, 1, "--iterations", 1,
         "--subsets", 2, "--threads", 1, "--counts_per_mm", 2000)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, make_tiny_checkpoint):
    root = tmp_path_factory.mktemp("quality_checkpoints")
    paired = make_tiny_checkpoint(root / "paired.pt", "paired", respacing="ddim3", voxel_mm=VOXEL_MM)
    prior = make_tiny_checkpoint(root / "prior.pt", "none", respacing="ddim3", voxel_mm=VOXEL_MM,
                                 sampling=dict(bc_start=True, bc_steps=2))
    return paired, prior


@pytest.fixture(scope="module")
def unet(tmp_path_factory, make_tiny_checkpoint):
    """A tiny U-Net baseline: one-step regression, x0 as a residual on the low dose."""
    flags = dict(regression=True, predict_xstart=True, predict_residual=True, learn_sigma=False)
    return make_tiny_checkpoint(tmp_path_factory.mktemp("quality_unet") / "unet.pt", "paired",
                                respacing="", voxel_mm=VOXEL_MM, flags=flags)


# ----------------------------------------------------------------------------- dataset manifest


def test_describe_file_and_bcdpm_acquisition_follow_the_subject_manifest(dataset):
    test_files = dataset_manifest.split_files(dataset, "test")
    listed = (dataset / "test.txt").read_text().split()
    assert test_files == [str(dataset / name) for name in listed]
    assert dataset_manifest.split_files(dataset / "test.txt", "test") == test_files
    path = next(f for f in test_files if f.endswith("drf20.npz"))
    subject = os.path.basename(os.path.dirname(path))
    manifest = json.loads((dataset / subject / "manifest.json").read_text())
    described = dataset_manifest.describe_file(path)
    assert described["subject"] == subject and described["tracer"] == "FDG" and described["drf"] == 20.0
    assert described["counts"] == manifest["tracers"]["FDG"]["counts"]["drf20"]
    assert described["lesion_labels"] == str(dataset / subject / f"{subject}_FDG_lesions.nii.gz")
    assert described["organ_labels"] == str(dataset / subject / f"{subject}_organs.nii.gz")
    acquisition = dataset_manifest.bcdpm_acquisition(described)
    assert acquisition == dict(scanner="ecat921_2d", mode="2d", view_mashing=2, psf_fwhm_mm=4.5,
                               total_counts=described["counts"], randoms_fraction=pytest.approx(0.45))
    # a file the manifest does not list, and a folder without manifest
    stray = dataset / subject / "other.npz"
    volumes.save_npz(stray, np.ones((4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="does not list other.npz"):
        dataset_manifest.describe_file(stray)
    os.remove(stray)
    assert dataset_manifest.describe_file(dataset / "nowhere" / "x.npz") is None
    with pytest.raises(FileNotFoundError, match="no val.txt"):
        dataset_manifest.split_files(dataset / subject, "val")


def test_the_acquisition_of_a_dataset_file_comes_from_its_subject_manifest(dataset, tmp_path):
    path = dataset_manifest.split_files(dataset, "val")[0]
    described = dataset_manifest.describe_file(path)
    none = dict.fromkeys(("scanner", "view_mashing", "psf_fwhm_mm", "randoms_fraction", "total_counts",
                          "drf", "full_counts"))
    kwargs, sources = settings.resolve_acquisition(none, path)
    assert kwargs["total_counts"] == described["counts"] > 0
    assert sources["total_counts"] == sources["scanner"] == dataset_manifest.subject_manifest_path(path)
    assert kwargs == dataset_manifest.bcdpm_acquisition(described)
    # the flag wins
    kwargs, sources = settings.resolve_acquisition(dict(none, total_counts=123.0), path)
    assert kwargs["total_counts"] == 123.0 and sources["total_counts"] == "given"
    alone = tmp_path / "alone.npz"
    volumes.save_npz(alone, np.ones((4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="count level"):
        settings.resolve_acquisition(none, str(alone))
    assert settings.resolve_acquisition(dict(none, drf=10.0, full_counts=5e6), str(alone))[0]["total_counts"] == 5e5


def test_acquisition_passes_view_mashing_and_psf_to_its_projector():
    common = dict(scanner="ecat921_2d", total_counts=1e6, randoms_fraction=0.2,
                  normalisation=dict(clip=16, scale=16, range=[-1, 1]), voxel_mm=VOXEL_MM)
    shape = (24, 16, 2)
    plain = LowDoseAcquisition(**common).projector(shape, torch.device("cpu"))
    mashed = LowDoseAcquisition(**common, view_mashing=2, psf_fwhm_mm=24.0).projector(shape, torch.device("cpu"))
    views = get_preset("ecat921_2d").n_views
    assert plain.sinogram_shape[1] == views and mashed.sinogram_shape[1] == views // 2
    point = torch.zeros(shape)
    point[12, 8, 0] = 1.0
    # the PSF spreads a point over neighbouring voxels: its back-projected forward projection
    # keeps less of the total at the point itself
    sharp = plain.adjoint(plain.forward(point))
    blurred = mashed.adjoint(mashed.forward(point))
    assert (blurred[12, 8, 0] / blurred.sum()) < 0.8 * (sharp[12, 8, 0] / sharp.sum())


# ----------------------------------------------------------------------------- quality report


def _summary(paired_psnr, paired_ssim, bias, bcdpm_psnr=None):
    """A summary with Gaussian at 30 dB / SSIM 0.9 for DRF 4 and 20."""
    def entry(psnr, ssim, lesion_bias):
        return dict(volumes=1, psnr=dict(mean=psnr, sd=math.nan, n=1), ssim=dict(mean=ssim, sd=math.nan, n=1),
                    lesion_suvmean_bias_pct=dict(mean=lesion_bias, sd=math.nan, n=1))

    summary = {"gaussian": {d: entry(30.0, 0.9, 1.0) for d in DRFS},
               "paired": {d: entry(paired_psnr[d], paired_ssim, bias) for d in DRFS}}
    if bcdpm_psnr is not None:
        summary["bcdpm"] = {d: entry(bcdpm_psnr, 0.9, 0.0) for d in DRFS}
    return summary


def test_quality_bar_margins_and_verdicts():
    passing = quality.quality_bar(_summary({4.0: 30.5, 20.0: 31.5}, 0.91, -9.9, bcdpm_psnr=30.1))
    assert passing["overall"] == "PASS"
    gains = {(c["check"], c["drf"]): c["value"] for c in passing["checks"]}
    assert gains[("paired - gaussian PSNR", 4.0)] == pytest.approx(0.5)
    assert gains[("paired - gaussian PSNR", 20.0)] == pytest.approx(1.5)
    # 1.4 dB is enough at DRF 4 but not at DRF 20 (>= 1.5 dB from DRF 10 on)
    short = quality.quality_bar(_summary({4.0: 31.4, 20.0: 31.4}, 0.91, 0.0, bcdpm_psnr=30.1))
    status = {(c["check"], c["drf"]): c["status"] for c in short["checks"]}
    assert status[("paired - gaussian PSNR", 4.0)] == "PASS"
    assert status[("paired - gaussian PSNR", 20.0)] == "FAIL" and short["overall"] == "FAIL"
    biased = quality.quality_bar(_summary({4.0: 32.0, 20.0: 32.0}, 0.91, 10.5, bcdpm_psnr=30.1))
    assert biased["overall"] == "FAIL"
    lower_ssim = quality.quality_bar(_summary({4.0: 32.0, 20.0: 32.0}, 0.89, 0.0, bcdpm_psnr=30.1))
    assert lower_ssim["overall"] == "FAIL"
    # BC-DPM must beat the Gaussian; without it (or without lesions) the verdict is incomplete
    worse_bcdpm = quality.quality_bar(_summary({4.0: 32.0, 20.0: 32.0}, 0.91, 0.0, bcdpm_psnr=29.9))
    assert worse_bcdpm["overall"] == "FAIL"
    missing = quality.quality_bar(_summary({4.0: 32.0, 20.0: 32.0}, 0.91, math.nan))
    assert missing["overall"] == "INCOMPLETE"
    assert "n/a" in quality.format_check(missing["checks"][2])


def test_crop_z_keeps_world_positions():
    affine = np.array([[2.0, 0, 0, -10], [0, 2.0, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    volume = np.arange(4 * 4 * 10, dtype=np.float32).reshape(4, 4, 10)
    cropped, shifted = cases.crop_z(volume, affine, (3, 7))
    np.testing.assert_array_equal(cropped, volume[:, :, 3:7])
    # voxel (1, 2, 0) of the slab is voxel (1, 2, 3) of the volume
    np.testing.assert_allclose(shifted @ [1, 2, 0, 1], affine @ [1, 2, 3, 1])
    with pytest.raises(ValueError, match="exceeds the 10 slices"):
        cases.crop_z(volume, affine, (3, 11))


def test_tune_gaussian_picks_the_best_width_of_the_grid_per_drf():
    rng = np.random.default_rng(0)
    full = np.full((24, 24, 12), 2.0, np.float32)
    full[8:16, 8:16, 4:8] = 6.0
    group = []
    for drf, noise in ((4.0, 0.2), (50.0, 1.0)):
        low = (full + rng.normal(0.0, noise, full.shape)).astype(np.float32)
        group.append(dict(drf=drf, low=low, full=full, mask=full > 0, voxel_mm=(4.0, 4.0, 4.0)))
    params, tables = quality.tune_gaussian(group, [0.0, 4.0, 8.0])
    for drf in (4.0, 50.0):
        best = max(tables[drf], key=lambda row: row["psnr"])
        assert params[drf]["sigma_mm"] == best["sigma_mm"] == fwhm_to_sigma(best["fwhm_mm"])
        assert [row["fwhm_mm"] for row in tables[drf]] == [0.0, 4.0, 8.0]
    # the noisier input wants at least as wide a filter
    assert params[50.0]["sigma_mm"] >= params[4.0]["sigma_mm"] > 0


def test_quality_report_end_to_end(dataset, checkpoints, unet, tmp_path):
    paired, prior = checkpoints
    out = tmp_path / "report"
    proc = _run("quality_report.py", "--val", dataset, "--test", dataset / "test.txt", "--paired", paired,
                "--unet", unet, "--prior", prior, "--out", out, "--json", tmp_path / "copy.json", "--z_range", *Z_RANGE,
                "--steps", "ddim3", "--bc_recon_iters", 1,
                "--bc_recon_subsets", 2, "--patch_overlap", 2, "--fwhm_grid_mm", *FWHM_GRID,
                "--threads", 1)
    for name in ("per_volume.csv", "summary.md", "summary.json", "quality_vs_drf.png", "example.png",
                 "gaussian_params.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "summary.json").read_text())
    assert report == json.loads((tmp_path / "copy.json").read_text())
    assert report["settings"]["z_range"] == list(Z_RANGE)
    # BC-DPM's l and start follow the prior's sidecar recommendation when not given
    assert report["settings"]["bc_start"] is None and report["settings"]["bc_steps"] is None
    resolved = report["settings"]["resolved"]["bcdpm"]
    assert resolved["values"]["bc_start"] is True and resolved["values"]["bc_steps"] == 2
    assert resolved["sources"]["bc_steps"] == resolved["sources"]["bc_start"] == "checkpoint"
    assert resolved["precision"] == fp16_util.auto_cpu_precision()  # --precision auto on a CPU
    markdown = (out / "summary.md").read_text()
    assert "bc_steps 2 (checkpoint)" in markdown and "bc_start True (checkpoint)" in markdown
    assert "timestep_respacing ddim3 (given)" in markdown
    # the tuned widths are grid points and the best of the validation table
    sigmas = [fwhm_to_sigma(f) for f in FWHM_GRID]
    for drf in DRFS:
        chosen = baselines.load_params(out / "gaussian_params.json", "gaussian", drf)["sigma_mm"]
        assert any(math.isclose(chosen, s) for s in sigmas)
        table = report["gaussian_tuning"][baselines.drf_key(drf)]
        best = max(table, key=lambda row: row["psnr"])
        assert math.isclose(best["sigma_mm"], chosen)
    rows = list(csv.DictReader((out / "per_volume.csv").open()))
    test_files = dataset_manifest.split_files(dataset, "test")
    assert len(rows) == len(test_files) * 5
    assert {r["method"] for r in rows} == {"low_dose", "gaussian", "paired", "unet", "bcdpm"}
    assert {r["bc_steps"] for r in rows if r["method"] == "bcdpm"} == {"2"}
    for row in rows:
        for key in ("psnr", "ssim", "nrmse", "lesion_suvmean_bias_pct"):
            assert math.isfinite(float(row[key])), (row["method"], key)
    # the low-dose row is the masked PSNR of the cropped pair, recomputed here
    low_row = next(r for r in rows if r["method"] == "low_dose" and float(r["drf"]) == 20.0)
    low, _ = volumes.load_volume(low_row["file"], index=0)
    full, _ = volumes.load_volume(low_row["file"], index=1)
    low, full = (v[:, :, Z_RANGE[0]:Z_RANGE[1]] for v in (low, full))
    expected = metrics.psnr(full, low, mask=full > 0.05)
    assert float(low_row["psnr"]) == pytest.approx(expected, rel=1e-9)
    assert math.isinf(metrics.psnr(full, full, mask=full > 0.05)) and math.isfinite(expected)
    by_method = {(r["method"], float(r["drf"])): float(r["psnr"]) for r in rows}
    # more dose reduction, more noise, which the tuned Gaussian reduces
    assert by_method[("low_dose", 20.0)] < by_method[("low_dose", 4.0)]
    assert by_method[("gaussian", 20.0)] > by_method[("low_dose", 20.0)]
    evaluations = {r["method"]: int(r["network_evaluations"]) for r in rows}
    assert evaluations["low_dose"] == evaluations["gaussian"] == 0
    assert evaluations["paired"] > 0 and evaluations["bcdpm"] == 2 * evaluations["paired"] // 3
    # the U-Net is one evaluation per patch: a third of the 3-step sampler's
    assert evaluations["unet"] == evaluations["paired"] // 3
    # random networks cannot beat the Gaussian: the verdict reports the failure
    assert report["quality_bar"]["overall"] == "FAIL"
    assert "Quality bar: FAIL" in proc.stdout and "paired - gaussian PSNR" in proc.stdout
    assert "| gaussian | 20 | 1 |" in (out / "summary.md").read_text()


def test_summarise_groups_by_method_and_drf_over_finite_values():
    rows = [dict(method=m, drf=d, **{k: v for k in quality.ROW_METRICS}, seconds=1.0, network_evaluations=0)
            for m, d, v in (("paired", 20.0, 2.0), ("gaussian", 4.0, 1.0), ("paired", 4.0, 3.0),
                            ("paired", 4.0, 5.0), ("paired", 4.0, math.nan))]
    summary = quality.summarise(rows)
    assert list(summary) == ["paired", "gaussian"] and list(summary["paired"]) == [4.0, 20.0]
    entry = summary["paired"][4.0]
    assert entry["volumes"] == 3 and entry["psnr"]["n"] == 2
    assert entry["psnr"]["mean"] == pytest.approx(4.0) and entry["psnr"]["sd"] == pytest.approx(math.sqrt(2))
    assert math.isnan(summary["gaussian"][4.0]["ssim"]["sd"])  # one value: no sd


def test_a_cond_dropout_checkpoint_serves_as_the_bcdpm_prior(checkpoints, tmp_path, make_tiny_checkpoint):
    paired, _ = checkpoints
    with pytest.raises(ValueError, match="needs an unconditional prior"):
        DiffusionMethod(str(paired), "bcdpm", {}, device=torch.device("cpu"))
    both = make_tiny_checkpoint(tmp_path / "both.pt", "paired", respacing="ddim3", voxel_mm=VOXEL_MM)
    sidecar = both.with_suffix(".json")
    sidecar.write_text(json.dumps(dict(json.loads(sidecar.read_text()), cond_dropout=0.2)))
    method = DiffusionMethod(str(both), "bcdpm", dict(bc_steps=2), device=torch.device("cpu"),
                             precision="fp32", acquisition=dict(total_counts=1e5))
    denoiser, resolved = method.denoiser(np.ones((40, 24, 16), np.float32), None)
    assert denoiser.settings.null_condition and resolved.mode == "bcdpm"
    assert resolved["timestep_respacing"] == "ddim3" and denoiser.settings.use_ddim
    assert method.acquisition(None).total_counts == 1e5 and method.acquisition(None) is method.acquisition(None)
    paired_method = DiffusionMethod(str(both), "paired", {}, device=torch.device("cpu"))
    assert not paired_method.denoiser(np.ones((40, 24, 16), np.float32), None)[0].settings.null_condition


def test_a_method_resolves_each_case_and_reads_its_acquisition(dataset, checkpoints):
    _, prior = checkpoints
    case = cases.load_case(cases.select_files(dataset, "val", [20.0])[0], Z_RANGE)
    method = DiffusionMethod(str(prior), "bcdpm", dict(timestep_respacing="ddim3", patch_overlap=2,
                                                       bc_recon_iters=1, bc_recon_subsets=2),
                             device=torch.device("cpu"))
    assert method.run["bc_steps"] == 2 and method.run.sources["bc_steps"] == "checkpoint"
    image, info = method.denoise(case, [0], bc_steps=1)
    assert image.shape == case["low"].shape and np.isfinite(image).all()
    assert info["resolved"]["bc_steps"] == 1 and info["resolved"].sources["bc_steps"] == "given"
    grid = PatchGrid((Z_RANGE[1] - Z_RANGE[0], 40, 24), (8, None, None), 2)
    assert info["network_evaluations"] == len(grid)  # bc_start: l steps per patch
    counts = dataset_manifest.describe_file(case["path"])["counts"]
    assert method.acquisition(case["path"]).total_counts == counts


# ----------------------------------------------------------------------------- benchmark


def test_seam_slices_by_hand():
    grid = PatchGrid((20, 16, 16), (8, None, None), 0)
    assert grid.axis_starts[0] == [0, 6, 12]  # boundaries at 6, 8, 12, 14
    near = benchmarking.seam_slices(grid, 20, 3.0, 3.0)
    np.testing.assert_array_equal(np.flatnonzero(near), np.arange(4, 16))
    # model voxels twice the input's: boundaries at input slices 12, 16, 24, 28
    near = benchmarking.seam_slices(grid, 40, 6.0, 3.0)
    np.testing.assert_array_equal(np.flatnonzero(near), np.r_[10:18, 22:30])


def test_parse_mode_and_full_chain_estimate():
    assert benchmarking.parse_mode("bcdpm:100:l10:start") == dict(
        name="bcdpm:100:l10:start", cond="bcdpm", respacing="100", bc_steps=10, bc_start=True)
    assert benchmarking.parse_mode("paired:full")["respacing"] == ""
    for bad in ("paired", "bcdpm:100", "hybrid:100:start", "paired:10:x", "unet:10"):
        with pytest.raises(ValueError, match="mode"):
            benchmarking.parse_mode(bad)
    rows = [dict(mode="paired:ddim10", stitch="seamfree", seconds_per_evaluation=9.0, patches=4,
                 diffusion_steps=1000),
            dict(mode="paired:100", stitch="seamfree", seconds_per_evaluation=0.5, patches=4,
                 diffusion_steps=1000)]
    estimate = benchmarking.full_chain_estimate(rows)
    assert estimate["estimated_from"] == "paired:100"
    assert estimate["network_evaluations"] == 4000 and estimate["median_s"] == pytest.approx(2000.0)
    assert benchmarking.full_chain_estimate(rows[:1]) is None


@pytest.fixture(scope="module")
def small_input(dataset, tmp_path_factory):
    """A 16-slice slab of a test volume, beside a copy of its subject manifest."""
    source = next(f for f in dataset_manifest.split_files(dataset, "test") if f.endswith("drf20.npz"))
    subject = os.path.basename(os.path.dirname(source))
    folder = tmp_path_factory.mktemp("bench_input") / subject
    folder.mkdir()
    (folder / "manifest.json").write_text(open(os.path.join(os.path.dirname(source), "manifest.json")).read())
    low, affine = volumes.load_volume(source, index=0)
    full, _ = volumes.load_volume(source, index=1)
    path = folder / os.path.basename(source)
    volumes.save_npz(path, low[:, :, 28:44], full[:, :, 28:44], affine)
    return path


@pytest.mark.slow
def test_benchmark_modes_and_seams(small_input, checkpoints, tmp_path):
    paired, prior = checkpoints
    out = tmp_path / "bench.json"
    proc = _run("benchmark.py", "--json", out, "--paired", paired, "--prior", prior, "--input", small_input,
                "--parts", "modes", "seams", "--modes", "paired:ddim3", "bcdpm:4:l2:start",
                "--seam_mode", "paired:ddim3", "--repeats", 1, "--threads", 1, "--patch_overlap", 2,
                "--bc_recon_iters", 1, "--bc_recon_subsets", 2)
    results = json.loads(out.read_text())
    assert os.path.isfile(results["figure"]) and results["figure"].endswith("bench_psnr_vs_evaluations.png")
    grid = PatchGrid((16, 40, 24), (8, None, None), 2)  # the tiny checkpoint's patch depth, 12 mm
    rows = {r["mode"]: r for r in results["modes"]}
    assert set(rows) == {"paired:ddim3", "bcdpm:4:l2:start"}  # no ancestral mode: no estimate
    assert rows["paired:ddim3"]["network_evaluations"] == 3 * len(grid)
    assert rows["bcdpm:4:l2:start"]["network_evaluations"] == 2 * len(grid)
    for row in rows.values():
        assert row["patches"] == len(grid) and row["peak_rss_mb"] > row["rss_before_sampling_mb"] * 0.5 > 0
        for key in ("psnr", "psnr_near_seams", "psnr_elsewhere", "median_s"):
            assert math.isfinite(row[key]), key
    seams = {r["stitch"]: r for r in results["seams"]}
    assert seams["seamfree"] == rows["paired:ddim3"]  # reused, not run twice
    assert seams["independent"]["network_evaluations"] == rows["paired:ddim3"]["network_evaluations"]
    assert seams["independent"]["psnr"] != seams["seamfree"]["psnr"]
    assert "| paired:ddim3 |" in proc.stdout and "| independent (paired:ddim3) |" in proc.stdout


def test_benchmark_unet_part_end_to_end(tmp_path):
    out = tmp_path / "unet.json"
    proc = _run("benchmark.py", "--json", out, "--parts", "unet", "--unet_config", "small (32 ch, mult 1,2,2,4)",
                "--unet_size", 8, "--threads", 1, "--repeats", 1, "--device", "cpu")
    unet = json.loads(out.read_text())["unet"]
    assert [(r["precision"], r["memory_format"]) for r in unet["rows"]] == [
        ("fp32", "contiguous"), ("fp32", "channels_last_3d"), ("bf16", "channels_last_3d")]
    assert unet["published_s"] == unet["rows"][0]["median_s"] > 0
    assert unet["fastest"]["median_s"] == min(r["median_s"] for r in unet["rows"])
    assert unet["speedup"] == pytest.approx(unet["published_s"] / unet["fastest"]["median_s"])
    assert f"x{unet['speedup']:.2f}" in proc.stdout and "| UNet forward |" in proc.stdout
    assert benchmarking.markdown(dict(unet=unet)).strip() in proc.stdout


def test_benchmark_modes_fix_their_settings():
    paired = benchmarking.mode_settings(benchmarking.parse_mode("paired:full"), "independent")
    assert paired == dict(timestep_respacing="", stitch="independent", bc_start=False, bc_steps=None)
    started = benchmarking.mode_settings(benchmarking.parse_mode("bcdpm:100:l3:start"), "seamfree")
    assert started == dict(timestep_respacing="100", stitch="seamfree", bc_start=True, bc_steps=3)
    benchmarking.check_given(dict(bc_steps=None, bc_lambda=0.3))
    with pytest.raises(ValueError, match="--bc_steps, --stitch: each mode sets them"):
        benchmarking.check_given(dict(bc_steps=3, stitch="seamfree", bc_start=None))


def test_projector_case_times_every_operation():
    threads = torch.get_num_threads()
    try:
        row = speed.projector_case("demo_3d", 1, 1, 4, 3, 19)
    finally:
        torch.set_num_threads(threads)
    assert row["image_shape"] == [32, 32, 16] and len(row["sinogram_shape"]) == 3
    assert row["options"] == {"mode": "3d", "max_ring_difference": 7} and row["osem_subsets"] == 8
    for key in ("build_s", "forward_s", "back_s", "osem_1iter_incl_sensitivity_s", "peak_rss_mb"):
        assert row[key] > 0, key
    with pytest.raises(ValueError, match="unknown case"):
        speed.projector_case("nowhere", 1, 1, 4, 3, 19)


@pytest.mark.slow
@pytest.mark.mpi
def test_benchmark_strong_scaling(small_input, checkpoints, tmp_path):
    if mpiexec_path() is None:
        pytest.skip("mpiexec not found")
    paired, _ = checkpoints
    out = tmp_path / "scaling.json"
    _run("benchmark.py", "--json", out, "--paired", paired, "--input", small_input, "--parts", "scaling",
         "--scaling_respacing", "ddim3", "--threads", 2, "--patch_overlap", 2)
    rows = json.loads(out.read_text())["scaling"]
    assert [(r["ranks"], r["threads_per_rank"]) for r in rows] == [(1, 2), (2, 1)]
    assert rows[0]["speedup"] == 1.0
    for row in rows:
        assert 0 < row["denoise_s"] < row["wall_s"] and row["max_rss_descendants_mb"] > 0
        assert row["speedup"] == pytest.approx(rows[0]["denoise_s"] / row["denoise_s"])
    # one rank holds the whole volume and exchanges nothing; with two, rank 0 holds part of it
    # and receives only halos, far less than the volume
    assert rows[0]["rank0_halo_voxels_received_per_step"] == 0
    assert np.prod(rows[1]["rank0_box_zxy"]) < rows[1]["volume_voxels"]
    assert 0 < rows[1]["rank0_halo_voxels_received_per_step"] < rows[1]["volume_voxels"] / 2


def test_tune_fusion_scores_a_biased_denoiser_and_runs_end_to_end(dataset, checkpoints, tmp_path):
    rng = np.random.default_rng(0)
    full = np.full((32, 32, 32), 3.0)
    full[8:24, 8:24, 8:24] = 9.0
    low = full + rng.normal(0.0, np.sqrt(0.02 * full))
    biased = np.where(full > 5.0, 6.0, full)  # a "model" that flattens the hot structure
    rows = tuning.score_grid([dict(full=full, low=low, mask=full > 0, drf=4.0, denoised=biased)],
                           kappas=[2.0], windows=[5])
    assert [row["kappa"] for row in rows] == [2.0, 0.0]  # fusion beats no fusion here
    assert rows[0]["gain_by_drf"][4.0] > 3.0 and rows[1]["gain_by_drf"][4.0] == 0.0

    out = tmp_path / "fusion.json"
    proc = _run("tune_fusion.py", "--val", dataset, "--paired", checkpoints[0], "--out", out,
                "--z_range", *Z_RANGE, "--steps", "ddim3", "--patch_overlap", 2, "--kappas", 2, 4,
                "--windows", 3, "--threads", 1)
    result = json.loads(out.read_text())
    assert result["volumes"] == len(dataset_manifest.split_files(dataset, "val"))
    assert len(result["rows"]) == 3 and "best: kappa" in proc.stdout
    assert result["best"] == {k: result["rows"][0][k] for k in ("kappa", "window")}


def test_tune_bcdpm_picks_the_best_pair_per_drf_and_runs_end_to_end(dataset, checkpoints, tmp_path):
    scores = [dict(volume=f"v{drf}_{v}", drf=drf, noise_index=index, bc_sigma_mm=sigma, bc_lambda=lam,
                   bc_steps=steps, hot_voxels="input", psnr=psnr + v)
              for drf, index in ((4.0, 0.01), (50.0, 0.2))
              for v in (0, 1)
              for steps, sigma, lam, psnr in ((1, 3.0, 0.1, 30.0 if drf == 4 else 20.0),
                                              (3, 9.0, 0.05, 25.0 if drf == 4 else 28.0),
                                              (3, 3.0, 0.1, 29.0 if drf == 4 else 27.0))]
    for score in scores:  # the DRF's noise index is the mean over its volumes
        if score["volume"] == "v4.0_0":
            score["noise_index"] = 0.03
    table = tuning.best_per_drf(scores)
    assert [(r["drf"], r["bc_steps"], r["bc_sigma_mm"], r["bc_lambda"]) for r in table] == [
        (4.0, 1, 3.0, 0.1), (50.0, 3, 9.0, 0.05)]
    assert table[0]["noise_index"] == pytest.approx(0.02) and table[0]["psnr"] == pytest.approx(30.5)
    assert table[0]["noise_estimator"] == "second_difference"
    assert table[1]["volumes"] == 2

    out = tmp_path / "bcdpm.json"
    proc = _run("tune_bcdpm.py", "--val", dataset, "--prior", checkpoints[1], "--out", out,
                "--z_range", *Z_RANGE, "--bc_respacing", "ddim3", "--patch_overlap", 2,
                "--lambdas", 0.1, 0.2, "--sigmas_mm", 12, "--bc_steps", 1, 2, "--hot_voxels", "rescale",
                "input", "--threads", 1)
    result = json.loads(out.read_text())
    n_val = len(dataset_manifest.split_files(dataset, "val"))
    assert len(result["scores"]) == 8 * n_val and "record it" in proc.stdout
    assert [row["drf"] for row in result["bc_tuning"]] == list(DRFS)
    assert all(row["bc_sigma_mm"] == 12 and row["bc_lambda"] in (0.1, 0.2) and row["bc_steps"] in (1, 2)
               and row["hot_voxels"] in ("rescale", "input") for row in result["bc_tuning"])
    # the lower dose is the noisier input
    assert result["bc_tuning"][0]["noise_index"] < result["bc_tuning"][1]["noise_index"]
    assert result["settings"]["bc_steps"] == [1, 2] and result["settings"]["bc_start"] is True


def test_sampler_rows_average_per_respacing_cheapest_within_tolerance_first():
    scores = [dict(respacing="ddim10", psnr_one=30.0, psnr_mean=31.0, std_over_rmse=0.5, rank_correlation=0.2,
                   evaluations=10),
              dict(respacing="ddim10", psnr_one=32.0, psnr_mean=33.0, std_over_rmse=0.7, rank_correlation=float("nan"),
                   evaluations=10),
              dict(respacing="10", psnr_one=31.5, psnr_mean=33.5, std_over_rmse=1.0, rank_correlation=0.4,
                   evaluations=10)]
    rows = tuning.sampler_rows(scores)
    # "10" (31.5 dB) before the mean of the two ddim10 volumes (31.0 dB)
    assert [r["respacing"] for r in rows] == ["10", "ddim10"]
    ddim = rows[1]
    assert ddim["psnr_one"] == 31.0 and ddim["psnr_mean"] == 32.0 and ddim["std_over_rmse"] == pytest.approx(0.6)
    # a NaN rank correlation (a volume without spread) is left out of the mean
    assert ddim["rank_correlation"] == pytest.approx(0.2) and ddim["volumes"] == 2 and rows[0]["volumes"] == 1
    # ddim5 is 0.04 dB below "10" at half the evaluations: chosen (first), the rest best first
    cheap = [dict(respacing="ddim5", psnr_one=31.46, psnr_mean=33.0, std_over_rmse=1.0, rank_correlation=0.3,
                  evaluations=5)]
    assert [r["respacing"] for r in tuning.sampler_rows(scores + cheap)] == ["ddim5", "10", "ddim10"]
    assert [r["respacing"] for r in tuning.sampler_rows(scores + cheap, tolerance_db=0.01)] == ["10", "ddim5", "ddim10"]


def test_report_paths_are_repository_relative_inside_it_and_unchanged_outside(tmp_path):
    from guided_diffusion.checkpoint_hub import REPO

    inside = os.path.join(REPO, "data", "test", "s0000", "a.npz")
    assert quality.report_path(inside) == os.path.join("data", "test", "s0000", "a.npz")
    assert quality.report_path(str(tmp_path / "a.npz")) == str(tmp_path / "a.npz")


def test_sampler_rows_group_by_label_and_keep_respacing_and_flips():
    score = dict(respacing="log2@999", psnr_mean=31.0, std_over_rmse=0.1, rank_correlation=0.1)
    scores = [dict(score, sampler="plain", flips="", psnr_one=31.0, evaluations=1),
              dict(score, sampler="mirrored", flips="zxy", psnr_one=31.5, evaluations=8)]
    rows = tuning.sampler_rows(scores)
    assert [(r["sampler"], r["respacing"], r["flips"]) for r in rows] == [("mirrored", "log2@999", "zxy"),
                                                                        ("plain", "log2@999", "")]
    assert tuning.sampler_rows(scores, tolerance_db=0.6)[0]["sampler"] == "plain"  # cheaper, within 0.6 dB


def test_tune_sampler_scores_members_of_each_respacing(dataset, checkpoints):
    paired, _ = checkpoints
    given = dict(patch_overlap=2)
    methods = {r: DiffusionMethod(str(paired), "paired", dict(given, timestep_respacing=r), device=torch.device("cpu"),
                                  precision="fp32") for r in ("ddim3", "2")}
    scores, rows = tuning.tune_sampler(methods, dataset, 2, drfs=[20.0], z_range=Z_RANGE)
    assert len(scores) == 2 and {r["respacing"] for r in rows} == {"ddim3", "2"}
    by = {s["respacing"]: s for s in scores}
    # evaluations per member: the steps times the patches, the same patches for both
    assert by["ddim3"]["evaluations"] / 3 == by["2"]["evaluations"] / 2 > 0
    for s in scores:
        assert math.isfinite(s["psnr_one"]) and math.isfinite(s["psnr_mean"]) and s["std_over_rmse"] > 0
    with pytest.raises(ValueError, match="members >= 2"):
        tuning.tune_sampler(methods, dataset, 1)


def test_fit_ensemble_spread_recovers_a_power_law():
    # volume i is calibrated at s_i = 0.02 (index_i / 0.01)^0.5; std / RMSE grows as s / s_i
    scores = []
    for k, index in enumerate((0.0025, 0.01, 0.04, 0.16)):
        crossing = 0.02 * (index / 0.01) ** 0.5
        scores += [dict(volume=f"v{k}", noise_index=index, x0_skip_sigma=s, std_over_rmse=(s / crossing) ** 0.8)
                   for s in (0.005, 0.02, 0.08)]
    spread = tuning.fit_ensemble_spread(scores)
    assert spread["noise_index"] == pytest.approx(0.02)  # geometric mean of the indices
    assert spread["x0_skip_sigma"] == pytest.approx(0.02 * 2 ** 0.5) and spread["power"] == pytest.approx(0.5)
    assert spread["range"] == [0.005, 0.08] and spread["volumes"] == 4
    assert spread["noise_estimator"] == "second_difference"
    assert settings.spread_sigma(spread, 0.04) == pytest.approx(0.04)
    # calibrated already at the smallest width: that width; never calibrated: the widest ratio's
    assert tuning.spread_crossing([0.01, 0.02], [3.0, 6.0]) == 0.01
    assert tuning.spread_crossing([0.01, 0.02, 0.04], [0.3, 0.6, 0.5]) == 0.02
    assert tuning.spread_crossing([0.01, 0.02, 0.04], [0.5, 2.0, 0.5]) == pytest.approx(0.01 * 2 ** 0.5)
    with pytest.raises(ValueError, match="two or more volumes"):
        tuning.fit_ensemble_spread(scores[:3])


def test_choose_std_fwhm_takes_the_smallest_near_the_best_rank_correlation():
    def score(*rhos):
        return dict(pooled={f: dict(rank_correlation=r) for f, r in zip((0.0, 4.0, 8.0, 12.0), rhos)})
    scores = [score(0.10, 0.25, 0.300, 0.31), score(0.12, 0.27, 0.315, 0.32)]
    assert tuning.choose_std_fwhm(scores) == 8.0  # 0.3075 is within 0.01 of 0.315
    assert tuning.choose_std_fwhm(scores, tolerance=0.0) == 12.0
    assert tuning.choose_std_fwhm([score(0.3, 0.2, 0.1, 0.0)]) == 0.0


def test_tune_spread_end_to_end_and_the_width_reaches_the_sampler(dataset, tmp_path, make_tiny_checkpoint, capsys):
    from scripts import tune_spread

    paired = make_tiny_checkpoint(tmp_path / "skip.pt", "paired", respacing="ddim3", voxel_mm=VOXEL_MM,
                                  flags=dict(predict_xstart=True, x0_skip_sigma=0.025, learn_sigma=False))
    out = tmp_path / "spread.json"
    tune_spread.main(["--val", str(dataset), "--paired", str(paired), "--out", str(out), "--sigmas", "0.01",
                      "0.1", "--members", "2", "--z_range", *map(str, Z_RANGE), "--patch_overlap", "2",
                      "--std_fwhms_mm", "0", "8", "--threads", "1", "--precision", "fp32"])
    result = json.loads(out.read_text())
    n_val = len(dataset_manifest.split_files(dataset, "val"))
    assert len(result["scores"]) == 2 * n_val and "record it" in capsys.readouterr().out
    assert result["std_fwhm_mm"] in (0.0, 8.0) and set(result["scores"][0]["pooled"]) == {"0.0", "8.0"}
    chosen = result["scores"][0]["pooled"][str(result["std_fwhm_mm"])]
    assert result["scores"][0]["std_over_rmse"] == chosen["std_over_rmse"]
    assert all(s["std_over_rmse"] > 0 and math.isfinite(s["psnr_mean"]) for s in result["scores"])
    by_sigma = {s["x0_skip_sigma"]: s["std_over_rmse"] for s in result["scores"] if s["drf"] == DRFS[0]}
    assert by_sigma[0.1] > by_sigma[0.01]  # a wider blend, a wider ensemble
    # the sampler of an ensemble uses the width the fit gives for its input
    spread = dict(noise_estimator="second_difference", noise_index=1.0, x0_skip_sigma=0.07, power=0.0,
                  range=[0.01, 0.1])
    method = DiffusionMethod(str(paired), "paired", dict(members=2), device=torch.device("cpu"), precision="fp32")
    method.metadata["sampling"]["ensemble_spread"] = spread
    case = cases.load_case(cases.select_files(dataset, "val", [DRFS[0]], 0)[0], Z_RANGE)
    denoiser, resolved = method.denoiser(case["low"], case["path"])
    assert resolved["x0_skip_sigma"] == pytest.approx(0.07) and denoiser.diffusion.x0_skip_sigma == pytest.approx(0.07)
    assert method.diffusion.x0_skip_sigma == 0.025


def test_a_posterior_samplers_ensemble_image_is_its_one_member_estimate(dataset, tmp_path, make_tiny_checkpoint):
    """With an ensemble_respacing the members sample (ddim3, the fitted width) and the image is
    exactly what a one-member run gives (ddim2, the trained width); the std is the members'."""
    paired = make_tiny_checkpoint(tmp_path / "posterior.pt", "paired", respacing="ddim2", voxel_mm=VOXEL_MM,
                                  flags=dict(predict_xstart=True, x0_skip_sigma=0.025, learn_sigma=False),
                                  sampling=dict(ensemble_respacing="ddim3", patch_overlap=2))
    case = cases.load_case(cases.select_files(dataset, "val", [DRFS[0]], 0)[0], Z_RANGE)
    seeds = [11, 12]
    method = DiffusionMethod(str(paired), "paired", dict(members=2, x0_skip_sigma=0.07), device=torch.device("cpu"),
                             precision="fp32")
    image, info = method.denoise(case, seeds)
    one, one_info = DiffusionMethod(str(paired), "paired", {}, device=torch.device("cpu"),
                                    precision="fp32").denoise(case, seeds[:1])
    np.testing.assert_array_equal(image, one)
    assert info["image"] == "one-member estimate" and info["estimate"]["seed"] == seeds[0]
    members = [info["first"], 2 * info["members_mean"] - info["first"]]
    np.testing.assert_allclose(info["std"], np.std(members, axis=0, ddof=1), atol=1e-5)
    assert not np.allclose(info["members_mean"], image, atol=1e-4)
    # per patch: 2 members x 3 steps, and the estimate's 2 steps
    assert info["network_evaluations"] == one_info["network_evaluations"] * (2 * 3 + 2) / 2
    denoiser, resolved = method.denoiser(case["low"], case["path"])
    assert denoiser.diffusion.x0_skip_sigma == 0.07 and denoiser.estimate.diffusion.x0_skip_sigma == 0.025


def test_count_flops_of_a_convolution_matches_the_hand_count():
    conv = torch.nn.Conv3d(2, 4, 3, padding=1, bias=False)
    x = torch.zeros(1, 2, 4, 5, 6)
    # a multiply and an add per weight and output voxel
    assert speed.count_flops(lambda: conv(x)) == 2 * (2 * 27) * 4 * (4 * 5 * 6)


def test_op_categories_and_a_profile_that_adds_up():
    assert [speed.op_category(n) for n in ("aten::mkldnn_convolution", "aten::native_group_norm",
                                            "aten::silu", "aten::copy_", "aten::upsample_nearest3d",
                                            "aten::cat", "aten::add", "aten::addmm", "aten::foo")] == [
        "convolution", "group norm", "SiLU", "casts and copies", "down/up-sampling", "concatenation",
        "elementwise", "linear (time embedding)", "other"]

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(2, 4, 3, padding=1)
            self.norm = torch.nn.GroupNorm(2, 4)

        def forward(self, x, t, low_res):
            return torch.nn.functional.silu(self.norm(self.conv(torch.cat([x, low_res], 1))))

    profile = speed.forward_profile(Tiny(), (4, 8, 8), torch.device("cpu"), "fp32", repeats=1, warmup=0)
    categories = profile["categories"]
    assert {"convolution", "group norm", "SiLU", "concatenation"} <= set(categories)
    assert sum(c["ms"] for c in categories.values()) == pytest.approx(profile["total_ms"])
    assert sum(c["share"] for c in categories.values()) == pytest.approx(1.0)


def test_benchmark_unet_slab_memory_runs_each_precision_in_a_fresh_process(tmp_path):
    out = tmp_path / "slab.json"
    config = "small (32 ch, mult 1,2,2,4)"
    proc = _run("benchmark_unet.py", "--slab", 4, 8, 8, "--slab_config", config, "--threads", 1,
                "--device", "cpu", "--json", out)
    rows = json.loads(out.read_text())["results"]
    assert rows and all(r["config"] == config and r["shape_zxy"] == [4, 8, 8] for r in rows)
    params = sum(p.numel() for p in sr_create_model_and_diffusion(**speed.CONFIGS[config][0])[0].parameters())
    for r in rows:
        assert r["weights_mb"] == pytest.approx(params * 4 / 2**20)
        assert r["peak_rss_mb"] >= r["rss_before_mb"] > r["weights_mb"]
        assert r["seconds"] > 0 and r["peak_cuda_mb"] is None
    assert "| small (32 ch, mult 1,2,2,4) | (4, 8, 8) | fp32 |" in proc.stdout


def test_benchmark_unet_measures_a_checkpoints_forward_efficiency(checkpoints, tmp_path):
    paired, _ = checkpoints
    out = tmp_path / "efficiency.json"
    proc = _run("benchmark_unet.py", "--model", paired, "--shape", 8, 16, 16, "--repeats", 1, "--warmup", 0,
                "--threads", 1, "--device", "cpu", "--json", out, "--profile")
    from guided_diffusion.fp16_util import cpu_has_fast_bf16

    rows = json.loads(out.read_text())["results"]
    profiles = [r for r in rows if "profile" in r]
    rows = [r for r in rows if "profile" not in r]
    assert len(profiles) == len(rows) and all("convolution" in p["profile"]["categories"] for p in profiles)
    native_bf16 = cpu_has_fast_bf16()  # emulated bf16 is not measured
    assert [r["precision"] for r in rows] == (["fp32", "bf16"] if native_bf16 else ["fp32"])
    assert all(r["gflop"] == rows[0]["gflop"] > 0 for r in rows)  # the same network, counted once per forward
    for r in rows:
        assert r["gflops"] == pytest.approx(r["gflop"] / r["median_s"])
        assert r["ratio"] == pytest.approx(r["gflops"] / r["matmul_gflops"])
    assert "| fp32 |" in proc.stdout and ("| bf16 |" in proc.stdout) == native_bf16
