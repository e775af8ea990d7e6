"""Image reconstruction: MLEM / OSEM (Poisson model) and 2D FBP.

Data model (sinograms ``(radial, view, plane)`` or ``(B, radial, view, plane)``):

    ybar = mult_factor * scale * P(x) + additive

``mult_factor`` = normalisation * attenuation, ``additive`` = randoms + scatter, ``scale`` = counts
per unit of projected activity (``simulate.ExpectedData.scale``). Images come back in the layout
``(X, Y, Z)`` / ``(B, X, Y, Z)`` and in the units of the activity that generated the data.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .linear_operator import GaussianPSF, LinearOperator
from .projector import geometric_projector


def _scale_like(scale, reference: torch.Tensor) -> torch.Tensor:
    scale = torch.as_tensor(scale, device=reference.device, dtype=reference.dtype)
    if not torch.isfinite(scale).all() or (scale <= 0).any():
        raise ValueError("scale must be positive and finite")
    return scale.reshape(scale.shape + (1, 1, 1))


def _check_sinogram(sinogram, projector: LinearOperator, name="sinogram") -> torch.Tensor:
    if not isinstance(sinogram, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(sinogram).__name__}")
    shape = tuple(projector.sinogram_shape)
    if sinogram.dim() not in (3, 4) or tuple(sinogram.shape[-3:]) != shape:
        raise ValueError(f"{name} must have shape {shape} or (B, *{shape}), got {tuple(sinogram.shape)}")
    if not torch.isfinite(sinogram).all() or (sinogram < 0).any():
        raise ValueError(f"{name} must be finite and non-negative")
    return sinogram


def _view_subset(sino: Optional[torch.Tensor], index: int, n_subsets: int):
    return None if sino is None else sino[..., index::n_subsets, :]


def poisson_log_likelihood(y: torch.Tensor, ybar: torch.Tensor) -> torch.Tensor:
    """Poisson log-likelihood ``sum(y log ybar - ybar)`` over the last three (sinogram) axes.

    The constant ``-log(y!)`` is dropped; bins with ``y = 0`` contribute ``-ybar``; a bin with
    ``y > 0`` and ``ybar = 0`` gives ``-inf``.
    """
    log_term = torch.where(y > 0, y * torch.log(ybar), torch.zeros_like(ybar))
    return (log_term - ybar).sum(dim=(-3, -2, -1))


def osem(sinogram: torch.Tensor, projector: LinearOperator, n_iter: int, n_subsets: int = 1,
         mult_factor: Optional[torch.Tensor] = None, additive: Optional[torch.Tensor] = None,
         x0: Optional[torch.Tensor] = None, post_filter_fwhm_mm=None, progress: bool = False,
         scale=1.0, sensitivities: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """Ordered-subsets expectation maximisation.

    Args:
        sinogram: measured counts ``(radial, view, plane)`` or batched.
        projector: from ``make_projector`` (optionally with PSF); subsets use ``projector.subset``.
        n_iter: full iterations (each visits every subset once).
        n_subsets: view subsets (subset k = views k::n_subsets); 1 gives MLEM.
        mult_factor: normalisation * attenuation sinogram (default 1).
        additive: randoms + scatter sinogram in counts (default 0).
        x0: positive initial image (default ones).
        post_filter_fwhm_mm: optional Gaussian post-filter FWHM (mm, scalar or per axis).
        progress: show a tqdm progress bar.
        scale: counts per unit of projected activity (scalar or per batch item), e.g.
            ``ExpectedData.scale``; the result is in activity units.
        sensitivities: the subsets' EM denominators from :func:`osem_sensitivities` with the
            same ``n_subsets``, ``mult_factor`` and ``scale`` (one back-projection saved per
            subset when the same acquisition is reconstructed repeatedly); computed if None.
    Returns:
        the image, ``(X, Y, Z)`` or ``(B, X, Y, Z)``.
    """
    if not (isinstance(n_iter, int) and n_iter >= 0):
        raise ValueError(f"n_iter must be a non-negative integer, got {n_iter!r}")
    sinogram = _check_sinogram(sinogram, projector)
    geometric = geometric_projector(projector)
    sinogram = sinogram.to(device=geometric.device, dtype=geometric.dtype)
    batch = sinogram.shape[:-3]
    mult = _effective_mult(projector, sinogram, mult_factor, scale)
    if additive is not None:
        additive = _check_sinogram(additive.to(sinogram), projector, "additive")
    if x0 is None:
        x = sinogram.new_ones(batch + tuple(projector.image_shape))
    else:
        if (x0 < 0).any() or not torch.isfinite(x0).all():
            raise ValueError("x0 must be finite and non-negative")
        x = x0.to(sinogram).expand(batch + tuple(projector.image_shape)).clone()

    subsets = [projector.subset(k, n_subsets) for k in range(n_subsets)]
    mults = [_view_subset(mult, k, n_subsets) for k in range(n_subsets)]
    if sensitivities is None:
        sensitivities = [op.adjoint(m) for op, m in zip(subsets, mults)]
    elif len(sensitivities) != n_subsets or any(
            tuple(sens.shape[-3:]) != tuple(projector.image_shape) for sens in sensitivities):
        raise ValueError(f"sensitivities must be {n_subsets} image(s) of shape "
                         f"{tuple(projector.image_shape)} (osem_sensitivities with n_subsets={n_subsets})")
    for _ in tqdm(range(n_iter), desc="OSEM", disable=not progress):
        for k, op in enumerate(subsets):
            y_k = _view_subset(sinogram, k, n_subsets)
            ybar = mults[k] * op.forward(x)
            add_k = _view_subset(additive, k, n_subsets)
            if add_k is not None:
                ybar = ybar + add_k
            ratio = torch.where(ybar > 0, y_k / ybar.clamp(min=torch.finfo(ybar.dtype).tiny),
                                torch.zeros_like(ybar))
            sens = sensitivities[k]
            x = torch.where(sens > 0, x * op.adjoint(mults[k] * ratio) / sens.clamp(min=1e-30),
                            torch.zeros_like(x))
    if post_filter_fwhm_mm is not None:
        x = post_filter(x, geometric.voxel_size_mm, post_filter_fwhm_mm)
    return x


def osem_sensitivities(projector: LinearOperator, n_subsets: int = 1,
                       mult_factor: Optional[torch.Tensor] = None, scale=1.0) -> list:
    """EM denominators ``P_k^T (scale * mult_factor)_k`` per view subset ``k`` (``(X, Y, Z)``, or
    ``(B, X, Y, Z)`` for a per-item ``scale``), on the projector's device and dtype; pass them
    to :func:`osem` as ``sensitivities`` to reconstruct the same acquisition repeatedly."""
    geometric = geometric_projector(projector)
    reference = torch.empty((), device=geometric.device, dtype=geometric.dtype)
    mult = _effective_mult(projector, reference, mult_factor, scale)
    return [projector.subset(k, n_subsets).adjoint(_view_subset(mult, k, n_subsets))
            for k in range(n_subsets)]


def _effective_mult(projector, reference: torch.Tensor, mult_factor, scale) -> torch.Tensor:
    """``scale * mult_factor`` broadcast to the sinogram shape, on ``reference``'s device/dtype."""
    mult = _scale_like(scale, reference)
    if mult_factor is not None:
        mult_factor = mult_factor.to(device=reference.device, dtype=reference.dtype)
        mult = mult * _check_sinogram(mult_factor, projector, "mult_factor")
    return mult.expand(torch.broadcast_shapes(mult.shape, tuple(projector.sinogram_shape)))


