"""
Timestep samplers for training (importance sampling over diffusion steps).

As in OpenAI guided-diffusion. `LossAwareSampler.update_with_local_losses` gathers losses from
all ranks with torch.distributed when a process group is initialised, and uses the local
losses directly in a single process.
"""

from abc import ABC, abstractmethod

import numpy as np
import torch as th
import torch.distributed as dist


def create_named_schedule_sampler(name, diffusion):
    """
    Create a ScheduleSampler by name: "uniform", "uniform:N" (uniform over the first N steps
    only), "low:N:P" (a fraction P of the draws uniform over the first N steps, the rest over
    all; :class:`LowNoiseMixtureSampler`) or "loss-second-moment".

    :param name: the name of the sampler.
    :param diffusion: the diffusion object to sample for.
    """
    if name == "uniform":
        return UniformSampler(diffusion)
    if name.startswith("uniform:"):
        try:
            max_t = int(name.split(":", 1)[1])
        except ValueError:
            max_t = 0
        if not 0 < max_t <= diffusion.num_timesteps:
            raise ValueError(f"schedule sampler {name!r}: N must be in [1, {diffusion.num_timesteps}]")
        return UniformSampler(diffusion, max_t)
    if name.startswith("low:"):
        return LowNoiseMixtureSampler(diffusion, *_low_mixture_arguments(name, diffusion.num_timesteps))
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(
        f"unknown schedule sampler: {name!r} (use 'uniform', 'uniform:N', 'low:N:P' or 'loss-second-moment')"
    )


def _low_mixture_arguments(name, num_timesteps):
    """``(N, P)`` of a ``"low:N:P"`` sampler name (ValueError if malformed or out of range)."""
    parts = name.split(":")
    try:
        max_t, fraction = int(parts[1]), float(parts[2])
    except (IndexError, ValueError):
        max_t, fraction = 0, -1.0
    if len(parts) != 3 or not 0 < max_t <= num_timesteps or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"schedule sampler {name!r}: expected 'low:N:P' with N in [1, {num_timesteps}] "
                         f"and P in [0, 1]")
    return max_t, fraction


class ScheduleSampler(ABC):
    """
    A distribution over diffusion steps, used to reduce the variance of the objective.

    sample() performs unbiased importance sampling: losses multiplied by the returned weights
    have the same expectation as under uniform sampling.
    """

    @abstractmethod
    def weights(self):
        """
        A numpy array of positive (not necessarily normalised) weights, one per step.
        """

    def sample(self, batch_size, device):
        """
        Importance-sample timesteps for a batch (with numpy's global RNG).

        :param batch_size: the number of timesteps.
        :param device: the torch device of the returned tensors.
        :return: (timesteps, weights): long tensor of step indices and float tensor of loss
            weights 1 / (T p(t)), both shape (batch_size,).
        """
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = th.from_numpy(indices_np).long().to(device)
        weights_np = 1 / (len(p) * p[indices_np])
        weights = th.from_numpy(weights_np).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    """Uniform over all steps, or over the first ``max_t`` steps only.

    The truncated form trains a model for the low-noise end of the chain alone (e.g. a prior
    used only in BC-DPM's last ``l`` steps with ``--bc_start``); its importance weights are the
    constant ``max_t / T``.
    """

    def __init__(self, diffusion, max_t=None):
        self.diffusion = diffusion
        self._weights = np.zeros([diffusion.num_timesteps])
        self._weights[: max_t or diffusion.num_timesteps] = 1.0

    def weights(self):
        return self._weights


class LowNoiseMixtureSampler(ScheduleSampler):
    """A fraction ``fraction`` of the draws uniform over the first ``max_t`` steps, the rest
    uniform over all steps: a prior trained for the whole chain that spends its capacity where
    a sampler conditioned in its last steps (BC-DPM) uses it.

    Unlike the importance samplers above, the loss weights are 1: the mixture *is* the training
    objective's distribution over steps (importance weights would restore the uniform objective
    and undo the emphasis).
    """

    def __init__(self, diffusion, max_t, fraction):
        self.diffusion = diffusion
        steps = diffusion.num_timesteps
        self._weights = np.full([steps], (1.0 - fraction) / steps)
        self._weights[:max_t] += fraction / max_t

    def weights(self):
        return self._weights

    def sample(self, batch_size, device):
        indices, weights = super().sample(batch_size, device)
        return indices, th.ones_like(weights)


class LossAwareSampler(ScheduleSampler):
    def update_with_local_losses(self, local_ts, local_losses):
        """
        Update the reweighting with this rank's batch of timesteps and their losses.

        With torch.distributed initialised, call it on every rank: the batches of all ranks
        (which may differ in size) are gathered so that all ranks keep the same reweighting.
        Without it, the local batch is used as is.

        :param local_ts: an integer tensor of timesteps, shape (N,).
        :param local_losses: a float tensor of losses, shape (N,).
        """
        if local_ts.shape != local_losses.shape or local_ts.dim() != 1:
            raise ValueError(
                f"local_ts {tuple(local_ts.shape)} and local_losses "
                f"{tuple(local_losses.shape)} must be 1-D of equal length"
            )
        if not (dist.is_available() and dist.is_initialized()):
            self.update_with_all_losses(local_ts.tolist(), local_losses.tolist())
            return

        device = local_ts.device
        batch_sizes = [
            th.zeros(1, dtype=th.int64, device=device) for _ in range(dist.get_world_size())
        ]
        dist.all_gather(batch_sizes, th.tensor([len(local_ts)], dtype=th.int64, device=device))
        batch_sizes = [int(x.item()) for x in batch_sizes]
        max_bs = max(batch_sizes)

        # all_gather needs equal sizes: pad every local batch to the largest one.
        def gather_padded(local):
            padded = th.zeros(max_bs, dtype=local.dtype, device=device)
            padded[: len(local)] = local
            gathered = [th.zeros_like(padded) for _ in batch_sizes]
            dist.all_gather(gathered, padded)
            return [x for chunk, bs in zip(gathered, batch_sizes) for x in chunk[:bs].tolist()]

        timesteps = gather_padded(local_ts)
        losses = gather_padded(local_losses)
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """
        Update the reweighting with the losses of all ranks, without synchronising.

        Called by update_with_local_losses on every rank with identical arguments, so it must
        be deterministic.

        :param ts: a list of int timesteps.
        :param losses: a list of float losses, one per timestep.
        """


class LossSecondMomentResampler(LossAwareSampler):
    """
    Sample t with probability proportional to sqrt(E[loss_t^2]) over the last
    `history_per_term` losses of each step, mixed with `uniform_prob` of uniform sampling.
    Uniform until every step has a full history.
    """

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros(
            [diffusion.num_timesteps, history_per_term], dtype=np.float64
        )
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            t = int(t)
            if self._loss_counts[t] == self.history_per_term:
                # Shift out the oldest loss term.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return (self._loss_counts == self.history_per_term).all()
