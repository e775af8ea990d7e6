"""Speed and scale of the volume denoiser on one volume, with quality where a full dose is known.

Parts (``scripts/benchmark.py`` runs them):

``modes``    per sampling mode (:func:`parse_mode`): network evaluations per volume (steps x
             patches), wall time (median of the repeats), peak memory, PSNR vs the full dose in
             the body, near slab boundaries (:func:`seam_slices`) and elsewhere. The full chain
             of every training step is estimated (:func:`full_chain_estimate`) unless run.
``seams``    seam-free (patches blended at every step) vs independent chains stitched at the
             end, for one paired mode.
``scaling``  strong scaling of ``scripts/test.py`` under ``mpiexec -n 1`` and ``-n 2`` with the
             same total threads (:func:`run_scaling`).
``unet``     forward time of an architecture in every :data:`~.speed.MODES` setting
             (:func:`run_unet`).

Every configuration runs in its own child process (:func:`run_child`), so its peak memory is
that process's own peak resident set (``ru_maxrss`` of ``RUSAGE_SELF`` in the child; on CUDA
also the peak allocated GPU memory). The ``mpiexec`` runs report ``ru_maxrss`` of
``RUSAGE_CHILDREN`` in the parent: the largest peak of any finished descendant so far.
"""

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from ..pet import volumes
from ..sampling.denoiser import member_network_evaluations
from . import metrics, speed
from .cases import body_mask
from .methods import DiffusionMethod
from .figures import save_figure

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONDS = ("paired", "bcdpm", "hybrid")
DEFAULT_MODES = ("paired:100", "paired:ddim25", "paired:ddim10", "bcdpm:100:l10",
                 "bcdpm:100:l10:start", "hybrid:100:l10")
FULL_CHAIN_MODE = "paired:full"
SEAM_HALF_WIDTH = 2
"""Slices on each side of a slab boundary that count as near it."""
RESULT_PREFIX = "RESULT "


def parse_mode(text):
    """``"bcdpm:100:l10:start"`` -> ``dict(name, cond, respacing, bc_steps, bc_start)``:
    ``COND:RESPACING[:lL][:start]`` with ``COND`` in :data:`CONDS`, ``RESPACING`` a
    ``timestep_respacing`` (``full``: every training step), ``lL`` BC-DPM's conditioned last
    ``L`` steps (needed by bcdpm / hybrid) and ``start`` to begin at step ``L`` from the
    diffused low dose."""
    parts = text.split(":")
    cond, respacing, options = parts[0], parts[1] if len(parts) > 1 else "", parts[2:]
    if cond not in CONDS or not respacing:
        raise ValueError(f"mode {text!r}: expected COND:RESPACING[:lL][:start] with COND in "
                         f"{', '.join(CONDS)}")
    bc_steps, bc_start = 0, False
    for option in options:
        if option == "start":
            bc_start = True
        elif option.startswith("l") and option[1:].isdigit():
            bc_steps = int(option[1:])
        else:
            raise ValueError(f"mode {text!r}: unknown option {option!r} (lL or start)")
    if cond != "paired" and bc_steps < 1:
        raise ValueError(f"mode {text!r}: {cond} needs the conditioned steps, e.g. {text}:l10")
    if bc_start and bc_steps < 1:
        raise ValueError(f"mode {text!r}: start needs lL with L >= 1")
    return dict(name=text, cond=cond, respacing="" if respacing == "full" else respacing,
                bc_steps=bc_steps, bc_start=bc_start)


def seam_slices(grid, depth, model_voxel_z, input_voxel_z):
    """Boolean ``(depth,)`` of input slices within :data:`SEAM_HALF_WIDTH` slices of a slab
    boundary of ``grid``.

    A boundary is a patch's first or last slice edge inside the volume (model grid); it is
    mapped to the input grid by the voxel-size ratio (exact when no resampling happens).
    """
    patch_z = grid.patch_shape[0]
    starts = grid.axis_starts[0]
    length = grid.volume_shape[0]
    edges = {s for s in starts if s > 0} | {s + patch_z for s in starts if s + patch_z < length}
    centres = np.arange(depth) + 0.5
    near = np.zeros(depth, dtype=bool)
    for edge in edges:
        near |= np.abs(centres - edge * model_voxel_z / input_voxel_z) <= SEAM_HALF_WIDTH
    return near


