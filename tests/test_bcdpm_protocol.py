"""The BC-DPM 2D protocol: slice dataset (pet.slices), simulated acquisitions, BC-DPM wiring, metrics,
Table 1 output (evaluation.bcdpm_protocol), and end-to-end runs of scripts/bcdpm_protocol.py."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from guided_diffusion.evaluation import bcdpm_protocol as protocol
from guided_diffusion.pet import slices
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bcdpm_protocol.py"
SIZE, VOXEL_MM = 32, 16.0   # 512 mm: the whole body on a tiny grid
TINY_2D_FLAGS = dict(model_and_diffusion_defaults(), image_size=SIZE, dims=2, in_channels=1, num_channels=16,
                     channel_mult="1,2", num_res_blocks=1, num_heads=1, attention_resolutions="",
                     diffusion_steps=50, learn_sigma=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_script(*args):
    """``scripts/bcdpm_protocol.py ARGS`` in a subprocess (end to end); its stdout."""
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def slices_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("slices")
    printed = run_script("make-slices", "--out", out, "--subjects", 3, "--seed", 0, "--slices_per_subject", 2,
                         "--image_size", SIZE, "--voxel_mm", VOXEL_MM, "--val_subjects", 1, "--test_subjects", 1)
    assert "wrote 6 slices" in printed
    return out


def save_tiny_2d_prior(path, voxel_mm=VOXEL_MM):
    """A random 2D unconditional prior ``path`` with its JSON sidecar."""
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**TINY_2D_FLAGS)
    torch.save(model.state_dict(), path)
    meta = dict(flags=TINY_2D_FLAGS, cond="none", normalisation=dict(clip=16, scale=16, range=[-1, 1]),
                voxel_mm=voxel_mm, patch_size_zxy=[1, SIZE, SIZE])
    Path(path).with_suffix(".json").write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="module")
def evaluation(slices_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("evaluate")
    prior = save_tiny_2d_prior(work / "prior.pt")
    out = work / "out"
    printed = run_script("evaluate", "--slices", slices_dir, "--prior", prior, "--out", out, "--counts", "1e6", "1e4",
                         "--l", 2, 2, "--steps", 5, "--runs", 1, "--mlem_iters", 10, "--n_test", 2, "--n_val", 1,
                         "--bm3d_factors", 1.0, "--improved_l", 1, 2, "--improved_lams", 0, 0.5,
                         "--improved_sigma_factors", 1, 2,
                         "--device", "cpu", "--threads", 1)
    assert (out / "table.md").read_text() in printed + "\n"
    return json.loads((out / "table.json").read_text()), out


def test_make_slices_writes_body_slices_split_by_subject(slices_dir):
    manifest = json.loads((slices_dir / "manifest.json").read_text())
    assert manifest["voxel_mm"] == VOXEL_MM and manifest["split"] == {"train": 2, "val": 2, "test": 2}
    subjects = {}
    for split in slices.SPLIT_NAMES:
        names = (slices_dir / f"{split}.txt").read_text().split()
        assert len(names) == 2
        for name in names:
            with np.load(slices_dir / name) as data:
                image, affine = data["arr_0"], data["affine"]
            assert image.shape == (SIZE, SIZE, 1) and image.dtype == np.float32
            assert np.isfinite(image).all() and image.min() >= 0
            assert (image > 0.05).mean() > 0.05  # an axial slice through the body, not air
            np.testing.assert_allclose(np.diag(affine)[:3], VOXEL_MM)
            subjects.setdefault(split, set()).add(name.split("/")[1].split("_")[0])
    assert all(len(s) == 1 for s in subjects.values())   # both slices of a subject in one split
    assert len(set.union(*subjects.values())) == 3


def test_body_slice_indices_are_stratified_over_the_body():
    activity = np.zeros((4, 4, 60), np.float32)
    activity[:, :, 10:30] = 1.0
    indices = slices.body_slice_indices(activity, 4, np.random.default_rng(0))
    assert [i // 5 for i in indices] == [2, 3, 4, 5]  # one slice in each 5-slice stratum of 10..29
    with pytest.raises(ValueError, match="fewer than"):
        slices.body_slice_indices(activity, 21, np.random.default_rng(0))


def test_load_split_spreads_the_chosen_slices_over_the_list(tmp_path):
    names = [f"s{i}.npz" for i in range(5)]
    for i, name in enumerate(names):
        slices.save_slice(tmp_path / name, np.full((3, 3), i, np.float32), np.eye(4))
    (tmp_path / "test.txt").write_text("\n".join(names) + "\n")
    chosen, images = slices.load_split(tmp_path, "test", 3)
    assert chosen == ["s0.npz", "s2.npz", "s4.npz"] and images[:, 0, 0].tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="val.txt"):
        slices.load_split(tmp_path, "val", 3)


def test_high_count_slice_is_the_constant_border_gaussian_of_the_scanner_fwhm():
    from scipy import ndimage

    image = np.zeros((16, 16), np.float32)
    image[3:9, 2:14] = 2.0
    sigma_vox = 6.0 / (2 * math.sqrt(2 * math.log(2))) / 2.0
    np.testing.assert_allclose(slices.high_count_slice(image, 2.0, 6.0),
                               ndimage.gaussian_filter(image, sigma_vox, mode="constant"), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(slices.high_count_slice(image, 2.0, 0.0), image)


def test_make_slices_rejects_a_field_of_view_too_small_for_a_body(tmp_path):
    with pytest.raises(ValueError, match="cannot hold a body"):
        slices.make_slices(tmp_path, 1, 0, image_size=32, voxel_mm=4.0)


def test_acquisition_has_the_requested_counts_and_randoms_fraction(slices_dir):
    _, references = slices.load_split(slices_dir, "test", 2)
    acquisition = protocol.Acquisition(references, 1e5, VOXEL_MM, 3, [1, 2], "cpu")
    measured = acquisition.measured_counts.double().numpy()
    assert np.all(np.abs(measured - 1e5) < 5 * math.sqrt(1e5))   # Poisson total of mean 1e5
    randoms_total = acquisition.randoms.double().sum(dim=(1, 2, 3)).numpy()
    np.testing.assert_allclose(randoms_total, 1e5 * 0.2 / 1.2, rtol=1e-4)   # 20 % of the trues
    assert acquisition.low.shape == references.shape and (acquisition.low >= 0).all()


def test_bcdpm_with_only_an_identity_filter_condition_returns_the_low_count_image(slices_dir, tmp_path):
    """lam = 0, GF = identity (sigma 0), l = all steps: Eq. (10) gives x_{t-1} = y_{t-1}, so the last
    step returns y_0 exactly: the wiring (model space, layout, averaging) must give back the input."""
    model, diffusion, metadata = protocol.load_prior(str(save_tiny_2d_prior(tmp_path / "prior.pt")), 3, "cpu")
    _, references = slices.load_split(slices_dir, "test", 1)
    acquisition = protocol.Acquisition(references, 1e5, VOXEL_MM, 3, [5], "cpu")
    result = protocol.bcdpm_denoise(model, diffusion, metadata["normalisation"], acquisition, 0, steps_l=3, lam=0.0,
                                    gf_sigma_vox=0.0, runs=2, inserter_iters=1, seed=0)
    np.testing.assert_allclose(result, np.clip(acquisition.low[0], 0, 16), atol=1e-5)


def test_slice_quality_matches_hand_computed_values():
    reference = np.zeros((16, 16), np.float32)
    reference[4:12, 4:12] = 4.0
    psnr, ssim = protocol.slice_quality(reference, reference + 0.5)
    assert psnr == pytest.approx(20 * math.log10(4.0 / 0.5))
    assert ssim < 1.0
    assert protocol.slice_quality(reference, reference) == (math.inf, 1.0)
    assert protocol.slice_quality(reference, 2 * reference)[1] == pytest.approx(1.0)  # SSIM: own maximum


def test_paper_gains_are_the_published_ones():
    results = {method: {protocol.count_label(c): {"psnr": {"mean": values[0]}} for c, values in by_level.items()}
               for method, by_level in protocol.PAPER_TABLE1.items()}
    results[protocol.BCDPM_IMPROVED] = {label: {"psnr": {"mean": 40.0}} for label in ("1M", "0.3M", "0.1M")}
    results[protocol.BCDPM_PAPER] = results.pop("BC-DPM")
    gains = protocol.gain_comparison(results, [1e6, 3e5, 1e5])
    assert [label for label, _, _, _ in gains] == ["1M", "0.3M", "0.1M"]
    assert [round(paper, 1) for _, _, _, paper in gains] == [2.7, 2.4, 1.2]
    assert all(ours == pytest.approx(paper) for _, ours, _, paper in gains)
    assert gains[0][2] == pytest.approx(40.0 - protocol.PAPER_TABLE1["Gaussian"][1e6][0])


def test_evaluate_writes_the_table_with_finite_numbers(evaluation):
    report, out = evaluation
    assert report == json.loads((out / "table.json").read_text())
    assert {p.name for p in out.iterdir()} >= {"table.md", "table.json", "example.png"}
    saved = json.loads((out / "table.json").read_text())
    assert saved["settings"]["counts"] == [1e6, 1e4] and saved["settings"]["inserter_iters"] == 10
    for method in protocol.METHODS:
        for label in ("1M", "0.01M"):
            for metric in ("psnr", "ssim"):
                values = saved["results"][method][label][metric]["per_slice"]
                assert len(values) == 2 and all(math.isfinite(v) for v in values)
                summary = saved["results"][method][label][metric]
                assert summary["mean"] == pytest.approx(np.mean(values)) and summary["n"] == 2
                assert summary["sd"] == pytest.approx(np.std(values, ddof=1))
    table = (out / "table.md").read_text()
    header = "| Methods | 1M PSNR | 1M SSIM | 0.01M PSNR | 0.01M SSIM |"
    assert header in table and all(f"| {method} |" in table for method in protocol.METHODS)
    assert "| 1M |" in table and "+2.69 |" in table and "| 0.01M |" in table and "n/a" in table
    gaussian = saved["results"]["Gaussian"]["1M"]["psnr"]["mean"]
    bcdpm = saved["results"][protocol.BCDPM_PAPER]["1M"]["psnr"]["mean"]
    assert saved["gain_over_gaussian_db"][0]["toolkit_paper_algorithm"] == pytest.approx(bcdpm - gaussian)
    improved = saved["results"][protocol.BCDPM_IMPROVED]["1M"]["psnr"]["mean"]
    assert saved["gain_over_gaussian_db"][0]["toolkit_improved"] == pytest.approx(improved - gaussian)
    for label in ("1M", "0.01M"):
        tuned = saved["tuned"][label]
        assert tuned["bm3d_sigma_suv"] > 0
        # the improved variant's (l, lambda): the best of its validation grid
        grid = tuned["improved"]["grid"]
        sigma = tuned["gaussian_sigma_vox"]
        assert {(row["l"], row["lam"], row["sigma_vox"]) for row in grid} == {
            (l, lam, factor * sigma) for l in (1, 2) for lam in (0.0, 0.5) for factor in (1, 2)}
        best = max(grid, key=lambda row: row["psnr_db"])
        assert [tuned["improved"][k] for k in ("l", "lam", "sigma_vox")] == [best["l"], best["lam"], best["sigma_vox"]]


def test_low_count_psnr_drops_with_the_counts(evaluation):
    """Physics: 100x fewer events on the same slices give noisier MLEM images."""
    results = evaluation[0]["results"]["MLEM (low-count)"]
    high, low = results["1M"]["psnr"]["per_slice"], results["0.01M"]["psnr"]["per_slice"]
    assert all(h > l_value + 1.0 for h, l_value in zip(high, low))
    measured = evaluation[0]["acquisitions"]
    assert measured["1M"]["mean_measured_counts"] == pytest.approx(1e6, rel=0.01)
    assert measured["0.01M"]["mean_measured_counts"] == pytest.approx(1e4, rel=0.05)


def test_evaluate_rejects_a_3d_prior_and_mismatched_flags(slices_dir, tmp_path, make_tiny_checkpoint):
    prior_3d = make_tiny_checkpoint(tmp_path / "prior3d.pt", "none", voxel_mm=VOXEL_MM)
    def evaluate(prior, steps_l, improved_l=(1,)):
        protocol.evaluate(slices_dir, str(prior), tmp_path / "out", device="cpu", steps=5, steps_l=steps_l,
                          improved_l=improved_l)

    with pytest.raises(ValueError, match="unconditional 2D prior"):
        evaluate(prior_3d, [1, 1, 1])
    prior_4mm = save_tiny_2d_prior(tmp_path / "prior4mm.pt", voxel_mm=4.0)
    with pytest.raises(ValueError, match="trained at .* mm voxels"):
        evaluate(prior_4mm, [1, 1, 1])
    with pytest.raises(ValueError, match="one value per count level"):
        evaluate(prior_4mm, [1])
    with pytest.raises(ValueError, match="every --improved_l must be in"):
        evaluate(prior_4mm, [1, 1, 1], improved_l=(8,))
    assert not (tmp_path / "out").exists()


def test_train_script_trains_the_2d_prior_on_the_slices(slices_dir, tmp_path):
    """The docstring's train.py command (tiny) gives a prior that evaluate accepts."""
    log = tmp_path / "log"
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--cond", "none", "--dims", "2",
               "--data_dir", str(slices_dir), "--log_dir", str(log), "--patch_size", "1", str(SIZE), str(SIZE),
               "--num_channels", "16", "--channel_mult", "1,2", "--num_res_blocks", "1",
               "--attention_resolutions", "", "--diffusion_steps", "50", "--learn_sigma", "True",
               "--batch_size", "2", "--max_steps", "1", "--save_interval", "1", "--random_flip", "False",
               "--threads", "1"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    meta = json.loads((log / "model000001.json").read_text())
    assert meta["voxel_mm"] == VOXEL_MM and meta["patch_size_zxy"] == [1, SIZE, SIZE]
    assert meta["training_data"]["files"] == 2  # train.txt only
    model, diffusion, _ = protocol.load_prior(str(log / "ema_0.9999_000001.pt"), 5, "cpu")  # checks dims 2
    assert diffusion.num_timesteps == 5
    with torch.no_grad():
        output = model(torch.zeros(1, 1, SIZE, SIZE), torch.zeros(1, dtype=torch.long))
    assert output.shape == (1, 2, SIZE, SIZE)  # eps and variance (learn_sigma)


