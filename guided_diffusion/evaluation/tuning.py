"""Tuning of sampling settings on the validation volumes of a make_dataset.py dataset.

:func:`tune_bcdpm`: BC-DPM's balance ``lambda``, Gaussian-filter sigma, number of conditioned
steps ``l`` and hot-voxel mode per dose level for a prior. Every validation volume is denoised
with each grid point (the prior's recommended sampler and slabs) and scored by PSNR (UDPET
convention, inside the body mask); per DRF the point with the best mean PSNR becomes one row of
the table (:func:`best_per_drf`)::

    [{"drf", "noise_index", "noise_estimator", "bc_lambda", "bc_sigma_mm", "bc_steps", "hot_voxels", "members",
      "psnr", "volumes"}, ...]

with ``noise_index`` the mean noise index (SUV) of that DRF's inputs by the estimator
:data:`~guided_diffusion.sampling.fusion.TABLE_ESTIMATOR` (``noise_estimator``). Recorded in the prior's sidecar (``sampling.bc_tuning``), the settings
resolver picks the row nearest to each input's own noise index, so no DRF needs to be known at
denoising time.

:func:`tune_sampler`: a paired checkpoint's sampler (respacing / DDIM or ancestral) from the
PSNR of one member and of a K-member mean (test-time flips included), and the ensemble's calibration (mean std / RMSE of
the mean, rank correlation of std with |error|), per validation volume (:func:`sampler_rows`).

:func:`tune_spread`: how far to pool an ensemble's variance (``std_fwhm_mm``, :func:`choose_std_fwhm`)
and the blend width ``x0_skip_sigma`` that calibrates a paired posterior
sampler's ensembles (std / RMSE of the ensemble's image = 1; the image is the one-member
estimate when the checkpoint recommends one, :class:`~guided_diffusion.sampling.settings.Resolved`), fitted as a power of the input's noise index
(:func:`fit_ensemble_spread`; the sidecar's ``sampling.ensemble_spread``).

:func:`tune_fusion`: the noise-adaptive fusion's ``kappa`` (and window) for a paired
checkpoint: every validation volume is denoised once with fusion off; each ``(kappa, window)``
then fuses that output with the input (cheap) and is scored by the mean PSNR
(:func:`score_grid`).
"""

import math

import numpy as np
from tqdm.auto import tqdm

from ..normalisation import saturation_suv
from ..pet import volumes
from ..sampling import fusion
from ..sampling.hot_voxels import hot_weight
from ..sampling.settings import model_grid_noise_index
from ..sampling.uncertainty import ensemble_std
from . import metrics
from .cases import load_case, select_files
from .methods import case_seeds

GRID_KEYS = ("bc_steps", "bc_sigma_mm", "bc_lambda", "hot_voxels")


def _validation_cases(val, drfs, max_subjects, z_range, mask_suv):
    """The validation cases, loaded one at a time with a progress bar."""
    for description in tqdm(select_files(val, "val", drfs, max_subjects), desc="validation volumes"):
        yield load_case(description, z_range, mask_suv)


def best_per_drf(scores):
    """Rows of the tuning table from ``scores`` = ``[{"volume", "drf", "noise_index",
    "bc_lambda", "bc_sigma_mm", "bc_steps", "hot_voxels", "psnr"}]`` (one per volume and grid
    point; optional ``members``, the ensemble size scored, default 1): per DRF, the grid point
    with the best mean PSNR, with the DRF's mean noise index; ordered by DRF."""
    table = []
    for drf in sorted({s["drf"] for s in scores}):
        mine = [s for s in scores if s["drf"] == drf]
        points = sorted({tuple(s[k] for k in GRID_KEYS) for s in mine})
        mean_psnr = {p: float(np.mean([s["psnr"] for s in mine if tuple(s[k] for k in GRID_KEYS) == p]))
                     for p in points}
        best = max(points, key=lambda p: mean_psnr[p])
        indices = {s["volume"]: s["noise_index"] for s in mine if s["noise_index"] is not None}
        if not indices:
            raise ValueError(f"DRF {drf:g}: no validation volume with a measurable noise index")
        table.append(dict(drf=drf, noise_index=float(np.mean(list(indices.values()))),
                          noise_estimator=fusion.TABLE_ESTIMATOR,
                          **dict(zip(GRID_KEYS, best)), members=int(mine[0].get("members", 1)),
                          psnr=mean_psnr[best], volumes=len({s["volume"] for s in mine})))
    return table


