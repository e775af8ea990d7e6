"""Summary statistics of per-volume (or per-slice) metric values, one home for every report."""

import math

import numpy as np


def finite(values):
    """The finite float values of ``values`` (``None`` and NaN dropped)."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_sd(values):
    """``(mean, sd, n)`` over the finite values: sd with ddof 1 (NaN for fewer than 2 values),
    mean NaN for none."""
    kept = finite(values)
    if not kept:
        return math.nan, math.nan, 0
    sd = float(np.std(kept, ddof=1)) if len(kept) > 1 else math.nan
    return float(np.mean(kept)), sd, len(kept)


def describe(values):
    """``{"mean", "sd", "n"}`` of :func:`mean_sd`."""
    mean, sd, n = mean_sd(values)
    return dict(mean=mean, sd=sd, n=n)


def finite_or_none(data):
    """``data`` with NaN / inf floats replaced by ``None`` (nested dicts and lists; numpy
    scalars become Python numbers): what JSON can hold."""
    if isinstance(data, dict):
        return {k: finite_or_none(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_none(v) for v in data]
    if isinstance(data, (np.floating, np.integer)):
        data = data.item()
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data
