"""
Likelihood helpers for the diffusion variational bound.

Ported in spirit from Ho et al.'s diffusion codebase, as in OpenAI guided-diffusion. All
functions are element-wise (they broadcast), so they work for any tensor rank: 2D images
(B, C, H, W) and 3D volumes (B, C, Z, X, Y) alike. Results are in nats.
"""

import numpy as np
import torch as th


def normal_kl(mean1, logvar1, mean2, logvar2):
    """
    KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), element-wise, in nats.

    Arguments broadcast against each other; scalars are accepted as long as at least one
    argument is a tensor (its dtype and device are used for the scalars).
    """
    tensor = next(
        (obj for obj in (mean1, logvar1, mean2, logvar2) if isinstance(obj, th.Tensor)),
        None,
    )
    if tensor is None:
        raise ValueError("normal_kl: at least one argument must be a torch.Tensor")
    logvar1, logvar2 = [
        x if isinstance(x, th.Tensor) else th.tensor(x).to(tensor) for x in (logvar1, logvar2)
    ]
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + th.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * th.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """
    Fast approximation (tanh form) of the standard normal CDF, element-wise.
    """
    return 0.5 * (1.0 + th.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * th.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """
    Log-likelihood (nats) of a Gaussian discretised to 256 bins on [-1, 1].

    Bins have width 2/255 and are centred on the 8-bit levels rescaled to [-1, 1]; the two
    outermost bins extend to -inf and +inf, so the bin probabilities sum to one.

    :param x: target tensor, values assumed to be 8-bit levels rescaled to [-1, 1].
    :param means: Gaussian means, same shape as x.
    :param log_scales: Gaussian log standard deviations, same shape as x.
    :return: tensor shaped like x of log probabilities (nats).
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            "discretized_gaussian_log_likelihood: shapes differ: "
            f"x {tuple(x.shape)}, means {tuple(means.shape)}, log_scales {tuple(log_scales.shape)}"
        )
    centered_x = x - means
    inv_stdv = th.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = th.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = th.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = th.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return th.where(
        x < -0.999,
        log_cdf_plus,
        th.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )
