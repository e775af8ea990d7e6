"""
Model-card quality protocol: tuned Gaussian vs the paired 3D DDPM vs BC-DPM on a make_dataset.py
dataset, with the quality-bar verdict.

    python scripts/quality_report.py --val data/demo --test data/demo \\
        --paired checkpoint/demo_paired.pt --prior checkpoint/demo_prior.pt --out results/quality

1. Gaussian baseline: for every dose reduction factor (DRF), a grid search of the filter width
   (``--fwhm_grid_mm``, FWHM in mm, stored as ``sigma_mm = FWHM / 2.355``) maximising the mean
   PSNR (UDPET convention) inside the body mask (full dose > ``--mask_suv`` SUV) over the
   validation volumes; saved with ``baselines.save_params`` to ``OUTDIR/gaussian_params.json``.
2. Every held-out test volume (each subject, tracer and DRF) is denoised in-process with the
   library (``VolumeDenoiser``): ``paired`` (the paired checkpoint, low dose as input channel),
   ``bcdpm`` (the unconditional prior plus BC-DPM's block, simulating the dataset's scanner
   settings and the file's low-dose counts from its subject manifest), and the tuned Gaussian.
3. Metrics of ``low_dose``, ``gaussian``, ``paired``, ``bcdpm`` against the full dose:
   ``metrics.evaluate_pair`` with the dataset's organ and lesion labels and the voxel size of
   the affine, inside the body mask.
4. ``OUTDIR/per_volume.csv``, ``summary.md`` / ``summary.json`` (mean +- sd per method and DRF),
   ``quality_vs_drf.png`` (PSNR and lesion SUVmean bias vs DRF) and ``example.png`` (coronal
   MIPs of one test volume), and the quality-bar verdict on stdout.

Quality bar: the paired model beats the tuned Gaussian by >= 1.5 dB PSNR at DRF >= 10 and
>= 0.5 dB below, with a higher SSIM, and keeps the lesion SUVmean within 10 % of the full dose
(mean over the volumes of a DRF); BC-DPM beats the tuned Gaussian's PSNR at every DRF. A check
that cannot be evaluated (method not run, no lesion) makes the verdict INCOMPLETE, never PASS.

``--z_range START STOP`` keeps the axial slices ``START:STOP`` of every volume (a cheap CPU run);
it is recorded in every output. Without ``--paired`` or ``--prior`` that method is skipped.
"""

import argparse
import csv
import json
import math
import os
import sys
import time


import numpy as np
import torch
from tqdm.auto import tqdm

from guided_diffusion.checkpoints import load_model_and_diffusion
from guided_diffusion.sampling.denoiser import (
    SamplingSettings,
    VolumeDenoiser,
    is_null_conditioned_prior,
    member_network_evaluations,
    recommended_fusion_kappa,
    member_seed,
    serves_as_prior,
)
from guided_diffusion.sampling.hot_voxels import DEFAULT_HOT_MODE, HOT_MODES
from guided_diffusion.evaluation import baselines, metrics
from guided_diffusion.pet import dataset_manifest, volumes
from guided_diffusion.sampling.guidance import (
    BC_FACTORY_KEYS, BCDPMFactory, check_bc_steps, resolve_bc_settings)
from guided_diffusion.evaluation.figures import save_volume_panels
from guided_diffusion.script_util import str2bool

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
METHODS = ("low_dose", "gaussian", "paired", "bcdpm")
SUMMARY_METRICS = ("psnr", "ssim", "nrmse", "lesion_suvmean_bias_pct")
ROW_METRICS = ("psnr", "ssim", "nrmse", "rmse", "lesion_suvmean_bias_pct", "lesion_suvmax_bias_pct",
               "lesion_crc", "organ_suvmean_bias_pct")
