"""guided_diffusion.pet.dataset and scripts/make_dataset.py: files and manifests, resume,
determinism, noise vs dose, MPI; randomised datasets: recorded choices, exact reproduction,
held-out settings."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from guided_diffusion.pet import acquisition, volumes
from guided_diffusion.pet.acquisition import ScanSettings
from guided_diffusion.pet.dataset import (
    DatasetError,
    DatasetSettings,
    make_dataset,
    reproduce_sample,
    split_subjects,
    subject_sample,
    subject_seed,
)
from guided_diffusion.pet.phantoms import ORGAN_LABELS, make_phantom

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_dataset.py"
OPTIONS = ["--seed", "1", "--voxel_mm", "6.6", "--drf", "4", "16", "--iterations", "2", "--subsets", "4",
           "--threads", "1"]
TINY = ["--subjects", "1", *OPTIONS]
#: The same dataset as TINY, for the library.
TINY_SETTINGS = dict(subjects=1, seed=1, voxel_mm=6.6, drf=[4, 16], iterations=2, subsets=4)
#: A randomised dataset of two cheap subjects (seed 0 draws OSEM 2x4 PSF at 4 mm for the test
#: subject and OSEM 2x8 at 2.6 mm, resampled to the 4 mm model grid, for the training one).
RANDOMISED = dict(subjects=2, seed=0, voxel_mm=4.0, randomise=True, split=[0.5, 0, 0.5],
                  fov_mm=[200.0, 160.0, 40.0], tracers=["FDG", "PSMA"], drfs_per_subject=2,
                  hold_out=["mlem100_nopsf", "1.65"])
RANDOMISED_FLAGS = ["--subjects", "2", "--seed", "0", "--voxel_mm", "4", "--randomise", "--split", "0.5", "0", "0.5",
                    "--fov_mm", "200", "160", "40", "--tracers", "FDG", "PSMA", "--drfs_per_subject", "2",
                    "--hold_out", "mlem100_nopsf", "1.65"]


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
    scan = acquisition.fixed_scan("demo", iterations=1, subsets=4, voxel_mm=6.6)
    run = lambda seed: acquisition.simulate_scan(phantom, scan, [4.0], seed, 2e6 / 66.0, slab=8)
    a, b, c = run(7), run(7), run(8)
    # [full, low], Z padded to slabs and cropped back
    assert a["full"].shape == phantom.activity.shape and a["low"].shape == (1,) + phantom.activity.shape
    np.testing.assert_array_equal(a["low"], b["low"])
    assert a["prompts"] == b["prompts"] and np.abs(a["full"] - c["full"]).max() > 0
    assert a["prompts"][0] == pytest.approx(2e6, rel=0.01)


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


def _run_two_ranks(out, *args):
    from tests.mpi_helpers import mpiexec_path

    mpiexec = mpiexec_path()
    if mpiexec is None:
        pytest.skip("mpiexec not found")
    result = _run("--out", out, *args, launcher=(mpiexec, "-n", "2"))
    assert result.returncode == 0, result.stderr


@pytest.mark.mpi
def test_mpi_two_ranks_match_a_single_process(tmp_path, tiny):
    out = tmp_path / "mpi"
    _run_two_ranks(out, "--subjects", "2", *OPTIONS)
    dataset = json.loads((out / "manifest.json").read_text())
    assert [e["subject"] for e in dataset["entries"]] == ["s0000", "s0001"]
    for name in ("s0000_FDG_drf4.npz", "s0000_FDG_truth.nii.gz"):
        np.testing.assert_array_equal(volumes.load_volume(out / "s0000" / name)[0],
                                      volumes.load_volume(tiny / "s0000" / name)[0])


@pytest.fixture(scope="module")
def randomised(tmp_path_factory):
    out = tmp_path_factory.mktemp("randomised")
    with acquisition.torch_threads(2):  # the data must not depend on the caller's thread count
        result = make_dataset(DatasetSettings(out=str(out), **RANDOMISED))
    assert result["made"] == 2
    return out


def _subjects(out):
    return [json.loads((out / f"s000{i}" / "manifest.json").read_text()) for i in range(2)]


def test_randomised_manifests_record_every_choice(randomised):
    dataset = json.loads((randomised / "manifest.json").read_text())
    assert dataset["held_out"] == {"labels": ["mlem100_nopsf", "1.65"], "splits": ["train", "val"]}
    assert "drf" not in dataset and dataset["randomisation"]["drf_range"] == [2.0, 200.0]
    assert dataset["randomisation"]["threads"] == 1 and dataset["voxel_mm"] == 4.0
    for subject, entry in zip(_subjects(randomised), dataset["entries"]):
        sample = subject["sample"]
        assert entry["sample"] == sample and sample["randomised"] and sample["threads"] == 1
        scan = ScanSettings.from_dict(sample["scan"])
        assert sample["label"] == scan.label() and sample["native_voxel_mm"] == scan.voxel_mm
        assert subject["config"]["scanner_settings"]["mode"] == scan.mode
        assert subject["config"]["scanner_settings"]["randoms_fraction"] == scan.randoms_fraction
        assert sample["anatomy"] == "whole_body" and len(sample["tracers"]) == 1
        assert sample["held_out"] == (RANDOMISED["hold_out"] if subject["split"] == "train" else [])
        drfs = sample["drfs"]
        assert len(drfs) == 2 and drfs == sorted(drfs) and all(2 <= d <= 200 for d in drfs)
        assert sample["model_voxel_mm"] == 4.0 and sample["resample"]
        tracer = sample["tracers"][0]
        pairs = [f for f in subject["files"] if f["kind"] == "pair"]
        assert [f["drf"] for f in pairs] == drfs and all(f["tracer"] == tracer for f in pairs)
        low, affine = volumes.load_volume(randomised / subject["subject"] / pairs[0]["file"])
        organs, organ_affine = volumes.load_volume(
            randomised / subject["subject"] / f"{subject['subject']}_organs.nii.gz")
        np.testing.assert_allclose(volumes.voxel_sizes(affine), 4.0, rtol=1e-6)  # the model grid
        np.testing.assert_allclose(organ_affine, affine, atol=1e-5)
        assert low.shape == organs.shape == tuple(subject["shape"])
        assert set(np.unique(organs)) <= set(ORGAN_LABELS.values())  # nearest neighbour: labels stay labels
    samples = [s["sample"] for s in _subjects(randomised)]
    assert [s["native_voxel_mm"] for s in samples] == [4.0, 2.6]  # one resampled, one already on the grid
    assert (randomised / "train.txt").read_text().split() == [
        f"s0001/{f['file']}" for f in _subjects(randomised)[1]["files"] if f["kind"] == "pair"]


def test_a_manifest_entry_reproduces_its_sample_exactly(randomised):
    dataset = json.loads((randomised / "manifest.json").read_text())
    for subject, entry in zip(_subjects(randomised), dataset["entries"]):
        for source in (subject, entry):  # a subject manifest or a dataset manifest entry
            (tracer, result), = reproduce_sample(source).items()  # on one thread, the fixture ran on two
            for drf, low in zip(subject["sample"]["drfs"], result["low"]):
                pair = randomised / subject["subject"] / f"{subject['subject']}_{tracer}_drf{drf:g}.npz"
                np.testing.assert_array_equal(volumes.load_volume(pair)[0], low)
                np.testing.assert_array_equal(volumes.load_volume(pair, index=1)[0], result["full"])
            assert result["prompts"][0] == subject["tracers"][tracer]["counts"]["full"]


def test_randomised_rerun_skips_finished_subjects_and_refuses_other_settings(randomised):
    assert make_dataset(DatasetSettings(out=str(randomised), **RANDOMISED))["made"] == 0
    with pytest.raises(DatasetError, match="other parameters"):
        make_dataset(DatasetSettings(out=str(randomised), **dict(RANDOMISED, hold_out=["ssrb"])))


def test_held_out_settings_never_reach_train_or_val():
    settings = DatasetSettings(out="x", subjects=300, randomise=True, tracers=["FDG", "PSMA"],
                               hold_out=["ssrb", "nopsf", "2.6", "PSMA"]).checked()
    splits = split_subjects(300, settings.split, settings.seed)
    samples = [subject_sample(settings, i, splits[i]) for i in range(300)]
    trained = [s for s, i in zip(samples, range(300)) if splits[i] in ("train", "val")]
    tested = [s for s, i in zip(samples, range(300)) if splits[i] == "test"]
    assert len(trained) == 270 and len(tested) == 30
    for sample in trained:
        assert not set(ScanSettings.from_dict(sample["scan"]).tags()) & set(settings.hold_out)
        assert sample["tracers"] == ["FDG"] and sample["held_out"] == settings.hold_out
    test_tags = [set(ScanSettings.from_dict(s["scan"]).tags()) for s in tested]
    assert all(any(label in tags for tags in test_tags) for label in ("ssrb", "nopsf"))
    assert any(s["tracers"] == ["PSMA"] for s in tested) and all(s["held_out"] == [] for s in tested)


def test_randomised_flags_are_checked(capsys):
    script = runpy.run_path(str(SCRIPT))
    settings = script["settings_from_args"](script["create_argparser"]().parse_args(["--out", "x", *RANDOMISED_FLAGS]))
    assert settings.checked() == DatasetSettings(out="x", **RANDOMISED).checked()
    for flags, problem in ((["--randomise", "--drf", "4"], "--drf cannot be used with --randomise"),
                           (["--hold_out", "ssrb"], "--hold_out need --randomise"),
                           (["--resample"], "--resample need --randomise"),
                           (["--randomise", "--hold_out", "mlem7"], "match nothing"),
                           (["--randomise", "--hold_out", "2d", "ssrb"], "leaves")):
        assert script["main"](["--out", "x", "--subjects", "1", *flags]) == 2
        assert problem in capsys.readouterr().err
    assert not os.path.exists("x")


@pytest.mark.mpi
def test_mpi_randomised_matches_a_single_process(tmp_path, randomised):
    out = tmp_path / "mpi"
    _run_two_ranks(out, *RANDOMISED_FLAGS, "--threads", "2")  # ranks and threads change nothing
    for subject in _subjects(randomised):
        for f in subject["files"]:
            if f["file"].endswith(".npz"):
                np.testing.assert_array_equal(volumes.load_volume(out / subject["subject"] / f["file"])[0],
                                              volumes.load_volume(randomised / subject["subject"] / f["file"])[0])
