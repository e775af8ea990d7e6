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


def finite_or_none(data, key=None):
    """``data`` with NaN / inf floats replaced by ``None`` (nested dicts and lists; numpy
    scalars become Python numbers): what JSON can hold. ``key``, when given, maps every dict
    key (e.g. ``str``)."""
    if isinstance(data, dict):
        return {(k if key is None else key(k)): finite_or_none(v, key) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_none(v, key) for v in data]
    if isinstance(data, (np.floating, np.integer)):
        data = data.item()
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


def group_summaries(rows, by, keys, count_key="volumes"):
    """``{group: {count_key: n, key: describe(values)}}`` of per-volume ``rows`` (dicts) grouped
    by the values of the fields ``by`` (``group`` is their tuple), in order of appearance."""
    groups = {}
    for row in rows:
        groups.setdefault(tuple(row[field] for field in by), []).append(row)
    return {group: dict({count_key: len(members)}, **{key: describe([r[key] for r in members]) for key in keys})
            for group, members in groups.items()}