#: The quality bar of the model card.
PAIRED_PSNR_MARGIN_DB_LOW_DRF = 0.5    # DRF < 10
PAIRED_PSNR_MARGIN_DB_HIGH_DRF = 1.5   # DRF >= 10
HIGH_DRF = 10.0
DEFAULT_BC_STEPS = 10  # BC-DPM paper, medium noise
DEFAULT_PATCH_OVERLAP = 8
BC_COLUMNS = ("noise_index", "bc_lambda", "bc_sigma_mm", "bc_steps", "hot_voxels")  # per-volume BC-DPM settings (CSV)
LESION_BIAS_LIMIT_PCT = 10.0


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--val", required=True,
                        help="validation split: a make_dataset.py directory (its val.txt) or a list")
    parser.add_argument("--test", required=True,
                        help="test split: a make_dataset.py directory (its test.txt) or a list")
    parser.add_argument("--paired", default=None, help="paired checkpoint .pt (skipped if absent)")
    parser.add_argument("--prior", default=None,
                        help="unconditional prior checkpoint .pt for BC-DPM (skipped if absent)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--json", default=None, help="also write summary.json here")
    parser.add_argument("--drf", type=float, nargs="+", default=None,
                        help="dose reduction factors to evaluate (default: every DRF of the test split)")
    parser.add_argument("--max_subjects", type=int, default=0,
                        help="use at most this many subjects per split (0: all)")
    parser.add_argument("--z_range", type=int, nargs=2, default=None, metavar=("START", "STOP"),
                        help="keep only the axial slices START:STOP of every volume")
    parser.add_argument("--mask_suv", type=float, default=0.05,
                        help="body mask: full-dose voxels above this SUV")
    parser.add_argument("--fwhm_grid_mm", type=float, nargs="+",
                        default=[0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0],
                        help="Gaussian FWHM grid (mm) searched per DRF on the validation split")
    parser.add_argument("--steps", default="ddim10",
                        help="timestep_respacing of the paired model ('ddimN': DDIM)")
    parser.add_argument("--bc_respacing", default=None,
                        help="timestep_respacing of the BC-DPM prior (default: --steps)")
    parser.add_argument("--bc_steps", type=int, default=None,
                        help="BC-DPM: conditioned last l steps (default: the prior's sidecar "
                             f"'sampling' recommendation, else {DEFAULT_BC_STEPS})")
    parser.add_argument("--bc_lambda", type=float, default=None,
                        help="BC-DPM balance lambda (default: the prior's tuning table for each "
                             "input's noise level, else 0.2)")
    parser.add_argument("--bc_sigma_mm", type=float, default=None,
                        help="BC-DPM Gaussian-filter condition sigma (mm)")
    parser.add_argument("--bc_recon_iters", type=int, default=2, help="OSEM iterations of P^+")
    parser.add_argument("--bc_recon_subsets", type=int, default=8, help="OSEM subsets of P^+")
    parser.add_argument("--bc_start", type=str2bool, nargs="?", const=True, default=None,
                        help="BC-DPM starts at step l from the diffused low dose (l network "
                             "evaluations per patch instead of all steps; default: the prior's "
                             "sidecar 'sampling' recommendation, else off)")
    parser.add_argument("--num_ensemble", type=int, default=1, help="members averaged per volume")
    parser.add_argument("--patch_z", type=int, default=None,
                        help="axial slab depth (model voxels; default: the checkpoint's)")
    parser.add_argument("--patch_overlap", type=int, default=None,
                        help="patch overlap (voxels; default: the checkpoint's recommendation, else 8)")
    parser.add_argument("--batch_size", type=int, default=1, help="patches per network call")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="network precision")
    parser.add_argument("--hot_voxels", choices=HOT_MODES, default=None,
                        help="voxels above the model's SUV range (as scripts/test.py; default: "
                             f"BC-DPM the prior's tuning table, else {DEFAULT_HOT_MODE})")
    parser.add_argument("--fusion_kappa", type=float, default=None,
                        help="noise-adaptive fusion with the input (as scripts/test.py; 0: off; "
                             "default: each checkpoint's sidecar recommendation, else off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def check_args(args):
    if args.z_range is not None and not 0 <= args.z_range[0] < args.z_range[1]:
        raise ValueError(f"--z_range needs 0 <= START < STOP, got {args.z_range}")
    if args.max_subjects < 0 or args.num_ensemble < 1 or (args.bc_steps or 0) < 0:
        raise ValueError("--max_subjects and --bc_steps must be >= 0, --num_ensemble >= 1")
    if any(f < 0 for f in args.fwhm_grid_mm):
        raise ValueError(f"--fwhm_grid_mm must be non-negative widths, got {args.fwhm_grid_mm}")
    for flag, path in (("--paired", args.paired), ("--prior", args.prior)):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: checkpoint not found ({flag})")


# ----------------------------------------------------------------------------- data


def body_mask(full_dose, threshold_suv):
    """Voxels of the full-dose image above ``threshold_suv`` (boolean ``(X, Y, Z)``)."""
    mask = np.asarray(full_dose) > threshold_suv
    if not mask.any():
        raise ValueError(f"no full-dose voxel above {threshold_suv} SUV: empty body mask")
    return mask


def crop_z(volume, affine, z_range):
    """Axial slab ``z_range = (start, stop)`` of ``volume`` ``(X, Y, Z)`` and its affine."""
    if z_range is None:
        return volume, affine
    start, stop = z_range
    if stop > volume.shape[2]:
        raise ValueError(f"--z_range {start} {stop} exceeds the {volume.shape[2]} slices")
    shifted = np.array(affine, dtype=np.float64)
    shifted[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, start]) + affine[:3, 3]
    return volume[:, :, start:stop], shifted


