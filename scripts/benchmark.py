"""
Speed and scale of the volume denoiser on one volume, with quality where a full dose is known.

    python scripts/benchmark.py --json results/benchmark/denoiser.json \\
        --input data/demo/s0001/s0001_FDG_drf10.npz --repeats 3

Parts (``--parts``, all by default; each switchable so a subset fits a time budget):

``modes``    per sampling mode: network evaluations per volume (steps x patches), wall time
             (median of ``--repeats``), peak memory, PSNR vs the full dose (when the ``.npz``
             has one) in the body, near slab boundaries (+-2 slices) and elsewhere. A mode is
             ``COND:RESPACING[:lL][:start]``: ``COND`` is ``paired``, ``bcdpm`` (prior + BC-DPM
             block on the last ``L`` steps) or ``hybrid`` (block on the paired model);
             ``RESPACING`` a ``timestep_respacing`` (``100``, ``ddim25``; ``full`` = every
             training step); ``start`` begins at step ``L`` from the diffused low dose.
             ``paired:full`` (1000 steps for the published schedule) is slow: it runs only
             with ``--full_chain``; otherwise it is *estimated* from the per-evaluation time of
             the first ancestral paired mode x the checkpoint's steps x patches, and marked so.
``seams``    seam-free (patches blended at every step) vs independent chains stitched at the end,
             for ``--seam_mode``: time and PSNR near slab boundaries vs elsewhere.
``scaling``  strong scaling of ``scripts/test.py`` under ``mpiexec -n 1`` and ``-n 2`` with the
             same total threads (``--threads`` per rank = total / ranks).
``unet``     forward time of the published architecture at 32^3 (fp32, as published) vs the
             toolkit's fastest setting (channels-last, bf16 autocast), via scripts/benchmark_unet.py.

Every mode runs in its own child process, so its peak memory is that process's own peak
resident set (``ru_maxrss`` of ``RUSAGE_SELF`` in the child; on CUDA also the peak allocated GPU
memory). The ``mpiexec`` runs of ``scaling`` report ``ru_maxrss`` of ``RUSAGE_CHILDREN`` in this
process: the largest peak of any finished descendant so far (cumulative, not per run).
Writes ``--json OUT`` and ``OUT``'s stem + ``_psnr_vs_evaluations.png``; prints markdown tables.
"""

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))

import numpy as np
import torch

from guided_diffusion.sampling.denoiser import (
    VolumeDenoiser,
    is_null_conditioned_prior,
    member_network_evaluations,
    recommended_fusion_kappa,
)
from guided_diffusion.sampling.hot_voxels import DEFAULT_HOT_MODE
from guided_diffusion.evaluation import metrics
from guided_diffusion.pet import dataset_manifest, volumes
from guided_diffusion.sampling.guidance import (
    BC_FACTORY_KEYS, resolve_bc_settings)

import benchmark_unet
from quality_report import (
    bcdpm_factory,
    body_mask,
    load_denoiser,
    sampling_settings,
    with_recommended_slabs,
)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCRIPT = os.path.abspath(__file__)
PARTS = ("modes", "seams", "scaling", "unet")
DEFAULT_MODES = ("paired:100", "paired:ddim25", "paired:ddim10", "bcdpm:100:l10",
                 "bcdpm:100:l10:start", "hybrid:100:l10")
FULL_CHAIN_MODE = "paired:full"
SEAM_HALF_WIDTH = 2  # slices on each side of a slab boundary
RESULT_PREFIX = "RESULT "
DEFAULT_RANDOMS_FRACTION = 0.2  # BC-DPM paper (scripts/test.py --bc_randoms_fraction)
PUBLISHED_UNET = next(name for name in benchmark_unet.CONFIGS if name.startswith("published"))


