"""
Model-space normalisation of PET volumes, stored in each checkpoint's metadata.

Two recorded, monotone transforms of SUV ``s`` (g/mL) onto ``range = [lo, hi]``:

* ``{"transform": "linear", "clip": c, "scale": d, "range": [lo, hi]}`` (the default when no
  ``transform`` is recorded)::

      model = lo + (hi - lo) * min(max(s, 0), c) / d

  The published 3D DDPM uses ``clip = scale = 16`` and ``range = [0, 1]``; the toolkit's first
  demo checkpoints ``range = [-1, 1]``. SUV above ``c`` is lost (kidneys, bladder of PSMA scans).
* ``{"transform": "sqrt", "knee": k, "scale": d, "range": [lo, hi]}``, variance-stabilising and
  without a clip::

      model = lo + (hi - lo) * (sqrt(1 + max(s, 0) / k) - 1) / (sqrt(1 + d / k) - 1)

  Linear below ``k`` SUV, square-root above (PET noise grows with activity), ``d`` SUV maps to
  ``hi``; higher values map above ``hi``. The sampler's ``clip_denoised`` saturates x0 estimates
  at ``d`` SUV, or at an optional ``clip`` SUV recorded with the transform (sampling only: the
  mapping itself never clips; :func:`x0_clip_range`, :func:`saturation_suv`). The toolkit's
  own checkpoints since the paired-model issue use :data:`SQRT_NORMALISATION` (0-100 SUV).

The *null condition* of a paired model trained with conditioning dropout (``scripts/train.py
--cond_dropout``) is an empty low-dose volume, 0 SUV everywhere (model value ``lo``): fed in
place of the low-dose channel it makes the model an unconditional prior.
"""

import math

import numpy as np
import torch

DEFAULT_NORMALISATION = dict(transform="linear", clip=16.0, scale=16.0, range=(-1.0, 1.0))
PUBLISHED_NORMALISATION = dict(transform="linear", clip=16.0, scale=16.0, range=(0.0, 1.0))
SQRT_NORMALISATION = dict(transform="sqrt", knee=1.0, scale=100.0, range=(-1.0, 1.0))
TRANSFORMS = ("linear", "sqrt")


def resolve_normalisation(normalisation=None):
    """A checked, complete normalisation: missing keys from :data:`DEFAULT_NORMALISATION`
    (linear) or :data:`SQRT_NORMALISATION` (``transform = "sqrt"``)."""
    given = dict(normalisation or {})
    transform = given.get("transform", "linear")
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown normalisation transform {transform!r}; expected one of {TRANSFORMS}")
    norm = dict(DEFAULT_NORMALISATION if transform == "linear" else SQRT_NORMALISATION, **given)
    lo, hi = (float(v) for v in norm["range"])
    if transform == "linear":
        positive = ("clip", "scale")
    else:  # sqrt: an optional clip (the sampler's saturation only)
        positive = ("knee", "scale", "clip") if "clip" in norm else ("knee", "scale")
    if not (all(float(norm[k]) > 0 for k in positive) and hi > lo):
        raise ValueError(f"invalid normalisation {norm}: need {' > 0, '.join(positive)} > 0, "
                         "range[1] > range[0]")
    return dict({k: float(norm[k]) for k in positive}, transform=transform, range=[lo, hi])


def saturation_suv(normalisation=None):
    """The SUV where the sampler saturates x0 estimates (``clip`` for linear; for sqrt ``clip``
    if recorded, else ``scale``): voxels near it are what the hot-voxel post-processing handles."""
    norm = resolve_normalisation(normalisation)
    return norm.get("clip", norm["scale"])


def x0_clip_range(normalisation=None):
    """``(low, high)`` model values the sampler clips x0 estimates to (``clip_denoised``):
    upstream's ``[-1, 1]``, or for a sqrt space with a recorded ``clip``, ``[lo, model(clip)]``."""
    norm = resolve_normalisation(normalisation)
    if norm["transform"] == "sqrt" and "clip" in norm:
        return norm["range"][0], float(suv_to_model(np.float64(norm["clip"]), norm))
    return -1.0, 1.0


def _lib(x):
    return torch if isinstance(x, torch.Tensor) else np


def suv_to_model(suv, normalisation=None):
    """SUV (g/mL) -> model space; numpy arrays or torch tensors of any shape (same kind back)."""
    norm = resolve_normalisation(normalisation)
    lo, hi = norm["range"]
    lib = _lib(suv)
    if norm["transform"] == "linear":
        clipped = suv.clamp(0.0, norm["clip"]) if lib is torch else np.clip(suv, 0.0, norm["clip"])
        return lo + (hi - lo) * (clipped / norm["scale"])
    knee = norm["knee"]
    positive = suv.clamp(min=0.0) if lib is torch else np.maximum(suv, 0.0)
    top = math.sqrt(1.0 + norm["scale"] / knee) - 1.0
    return lo + (hi - lo) * (lib.sqrt(1.0 + positive / knee) - 1.0) / top


def model_to_suv(x, normalisation=None):
    """Model space -> SUV; the inverse of :func:`suv_to_model` (for SUV in ``[0, clip]`` when
    linear; for all SUV >= 0 when sqrt, where model values below ``lo`` give 0)."""
    norm = resolve_normalisation(normalisation)
    lo, hi = norm["range"]
    unit = (x - lo) / (hi - lo)
    if norm["transform"] == "linear":
        return unit * norm["scale"]
    knee = norm["knee"]
    root = 1.0 + unit * (math.sqrt(1.0 + norm["scale"] / knee) - 1.0)
    root = root.clamp(min=1.0) if isinstance(root, torch.Tensor) else np.maximum(root, 1.0)
    return knee * (root * root - 1.0)


def null_condition_like(x, normalisation=None):
    """The null condition (0 SUV everywhere, in model space) with ``x``'s shape and type."""
    lo = resolve_normalisation(normalisation)["range"][0]
    if isinstance(x, torch.Tensor):
        return torch.full_like(x, lo)
    return np.full_like(x, lo)
