"""The CUDA path (marked ``cuda``; skipped without a GPU; ``scripts/device_check.sh`` runs them):
the projector against the CPU, the shipped UNet's forward in fp16 / bf16 against fp32, a short
BC-DPM and paired sampling run through scripts/test.py, and a 2-rank NCCL run where two GPUs exist."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from guided_diffusion import fp16_util
from guided_diffusion.checkpoints import load_model_and_diffusion
from guided_diffusion.pet import volumes
from guided_diffusion.pet.projector import make_projector
from tests.mpi_helpers import REPO, mpiexec_path

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_projector_on_cuda_matches_the_cpu_and_stays_adjoint():
    shape, voxel = (40, 40, 6), 4.0
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(0))
    cpu = make_projector("demo", shape, voxel, mode="2d")
    gpu = make_projector("demo", shape, voxel, mode="2d", device="cuda")
    y_cpu, y_gpu = cpu.forward(x), gpu.forward(x.cuda()).cpu()
    torch.testing.assert_close(y_gpu, y_cpu, rtol=1e-4, atol=1e-4 * float(y_cpu.abs().max()))
    y = torch.rand(y_cpu.shape, generator=torch.Generator().manual_seed(1)).cuda()
    lhs = float((gpu.forward(x.cuda()) * y).sum())
    rhs = float((x.cuda() * gpu.adjoint(y)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-4)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_shipped_unet_forward_in_half_precision_tracks_fp32(precision):
    model, _, _ = load_model_and_diffusion(REPO / "checkpoint" / "demo_paired.pt", device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 1, 16, 64, 48, device="cuda", generator=generator)
    low = torch.rand(1, 1, 16, 64, 48, device="cuda", generator=generator) * 2 - 1
    t = torch.tensor([50], device="cuda")
    with torch.no_grad():
        reference = model(x, t, low_res=low).float()
        with fp16_util.autocast("cuda", precision):
            half = model(x, t, low_res=low).float()
    error = float((half - reference).norm() / reference.norm())
    assert torch.isfinite(half).all() and error < 2e-2


def _denoise(tmp_path, name, *args, mpi=0):
    rng = np.random.default_rng(0)
    low = np.abs(rng.normal(1.0, 0.3, (48, 40, 20))).astype(np.float32)
    source = tmp_path / "subject.npz"
    if not source.exists():
        volumes.save_npz(source, low, low, np.diag([3.3, 3.3, 3.3, 1.0]))
    out = tmp_path / name
    command = [sys.executable, str(REPO / "scripts" / "test.py"), "--base_samples", str(source),
               "--save_dir", str(out), "--seed", "1", *map(str, args)]
    if mpi:
        command = [mpiexec_path(), "-n", str(mpi)] + command
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    denoised = np.load(out / "subject_denoised.npz")["arr_0"]
    return denoised, json.loads((out / "subject.json").read_text())


def test_short_sampling_runs_on_cuda(tmp_path):
    paired, report = _denoise(tmp_path, "paired", "--model_path", "checkpoint/demo_paired.pt",
                              "--timestep_respacing", "ddim4", "--num_ensemble", 2)
    assert np.isfinite(paired).all() and paired.max() > 0
    bcdpm, _ = _denoise(tmp_path, "bcdpm", "--model_path", "checkpoint/demo_prior.pt", "--cond_mode", "bcdpm",
                        "--bc_scanner", "demo", "--bc_counts", 2e6, "--bc_steps", 2)
    assert np.isfinite(bcdpm).all() and bcdpm.max() > 0


@pytest.mark.mpi
@pytest.mark.skipif(torch.cuda.device_count() < 2 or mpiexec_path() is None, reason="needs 2 GPUs and mpiexec")
def test_two_ranks_over_nccl_match_one(tmp_path):
    args = ("--model_path", "checkpoint/demo_paired.pt", "--timestep_respacing", "ddim4", "--num_ensemble", 2)
    one, _ = _denoise(tmp_path, "one", *args)
    two, _ = _denoise(tmp_path, "two", *args, mpi=2)
    np.testing.assert_allclose(two, one, rtol=1e-3, atol=1e-3 * float(one.max()))