def parse_mode(text):
    """``"bcdpm:100:l10:start"`` -> dict(cond, respacing, bc_steps, bc_start, name)."""
    parts = text.split(":")
    cond, respacing, options = parts[0], parts[1] if len(parts) > 1 else "", parts[2:]
    if cond not in ("paired", "bcdpm", "hybrid") or not respacing:
        raise ValueError(f"mode {text!r}: expected COND:RESPACING[:lL][:start] with COND in "
                         f"paired, bcdpm, hybrid")
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


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="results JSON (figures beside it)")
    parser.add_argument("--paired", default=os.path.join(REPO, "checkpoint", "demo_paired.pt"),
                        help="paired checkpoint")
    parser.add_argument("--prior", default=os.path.join(REPO, "checkpoint", "demo_prior.pt"),
                        help="unconditional prior checkpoint (bcdpm modes)")
    parser.add_argument("--input", default=None,
                        help=".npz volume (arr_0 = [low, full] for PSNR); needed by modes, "
                             "seams and scaling")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES),
                        help="sampling modes COND:RESPACING[:lL][:start] (see above)")
    parser.add_argument("--full_chain", action="store_true",
                        help=f"also run {FULL_CHAIN_MODE} (every training step) instead of estimating it")
    parser.add_argument("--seam_mode", default="paired:ddim10", help="mode of the seams part")
    parser.add_argument("--scaling_respacing", default="ddim10",
                        help="timestep_respacing of the paired model in the scaling part")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads (scaling: total over the ranks)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="network precision of the denoiser")
    parser.add_argument("--patch_z", type=int, default=None,
                        help="slab depth (model voxels; default: each checkpoint's recommendation)")
    parser.add_argument("--patch_overlap", type=int, default=None,
                        help="patch overlap (voxels; default: each checkpoint's recommendation, else 8)")
    parser.add_argument("--batch_size", type=int, default=1, help="patches per network call")
    parser.add_argument("--mask_suv", type=float, default=0.05, help="body mask: full dose > this SUV")
    parser.add_argument("--bc_lambda", type=float, default=None,
                        help="BC-DPM lambda (default: the prior's tuning table, else 0.2)")
    parser.add_argument("--bc_sigma_mm", type=float, default=None,
                        help="BC-DPM Gaussian sigma in mm (default: the prior's tuning table, else 4)")
    parser.add_argument("--bc_recon_iters", type=int, default=2, help="OSEM iterations of P^+")
    parser.add_argument("--bc_recon_subsets", type=int, default=8, help="OSEM subsets of P^+")
    parser.add_argument("--bc_counts", type=float, default=None,
                        help="low-dose counts when the input has no make_dataset.py manifest")
    parser.add_argument("--bc_scanner", default="quadra",
                        help="scanner preset when the input has no make_dataset.py manifest")
    parser.add_argument("--unet_config", choices=sorted(benchmark_unet.CONFIGS), default=PUBLISHED_UNET,
                        help="architecture of the unet part")
    parser.add_argument("--unet_size", type=int, default=32, help="cube side of the unet part")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per child run")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser


# ----------------------------------------------------------------------------- one configuration


def seam_slices(grid, depth, model_voxel_z, input_voxel_z):
    """Boolean ``(depth,)`` of input slices within +-2 slices of a slab boundary of ``grid``.

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


def acquisition_of(spec):
    """BC-DPM acquisition settings: the input's subject manifest, else --bc_counts/--bc_scanner."""
    description = dataset_manifest.describe_file(spec["input"])
    if description is not None:
        return dataset_manifest.bcdpm_acquisition(description)
    if spec["bc_counts"] is None:
        raise ValueError(f"{spec['input']}: no make_dataset.py manifest beside it; give --bc_counts")
    return dict(scanner=spec["bc_scanner"], mode="2d", total_counts=spec["bc_counts"],
                randoms_fraction=DEFAULT_RANDOMS_FRACTION)


