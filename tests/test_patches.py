"""Patch grid, blending weights, padding, and the seam-free PatchedModel."""

import math

import numpy as np
import pytest
import torch

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.sampling.distributed import BoxDecomposition, PatchedModel, sample_independent_patches
from guided_diffusion.sampling.patches import PatchGrid

torch.set_num_threads(1)


def _coverage_and_weight_sum(grid):
    coverage = torch.zeros(grid.volume_shape, dtype=torch.int64)
    weight_sum = torch.zeros(grid.volume_shape, dtype=torch.float64)
    for i, patch in enumerate(grid.patches):
        coverage[patch] += 1
        weight_sum[patch] += grid.weight(i)
    return coverage, weight_sum


@pytest.mark.parametrize(
    "volume_shape, patch_shape, overlap",
    [
        ((37, 53, 101), (16, None, None), 4),
        ((37, 53, 101), (10, 32, 48), (3, 8, 5)),
        ((37, 53, 101), (37, 53, 101), 0),
        ((9, 11, 13), (5, 7, 9), (4, 6, 8)),  # stride 1: up to 5 patches overlap per axis
    ],
)
def test_grid_covers_odd_volume_and_weights_sum_to_one(volume_shape, patch_shape, overlap):
    grid = PatchGrid(volume_shape, patch_shape, overlap)
    coverage, weight_sum = _coverage_and_weight_sum(grid)
    assert coverage.min() >= 1
    assert torch.allclose(weight_sum, torch.ones_like(weight_sum), atol=1e-12, rtol=0)
    overlaps = grid.overlap
    for axis, starts in enumerate(grid.axis_starts):
        size, length = grid.patch_shape[axis], grid.volume_shape[axis]
        assert starts[0] == 0 and starts[-1] + size == length
        steps = np.diff(starts)
        assert (steps >= 1).all() and (size - steps >= overlaps[axis]).all()
        assert len(steps) == 0 or steps.max() - steps.min() <= 1
    # voxels covered by one patch only (also at the borders) get weight exactly 1
    single = coverage == 1
    assert single.any() or grid.overlap == (4, 6, 8)
    for i, patch in enumerate(grid.patches):
        inside = single[patch]
        assert torch.equal(grid.weight(i)[inside], torch.ones(int(inside.sum()), dtype=torch.float64))


def test_one_dimensional_weights_hand_computed():
    # length 10, patch 6, overlap 2 -> starts 0 and 4, Hann ramp sin^2(pi/2 * j/3) = 1/4, 3/4
    grid = PatchGrid((10,), (6,), 2)
    assert grid.axis_starts == [[0, 4]]
    expected0 = torch.tensor([1, 1, 1, 1, 0.75, 0.25], dtype=torch.float64)
    assert torch.allclose(grid.weight(0), expected0, atol=1e-15)
    assert torch.allclose(grid.weight(1), expected0.flip(0), atol=1e-15)


def test_default_grid_is_axial_slabs_of_full_plane():
    grid = PatchGrid((200, 48, 64), overlap=10)
    assert grid.patch_shape == (96, 48, 64)
    assert grid.axis_starts == [[0, 52, 104], [0], [0]]
    small = PatchGrid((37, 53, 101))
    assert len(small) == 1 and small.patch_shape == (37, 53, 101)
    assert torch.equal(small.weight(0), torch.ones(37, 53, 101, dtype=torch.float64))


def test_memory_budget_tiles_the_plane_in_multiples_of_16():
    grid = PatchGrid((20, 64, 64), (8, None, None), (2, 8, 8), max_patch_voxels=8 * 32 * 48)
    assert grid.patch_shape == (8, 32, 48)
    assert len(grid.axis_starts[1]) == 3 and len(grid.axis_starts[2]) == 2
    with pytest.raises(ValueError, match="max_patch_voxels"):
        PatchGrid((20, 64, 64), (8, None, None), 2, max_patch_voxels=8 * 16 * 15)


def test_stitch_of_extracted_patches_returns_input_bit_for_bit():
    torch.manual_seed(0)
    volume = torch.randn(2, 3, 37, 53, 41)
    grid = PatchGrid(volume.shape[2:], (12, 32, 16), (5, 9, 4))
    stitched = grid.stitch([grid.extract(volume, i) for i in range(len(grid))])
    assert stitched.dtype == volume.dtype
    assert torch.equal(stitched, volume)


def test_blend_of_patch_constants_has_no_jumps():
    # each patch outputs its own index: a hard seam would jump by >= 1 between neighbours
    grid = PatchGrid((60, 8, 8), (16, None, None), 8)
    stitched = grid.stitch([torch.full(grid.patch_shape, float(i)) for i in range(len(grid))])
    jumps = stitched.diff(dim=0).abs().max()
    assert len(grid) >= 4
    assert 0 < jumps <= math.pi / (2 * (8 + 1)) + 1e-6  # steepest step of the sin^2 ramp