# ----------------------------------------------------------------------------- one configuration


MODE_KEYS = ("bc_steps", "bc_start", "stitch")
"""Settings that each mode (and part) fixes; not to be given besides."""


def check_given(given):
    """Raise ValueError naming the flags of :data:`MODE_KEYS` that ``given`` sets."""
    flags = [f"--{key}" for key in MODE_KEYS if given.get(key) is not None]
    if flags:
        raise ValueError(f"{', '.join(flags)}: each mode sets them (COND:RESPACING[:lL][:start])")


def mode_settings(mode, stitch):
    """The resolver's ``given`` settings a mode and a stitching fix."""
    return dict(timestep_respacing=mode["respacing"], stitch=stitch, bc_start=mode["bc_start"],
                bc_steps=mode["bc_steps"] if mode["cond"] != "paired" or mode["bc_start"] else None)


def run_configuration(spec):
    """Denoise ``spec["input"]`` ``spec["repeats"]`` times in this process; returns the figures.

    :param spec: ``input``, ``paired``, ``prior`` (checkpoints), ``mode`` (:func:`parse_mode`),
        ``stitch``, ``given`` (the resolver's given settings), ``acquisition`` (the given
        acquisition), ``precision``, ``device``, ``threads``, ``repeats``, ``seed``,
        ``mask_suv``.
    """
    from ..script_util import set_threads

    set_threads(spec["threads"])
    device = torch.device(spec["device"])
    mode = spec["mode"]
    given = dict(spec["given"], **mode_settings(mode, spec["stitch"]))
    method = DiffusionMethod(spec["prior"] if mode["cond"] == "bcdpm" else spec["paired"], mode["cond"],
                             given, device=device, precision=spec["precision"],
                             acquisition=spec["acquisition"])
    low, affine = volumes.load_volume(spec["input"], index=0)
    denoiser, _ = method.denoiser(low, spec["input"], affine=affine)
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds, result = [], None
    for _ in range(spec["repeats"]):
        begin = time.perf_counter()
        result = denoiser.denoise(low, affine, [spec["seed"]])
        seconds.append(time.perf_counter() - begin)
    mean, _, _, info = result
    member = info["members"][0]
    figures = dict(
        mode=mode["name"], stitch=spec["stitch"], steps_per_patch=member["network_evaluations_per_patch"],
        patches=member["patches"], network_evaluations=member_network_evaluations(member),
        seconds=seconds, median_s=statistics.median(seconds),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        rss_before_sampling_mb=rss_before_kib / 1024.0,
        peak_cuda_mb=(torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None),
        diffusion_steps=int(method.metadata["flags"]["diffusion_steps"]), shape=list(low.shape),
        model_shape_zxy=info["model_shape_zxy"], threads=torch.get_num_threads(),
        precision=method.precision,
    )
    figures["seconds_per_evaluation"] = figures["median_s"] / max(figures["network_evaluations"], 1)
    try:
        full, _ = volumes.load_volume(spec["input"], index=1)
    except ValueError:
        return figures  # no full dose in the file: no PSNR
    body = body_mask(full, spec["mask_suv"])
    peak = float(full[body].max())
    grid = denoiser.grid_for(denoiser.prepare(low, affine))
    near = seam_slices(grid, low.shape[2], float(denoiser.voxel_mm[2]),
                       float(volumes.voxel_sizes(affine)[2]))[None, None, :]
    figures["psnr"] = metrics.psnr(full, mean, mask=body, peak=peak)
    for key, region in (("psnr_near_seams", body & near), ("psnr_elsewhere", body & ~near)):
        figures[key] = metrics.psnr(full, mean, mask=region, peak=peak) if region.any() else None
    figures["seam_slices"] = int(near.sum())
    return figures


def child_main(spec_path):
    """The child process's work: :func:`run_configuration` of the JSON spec file, printed as
    one ``RESULT {...}`` line."""
    with open(spec_path, encoding="utf-8") as handle:
        print(RESULT_PREFIX + json.dumps(run_configuration(json.load(handle))), flush=True)


