"""Numerical tests of guided_diffusion.gaussian_diffusion and guided_diffusion.losses.

Models are tiny hand-written functions of (x, t), never the UNet. Shapes cover 2D images
(B, C, H, W) and 3D volumes (B, C, Z, X, Y).
"""

import math

import numpy as np
import pytest
import torch as th

from guided_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    betas_for_alpha_bar,
    get_named_beta_schedule,
)
from guided_diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
)

th.set_num_threads(1)

SHAPES = [(2, 1, 4, 5), (2, 1, 3, 4, 5)]  # 2D (B, C, H, W) and 3D (B, C, Z, X, Y)


def make_diffusion(
    steps=20,
    schedule="cosine",  # valid for any step count (linear needs >= 50 steps)
    mean_type=ModelMeanType.EPSILON,
    var_type=ModelVarType.FIXED_SMALL,
    loss_type=LossType.MSE,
):
    return GaussianDiffusion(
        betas=get_named_beta_schedule(schedule, steps),
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
    )


def abar_hand(betas, t):
    """alpha_bar_t = prod_{s <= t} (1 - beta_s), from the betas in plain Python."""
    return math.prod(1.0 - float(b) for b in betas[: t + 1])


def fixed_eps(x, t):
    """A fixed, smooth, t-dependent 'noise prediction'."""
    return 0.5 * th.sin(x) + 0.01 * t.float().view(-1, *([1] * (x.dim() - 1)))


class ExactEpsModel:
    """Exact eps-predictor for data concentrated at the constant `c`.

    eps(x_t, t) = (x_t - sqrt(abar_t) c) / sqrt(1 - abar_t), so every x_0 prediction is c and
    both DDPM and DDIM sampling must return c.
    """

    def __init__(self, alphas_cumprod, c):
        self.abar = th.tensor(alphas_cumprod, dtype=th.float64)
        self.c = c

    def __call__(self, x, t):
        abar = self.abar[t.long()].view(-1, *([1] * (x.dim() - 1)))
        return ((x.double() - abar.sqrt() * self.c) / (1 - abar).sqrt()).float()


class RecordingModel:
    """fixed_eps model that records its inputs (x, t) at every call."""

    def __init__(self):
        self.inputs = []

    def __call__(self, x, t):
        self.inputs.append((x.clone(), t.clone()))
        return fixed_eps(x, t)


# ----------------------------------------------------------------------------- schedules


def test_linear_schedule_matches_hand_formula():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    for i in (0, 1, 500, 999):
        assert betas[i] == pytest.approx(1e-4 + i * (0.02 - 1e-4) / 999, rel=1e-12)
    short = get_named_beta_schedule("linear", 100)  # rescaled by 1000 / 100
    assert short[0] == pytest.approx(1e-3) and short[-1] == pytest.approx(0.2)
    assert short[37] == pytest.approx(1e-3 + 37 * (0.2 - 1e-3) / 99, rel=1e-12)