def tune_bcdpm(method, val, grid, *, drfs=None, max_subjects=0, z_range=None, mask_suv=0.05, seed=0,
               members=1):
    """Score every grid point on every validation volume of the make_dataset.py directory ``val``.

    :param method: the prior as a :class:`~.methods.DiffusionMethod` in a BC-DPM mode.
    :param grid: ``[{"bc_steps", "bc_sigma_mm", "bc_lambda", "hot_voxels"}]``.
    :param members: ensemble size; each point is scored by the ``members``-member mean (the
        image BC-DPM returns at that ensemble size).
    :return: ``(scores, table)``: one score per volume and grid point, and :func:`best_per_drf`.
    """
    return tune_bcdpm_on_cases(method, _validation_cases(val, drfs, max_subjects, z_range, mask_suv), grid,
                               seed=seed, members=members)


def tune_bcdpm_on_cases(method, cases, grid, *, seed=0, members=1):
    """:func:`tune_bcdpm` on an iterable of case dicts (``low``, ``full``, ``mask``, ``drf``,
    ``name``, ``path`` or None; ``acquisition`` for simulated cases), e.g. the validation
    subjects of the out-of-distribution matrix (:func:`.robustness.validation_cases`)."""
    if members < 1:
        raise ValueError(f"members must be >= 1, got {members}")
    clip_suv = saturation_suv(method.metadata["normalisation"])
    scores = []
    for case in cases:
        index = model_grid_noise_index(case["low"], case["affine"], method.metadata, fusion.TABLE_ESTIMATOR)
        # without voxels near the model's clip every hot-voxel mode gives the same image
        has_hot = hot_weight(case["low"], clip_suv).max() > 0
        volume = case["path"] or f"{case['name']}_drf{case['drf']:g}"
        psnr_of = {}
        for point in tqdm(grid, desc=f"{volume}: grid points", leave=False):
            key = tuple(v for k, v in point.items() if has_hot or k != "hot_voxels")
            if key not in psnr_of:
                image = method.denoise(case, case_seeds(seed, case, "bcdpm", members), **point)[0]
                psnr_of[key] = metrics.psnr(case["full"], image, mask=case["mask"])
            scores.append(dict(volume=volume, drf=case["drf"], noise_index=index, **point, members=members,
                               psnr=psnr_of[key]))
    return scores, best_per_drf(scores)


def score_grid(cases, kappas, windows):
    """Rows ``{"kappa", "window", "mean_psnr", "gain_by_drf"}`` (kappa 0: no fusion) for
    ``cases`` = ``[{"full", "low", "mask", "drf", "denoised"}]``, best mean PSNR first."""
    psnr = {}
    for index, case in enumerate(cases):
        psnr[index, 0.0, 0] = metrics.psnr(case["full"], case["denoised"], mask=case["mask"])
        for kappa in kappas:
            for window in windows:
                fused = fusion.fuse_with_input(case["denoised"], case["low"], kappa, window)[0]
                psnr[index, kappa, window] = metrics.psnr(case["full"], fused, mask=case["mask"])
    drfs = sorted({case["drf"] for case in cases})
    rows = []
    for kappa, window in [(0.0, 0)] + [(k, w) for k in kappas for w in windows]:
        gains = {drf: float(np.mean([psnr[i, kappa, window] - psnr[i, 0.0, 0]
                                     for i, case in enumerate(cases) if case["drf"] == drf]))
                 for drf in drfs}
        rows.append(dict(kappa=kappa, window=window, gain_by_drf=gains,
                         mean_psnr=float(np.mean([psnr[i, kappa, window] for i in range(len(cases))]))))
    return sorted(rows, key=lambda row: -row["mean_psnr"])


def tune_fusion(method, val, kappas, windows, *, drfs=None, max_subjects=0, z_range=None,
                mask_suv=0.05, seed=0):
    """Denoise every validation volume once with fusion off, then :func:`score_grid`.

    :param method: the paired checkpoint as a :class:`~.methods.DiffusionMethod`.
    :return: ``(rows, number of volumes)``.
    """
    scored = []
    for case in _validation_cases(val, drfs, max_subjects, z_range, mask_suv):
        denoised = method.denoise(case, case_seeds(seed, case, "paired", 1), fusion_kappa=0.0)[0]
        scored.append(dict(full=case["full"], low=case["low"], mask=case["mask"], drf=case["drf"],
                           denoised=denoised))
    return score_grid(scored, kappas, windows), len(scored)


