"""scripts/test.py end to end on tiny random checkpoints: outputs, MPI invariance, conditioning,
resume after a kill, and the one-line errors for bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from guided_diffusion.pet import volumes
from tests.mpi_helpers import REPO, mpiexec_path

SCRIPT = REPO / "scripts" / "test.py"
AFFINE = np.array([[4.0, 0, 0, -40], [0, 4.0, 0, -44], [0, 0, 4.0, 10], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, make_tiny_checkpoint):
    root = tmp_path_factory.mktemp("denoise")
    make_tiny_checkpoint(root / "paired.pt", "paired")
    make_tiny_checkpoint(root / "prior.pt", "none", respacing="10")
    rng = np.random.default_rng(0)
    low = np.abs(rng.normal(1.0, 0.5, (20, 22, 19))).astype(np.float32)
    low[5:9, 6:10, 4:8] += 6.0
    low[12:15, 14:18, 10:14] = 30.0  # above the 16-SUV clip: the hot-voxel rescale pass runs
    np.savez(root / "subject.npz", arr_0=low[None], affine=AFFINE)
    return root


def run_script(*args, mpi=0, check=True, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, str(SCRIPT), *map(str, args)]
    if mpi:
        if mpiexec_path() is None:
            pytest.skip("mpiexec not found")
        cmd = [mpiexec_path(), "-n", str(mpi)] + cmd
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


COMMON = ("--patch_z", 8, "--patch_overlap", 2, "--seed", 3)


def test_paired_outputs_keep_grid_and_affine(workdir):
    out = workdir / "out_paired"
    run_script("--model_path", workdir / "paired.pt", "--base_samples", workdir / "subject.npz",
               "--save_dir", out, "--num_ensemble", 2, *COMMON)
    names = sorted(os.listdir(out))
    for suffix in ("_denoised.nii.gz", "_denoised.npz", "_uncertainty.nii.gz",
                   "_uncertainty.npz", ".png", ".json"):
        assert "subject" + suffix in names
    image = nib.load(out / "subject_denoised.nii.gz")
    np.testing.assert_allclose(image.affine, AFFINE)
    assert image.shape == (20, 22, 19)
    denoised = np.load(out / "subject_denoised.npz")["arr_0"]
    assert denoised.shape == (1, 20, 22, 19) and np.isfinite(denoised).all()
    uncertainty = np.load(out / "subject_uncertainty.npz")["arr_0"][0]
    assert (uncertainty >= 0).all() and uncertainty.max() > 0  # two distinct members
    report = json.loads((out / "subject.json").read_text())
    assert report["cond_mode"] == "paired" and len(report["seeds"]) == 2
    assert len(set(report["seeds"])) == 2
    assert not (out / ".partial" / "subject").exists()
    # a re-run skips the finished input
    proc = run_script("--model_path", workdir / "paired.pt", "--base_samples",
                      workdir / "subject.npz", "--save_dir", out, *COMMON)
    assert "skipped" in proc.stdout


@pytest.fixture(scope="module")
def posterior(workdir, make_tiny_checkpoint):
    """A paired posterior sampler's checkpoint (one member ddim2, ensembles ddim3)."""
    return make_tiny_checkpoint(workdir / "posterior.pt", "paired", respacing="ddim2",
                                sampling=dict(ensemble_respacing="ddim3"))


def run_posterior(posterior, out, members, *extra, mpi=0):
    """scripts/test.py with ``members`` members of ``posterior`` on the subject into ``out``."""
    return run_script("--model_path", posterior, "--base_samples", posterior.parent / "subject.npz",
                      "--save_dir", out, "--num_ensemble", members, *extra, *COMMON, mpi=mpi)


def test_a_posterior_samplers_ensemble_writes_the_one_member_image_and_the_members_std(workdir, posterior):
    runs = {}
    for members in (1, 2):
        out = workdir / f"out_posterior_{members}"
        runs[members] = (out, run_posterior(posterior, out, members).stdout)
    (one, _), (two, log) = runs[1], runs[2]
    np.testing.assert_array_equal(np.load(two / "subject_denoised.npz")["arr_0"],
                                  np.load(one / "subject_denoised.npz")["arr_0"])
    report = json.loads((two / "subject.json").read_text())
    assert report["image"] == "one-member estimate" and report["settings"]["timestep_respacing"] == "ddim3"
    assert "image: the one-member estimate (timestep_respacing ddim2" in log and "std of 2 posterior samples" in log
    assert np.load(two / "subject_uncertainty.npz")["arr_0"].max() > 0


