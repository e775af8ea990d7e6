"""The model card's quality protocol: tuned Gaussian vs the paired 3D DDPM vs BC-DPM on the
held-out volumes of a make_dataset.py dataset, and the quality-bar verdict.

1. :func:`tune_gaussian`: per dose reduction factor (DRF), the filter width of a FWHM grid
   (mm) with the best mean PSNR (UDPET convention) inside the body mask over the validation
   cases.
2. :func:`run_report`: every test case (subject, tracer, DRF) is denoised by each method
   (``low_dose``: the input itself; ``gaussian``; the diffusion methods, each a
   :class:`~.methods.DiffusionMethod`) and scored against its full dose
   (:func:`case_metrics`).
3. :func:`summarise` (mean +- sd per method and DRF), :func:`quality_bar` (the verdict),
   :func:`write_csv`, :func:`summary_markdown`, :func:`plot_quality`.

Quality bar: the paired model beats the tuned Gaussian by >= 1.5 dB PSNR at DRF >= 10 and
>= 0.5 dB below, with a higher SSIM, and keeps the lesion SUVmean within 10 % of the full dose
(mean over the volumes of a DRF); BC-DPM beats the tuned Gaussian's PSNR at every DRF. A check
that cannot be evaluated (method not run, no lesion) makes the verdict INCOMPLETE, never PASS.
"""

import csv
import json
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint_hub import REPO
from ..pet import volumes
from ..pet.filters import FWHM_PER_SIGMA, fwhm_to_sigma
from ..sampling.settings import TUNED_KEYS, uses_bcdpm
from . import baselines, metrics
from .cases import load_case, select_files
from .figures import save_figure, save_volume_panels
from .methods import case_seeds
from .statistics import finite_or_none, group_summaries

SUMMARY_METRICS = ("psnr", "ssim", "nrmse", "lesion_suvmean_bias_pct")
IMAGE_METRICS = ("psnr", "ssim", "nrmse", "rmse")
LESION_METRICS = ("lesion_suvmean_bias_pct", "lesion_suvmax_bias_pct", "lesion_crc",
                  "organ_suvmean_bias_pct")
ROW_METRICS = IMAGE_METRICS + LESION_METRICS
BC_COLUMNS = ("noise_index",) + tuple(TUNED_KEYS)
"""Per-volume BC-DPM settings in the CSV: the input's noise index and its resolved settings."""
PAIRED_PSNR_MARGIN_DB_LOW_DRF = 0.5    # DRF < HIGH_DRF
PAIRED_PSNR_MARGIN_DB_HIGH_DRF = 1.5   # DRF >= HIGH_DRF
HIGH_DRF = 10.0
LESION_BIAS_LIMIT_PCT = 10.0
DESCRIBED_KEYS = ("timestep_respacing", "use_ddim", "flips", "patch_z", "patch_overlap", "hot_voxels",
                  "fusion_kappa")
BC_DESCRIBED_KEYS = ("bc_steps", "bc_lambda", "bc_sigma_mm", "bc_start", "bc_lam_schedule")
OUTPUT_NAMES = ("per_volume.csv", "summary.md", "summary.json", "quality_vs_drf.png", "example.png")


# ----------------------------------------------------------------------------- Gaussian baseline


def tune_gaussian(cases, fwhm_grid_mm):
    """Per DRF, the sigma (mm) of the FWHM grid with the best mean masked PSNR on ``cases``.

    :return: ``(params {drf: {"sigma_mm"}}, tables {drf: [{"fwhm_mm", "sigma_mm", "psnr"}]})``.
    """
    params, tables = {}, {}
    for drf in sorted({c["drf"] for c in cases}):
        group = [c for c in cases if c["drf"] == drf]
        voxel = group[0]["voxel_mm"]
        if any(not np.allclose(c["voxel_mm"], voxel) for c in group):
            raise ValueError(f"validation volumes at DRF {drf:g} have different voxel sizes")
        grid = [{"sigma_mm": fwhm_to_sigma(fwhm)} for fwhm in fwhm_grid_mm]
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


# ----------------------------------------------------------------------------- metrics and summary


def case_metrics(case, image):
    """The per-volume metrics of ``image`` against the case's full dose (see :data:`ROW_METRICS`)."""
    result = metrics.evaluate_pair(case["full"], image, labels=case["organs"],
                                   lesion_labels=case["lesions"], voxel_mm=case["voxel_mm"],
                                   mask=case["mask"])
    row = {k: result[k] for k in IMAGE_METRICS}
    row.update({k: result["summary"][k] for k in LESION_METRICS})
    row["n_lesions"] = len(result["lesions"])
    return row