def sampler_rows(scores, tolerance_db=0.05):
    """One row per sampler from ``scores`` = ``[{"respacing", "psnr_one", "psnr_mean",
    "std_over_rmse", "rank_correlation", "evaluations"}]`` (one per volume; optional ``sampler``,
    the label that groups them, default the respacing, and ``flips``): the means, best
    one-member PSNR first, except that the first row (the default to ship) is the cheapest
    sampler (fewest network evaluations) within ``tolerance_db`` dB of the best."""
    rows = []
    for label in dict.fromkeys(s.get("sampler", s["respacing"]) for s in scores):
        mine = [s for s in scores if s.get("sampler", s["respacing"]) == label]
        row = {key: float(np.nanmean([s[key] for s in mine]))
               for key in ("psnr_one", "psnr_mean", "std_over_rmse", "rank_correlation", "evaluations")}
        rows.append(dict(sampler=label, respacing=mine[0]["respacing"], flips=mine[0].get("flips", ""),
                         volumes=len(mine), **row))
    rows.sort(key=lambda row: -row["psnr_one"])
    chosen = min((row for row in rows if row["psnr_one"] >= rows[0]["psnr_one"] - tolerance_db),
                 key=lambda row: row["evaluations"])
    return [chosen] + [row for row in rows if row is not chosen]


def tune_sampler(methods, val, members, *, drfs=None, max_subjects=0, z_range=None, mask_suv=0.05, seed=0,
                 tolerance_db=0.05):
    """Denoise every validation volume with ``members`` members per sampler and score them.

    :param methods: ``{label: DiffusionMethod}``, one paired checkpoint built per sampler (its
        resolved respacing and test-time flips are recorded).
    :param members: ensemble size (>= 2: the std needs two).
    :param tolerance_db: one-member PSNR a cheaper sampler may lose and still be chosen.
    :return: ``(scores, rows)``: one score per volume and sampler, and :func:`sampler_rows`.
    """
    if members < 2:
        raise ValueError("tune_sampler needs members >= 2 (the ensemble's std)")
    scores = []
    for case in _validation_cases(val, drfs, max_subjects, z_range, mask_suv):
        for label, method in methods.items():
            mean, info = method.denoise(case, case_seeds(seed, case, "paired", members))
            calibration = metrics.uncertainty_calibration(case["full"], mean, info["std"], case["mask"])
            scores.append(dict(volume=case["path"], drf=case["drf"], sampler=label,
                               respacing=method.run["timestep_respacing"], flips=method.run["flips"],
                               psnr_one=metrics.psnr(case["full"], info["first"], mask=case["mask"]),
                               psnr_mean=metrics.psnr(case["full"], mean, mask=case["mask"]),
                               evaluations=info["network_evaluations"] / members, **calibration))
    return scores, sampler_rows(scores, tolerance_db)


def spread_crossing(sigmas, ratios):
    """The smallest blend width at which an ensemble's std / RMSE reaches 1 (``sigmas``
    ascending): interpolated in log-log between the first two neighbouring widths that bracket
    1; the smallest width when the ratio is >= 1 there already, the width of the largest ratio
    when it never reaches 1 (wider blends also make the members' mean worse, so the ratio
    levels off)."""
    if ratios[0] >= 1.0:
        return float(sigmas[0])
    for k in range(1, len(sigmas)):
        if ratios[k] >= 1.0:
            x0, x1 = math.log(sigmas[k - 1]), math.log(sigmas[k])
            y0, y1 = math.log(ratios[k - 1]), math.log(ratios[k])
            return float(math.exp(x0 + (x1 - x0) * (0.0 - y0) / (y1 - y0)))
    return float(sigmas[int(np.argmax(ratios))])


