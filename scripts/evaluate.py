"""Evaluate denoised PET volumes against full-dose references.

Image quality (NRMSE, PSNR, SSIM; ``--convention udpet`` challenge definitions or ``published``,
the published 3D DDPM's script), and with label volumes the per-organ / per-lesion SUVmax,
SUVmean, TLM biases and lesion CRC / background variability (guided_diffusion.evaluation.metrics).

Every PATH is a volume file (``.npz`` in the published layout, NIfTI), a directory of them, or a
text file listing them. ``--denoised`` may be repeated, one per method (``--method`` names them
in the same order; default: the path's base name). Pairs are matched by file name (extension
removed), else in sorted order when the counts agree; a single reference (or label / mask file)
serves every denoised volume. In a 2-volume ``.npz`` the reference is ``arr_0[--reference_index]``
(default 1, full dose) and the denoised image ``arr_0[--denoised_index]`` (default 0).

The dose reduction factor (DRF) of a denoised volume comes from ``manifest.json`` in its folder
(the ``"drf"`` of the entry naming the file, else a top-level ``"drf"``), else from ``drf(\\d+)``
in its path. Outputs (all optional, written atomically): ``--csv`` per-subject rows, ``--markdown``
mean ± sd per method and DRF, ``--json`` everything (non-finite numbers as null), ``--plot``
PSNR and lesion SUVmean bias vs DRF per method. Exits 2 with a one-line error on bad input.
"""

import argparse
import csv
import io
import json
import math
import os
import re
import sys
import zipfile

import nibabel as nib
import numpy as np


from guided_diffusion.evaluation import metrics
from guided_diffusion.pet import volumes

SCALAR_KEYS = ("rmse", "nrmse", "psnr", "ssim")
SUMMARY_KEYS = ("lesion_suvmean_bias_pct", "lesion_suvmax_bias_pct", "lesion_tlm_bias_pct",
                "lesion_crc", "lesion_bv_den", "organ_suvmean_bias_pct")
DRF_PATTERN = re.compile(r"drf(\d+(?:\.\d+)?)", re.IGNORECASE)


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="full-dose volume(s): file, dir, list")
    parser.add_argument("--denoised", required=True, action="append",
                        help="denoised volume(s); repeat once per method")
    parser.add_argument("--method", action="append", help="method name per --denoised")
    parser.add_argument("--labels", help="organ label volume(s) (int, 0 = background)")
    parser.add_argument("--lesion_labels", help="lesion label volume(s) (k = lesion k)")
    parser.add_argument("--mask", help="body mask volume(s) (non-zero = inside)")
    parser.add_argument("--reference_index", type=int, default=1,
                        help="index into a multi-volume .npz reference (1 = full dose)")
    parser.add_argument("--denoised_index", type=int, default=0,
                        help="index into a multi-volume .npz denoised file")
    parser.add_argument("--voxel_mm", type=float, nargs="+",
                        help="voxel size in mm (1 or 3 values); default: from the file's affine")
    parser.add_argument("--convention", choices=metrics.CONVENTIONS, default="udpet")
    parser.add_argument("--json", help="write all results as JSON")
    parser.add_argument("--csv", help="write one row per subject and method")
    parser.add_argument("--markdown", help="write a mean ± sd summary table")
    parser.add_argument("--plot", help="write PSNR / lesion bias vs DRF plots (PNG)")
    return parser


# ----------------------------------------------------------------------------- inputs


def stack_size(path):
    """Number of volumes stacked in ``path`` (1 for a 3D file), read from the header only."""
    try:
        if path.lower().endswith(".npz"):
            with zipfile.ZipFile(path) as archive, archive.open(volumes.NPZ_KEY + ".npy") as member:
                version = np.lib.format.read_magic(member)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape = read_header(member)[0]
        elif path.lower().endswith((".nii", ".nii.gz")):
            shape = nib.load(path).shape
            shape = (shape[3],) + shape[:3] if len(shape) == 4 else shape
        else:
            return 1
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, nib.filebasedimages.ImageFileError):
        return 1  # unreadable: load_volume reports the problem, naming the file
    return shape[0] if len(shape) == 4 else 1


def read_volume(path, index):
    """``(array (X, Y, Z) float32, voxel_mm)``: ``index`` selects within a stacked file only."""
    try:
        array, affine = volumes.load_volume(path, index=index if stack_size(path) > 1 else 0)
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error}") from error
    return array, tuple(float(v) for v in volumes.voxel_sizes(affine))


def expand(path, what):
    try:
        files = volumes.list_inputs(path)
    except OSError as error:
        raise ValueError(f"cannot list {what} input {path}: {error}") from error
    if not files:
        raise ValueError(f"no {what} volume found in {path}")
    return files