def summarise(rows):
    """``{method: {drf: {metric: {"mean", "sd", "n"}, "volumes": n}}}`` over the per-volume rows
    (methods in order of appearance, DRFs ascending)."""
    groups = group_summaries(rows, ("method", "drf"), ROW_METRICS + ("seconds", "network_evaluations"))
    summary = {}
    for (method, drf), entry in sorted(groups.items(), key=lambda item: item[0][1]):
        summary.setdefault(method, {})[drf] = entry
    methods = list(dict.fromkeys(r["method"] for r in rows))
    return {method: summary[method] for method in methods}


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
    """One verdict line for people."""
    relation = {"paired lesion SUVmean bias": "|value| <="}.get(
        check["check"], ">=" if check["check"] == "paired - gaussian PSNR" else ">")
    value = "n/a" if check["value"] is None else f"{check['value']:+.3f}"
    return (f"{check['status']:>13}  DRF {check['drf']:>5g}  {check['check']}: {value} {check['unit']} "
            f"(need {relation} {check['threshold']:g} {check['unit']})")


# ----------------------------------------------------------------------------- outputs


def json_key(key):
    """A JSON key: a DRF (float) as :func:`~.baselines.drf_key`, anything else as ``str``."""
    return baselines.drf_key(key) if isinstance(key, float) else str(key)


def report_path(path):
    """``path`` relative to the repository when inside it (a committed report then names no path of
    this machine), else as given."""
    absolute = os.path.abspath(path)
    return os.path.relpath(absolute, REPO) if os.path.commonpath([absolute, REPO]) == REPO else path


