"""Metrics of denoised PET volume files against their full-dose references, and their reports.

Image quality (NRMSE, PSNR, SSIM; the ``udpet`` challenge definitions or ``published``, the
published 3D DDPM's script), and with label volumes the per-organ / per-lesion SUVmax,
SUVmean, TLM biases and lesion CRC / background variability (:mod:`.metrics`).

Every path is a volume file (``.npz`` in the published layout, NIfTI), a directory of them, or
a text file listing them (:func:`expand`). Denoised files are paired with references by file
name (extension removed), else in sorted order when the counts agree; a single reference (or
label / mask file) serves every denoised volume (:func:`match`). In a stacked file ``index``
selects the volume (:func:`read_volume`). The dose reduction factor (DRF) of a file comes from
``manifest.json`` in its folder, else from ``drf<N>`` in its path (:func:`find_drf`).

:func:`evaluate_files` makes one record per denoised file; :func:`summarise` (mean +- sd per
method and DRF), :func:`to_json`, :func:`to_csv`, :func:`to_markdown`, :func:`to_png` render them.
"""

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

from ..pet import volumes
from . import metrics
from .statistics import finite_or_none, group_summaries

SCALAR_KEYS = ("rmse", "nrmse", "psnr", "ssim")
SUMMARY_KEYS = ("lesion_suvmean_bias_pct", "lesion_suvmax_bias_pct", "lesion_tlm_bias_pct",
                "lesion_crc", "lesion_bv_den", "organ_suvmean_bias_pct")
DRF_PATTERN = re.compile(r"drf(\d+(?:\.\d+)?)", re.IGNORECASE)


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
        print(f"note: {what} files paired with volumes in sorted order", file=sys.stderr)
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


def evaluate_files(reference, denoised, methods=None, *, labels=None, lesion_labels=None, mask=None,
                   reference_index=1, denoised_index=0, voxel_mm=None, convention="udpet"):
    """One record per denoised file: its method, subject, DRF, files and
    :func:`~.metrics.evaluate_pair`'s results.

    :param reference: the full-dose path (file, directory or list).
    :param denoised: the denoised paths, one per method.
    :param methods: their names (default: each path's base name).
    :param labels, lesion_labels, mask: optional organ label / lesion label / body mask paths,
        paired with the references like the denoised files.
    :param reference_index, denoised_index: the volume of a stacked file (``.npz`` ``arr_0[i]``).
    :param voxel_mm: voxel size in mm (1 or 3 values); default: from the reference's affine.
    """
    references = expand(reference, "reference")
    methods = methods or [volumes.stem(os.path.normpath(p)) for p in denoised]
    if len(methods) != len(denoised):
        raise ValueError(f"{len(methods)} --method names for {len(denoised)} --denoised paths")
    label_files = {
        name: dict(zip(references, match(references, expand(path, name), name)))
        for name, path in (("labels", labels), ("lesion_labels", lesion_labels), ("mask", mask)) if path
    }
    options = dict(reference_index=reference_index, denoised_index=denoised_index, voxel_mm=voxel_mm,
                   convention=convention)
    records = []
    for method, denoised_path in zip(methods, denoised):
        denoised_files = expand(denoised_path, "denoised")
        for denoised_file, reference_file in zip(denoised_files, match(denoised_files, references, "reference")):
            records.append(evaluate_one(method, reference_file, denoised_file, label_files, **options))
    return records


def evaluate_one(method, reference_file, denoised_file, label_files, *, reference_index=1,
                 denoised_index=0, voxel_mm=None, convention="udpet"):
    """The record of one denoised file against its reference (see :func:`evaluate_files`);
    ``label_files`` maps ``labels`` / ``lesion_labels`` / ``mask`` to ``{reference: file}``."""
    reference, affine_voxel_mm = read_volume(reference_file, reference_index)
    denoised, _ = read_volume(denoised_file, denoised_index)
    if reference.shape != denoised.shape:
        raise ValueError(f"shape mismatch: {reference_file} {reference.shape} vs "
                         f"{denoised_file} {denoised.shape}")
    if voxel_mm:
        affine_voxel_mm = tuple(np.broadcast_to(np.asarray(voxel_mm, dtype=float), (3,)))
    extra = {name: read_labels(files[reference_file], reference.shape, name, reference_file)
             for name, files in label_files.items()}
    body = extra["mask"] > 0 if "mask" in extra else None
    try:
        result = metrics.evaluate_pair(reference, denoised, extra.get("labels"),
                                       extra.get("lesion_labels"), affine_voxel_mm, body, convention)
    except ValueError as error:
        raise ValueError(f"{denoised_file} vs {reference_file}: {error}") from error
    drf = find_drf(denoised_file)
    return {
        "method": method, "subject": volumes.stem(reference_file),
        "drf": drf if drf is not None else find_drf(reference_file),
        "reference": reference_file, "denoised": denoised_file, **result,
    }


# ----------------------------------------------------------------------------- reports


def _drf_order(drf):
    return math.inf if drf is None else drf


def _drf_label(drf):
    if drf is None:
        return "n/a"
    return str(int(drf)) if float(drf).is_integer() else str(drf)


def summarise(records):
    """``[{"method", "drf", "n", key: {"mean", "sd", "n"}}]`` per method and DRF (sorted by
    method, then DRF, unknown DRFs last), over the finite values of each key."""
    flat = [dict(r["summary"], **r) for r in records]
    groups = group_summaries(flat, ("method", "drf"), SCALAR_KEYS + SUMMARY_KEYS, count_key="n")
    ordered = sorted(groups.items(), key=lambda item: (item[0][0], _drf_order(item[0][1])))
    return [dict(method=method, drf=drf, **entry) for (method, drf), entry in ordered]


def to_json(records, convention):
    payload = {"convention": convention, "summary": summarise(records), "records": records}
    return json.dumps(finite_or_none(payload, key=str), indent=2) + "\n"


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
