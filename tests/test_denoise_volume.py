"""Pieces of guided_diffusion.sampling.denoiser: hot voxels (input passthrough, the rescale pass), the
null condition and the test-time flips."""

import json

import numpy as np
import pytest
import torch

from guided_diffusion.checkpoints import load_model_and_diffusion
from guided_diffusion.sampling.denoiser import (SamplingSettings, VolumeDenoiser, _PrecisionModel, flip_combinations,
                                               member_network_evaluations)
from guided_diffusion.sampling.hot_voxels import hot_weight, replace_hot_voxels, rescale_factor

AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])


def test_hot_voxels_come_from_the_replacement_with_a_linear_ramp():
    clip = 16.0
    plateaus = [5.0, 12.0, 14.0, 16.0, 40.0]  # 9-voxel plateaus: smoothing leaves their centres
    low = np.repeat(np.array(plateaus, np.float32), 9)[:, None, None] * np.ones((1, 3, 3), np.float32)
    centres = (np.arange(len(plateaus)) * 9 + 4, 1, 1)
    denoised = np.minimum(low, 16.0) - 1.0
    blended = replace_hot_voxels(denoised, low, low, clip)
    # below 0.75 clip: the model; at 14 SUV (weight 0.5): the average; from clip on: the input
    np.testing.assert_allclose(blended[centres], [4.0, 11.0, 13.5, 16.0, 40.0], rtol=1e-6)
    assert blended.dtype == np.float32
    replaced = replace_hot_voxels(denoised, np.full_like(low, 30.0), low, clip)
    np.testing.assert_allclose(replaced[centres], [4.0, 11.0, 21.5, 30.0, 30.0], rtol=1e-6)


def test_a_single_voxel_noise_spike_is_not_a_hot_structure():
    low = np.full((9, 9, 9), 10.0, np.float32)
    low[4, 4, 4] = 23.0  # a noise spike in 10-SUV tissue
    denoised = np.full_like(low, 10.5)
    np.testing.assert_array_equal(replace_hot_voxels(denoised, low, low, 16.0), denoised)
    assert rescale_factor(low, 16.0) == 1.0


def test_rescale_factor_brings_the_hottest_structure_to_the_ramp_start():
    low = np.linspace(0.0, 10.0, 100_000).astype(np.float32)
    assert rescale_factor(low, 16.0) == 1.0  # nothing reaches 12 SUV
    low[-20:] = 48.0  # a 20-voxel hot structure: however small, it sets the factor
    assert rescale_factor(low, 16.0) == pytest.approx(4.0)


@pytest.fixture(scope="module")
def tiny_paired(tmp_path_factory, make_tiny_checkpoint):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("hot") / "paired.pt", "paired")
    return load_model_and_diffusion(str(path), {"timestep_respacing": "ddim5"}, device=torch.device("cpu"))


def _denoise(tiny_paired, volume, **settings):
    model, diffusion, metadata = tiny_paired
    settings = SamplingSettings(use_ddim=True, patch_z=8, overlap=2, progress=False, **settings)
    mean, _, _, info = VolumeDenoiser(model, diffusion, metadata, settings).denoise(volume, AFFINE, [0])
    return mean, info["members"][0]