def select_files(split_path, split, drfs, max_subjects):
    """Described dataset files of a split, restricted to ``drfs`` and the first subjects."""
    described = []
    for path in dataset_manifest.split_files(split_path, split):
        description = dataset_manifest.describe_file(path)
        if description is None:
            raise ValueError(f"{path}: no make_dataset.py subject manifest beside it")
        described.append(description)
    if drfs is not None:
        described = [d for d in described if any(math.isclose(d["drf"], f) for f in drfs)]
    subjects = list(dict.fromkeys(d["subject"] for d in described))
    if max_subjects:
        subjects = subjects[:max_subjects]
    chosen = [d for d in described if d["subject"] in subjects]
    if not chosen:
        raise ValueError(f"{split_path}: no {split} file with DRF in {drfs}")
    return chosen


def load_case(description, z_range, mask_suv):
    """Low dose, full dose, labels, mask and voxel size of one dataset file (cropped to z)."""
    path = description["path"]
    low, affine = volumes.load_volume(path, index=0)
    full, _ = volumes.load_volume(path, index=1)
    organs = lesions = None
    if description["organ_labels"]:
        organs, _ = volumes.load_volume(description["organ_labels"])
    if description["lesion_labels"]:
        lesions, _ = volumes.load_volume(description["lesion_labels"])
    arrays = dict(low=low, full=full, organs=organs, lesions=lesions)
    for key, volume in arrays.items():
        if volume is not None and volume.shape != low.shape:
            raise ValueError(f"{path}: {key} volume shape {volume.shape} differs from {low.shape}")
    arrays = {k: None if v is None else crop_z(v, affine, z_range)[0] for k, v in arrays.items()}
    return dict(description, **arrays, affine=crop_z(low, affine, z_range)[1],
                voxel_mm=volumes.voxel_sizes(affine),
                mask=body_mask(arrays["full"], mask_suv),
                name=os.path.splitext(os.path.basename(path))[0])


# ----------------------------------------------------------------------------- Gaussian baseline


