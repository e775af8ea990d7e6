"""Tests of guided_diffusion.respace (timestep respacing) and guided_diffusion.resample
(training timestep samplers), with tiny hand-written models."""

import math

import numpy as np
import pytest
import torch as th
import torch.distributed as dist
import torch.multiprocessing as mp

from guided_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
)
from guided_diffusion.resample import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)
from guided_diffusion.respace import SpacedDiffusion, space_timesteps

th.set_num_threads(1)

DIFFUSION_KWARGS = dict(
    model_mean_type=ModelMeanType.EPSILON,
    model_var_type=ModelVarType.FIXED_LARGE,
    loss_type=LossType.MSE,
)


def spaced(spacing, steps=1000, rescale_timesteps=False):
    return SpacedDiffusion(
        space_timesteps(steps, spacing),
        betas=get_named_beta_schedule("linear", steps),
        rescale_timesteps=rescale_timesteps,
        **DIFFUSION_KWARGS,
    )


class TimeRecorder:
    """Model recording the timesteps it is called with; predicts eps = 0."""

    def __init__(self):
        self.ts = []

    def __call__(self, x, t):
        self.ts.append(t.clone())
        return th.zeros_like(x)


# ------------------------------------------------------------------------- space_timesteps


def test_space_timesteps_ddim_striding():
    assert space_timesteps(1000, "ddim4") == {0, 250, 500, 750}
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim1000") == set(range(1000))
    assert space_timesteps(1000, "ddim1") == {0}
    with pytest.raises(ValueError, match="exactly 6 steps"):
        space_timesteps(10, "ddim6")  # strides 1 and 2 give 10 and 5 steps


def test_space_timesteps_sections():
    # One section of 1000 steps into 10: stride 999 / 9 = 111.
    assert space_timesteps(1000, "10") == {111 * k for k in range(10)}
    # Two sections of 500 steps, strided with 499/249 and 499/199, rounded.
    steps = space_timesteps(1000, "250,200")
    expected = {round(k * 499 / 249) for k in range(250)} | {
        500 + round(k * 499 / 199) for k in range(200)
    }
    assert steps == expected and len(steps) == 450
    assert {0, 2, 4, 251, 499, 500, 503, 505, 999} <= steps
    # The docstring example: 300 steps, sections of 100 into 10, 15 and 20 steps.
    steps = space_timesteps(300, [10, 15, 20])
    assert len(steps) == 45 and min(steps) == 0 and max(steps) == 299
    assert {0, 11, 99, 100, 199, 200, 299} <= steps
    # 10 steps in 3 sections: sizes 4, 3, 3.
    assert space_timesteps(10, "2,1,3") == {0, 3, 4, 7, 8, 9}


def test_space_timesteps_final_step():
    assert space_timesteps(1000, "ddim4@10") == {10, 250, 500, 750}
    assert space_timesteps(1000, "ddim4@250") == {250, 500, 750}
    assert space_timesteps(1000, "10@0") == space_timesteps(1000, "10")
    assert space_timesteps(1000, "100@10") == {t for t in space_timesteps(1000, "100") if t >= 10}


def test_final_step_returns_the_x0_estimate_there():
    """Ending at original step F: the last reverse step is deterministic and its sample is the
    model's x_0 estimate from x_F (eps = 0: x_0 = x_F / sqrt(abar_F))."""
    diffusion = spaced("ddim4@10")
    assert diffusion.timestep_map[0] == 10
    base_abar = get_named_beta_schedule("linear", 1000)
    abar_10 = np.prod(1 - base_abar[:11])
    x = th.randn(1, 1, 2, 3, 3, dtype=th.float64)
    out = diffusion.p_sample(lambda x, t: th.zeros_like(x), x, th.tensor([0]), clip_denoised=False)
    th.testing.assert_close(out["sample"], x / np.sqrt(abar_10))
    th.testing.assert_close(out["sample"], out["pred_xstart"])


@pytest.mark.parametrize("bad", ["", "ddimx", "10,a", "1001", "0", "10@1000", "10@x"])
def test_space_timesteps_rejects_bad_specs(bad):
    with pytest.raises(ValueError):
        space_timesteps(1000, bad)


# ------------------------------------------------------------------------- SpacedDiffusion