def test_one_member_writes_no_uncertainty_map(workdir):
    out = workdir / "out_one_member"
    proc = run_script("--model_path", workdir / "paired.pt", "--base_samples", workdir / "subject.npz",
                      "--save_dir", out, *COMMON)
    names = set(os.listdir(out))
    assert {"subject_denoised.nii.gz", "subject_denoised.npz", "subject.png", "subject.json"} <= names
    assert not [n for n in names if "uncertainty" in n]
    report = json.loads((out / "subject.json").read_text())
    assert report["uncertainty"].startswith("none") and "uncertainty_nii" not in report["outputs"]
    assert "no uncertainty map" in proc.stdout


@pytest.mark.slow  # the library tests cover its logic; end to end with --all
def test_sidecar_fusion_recommendation_is_the_default(workdir, make_tiny_checkpoint):
    path = make_tiny_checkpoint(workdir / "fused.pt", "paired")
    sidecar = path.with_suffix(".json")
    metadata = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(dict(metadata, sampling=dict(fusion_kappa=2.0))))
    outputs = {}
    for name, extra in (("default", ()), ("off", ("--fusion_kappa", 0))):
        out = workdir / f"out_fusion_{name}"
        proc = run_script("--model_path", path, "--base_samples", workdir / "subject.npz",
                          "--save_dir", out, *extra, *COMMON)
        outputs[name] = np.load(out / "subject_denoised.npz")["arr_0"][0]
        member = json.loads((out / "subject.json").read_text())["members"][0]
        assert member["hot_voxels"]["mode"] == "rescale"
        assert ("fusion" in member) == (name == "default")
        assert ("noise index" in proc.stdout) == (name == "default")
    low = np.load(workdir / "subject.npz")["arr_0"][0]
    # the untrained model is far from its input: fusion moves the output toward the input
    assert np.abs(outputs["default"] - low).mean() < np.abs(outputs["off"] - low).mean()
    proc = run_script("--model_path", path, "--base_samples", workdir / "subject.npz",
                      "--save_dir", workdir / "out_fusion_bad", "--fusion_kappa", -1, check=False)
    assert proc.returncode != 0 and "--fusion_kappa" in proc.stderr


PHYSICS = ("--bc_scanner", "demo", "--bc_counts", 2e6, "--bc_recon_iters", 1,
           "--bc_recon_subsets", 2)


@pytest.mark.mpi
@pytest.mark.parametrize("mode", [
    ("--cond_mode", "paired"),
    # whole-volume hooks in the last steps: BC-DPM's block and Poisson data consistency
    ("--cond_mode", "hybrid", "--bc_steps", 3, "--dc_steps", 2, *PHYSICS),
], ids=["paired", "hybrid_dc"])
def test_two_ranks_equal_one_rank(workdir, mode):
    # bit-identity needs the same kernels: the same torch threads per rank (conv reductions
    # are blocked by thread count)
    outputs = {}
    for n in (1, 2):
        out = workdir / f"out_{mode[1]}_n{n}"
        args = ("--model_path", workdir / "paired.pt", "--base_samples", workdir / "subject.npz",
                "--save_dir", out, "--threads", 1, *mode, *COMMON)
        run_script(*args, mpi=n)
        outputs[n] = np.load(out / "subject_denoised.npz")["arr_0"]
    np.testing.assert_array_equal(outputs[1], outputs[2])


@pytest.mark.mpi
def test_two_ranks_equal_one_rank_for_a_posterior_samplers_ensemble(workdir, posterior):
    """The members and the one-member image share their patches over the ranks alike."""
    outputs = {}
    for n in (1, 2):
        out = workdir / f"out_posterior_n{n}"
        run_posterior(posterior, out, 2, "--threads", 1, mpi=n)
        outputs[n] = [np.load(out / f"subject_{kind}.npz")["arr_0"] for kind in ("denoised", "uncertainty")]
    for one, two in zip(outputs[1], outputs[2]):
        np.testing.assert_array_equal(one, two)


@pytest.mark.slow  # the library tests cover its logic; end to end with --all
def test_data_consistency_pulls_the_mean_toward_the_low_dose_input(workdir):
    low = np.load(workdir / "subject.npz")["arr_0"][0]
    errors = {}
    for steps in (0, 3):
        out = workdir / f"out_dc{steps}"
        run_script("--model_path", workdir / "paired.pt", "--base_samples", workdir / "subject.npz",
                   "--save_dir", out, "--dc_steps", steps, "--dc_iters", 3, *PHYSICS, *COMMON)
        denoised = np.load(out / "subject_denoised.npz")["arr_0"][0]
        errors[steps] = abs(denoised.sum() / low.sum() - 1.0)
    # the tiny untrained model is far off; EM updates restore the total activity of the data
    assert errors[3] < 0.5 * errors[0]


