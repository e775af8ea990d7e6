"""
Benchmark the UNet forward pass (no grad) of the published 3D PET DDPM and a small config
(guided_diffusion.evaluation.speed).

Input is ``x_t`` and ``low_res`` of shape (B, 1, Z, X, Y) each (the network sees 2
channels). Precisions: fp32 (default layout), fp32 and bf16 autocast in channels-last-3D.
Prints a markdown table; ``--json OUT`` also writes the figures. With ``--model CKPT``: that
checkpoint's forward on a ``--shape Z X Y`` patch instead, its counted GFLOP/s against a large
matrix product's in the same precision and run (fp32, and bf16 where the device has it
natively; channels-last 3D). With ``--profile`` as well: where that forward's time goes, per op
category (convolutions, group norms, SiLU, casts and copies, ...; torch's profiler).

    python scripts/benchmark_unet.py --json results/benchmark_unet.json
    python scripts/benchmark_unet.py --model checkpoint/demo_paired.pt --shape 16 160 100 --threads 2
    python scripts/benchmark_unet.py --model checkpoint/demo_paired.pt --profile --threads 2
    python scripts/benchmark_unet.py --slab 96 96 96 --threads 2
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform

import torch

from guided_diffusion import fp16_util
from guided_diffusion.checkpoints import load_model_and_diffusion
from guided_diffusion.evaluation import speed
from guided_diffusion.pet import volumes
from guided_diffusion.script_util import add_runtime_arguments, runtime_device, set_threads


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write results to this JSON file")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per mode")
    parser.add_argument("--model", help="checkpoint .pt: measure its forward efficiency instead")
    parser.add_argument("--shape", type=int, nargs=3, default=[16, 160, 100], metavar=("Z", "X", "Y"),
                        help="patch of --model in voxels (default: a demo-volume slab of demo_paired.pt)")
    parser.add_argument("--profile", action="store_true",
                        help="with --model: also its forward's time per op category (torch profiler)")
    parser.add_argument("--slab", type=int, nargs=3, metavar=("Z", "X", "Y"),
                        help="instead: peak memory of the published architecture's forward on this patch "
                             "(96 96 96: a 96-slice slab of its 96 x 96 transaxial patches at 1.65 mm)")
    parser.add_argument("--slab_config", choices=sorted(speed.CONFIGS), default=speed.PUBLISHED_UNET,
                        help="architecture of --slab (default: the published one)")
    add_runtime_arguments(parser, seed_help="seed of the weights and inputs", precision=False, device=True)
    return parser


def main(argv=None):
    parser = create_argparser()
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    set_threads(args.threads)
    device = runtime_device(args)
    if args.profile and not args.model:
        parser.error("--profile needs --model")
    if args.slab:
        rows = slab_memory_rows(args, device)
    elif args.model:
        model = load_model_and_diffusion(args.model, device=device)[0]
        rows = efficiency_rows(args, model, device)
        if args.profile:
            rows += profile_rows(args, model, device)
    else:
        rows = architecture_rows(args, device)
    meta = dict(device=str(device), threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                load_average=os.getloadavg(), torch=torch.__version__,
                machine=platform.processor() or platform.machine(),
                repeats=args.repeats, warmup=args.warmup, seed=args.seed)
    print(f"\n{meta}")
    if args.json:
        volumes.atomic_write_bytes(args.json, json.dumps(dict(meta=meta, results=rows), indent=2))


def efficiency_precisions(device):
    """fp32, and bf16 where the device computes it natively (CUDA, or a CPU with bf16 units;
    elsewhere bf16 is emulated, minutes per large product, and says nothing of the model)."""
    if device.type == "cuda" or fp16_util.cpu_has_fast_bf16():
        return ("fp32", "bf16")
    print("bf16 skipped: this CPU has no native bf16 units")
    return ("fp32",)


def efficiency_rows(args, model, device):
    rows = [dict(model=args.model, shape_zxy=args.shape, precision=precision,
                 **speed.forward_efficiency(model, tuple(args.shape), device, precision, args.repeats,
                                            args.warmup, args.seed))
            for precision in efficiency_precisions(device)]
    print_table(("model", "patch (Z,X,Y)", "precision", "GFLOP", "median s", "GFLOP/s", "matmul GFLOP/s", "ratio"),
                [(r["model"], tuple(r["shape_zxy"]), r["precision"], f"{r['gflop']:.1f}", f"{r['median_s']:.3f}",
                  f"{r['gflops']:.0f}", f"{r['matmul_gflops']:.0f}", f"{r['ratio']:.2f}") for r in rows])
    return rows


def profile_rows(args, model, device):
    rows = []
    for precision in efficiency_precisions(device):
        profile = speed.forward_profile(model, tuple(args.shape), device, precision, args.repeats, args.warmup)
        rows.append(dict(model=args.model, shape_zxy=args.shape, precision=precision, profile=profile))
        print(f"\n{precision}: {profile['total_ms']:.0f} ms of op self time per forward (profiled)")
        print_table(("op category", "ms per forward", "share"),
                    [(name, f"{c['ms']:.0f}", f"{100 * c['share']:.1f} %") for name, c in profile["categories"].items()])
    return rows


def architecture_rows(args, device):
    rows = []
    for name, (_, size) in speed.CONFIGS.items():
        for row in speed.unet_rows(name, size, device, args.repeats, args.warmup, args.seed):
            rows.append(dict(row, input_shape=[1, 2, size, size, size],
                             median_s=round(row["median_s"], 4), min_s=round(row["min_s"], 4)))
    print_table(("config", "input (B,C,Z,X,Y)", "params", "precision", "memory format", "median s", "min s"),
                [(r["config"], tuple(r["input_shape"]), f"{r['params']:,}", r["precision"], r["memory_format"],
                  f"{r['median_s']:.3f}", f"{r['min_s']:.3f}") for r in rows])
    return rows


def slab_memory_rows(args, device):
    """One :func:`speed.forward_peak_memory` row per precision, each from a fresh process."""
    context = multiprocessing.get_context("spawn")
    rows = []
    for precision in efficiency_precisions(device):
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context, initializer=set_threads,
                                                    initargs=(args.threads,)) as pool:
            rows.append(pool.submit(speed.forward_peak_memory, args.slab_config, tuple(args.slab),
                                    device, precision, args.seed).result())
    print_table(("config", "patch (Z,X,Y)", "precision", "s", "weights MB", "RSS before MB", "peak RSS MB",
                 "peak CUDA MB"),
                [(r["config"], tuple(r["shape_zxy"]), r["precision"], f"{r['seconds']:.1f}",
                  f"{r['weights_mb']:.0f}", f"{r['rss_before_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
                  "-" if r["peak_cuda_mb"] is None else f"{r['peak_cuda_mb']:.0f}") for r in rows])
    return rows


def print_table(header, lines):
    """A markdown table on stdout: ``header`` titles, one tuple of cells per line."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for cells in lines:
        print("| " + " | ".join(str(cell) for cell in cells) + " |")


if __name__ == "__main__":
    main()
