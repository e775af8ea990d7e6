"""
Model-space normalisation of PET volumes, stored in each checkpoint's metadata.

A normalisation is ``{"clip": c, "scale": s, "range": [lo, hi]}`` (SUV values ``c`` and ``s``):

    model = lo + (hi - lo) * min(max(suv, 0), c) / s        suv = (model - lo) / (hi - lo) * s

The published 3D DDPM uses ``clip = scale = 16`` and ``range = [0, 1]`` (SUV clipped at 16,
divided by 16); the toolkit's own checkpoints use ``range = [-1, 1]``, the range the diffusion
process (and ``clip_denoised``) assumes.

The *null condition* of a paired model trained with conditioning dropout (``scripts/train.py
--cond_dropout``) is an empty low-dose volume, 0 SUV everywhere (model value ``lo``): fed in
place of the low-dose channel it makes the model an unconditional prior.
"""

import numpy as np
import torch

DEFAULT_NORMALISATION = dict(clip=16.0, scale=16.0, range=(-1.0, 1.0))
PUBLISHED_NORMALISATION = dict(clip=16.0, scale=16.0, range=(0.0, 1.0))


def resolve_normalisation(normalisation=None):
    """Fill missing keys of ``normalisation`` from :data:`DEFAULT_NORMALISATION` and check it."""
    norm = dict(DEFAULT_NORMALISATION, **(normalisation or {}))
    lo, hi = (float(v) for v in norm["range"])
    if not (norm["clip"] > 0 and norm["scale"] > 0 and hi > lo):
        raise ValueError(f"invalid normalisation {norm}: need clip > 0, scale > 0, range[1] > range[0]")
    return dict(clip=float(norm["clip"]), scale=float(norm["scale"]), range=[lo, hi])


def suv_to_model(suv, normalisation=None):
    """SUV (g/mL) -> model space; numpy arrays or torch tensors of any shape (same kind back)."""
    norm = resolve_normalisation(normalisation)
    lo, hi = norm["range"]
    if isinstance(suv, torch.Tensor):
        clipped = suv.clamp(0.0, norm["clip"])
    else:
        clipped = np.clip(suv, 0.0, norm["clip"])
    return lo + (hi - lo) * (clipped / norm["scale"])


def model_to_suv(x, normalisation=None):
    """Model space -> SUV; the inverse of :func:`suv_to_model` for SUV in ``[0, clip]``."""
    norm = resolve_normalisation(normalisation)
    lo, hi = norm["range"]
    return (x - lo) / (hi - lo) * norm["scale"]


def null_condition_like(x, normalisation=None):
    """The null condition (0 SUV everywhere, in model space) with ``x``'s shape and type."""
    lo = resolve_normalisation(normalisation)["range"][0]
    if isinstance(x, torch.Tensor):
        return torch.full_like(x, lo)
    return np.full_like(x, lo)
