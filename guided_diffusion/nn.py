"""
Small neural-network helpers shared by the UNet models (upstream guided-diffusion names).

Tensors are channel-first: ``(B, C, *spatial)``; for 3D models the spatial axes are
``(Z, X, Y)`` (Z axial), see ``unet.py``.
"""

import math

import torch as th
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

NORM_GROUPS = 32


class GroupNorm32(nn.GroupNorm):
    """
    GroupNorm computed in float32 and returned in the input dtype (as upstream).

    A bf16 input on the CPU without autograd (sampling) goes straight to the mixed-precision
    kernel (float32 statistics and affine, bf16 in and out): the same values as upstream's
    cast-normalise-cast, without the two full-size copies. Other inputs are cast as upstream does.
    """

    def forward(self, x):
        if self._takes_as_is(x):
            return self._group_norm(x, self.weight, self.bias)
        return super().forward(x.float()).type(x.dtype)

    def modulated(self, x, scale, shift):
        """
        ``norm(x) * (1 + scale) + shift`` for per-channel ``scale``, ``shift`` [N x C x 1 ...].

        With one sample the modulation is folded into the affine parameters: one pass over
        ``x`` instead of three, values rounded once instead of after each step.
        """
        if x.shape[0] == 1 and self._takes_as_is(x):
            gain = 1 + scale.flatten().float()
            return self._group_norm(x, self.weight * gain, self.bias * gain + shift.flatten().float())
        return self(x) * (1 + scale) + shift

    @staticmethod
    def _takes_as_is(x):
        """Whether ``F.group_norm`` normalises ``x`` in float32 without a cast: float32, or bf16
        on the CPU without autograd (torch's mixed-precision group-norm backward on the CPU is
        several times slower than upstream's cast-normalise-cast, so training keeps the casts)."""
        return x.dtype == th.float32 or (x.dtype == th.bfloat16 and x.device.type == "cpu"
                                         and not th.is_grad_enabled())

    def _group_norm(self, x, weight, bias):
        with th.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)


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


_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class AvgPoolNd(nn.Module):
    """
    Non-overlapping average pooling (stride = kernel) as a depthwise convolution with fixed
    weights 1 / prod(kernel): the values of ``nn.AvgPool{1,2,3}d``, computed in the input's
    dtype and memory layout (the CPU has no bf16 ``avg_pool3d``, so autocast would copy the
    tensor through float32 and back).
    """

    def __init__(self, dims, kernel_size):
        super().__init__()
        if dims not in _CONV_FUNCTIONS:
            raise ValueError(f"unsupported dimensions: {dims} (expected 1, 2 or 3)")
        kernel = (kernel_size,) * dims if isinstance(kernel_size, int) else tuple(kernel_size)
        if len(kernel) != dims:
            raise ValueError(f"kernel {kernel_size} does not have {dims} dimensions")
        self.dims = dims
        self.kernel_size = kernel

    def forward(self, x):
        channels = x.shape[1]
        weight = x.new_full((channels, 1, *self.kernel_size), 1.0 / math.prod(self.kernel_size))
        return _CONV_FUNCTIONS[self.dims](x, weight, stride=self.kernel_size, groups=channels)


def avg_pool_nd(dims, kernel_size):
    """Create a 1D, 2D, or 3D non-overlapping average pooling module (stride = kernel)."""
    return AvgPoolNd(dims, kernel_size)


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
