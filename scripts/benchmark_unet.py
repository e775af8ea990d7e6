"""
Benchmark the UNet forward pass (no grad) of the published 3D PET DDPM and a small config.

Input is ``x_t`` and ``low_res`` of shape (B, 1, Z, X, Y) each (the network sees 2
channels). Precisions: fp32 (default layout), fp32 and bf16 autocast in channels-last-3D.
Prints a markdown table; ``--json OUT`` also writes the figures.

    python scripts/benchmark_unet.py --json results/benchmark_unet.json
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch as th


from guided_diffusion import fp16_util
from guided_diffusion.script_util import (
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)

MODES = (("fp32", False), ("fp32", True), ("bf16", True))  # (precision, channels_last)


def model_flags(**overrides):
    """The published sr flags (sr_model_and_diffusion_defaults) with `overrides`."""
    return dict(sr_model_and_diffusion_defaults(), **overrides)


CONFIGS = {
    "published (128 ch, mult 1,1,2,3,4)": (model_flags(), 32),
    "small (32 ch, mult 1,2,2,4)": (model_flags(num_channels=32, channel_mult="1,2,2,4"), 48),
}


def time_forward(model, device, precision, channels_last, size, repeats, warmup):
    """Median/min wall seconds of model(x, t, low_res) on (1, 1, size, size, size) inputs."""
    memory_format = th.channels_last_3d if channels_last else th.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    gen = th.Generator().manual_seed(0)
    x, low_res = (th.randn(1, 1, size, size, size, generator=gen)
                  .to(device).contiguous(memory_format=memory_format) for _ in range(2))
    t = th.tensor([500], device=device)
    seconds = []
    with th.no_grad(), fp16_util.autocast(device, precision):
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(x, t, low_res=low_res)
            if device.type == "cuda":
                th.cuda.synchronize()
            if i >= warmup:
                seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), min(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write results to this JSON file")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per mode")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch intra-op threads (default: all cores)")
    parser.add_argument("--device", default="cuda" if th.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    th.set_num_threads(args.threads)
    device = th.device(args.device)

    rows = []
    for name, (flags, size) in CONFIGS.items():
        th.manual_seed(0)
        model = sr_create_model_and_diffusion(**flags)[0].eval()
        params = sum(p.numel() for p in model.parameters())
        for precision, channels_last in MODES:
            median, best = time_forward(model, device, precision, channels_last, size,
                                        args.repeats, args.warmup)
            rows.append(dict(config=name, input_shape=[1, 2, size, size, size],
                             params=params, precision=precision,
                             memory_format="channels_last_3d" if channels_last else "contiguous",
                             median_s=round(median, 4), min_s=round(best, 4)))
        del model

    header = "| config | input (B,C,Z,X,Y) | params | precision | memory format | median s | min s |"
    print(header)
    print("|" + "---|" * 7)
    for r in rows:
        print(f"| {r['config']} | {tuple(r['input_shape'])} | {r['params']:,} | "
              f"{r['precision']} | {r['memory_format']} | {r['median_s']:.3f} | "
              f"{r['min_s']:.3f} |")
    meta = dict(device=str(device), threads=th.get_num_threads(), cpu_count=os.cpu_count(),
                load_average=os.getloadavg(), torch=th.__version__,
                machine=platform.processor() or platform.machine(),
                repeats=args.repeats, warmup=args.warmup)
    print(f"\n{meta}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=2)


if __name__ == "__main__":
    main()
