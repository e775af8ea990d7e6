"""Image-quality and quantitative metrics for denoised PET volumes.

All volumes are numpy arrays ``(X, Y, Z)`` in SUV (g/mL); ``ref`` is the full-dose reference and
``den`` the denoised (or low-dose) image on the same grid. Voxel sizes are in mm, volumes in mL.

Image-quality conventions (``convention=``):

``"udpet"`` (default, the Ultra-low Dose PET challenge definitions)
    RMSE over the voxels compared; ``NRMSE = RMSE / (max(ref) - min(ref))``;
    ``PSNR = 20 log10(max(ref) / RMSE)`` (``inf`` for identical images);
    SSIM: 3D ``skimage.metrics.structural_similarity`` on both images each divided by its own
    maximum, ``data_range=1``.
``"published"`` (mirrors ``evaluation/get_ssim_psnr.py`` of the published 3D DDPM)
    the denoised image has its negative values set to 0 and the reference is clipped at the
    model's SUV ceiling (16, as in its preprocessing); ``PSNR = 10 log10(peak^2 / MSE)`` with
    ``peak`` the maximum of the *unclipped* reference (their ``.mat`` SUV maximum; pass ``peak=``
    if only a clipped reference is at hand) and 100 for identical images; SSIM on the SUV images
    with ``data_range=16``. NRMSE (not in that script) uses the UDPET formula on the same images.

With a boolean body ``mask`` every statistic is taken over the masked voxels only (reference
max/min included); SSIM is computed as a map and averaged over the mask (away from the
``win_size // 2`` border that skimage also leaves out of its mean).

Quantitative metrics per VOI (organ or lesion label ``k > 0``): SUVmax, SUVmean, volume and total
lesion metabolism ``TLM = SUVmean * volume_mL``, each with its % bias ``100 (den - ref) / ref``.
Lesion detectability: contrast recovery ``CRC = (L_den / B_den - 1) / (L_ref / B_ref - 1)``
(lesion mean L, background mean B; 1 for a perfect image) and background variability
``BV = std(B) / mean(B)`` in a background shell around each lesion.
"""

import math

import numpy as np
from scipy import ndimage, stats
from skimage.metrics import structural_similarity

from ..normalisation import PUBLISHED_NORMALISATION

CONVENTIONS = ("udpet", "published")
PUBLISHED_SUV_CLIP = PUBLISHED_NORMALISATION["clip"]
PUBLISHED_IDENTICAL_PSNR = 100.0
DEFAULT_VOXEL_MM = (1.65, 1.65, 1.65)
SSIM_WIN_SIZE = 7


# ----------------------------------------------------------------------------- validation