def post_filter(image: torch.Tensor, voxel_size_mm, fwhm_mm) -> torch.Tensor:
    """Gaussian smoothing normalised at the volume borders (uniform regions keep their value)."""
    blur = GaussianPSF(image.shape[-3:], voxel_size_mm, fwhm_mm, device=image.device, dtype=image.dtype)
    return blur.forward(image) / blur.forward(torch.ones_like(image))


def mlem(sinogram: torch.Tensor, projector: LinearOperator, n_iter: int, **kwargs) -> torch.Tensor:
    """Maximum-likelihood EM: ``osem`` with one subset (same keyword arguments)."""
    if kwargs.get("n_subsets", 1) != 1:
        raise ValueError("mlem uses one subset; call osem for n_subsets > 1")
    kwargs.pop("n_subsets", None)
    return osem(sinogram, projector, n_iter, n_subsets=1, **kwargs)


def ramp_filter(sinogram: torch.Tensor, radial_bin_mm: float) -> torch.Tensor:
    """Ram-Lak filtering along the radial axis (dim -3), spatial-domain kernel, zero padded."""
    n = sinogram.shape[-3]
    size = 1 << int(math.ceil(math.log2(2 * n)))
    offsets = torch.arange(size, device=sinogram.device)
    offsets = torch.minimum(offsets, size - offsets).to(torch.float64)
    kernel = torch.where(offsets % 2 == 1, -1.0 / (math.pi * offsets.clamp(min=1)) ** 2, torch.zeros_like(offsets))
    kernel[0] = 0.25
    response = torch.fft.rfft(kernel / radial_bin_mm).real.to(sinogram.dtype)   # includes the bin width
    moved = sinogram.movedim(-3, -1)
    filtered = torch.fft.irfft(torch.fft.rfft(moved, n=size) * response, n=size)[..., :n]
    return filtered.movedim(-1, -3)


def fbp(sinogram: torch.Tensor, projector: LinearOperator, *, mult_factor: Optional[torch.Tensor] = None,
        additive: Optional[torch.Tensor] = None, scale=1.0) -> torch.Tensor:
    """Filtered back projection for a "2d" projector (the cheap P-dagger).

    The data are first corrected: ``(sinogram - additive) / (mult_factor * scale)``, giving line
    integrals (activity * mm); the result is in activity units, ``(X, Y, Z)`` or batched.
    """
    geometric = geometric_projector(projector)
    if geometric.layout.mode != "2d" or geometric.layout.n_views != geometric.scanner.n_views:
        raise ValueError("fbp needs a '2d' projector over all views (use mlem/osem for 'ssrb'/'3d' data)")
    if not isinstance(sinogram, torch.Tensor) or tuple(sinogram.shape[-3:]) != tuple(geometric.sinogram_shape):
        raise ValueError(f"sinogram must have shape {geometric.sinogram_shape} or batched")
    if not torch.isfinite(sinogram).all():
        raise ValueError("sinogram contains NaN or infinite values")
    line_integrals = sinogram.to(device=geometric.device, dtype=geometric.dtype)
    if additive is not None:
        line_integrals = line_integrals - additive.to(line_integrals)
    divisor = _scale_like(scale, line_integrals)
    if mult_factor is not None:
        divisor = divisor * mult_factor.to(line_integrals)
    line_integrals = torch.where(divisor > 0, line_integrals / divisor.clamp(min=1e-30),
                                 torch.zeros_like(line_integrals))
    filtered = ramp_filter(line_integrals, geometric.scanner.radial_bin_mm)
    vx, vy, _ = geometric.voxel_size_mm
    # Joseph back projection sums ~ (vx * vy / radial_bin) per view; FBP integrates d(phi) = pi / n_views.
    factor = math.pi / geometric.layout.n_views * geometric.scanner.radial_bin_mm / (vx * vy)
    return geometric.adjoint(filtered) * factor