@pytest.mark.slow  # the library tests cover its logic; end to end with --all
def test_independent_stitching_runs_and_differs_from_seamfree(workdir):
    results = {}
    for stitch in ("seamfree", "independent"):
        out = workdir / f"out_{stitch}"
        run_script("--model_path", workdir / "paired.pt", "--base_samples",
                   workdir / "subject.npz", "--save_dir", out, "--stitch", stitch, *COMMON)
        results[stitch] = np.load(out / "subject_denoised.npz")["arr_0"]
    assert results["seamfree"].shape == results["independent"].shape
    assert not np.array_equal(results["seamfree"], results["independent"])


@pytest.mark.slow  # the library tests cover its logic; end to end with --all
def test_bcdpm_moves_prior_sample_toward_low_dose(workdir):
    low = np.load(workdir / "subject.npz")["arr_0"][0]
    outputs = {}
    for steps in (0, 4):  # 0: the prior alone, no conditioning
        out = workdir / f"out_bc{steps}"
        run_script("--model_path", workdir / "prior.pt", "--base_samples", workdir / "subject.npz",
                   "--save_dir", out, "--cond_mode", "bcdpm", "--bc_scanner", "demo",
                   "--bc_counts", 2e6, "--bc_recon_iters", 1, "--bc_recon_subsets", 2,
                   "--bc_steps", steps, *COMMON)
        outputs[steps] = np.load(out / "subject_denoised.npz")["arr_0"][0]
    from scipy.ndimage import gaussian_filter

    smooth = gaussian_filter(low, 2.0)
    err_unconditioned = np.abs(gaussian_filter(outputs[0], 2.0) - smooth).mean()
    err_conditioned = np.abs(gaussian_filter(outputs[4], 2.0) - smooth).mean()
    assert err_conditioned < 0.5 * err_unconditioned


def test_bcdpm_settings_come_from_the_priors_tuning_table(workdir, make_tiny_checkpoint):
    from guided_diffusion.sampling.fusion import noise_index

    low = np.load(workdir / "subject.npz")["arr_0"][0]
    index = noise_index(low)
    tuned = make_tiny_checkpoint(workdir / "tuned_prior.pt", "none", respacing="10")
    sidecar = tuned.with_suffix(".json")
    table = [dict(drf=4, noise_index=0.5 * index, bc_lambda=0.3, bc_sigma_mm=6.0, bc_steps=1,
                  hot_voxels="clip", members=2),
             dict(drf=100, noise_index=50 * index, bc_lambda=0.05, bc_sigma_mm=12.0, bc_steps=3, members=2)]
    metadata = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(dict(metadata, sampling=dict(bc_tuning=table, bc_start=True,
                                                                bc_steps=2))))
    common = ("--model_path", tuned, "--base_samples", workdir / "subject.npz", "--cond_mode", "bcdpm",
              *PHYSICS, *COMMON)
    out = workdir / "out_bc_tuned"
    proc = run_script("--save_dir", out, *common)
    result = json.loads((out / "subject.json").read_text())
    report = result["bcdpm"]
    # the nearer noise level's row, l included: one step from the diffused input
    assert (report["bc_lambda"], report["bc_sigma_mm"], report["bc_steps"]) == (0.3, 6.0, 1)
    assert report["bc_lambda_source"] == report["bc_steps_source"] == "tuning"
    assert report["noise_index"] == pytest.approx(index)
    assert result["members"][0]["network_evaluations_per_patch"] == 1
    assert ("BC-DPM l 1 (tuning), lambda 0.3 (tuning), schedule constant (default), sigma 6 mm (tuning), "
            "hot voxels clip (tuning)") in proc.stdout
    assert result["members"][0]["hot_voxels"]["mode"] == "clip"
    # the table was tuned on 2-member means: two members by default, with an uncertainty map
    assert len(result["members"]) == 2 and "2 member(s) (the checkpoint default)" in proc.stdout
    assert "flips none (default)" in proc.stdout
    assert (out / "subject_uncertainty.npz").exists()
    # the same values given explicitly give the same volume
    out_given = workdir / "out_bc_given"
    run_script("--save_dir", out_given, "--bc_lambda", 0.3, "--bc_sigma_mm", 6, "--bc_steps", 1,
               "--hot_voxels", "clip", "--num_ensemble", 2, *common)
    given = json.loads((out_given / "subject.json").read_text())["bcdpm"]
    assert given["bc_lambda_source"] == given["bc_steps_source"] == "given"
    np.testing.assert_array_equal(np.load(out / "subject_denoised.npz")["arr_0"],
                                  np.load(out_given / "subject_denoised.npz")["arr_0"])