def test_grid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="overlap"):
        PatchGrid((40, 8, 8), (10, None, None), 10)
    with pytest.raises(ValueError, match="patch_shape"):
        PatchGrid((40, 8, 8), (10, None), 2)
    grid = PatchGrid((40, 8, 8), (10, None, None), 2)
    with pytest.raises(ValueError, match="volume shape"):
        grid.extract(torch.zeros(1, 1, 40, 8, 9), 0)
    with pytest.raises(ValueError, match="patch outputs"):
        grid.stitch([torch.zeros(10, 8, 8)])


# --- PatchedModel -------------------------------------------------------------------------

def pointwise_model(x, t, low_res):
    """Position-independent toy network: eps = 0.1 x + 0.05 low_res, variance value = tanh(x)."""
    eps = 0.1 * x + 0.05 * low_res
    var = torch.tanh(x) * (t.float() / 10).view(-1, 1, 1, 1, 1)
    return torch.cat([eps, var], dim=1)


def _volume_and_condition(shape=(1, 1, 23, 16, 16), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.rand(shape, generator=generator)


def test_patched_pointwise_model_equals_whole_volume_model():
    x, low_res = _volume_and_condition()
    grid = PatchGrid(x.shape[2:], (8, 16, 16), 3)
    t = torch.tensor([7])
    patched = PatchedModel(pointwise_model, grid, batch_size=2)(x, t, low_res=low_res)
    assert torch.equal(patched, pointwise_model(x, t, low_res))


def _tiny_diffusion(steps=6):
    return gd.GaussianDiffusion(
        betas=gd.get_named_beta_schedule("cosine", steps),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.LEARNED_RANGE,
        loss_type=gd.LossType.MSE,
    )


def test_seam_free_sampling_follows_the_whole_volume_trajectory():
    x_t, low_res = _volume_and_condition(seed=3)
    grid = PatchGrid(x_t.shape[2:], (8, 16, 16), 3)
    diffusion = _tiny_diffusion()

    def sample(model):
        return diffusion.p_sample_loop(
            model, tuple(x_t.shape), noise=x_t, model_kwargs={"low_res": low_res},
            generator=torch.Generator().manual_seed(5), clip_denoised=False,
        )

    whole = sample(pointwise_model)
    patched = sample(PatchedModel(pointwise_model, grid, batch_size=2))
    # one trajectory for the whole volume: identical to the unpatched sampler, hence no seams
    assert torch.allclose(patched, whole, atol=1e-6, rtol=1e-6)


def test_boxes_and_halo_plan_of_two_ranks():
    # 5 axial slabs of 8 slices with >= 2 shared slices; 3 groups of 2: rank 0 gets groups 0-1
    grid = PatchGrid((30, 16, 16), (8, 16, 16), 2)
    assert [s[0] for s in grid.patches] == [slice(0, 8), slice(6, 14), slice(11, 19),
                                            slice(16, 24), slice(22, 30)]
    plan = BoxDecomposition(grid, batch_size=2, world_size=2)
    assert plan.patches_of_rank(0) == [0, 1, 2, 3] and plan.patches_of_rank(1) == [4]
    assert plan.boxes[0][0] == slice(0, 24) and plan.boxes[1][0] == slice(22, 30)
    # only the shared slices 22-23 travel, in both directions (patch 3 -> rank 1, patch 4 -> rank 0)
    assert plan.sends(0) == {1: [(3, (slice(22, 24), slice(0, 16), slice(0, 16)))]}
    assert plan.receives(0) == {1: [(4, (slice(22, 24), slice(0, 16), slice(0, 16)))]}
    assert plan.halo_voxels(0) == plan.halo_voxels(1) == (2 * 16 * 16, 2 * 16 * 16)
    assert plan.covering(1) == [3, 4]
    # more ranks than groups: the extra rank owns nothing, sends and receives nothing
    idle = BoxDecomposition(grid, batch_size=2, world_size=4)
    assert [idle.patches_of_rank(r) for r in range(4)] == [[0, 1], [2, 3], [4], []]
    assert idle.covering(3) == [] and idle.halo_voxels(3) == (0, 0)


def test_patched_model_needs_a_process_group_for_several_ranks():
    grid = PatchGrid((10, 16, 16), (4, 16, 16), 1)
    with pytest.raises(ValueError, match="torch.distributed"):
        PatchedModel(pointwise_model, grid, rank=0, world_size=2)


def test_independent_patches_stitch_each_patch_sample():
    x_t, low_res = _volume_and_condition(seed=6)
    grid = PatchGrid(x_t.shape[2:], (8, 16, 16), 3)
    seen_shapes = []

    class FakeDiffusion:
        def p_sample_loop(self, model, shape, noise, model_kwargs, **kwargs):
            seen_shapes.append(shape)
            return 2 * noise + model_kwargs["low_res"]

    result = sample_independent_patches(FakeDiffusion(), pointwise_model, grid, x_t,
                                        model_kwargs={"low_res": low_res})
    assert seen_shapes == [(1, 1, 8, 16, 16)] * len(grid)
    assert torch.allclose(result, 2 * x_t + low_res, atol=1e-6, rtol=0)


def test_independent_ddim_equals_seam_free_for_pointwise_model():
    # with a deterministic sampler (DDIM, eta 0) and a position-independent model the two modes
    # agree; they differ once the model looks at its neighbourhood (the patch mean here)
    x_t, low_res = _volume_and_condition(seed=7)
    grid = PatchGrid(x_t.shape[2:], (8, 16, 16), 3)
    diffusion = _tiny_diffusion()
    kwargs = {"model_kwargs": {"low_res": low_res}, "clip_denoised": False}

    def context_model(x, t, low_res):
        out = pointwise_model(x, t, low_res)
        return out + torch.cat([x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x), 0 * x], dim=1)

    for model, agree in ((pointwise_model, True), (context_model, False)):
        seam_free = diffusion.ddim_sample_loop(PatchedModel(model, grid), tuple(x_t.shape),
                                               noise=x_t, **kwargs)
        independent = sample_independent_patches(diffusion, model, grid, x_t, use_ddim=True, **kwargs)
        assert torch.allclose(seam_free, independent, atol=1e-5) == agree