def test_rescale_pass_denoises_the_scaled_input_for_the_hot_voxels(tiny_paired):
    low = np.abs(np.random.default_rng(1).normal(2.0, 0.5, (24, 24, 16))).astype(np.float32)
    low[4:20, 4:20, 2:14] = 40.0  # a hot organ far above the 16-SUV clip
    factor = rescale_factor(low, 16.0)
    assert factor == pytest.approx(40.0 / 12.0, rel=1e-3)
    rescaled, info = _denoise(tiny_paired, low, hot_voxels="rescale")
    clipped, clip_info = _denoise(tiny_paired, low, hot_voxels="clip")
    second_pass = _denoise(tiny_paired, low / factor, hot_voxels="clip")[0] * factor
    hot = hot_weight(low, 16.0) == 1.0
    cool = hot_weight(low, 16.0) == 0.0
    assert hot.sum() > 1000 and cool.sum() > 1000
    # the hot organ comes from the scaled pass (whose own ramp starts at 0.75 * 16 * factor = 40)
    np.testing.assert_allclose(rescaled[hot], second_pass[hot], rtol=1e-5)
    np.testing.assert_array_equal(rescaled[cool], clipped[cool])
    assert info["hot_voxels"]["mode"] == "rescale" and info["hot_voxels"]["factor"] == factor
    assert member_network_evaluations(info) == 2 * member_network_evaluations(clip_info)
    # 'input' takes the hot organ from the input; without hot voxels no second pass runs
    assert np.array_equal(_denoise(tiny_paired, low, hot_voxels="input")[0][hot], low[hot])
    cool_low = np.minimum(low, 10.0)  # nothing hot: no second pass
    assert _denoise(tiny_paired, cool_low, hot_voxels="rescale")[1]["hot_voxels"]["mode"] == "input"


def test_null_condition_feeds_the_model_an_empty_volume(tmp_path, make_tiny_checkpoint):
    path = make_tiny_checkpoint(tmp_path / "paired.pt", "paired")
    sidecar = path.with_suffix(".json")
    sidecar.write_text(json.dumps(dict(json.loads(sidecar.read_text()), cond_dropout=0.2)))
    model, diffusion, metadata = load_model_and_diffusion(str(path), {"timestep_respacing": "ddim5"},
                                                          device=torch.device("cpu"))
    low = np.abs(np.random.default_rng(0).normal(1.0, 0.3, (16, 16, 8))).astype(np.float32)
    affine = AFFINE

    def denoised(volume, null_condition):
        settings = SamplingSettings(use_ddim=True, patch_z=8, overlap=2, progress=False,
                                    null_condition=null_condition)
        return VolumeDenoiser(model, diffusion, metadata, settings).denoise(volume, affine, [0])[0]

    unconditional = denoised(low, True)
    # The null condition is the empty volume: the same as denoising zeros, not as using `low`.
    np.testing.assert_array_equal(unconditional, denoised(np.zeros_like(low), False))
    assert not np.allclose(unconditional, denoised(low, False))
    with pytest.raises(ValueError, match="conditioning dropout"):
        VolumeDenoiser(model, diffusion, dict(metadata, cond_dropout=0.0),
                       SamplingSettings(null_condition=True))


def test_rescale_pass_hands_the_hooks_the_scaled_input(tiny_paired):
    """Hooks (BC-DPM, data consistency) take part in the second pass, on ``y0`` of input / k."""
    model, diffusion, metadata = tiny_paired
    low = np.abs(np.random.default_rng(2).normal(2.0, 0.5, (24, 24, 16))).astype(np.float32)
    low[4:20, 4:20, 2:14] = 40.0
    seen = []

    def factory(y0, diffusion, generator, prepared=None):
        seen.append(y0.clone())
        return lambda x_prev, t, out=None, model_kwargs=None: None  # leaves every step as is

    settings = SamplingSettings(use_ddim=True, patch_z=8, overlap=2, progress=False)
    denoiser = VolumeDenoiser(model, diffusion, metadata, settings, guidance_factory=factory)
    mean, _, _, info = denoiser.denoise(low, AFFINE, [0])
    assert info["members"][0]["hot_voxels"]["mode"] == "rescale"
    assert len(seen) == 2
    factor = rescale_factor(low, 16.0)
    torch.testing.assert_close(seen[1], denoiser.prepare(low / factor, AFFINE)["y0"])
    np.testing.assert_allclose(mean, _denoise(tiny_paired, low, hot_voxels="rescale")[0], rtol=1e-6)