def write_csv(path, rows):
    """The per-volume rows as CSV, ``file`` by :func:`report_path`."""
    columns = ["subject", "tracer", "drf", "method", *ROW_METRICS, "n_lesions", "seconds",
               "network_evaluations", *BC_COLUMNS, "file"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(dict({k: row[k] for k in columns}, file=report_path(row["file"])))


def _cell(stat, digits):
    if stat["n"] == 0:
        return "n/a"
    if not math.isfinite(stat["sd"]):
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def describe_method(method):
    """``"timestep_respacing ddim10 (given), ..."``: a diffusion method's run-level settings and
    where each came from; BC-DPM settings left to the checkpoint's tuning table read
    ``tuned per input``."""
    keys = DESCRIBED_KEYS + (BC_DESCRIBED_KEYS if uses_bcdpm(method.mode) else ())
    run = method.run
    parts = [f"{key} tuned per input" if key in TUNED_KEYS and method.tuning and run.sources[key] != "given"
             else f"{key} {run[key]} ({run.sources[key]})" for key in keys]
    return ", ".join(parts + [f"precision {method.precision}"])


def summary_markdown(summary, verdict, record, described):
    """The report for people: the run, the table per method and DRF, the verdict.

    :param record: the run's ``settings`` record (:func:`run_report`).
    :param described: ``{method: describe_method(...)}`` of the diffusion methods.
    """
    lines = ["# Quality report", "",
             f"Test volumes: {record['test_volumes']} ({record['test_subjects']} subjects); "
             f"validation volumes: {record['val_volumes']}; axial range: "
             f"{record['z_range'] or 'whole volume'}; body mask: full dose > {record['mask_suv']} SUV; "
             f"ensemble {record['num_ensemble'] or 'of each checkpoint (its tuning)'}.", ""]
    lines += [f"- {name}: {text}" for name, text in described.items()]
    lines += ["", "| method | DRF | volumes | PSNR (dB) | SSIM | NRMSE | lesion SUVmean bias (%) |",
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
    save_figure(fig, path)


# ----------------------------------------------------------------------------- the protocol


def _denoise(method, case, gaussian_params, diffusion, seed, num_ensemble):
    """``(image, network evaluations, per-input BC-DPM settings)`` of one method on one case."""
    if method == "low_dose":
        return case["low"], 0, {}
    if method == "gaussian":
        params = gaussian_params[case["drf"]]
        return baselines.gaussian(case["low"], voxel_mm=case["voxel_mm"], **params), 0, {}
    model = diffusion[method]
    image, info = model.denoise(case, case_seeds(seed, case, method, model.ensemble_size(num_ensemble)))
    resolved = info["resolved"]
    bc = {}
    if uses_bcdpm(model.mode):
        bc = dict({key: resolved[key] for key in TUNED_KEYS}, noise_index=resolved.noise_index)
    return image, info["network_evaluations"], bc


def run_report(val, test, out, diffusion, *, drfs=None, max_subjects=0, z_range=None,
               mask_suv=0.05, fwhm_grid_mm=(0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0), num_ensemble=1,
               seed=0, settings=None, json_copy=None):
    """Run the protocol and write ``out``'s ``gaussian_params.json``, ``per_volume.csv``,
    ``summary.md``, ``summary.json``, ``quality_vs_drf.png`` and ``example.png``.

    :param val, test: the validation / test split (a make_dataset.py directory or split list).
    :param diffusion: ``{name: DiffusionMethod}`` (``"paired"``, ``"bcdpm"``; the quality bar
        knows these names).
    :param drfs: the DRFs to evaluate (``None``: every DRF of the test split).
    :param settings: extra entries of the JSON's ``settings`` record (e.g. the flags).
    :param json_copy: also write ``summary.json`` here.
    :return: ``(markdown, report)``.
    """
    os.makedirs(out, exist_ok=True)
    val_files = select_files(val, "val", drfs, max_subjects)
    test_files = select_files(test, "test", drfs, max_subjects)
    missing = sorted({d["drf"] for d in test_files} - {d["drf"] for d in val_files})
    if missing:
        raise ValueError(f"{val}: no validation volume at DRF {missing} to tune the Gaussian")
    val_cases = [load_case(d, z_range, mask_suv) for d in tqdm(val_files, desc="validation")]
    gaussian_params, tuning = tune_gaussian(val_cases, fwhm_grid_mm)
    del val_cases
    params_path = os.path.join(out, "gaussian_params.json")
    baselines.save_params(params_path, {"gaussian": gaussian_params})
    for drf, best in gaussian_params.items():
        print(f"Gaussian, DRF {drf:g}: sigma {best['sigma_mm']:.3f} mm "
              f"(FWHM {best['sigma_mm'] * FWHM_PER_SIGMA:.1f} mm)")

    methods = ["low_dose", "gaussian"] + list(diffusion)
    example_drf = max(d["drf"] for d in test_files)
    example, rows = None, []
    progress = tqdm(total=len(test_files) * len(methods), desc="test volumes x methods")
    for description in test_files:
        case = load_case(description, z_range, mask_suv)
        images = {}
        for method in methods:
            begin = time.perf_counter()
            image, evaluations, bc = _denoise(method, case, gaussian_params, diffusion, seed, num_ensemble)
            seconds = time.perf_counter() - begin
            rows.append(dict(subject=case["subject"], tracer=case["tracer"], drf=case["drf"],
                             method=method, **case_metrics(case, image), seconds=seconds,
                             network_evaluations=evaluations,
                             **{key: bc.get(key) for key in BC_COLUMNS}, file=case["path"]))
            images[method] = image
            progress.update()
        if example is None and case["drf"] == example_drf:
            example = (case, images)
    progress.close()

    summary = summarise(rows)
    verdict = quality_bar(summary)
    record = dict(settings or {}, val=val, test=test, z_range=z_range, mask_suv=mask_suv,
                  fwhm_grid_mm=list(fwhm_grid_mm), num_ensemble=num_ensemble, seed=seed,
                  methods=methods, test_volumes=len(test_files), val_volumes=len(val_files),
                  test_subjects=len({d["subject"] for d in test_files}),
                  threads=torch.get_num_threads(),
                  resolved={name: dict(model_path=m.model_path, mode=m.mode, precision=m.precision,
                                       values=m.run.values, sources=m.run.sources,
                                       tuning_table=m.tuning is not None)
                            for name, m in diffusion.items()})
    outputs = {name: os.path.join(out, name) for name in OUTPUT_NAMES}
    write_csv(outputs["per_volume.csv"], rows)
    markdown = summary_markdown(summary, verdict, record,
                                {name: describe_method(m) for name, m in diffusion.items()})
    volumes.atomic_write_bytes(outputs["summary.md"], markdown)
    plot_quality(outputs["quality_vs_drf.png"], summary)
    case, images = example
    vmax = float(np.percentile(case["full"], 99.9)) or 1.0
    save_volume_panels(outputs["example.png"],
                       [("full dose", case["full"], vmax, "gray_r")]
                       + [(m, images[m], vmax, "gray_r") for m in methods],
                       case["voxel_mm"], title=f"{case['name']} (DRF {case['drf']:g})")
    report = finite_or_none(dict(settings=record, gaussian_params=gaussian_params, gaussian_tuning=tuning,
                           summary=summary, quality_bar=verdict,
                           outputs=dict(outputs, gaussian_params=params_path)), key=json_key)
    text = json.dumps(report, indent=2) + "\n"
    volumes.atomic_write_bytes(outputs["summary.json"], text)
    if json_copy:
        volumes.atomic_write_bytes(json_copy, text)
    return markdown, report
