"""The shipped demo checkpoints: hashes, safe loading, metadata that builds the right model, and
the demo launcher end to end on a small phantom."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from guided_diffusion.checkpoint_hub import absolute_paths, interpolate_checkpoints, package, update_sampling
from guided_diffusion.checkpoints import load_model_and_diffusion, read_metadata
from tests.mpi_helpers import REPO

CHECKPOINTS = REPO / "checkpoint"
SHIPPED = ("demo_paired.pt", "demo_prior.pt", "demo_unet.pt", "bcdpm_prior2d.pt")
TRAINING_SETS = {"demo_paired.pt": ([(302, 40), (300, 40)], 240), "demo_prior.pt": ([(500, 64), (300, 40)], 184),
                 "demo_unet.pt": ([(300, 80)], 240)}
"""(seed, subjects) of each checkpoint's make_dataset.py training sets, and their pair count."""


def _sums():
    entries = {}
    for line in (CHECKPOINTS / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        entries[name.lstrip("*")] = digest
    return entries


@pytest.mark.parametrize("name", SHIPPED)
def test_checkpoint_matches_sha256sums_and_sidecar(name):
    data = (CHECKPOINTS / name).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert _sums()[name] == digest
    assert read_metadata(CHECKPOINTS / name)["sha256"] == digest


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_sidecars_record_no_absolute_paths(name):
    metadata = read_metadata(CHECKPOINTS / name)
    assert absolute_paths(metadata) == []
    data = metadata["training_data"]
    if name == "bcdpm_prior2d.pt":  # the protocol's slice generator, seeds other than its test slices'
        assert data["generator"] == "scripts/bcdpm_protocol.py make-slices" and "--seed 400" in data["commands"][0]
        assert metadata["flags"]["dims"] == 2 and metadata["flags"]["sigma_small"] is True
        return
    assert data["generator"] == "scripts/make_dataset.py"
    sets, files = TRAINING_SETS[name]
    assert data["files"] >= sum(d["files"] for d in data["datasets"]) == files
    assert [(d["seed"], d["subjects"]) for d in data["datasets"]] == sets


@pytest.mark.parametrize("name, cond", [("demo_paired.pt", "paired"), ("demo_prior.pt", "none"),
                                       ("demo_unet.pt", "paired"), ("bcdpm_prior2d.pt", "none")])
def test_checkpoint_loads_safely_and_builds_its_model(name, cond):
    state = torch.load(CHECKPOINTS / name, map_location="cpu", weights_only=True)
    assert all(torch.is_tensor(v) for v in state.values())
    model, diffusion, meta = load_model_and_diffusion(CHECKPOINTS / name, device="cpu")
    assert meta["cond"] == cond
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in model.state_dict().values())
    assert (CHECKPOINTS / name).stat().st_size < 26 * 2**20
    # one denoising call on a small legal patch gives a finite output of the right shape
    shape = (4, 32, 32) if meta["flags"]["dims"] == 3 else (32, 32)
    inputs = torch.zeros(1, 1, *shape)
    kwargs = {"low_res": inputs} if cond == "paired" else {}
    with torch.no_grad():
        out = model(inputs, torch.tensor([10]), **kwargs)
    assert out.shape[2:] == shape and torch.isfinite(out).all()