def test_a_sqrt_model_space_denoises_a_50_suv_bladder_in_one_pass(tiny_paired):
    from guided_diffusion.normalisation import SQRT_NORMALISATION, suv_to_model

    model, diffusion, metadata = tiny_paired
    sqrt_model = (model, diffusion, dict(metadata, normalisation=SQRT_NORMALISATION))
    low = np.abs(np.random.default_rng(2).normal(2.0, 0.5, (24, 24, 16))).astype(np.float32)
    low[6:18, 6:18, 4:12] = 50.0  # a PSMA / FDG bladder
    assert suv_to_model(np.float32(50.0), SQRT_NORMALISATION) < 0.5  # far from the range's top
    _, info = _denoise(sqrt_model, low, hot_voxels="rescale")
    _, clip_info = _denoise(sqrt_model, low, hot_voxels="clip")
    assert info["hot_voxels"]["mode"] == "input"  # nothing near 100 SUV: no second pass
    assert member_network_evaluations(info) == member_network_evaluations(clip_info)


def test_flip_combinations_are_every_subset_of_the_named_axes():
    assert flip_combinations("") == [()]
    assert flip_combinations("xy") == [(), (3,), (4,), (3, 4)]  # (B, C, Z, X, Y)
    assert sorted(flip_combinations("zxy")) == sorted([(), (2,), (3,), (2, 3), (4,), (2, 4), (3, 4), (2, 3, 4)])
    for bad in ("w", "xx", "x y"):
        with pytest.raises(ValueError, match="flips must name distinct axes"):
            flip_combinations(bad)


class _RampAlongY(torch.nn.Module):
    """out = w (x * (0, 1, ..., Y-1) along Y + 2 low_res): equivariant to Z and X flips, not to Y flips."""

    dims = 3

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t, low_res=None):
        return self.w * (x * torch.arange(x.shape[-1], dtype=x.dtype) + 2 * low_res)


def test_flips_average_the_outputs_of_the_mirrored_inputs():
    x = torch.rand(1, 1, 3, 4, 5)
    low = torch.rand(1, 1, 3, 4, 5)
    t = torch.zeros(1, dtype=torch.long)
    one = _PrecisionModel(_RampAlongY(), "fp32")(x, t, low_res=low)
    # a Y flip turns the ramp around: the mean of the two ramps is (Y - 1) / 2 everywhere
    torch.testing.assert_close(_PrecisionModel(_RampAlongY(), "fp32", "y")(x, t, low_res=low), x * 2.0 + 2 * low)
    # flips the network is equivariant to change nothing (the condition is flipped with the input)
    torch.testing.assert_close(_PrecisionModel(_RampAlongY(), "fp32", "zx")(x, t, low_res=low), one)


def test_all_three_flips_make_the_unet_exactly_mirror_equivariant(tiny_paired):
    model = tiny_paired[0]
    network = _PrecisionModel(model, "fp32", "zxy")
    x, low = torch.rand(2, 1, 1, 8, 16, 16)
    t = torch.tensor([3])
    out = network(x, t, low_res=low)
    mirrored = network(x.flip(2, 4), t, low_res=low.flip(2, 4))
    torch.testing.assert_close(mirrored, out.flip(2, 4), rtol=1e-5, atol=1e-6)
    plain = _PrecisionModel(model, "fp32")
    assert not torch.allclose(plain(x.flip(2, 4), t, low_res=low.flip(2, 4)), plain(x, t, low_res=low).flip(2, 4))


def test_flips_multiply_the_network_evaluations(tiny_paired):
    volume = np.abs(np.random.default_rng(2).normal(2.0, 0.5, (24, 24, 16))).astype(np.float32)
    plain, plain_info = _denoise(tiny_paired, volume, hot_voxels="clip")
    flipped, info = _denoise(tiny_paired, volume, hot_voxels="clip", flips="xy")
    assert member_network_evaluations(info) == 4 * member_network_evaluations(plain_info)
    assert np.isfinite(flipped).all() and not np.allclose(flipped, plain)