def tune_gaussian(cases, fwhm_grid_mm):
    """Per DRF, the sigma (mm) of the grid with the best mean masked PSNR on ``cases``.

    :return: ``(params {drf: {"sigma_mm"}}, tables {drf: [{"fwhm_mm", "sigma_mm", "psnr"}]})``.
    """
    params, tables = {}, {}
    for drf in sorted({c["drf"] for c in cases}):
        group = [c for c in cases if c["drf"] == drf]
        voxel = group[0]["voxel_mm"]
        if any(not np.allclose(c["voxel_mm"], voxel) for c in group):
            raise ValueError(f"validation volumes at DRF {drf:g} have different voxel sizes")
        grid = [{"sigma_mm": fwhm / FWHM_PER_SIGMA} for fwhm in fwhm_grid_mm]
        best, table = baselines.tune("gaussian", [c["low"] for c in group], [c["full"] for c in group],
                                     grid, metric="psnr", fixed_params={"voxel_mm": tuple(voxel)},
                                     mask_list=[c["mask"] for c in group])
        params[drf] = best
        tables[drf] = [dict(fwhm_mm=fwhm, sigma_mm=row["params"]["sigma_mm"], psnr=row["psnr"])
                       for fwhm, row in zip(fwhm_grid_mm, table)]
        if best["sigma_mm"] == max(p["sigma_mm"] for p in grid) and len(grid) > 1:
            print(f"warning: DRF {drf:g}: the best Gaussian width is the largest of the grid; "
                  f"extend --fwhm_grid_mm", file=sys.stderr)
    return params, tables


# ----------------------------------------------------------------------------- diffusion models


def load_denoiser(model_path, cond, respacing, device):
    """Model, diffusion and metadata of a checkpoint, with ``respacing`` and the expected
    ``cond`` (``"paired"`` / ``"none"``; ``"none"`` accepts any checkpoint that
    ``denoise.serves_as_prior``) checked; returns ``(model, diffusion, metadata)``."""
    model, diffusion, metadata = load_model_and_diffusion(
        model_path, {"timestep_respacing": respacing}, device=device)
    if not (metadata["cond"] == cond or (cond == "none" and serves_as_prior(metadata))):
        kind = "a paired" if cond == "paired" else "an unconditional prior"
        raise ValueError(f"{model_path}: expected {kind} checkpoint, its cond is {metadata['cond']!r}")
    return model, diffusion, metadata


def with_recommended_slabs(args, metadata):
    """``args`` with ``patch_z`` / ``patch_overlap`` from the checkpoint's sidecar ``sampling``
    where not given (a model sampled on its training slab depth: the prior needs it)."""
    recommended = metadata.get("sampling", {})
    return argparse.Namespace(**dict(
        vars(args),
        patch_z=args.patch_z if args.patch_z is not None else recommended.get("patch_z"),
        patch_overlap=(args.patch_overlap if args.patch_overlap is not None
                       else recommended.get("patch_overlap", DEFAULT_PATCH_OVERLAP))))


def sampling_settings(args, respacing, start_t=None, stitch="seamfree", null_condition=False,
                      fusion_kappa=None, hot_voxels=None):
    """SamplingSettings from ``args.patch_z / patch_overlap / batch_size / precision`` and
    ``hot_voxels`` (default ``args.hot_voxels``, else :data:`DEFAULT_HOT_MODE`) for one timestep
    respacing (``"ddimN"``: DDIM)."""
    return SamplingSettings(use_ddim=respacing.startswith("ddim"), clip_denoised=True,
                            patch_z=args.patch_z, overlap=args.patch_overlap,
                            batch_size=args.batch_size, stitch=stitch, start_t=start_t,
                            precision=args.precision, progress=False,
                            hot_voxels=hot_voxels or args.hot_voxels or DEFAULT_HOT_MODE,
                            fusion_kappa=fusion_kappa or None,
                            null_condition=null_condition)


def bcdpm_factory(acquisition, metadata, *, bc_steps, bc_lambda, bc_sigma_mm, recon_iters,
                  recon_subsets):
    """BC-DPM's block on the checkpoint's grid simulating ``acquisition`` (scanner, counts...:
    ``dataset_manifest.bcdpm_acquisition`` of a dataset file)."""
    return BCDPMFactory(num_steps_l=bc_steps, lam=bc_lambda, sigma_mm=bc_sigma_mm,
                        recon_iters=recon_iters, recon_subsets=recon_subsets,
                        normalisation=metadata["normalisation"], voxel_mm=metadata["voxel_mm"],
                        **acquisition)