def run_configuration(spec):
    """Denoise ``spec['input']`` ``spec['repeats']`` times in this process; returns the figures."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    mode = spec["mode"]
    model_path = spec["prior"] if mode["cond"] == "bcdpm" else spec["paired"]
    model, diffusion, metadata = load_denoiser(model_path, "none" if mode["cond"] == "bcdpm" else "paired",
                                               mode["respacing"], device)
    start_t = mode["bc_steps"] - 1 if mode["bc_start"] else None
    arguments = with_recommended_slabs(argparse.Namespace(
        patch_z=spec["patch_z"], patch_overlap=spec["patch_overlap"], batch_size=spec["batch_size"],
        precision=spec["precision"], hot_voxels=DEFAULT_HOT_MODE), metadata)
    low, affine = volumes.load_volume(spec["input"], index=0)
    settings = sampling_settings(arguments, mode["respacing"], start_t, spec["stitch"],
                                 null_condition=is_null_conditioned_prior(metadata, mode["cond"]),
                                 fusion_kappa=recommended_fusion_kappa(metadata))
    factory = None
    if mode["cond"] != "paired":
        bc, _ = resolve_bc_settings(
            dict(bc_lambda=spec["bc_lambda"], bc_sigma_mm=spec["bc_sigma_mm"], bc_steps=mode["bc_steps"]),
            metadata.get("sampling", {}).get("bc_tuning"), low)
        settings = dataclasses.replace(settings, hot_voxels=bc["hot_voxels"])
        factory = bcdpm_factory(acquisition_of(spec), metadata,
                                **{key: bc[key] for key in BC_FACTORY_KEYS},
                                recon_iters=spec["bc_recon_iters"], recon_subsets=spec["bc_recon_subsets"])
    denoiser = VolumeDenoiser(model, diffusion, metadata, settings, conditioner_factory=factory)
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds, result = [], None
    for _ in range(spec["repeats"]):
        begin = time.perf_counter()
        result = denoiser.denoise(low, affine, [spec["seed"]])
        seconds.append(time.perf_counter() - begin)
    mean, _, _, info = result
    member = info["members"][0]
    prepared = denoiser.prepare(low, affine)
    figures = dict(
        mode=mode["name"], stitch=spec["stitch"], steps_per_patch=member["network_evaluations_per_patch"],
        patches=member["patches"],
        network_evaluations=member_network_evaluations(member),
        seconds=seconds, median_s=statistics.median(seconds),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        rss_before_sampling_mb=rss_before_kib / 1024.0,
        peak_cuda_mb=(torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None),
        diffusion_steps=int(metadata["flags"]["diffusion_steps"]), shape=list(low.shape),
        model_shape_zxy=info["model_shape_zxy"], threads=torch.get_num_threads(),
    )
    figures["seconds_per_evaluation"] = figures["median_s"] / max(figures["network_evaluations"], 1)
    try:
        full, _ = volumes.load_volume(spec["input"], index=1)
    except ValueError:
        return figures  # no full dose in the file: no PSNR
    body = body_mask(full, spec["mask_suv"])
    peak = float(full[body].max())
    near = seam_slices(denoiser.grid_for(prepared), low.shape[2], float(denoiser.voxel_mm[2]),
                       float(volumes.voxel_sizes(affine)[2]))[None, None, :]
    figures["psnr"] = metrics.psnr(full, mean, mask=body, peak=peak)
    for key, region in (("psnr_near_seams", body & near), ("psnr_elsewhere", body & ~near)):
        figures[key] = metrics.psnr(full, mean, mask=region, peak=peak) if region.any() else None
    figures["seam_slices"] = int(near.sum())
    return figures


def run_child(spec, timeout):
    """:func:`run_configuration` in a fresh Python process (its own peak memory)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    try:
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, SCRIPT, "--json", os.devnull, "--child", handle.name],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    finally:
        os.remove(handle.name)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"mode {spec['mode']['name']} ({spec['stitch']}) failed "
                           f"(exit {proc.returncode}): {tail[0]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


# ----------------------------------------------------------------------------- parts


def base_spec(args):
    return dict(input=args.input, paired=args.paired, prior=args.prior, repeats=args.repeats,
                threads=args.threads, device=args.device, precision=args.precision,
                patch_z=args.patch_z, patch_overlap=args.patch_overlap, batch_size=args.batch_size,
                mask_suv=args.mask_suv, bc_lambda=args.bc_lambda, bc_sigma_mm=args.bc_sigma_mm,
                bc_recon_iters=args.bc_recon_iters, bc_recon_subsets=args.bc_recon_subsets,
                bc_counts=args.bc_counts, bc_scanner=args.bc_scanner, seed=args.seed)


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


def run_modes(args, modes):
    rows = []
    for mode in modes:
        print(f"mode {mode['name']} ...", file=sys.stderr, flush=True)
        rows.append(run_child(dict(base_spec(args), mode=mode, stitch="seamfree"), args.timeout))
    if not args.full_chain:
        estimate = full_chain_estimate(rows)
        if estimate is not None:
            rows.append(estimate)
    return rows


def run_seams(args, mode_rows):
    """Seam-free and independent stitching of ``--seam_mode`` (reusing a seam-free mode row)."""
    mode = parse_mode(args.seam_mode)
    if mode["cond"] != "paired":
        raise ValueError(f"--seam_mode {args.seam_mode}: independent chains need a paired mode")
    rows = []
    for stitch in ("seamfree", "independent"):
        done = next((r for r in mode_rows if r["mode"] == mode["name"] and r["stitch"] == stitch), None)
        rows.append(done or run_child(dict(base_spec(args), mode=mode, stitch=stitch), args.timeout))
    return rows


def mpiexec_path():
    """The ``mpiexec`` beside this interpreter (the venv's mpich), else the one on PATH."""
    import shutil

    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return local if os.path.exists(local) else shutil.which("mpiexec")