@pytest.mark.parametrize("spacing", ["ddim25", "10", "250,200"])
def test_spaced_diffusion_keeps_alphas_cumprod_at_kept_steps(spacing):
    base = GaussianDiffusion(betas=get_named_beta_schedule("linear", 1000), **DIFFUSION_KWARGS)
    diffusion = spaced(spacing)
    kept = sorted(space_timesteps(1000, spacing))
    assert diffusion.timestep_map == kept and diffusion.num_timesteps == len(kept)
    np.testing.assert_allclose(diffusion.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    assert diffusion.original_num_steps == 1000


def test_respaced_is_the_same_process_at_other_steps_with_its_clip_range():
    diffusion = spaced("ddim25")
    diffusion.x0_clip_range = (-1.0, 3.0)
    other = diffusion.respaced("10")
    fresh = spaced("10")
    assert other.timestep_map == fresh.timestep_map and other.x0_clip_range == (-1.0, 3.0)
    np.testing.assert_array_equal(other.betas, fresh.betas)
    assert diffusion.timestep_map == sorted(space_timesteps(1000, "ddim25"))  # unchanged


@pytest.mark.parametrize("rescale", [False, True])
def test_wrapped_model_receives_original_timesteps(rescale):
    diffusion = spaced("ddim4", rescale_timesteps=rescale)
    model = TimeRecorder()
    x = th.zeros(2, 1, 2, 3, 3)
    diffusion.p_mean_variance(model, x, th.tensor([3, 1]))
    diffusion.training_losses(model, x, th.tensor([0, 2]))
    assert [t.tolist() for t in model.ts] == [[750, 250], [0, 500]]
    assert all(t.dtype == (th.float32 if rescale else th.int64) for t in model.ts)
    unspaced_rescaled = GaussianDiffusion(
        betas=get_named_beta_schedule("linear", 100), rescale_timesteps=True, **DIFFUSION_KWARGS
    )
    unspaced_rescaled.p_mean_variance(model, x, th.tensor([99, 10]))
    assert model.ts[-1].tolist() == [990.0, 100.0]


@pytest.mark.parametrize("use_ddim", [False, True])
def test_spaced_sampling_with_exact_model_returns_point_mass(use_ddim):
    """The exact eps-predictor of data at c, written with the ORIGINAL schedule, is exact for
    the spaced chain only if the model sees original timesteps."""
    c = -0.4
    base_abar = th.tensor(
        GaussianDiffusion(
            betas=get_named_beta_schedule("linear", 1000), **DIFFUSION_KWARGS
        ).alphas_cumprod
    )

    def exact_eps(x, t):
        abar = base_abar[t].view(-1, 1, 1, 1, 1)
        return ((x.double() - abar.sqrt() * c) / (1 - abar).sqrt()).float()

    diffusion = spaced("ddim20")
    hook_ts, pred_xstarts = [], []

    def hook(x_prev, t, out, model_kwargs):
        hook_ts.append(int(t[0]))
        pred_xstarts.append(out["pred_xstart"])

    loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    gen = th.Generator().manual_seed(0)
    sample = loop(exact_eps, (2, 1, 3, 4, 4), step_hook=hook, generator=gen)
    assert hook_ts == list(range(19, -1, -1))  # respaced indices
    for pred_xstart in pred_xstarts:  # exact at every step only with original timesteps
        th.testing.assert_close(pred_xstart, th.full_like(pred_xstart, c), rtol=0, atol=1e-4)
    th.testing.assert_close(sample, th.full_like(sample, c), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------ samplers


def test_create_named_schedule_sampler():
    diffusion = spaced("10")
    assert isinstance(create_named_schedule_sampler("uniform", diffusion), UniformSampler)
    assert isinstance(
        create_named_schedule_sampler("loss-second-moment", diffusion), LossSecondMomentResampler
    )
    with pytest.raises(ValueError, match="unknown schedule sampler"):
        create_named_schedule_sampler("importance", diffusion)


def test_uniform_sampler_weights_are_one():
    sampler = UniformSampler(spaced("10"))
    np.random.seed(0)
    t, w = sampler.sample(64, th.device("cpu"))
    assert t.dtype == th.int64 and t.min() >= 0 and t.max() <= 9
    assert len(set(t.tolist())) > 5
    assert th.equal(w, th.ones(64))


def test_low_noise_mixture_sampler_draws_its_mixture_with_unit_weights():
    diffusion = spaced("100")
    sampler = create_named_schedule_sampler("low:10:0.5", diffusion)
    expected = np.full(100, 0.5 / 100)
    expected[:10] += 0.5 / 10
    np.testing.assert_allclose(sampler.weights() / sampler.weights().sum(), expected)
    np.random.seed(0)
    t, w = sampler.sample(20000, th.device("cpu"))
    assert abs(float((t < 10).float().mean()) - 0.55) < 0.015  # 0.5 + 0.5 * 10 / 100
    assert int(t.max()) >= 90 and th.equal(w, th.ones(20000))


@pytest.mark.parametrize("name", ["low:10", "low:0:0.5", "low:101:0.5", "low:10:1.5", "low:a:b"])
def test_low_noise_mixture_sampler_rejects_bad_names(name):
    with pytest.raises(ValueError, match="low:N:P"):
        create_named_schedule_sampler(name, spaced("100"))


def fill_history(sampler, rng):
    """Give every step a full history of losses loss = (t + 1) * u, u in [0.5, 1.5)."""
    T, H = sampler._loss_history.shape
    losses = {}
    for t in range(T):
        losses[t] = [(t + 1) * (0.5 + rng.random()) for _ in range(H)]
    for h in range(H):
        sampler.update_with_all_losses(list(range(T)), [losses[t][h] for t in range(T)])
    return losses


def test_loss_second_moment_weights_after_warm_up():
    sampler = LossSecondMomentResampler(spaced("10"), history_per_term=4, uniform_prob=0.1)
    assert np.array_equal(sampler.weights(), np.ones(10))
    rng = np.random.default_rng(0)
    losses = fill_history(sampler, rng)
    rms = np.array([math.sqrt(sum(v * v for v in losses[t]) / 4) for t in range(10)])
    expected = 0.9 * rms / rms.sum() + 0.1 / 10
    np.testing.assert_allclose(sampler.weights(), expected, rtol=1e-12)
    assert sampler.weights().sum() == pytest.approx(1.0)
    # A new loss shifts out the oldest one.
    sampler.update_with_all_losses([3], [100.0])
    assert sampler._loss_history[3].tolist() == losses[3][1:] + [100.0]
    # Importance weights are 1 / (T p(t)).
    np.random.seed(1)
    t, w = sampler.sample(32, th.device("cpu"))
    p = sampler.weights() / sampler.weights().sum()
    th.testing.assert_close(w, th.tensor(1 / (10 * p[t.numpy()]), dtype=th.float32))


def test_loss_second_moment_not_warm_until_every_step_is_full():
    sampler = LossSecondMomentResampler(spaced("10"), history_per_term=2)
    sampler.update_with_all_losses(list(range(10)) * 2, [1.0] * 20)
    sampler.update_with_all_losses([0], [50.0])
    assert not np.array_equal(sampler.weights(), np.ones(10))
    fresh = LossSecondMomentResampler(spaced("10"), history_per_term=2)
    fresh.update_with_all_losses(list(range(9)) * 2, [1.0] * 18)  # step 9 missing
    assert np.array_equal(fresh.weights(), np.ones(10))


def test_update_with_local_losses_single_process():
    assert not dist.is_initialized()
    sampler = LossSecondMomentResampler(spaced("10"), history_per_term=1, uniform_prob=0.0)
    sampler.update_with_local_losses(th.arange(10), th.arange(1, 11, dtype=th.float32))
    np.testing.assert_allclose(sampler.weights(), np.arange(1, 11) / 55.0)
    with pytest.raises(ValueError, match="1-D"):
        sampler.update_with_local_losses(th.arange(3), th.ones(4))


def _gather_worker(rank, world_size, init_file, result_file):
    th.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        sampler = LossSecondMomentResampler(spaced("10"), history_per_term=1, uniform_prob=0.0)
        # Unequal batch sizes: rank 0 has steps 0..3, rank 1 has steps 4..9.
        local_ts = th.arange(0, 4) if rank == 0 else th.arange(4, 10)
        sampler.update_with_local_losses(local_ts, (local_ts + 1).float())
        if rank == 0:
            np.save(result_file, sampler.weights())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_update_with_local_losses_gathers_unequal_batches_across_ranks(tmp_path):
    result_file = tmp_path / "weights.npy"
    mp.spawn(
        _gather_worker,
        args=(2, str(tmp_path / "store"), str(result_file)),
        nprocs=2,
        join=True,
    )
    np.testing.assert_allclose(np.load(result_file), np.arange(1, 11) / 55.0)


def test_log_spacing_hand_values_and_edges():
    # 9 points geometric from 1 to 999 (ratio 999 ** (1/8)) rounded, plus step 0
    assert sorted(space_timesteps(1000, "log10")) == [0, 1, 2, 6, 13, 32, 75, 178, 421, 999]
    assert sorted(space_timesteps(1000, "log2")) == [0, 999]
    assert sorted(space_timesteps(10, "log10")) == list(range(10))  # crowded: every step
    assert sorted(space_timesteps(1000, "log10@20")) == [20, 32, 75, 178, 421, 999]
    for bad in ("log1", "log11"):
        with pytest.raises(ValueError, match="logarithmically"):
            space_timesteps(10, bad)