def match(targets, sources, what):
    """For each target file, its source file: by stem, the single source, or sorted order."""
    if len(sources) == 1:
        return [sources[0]] * len(targets)
    by_stem = {volumes.stem(s): s for s in sources}
    if all(volumes.stem(t) in by_stem for t in targets):
        return [by_stem[volumes.stem(t)] for t in targets]
    if len(sources) == len(targets):
        print(f"evaluate.py: note: {what} files paired with volumes in sorted order", file=sys.stderr)
        by_order = dict(zip(sorted(targets), sorted(sources)))
        return [by_order[t] for t in targets]
    unmatched = [t for t in targets if volumes.stem(t) not in by_stem]
    raise ValueError(
        f"cannot pair {len(targets)} volumes with {len(sources)} {what} files "
        f"(no {what} named like {unmatched[0]})"
    )


def find_drf(path):
    """DRF from ``manifest.json`` beside ``path`` or from ``drf<N>`` in the path; None if absent."""
    manifest_path = os.path.join(os.path.dirname(os.path.abspath(path)), "manifest.json")
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path, "r", encoding="utf-8") as stream:
                manifest = json.load(stream)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read {manifest_path}: {error}") from error
        drf = _manifest_drf(manifest, os.path.basename(path))
        if drf is not None:
            return float(drf)
    found = DRF_PATTERN.findall(os.path.abspath(path))
    return float(found[-1]) if found else None


def _manifest_drf(node, file_name, top_level=True):
    if isinstance(node, list):
        return next((d for d in (_manifest_drf(n, file_name, False) for n in node) if d is not None),
                    None)
    if not isinstance(node, dict):
        return None
    names_file = any(isinstance(v, str) and os.path.basename(v) == file_name for v in node.values())
    if "drf" in node and names_file:
        return node["drf"]
    if file_name in node and isinstance(node[file_name], dict) and "drf" in node[file_name]:
        return node[file_name]["drf"]
    for value in node.values():
        drf = _manifest_drf(value, file_name, False)
        if drf is not None:
            return drf
    return node.get("drf") if top_level and isinstance(node.get("drf"), (int, float)) else None


def read_labels(path, shape, what, partner):
    labels, _ = read_volume(path, 0)
    if labels.shape != shape:
        raise ValueError(f"{what} {path} has shape {labels.shape}, {partner} has {shape}")
    if not np.array_equal(labels, np.rint(labels)) or labels.min() < 0:
        raise ValueError(f"{what} {path} must hold non-negative integers")
    return labels.astype(np.int64)


# ----------------------------------------------------------------------------- evaluation


def evaluate(args):
    references = expand(args.reference, "reference")
    methods = args.method or [volumes.stem(os.path.normpath(p)) for p in args.denoised]
    if len(methods) != len(args.denoised):
        raise ValueError(f"{len(methods)} --method names for {len(args.denoised)} --denoised paths")
    label_files = {
        name: dict(zip(references, match(references, expand(path, name), name)))
        for name, path in (("labels", args.labels), ("lesion_labels", args.lesion_labels),
                           ("mask", args.mask)) if path
    }
    records = []
    for method, denoised_path in zip(methods, args.denoised):
        denoised_files = expand(denoised_path, "denoised")
        paired = zip(denoised_files, match(denoised_files, references, "reference"))
        for denoised_file, reference_file in paired:
            records.append(evaluate_one(args, method, reference_file, denoised_file, label_files))
    return records


def evaluate_one(args, method, reference_file, denoised_file, label_files):
    reference, voxel_mm = read_volume(reference_file, args.reference_index)
    denoised, _ = read_volume(denoised_file, args.denoised_index)
    if reference.shape != denoised.shape:
        raise ValueError(f"shape mismatch: {reference_file} {reference.shape} vs "
                         f"{denoised_file} {denoised.shape}")
    if args.voxel_mm:
        voxel_mm = tuple(np.broadcast_to(np.asarray(args.voxel_mm, dtype=float), (3,)))
    extra = {name: read_labels(files[reference_file], reference.shape, name, reference_file)
             for name, files in label_files.items()}
    mask = extra["mask"] > 0 if "mask" in extra else None
    try:
        result = metrics.evaluate_pair(reference, denoised, extra.get("labels"),
                                       extra.get("lesion_labels"), voxel_mm, mask, args.convention)
    except ValueError as error:
        raise ValueError(f"{denoised_file} vs {reference_file}: {error}") from error
    drf = find_drf(denoised_file)
    return {
        "method": method, "subject": volumes.stem(reference_file),
        "drf": drf if drf is not None else find_drf(reference_file),
        "reference": reference_file, "denoised": denoised_file, **result,
    }


