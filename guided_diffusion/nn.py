"""
Small neural-network helpers shared by the UNet models (upstream guided-diffusion names).

Tensors are channel-first: ``(B, C, *spatial)``; for 3D models the spatial axes are
``(Z, X, Y)`` (Z axial), see ``unet.py``.
"""

import math

import torch as th
import torch.nn as nn
import torch.utils.checkpoint

NORM_GROUPS = 32


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype (as upstream)."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def conv_nd(dims, *args, **kwargs):
    """Create a 1D, 2D, or 3D convolution module."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims} (expected 1, 2 or 3)")


def linear(*args, **kwargs):
    """Create a linear module."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """Create a 1D, 2D, or 3D average pooling module."""
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims} (expected 1, 2 or 3)")


def update_ema(target_params, source_params, rate=0.99):
    """
    Move `target_params` towards `source_params` by an exponential moving average.

    :param rate: the EMA rate (closer to 1 means slower).
    """
    for targ, src in zip(target_params, source_params):
        targ.detach().mul_(rate).add_(src, alpha=1 - rate)


def zero_module(module):
    """Zero out the parameters of a module and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module, scale):
    """Scale the parameters of a module and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def mean_flat(tensor):
    """Take the mean over all non-batch dimensions."""
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


def normalization(channels):
    """
    Make a standard normalization layer: GroupNorm with 32 groups, as upstream.

    Channel counts that 32 does not divide (which upstream rejects) use
    ``gcd(32, channels)`` groups, so tiny test models (e.g. 16 channels) can be built;
    every upstream-valid width keeps exactly 32 groups.
    """
    return GroupNorm32(math.gcd(NORM_GROUPS, channels), channels)


def timestep_embedding(timesteps, dim, max_period=10000):
    """
    Create sinusoidal timestep embeddings (upstream definition).

    :param timesteps: a 1-D Tensor of N indices, one per batch element (may be fractional).
    :param dim: the dimension of the output.
    :param max_period: controls the minimum frequency of the embeddings.
    :return: an [N x dim] float32 Tensor: ``[cos(t f_k), sin(t f_k)]`` with
        ``f_k = max_period ** (-k / (dim // 2))``.
    """
    half = dim // 2
    freqs = th.exp(
        -math.log(max_period) * th.arange(start=0, end=half, dtype=th.float32) / half
    ).to(device=timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = th.cat([th.cos(args), th.sin(args)], dim=-1)
    if dim % 2:
        embedding = th.cat([embedding, th.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def checkpoint(func, inputs, params, flag):
    """
    Evaluate `func(*inputs)`, without caching activations when `flag` is True.

    Uses ``torch.utils.checkpoint`` (non-reentrant), which recomputes the forward
    under the same autocast state in the backward pass. `params` is kept for upstream
    call compatibility; the non-reentrant implementation tracks parameters itself.
    """
    del params
    if flag and th.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