def fit_ensemble_spread(scores):
    """The sidecar's ``ensemble_spread`` from ``scores`` = ``[{"volume", "noise_index",
    "x0_skip_sigma", "std_over_rmse"}]``: per volume the smallest width where std / RMSE
    reaches 1 (:func:`spread_crossing`), then ``log s = log s_ref + power (log index - log index_ref)``
    by least squares, ``index_ref`` the geometric mean of the volumes' indices::

        {"noise_estimator", "noise_index", "x0_skip_sigma", "power", "range", "volumes"}
    """
    crossings, indices = [], []
    for volume in dict.fromkeys(s["volume"] for s in scores):
        mine = sorted((s for s in scores if s["volume"] == volume), key=lambda s: s["x0_skip_sigma"])
        usable = [s for s in mine if s["std_over_rmse"] > 0]
        if len(usable) < 2 or mine[0]["noise_index"] is None:
            continue
        crossing = spread_crossing([s["x0_skip_sigma"] for s in usable], [s["std_over_rmse"] for s in usable])
        crossings.append(math.log(crossing))
        indices.append(math.log(mine[0]["noise_index"]))
    if len(crossings) < 2:
        raise ValueError(f"fit_ensemble_spread needs two or more volumes with a measured spread, got {len(crossings)}")
    centre = float(np.mean(indices))
    power, offset = np.polyfit(np.asarray(indices) - centre, crossings, 1)
    sigmas = [s["x0_skip_sigma"] for s in scores]
    return dict(noise_estimator=fusion.TABLE_ESTIMATOR, noise_index=math.exp(centre),
                x0_skip_sigma=math.exp(offset), power=float(power), range=[min(sigmas), max(sigmas)],
                volumes=len(crossings))


def tune_spread(method, val, sigmas, members, *, fwhms_mm=(0.0,), drfs=None, max_subjects=0, z_range=None,
                mask_suv=0.05, seed=0, tolerance=0.01):
    """Denoise every validation volume with a ``members``-member ensemble per blend width in
    ``sigmas``, choose how far to pool the members' variance (:func:`choose_std_fwhm` over
    ``fwhms_mm``) and fit how the width that calibrates the ensemble follows the input's noise.

    :param method: the paired posterior sampler as a :class:`~.methods.DiffusionMethod` whose
        given settings include ``members``.
    :return: ``(scores, spread, std_fwhm_mm)``: one score per volume and width (PSNR of one
        member, of the members' mean and of the ensemble's image; per pooling FWHM the std /
        RMSE of the image and the rank correlation of std with its |error| (``pooled``), those
        of the chosen FWHM at the top level; noise index), :func:`fit_ensemble_spread` and the
        chosen FWHM (mm).
    """
    if members < 2:
        raise ValueError("tune_spread needs members >= 2 (the ensemble's std)")
    scores = []
    for case in _validation_cases(val, drfs, max_subjects, z_range, mask_suv):
        index = model_grid_noise_index(case["low"], case["affine"], method.metadata, fusion.TABLE_ESTIMATOR)
        voxel_mm = volumes.voxel_sizes(case["affine"])
        for sigma in sigmas:
            image, info = method.denoise(case, case_seeds(seed, case, "paired", members), x0_skip_sigma=sigma)
            pooled = {float(fwhm): metrics.uncertainty_calibration(
                case["full"], image, ensemble_std(info["member_volumes"], voxel_mm, fwhm), case["mask"])
                for fwhm in fwhms_mm}
            scores.append(dict(volume=case["path"], drf=case["drf"], noise_index=index, x0_skip_sigma=sigma,
                               psnr_one=metrics.psnr(case["full"], info["first"], mask=case["mask"]),
                               psnr_mean=metrics.psnr(case["full"], info["members_mean"], mask=case["mask"]),
                               psnr_image=metrics.psnr(case["full"], image, mask=case["mask"]), pooled=pooled))
    fwhm = choose_std_fwhm(scores, tolerance)
    for score in scores:
        score.update(score["pooled"][fwhm])
    return scores, fit_ensemble_spread(scores), fwhm


def choose_std_fwhm(scores, tolerance=0.01):
    """The smallest pooling FWHM (mm) whose rank correlation of std with |error|, averaged over
    ``scores`` (each with ``pooled = {fwhm: {"rank_correlation", ...}}``), is within
    ``tolerance`` of the best average."""
    fwhms = sorted(scores[0]["pooled"])
    means = {f: float(np.mean([s["pooled"][f]["rank_correlation"] for s in scores])) for f in fwhms}
    best = max(means.values())
    return next(f for f in fwhms if means[f] >= best - tolerance)