def run_child(spec, timeout, command):
    """:func:`run_configuration` in a fresh Python process: ``command + [spec file]`` must run
    :func:`child_main` on it (``scripts/benchmark.py --child``)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    try:
        proc = subprocess.run(list(command) + [handle.name], capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)
    finally:
        os.remove(handle.name)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"mode {spec['mode']['name']} ({spec['stitch']}) failed "
                           f"(exit {proc.returncode}): {tail[0]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


# ----------------------------------------------------------------------------- parts


def full_chain_estimate(rows):
    """The full-chain paired mode from the first ancestral paired row's time per evaluation."""
    source = next((r for r in rows if r["mode"].startswith("paired:") and r["stitch"] == "seamfree"
                   and not r["mode"].split(":")[1].startswith("ddim")), None)
    if source is None:
        return None
    evaluations = source["diffusion_steps"] * source["patches"]
    return dict(mode=FULL_CHAIN_MODE, stitch="seamfree", steps_per_patch=source["diffusion_steps"],
                patches=source["patches"], network_evaluations=evaluations,
                median_s=source["seconds_per_evaluation"] * evaluations,
                seconds_per_evaluation=source["seconds_per_evaluation"],
                estimated_from=source["mode"], peak_rss_mb=None, psnr=None)


def run_modes(base, modes, timeout, command, estimate=True):
    """One seam-free row per mode (``base``: the spec without ``mode`` and ``stitch``), and the
    full-chain estimate when ``estimate``."""
    rows = []
    for mode in modes:
        print(f"mode {mode['name']} ...", file=sys.stderr, flush=True)
        rows.append(run_child(dict(base, mode=mode, stitch="seamfree"), timeout, command))
    if estimate:
        row = full_chain_estimate(rows)
        if row is not None:
            rows.append(row)
    return rows


def run_seams(base, seam_mode, mode_rows, timeout, command):
    """Seam-free and independent stitching of the paired mode ``seam_mode`` (text), reusing a
    row of ``mode_rows`` already measured."""
    mode = parse_mode(seam_mode)
    if mode["cond"] != "paired":
        raise ValueError(f"--seam_mode {seam_mode}: independent chains need a paired mode")
    rows = []
    for stitch in ("seamfree", "independent"):
        done = next((r for r in mode_rows if r["mode"] == mode["name"] and r["stitch"] == stitch), None)
        rows.append(done or run_child(dict(base, mode=mode, stitch=stitch), timeout, command))
    return rows