def test_cosine_schedule_matches_hand_formula():
    T = 1000
    betas = get_named_beta_schedule("cosine", T)

    def f(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    for i in (0, 10, 500, 900):
        assert betas[i] == pytest.approx(1 - f((i + 1) / T) / f(i / T), rel=1e-12)
    assert betas[-1] == 0.999  # f(1) = 0: clipped to max_beta
    # alpha_bar = 1 - s / 2 at s = 0, 1/4, ..., 1 is 1, 0.875, 0.75, 0.625, 0.5.
    assert betas_for_alpha_bar(4, lambda s: 1 - s / 2, max_beta=0.15).tolist() == pytest.approx(
        [1 - 0.875 / 1.0, 1 - 0.75 / 0.875, 0.15, 0.15]
    )


def test_bad_schedule_and_betas_raise():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        get_named_beta_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(
            betas=np.array([0.1, 0.0]),
            model_mean_type=ModelMeanType.EPSILON,
            model_var_type=ModelVarType.FIXED_SMALL,
            loss_type=LossType.MSE,
        )


# ------------------------------------------------------------------------ forward process


@pytest.mark.parametrize("shape", SHAPES)
def test_q_sample_and_q_mean_variance_formula(shape):
    diffusion = make_diffusion(steps=30)
    x0 = th.linspace(-1, 1, math.prod(shape)).reshape(shape)
    eps = th.randn(shape, generator=th.Generator().manual_seed(0))
    t = th.tensor([3, 27])
    xt = diffusion.q_sample(x0, t, noise=eps)
    mean, var, log_var = diffusion.q_mean_variance(x0, t)
    for b in range(2):
        abar = abar_hand(diffusion.betas, int(t[b]))
        expected = math.sqrt(abar) * x0[b] + math.sqrt(1 - abar) * eps[b]
        th.testing.assert_close(xt[b], expected, rtol=1e-5, atol=1e-6)
        th.testing.assert_close(mean[b], math.sqrt(abar) * x0[b], rtol=1e-5, atol=1e-6)
        assert th.allclose(var[b], th.tensor(1 - abar), rtol=1e-5)
        assert th.allclose(log_var[b], th.tensor(math.log(1 - abar)), rtol=1e-5)
    assert xt.dtype == th.float32


@pytest.mark.parametrize("shape", SHAPES)
def test_q_posterior_matches_hand_formula(shape):
    diffusion = make_diffusion(steps=20)
    x0 = th.rand(shape, generator=th.Generator().manual_seed(1))
    xt = th.randn(shape, generator=th.Generator().manual_seed(2))
    t = th.tensor([7, 1])
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, xt, t)
    for b in range(2):
        s = int(t[b])
        beta = float(diffusion.betas[s])
        abar, abar_prev = abar_hand(diffusion.betas, s), abar_hand(diffusion.betas, s - 1)
        coef_x0 = math.sqrt(abar_prev) * beta / (1 - abar)
        coef_xt = math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)
        th.testing.assert_close(mean[b], coef_x0 * x0[b] + coef_xt * xt[b], rtol=1e-5, atol=1e-6)
        post_var = (1 - abar_prev) / (1 - abar) * beta
        assert th.allclose(var[b], th.tensor(post_var), rtol=1e-5)
        assert th.allclose(log_var[b], th.tensor(math.log(post_var)), rtol=1e-5)
    # At t = 0 the posterior variance is 0; its log is clipped to the value at t = 1.
    assert diffusion.posterior_variance[0] == 0.0
    assert diffusion.posterior_log_variance_clipped[0] == math.log(diffusion.posterior_variance[1])


# ------------------------------------------------------------------------ reverse process


@pytest.mark.parametrize("shape", SHAPES)
def test_p_mean_variance_epsilon_model(shape):
    diffusion = make_diffusion(steps=20)
    x = th.randn(shape, generator=th.Generator().manual_seed(3))
    t = th.tensor([12, 4])
    out = diffusion.p_mean_variance(fixed_eps, x, t, clip_denoised=False)
    eps = fixed_eps(x, t)
    for b in range(2):
        abar = abar_hand(diffusion.betas, int(t[b]))
        expected = (x[b] - math.sqrt(1 - abar) * eps[b]) / math.sqrt(abar)
        th.testing.assert_close(out["pred_xstart"][b], expected, rtol=1e-5, atol=1e-5)
    post_mean, post_var, _ = diffusion.q_posterior_mean_variance(out["pred_xstart"], x, t)
    th.testing.assert_close(out["mean"], post_mean)
    th.testing.assert_close(out["variance"], post_var)
    clipped = diffusion.p_mean_variance(fixed_eps, x, t, clip_denoised=True)
    th.testing.assert_close(clipped["pred_xstart"], out["pred_xstart"].clamp(-1, 1))


@pytest.mark.parametrize("shape", SHAPES)
def test_learned_range_variance_interpolates_log_variance(shape):
    diffusion = make_diffusion(steps=20, var_type=ModelVarType.LEARNED_RANGE)
    B, C = shape[:2]
    v = th.linspace(-1, 1, math.prod(shape)).reshape(shape)  # includes both ends

    def model(x, t):
        return th.cat([fixed_eps(x, t), v], dim=1)

    x = th.randn(shape, generator=th.Generator().manual_seed(4))
    t = th.tensor([9, 0])
    out = diffusion.p_mean_variance(model, x, t)
    for b in range(B):
        s = int(t[b])
        min_log = math.log(diffusion.posterior_variance[max(s, 1)])  # clipped at t = 0
        max_log = math.log(diffusion.betas[s])
        frac = (v[b] + 1) / 2
        th.testing.assert_close(out["log_variance"][b], frac * max_log + (1 - frac) * min_log)
    flat_v = v.flatten()
    assert flat_v[0] == -1 and flat_v[-1] == 1
    th.testing.assert_close(out["variance"], th.exp(out["log_variance"]))
    with pytest.raises(ValueError, match="learned variance"):
        diffusion.p_mean_variance(fixed_eps, x, t)  # only C channels