def test_a_slice_stack_goes_through_test_py_slice_by_slice_with_the_2d_prior(slices_dir, tmp_path):
    """make-stack writes a NIfTI of slices scanned slice-wise; scripts/test.py denoises it with a
    2D prior (slices batched through the network, BC-DPM in-plane on the 2D projector)."""
    stack = tmp_path / "stack"
    record = protocol.make_stack(slices_dir, stack, split="train", n_slices=2, hottest_counts=1e5, mlem_iters=5)
    low = nib.load(stack / "low.nii.gz").get_fdata()
    reference = nib.load(stack / "reference.nii.gz").get_fdata()
    assert low.shape == reference.shape == (SIZE, SIZE, 2)
    activity = reference.sum(axis=(0, 1))
    assert record["counts"] == pytest.approx((1e5 * activity / activity.max()).tolist(), rel=1e-5)
    prior = save_tiny_2d_prior(tmp_path / "prior.pt")
    out = tmp_path / "out"
    args = ["--model_path", prior,
                           "--base_samples", stack / "low.nii.gz", "--save_dir", out, "--cond_mode", "bcdpm",
                           "--bc_scanner", slices.SCANNER, "--bc_slice_counts", "1e5", "--bc_steps", 2,
                           "--bc_start", "--bc_lam_schedule", "linear", "--bc_lambda", 0.5, "--bc_recon_iters", 2,
                           "--bc_recon_subsets", 1, "--timestep_respacing", 5, "--patch_z", 2, "--patch_overlap", 0,
                           "--threads", 1, "--precision", "fp32"]
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "test.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    denoised = nib.load(out / "low_denoised.nii.gz").get_fdata()
    assert denoised.shape == low.shape and np.isfinite(denoised).all() and denoised.min() >= 0
    report = json.loads((out / "low.json").read_text())
    assert report["counts_source"] == "slice counts"
    assert report["bcdpm"]["bc_lam_schedule"] == "linear" and report["bcdpm"]["bc_start"] is True
