"""guided_diffusion.pet.dataset and scripts/make_dataset.py: files and manifests, resume,
determinism, noise vs dose, MPI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from guided_diffusion.pet import volumes
from guided_diffusion.pet.dataset import (
    SCANNERS,
    DatasetError,
    DatasetSettings,
    make_dataset,
    simulate_scan,
    split_subjects,
    subject_seed,
)
from guided_diffusion.pet.phantoms import ORGAN_LABELS, make_phantom
from guided_diffusion.pet.projector import make_projector

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_dataset.py"
OPTIONS = ["--seed", "1", "--voxel_mm", "6.6", "--drf", "4", "16", "--iterations", "2", "--subsets", "4",
           "--threads", "1"]
TINY = ["--subjects", "1", *OPTIONS]
#: The same dataset as TINY, for the library.
TINY_SETTINGS = dict(subjects=1, seed=1, voxel_mm=6.6, drf=[4, 16], iterations=2, subsets=4)


def _run(*args, launcher=()):
    env = {k: v for k, v in os.environ.items() if k not in ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE")}
    return subprocess.run([*launcher, sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset")
    result = _run("--out", out, *TINY)
    assert result.returncode == 0, result.stderr
    return out


def test_tiny_run_writes_files_and_manifests(tiny):
    subject = json.loads((tiny / "s0000" / "manifest.json").read_text())
    dataset = json.loads((tiny / "manifest.json").read_text())
    names = {f["file"] for f in subject["files"]}
    assert {"s0000_FDG_drf4.npz", "s0000_FDG_drf16.npz", "s0000_FDG_full.nii.gz", "s0000_FDG_truth.nii.gz",
            "s0000_FDG_lesions.nii.gz", "s0000_mu.nii.gz", "s0000_organs.nii.gz"} == names
    assert all((tiny / "s0000" / n).is_file() for n in names)
    assert dataset["seed"] == 1 and dataset["drf"] == [4.0, 16.0] and dataset["scanner"] == "demo"
    assert dataset["split"]["train"] == ["s0000"]
    assert (tiny / "train.txt").read_text().split() == ["s0000/s0000_FDG_drf4.npz", "s0000/s0000_FDG_drf16.npz"]
    assert volumes.list_inputs(tiny / "train.txt") == [str(tiny / "s0000" / f"s0000_FDG_drf{d}.npz") for d in (4, 16)]
    # published layout, aligned with the truth, and the DRF / counts recorded per file
    low, affine = volumes.load_volume(tiny / "s0000" / "s0000_FDG_drf4.npz")
    full, _ = volumes.load_volume(tiny / "s0000" / "s0000_FDG_drf4.npz", index=1)
    truth, truth_affine = volumes.load_volume(tiny / "s0000" / "s0000_FDG_truth.nii.gz")
    assert low.shape == full.shape == truth.shape == tuple(subject["shape"])
    np.testing.assert_allclose(affine, truth_affine, atol=1e-5)
    phantom = make_phantom(subject["seed"], voxel_mm=6.6)
    np.testing.assert_allclose(truth, phantom.activity, rtol=1e-6)
    counts = subject["tracers"]["FDG"]["counts"]
    assert counts["drf4"] == pytest.approx(counts["full"] / 4, rel=0.01)
    entry = next(f for f in subject["files"] if f["file"] == "s0000_FDG_drf16.npz")
    assert entry["drf"] == 16.0 and entry["counts"] == counts["drf16"]
    # the image is in SUV: its total activity matches the phantom's within a few percent
    assert full.sum() == pytest.approx(truth.sum(), rel=0.05)


def test_rerun_skips_finished_subjects(tiny):
    manifest = tiny / "s0000" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    result = make_dataset(DatasetSettings(out=str(tiny), **TINY_SETTINGS))
    assert result == dict(rank=0, size=1, made=0, finished=1)
    assert manifest.stat().st_mtime_ns == before
    with pytest.raises(DatasetError, match="other parameters"):
        make_dataset(DatasetSettings(out=str(tiny), **dict(TINY_SETTINGS, counts_per_mm=1e5)))


def test_low_dose_noise_grows_as_sqrt_drf(tiny):
    """Low minus full dose is pure noise (thinned counts share the signal): std ~ sqrt(DRF - 1)."""
    organs, _ = volumes.load_volume(tiny / "s0000" / "s0000_organs.nii.gz")
    lesions, _ = volumes.load_volume(tiny / "s0000" / "s0000_FDG_lesions.nii.gz")
    liver = ndimage.binary_erosion(organs == ORGAN_LABELS["liver"], iterations=2)
    liver &= ~ndimage.binary_dilation(lesions > 0, iterations=2)
    assert liver.sum() > 500
    noise = {}
    for drf in (4, 16):
        pair = tiny / "s0000" / f"s0000_FDG_drf{drf}.npz"
        low, full = (volumes.load_volume(pair, index=i)[0] for i in (0, 1))
        noise[drf] = (low - full)[liver].std()
    assert noise[16] / noise[4] == pytest.approx(np.sqrt(15 / 3), rel=0.2)
    # the full-dose image is visibly less noisy than the low-dose ones in the liver
    full_std = volumes.load_volume(tiny / "s0000" / "s0000_FDG_drf4.npz", index=1)[0][liver].std()
    low_std = volumes.load_volume(tiny / "s0000" / "s0000_FDG_drf16.npz")[0][liver].std()
    assert low_std > 1.8 * full_std


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small volumes: one thread is fastest on a shared machine
    yield
    torch.set_num_threads(threads)


def test_simulation_is_deterministic_per_seed(one_thread):
    phantom = make_phantom(2, voxel_mm=6.6, fov_mm=(528.0, 330.0, 66.0))
    settings = SCANNERS["demo"]
    projector = make_projector(settings["preset"], (80, 50, 8), 6.6, mode=settings["mode"],
                               psf_fwhm_mm=settings["psf_fwhm_mm"], view_mashing=settings["view_mashing"])
    run = lambda seed: simulate_scan(phantom.activity, phantom.mu, projector, [4.0], 2e6, settings, 1, 4, seed)
    (a, counts_a), (b, counts_b), (c, _) = run(7), run(7), run(8)
    assert a.shape == (2,) + phantom.activity.shape  # [full, low], Z padded to slabs and cropped back
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(counts_a, counts_b)
    assert np.abs(a - c).max() > 0
    assert counts_a[0] == pytest.approx(2e6, rel=0.01)


def test_seeds_and_split_do_not_depend_on_ranks():
    seeds = [subject_seed(3, i) for i in range(5)]
    assert len(set(seeds)) == 5 and seeds == [subject_seed(3, i) for i in range(5)]
    split = split_subjects(10, [0.8, 0.1, 0.1], 3)
    assert sorted(split) == list(range(10))
    assert [list(split.values()).count(s) for s in ("train", "val", "test")] == [8, 1, 1]
    assert split == split_subjects(10, [8, 1, 1], 3)


def test_bad_settings_are_refused_before_anything_is_written(tmp_path):
    for change, problem in ((dict(drf=[0.5]), "--drf"), (dict(tracers=["XYZ"]), "XYZ"),
                            (dict(subjects=0), "--subjects"), (dict(split=[0, 0, 0]), "--split")):
        with pytest.raises(DatasetError, match=problem):
            make_dataset(DatasetSettings(out=str(tmp_path / "out"), **dict(TINY_SETTINGS, **change)))
    checked = DatasetSettings(out="x", subjects=1, drf=[4, 10], tracers=["fdg"]).checked()
    assert checked.drf == [4.0, 10.0] and checked.tracers == ["FDG"]
    result = _run("--out", tmp_path / "out", "--subjects", "1", "--drf", "0.5")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "make_dataset.py: error: --drf values must be distinct and >= 1, got [0.5]\n"
    assert os.listdir(tmp_path) == []


@pytest.mark.mpi
def test_mpi_two_ranks_match_a_single_process(tmp_path, tiny):
    from tests.mpi_helpers import mpiexec_path

    mpiexec = mpiexec_path()
    if mpiexec is None:
        pytest.skip("mpiexec not found")
    out = tmp_path / "mpi"
    result = _run("--out", out, "--subjects", "2", *OPTIONS, launcher=(mpiexec, "-n", "2"))
    assert result.returncode == 0, result.stderr
    dataset = json.loads((out / "manifest.json").read_text())
    assert [e["subject"] for e in dataset["entries"]] == ["s0000", "s0001"]
    for name in ("s0000_FDG_drf4.npz", "s0000_FDG_truth.nii.gz"):
        np.testing.assert_array_equal(volumes.load_volume(out / "s0000" / name)[0],
                                      volumes.load_volume(tiny / "s0000" / name)[0])