def run_scaling(args):
    """``scripts/test.py`` under ``mpiexec -n 1`` and ``-n 2``, same total threads."""
    mpiexec = mpiexec_path()
    if mpiexec is None:
        raise FileNotFoundError("mpiexec not found (scaling part)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="benchmark_scaling_") as scratch:
        for ranks in (1, 2):
            threads = max(1, args.threads // ranks)
            save_dir = os.path.join(scratch, f"n{ranks}")
            command = [mpiexec, "-n", str(ranks), sys.executable, os.path.join(REPO, "scripts", "test.py"),
                       "--model_path", args.paired, "--base_samples", args.input, "--save_dir", save_dir,
                       "--cond_mode", "paired", "--timestep_respacing", args.scaling_respacing,
                       "--use_ddim", str(args.scaling_respacing.startswith("ddim")),
                       "--threads", str(threads), "--seed", str(args.seed), "--precision", args.precision]
            for flag in ("patch_z", "patch_overlap"):
                if getattr(args, flag) is not None:
                    command += [f"--{flag}", str(getattr(args, flag))]
            env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
            env["PYTHONPATH"] = REPO
            print(f"scaling: {ranks} rank(s) x {threads} thread(s) ...", file=sys.stderr, flush=True)
            begin = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO,
                                  timeout=args.timeout)
            wall = time.perf_counter() - begin
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"scripts/test.py under mpiexec -n {ranks} failed: {tail[0]}")
            stem = os.path.splitext(os.path.basename(args.input))[0]
            with open(os.path.join(save_dir, stem + ".json"), encoding="utf-8") as handle:
                report = json.load(handle)
            descendants_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            member = report["members"][0]
            rows.append(dict(ranks=ranks, threads_per_rank=threads, wall_s=wall,
                             denoise_s=report["seconds"], max_rss_descendants_mb=descendants_kib / 1024.0,
                             rank0_box_zxy=member.get("box_zxy"),
                             rank0_halo_voxels_received_per_step=member.get("halo_voxels_received_per_step"),
                             volume_voxels=int(np.prod(report["model_shape_zxy"]))))
    for row in rows:
        row["speedup"] = rows[0]["denoise_s"] / row["denoise_s"]
    return rows


def run_unet(args):
    """The architecture's forward time at ``--unet_size``^3 in every benchmark_unet mode."""
    flags, _ = benchmark_unet.CONFIGS[args.unet_config]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = benchmark_unet.sr_create_model_and_diffusion(**flags)[0].eval()
    device = torch.device(args.device)
    rows = []
    for precision, channels_last in benchmark_unet.MODES:
        median, best = benchmark_unet.time_forward(model, device, precision, channels_last,
                                                   args.unet_size, args.repeats, 1)
        rows.append(dict(config=args.unet_config, size=args.unet_size, precision=precision,
                         memory_format="channels_last_3d" if channels_last else "contiguous",
                         median_s=median, min_s=best))
    published = rows[0]  # fp32, contiguous: the published code's setting
    fastest = min(rows, key=lambda r: r["median_s"])
    return dict(rows=rows, published_s=published["median_s"], fastest=fastest,
                speedup=published["median_s"] / fastest["median_s"])


# ----------------------------------------------------------------------------- reporting


def _fmt(value, digits=2):
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(results):
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
    """PSNR against network evaluations per volume, one labelled point per measured mode."""
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
    fig.tight_layout()
    volumes.atomic_write(path, lambda temporary: fig.savefig(temporary, dpi=100, format="png"), ".png")
    plt.close(fig)
    return path


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if args.child:
        with open(args.child, encoding="utf-8") as handle:
            print(RESULT_PREFIX + json.dumps(run_configuration(json.load(handle))), flush=True)
        return 0
    if args.repeats < 1 or args.threads < 1:
        raise ValueError("--repeats and --threads must be >= 1")
    modes = [parse_mode(m) for m in args.modes]
    if args.full_chain and FULL_CHAIN_MODE not in args.modes:
        modes.append(parse_mode(FULL_CHAIN_MODE))
    needs_input = {"modes", "seams", "scaling"} & set(args.parts)
    if needs_input and (args.input is None or not os.path.isfile(args.input)):
        raise FileNotFoundError(f"{args.input}: --input volume needed by the parts {sorted(needs_input)}")
    for path, needed in ((args.paired, needs_input), (args.prior, any(m["cond"] == "bcdpm" for m in modes)
                                                     and "modes" in args.parts)):
        if needed and not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: checkpoint not found")

    results = dict(settings={k: v for k, v in vars(args).items() if k != "child"},
                   machine=dict(cpu_count=os.cpu_count(), load_average=os.getloadavg(),
                                torch=torch.__version__, device=args.device))
    if "modes" in args.parts:
        results["modes"] = run_modes(args, modes)
    if "seams" in args.parts:
        results["seams"] = run_seams(args, results.get("modes", []))
    if "scaling" in args.parts:
        results["scaling"] = run_scaling(args)
    if "unet" in args.parts:
        results["unet"] = run_unet(args)
    figure = os.path.splitext(args.json)[0] + "_psnr_vs_evaluations.png"
    measured = results.get("modes", [])
    measured = measured + [r for r in results.get("seams", []) if r not in measured]
    results["figure"] = plot_psnr_vs_evaluations(figure, measured)
    volumes.atomic_write_bytes(args.json, json.dumps(results, indent=2, default=float) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