class DiffusionMethods:
    """The paired model and the BC-DPM prior, loaded once, applied to one case at a time."""

    def __init__(self, args, device):
        self.args = args
        self.models = {}
        if args.paired:
            self.models["paired"] = load_denoiser(args.paired, "paired", args.steps, device)
        if args.prior:
            respacing = args.bc_respacing or args.steps
            model, diffusion, metadata = load_denoiser(args.prior, "none", respacing, device)
            recommended = metadata.get("sampling", {})
            if args.bc_start is None:
                args.bc_start = bool(recommended.get("bc_start", False))
            self.default_bc_steps = int(recommended.get("bc_steps", DEFAULT_BC_STEPS))
            if recommended.get("trained_max_t") and not args.bc_start:
                print(f"warning: {args.prior} was trained only for t < {recommended['trained_max_t']}: "
                      f"sampling from pure noise leaves its training range (use --bc_start)",
                      file=sys.stderr)
            if args.bc_steps is not None:
                check_bc_steps(args.bc_steps, diffusion.num_timesteps, args.bc_start)
            self.models["bcdpm"] = (model, diffusion, metadata)

    @property
    def names(self):
        return list(self.models)

    def denoise(self, method, case):
        """``(SUV volume (X, Y, Z), info)`` of ``method`` on one case; ``info`` has the
        ``network_evaluations`` and, for BC-DPM, ``bc`` (lambda, sigma and their source, see
        :func:`~guided_diffusion.sampling.guidance.resolve_bc_settings`)."""
        model, diffusion, metadata = self.models[method]
        args = with_recommended_slabs(self.args, metadata)
        factory, report = None, {}
        if method == "bcdpm":
            bc, report["bc"] = resolve_bc_settings(
                dict(bc_lambda=args.bc_lambda, bc_sigma_mm=args.bc_sigma_mm, bc_steps=args.bc_steps,
                     hot_voxels=args.hot_voxels),
                metadata.get("sampling", {}).get("bc_tuning"), case["low"],
                dict(bc_steps=self.default_bc_steps))
            check_bc_steps(bc["bc_steps"], diffusion.num_timesteps, args.bc_start)
            settings = sampling_settings(args, args.bc_respacing or args.steps,
                                         bc["bc_steps"] - 1 if args.bc_start else None,
                                         null_condition=is_null_conditioned_prior(metadata, method),
                                         fusion_kappa=recommended_fusion_kappa(metadata, args.fusion_kappa),
                                         hot_voxels=bc["hot_voxels"])
            factory = bcdpm_factory(dataset_manifest.bcdpm_acquisition(case), metadata,
                                    **{key: bc[key] for key in BC_FACTORY_KEYS},
                                    recon_iters=args.bc_recon_iters,
                                    recon_subsets=args.bc_recon_subsets)
        else:
            settings = sampling_settings(args, args.steps, fusion_kappa=recommended_fusion_kappa(
                metadata, args.fusion_kappa))
        denoiser = VolumeDenoiser(model, diffusion, metadata, settings, conditioner_factory=factory)
        seeds = [member_seed(args.seed, f"{case['name']}_{method}", k) for k in range(args.num_ensemble)]
        mean, _, _, info = denoiser.denoise(case["low"], case["affine"], seeds)
        report["network_evaluations"] = sum(member_network_evaluations(m) for m in info["members"])
        return mean, report


# ----------------------------------------------------------------------------- metrics and summary


def evaluate(case, image):
    """The per-volume metrics of ``image`` against the case's full dose (see ROW_METRICS)."""
    result = metrics.evaluate_pair(case["full"], image, labels=case["organs"],
                                   lesion_labels=case["lesions"], voxel_mm=case["voxel_mm"],
                                   mask=case["mask"])
    row = {k: result[k] for k in ("psnr", "ssim", "nrmse", "rmse")}
    row.update({k: result["summary"][k] for k in ("lesion_suvmean_bias_pct", "lesion_suvmax_bias_pct",
                                                  "lesion_crc", "organ_suvmean_bias_pct")})
    row["n_lesions"] = len(result["lesions"])
    return row


