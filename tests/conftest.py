"""Shared test helpers: tiny random checkpoints with their JSON sidecars."""

import json
from pathlib import Path

import pytest
import torch

from guided_diffusion.script_util import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)

#: A 2-level UNet with 16 channels: milliseconds per call on a 8x16x16 patch.
TINY_FLAGS = dict(num_channels=16, channel_mult="1,2", num_res_blocks=1, num_heads=1,
                  num_head_channels=-1, diffusion_steps=50, noise_schedule="cosine", learn_sigma=True)


def save_tiny_checkpoint(path, cond, respacing="ddim5", voxel_mm=4.0, patch_size_zxy=(8, 16, 16),
                         sampling=None, flags=None):
    """Write a tiny random 3D checkpoint ``path`` (``.pt``) and its sidecar ``.json``.

    :param cond: ``"paired"`` (SuperResModel, low dose as second channel) or ``"none"``
        (unconditional prior).
    :param respacing: the sidecar's recommended ``timestep_respacing``.
    :param voxel_mm: the model's voxel size (mm); inputs on other grids are resampled to it.
    :param patch_size_zxy: training patch size in the model layout ``(Z, X, Y)``.
    :param sampling: further entries of the sidecar's ``sampling`` recommendations (e.g.
        ``bc_start``, ``bc_steps``).
    :param flags: flags replacing the tiny defaults (e.g. the U-Net baseline's ``regression``).
    The output layer gets small random weights, so samples depend on the network.
    """
    torch.manual_seed(0)
    tiny = dict(TINY_FLAGS, **(flags or {}))
    if cond == "paired":
        flags = dict(sr_model_and_diffusion_defaults(), large_size=16, small_size=16, **tiny)
        model, _ = sr_create_model_and_diffusion(**flags)
    else:
        flags = dict(model_and_diffusion_defaults(), image_size=16, dims=3, in_channels=1,
                     attention_resolutions="", **tiny)
        model, _ = create_model_and_diffusion(**flags)
    with torch.no_grad():
        model.out[-1].weight.normal_(0, 0.02)
    torch.save(model.state_dict(), path)
    meta = dict(flags=flags, cond=cond, normalisation=dict(clip=16, scale=16, range=[-1, 1]),
                voxel_mm=voxel_mm, patch_size_zxy=list(patch_size_zxy),
                sampling=dict(timestep_respacing=respacing, **(sampling or {})))
    Path(path).with_suffix(".json").write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="session")
def make_tiny_checkpoint():
    """The :func:`save_tiny_checkpoint` function, for module-scoped fixtures."""
    return save_tiny_checkpoint


@pytest.fixture(autouse=True)
def _no_process_group_leaks():
    """Tests that call ``dist_util.setup_dist()`` in-process leave a (single-rank) process
    group behind; destroy it so every test starts without one."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