def _check_pair(ref, den, mask=None):
    ref = np.asarray(ref, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    if ref.ndim != 3:
        raise ValueError(f"reference must be a 3D (X, Y, Z) volume, got shape {ref.shape}")
    if ref.shape != den.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs denoised {den.shape}")
    if not (np.isfinite(ref).all() and np.isfinite(den).all()):
        raise ValueError("volumes contain NaN or inf")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != ref.shape:
            raise ValueError(f"mask shape {mask.shape} differs from volume shape {ref.shape}")
        mask = mask.astype(bool)
        if not mask.any():
            raise ValueError("mask selects no voxel")
    return ref, den, mask


def _check_convention(convention):
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; expected one of {CONVENTIONS}")


def _check_labels(labels, shape, what):
    labels = np.asarray(labels)
    if labels.shape != shape:
        raise ValueError(f"{what} shape {labels.shape} differs from volume shape {shape}")
    rounded = np.rint(labels)
    if not np.array_equal(rounded, labels) or rounded.min() < 0:
        raise ValueError(f"{what} must hold non-negative integers (0 = background)")
    return rounded.astype(np.int64)


def _voxel_mm3(voxel_mm):
    voxel = np.broadcast_to(np.asarray(voxel_mm, dtype=np.float64), (3,))
    if not (voxel > 0).all():
        raise ValueError(f"voxel size must be positive mm, got {voxel_mm}")
    return voxel


def _select(volume, mask):
    return volume if mask is None else volume[mask]


# ----------------------------------------------------------------------------- image quality


def _compared_images(ref, den, convention):
    """Images actually compared under ``convention`` (the published one clips both)."""
    if convention == "published":
        return np.minimum(ref, PUBLISHED_SUV_CLIP), np.maximum(den, 0.0)
    return ref, den


def _rmse(ref, den, mask):
    return float(np.sqrt(np.mean(_select(ref - den, mask) ** 2)))


def rmse(ref, den, mask=None):
    """Root-mean-square error (SUV) over all voxels or the masked ones."""
    return _rmse(*_check_pair(ref, den, mask))


def nrmse(ref, den, mask=None, convention="udpet"):
    """RMSE divided by the reference range ``max(ref) - min(ref)`` (dimensionless)."""
    _check_convention(convention)
    ref, den, mask = _check_pair(ref, den, mask)
    ref_c, den_c = _compared_images(ref, den, convention)
    values = _select(ref_c, mask)
    value_range = values.max() - values.min()
    if value_range <= 0:
        raise ValueError("reference is constant (over the mask): NRMSE is undefined")
    return _rmse(ref_c, den_c, mask) / float(value_range)


def psnr(ref, den, mask=None, convention="udpet", peak=None):
    """Peak signal-to-noise ratio in dB.

    ``peak`` defaults to ``max(ref)`` (unclipped, over the mask). Identical images give ``inf``
    under ``"udpet"`` and 100 under ``"published"`` (as that script does).
    """
    _check_convention(convention)
    ref, den, mask = _check_pair(ref, den, mask)
    if peak is None:
        peak = float(_select(ref, mask).max())
    if peak <= 0:
        raise ValueError(f"PSNR peak must be positive, got {peak}")
    ref_c, den_c = _compared_images(ref, den, convention)
    error = _rmse(ref_c, den_c, mask)
    if error == 0:
        return math.inf if convention == "udpet" else PUBLISHED_IDENTICAL_PSNR
    if convention == "published":
        return 10.0 * math.log10(peak**2 / error**2)
    return 20.0 * math.log10(peak / error)


def _ssim_win_size(shape):
    smallest = min(shape)
    win = min(SSIM_WIN_SIZE, smallest if smallest % 2 else smallest - 1)
    if win < 3:
        raise ValueError(f"volume {shape} too small for 3D SSIM (each side needs >= 3 voxels)")
    return win


def ssim(ref, den, mask=None, convention="udpet"):
    """3D structural similarity (dimensionless, 1 for identical images).

    ``"udpet"``: both images divided by their own maximum, ``data_range=1``;
    ``"published"``: SUV images (clipped as in that script), ``data_range=16``.
    Window 7 voxels (smaller for volumes thinner than 7 voxels), uniform weights.
    """
    _check_convention(convention)
    ref, den, mask = _check_pair(ref, den, mask)
    if convention == "udpet":
        ref_max, den_max = ref.max(), den.max()
        if ref_max <= 0 or den_max <= 0:
            raise ValueError("SSIM (udpet) needs images with a positive maximum")
        ref_c, den_c, data_range = ref / ref_max, den / den_max, 1.0
    else:
        (ref_c, den_c), data_range = _compared_images(ref, den, convention), PUBLISHED_SUV_CLIP
    win = _ssim_win_size(ref.shape)
    if mask is None:
        return float(structural_similarity(ref_c, den_c, win_size=win, data_range=data_range))
    _, ssim_map = structural_similarity(
        ref_c, den_c, win_size=win, data_range=data_range, full=True
    )
    pad = win // 2
    interior = np.zeros(ref.shape, dtype=bool)
    interior[pad:-pad, pad:-pad, pad:-pad] = True
    selected = mask & interior
    if not selected.any():
        raise ValueError("mask has no voxel away from the SSIM window border")
    return float(ssim_map[selected].mean())


def image_quality(ref, den, mask=None, convention="udpet"):
    """``{"rmse", "nrmse", "psnr", "ssim"}`` under one convention (RMSE on the compared images)."""
    ref, den, mask = _check_pair(ref, den, mask)
    return {
        "rmse": _rmse(*_compared_images(ref, den, convention), mask),
        "nrmse": nrmse(ref, den, mask, convention),
        "psnr": psnr(ref, den, mask, convention),
        "ssim": ssim(ref, den, mask, convention),
    }


def uncertainty_calibration(ref, mean, std, mask=None):
    """How an ensemble's voxel-wise ``std`` (SUV) tracks the error of its ``mean`` against
    ``ref`` (all ``(X, Y, Z)``): ``{"std_over_rmse"`` (mean std / RMSE of the mean; 1 is
    calibrated), ``"rank_correlation"`` (Spearman's rho of std with |error|; ``nan`` where either
    is constant)``}``, over all voxels or the masked ones."""
    ref, mean, mask = _check_pair(ref, mean, mask)
    _check_pair(ref, std, mask)
    error = np.abs(_select(mean - ref, mask)).ravel()
    spread = _select(np.asarray(std, np.float64), mask).ravel()
    error_rmse = float(np.sqrt(np.mean(error ** 2)))
    ratio = float(spread.mean()) / error_rmse if error_rmse > 0 else math.nan
    if np.ptp(error) == 0 or np.ptp(spread) == 0:
        return dict(std_over_rmse=ratio, rank_correlation=math.nan)
    return dict(std_over_rmse=ratio, rank_correlation=float(stats.spearmanr(spread, error)[0]))


# ----------------------------------------------------------------------------- VOI quantitation


def voi_statistics(image, labels, voxel_mm=DEFAULT_VOXEL_MM):
    """SUV statistics of every label ``k > 0`` present in ``labels``.

    Returns ``{k: {"suvmax", "suvmean", "volume_ml", "tlm", "n_voxels"}}`` where
    ``tlm = suvmean * volume_ml`` (SUV * mL, i.e. g) and ``volume_ml = n_voxels * prod(voxel_mm) / 1000``.
    """
    image = np.asarray(image, dtype=np.float64)
    labels = _check_labels(labels, image.shape, "label volume")
    voxel_ml = float(np.prod(_voxel_mm3(voxel_mm))) / 1000.0
    flat_labels = labels.ravel()
    counts = np.bincount(flat_labels)
    sums = np.bincount(flat_labels, weights=image.ravel())
    ids = [int(k) for k in np.nonzero(counts)[0] if k > 0]
    maxima = ndimage.maximum(image, labels, ids) if ids else []
    stats = {}
    for k, suvmax in zip(ids, np.atleast_1d(maxima)):
        suvmean = sums[k] / counts[k]
        volume_ml = counts[k] * voxel_ml
        stats[k] = {
            "suvmax": float(suvmax),
            "suvmean": float(suvmean),
            "volume_ml": float(volume_ml),
            "tlm": float(suvmean * volume_ml),
            "n_voxels": int(counts[k]),
        }
    return stats


def percent_bias(value, reference_value):
    """``100 (value - reference) / reference``; NaN when the reference is 0."""
    if reference_value == 0:
        return math.nan
    return 100.0 * (value - reference_value) / reference_value


def voi_bias(ref, den, labels, voxel_mm=DEFAULT_VOXEL_MM):
    """Per-label SUVmax / SUVmean / TLM of both images and their % bias (den vs ref).

    Returns ``{k: {"volume_ml", "suvmax_ref", "suvmax_den", "suvmax_bias_pct", ...}}``.
    """
    ref, den, _ = _check_pair(ref, den)
    ref_stats = voi_statistics(ref, labels, voxel_mm)
    den_stats = voi_statistics(den, labels, voxel_mm)
    result = {}
    for k, ref_k in ref_stats.items():
        den_k = den_stats[k]
        entry = {"volume_ml": ref_k["volume_ml"]}
        for quantity in ("suvmax", "suvmean", "tlm"):
            entry[f"{quantity}_ref"] = ref_k[quantity]
            entry[f"{quantity}_den"] = den_k[quantity]
            entry[f"{quantity}_bias_pct"] = percent_bias(den_k[quantity], ref_k[quantity])
        result[k] = entry
    return result


# ----------------------------------------------------------------------------- lesion detectability


def contrast_recovery(ref, den, lesion_mask, background_mask):
    """CRC of one lesion: ``(L_den / B_den - 1) / (L_ref / B_ref - 1)``; NaN if ref has no contrast."""
    ref, den, _ = _check_pair(ref, den)
    lesion_mask = np.asarray(lesion_mask, dtype=bool)
    background_mask = np.asarray(background_mask, dtype=bool)
    if not lesion_mask.any() or not background_mask.any():
        raise ValueError("contrast recovery needs non-empty lesion and background masks")
    b_ref, b_den = ref[background_mask].mean(), den[background_mask].mean()
    if b_ref == 0 or b_den == 0:
        return math.nan
    ref_contrast = ref[lesion_mask].mean() / b_ref - 1.0
    if ref_contrast == 0:
        return math.nan
    return float((den[lesion_mask].mean() / b_den - 1.0) / ref_contrast)


def background_variability(image, background_mask):
    """``std / mean`` of ``image`` in the background (dimensionless); NaN for a zero mean."""
    values = np.asarray(image, dtype=np.float64)[np.asarray(background_mask, dtype=bool)]
    if values.size == 0:
        raise ValueError("background variability needs a non-empty background mask")
    mean = values.mean()
    return math.nan if mean == 0 else float(values.std() / mean)


def lesion_background_shell(
    lesion_labels, label, voxel_mm=DEFAULT_VOXEL_MM, gap_mm=3.0, width_mm=10.0, allowed=None
):
    """Background shell of lesion ``label``: voxels at distance ``(gap_mm, gap_mm + width_mm]``.

    Distances are Euclidean in mm from the lesion; voxels within ``gap_mm`` of any lesion are
    excluded, and the shell is limited to ``allowed`` (boolean, e.g. body or host organ) if given.
    """
    lesion_labels = np.asarray(lesion_labels)
    voxel = _voxel_mm3(voxel_mm)
    lesion = lesion_labels == label
    if not lesion.any():
        raise ValueError(f"lesion label {label} not present")
    margin = np.ceil((gap_mm + width_mm) / voxel).astype(int) + 1
    hits = np.nonzero(lesion)
    box = tuple(
        slice(max(int(h.min()) - m, 0), min(int(h.max()) + m + 1, n))
        for h, m, n in zip(hits, margin, lesion.shape)
    )
    dist_lesion = ndimage.distance_transform_edt(~lesion[box], sampling=voxel)
    dist_any = ndimage.distance_transform_edt(lesion_labels[box] == 0, sampling=voxel)
    shell_box = (dist_lesion <= gap_mm + width_mm) & (dist_any > gap_mm)
    if allowed is not None:
        shell_box &= np.asarray(allowed, dtype=bool)[box]
    shell = np.zeros(lesion.shape, dtype=bool)
    shell[box] = shell_box
    return shell


def lesion_detectability(
    ref, den, lesion_labels, voxel_mm=DEFAULT_VOXEL_MM, mask=None, organ_labels=None,
    gap_mm=3.0, width_mm=10.0,
):
    """Per-lesion ``{"crc", "bv_ref", "bv_den", "background_voxels"}`` with a local shell background.

    The shell (see :func:`lesion_background_shell`) is limited to the body ``mask`` (default:
    ``ref > 0``) and, when ``organ_labels`` are given, to the lesion's host organ (the organ label
    most frequent under the lesion). Lesions without a background shell get NaN.
    """
    ref, den, mask = _check_pair(ref, den, mask)
    lesion_labels = _check_labels(lesion_labels, ref.shape, "lesion label volume")
    body = mask if mask is not None else ref > 0
    if organ_labels is not None:
        organ_labels = _check_labels(organ_labels, ref.shape, "organ label volume")
    result = {}
    for k in (int(v) for v in np.unique(lesion_labels) if v > 0):
        lesion = lesion_labels == k
        allowed = body
        if organ_labels is not None:
            host = np.bincount(organ_labels[lesion]).argmax()
            if host > 0:
                allowed = body & (organ_labels == host)
        shell = lesion_background_shell(lesion_labels, k, voxel_mm, gap_mm, width_mm, allowed)
        n_background = int(shell.sum())
        if n_background == 0:
            result[k] = {"crc": math.nan, "bv_ref": math.nan, "bv_den": math.nan,
                         "background_voxels": 0}
            continue
        result[k] = {
            "crc": contrast_recovery(ref, den, lesion, shell),
            "bv_ref": background_variability(ref, shell),
            "bv_den": background_variability(den, shell),
            "background_voxels": n_background,
        }
    return result


# ----------------------------------------------------------------------------- everything


def _nanmean(values):
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def evaluate_pair(
    ref, den, labels=None, lesion_labels=None, voxel_mm=DEFAULT_VOXEL_MM, mask=None,
    convention="udpet",
):
    """All metrics of one reference/denoised pair.

    Returns ``{"convention", "rmse", "nrmse", "psnr", "ssim", "organs", "lesions", "summary"}``:
    ``organs`` / ``lesions`` map label ``k`` to :func:`voi_bias` entries (lesions also carry
    :func:`lesion_detectability`); ``summary`` holds means over lesions / organs
    (``lesion_suvmean_bias_pct``, ``lesion_suvmax_bias_pct``, ``lesion_tlm_bias_pct``,
    ``lesion_crc``, ``lesion_bv_den``, ``organ_suvmean_bias_pct``; NaN means ignored).
    """
    ref, den, mask = _check_pair(ref, den, mask)
    result = {"convention": convention, **image_quality(ref, den, mask, convention)}
    result["organs"] = voi_bias(ref, den, labels, voxel_mm) if labels is not None else {}
    result["lesions"] = {}
    if lesion_labels is not None:
        lesions = voi_bias(ref, den, lesion_labels, voxel_mm)
        detectability = lesion_detectability(
            ref, den, lesion_labels, voxel_mm, mask=mask, organ_labels=labels
        )
        result["lesions"] = {k: {**lesions[k], **detectability[k]} for k in lesions}
    summary = {}
    for quantity in ("suvmean_bias_pct", "suvmax_bias_pct", "tlm_bias_pct", "crc", "bv_den"):
        summary[f"lesion_{quantity}"] = _nanmean([v[quantity] for v in result["lesions"].values()])
    summary["organ_suvmean_bias_pct"] = _nanmean(
        [v["suvmean_bias_pct"] for v in result["organs"].values()]
    )
    result["summary"] = summary
    return result