def mpiexec_path():
    """The ``mpiexec`` beside this interpreter (the venv's mpich), else the one on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return local if os.path.exists(local) else shutil.which("mpiexec")


def run_scaling(paired, input_path, respacing, threads, seed, precision, patching, timeout):
    """``scripts/test.py`` under ``mpiexec -n 1`` and ``-n 2`` with ``threads`` in total.

    :param patching: ``{flag: value}`` passed on when not ``None`` (``patch_z``...).
    """
    mpiexec = mpiexec_path()
    if mpiexec is None:
        raise FileNotFoundError("mpiexec not found (scaling part)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="benchmark_scaling_") as scratch:
        for ranks in (1, 2):
            per_rank = max(1, threads // ranks)
            save_dir = os.path.join(scratch, f"n{ranks}")
            command = [mpiexec, "-n", str(ranks), sys.executable, os.path.join(REPO, "scripts", "test.py"),
                       "--model_path", paired, "--base_samples", input_path, "--save_dir", save_dir,
                       "--cond_mode", "paired", "--timestep_respacing", respacing,
                       "--use_ddim", str(respacing.startswith("ddim")),
                       "--threads", str(per_rank), "--seed", str(seed), "--precision", precision]
            for flag, value in patching.items():
                if value is not None:
                    command += [f"--{flag}", str(value)]
            env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
            print(f"scaling: {ranks} rank(s) x {per_rank} thread(s) ...", file=sys.stderr, flush=True)
            begin = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
            wall = time.perf_counter() - begin
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"scripts/test.py under mpiexec -n {ranks} failed: {tail[0]}")
            stem = volumes.stem(input_path)
            with open(os.path.join(save_dir, stem + ".json"), encoding="utf-8") as handle:
                report = json.load(handle)
            descendants_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            member = report["members"][0]
            rows.append(dict(ranks=ranks, threads_per_rank=per_rank, wall_s=wall,
                             denoise_s=report["seconds"], max_rss_descendants_mb=descendants_kib / 1024.0,
                             rank0_box_zxy=member.get("box_zxy"),
                             rank0_halo_voxels_received_per_step=member.get("halo_voxels_received_per_step"),
                             volume_voxels=int(np.prod(report["model_shape_zxy"]))))
    for row in rows:
        row["speedup"] = rows[0]["denoise_s"] / row["denoise_s"]
    return rows


def run_unet(config, size, device, repeats, seed=0):
    """The architecture's forward time at ``size``^3 in every :data:`~.speed.MODES` setting:
    :func:`~.speed.unet_comparison` of :func:`~.speed.unet_rows`."""
    return speed.unet_comparison(speed.unet_rows(config, size, torch.device(device), repeats, 1, seed))


# ----------------------------------------------------------------------------- reporting


def _fmt(value, digits=2):
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(results):
    """The results' tables for people."""
    lines = []
    modes = results.get("modes", [])
    if modes:
        lines += ["| mode | network evals (steps x patches) | median s | s / eval | peak RSS MB | "
                  "PSNR dB | PSNR near seams | PSNR elsewhere |", "|---|---|---|---|---|---|---|---|"]
        for r in modes:
            name = r["mode"] + (f" (estimated from {r['estimated_from']})" if "estimated_from" in r else "")
            lines.append(f"| {name} | {r['network_evaluations']} ({r['steps_per_patch']} x {r['patches']}) | "
                         f"{_fmt(r['median_s'])} | {_fmt(r['seconds_per_evaluation'], 4)} | "
                         f"{_fmt(r['peak_rss_mb'], 0)} | {_fmt(r.get('psnr'))} | "
                         f"{_fmt(r.get('psnr_near_seams'))} | {_fmt(r.get('psnr_elsewhere'))} |")
        lines.append("")
    if results.get("seams"):
        lines += ["| stitching | median s | PSNR near seams (+-2 slices) | PSNR elsewhere |",
                  "|---|---|---|---|"]
        for r in results["seams"]:
            lines.append(f"| {r['stitch']} ({r['mode']}) | {_fmt(r['median_s'])} | "
                         f"{_fmt(r.get('psnr_near_seams'))} | {_fmt(r.get('psnr_elsewhere'))} |")
        lines.append("")
    if results.get("scaling"):
        lines += ["| ranks x threads | scripts/test.py wall s | denoise s | speedup | "
                  "max RSS of descendants so far MB | rank 0 box (Z, X, Y) | "
                  "halo voxels received per step / volume voxels |", "|---|---|---|---|---|---|---|"]
        for r in results["scaling"]:
            lines.append(f"| {r['ranks']} x {r['threads_per_rank']} | {_fmt(r['wall_s'])} | "
                         f"{_fmt(r['denoise_s'])} | {_fmt(r['speedup'])} | "
                         f"{_fmt(r['max_rss_descendants_mb'], 0)} | {r.get('rank0_box_zxy')} | "
                         f"{r.get('rank0_halo_voxels_received_per_step')} / {r.get('volume_voxels')} |")
        lines.append("")
    if results.get("unet"):
        unet = results["unet"]
        lines += ["| UNet forward | precision | memory format | median s | min s |", "|---|---|---|---|---|"]
        for r in unet["rows"]:
            lines.append(f"| {r['config']} at {r['size']}^3 | {r['precision']} | {r['memory_format']} | "
                         f"{_fmt(r['median_s'], 4)} | {_fmt(r['min_s'], 4)} |")
        lines += ["", f"fp32 contiguous (the published code's setting) {unet['published_s']:.4f} s; fastest "
                      f"({unet['fastest']['precision']}, {unet['fastest']['memory_format']}) "
                      f"{unet['fastest']['median_s']:.4f} s: x{unet['speedup']:.2f}", ""]
    return "\n".join(lines)


def plot_psnr_vs_evaluations(path, rows):
    """PSNR against network evaluations per volume, one labelled point per measured mode;
    ``None`` (nothing written) without a PSNR."""
    points = [r for r in rows if r.get("psnr") is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4))
    for r in points:
        axis.scatter(r["network_evaluations"], r["psnr"])
        axis.annotate(f"{r['mode']} ({r['stitch']})", (r["network_evaluations"], r["psnr"]),
                      fontsize=7, xytext=(3, 3), textcoords="offset points")
    axis.set_xscale("log")
    axis.set_xlabel("network evaluations per volume (steps x patches)")
    axis.set_ylabel("PSNR vs full dose in the body (dB)")
    axis.grid(alpha=0.3)
    save_figure(fig, path)
    return path
