"""Small linear-operator algebra for PET system models.

Operators act on torch tensors whose trailing dimensions equal ``in_shape`` (an optional leading
batch dimension is carried along). ``A @ B`` is the composition "apply B, then A"; ``A.T`` is the
adjoint. The system model ``n * a * PSF-smoothed projection`` is written
``DiagonalOperator(n * a) @ projector @ GaussianPSF(...)`` and keeps an exact adjoint.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch

from .filters import convolve_axis, fwhm_to_sigma, gaussian_kernel



class LinearOperator:
    """Base class: subclasses set ``in_shape``/``out_shape`` and implement forward/adjoint."""

    in_shape: Tuple[int, ...] = ()
    out_shape: Tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    @property
    def T(self) -> "LinearOperator":
        return AdjointOperator(self)

    def __matmul__(self, other: "LinearOperator") -> "LinearOperator":
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return compose(self, other)

    @property
    def image_shape(self) -> Tuple[int, ...]:
        return self.in_shape

    @property
    def sinogram_shape(self) -> Tuple[int, ...]:
        return self.out_shape

    def subset(self, index: int, n_subsets: int) -> "LinearOperator":
        """The operator restricted to views ``index::n_subsets`` (image-space operators: itself)."""
        raise NotImplementedError(f"{type(self).__name__} has no view subsets")

    def _check_input(self, x: torch.Tensor, shape: Tuple[int, ...], what: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__}.{what} expects a torch tensor, got {type(x).__name__}")
        if x.dim() not in (len(shape), len(shape) + 1) or tuple(x.shape[-len(shape):]) != tuple(shape):
            raise ValueError(
                f"{type(self).__name__}.{what} expects shape {tuple(shape)} or (B, *{tuple(shape)}), "
                f"got {tuple(x.shape)}")


class AdjointOperator(LinearOperator):
    """The adjoint of another operator."""

    def __init__(self, op: LinearOperator):
        self.op = op
        self.in_shape, self.out_shape = op.out_shape, op.in_shape

    def forward(self, x):
        return self.op.adjoint(x)

    def adjoint(self, y):
        return self.op.forward(y)

    @property
    def T(self):
        return self.op

    @property
    def image_shape(self):
        return self.op.image_shape

    @property
    def sinogram_shape(self):
        return self.op.sinogram_shape

    def subset(self, index, n_subsets):
        return AdjointOperator(self.op.subset(index, n_subsets))


class ComposedOperator(LinearOperator):
    """``ops[0] @ ops[1] @ ... @ ops[-1]``: the last operator is applied first."""

    def __init__(self, ops: Sequence[LinearOperator]):
        for left, right in zip(ops[:-1], ops[1:]):
            if tuple(left.in_shape) != tuple(right.out_shape):
                raise ValueError(
                    f"cannot compose {type(left).__name__} (input {left.in_shape}) after "
                    f"{type(right).__name__} (output {right.out_shape})")
        self.ops = tuple(ops)
        self.in_shape, self.out_shape = ops[-1].in_shape, ops[0].out_shape

    def forward(self, x):
        for op in reversed(self.ops):
            x = op.forward(x)
        return x

    def adjoint(self, y):
        for op in self.ops:
            y = op.adjoint(y)
        return y

    def subset(self, index, n_subsets):
        return ComposedOperator([op.subset(index, n_subsets) for op in self.ops])

    def find(self, cls):
        """The first operator of type ``cls`` in the composition (None if absent)."""
        for op in self.ops:
            found = op.find(cls) if isinstance(op, ComposedOperator) else op
            if isinstance(found, cls):
                return found
        return None


def compose(*ops: LinearOperator) -> LinearOperator:
    """Composition ``ops[0] @ ... @ ops[-1]`` (nested compositions are flattened)."""
    flat = []
    for op in ops:
        flat.extend(op.ops if isinstance(op, ComposedOperator) else [op])
    return flat[0] if len(flat) == 1 else ComposedOperator(flat)


class DiagonalOperator(LinearOperator):
    """Elementwise multiplication by a fixed real factor (attenuation, normalisation, masks).

    Args:
        factor: tensor whose shape is the operator's shape (optionally with a leading batch dim).
        space: "sinogram" (factor ``(radial, view, plane)``; subsets slice the view axis) or "image".
    """

    def __init__(self, factor: torch.Tensor, space: str = "sinogram"):
        if space not in ("sinogram", "image"):
            raise ValueError(f"space must be 'sinogram' or 'image', got {space!r}")
        if not isinstance(factor, torch.Tensor):
            raise TypeError("DiagonalOperator factor must be a torch tensor")
        if not torch.isfinite(factor).all():
            raise ValueError("DiagonalOperator factor contains NaN or infinite values")
        self.factor, self.space = factor, space
        self.in_shape = self.out_shape = tuple(factor.shape[-3:])

    def forward(self, x):
        self._check_input(x, self.in_shape, "forward")
        return x * self.factor

    adjoint = forward

    def subset(self, index, n_subsets):
        if self.space == "image":
            return self
        return DiagonalOperator(self.factor[..., index::n_subsets, :], "sinogram")


class GaussianPSF(LinearOperator):
    """Image-space Gaussian blur (resolution model), self-adjoint.

    Separable 1D convolutions with zero padding along X, Y, Z of an ``(X, Y, Z)`` volume.

    Args:
        image_shape: ``(X, Y, Z)``.
        voxel_size_mm: scalar or ``(vx, vy, vz)`` in mm.
        fwhm_mm: scalar (isotropic) or ``(fx, fy, fz)`` FWHM in mm; 0 leaves an axis unblurred.
    """

    def __init__(self, image_shape, voxel_size_mm: Union[float, Sequence[float]],
                 fwhm_mm: Union[float, Sequence[float]], device=None, dtype=torch.float32):
        self.in_shape = self.out_shape = tuple(int(n) for n in image_shape)
        voxel = _triple(voxel_size_mm, "voxel_size_mm")
        fwhm = _triple(fwhm_mm, "fwhm_mm", allow_zero=True)
        self.kernels = []
        for size, width in zip(voxel, fwhm):
            sigma = fwhm_to_sigma(width) / size
            if sigma == 0:
                self.kernels.append(None)
                continue
            self.kernels.append(psf_kernel(sigma).to(device=device, dtype=dtype))

    def forward(self, x):
        self._check_input(x, self.in_shape, "forward")
        for axis, kernel in enumerate(self.kernels):
            if kernel is not None:
                x = convolve_axis(x, kernel, axis - 3)
        return x

    adjoint = forward  # symmetric kernel + zero padding: the convolution is self-adjoint

    def subset(self, index, n_subsets):
        return self


def _triple(value, name, allow_zero=False):
    values = tuple(float(v) for v in (value if isinstance(value, (tuple, list)) else (value,) * 3))
    if len(values) != 3 or not all(math.isfinite(v) and (v > 0 or (allow_zero and v == 0)) for v in values):
        raise ValueError(f"{name} must be a positive number or three of them, got {value!r}")
    return values


def psf_kernel(sigma):
    """The resolution model's 1D Gaussian (float64) of ``sigma`` samples, radius
    ``max(1, ceil(3 sigma))`` (a shorter support than the image filter's: the projector applies
    it at every EM iteration)."""
    return gaussian_kernel(sigma, radius=max(1, int(math.ceil(3 * sigma))))