@pytest.mark.e2e
def test_demo_launcher_end_to_end(tmp_path):
    # SKIP_SETUP: use this interpreter's environment (its bin/ holds python and mpiexec)
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    env = dict(os.environ, SKIP_SETUP="1", SAVE_DIR=str(tmp_path / "demo"),
               DEMO_FOV_MM="200 140 60", STEPS="ddim4", PATH=path)
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run(["bash", str(REPO / "test_DDPM_3d_mpi.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "demo"
    for suffix in ("_denoised.nii.gz", "_denoised.npz", ".png", ".json", "_metrics.json"):
        assert (out / f"s0000_FDG_drf10{suffix}").exists(), suffix
    assert not (out / "s0000_FDG_drf10_uncertainty.nii.gz").exists()  # one ensemble member
    metrics = json.loads((out / "s0000_FDG_drf10_metrics.json").read_text())
    methods = {record["method"]: record for record in metrics["records"]}
    assert set(methods) == {"low_dose", "denoised"}
    for record in methods.values():  # finite image-quality numbers against the full dose
        assert record["psnr"] is not None and 0 < record["psnr"] < 100
    denoised = np.load(out / "s0000_FDG_drf10_denoised.npz")["arr_0"]
    assert np.isfinite(denoised).all() and denoised.max() > 0


def test_package_checkpoint_merges_sampling_and_lists_the_hash(tmp_path, make_tiny_checkpoint):
    source = make_tiny_checkpoint(tmp_path / "model000010.pt", "none", sampling=dict(bc_steps=10))
    dest = tmp_path / "shipped"
    dest.mkdir()
    tuning = [dict(drf=4.0, noise_index=0.01, bc_lambda=0.2, bc_sigma_mm=4.0)]
    subprocess.run([sys.executable, str(REPO / "scripts" / "package_checkpoint.py"), str(source),
                    "--name", "tiny_prior", "--dest", str(dest),
                    "--sampling", json.dumps(dict(bc_steps=3, patch_z=10)),
                    "--sampling", json.dumps(dict(bc_tuning=tuning)),
                    "--training_data", json.dumps(dict(generator="scripts/make_dataset.py"))], check=True, cwd=REPO,
                   capture_output=True)
    metadata = read_metadata(dest / "tiny_prior.pt")
    # later --sampling dicts merge over earlier ones and over the training sidecar's
    assert metadata["sampling"] == dict(timestep_respacing="ddim5", bc_steps=3, patch_z=10, bc_tuning=tuning)
    # the description merges over the training sidecar's dataset record
    source_data = read_metadata(source).get("training_data", {})
    assert metadata["training_data"] == dict(source_data, generator="scripts/make_dataset.py")
    digest = hashlib.sha256((dest / "tiny_prior.pt").read_bytes()).hexdigest()
    assert metadata["sha256"] == digest
    assert (dest / "SHA256SUMS").read_text() == f"{digest}  tiny_prior.pt\n"
    state = torch.load(dest / "tiny_prior.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in torch.load(source, weights_only=True).items())


def test_update_sampling_merges_into_a_shipped_sidecar_and_leaves_the_weights(tmp_path, make_tiny_checkpoint):
    source = make_tiny_checkpoint(tmp_path / "model000010.pt", "paired")
    target, card = package(str(source), "tiny", str(tmp_path / "shipped"), sampling=dict(patch_overlap=4))
    weights = open(target, "rb").read()
    subprocess.run([sys.executable, str(REPO / "scripts" / "package_checkpoint.py"), target, "--update",
                    "--sampling", json.dumps(dict(flips="zxy"))], check=True, cwd=REPO, capture_output=True)
    updated = read_metadata(target)
    assert updated["sampling"] == dict(card["sampling"], flips="zxy") and updated["sampling"]["patch_overlap"] == 4
    assert open(target, "rb").read() == weights and updated["sha256"] == card["sha256"]
    assert {k: v for k, v in updated.items() if k != "sampling"} == {k: v for k, v in card.items() if k != "sampling"}
    torch.save({"other": torch.zeros(1)}, target)  # weights that are not the packaged ones
    with pytest.raises(ValueError, match="tiny.pt: the weights' sha256 differs"):
        update_sampling(target, dict(flips=""))
    with pytest.raises(ValueError, match="no JSON sidecar"):
        update_sampling(str(source.with_name("absent.pt")), {})


def test_interpolated_weights_are_the_linear_blend_and_the_script_writes_a_packageable_checkpoint(
        tmp_path, make_tiny_checkpoint):
    start = make_tiny_checkpoint(tmp_path / "start.pt", "paired")
    end = tmp_path / "end.pt"
    weights = torch.load(start, weights_only=True)
    torch.save({k: v + 1.0 for k, v in weights.items()}, end)
    end.with_suffix(".json").write_text(json.dumps(dict(read_metadata(start), step=900)))
    for alpha in (0.0, 0.25, 1.0):
        state, sidecar = interpolate_checkpoints(str(start), str(end), alpha)
        for key, value in weights.items():
            torch.testing.assert_close(state[key], value.float() + alpha, rtol=0, atol=1e-6)
    assert sidecar["step"] is None and sidecar["interpolated"]["alpha"] == 1.0
    assert sidecar["interpolated"]["end"] == dict(path="end.pt", sha256=hashlib.sha256(end.read_bytes()).hexdigest(),
                                                  step=900)
    out = tmp_path / "mix" / "wise.pt"
    subprocess.run([sys.executable, str(REPO / "scripts" / "interpolate_checkpoints.py"), str(start), str(end),
                    "--alpha", "0.5", "--out", str(out)], check=True, cwd=REPO, capture_output=True)
    target, card = package(str(out), "tiny_wise", str(tmp_path / "shipped"))
    assert card["interpolated"]["alpha"] == 0.5 and card["interpolated"]["start"]["path"] == "start.pt"
    load_model_and_diffusion(target)
    with pytest.raises(ValueError, match="alpha must lie in"):
        interpolate_checkpoints(str(start), str(end), 1.5)
    other = make_tiny_checkpoint(tmp_path / "other.pt", "paired", flags=dict(num_channels=8))
    with pytest.raises(ValueError, match="other.pt differ in flags.num_channels"):
        interpolate_checkpoints(str(start), str(other), 0.5)


def test_package_is_byte_reproducible(tmp_path, make_tiny_checkpoint):
    source = make_tiny_checkpoint(tmp_path / "model000010.pt", "none")
    first, _ = package(str(source), "tiny", str(tmp_path / "a"))
    second, _ = package(str(source), "tiny", str(tmp_path / "b"))
    assert open(first, "rb").read() == open(second, "rb").read()


def test_package_changes_only_sampling_flags_and_the_sampler_follows(tmp_path, make_tiny_checkpoint):
    from guided_diffusion.gaussian_diffusion import ModelVarType

    source = make_tiny_checkpoint(tmp_path / "model000010.pt", "none", flags=dict(learn_sigma=False))
    target, card = package(str(source), "tiny", str(tmp_path / "shipped"), flags=dict(sigma_small=True))
    assert card["flags"]["sigma_small"] is True
    assert load_model_and_diffusion(str(source))[1].model_var_type == ModelVarType.FIXED_LARGE
    assert load_model_and_diffusion(target)[1].model_var_type == ModelVarType.FIXED_SMALL
    with pytest.raises(ValueError, match="only the sampling-only flags"):
        package(str(source), "tiny", str(tmp_path / "shipped"), flags=dict(num_channels=8))


def test_package_clip_suv_widens_the_samplers_x0_clip(tmp_path, make_tiny_checkpoint):
    source = make_tiny_checkpoint(tmp_path / "model000010.pt", "none", flags=dict(learn_sigma=False))
    with pytest.raises(ValueError, match="needs a sqrt normalisation"):
        package(str(source), "tiny", str(tmp_path / "shipped"), clip_suv=64)
    sidecar = source.with_suffix(".json")
    sidecar.write_text(json.dumps(dict(json.loads(sidecar.read_text()),
                                       normalisation=dict(transform="sqrt", knee=1, scale=16))))
    assert load_model_and_diffusion(str(source))[1].x0_clip_range == (-1.0, 1.0)
    target, card = package(str(source), "tiny", str(tmp_path / "shipped"), clip_suv=64)
    assert card["normalisation"]["clip"] == 64.0
    diffusion = load_model_and_diffusion(target)[1]
    assert diffusion.x0_clip_range == pytest.approx((-1.0, 3.5226), abs=1e-4)
    x = torch.full((1, 1, 8, 16, 16), 5.0)
    clipped = diffusion.p_mean_variance(lambda x, t: torch.zeros_like(x), x, torch.zeros(1, dtype=torch.long))
    assert clipped["pred_xstart"].max().item() == pytest.approx(diffusion.x0_clip_range[1])


def test_package_records_no_absolute_paths(tmp_path, make_tiny_checkpoint):
    source = make_tiny_checkpoint(tmp_path / "model000010.pt", "paired")
    sidecar = source.with_suffix(".json")
    training = dict(json.loads(sidecar.read_text()),
                    training_data=dict(data_dir=str(tmp_path / "data3d"), files=170))
    sidecar.write_text(json.dumps(training))  # as older training runs wrote it
    target, card = package(str(source), "tiny", str(tmp_path / "shipped"))
    assert card["source_checkpoint"] == "model000010.pt"
    assert card["training_data"] == dict(data_dir="data3d", files=170)
    assert absolute_paths(read_metadata(target)) == []