@pytest.mark.slow  # the library tests cover its logic; end to end with --all
def test_bcdpm_takes_a_cond_dropout_checkpoint_as_its_prior(workdir, make_tiny_checkpoint):
    both = make_tiny_checkpoint(workdir / "both.pt", "paired")
    sidecar = both.with_suffix(".json")
    sidecar.write_text(json.dumps(dict(json.loads(sidecar.read_text()), cond_dropout=0.2)))
    bcdpm = ("--base_samples", workdir / "subject.npz", "--cond_mode", "bcdpm", "--bc_scanner", "demo",
             "--bc_counts", 2e6, "--bc_recon_iters", 1, "--bc_recon_subsets", 2, "--bc_steps", 2, *COMMON)
    out = workdir / "out_both_bcdpm"
    run_script("--model_path", both, "--save_dir", out, *bcdpm)
    report = json.loads((out / "subject.json").read_text())
    assert report["cond_mode"] == "bcdpm"
    assert np.isfinite(np.load(out / "subject_denoised.npz")["arr_0"]).all()
    proc = run_script("--model_path", workdir / "paired.pt", "--save_dir", workdir / "out_paired_bcdpm",
                      *bcdpm, check=False)
    assert proc.returncode == 2 and "--cond_dropout" in proc.stderr


def test_interrupted_run_resumes_to_the_same_result(workdir):
    common = ("--model_path", workdir / "paired.pt", "--base_samples", workdir / "subject.npz",
              "--num_ensemble", 3, "--timestep_respacing", "25", "--use_ddim", "False",
              "--threads", 1, *COMMON)
    reference = workdir / "out_reference"
    run_script(*common, "--save_dir", reference)

    out = workdir / "out_killed"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, common), "--save_dir", str(out)],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = out / ".partial" / "subject"
    deadline = time.time() + 120

    def finished_members():  # not the hidden temporary file of a member still being written
        return sorted(partial.glob("member*.npz")) if partial.is_dir() else []

    while time.time() < deadline and proc.poll() is None:
        if finished_members():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    if not finished_members() or proc.returncode == 0:
        pytest.skip("the run finished before it could be interrupted")
    assert not (out / "subject.json").exists()
    proc = run_script(*common, "--save_dir", out)
    assert "resuming" in proc.stdout
    np.testing.assert_array_equal(np.load(out / "subject_denoised.npz")["arr_0"],
                                  np.load(reference / "subject_denoised.npz")["arr_0"])


def _bad_npz(path, **arrays):
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