# ----------------------------------------------------------------------------- reports


def _groups(records):
    groups = {}
    for record in records:
        groups.setdefault((record["method"], record["drf"]), []).append(record)
    return sorted(groups.items(), key=lambda item: (item[0][0], _drf_order(item[0][1])))


def _drf_order(drf):
    return math.inf if drf is None else drf


def _drf_label(drf):
    if drf is None:
        return "n/a"
    return str(int(drf)) if float(drf).is_integer() else str(drf)


def _mean_sd(values):
    values = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if values.size == 0:
        return math.nan, math.nan
    mean = float(values.mean())
    sd = float(values.std(ddof=1)) if values.size > 1 and math.isfinite(mean) else math.nan
    return mean, sd


def summarise(records):
    """``[{"method", "drf", "n", key: {"mean", "sd"}}]`` per method and DRF."""
    rows = []
    for (method, drf), group in _groups(records):
        row = {"method": method, "drf": drf, "n": len(group)}
        for key in SCALAR_KEYS:
            row[key] = dict(zip(("mean", "sd"), _mean_sd([r[key] for r in group])))
        for key in SUMMARY_KEYS:
            row[key] = dict(zip(("mean", "sd"), _mean_sd([r["summary"][key] for r in group])))
        rows.append(row)
    return rows


def _finite_or_none(value):
    if isinstance(value, dict):
        return {str(k): _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(records, convention):
    payload = {"convention": convention, "summary": summarise(records), "records": records}
    return json.dumps(_finite_or_none(payload), indent=2) + "\n"


def to_csv(records):
    columns = ["method", "subject", "drf", *SCALAR_KEYS, *SUMMARY_KEYS, "reference", "denoised"]
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({key: record.get(key, record["summary"].get(key)) for key in columns})
    return stream.getvalue()


def _format(stat, digits):
    mean, sd = stat["mean"], stat["sd"]
    if math.isnan(mean):
        return "–"
    text = f"{mean:.{digits}f}"
    return text if math.isnan(sd) else f"{text} ± {sd:.{digits}f}"


def to_markdown(records, convention):
    columns = [("psnr", "PSNR (dB)", 2), ("ssim", "SSIM", 4), ("nrmse", "NRMSE", 4),
               ("lesion_suvmean_bias_pct", "lesion SUVmean bias (%)", 1),
               ("lesion_suvmax_bias_pct", "lesion SUVmax bias (%)", 1),
               ("lesion_crc", "lesion CRC", 3),
               ("organ_suvmean_bias_pct", "organ SUVmean bias (%)", 1)]
    lines = [f"Metrics ({convention} convention), mean ± sd over subjects.", "",
             "| method | DRF | n | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for row in summarise(records):
        cells = [_format(row[key], digits) for key, _, digits in columns]
        lines.append(f"| {row['method']} | {_drf_label(row['drf'])} | {row['n']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_png(records):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarise(records)
    drfs = sorted({row["drf"] for row in rows}, key=_drf_order)
    position = {drf: i for i, drf in enumerate(drfs)}
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = [("psnr", "PSNR (dB)"), ("lesion_suvmean_bias_pct", "lesion SUVmean bias (%)")]
    for axis, (key, title) in zip(axes, panels):
        for method in sorted({row["method"] for row in rows}):
            mine = [row for row in rows if row["method"] == method and math.isfinite(row[key]["mean"])]
            if mine:
                axis.errorbar([position[row["drf"]] for row in mine],
                              [row[key]["mean"] for row in mine],
                              yerr=[0.0 if math.isnan(row[key]["sd"]) else row[key]["sd"]
                                    for row in mine],
                              marker="o", capsize=3, label=method)
        axis.set_xticks(range(len(drfs)), [_drf_label(d) for d in drfs])
        axis.set_xlabel("dose reduction factor")
        axis.set_ylabel(title)
        if key.startswith("lesion"):
            axis.axhline(0.0, color="grey", linewidth=0.8)
        if axis.has_data():
            axis.legend()
        else:
            axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def main(argv=None):
    args = create_argparser().parse_args(argv)
    try:
        records = evaluate(args)
        outputs = [(args.json, lambda: to_json(records, args.convention)),
                   (args.csv, lambda: to_csv(records)),
                   (args.markdown, lambda: to_markdown(records, args.convention)),
                   (args.plot, lambda: to_png(records))]
        for path, render in outputs:
            if path:
                volumes.atomic_write_bytes(path, render())
    except (OSError, ValueError) as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 2
    print(to_markdown(records, args.convention), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