def mean_sd(values):
    """``(mean, sd, n)`` over the finite values (sd with ddof 1; NaN for fewer than 2)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, 0
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    return float(np.mean(finite)), sd, len(finite)


def summarise(rows):
    """``{method: {drf: {metric: {"mean", "sd", "n"}, "volumes": n}}}`` over the per-volume rows."""
    summary = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        summary[method] = {}
        for drf in sorted({r["drf"] for r in rows if r["method"] == method}):
            group = [r for r in rows if r["method"] == method and r["drf"] == drf]
            entry = {"volumes": len(group)}
            for key in ROW_METRICS + ("seconds", "network_evaluations"):
                mean, sd, n = mean_sd([r[key] for r in group])
                entry[key] = dict(mean=mean, sd=sd, n=n)
            summary[method][drf] = entry
    return summary


def _check(name, drf, value, threshold, passed_if, unit):
    """One verdict line: ``value`` compared with ``threshold`` (NaN: not evaluated)."""
    evaluated = value is not None and math.isfinite(value)
    passed = bool(passed_if(value)) if evaluated else None
    return dict(check=name, drf=drf, value=value if evaluated else None, threshold=threshold,
                unit=unit, status="not evaluated" if passed is None else "PASS" if passed else "FAIL")


def quality_bar(summary):
    """The model card's checks, one per (criterion, DRF), and the overall verdict."""
    gaussian = summary.get("gaussian", {})
    checks = []

    def mean_of(method, drf, key):
        entry = summary.get(method, {}).get(drf)
        return entry[key]["mean"] if entry else math.nan

    for drf in sorted(gaussian):
        margin_db = PAIRED_PSNR_MARGIN_DB_HIGH_DRF if drf >= HIGH_DRF else PAIRED_PSNR_MARGIN_DB_LOW_DRF
        psnr_gain = mean_of("paired", drf, "psnr") - mean_of("gaussian", drf, "psnr")
        ssim_gain = mean_of("paired", drf, "ssim") - mean_of("gaussian", drf, "ssim")
        bias = mean_of("paired", drf, "lesion_suvmean_bias_pct")
        bc_gain = mean_of("bcdpm", drf, "psnr") - mean_of("gaussian", drf, "psnr")
        checks += [
            _check("paired - gaussian PSNR", drf, psnr_gain, margin_db, lambda v, m=margin_db: v >= m, "dB"),
            _check("paired - gaussian SSIM", drf, ssim_gain, 0.0, lambda v: v > 0, ""),
            _check("paired lesion SUVmean bias", drf, bias, LESION_BIAS_LIMIT_PCT,
                   lambda v: abs(v) <= LESION_BIAS_LIMIT_PCT, "%"),
            _check("bcdpm - gaussian PSNR", drf, bc_gain, 0.0, lambda v: v > 0, "dB"),
        ]
    statuses = [c["status"] for c in checks]
    overall = "FAIL" if "FAIL" in statuses else "INCOMPLETE" if "not evaluated" in statuses or not checks \
        else "PASS"
    return dict(checks=checks, overall=overall)


def format_check(check):
    relation = {"paired lesion SUVmean bias": "|value| <="}.get(
        check["check"], ">=" if check["check"] == "paired - gaussian PSNR" else ">")
    value = "n/a" if check["value"] is None else f"{check['value']:+.3f}"
    return (f"{check['status']:>13}  DRF {check['drf']:>5g}  {check['check']}: {value} {check['unit']} "
            f"(need {relation} {check['threshold']:g} {check['unit']})")


# ----------------------------------------------------------------------------- outputs


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _jsonable(data):
    if isinstance(data, dict):
        return {str(k) if not isinstance(k, float) else baselines.drf_key(k): _jsonable(v)
                for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_jsonable(v) for v in data]
    if isinstance(data, (np.floating, np.integer)):
        data = data.item()
    return _finite_or_none(data)


