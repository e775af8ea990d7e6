"""
Speed and scale of the volume denoiser on one volume, with quality where a full dose is known
(guided_diffusion.evaluation.benchmarking).

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
             ``paired:full`` runs only with ``--full_chain``; otherwise it is *estimated* from
             the per-evaluation time of the first ancestral paired mode x the checkpoint's
             steps x patches, and marked so.
``seams``    seam-free (patches blended at every step) vs independent chains stitched at the end,
             for ``--seam_mode``: time and PSNR near slab boundaries vs elsewhere.
``scaling``  strong scaling of ``scripts/test.py`` under ``mpiexec -n 1`` and ``-n 2`` with the
             same total threads (``--threads`` per rank = total / ranks).
``unet``     forward time of an architecture at ``--unet_size``^3 in fp32 (the published
             setting) and the toolkit's faster settings (channels-last, bf16 autocast).

Every other sampling setting resolves as ``scripts/test.py``'s (flag > the checkpoint's tuning
table > its sidecar > the toolkit's default); each mode sets its respacing, L and start, and each
part its stitching, so ``--bc_steps``, ``--bc_start`` and ``--stitch`` are refused here. Every mode runs in its own child process (its own peak memory).
Writes ``--json OUT`` and ``OUT``'s stem + ``_psnr_vs_evaluations.png``; prints markdown tables.
"""

import argparse
import json
import os
import sys

import torch

from guided_diffusion.evaluation import benchmarking, speed
from guided_diffusion.pet import volumes
from guided_diffusion.sampling import arguments
from guided_diffusion.script_util import add_runtime_arguments, runtime_device, set_threads, exit_on_user_error

CHECKPOINTS = os.path.join(benchmarking.REPO, "checkpoint")
PARTS = ("modes", "seams", "scaling", "unet")


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="results JSON (figures beside it)")
    parser.add_argument("--paired", default=os.path.join(CHECKPOINTS, "demo_paired.pt"), help="paired checkpoint")
    parser.add_argument("--prior", default=os.path.join(CHECKPOINTS, "demo_prior.pt"),
                        help="BC-DPM prior checkpoint (bcdpm modes)")
    parser.add_argument("--input", default=None,
                        help=".npz volume (arr_0 = [low, full] for PSNR); needed by modes, seams and scaling")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--modes", nargs="+", default=list(benchmarking.DEFAULT_MODES),
                        help="sampling modes COND:RESPACING[:lL][:start] (see above)")
    parser.add_argument("--full_chain", action="store_true",
                        help=f"also run {benchmarking.FULL_CHAIN_MODE} (every training step) instead of estimating it")
    parser.add_argument("--seam_mode", default="paired:ddim10", help="mode of the seams part")
    parser.add_argument("--scaling_respacing", default="ddim10",
                        help="timestep_respacing of the paired model in the scaling part")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median)")
    parser.add_argument("--mask_suv", type=float, default=0.05, help="body mask: full dose > this SUV")
    parser.add_argument("--unet_config", choices=sorted(speed.CONFIGS), default=speed.PUBLISHED_UNET,
                        help="architecture of the unet part")
    parser.add_argument("--unet_size", type=int, default=32, help="cube side of the unet part")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per child run")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    add_runtime_arguments(parser, seed_help="sampling seed", device=True)
    arguments.add_patching_arguments(parser)
    arguments.add_guidance_arguments(parser)
    arguments.add_acquisition_arguments(parser)
    return parser


def check_args(args, modes):
    benchmarking.check_given(arguments.given_settings(args))
    if args.repeats < 1 or (args.threads is not None and args.threads < 1):
        raise ValueError("--repeats and --threads must be >= 1")
    needs_input = {"modes", "seams", "scaling"} & set(args.parts)
    if needs_input and (args.input is None or not os.path.isfile(args.input)):
        raise FileNotFoundError(f"{args.input}: --input volume needed by the parts {sorted(needs_input)}")
    needs_prior = "modes" in args.parts and any(m["cond"] == "bcdpm" for m in modes)
    for path, needed in ((args.paired, needs_input), (args.prior, needs_prior)):
        if needed and not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: checkpoint not found")


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if args.child:
        benchmarking.child_main(args.child)
        return 0
    modes = [benchmarking.parse_mode(m) for m in args.modes]
    if args.full_chain and benchmarking.FULL_CHAIN_MODE not in args.modes:
        modes.append(benchmarking.parse_mode(benchmarking.FULL_CHAIN_MODE))
    check_args(args, modes)
    device = runtime_device(args)
    threads = args.threads or os.cpu_count() or 1
    base = dict(input=args.input, paired=args.paired, prior=args.prior, repeats=args.repeats,
                threads=threads, device=str(device), precision=args.precision, seed=args.seed,
                mask_suv=args.mask_suv, given=arguments.given_settings(args),
                acquisition=arguments.given_acquisition(args))
    child = [sys.executable, os.path.abspath(__file__), "--json", os.devnull, "--child"]
    results = dict(settings={k: v for k, v in vars(args).items() if k != "child"},
                   machine=dict(cpu_count=os.cpu_count(), load_average=os.getloadavg(),
                                torch=torch.__version__, device=str(device)))
    if "modes" in args.parts:
        results["modes"] = benchmarking.run_modes(base, modes, args.timeout, child, estimate=not args.full_chain)
    if "seams" in args.parts:
        results["seams"] = benchmarking.run_seams(base, args.seam_mode, results.get("modes", []),
                                                  args.timeout, child)
    if "scaling" in args.parts:
        patching = {flag: getattr(args, flag) for flag in ("patch_z", "patch_overlap")}
        results["scaling"] = benchmarking.run_scaling(args.paired, args.input, args.scaling_respacing, threads,
                                                      args.seed, args.precision, patching, args.timeout)
    if "unet" in args.parts:
        set_threads(threads)
        results["unet"] = benchmarking.run_unet(args.unet_config, args.unet_size, device, args.repeats, args.seed)
    measured = results.get("modes", [])
    measured = measured + [r for r in results.get("seams", []) if r not in measured]
    results["figure"] = benchmarking.plot_psnr_vs_evaluations(
        os.path.splitext(args.json)[0] + "_psnr_vs_evaluations.png", measured)
    volumes.atomic_write_bytes(args.json, json.dumps(results, indent=2, default=float) + "\n")
    print(benchmarking.markdown(results))
    return 0


if __name__ == "__main__":
    exit_on_user_error(main, (ValueError, FileNotFoundError, RuntimeError))