@pytest.mark.parametrize("case", ["nan", "2d", "2d_stack", "2d_nifti", "empty", "missing_key", "garbage"])
def test_bad_inputs_exit_with_one_line_naming_the_file(workdir, case):
    bad = workdir / f"bad_{case}.npz"
    if case == "nan":
        volume = np.ones((1, 16, 16, 8), np.float32)
        volume[0, 1, 1, 1] = np.nan
        _bad_npz(bad, arr_0=volume)
    elif case == "2d":
        _bad_npz(bad, arr_0=np.ones((16, 16), np.float32))
    elif case == "2d_stack":  # [low, full] 2D slices: arr_0[0] is (X, Y)
        _bad_npz(bad, arr_0=np.ones((2, 16, 16), np.float32))
    elif case == "2d_nifti":  # one slice
        bad = workdir / "bad_2d_nifti.nii.gz"
        nib.save(nib.Nifti1Image(np.ones((16, 16, 1), np.float32), AFFINE), bad)
    elif case == "empty":
        bad.write_bytes(b"")
    elif case == "missing_key":
        _bad_npz(bad, volume=np.ones((16, 16, 8), np.float32))
    else:
        bad.write_bytes(b"this is not a zip file")
    out = workdir / f"out_bad_{case}"
    proc = run_script("--model_path", workdir / "paired.pt", "--base_samples", bad,
                      "--save_dir", out, *COMMON, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and str(bad.name) in lines[-1]
    assert "Traceback" not in proc.stderr
    if case.startswith("2d"):
        assert "2D" in lines[-1] and "(16, 16" in lines[-1]
    assert not [n for n in os.listdir(out) if not n.startswith(".")]


def test_a_file_that_is_not_a_checkpoint_is_one_line(workdir):
    garbage = workdir / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    proc = run_script("--model_path", garbage, "--base_samples", workdir / "subject.npz",
                      "--save_dir", workdir / "out_garbage", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "garbage.pt" in lines[0] and "not a readable torch checkpoint" in lines[0]


def test_unwritable_save_dir_and_mismatched_checkpoint(workdir):
    blocker = workdir / "a_file"
    blocker.write_text("x")
    proc = run_script("--model_path", workdir / "paired.pt", "--base_samples",
                      workdir / "subject.npz", "--save_dir", blocker / "sub", *COMMON, check=False)
    assert proc.returncode == 2 and "not writable" in proc.stderr
    proc = run_script("--model_path", workdir / "paired.pt", "--base_samples",
                      workdir / "subject.npz", "--save_dir", workdir / "out_mismatch",
                      "--num_channels", 32, *COMMON, check=False)
    assert proc.returncode == 2
    assert "paired.pt" in proc.stderr and "error:" in proc.stderr
    proc = run_script("--model_path", workdir / "prior.pt", "--cond_mode", "paired",
                      "--base_samples", workdir / "subject.npz", "--save_dir",
                      workdir / "out_wrong_mode", *COMMON, check=False)
    assert proc.returncode == 2 and "unconditional" in proc.stderr


def test_dicom_in_gives_a_denoised_dicom_series_out(workdir):
    """DICOM in -> test.py -> DICOM out, read back: the npz output's values (16-bit), the input's
    affine; ``--dicom_out always`` also writes one for an npz input, ``never`` none."""
    from tests.dicom_helpers import write_pet_series

    series = workdir / "dicom_in"
    series.mkdir()
    pixels = np.abs(np.random.default_rng(4).normal(800, 200, (20, 22, 8))).astype(np.uint16)
    write_pet_series(series, pixels, [1.0] * 8, 0.0, 70.0, 370e6, 6586.2, "100000.00", "110000",
                     PatientName="Test^Patient", PatientID="P123")
    out = workdir / "out_dicom"
    run_script("--model_path", workdir / "paired.pt", "--base_samples", series, "--save_dir", out,
               "--num_ensemble", 2, *COMMON)
    _, input_affine = volumes.load_volume(series)
    for kind in ("denoised", "uncertainty"):
        written, affine = volumes.load_volume(out / f"dicom_in_{kind}_dicom")
        expected = np.load(out / f"dicom_in_{kind}.npz")["arr_0"][0]
        np.testing.assert_allclose(affine, input_affine, atol=1e-4)
        slope = expected.max(axis=(0, 1)) / 65535  # the writer's per-slice quantisation
        assert (np.abs(written - expected) <= slope / 2 * 1.001 + 1e-6).all()
    report = json.loads((out / "dicom_in.json").read_text())
    assert set(report["dicom"]) == {"denoised", "uncertainty"}
    import pydicom

    first = pydicom.dcmread(sorted((out / "dicom_in_denoised_dicom").iterdir())[0])
    assert first.PatientID == "P123" and "pet-3d-ddpm denoised (paired, paired.pt)" == first.SeriesDescription
    for flag, expect in (("always", True), ("never", False)):
        npz_out = workdir / f"out_dicom_{flag}"
        run_script("--model_path", workdir / "paired.pt", "--base_samples", workdir / "subject.npz",
                   "--save_dir", npz_out, "--dicom_out", flag, *COMMON)
        assert (npz_out / "subject_denoised_dicom").is_dir() == expect


def test_x0_skip_sigma_is_a_sampling_flag_not_a_model_override():
    """The sidecar's trained blend width must not reach the resolver as a given flag (the
    ensemble spread fit would never apply), nor a given width the model loader."""
    from scripts import test as denoise

    metadata = dict(flags=dict(predict_xstart=True, x0_skip_sigma=0.025), cond="paired")
    required = ["--base_samples", "in.npz", "--save_dir", "out"]
    args = denoise.create_argparser(metadata).parse_args(required)
    assert args.x0_skip_sigma is None
    assert "x0_skip_sigma" not in denoise.model_overrides(args, metadata, "10")
    args = denoise.create_argparser(metadata).parse_args(required + ["--x0_skip_sigma", "0.05"])
    assert args.x0_skip_sigma == 0.05
    assert denoise.model_overrides(args, metadata, "10") == dict(timestep_respacing="10")