#: axial slabs, and slabs tiled transaxially too (boxes then meet along X as well)
HALO_PATCH_SHAPES = ((8, 16, 16), (8, 8, 16))


def _sample_box_wise(rank, world_size, x_t, low_res, patch_shape):
    """Seam-free DDPM sampling with this rank's box, the whole-volume noise sliced, and a
    whole-volume hook in the last two steps; returns the gathered volume."""
    from guided_diffusion.sampling.distributed import SlicedNoise, whole_volume_hook

    grid = PatchGrid(x_t.shape[2:], patch_shape, 2)
    patched = PatchedModel(pointwise_model, grid, batch_size=1, rank=rank, world_size=world_size)
    generator = torch.Generator().manual_seed(11)

    class GlobalMeanHook:  # acts on the whole volume, so it needs the gather
        def active(self, t):
            return int(t[0]) < 2

        def __call__(self, x_prev, t, out, model_kwargs):
            return x_prev - 0.5 * x_prev.mean() + 0.1 * torch.randn(x_prev.shape, generator=generator)

    noise = patched.local(x_t).contiguous()
    sample = _tiny_diffusion().p_sample_loop(
        patched, tuple(noise.shape), noise=noise, model_kwargs={"low_res": patched.local(low_res)},
        generator=SlicedNoise(generator, x_t.shape[:2], patched), clip_denoised=False,
        step_hook=whole_volume_hook(GlobalMeanHook(), patched))
    return patched.gather(sample)


def _distributed_worker(rank, world_size, store_path, x, low_res, results):
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        results[rank] = []
        for patch_shape in HALO_PATCH_SHAPES:
            grid = PatchGrid(x.shape[2:], patch_shape, 2)
            model = PatchedModel(pointwise_model, grid, batch_size=2, rank=rank, world_size=world_size)
            output = model(model.local(x), torch.tensor([3]), low_res=model.local(low_res))
            results[rank] += [model.gather(output),
                              _sample_box_wise(rank, world_size, x, low_res, patch_shape)]
    finally:
        dist.destroy_process_group()


def _spawn_ranks(world_size, tmp_path, x, low_res):
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_distributed_worker, args=(world_size, str(tmp_path / "store"), x, low_res, results),
             nprocs=world_size)
    return [results[rank] for rank in range(world_size)]


def _single_process_reference(x, low_res):
    expected = []
    for patch_shape in HALO_PATCH_SHAPES:
        model = PatchedModel(pointwise_model, PatchGrid(x.shape[2:], patch_shape, 2), batch_size=2)
        expected += [model(x, torch.tensor([3]), low_res=low_res),
                     _sample_box_wise(0, 1, x, low_res, patch_shape)]
    return expected


def _check_ranks_match_one_process(world_size, tmp_path):
    x, low_res = _volume_and_condition(shape=(1, 1, 30, 16, 16), seed=8)
    expected = _single_process_reference(x, low_res)
    for results in _spawn_ranks(world_size, tmp_path, x, low_res):
        for result, reference in zip(results, expected, strict=True):
            assert torch.equal(result, reference)


def test_halo_exchange_over_gloo_with_two_ranks_is_bit_identical(tmp_path):
    _check_ranks_match_one_process(2, tmp_path)


@pytest.mark.slow
def test_halo_exchange_over_gloo_with_four_ranks_is_bit_identical(tmp_path):
    # 5 patches over 4 ranks (with batch 2: 3 groups): uneven shares, and one rank computes nothing
    _check_ranks_match_one_process(4, tmp_path)