def write_csv(path, rows):
    columns = ["subject", "tracer", "drf", "method", *ROW_METRICS, "n_lesions", "seconds",
               "network_evaluations", *BC_COLUMNS, "file"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in columns})


def _cell(stat, digits):
    if stat["n"] == 0:
        return "n/a"
    if not math.isfinite(stat["sd"]):
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def describe_bc_settings(settings):
    """``"3, 0.2, 4 mm"`` with ``"tuned"`` for each BC-DPM setting left to the prior's table."""
    values = [settings["bc_steps"], settings["bc_lambda"], settings["bc_sigma_mm"]]
    return ", ".join("tuned" if value is None else f"{value:g}{unit}"
                     for value, unit in zip(values, ("", "", " mm")))


def summary_markdown(summary, verdict, settings):
    lines = ["# Quality report", "",
             f"Test volumes: {settings['test_volumes']} ({settings['test_subjects']} subjects); "
             f"validation volumes: {settings['val_volumes']}; axial range: "
             f"{settings['z_range'] or 'whole volume'}; body mask: full dose > {settings['mask_suv']} SUV; "
             f"paired steps {settings['steps']}, BC-DPM steps {settings['bc_respacing']} "
             f"(l, lambda, sigma: {describe_bc_settings(settings)}, "
             f"start from low dose: {settings['bc_start']}), ensemble {settings['num_ensemble']}, "
             f"hot voxels: {settings['hot_voxels'] or 'rescale (BC-DPM: tuned)'}, fusion kappa: "
             f"{settings['fusion_kappa'] or 'checkpoint recommendation'}.", "",
             "| method | DRF | volumes | PSNR (dB) | SSIM | NRMSE | lesion SUVmean bias (%) |",
             "|---|---|---|---|---|---|---|"]
    for method, by_drf in summary.items():
        for drf, entry in by_drf.items():
            lines.append(f"| {method} | {drf:g} | {entry['volumes']} | {_cell(entry['psnr'], 2)} | "
                         f"{_cell(entry['ssim'], 4)} | {_cell(entry['nrmse'], 4)} | "
                         f"{_cell(entry['lesion_suvmean_bias_pct'], 1)} |")
    lines += ["", f"## Quality bar: {verdict['overall']}", "", "```"]
    lines += [format_check(c) for c in verdict["checks"]] + ["```", ""]
    return "\n".join(lines)