def test_fixed_large_and_learned_variances():
    x = th.zeros(2, 1, 3, 3)
    t = th.tensor([0, 5])
    large = make_diffusion(steps=10, var_type=ModelVarType.FIXED_LARGE)
    out = large.p_mean_variance(fixed_eps, x, t)
    assert th.allclose(out["variance"][0], th.tensor(large.posterior_variance[1]).float())
    assert th.allclose(out["variance"][1], th.tensor(large.betas[5]).float())
    learned = make_diffusion(steps=10, var_type=ModelVarType.LEARNED)
    out = learned.p_mean_variance(lambda x, t: th.cat([x, th.full_like(x, -2.0)], 1), x, t)
    assert th.allclose(out["log_variance"], th.tensor(-2.0))
    assert th.allclose(out["variance"], th.tensor(math.exp(-2.0)))


@pytest.mark.parametrize("mean_type", [ModelMeanType.START_X, ModelMeanType.PREVIOUS_X])
def test_start_x_and_previous_x_models_recover_x0(mean_type):
    diffusion = make_diffusion(steps=20, mean_type=mean_type)
    shape = SHAPES[1]
    x0 = 0.5 * th.tanh(th.randn(shape, generator=th.Generator().manual_seed(5)))
    xt = th.randn(shape, generator=th.Generator().manual_seed(6))
    t = th.tensor([15, 3])
    post_mean = diffusion.q_posterior_mean_variance(x0, xt, t)[0]

    def model(x, t):
        return x0 if mean_type == ModelMeanType.START_X else post_mean

    out = diffusion.p_mean_variance(model, xt, t)
    th.testing.assert_close(out["pred_xstart"], x0, rtol=1e-4, atol=1e-4)
    th.testing.assert_close(out["mean"], post_mean, rtol=1e-4, atol=1e-4)


