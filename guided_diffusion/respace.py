"""
Timestep respacing: run a diffusion process on a subset of its original steps.

As in OpenAI guided-diffusion: `space_timesteps` picks the steps to keep, `SpacedDiffusion`
rebuilds betas so that alphas_cumprod at the kept steps is unchanged, and `_WrappedModel` maps
respaced indices back to original timesteps before calling the model.
"""

import numpy as np
import torch as th

from . import gaussian_diffusion as gd
from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """
    Choose which steps of an original diffusion process to keep.

    The process is cut into len(section_counts) equal portions (the first
    num_timesteps % len(section_counts) portions one step longer) and each portion is strided
    to its count, with fractional strides rounded. E.g. 300 steps with [10, 15, 20]: the first
    100 steps give 10, the next 100 give 15, the last 100 give 20.

    :param num_timesteps: the number of steps of the original process.
    :param section_counts: a list of ints, or a string: comma-separated ints ("250,200"), or
        "ddimN", the fixed integer striding of the DDIM paper (range(0, T, stride) with exactly
        N elements, smallest such stride), or "logN": step 0 and N - 1 steps spaced evenly in
        log t from 1 to T - 1 (rounded, strictly increasing: dense where the noise is small,
        which is where a sampler that follows x_t draws its detail). A string may end in "@F"
        ("100@10"): the reverse
        chain ends at original step F (kept steps below F dropped, F kept), so the sampler's
        output is the model's x_0 estimate at step F instead of at step 0.
    :return: a set of kept step indices of the original process.
    """
    if isinstance(section_counts, str) and "@" in section_counts:
        spec, final = section_counts.rsplit("@", 1)
        final = _parse_count(final, section_counts)
        if not 0 <= final < num_timesteps:
            raise ValueError(f"bad timestep respacing {section_counts!r}: the final step {final} "
                             f"is outside 0..{num_timesteps - 1}")
        return {t for t in space_timesteps(num_timesteps, spec) if t > final} | {final}
    if isinstance(section_counts, str):
        if section_counts.startswith("log"):
            return _log_spaced(num_timesteps, _parse_count(section_counts[len("log"):], section_counts))
        if section_counts.startswith("ddim"):
            desired_count = _parse_count(section_counts[len("ddim") :], section_counts)
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"cannot create exactly {desired_count} steps out of {num_timesteps} "
                "with an integer stride"
            )
        section_counts = [_parse_count(part, section_counts) for part in section_counts.split(",")]
    if len(section_counts) == 0:
        raise ValueError("section_counts is empty")
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if section_count < 1 or size < section_count:
            raise ValueError(f"cannot divide a section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


def _log_spaced(num_timesteps, count):
    if not 2 <= count <= num_timesteps:
        raise ValueError(f"cannot space {count} steps logarithmically over {num_timesteps} (need 2..T)")
    steps = [0]
    for value in np.geomspace(num_timesteps - 1, 1, count - 1)[::-1]:  # starts at T - 1
        steps.append(max(int(round(value)), steps[-1] + 1))
    # rounding up crowded small steps may push the last ones past T - 1: pull them back in order
    for i in range(len(steps) - 1, 0, -1):
        steps[i] = min(steps[i], num_timesteps - 1 - (len(steps) - 1 - i))
    return set(steps)


def _parse_count(text, spec):
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"bad timestep respacing {spec!r}: {text!r} is not an integer "
            "(use e.g. '100', '250,200', 'ddim25' or '100@10')"
        ) from None


class SpacedDiffusion(GaussianDiffusion):
    """
    A diffusion process which can skip steps in a base diffusion process.

    Step indices of this object (the `t` seen by samplers and step hooks) are respaced indices
    0..len(use_timesteps)-1; `timestep_map[i]` is the original step of respaced index i, and the
    model always receives original steps.

    :param use_timesteps: a collection (sequence or set) of original steps to retain.
    :param kwargs: the kwargs to create the base diffusion process.
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.timestep_map = []
        self.original_num_steps = len(kwargs["betas"])
        if not self.use_timesteps or not self.use_timesteps <= set(range(self.original_num_steps)):
            raise ValueError(
                f"use_timesteps must be a non-empty subset of 0..{self.original_num_steps - 1}"
            )

        self.base_kwargs = dict(kwargs)
        base_diffusion = GaussianDiffusion(**kwargs)
        last_alpha_cumprod = 1.0
        new_betas = []
        for i, alpha_cumprod in enumerate(base_diffusion.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)

    def respaced(self, section_counts):
        """The same base process kept at ``section_counts`` steps (:func:`space_timesteps`), with
        this one's x_0 clip range and blend width."""
        other = SpacedDiffusion(space_timesteps(self.original_num_steps, section_counts), **self.base_kwargs)
        other.x0_clip_range = self.x0_clip_range
        return other.with_x0_skip_sigma(self.x0_skip_sigma)

    def p_mean_variance(self, model, *args, **kwargs):  # pylint: disable=signature-differs
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):  # pylint: disable=signature-differs
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(
            model, self.timestep_map, self.rescale_timesteps, self.original_num_steps
        )

    def _scale_timesteps(self, t):
        # Scaling is done by the wrapped model.
        return t


class _WrappedModel:
    """Call `model` with original timesteps (optionally rescaled to 0..1000)."""

    def __init__(self, model, timestep_map, rescale_timesteps, original_num_steps):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps

    def __call__(self, x, ts, **kwargs):
        map_tensor = th.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        new_ts = map_tensor[ts]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)


class RegressionDiffusion(SpacedDiffusion):
    """
    A supervised network (the 3D U-Net baseline) in the diffusion interface: one step, ``x_t``
    always empty (zeros), the model's ``START_X`` output is its one-step estimate of ``x_0`` from
    the conditioning alone. Training (``training_losses``) is then the plain MSE regression
    ``|model(0, low_res) - x_0|^2``, and every sampling loop returns that estimate, whatever
    noise it is given.
    """

    def __init__(self, **kwargs):
        super().__init__(use_timesteps={0}, **kwargs)
        if self.num_timesteps != 1 or self.model_mean_type != gd.ModelMeanType.START_X:
            raise ValueError("a regression diffusion has one step and predicts x_0")

    def q_sample(self, x_start, t, noise=None):
        return th.zeros_like(x_start)

    def _sample_loop_progressive(self, step, model, shape, *, noise, device, **kwargs):
        if device is None:
            device = gd._default_device(model, noise)
        zeros = th.zeros(tuple(shape), device=device)
        yield from super()._sample_loop_progressive(step, model, shape, noise=zeros, device=device,
                                                    **kwargs)