def plot_quality(path, summary):
    """PSNR and lesion SUVmean bias (mean +- sd) against the DRF, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_psnr, ax_bias) = plt.subplots(1, 2, figsize=(10, 4))
    for method, by_drf in summary.items():
        drfs = list(by_drf)
        for axis, key in ((ax_psnr, "psnr"), (ax_bias, "lesion_suvmean_bias_pct")):
            means = [by_drf[d][key]["mean"] for d in drfs]
            sds = [np.nan_to_num(by_drf[d][key]["sd"]) for d in drfs]
            axis.errorbar(drfs, means, yerr=sds, marker="o", capsize=3, label=method)
    ax_bias.axhspan(-LESION_BIAS_LIMIT_PCT, LESION_BIAS_LIMIT_PCT, color="green", alpha=0.1,
                    label=f"±{LESION_BIAS_LIMIT_PCT:g} %")
    for axis, label in ((ax_psnr, "PSNR in the body (dB)"), (ax_bias, "lesion SUVmean bias (%)")):
        axis.set_xscale("log")
        axis.set_xlabel("dose reduction factor")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv=None):
    args = create_argparser().parse_args(argv)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    drfs = None if args.drf is None else [float(d) for d in args.drf]

    val_files = select_files(args.val, "val", drfs, args.max_subjects)
    test_files = select_files(args.test, "test", drfs, args.max_subjects)
    missing = sorted({d["drf"] for d in test_files} - {d["drf"] for d in val_files})
    if missing:
        raise ValueError(f"{args.val}: no validation volume at DRF {missing} to tune the Gaussian")

    val_cases = [load_case(d, args.z_range, args.mask_suv) for d in tqdm(val_files, desc="validation")]
    gaussian_params, tuning = tune_gaussian(val_cases, args.fwhm_grid_mm)
    params_path = os.path.join(args.out, "gaussian_params.json")
    baselines.save_params(params_path, {"gaussian": gaussian_params})
    for drf, best in gaussian_params.items():
        print(f"Gaussian, DRF {drf:g}: sigma {best['sigma_mm']:.3f} mm "
              f"(FWHM {best['sigma_mm'] * FWHM_PER_SIGMA:.1f} mm)")
    del val_cases

    diffusion_methods = DiffusionMethods(args, device)
    methods = ["low_dose", "gaussian"] + diffusion_methods.names
    example_drf = max(d["drf"] for d in test_files)
    example = None
    rows = []
    progress = tqdm(total=len(test_files) * len(methods), desc="test volumes x methods")
    for description in test_files:
        case = load_case(description, args.z_range, args.mask_suv)
        images = {}
        for method in methods:
            begin = time.perf_counter()
            info = dict(network_evaluations=0)
            if method == "low_dose":
                image = case["low"]
            elif method == "gaussian":
                image = baselines.gaussian(case["low"], voxel_mm=case["voxel_mm"],
                                           **gaussian_params[case["drf"]])
            else:
                image, info = diffusion_methods.denoise(method, case)
            seconds = time.perf_counter() - begin
            bc = info.get("bc", {})
            rows.append(dict(subject=case["subject"], tracer=case["tracer"], drf=case["drf"],
                             method=method, **evaluate(case, image), seconds=seconds,
                             network_evaluations=info["network_evaluations"],
                             **{key: bc.get(key) for key in BC_COLUMNS}, file=case["path"]))
            images[method] = image
            progress.update()
        if example is None and case["drf"] == example_drf:
            example = (case, images)
    progress.close()

    summary = summarise(rows)
    verdict = quality_bar(summary)
    settings = dict(val=args.val, test=args.test, paired=args.paired, prior=args.prior,
                    steps=args.steps, bc_respacing=args.bc_respacing or args.steps,
                    bc_steps=args.bc_steps, bc_lambda=args.bc_lambda, bc_sigma_mm=args.bc_sigma_mm,
                    bc_start=args.bc_start, bc_recon_iters=args.bc_recon_iters,
                    bc_recon_subsets=args.bc_recon_subsets, num_ensemble=args.num_ensemble,
                    precision=args.precision, seed=args.seed, hot_voxels=args.hot_voxels,
                    fusion_kappa=args.fusion_kappa, z_range=args.z_range,
                    mask_suv=args.mask_suv, fwhm_grid_mm=args.fwhm_grid_mm, methods=methods,
                    test_volumes=len(test_files), val_volumes=len(val_files),
                    test_subjects=len({d["subject"] for d in test_files}),
                    device=str(device), threads=torch.get_num_threads())

    outputs = {name: os.path.join(args.out, name) for name in
               ("per_volume.csv", "summary.md", "summary.json", "quality_vs_drf.png", "example.png")}
    write_csv(outputs["per_volume.csv"], rows)
    markdown = summary_markdown(summary, verdict, settings)
    volumes.atomic_write_bytes(outputs["summary.md"], markdown)
    plot_quality(outputs["quality_vs_drf.png"], summary)
    case, images = example
    vmax = float(np.percentile(case["full"], 99.9)) or 1.0
    save_volume_panels(outputs["example.png"],
                       [("full dose", case["full"], vmax, "gray_r")]
                       + [(m, images[m], vmax, "gray_r") for m in methods],
                       case["voxel_mm"], title=f"{case['name']} (DRF {case['drf']:g})")
    report = _jsonable(dict(settings=settings, gaussian_params=gaussian_params,
                            gaussian_tuning=tuning, summary=summary, quality_bar=verdict,
                            outputs=dict(outputs, gaussian_params=params_path)))
    text = json.dumps(report, indent=2) + "\n"
    volumes.atomic_write_bytes(outputs["summary.json"], text)
    if args.json:
        volumes.atomic_write_bytes(args.json, text)
    print(markdown)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