def test_condition_mean_and_score():
    diffusion = make_diffusion(steps=20)
    x = th.randn(SHAPES[1], generator=th.Generator().manual_seed(7))
    t = th.tensor([10, 2])
    out = diffusion.p_mean_variance(fixed_eps, x, t, clip_denoised=False)
    grad = th.full_like(x, 0.3)

    def cond_fn(x, t, scale):
        return scale * grad

    kwargs = {"scale": 2.0}
    new_mean = diffusion.condition_mean(cond_fn, out, x, t, model_kwargs=kwargs)
    th.testing.assert_close(new_mean, out["mean"] + out["variance"] * 0.6)
    scored = diffusion.condition_score(cond_fn, out, x, t, model_kwargs=kwargs)
    abar = th.tensor([abar_hand(diffusion.betas, int(s)) for s in t]).view(-1, 1, 1, 1, 1)
    eps = fixed_eps(x, t) - (1 - abar).sqrt().float() * 0.6
    expected_x0 = (x - (1 - abar).sqrt().float() * eps) / abar.sqrt().float()
    th.testing.assert_close(scored["pred_xstart"], expected_x0, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ samplers


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("use_ddim", [False, True])
def test_samplers_with_an_exact_model(shape, use_ddim):
    """Every x_0 prediction is c; deterministic DDIM stays on the closed-form trajectory
    x_t = sqrt(abar_t) c + sqrt(1 - abar_t) eps_T of its initial noise eps_T."""
    diffusion = make_diffusion(steps=25)
    c = 0.3
    model = ExactEpsModel(diffusion.alphas_cumprod, c=c)
    x_T = th.randn(shape, generator=th.Generator().manual_seed(8))
    loop = (
        diffusion.ddim_sample_loop_progressive if use_ddim else diffusion.p_sample_loop_progressive
    )
    outs = list(loop(model, shape, x_T, generator=th.Generator().manual_seed(9)))
    assert len(outs) == 25
    abar = diffusion.alphas_cumprod_prev  # x_{t-1} of step t is at alpha_bar_{t-1}
    eps_T = (x_T.double() - math.sqrt(diffusion.alphas_cumprod[-1]) * c) / math.sqrt(
        1 - diffusion.alphas_cumprod[-1]
    )
    for step, out in zip(range(24, -1, -1), outs):
        # float32 cancellation in x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) grows as
        # 1 / sqrt(abar_t) (abar_T ~ 4e-6 here): allow ~50x the expected rounding.
        atol = 1e-5 / math.sqrt(diffusion.alphas_cumprod[step])
        th.testing.assert_close(out["pred_xstart"], th.full(shape, c), rtol=0, atol=atol)
        if use_ddim:
            expected = math.sqrt(abar[step]) * c + math.sqrt(1 - abar[step]) * eps_T
            th.testing.assert_close(out["sample"], expected.float(), rtol=0, atol=atol)
    th.testing.assert_close(outs[-1]["sample"], th.full(shape, c), rtol=0, atol=1e-4)


def test_ddim_reverse_sample_follows_the_forward_trajectory():
    diffusion = make_diffusion(steps=20)
    model = ExactEpsModel(diffusion.alphas_cumprod, c=-0.2)
    eps = th.randn(SHAPES[1], generator=th.Generator().manual_seed(9))
    x0 = th.full_like(eps, -0.2)
    t = th.tensor([4, 11])
    xt = diffusion.q_sample(x0, t, noise=eps)
    nxt = diffusion.ddim_reverse_sample(model, xt, t)["sample"]
    th.testing.assert_close(nxt, diffusion.q_sample(x0, t + 1, noise=eps), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="eta"):
        diffusion.ddim_reverse_sample(model, xt, t, eta=0.5)


def test_ddim_eta0_is_deterministic_and_ignores_global_rng():
    diffusion = make_diffusion(steps=15)
    noise = th.randn(SHAPES[1], generator=th.Generator().manual_seed(10))
    th.manual_seed(0)
    first = diffusion.ddim_sample_loop(fixed_eps, SHAPES[1], noise=noise, clip_denoised=False)
    th.manual_seed(123)
    second = diffusion.ddim_sample_loop(fixed_eps, SHAPES[1], noise=noise, clip_denoised=False)
    assert th.equal(first, second)
    noisy = [
        diffusion.ddim_sample_loop(
            fixed_eps, SHAPES[1], noise=noise, eta=1.0, generator=th.Generator().manual_seed(s)
        )
        for s in (1, 1, 2)
    ]
    assert th.equal(noisy[0], noisy[1]) and not th.allclose(noisy[0], noisy[2])


@pytest.mark.parametrize("shape", SHAPES)
def test_generator_makes_p_sample_loop_reproducible(shape):
    diffusion = make_diffusion(steps=10)
    runs = []
    for seed, global_seed in ((5, 0), (5, 99), (6, 0)):
        th.manual_seed(global_seed)
        model = RecordingModel()
        sample = diffusion.p_sample_loop(model, shape, generator=th.Generator().manual_seed(seed))
        runs.append((sample, model.inputs[0][0]))
    assert th.equal(runs[0][0], runs[1][0])
    assert not th.allclose(runs[0][0], runs[2][0])
    # The initial x_T is the generator's first draw.
    th.testing.assert_close(runs[0][1], th.randn(shape, generator=th.Generator().manual_seed(5)))


@pytest.mark.parametrize("use_ddim", [False, True])
def test_step_hook_sees_every_step_and_replaces_the_sample(use_ddim):
    diffusion = make_diffusion(steps=6)
    shape = SHAPES[1]
    model = RecordingModel()
    calls = []

    def hook(x_prev, t, out, model_kwargs):
        calls.append((x_prev.clone(), t.clone(), sorted(out), model_kwargs))
        return th.full_like(x_prev, 0.1 * len(calls))

    loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    final = loop(model, shape, step_hook=hook, generator=th.Generator().manual_seed(0))
    assert [c[1].tolist() for c in calls] == [[s, s] for s in range(5, -1, -1)]
    assert all("pred_xstart" in c[2] and "sample" in c[2] for c in calls)
    assert all(c[3] == {} for c in calls)
    # The model at step k + 1 sees the hook's return of step k; the loop returns the last one.
    for k in range(1, 6):
        th.testing.assert_close(model.inputs[k][0], th.full(shape, 0.1 * k))
    th.testing.assert_close(final, th.full(shape, 0.6))
    # A hook returning None leaves the sample untouched.
    untouched = loop(
        fixed_eps, shape, step_hook=lambda *a: None, generator=th.Generator().manual_seed(1)
    )
    plain = loop(fixed_eps, shape, generator=th.Generator().manual_seed(1))
    assert th.equal(untouched, plain)


@pytest.mark.parametrize("use_ddim", [False, True])
def test_start_t_runs_start_t_plus_one_steps(use_ddim):
    diffusion = make_diffusion(steps=10)
    shape = SHAPES[0]
    x_start_t = th.randn(shape, generator=th.Generator().manual_seed(11))
    model = RecordingModel()
    loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    loop(model, shape, x_start_t, start_t=3, generator=th.Generator().manual_seed(0))
    assert [inp[1].tolist() for inp in model.inputs] == [[3, 3], [2, 2], [1, 1], [0, 0]]
    assert th.equal(model.inputs[0][0], x_start_t)
    with pytest.raises(ValueError, match="start_t"):
        loop(fixed_eps, shape, x_start_t, start_t=10)
    with pytest.raises(ValueError, match="noise"):
        loop(fixed_eps, shape, start_t=3)
    with pytest.raises(ValueError, match="shape"):
        loop(fixed_eps, (2, 1, 4, 4), x_start_t)


def test_p_sample_loop_keeps_upstream_positional_order():
    diffusion = make_diffusion(steps=5)
    noise = th.randn(SHAPES[1], generator=th.Generator().manual_seed(12))
    model_kwargs = {"offset": 0.0}

    def model(x, t, offset):
        return fixed_eps(x, t) + offset

    a = diffusion.p_sample_loop(
        model, SHAPES[1], noise, True, None, None, model_kwargs, None, False,
        generator=th.Generator().manual_seed(3),
    )
    b = diffusion.p_sample_loop(
        model, SHAPES[1], noise=noise, clip_denoised=True, model_kwargs=model_kwargs,
        generator=th.Generator().manual_seed(3),
    )
    assert th.equal(a, b)


def test_progressive_loop_yields_one_dict_per_step(capsys):
    diffusion = make_diffusion(steps=7)
    outs = list(
        diffusion.p_sample_loop_progressive(
            fixed_eps, SHAPES[1], generator=th.Generator().manual_seed(0)
        )
    )
    assert len(outs) == 7
    assert set(outs[0]) == {"sample", "pred_xstart", "mean", "variance", "log_variance"}
    assert capsys.readouterr().err == ""
    with_bar = diffusion.p_sample_loop(
        fixed_eps, SHAPES[1], progress=True, generator=th.Generator().manual_seed(0)
    )
    assert th.equal(with_bar, outs[-1]["sample"])
    assert "7/7" in capsys.readouterr().err  # the tqdm bar, on stderr


# ------------------------------------------------------------------------ training losses


class TinyLearnedSigmaModel(th.nn.Module):
    """eps = a * x, variance values = tanh(b) everywhere: output has 2C channels."""

    def __init__(self):
        super().__init__()
        self.a = th.nn.Parameter(th.tensor(0.7))
        self.b = th.nn.Parameter(th.tensor(0.2))

    def forward(self, x, t):
        return th.cat([self.a * x, th.tanh(self.b).expand_as(x)], dim=1)


@pytest.mark.parametrize("shape", SHAPES)
def test_training_losses_with_learned_sigma(shape):
    diffusion = make_diffusion(steps=50, var_type=ModelVarType.LEARNED_RANGE)
    model = TinyLearnedSigmaModel()
    gen = th.Generator().manual_seed(13)
    x0 = th.rand(shape, generator=gen) * 2 - 1
    noise = th.randn(shape, generator=gen)
    t = th.tensor([0, 31])
    terms = diffusion.training_losses(model, x0, t, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"}
    for value in terms.values():
        assert value.shape == (2,) and th.isfinite(value).all()
    th.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    xt = diffusion.q_sample(x0, t, noise=noise)
    dims = list(range(1, len(shape)))
    th.testing.assert_close(terms["mse"], ((noise - 0.7 * xt) ** 2).mean(dim=dims))
    # vb trains only the variance: no gradient reaches the mean parameter through it.
    grad_a, grad_b = th.autograd.grad(terms["vb"].sum(), [model.a, model.b], allow_unused=True)
    assert (grad_a is None or grad_a == 0) and grad_b != 0

    rescaled = make_diffusion(
        steps=50, var_type=ModelVarType.LEARNED_RANGE, loss_type=LossType.RESCALED_MSE
    ).training_losses(model, x0, t, noise=noise)
    th.testing.assert_close(rescaled["vb"], terms["vb"] * 50 / 1000)


def test_kl_loss_is_the_vb_term():
    diffusion = make_diffusion(
        steps=30, var_type=ModelVarType.LEARNED_RANGE, loss_type=LossType.RESCALED_KL
    )
    model = TinyLearnedSigmaModel()
    gen = th.Generator().manual_seed(14)
    x0 = th.rand(SHAPES[1], generator=gen) * 2 - 1
    noise = th.randn(SHAPES[1], generator=gen)
    t = th.tensor([0, 12])
    loss = diffusion.training_losses(model, x0, t, noise=noise)["loss"]
    xt = diffusion.q_sample(x0, t, noise=noise)
    vb = diffusion._vb_terms_bpd(model, x0, xt, t, clip_denoised=False)["output"]
    th.testing.assert_close(loss, vb * 30)
    # At t = 0 the term is the decoder NLL (bits), at t > 0 the KL to the posterior (bits).
    out = diffusion.p_mean_variance(model, xt, t, clip_denoised=False)
    nll = -discretized_gaussian_log_likelihood(
        x0, means=out["mean"], log_scales=0.5 * out["log_variance"]
    )
    assert th.allclose(vb[0], nll[0].mean() / math.log(2.0), rtol=1e-5)
    true_mean, _, true_logvar = diffusion.q_posterior_mean_variance(x0, xt, t)
    kl = normal_kl(true_mean, true_logvar, out["mean"], out["log_variance"])
    assert th.allclose(vb[1], kl[1].mean() / math.log(2.0), rtol=1e-5)


def test_prior_bpd_and_calc_bpd_loop():
    # A short chain that keeps signal at T, so the prior term is far from 0.
    diffusion = GaussianDiffusion(
        betas=np.full(8, 0.05),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_LARGE,
        loss_type=LossType.KL,
    )
    x0 = th.full(SHAPES[1], 0.5)
    abar_T = 0.95**8
    # KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) in bits.
    expected = 0.5 * (-1 - math.log(1 - abar_T) + (1 - abar_T) + abar_T * 0.25) / math.log(2.0)
    th.testing.assert_close(diffusion._prior_bpd(x0), th.full((2,), expected), rtol=1e-5, atol=0)
    th.manual_seed(0)
    out = diffusion.calc_bpd_loop(fixed_eps, x0)
    for key in ("vb", "xstart_mse", "mse"):
        assert out[key].shape == (2, 8) and th.isfinite(out[key]).all()
    th.testing.assert_close(out["total_bpd"], out["vb"].sum(dim=1) + out["prior_bpd"])


# -------------------------------------------------------------------------------- losses


def test_normal_kl_hand_values():
    m = th.tensor([0.3, -1.0])
    assert th.equal(normal_kl(m, th.log(th.tensor([2.0, 0.5])), m, th.log(th.tensor([2.0, 0.5]))),
                    th.zeros(2))
    # KL(N(1, 1) || N(0, 4)) = 0.5 * (log 4 + (1 + 1) / 4 - 1)
    kl = normal_kl(th.tensor(1.0), 0.0, 0.0, math.log(4.0))
    assert kl.item() == pytest.approx(0.5 * (math.log(4.0) + 0.5 - 1.0), rel=1e-6)
    with pytest.raises(ValueError, match="Tensor"):
        normal_kl(0.0, 0.0, 1.0, 0.0)


def test_approx_cdf_close_to_exact():
    x = th.linspace(-4, 4, 81, dtype=th.float64)
    exact = 0.5 * (1 + th.erf(x / math.sqrt(2)))
    assert (approx_standard_normal_cdf(x) - exact).abs().max() < 1e-3
    assert approx_standard_normal_cdf(th.tensor(0.0)).item() == 0.5


def test_discretized_log_likelihood_sums_to_one_over_bins():
    bins = th.linspace(-1, 1, 256, dtype=th.float64)  # the 8-bit levels in [-1, 1]
    for mean, log_scale in ((0.1, math.log(0.3)), (-0.95, math.log(0.02)), (0.0, 0.0)):
        means = th.full_like(bins, mean)
        log_scales = th.full_like(bins, log_scale)
        probs = discretized_gaussian_log_likelihood(bins, means=means, log_scales=log_scales).exp()
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        discretized_gaussian_log_likelihood(bins, means=bins[:3], log_scales=bins)


def test_v_prediction_target_and_inverse_are_consistent():
    """v = sqrt(abar) eps - sqrt(1 - abar) x0; x0 = sqrt(abar) x_t - sqrt(1 - abar) v exactly."""
    from guided_diffusion.script_util import create_gaussian_diffusion

    diffusion = create_gaussian_diffusion(steps=100, predict_v=True)
    x0, eps = th.randn(3, 1, 4, 4), th.randn(3, 1, 4, 4)
    t = th.tensor([0, 50, 99])
    x_t = diffusion.q_sample(x0, t, noise=eps)
    v = diffusion._velocity(x0, t, eps)
    th.testing.assert_close(diffusion._predict_xstart_from_v(x_t, t, v), x0, rtol=1e-5, atol=1e-5)
    out = diffusion.p_mean_variance(lambda x, ts: v, x_t, t, clip_denoised=False)
    th.testing.assert_close(out["pred_xstart"], x0, rtol=1e-5, atol=1e-5)
    losses = diffusion.training_losses(lambda x, ts: v, x0, t, noise=eps)
    assert float(losses["loss"].max()) < 1e-10


def test_regression_diffusion_is_one_step_from_an_empty_x_t():
    from guided_diffusion.script_util import create_gaussian_diffusion

    diffusion = create_gaussian_diffusion(steps=1000, regression=True, timestep_respacing="ddim10")
    assert diffusion.num_timesteps == 1
    seen = []

    def model(x, ts, low_res):
        seen.append(x.clone())
        return 0.5 * low_res

    low = th.rand(2, 1, 4, 4)
    for loop in (diffusion.p_sample_loop, diffusion.ddim_sample_loop):
        sample = loop(model, low.shape, noise=th.randn_like(low), model_kwargs=dict(low_res=low))
        th.testing.assert_close(sample, 0.5 * low)
    assert all(float(x.abs().max()) == 0.0 for x in seen)
    x0 = th.rand(2, 1, 4, 4)
    losses = diffusion.training_losses(model, x0, th.zeros(2, dtype=th.long), model_kwargs=dict(low_res=low))
    th.testing.assert_close(losses["loss"], ((x0 - 0.5 * low) ** 2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("respacing", ["", "ddim10"])
def test_x0_skip_blends_the_model_with_x_t_by_hand_computed_weights(respacing):
    """x0 = c x_t / sqrt(abar) + (1 - c) model, c = s^2 / (s^2 + 1 / abar - 1), on the original
    step's abar whatever the respacing; the loss compares that blend with x_0."""
    from guided_diffusion.script_util import create_gaussian_diffusion

    s = 0.05
    diffusion = create_gaussian_diffusion(steps=100, predict_xstart=True, x0_skip_sigma=s,
                                          timestep_respacing=respacing)
    plain = create_gaussian_diffusion(steps=100, predict_xstart=True)
    x_t, model_x0 = th.randn(3, 1, 4, 4), th.rand(3, 1, 4, 4)
    index = th.tensor([0, 3, diffusion.num_timesteps - 1])
    original = [diffusion.timestep_map[i] if respacing else i for i in index.tolist()]
    betas = get_named_beta_schedule("linear", 100)
    expected = []
    for row, t in enumerate(original):
        abar = abar_hand(betas, t)
        c = s * s / (s * s + 1.0 / abar - 1.0)
        expected.append(c * x_t[row] / math.sqrt(abar) + (1.0 - c) * model_x0[row])
    expected = th.stack(expected)
    out = diffusion.p_mean_variance(lambda x, ts: model_x0, x_t, index, clip_denoised=False)
    th.testing.assert_close(out["pred_xstart"], expected, rtol=1e-5, atol=1e-6)
    # at the first original step the x_t term dominates, at the last the model's
    assert float((out["pred_xstart"][2] - model_x0[2]).abs().max()) < 1e-3
    th.testing.assert_close(plain.p_mean_variance(lambda x, ts: model_x0, x_t, index,
                                                  clip_denoised=False)["pred_xstart"], model_x0)
    x0, eps = th.rand(3, 1, 4, 4), th.randn(3, 1, 4, 4)
    noisy = diffusion.q_sample(x0, index, noise=eps)
    blended = diffusion.p_mean_variance(lambda x, ts: model_x0, noisy, index, clip_denoised=False)["pred_xstart"]
    losses = diffusion.training_losses(lambda x, ts: model_x0, x0, index, noise=eps)
    th.testing.assert_close(losses["loss"], ((blended - x0) ** 2).mean(dim=(1, 2, 3)))


def test_x0_skip_needs_an_x0_model():
    from guided_diffusion.script_util import create_gaussian_diffusion

    with pytest.raises(ValueError, match="x0_skip_sigma"):
        create_gaussian_diffusion(steps=100, x0_skip_sigma=0.05)
    with pytest.raises(ValueError, match="x0_skip_sigma"):
        create_gaussian_diffusion(steps=100, predict_xstart=True, x0_skip_sigma=-1)


@pytest.mark.parametrize("respacing", ["", "10"])
def test_with_x0_skip_sigma_samples_as_if_built_with_it(respacing):
    from guided_diffusion.script_util import create_gaussian_diffusion

    trained = create_gaussian_diffusion(steps=100, predict_xstart=True, x0_skip_sigma=0.025,
                                        timestep_respacing=respacing)
    built = create_gaussian_diffusion(steps=100, predict_xstart=True, x0_skip_sigma=0.05,
                                      timestep_respacing=respacing)
    wider = trained.with_x0_skip_sigma(0.05)
    np.testing.assert_array_equal(wider.x0_skip_weight, built.x0_skip_weight)
    assert trained.x0_skip_sigma == 0.025 and wider.x0_skip_sigma == 0.05  # the original is unchanged
    x_t, model_x0, index = th.randn(2, 1, 4, 4), th.rand(2, 1, 4, 4), th.tensor([1, 5])
    model = lambda x, ts: model_x0  # noqa: E731
    th.testing.assert_close(wider.p_mean_variance(model, x_t, index)["pred_xstart"],
                            built.p_mean_variance(model, x_t, index)["pred_xstart"])
    off = trained.with_x0_skip_sigma(0.0)
    th.testing.assert_close(off.p_mean_variance(model, x_t, index, clip_denoised=False)["pred_xstart"], model_x0)
    with pytest.raises(ValueError, match="x0_skip_sigma"):
        create_gaussian_diffusion(steps=100).with_x0_skip_sigma(0.05)


@pytest.mark.parametrize("sigma_small", [False, True])
def test_a_one_step_chain_returns_the_x0_estimate_at_its_step(sigma_small):
    """"log2@999": one step at t = 999 (either fixed variance) gives the model's x_0 there."""
    from guided_diffusion.script_util import create_gaussian_diffusion

    diffusion = create_gaussian_diffusion(steps=1000, predict_xstart=True, sigma_small=sigma_small,
                                          timestep_respacing="log2@999")
    assert diffusion.timestep_map == [999]
    seen = []

    def model(x, ts):
        seen.append(int(ts[0]))
        return th.full_like(x, 0.25)

    for loop in (diffusion.p_sample_loop, diffusion.ddim_sample_loop):
        sample = loop(model, (1, 1, 3, 3), noise=th.randn(1, 1, 3, 3))
        th.testing.assert_close(sample, th.full((1, 1, 3, 3), 0.25))
    assert seen == [999, 999]
