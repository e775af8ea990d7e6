"""Timing of the building blocks: the UNet's forward pass and the PET projector.

UNet (:func:`time_forward`, :func:`unet_rows`): ``model(x_t, t, low_res)`` without gradients on
``(1, 1, S, S, S)`` inputs (the network sees 2 channels), in each of :data:`MODES`: fp32 in the
default layout (the published code's setting), fp32 and bf16 autocast in channels-last 3D.
Efficiency (:func:`forward_efficiency`): a checkpoint's forward on its sampling patch, its
counted FLOPs per second against a large matrix product's in the same precision and run.
Memory (:func:`forward_peak_memory`): one forward of an architecture on a given patch.

Projector (:func:`projector_case`, :data:`PROJECTOR_CASES`): build, forward and back projection
and one OSEM iteration of a preset; ``ecat921_2d`` is compared with skimage's radon / iradon on
the same image and views, ``quadra_3d`` projects one OSEM subset of views and extrapolates the
full-view figures from it (reported as such).
"""

import resource
import statistics
import time

import torch

from .. import fp16_util
from ..script_util import sr_create_model_and_diffusion, sr_model_and_diffusion_defaults

MODES = (("fp32", False), ("fp32", True), ("bf16", True))
"""``(precision, channels_last)`` of the UNet timings; the first is the published setting."""


def model_flags(**overrides):
    """The published sr flags (sr_model_and_diffusion_defaults) with ``overrides``."""
    return dict(sr_model_and_diffusion_defaults(), **overrides)


CONFIGS = {
    "published (128 ch, mult 1,1,2,3,4)": (model_flags(), 32),
    "small (32 ch, mult 1,2,2,4)": (model_flags(num_channels=32, channel_mult="1,2,2,4"), 48),
}
"""``{name: (sr flags, default cube side)}`` of the timed architectures."""
PUBLISHED_UNET = next(name for name in CONFIGS if name.startswith("published"))


def memory_format_name(channels_last):
    return "channels_last_3d" if channels_last else "contiguous"


def time_forward(model, device, precision, channels_last, size, repeats, warmup, seed=0):
    """Median/min wall seconds of ``model(x, t, low_res)`` on ``(1, 1, *shape)`` inputs;
    ``size`` is a cube side or a ``(Z, X, Y)`` shape in voxels."""
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    gen = torch.Generator().manual_seed(seed)
    shape = (size,) * 3 if isinstance(size, int) else tuple(size)
    x, low_res = (torch.randn(1, 1, *shape, generator=gen)
                  .to(device).contiguous(memory_format=memory_format) for _ in range(2))
    t = torch.tensor([500], device=device)
    seconds = []
    with torch.no_grad(), fp16_util.autocast(device, precision):
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(x, t, low_res=low_res)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), min(seconds)


def config_model(config, seed=0):
    """The UNet of the architecture ``config`` (a :data:`CONFIGS` key), weights drawn with ``seed``,
    in eval mode."""
    flags, _ = CONFIGS[config]
    torch.manual_seed(seed)
    return sr_create_model_and_diffusion(**flags)[0].eval()


def unet_rows(config, size, device, repeats, warmup=1, seed=0):
    """One row per :data:`MODES` entry for the architecture ``config`` (a :data:`CONFIGS` key)
    at ``size``^3: ``config``, ``size``, ``params``, ``precision``, ``memory_format``,
    ``median_s``, ``min_s``."""
    model = config_model(config, seed)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for precision, channels_last in MODES:
        median, best = time_forward(model, device, precision, channels_last, size, repeats, warmup, seed)
        rows.append(dict(config=config, size=size, params=params, precision=precision,
                         memory_format=memory_format_name(channels_last), median_s=median, min_s=best))
    return rows


def forward_peak_memory(config, shape_zxy, device, precision, seed=0):
    """Memory of one no-grad forward of the architecture ``config`` (a :data:`CONFIGS` key) on
    ``(1, 1, *shape_zxy)`` in channels-last 3D: ``{"config", "shape_zxy", "precision",
    "seconds", "weights_mb", "peak_rss_mb", "rss_before_mb", "peak_cuda_mb"}`` (CPU: the
    process's peak resident set, so call it in a fresh process; CUDA: peak allocated)."""
    model = config_model(config, seed).to(device=device, memory_format=torch.channels_last_3d)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    x = torch.randn(1, 1, *shape_zxy, generator=torch.Generator().manual_seed(seed))
    x = x.to(device).contiguous(memory_format=torch.channels_last_3d)
    t = torch.tensor([500], device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = peak_rss_mb()
    start = time.perf_counter()
    with torch.inference_mode(), fp16_util.autocast(device, precision):
        model(x, t, low_res=x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return dict(config=config, shape_zxy=list(shape_zxy), precision=precision,
                seconds=time.perf_counter() - start, weights_mb=weights_mb,
                peak_rss_mb=peak_rss_mb(), rss_before_mb=rss_before,
                peak_cuda_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None)


def unet_comparison(rows):
    """The published setting (the first row) against the fastest: ``{"rows", "published_s",
    "fastest", "speedup"}``."""
    published = rows[0]
    fastest = min(rows, key=lambda r: r["median_s"])
    return dict(rows=rows, published_s=published["median_s"], fastest=fastest,
                speedup=published["median_s"] / fastest["median_s"])


def count_flops(fn):
    """Floating-point operations (multiply and add counted apart) of the convolutions and matrix
    products that ``fn()`` runs, by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_gflops(device, precision, n=2048, repeats=5):
    """GFLOP/s of the best of ``repeats`` ``(n, n) @ (n, n)`` products in ``precision``."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device) for _ in range(2))

    def product():
        with fp16_util.autocast(device, precision):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
    product()
    seconds, _ = _timed(product, repeats)
    return 2.0 * n ** 3 / seconds / 1e9


def forward_efficiency(model, shape_zxy, device, precision, repeats=3, warmup=1, seed=0):
    """``model(x, t, low_res)`` on ``(1, 1, *shape_zxy)`` in channels-last 3D against a large
    matrix product, same precision and run: ``{"gflop", "median_s", "gflops", "matmul_gflops",
    "ratio"}`` (GFLOP per forward, its GFLOP/s, the product's, and their ratio)."""
    model = model.eval().to(device)
    x = torch.zeros(1, 1, *shape_zxy, device=device)
    flops = count_flops(lambda: model(x, torch.tensor([500], device=device), low_res=x))
    median, _ = time_forward(model, device, precision, True, shape_zxy, repeats, warmup, seed)
    gflops = flops / median / 1e9
    reference = matmul_gflops(device, precision)
    return dict(gflop=flops / 1e9, median_s=median, gflops=gflops, matmul_gflops=reference,
                ratio=gflops / reference)


OP_CATEGORIES = (
    ("convolution", ("conv",)),
    ("group norm", ("group_norm",)),
    ("SiLU", ("silu",)),
    ("down/up-sampling", ("upsample", "pool", "interpolate")),
    ("concatenation", ("cat",)),
    ("casts and copies", ("copy", "_to", "contiguous", "clone", "empty")),
    ("linear (time embedding)", ("linear", "addmm", "mm")),
    ("elementwise", ("add", "mul", "sub", "div", "fill", "exp", "sin", "cos")),
)
"""``(category, substrings of the aten op name)``: the first match files an op; the rest is
"other"."""


def op_category(name):
    """The :data:`OP_CATEGORIES` category of a profiler op name (``"aten::silu"``), or "other"."""
    op = name.split("::")[-1].lower()
    return next((category for category, keys in OP_CATEGORIES if any(k in op for k in keys)), "other")


def forward_profile(model, shape_zxy, device, precision, repeats=3, warmup=1):
    """Where a forward's time goes: ``model(x, t, low_res)`` on ``(1, 1, *shape_zxy)`` in
    channels-last 3D under torch's profiler, ops' self time summed per :func:`op_category`:
    ``{"total_ms": per forward, "categories": {name: {"ms", "share"}}, "top_ops": [(op, ms)]}``."""
    from torch.profiler import ProfilerActivity, profile

    model = model.eval().to(device=device, memory_format=torch.channels_last_3d)
    x = torch.randn(1, 1, *shape_zxy, device=device).contiguous(memory_format=torch.channels_last_3d)
    t = torch.tensor([500], device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), fp16_util.autocast(device, precision):
        for _ in range(warmup):
            model(x, t, low_res=x)
        with profile(activities=activities) as prof:
            for _ in range(repeats):
                model(x, t, low_res=x)
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    per_op = {}
    for event in prof.key_averages():
        per_op[event.key] = per_op.get(event.key, 0.0) + getattr(event, attribute) / 1e3 / repeats
    total = sum(per_op.values())
    categories = {}
    for op, ms in per_op.items():
        categories[op_category(op)] = categories.get(op_category(op), 0.0) + ms
    top = sorted(per_op.items(), key=lambda item: -item[1])[:10]
    return dict(total_ms=total,
                categories={k: dict(ms=v, share=v / total) for k, v in sorted(categories.items(), key=lambda i: -i[1])},
                top_ops=[(op, ms) for op, ms in top])


# ----------------------------------------------------------------------------- projector


def _timed(fn, repeats):
    """Best wall time (s) of ``repeats`` calls and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def peak_rss_mb():
    """This process's peak resident set (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _projector_row(name, preset, shape, voxel, options, n_subsets, repeats, views_fraction=1, seed=0):
    from ..pet import recon, simulate
    from ..pet.projector import make_projector

    start = time.perf_counter()
    projector = make_projector(preset, shape, voxel, **options)
    n_views_full = projector.sinogram_shape[1]
    if views_fraction > 1:
        projector = projector.subset(0, views_fraction)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    y = projector.forward(x)                        # first call builds (and caches) the system matrix
    build_s = time.perf_counter() - start
    forward_s, y = _timed(lambda: projector.forward(x), repeats)
    back_s, _ = _timed(lambda: projector.adjoint(y), repeats)
    data = simulate.expected_data(x, projector, total_counts=1e6 * shape[2])
    counts = simulate.poisson(data.ybar, seed=seed)
    subsets = n_subsets if views_fraction == 1 else 1
    recon.osem(counts, projector, 1, n_subsets=subsets, scale=data.scale)    # builds subset matrices
    # one OSEM call with one iteration: sensitivity images + one pass over all subsets
    osem_s, _ = _timed(lambda: recon.osem(counts, projector, 1, n_subsets=subsets, scale=data.scale), repeats)
    row = {
        "case": name, "preset": preset, "image_shape": list(shape), "voxel_mm": voxel,
        "options": dict(options), "sinogram_shape": list(projector.sinogram_shape),
        "build_s": round(build_s, 4), "forward_s": round(forward_s, 4), "back_s": round(back_s, 4),
        "osem_1iter_incl_sensitivity_s": round(osem_s, 4), "osem_subsets": n_subsets,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    if views_fraction > 1:
        row.update({
            "views_projected": projector.sinogram_shape[1], "views_total": n_views_full,
            "forward_s_all_views_extrapolated": round(forward_s * views_fraction, 2),
            "back_s_all_views_extrapolated": round(back_s * views_fraction, 2),
            "osem_1iter_incl_sensitivity_s_extrapolated": round(osem_s * views_fraction, 2),
            "note": f"timed on views 0::{views_fraction}; full-view figures extrapolated linearly",
        })
    return row


def _skimage_pair(repeats, seed=0):
    import numpy as np
    from skimage.transform import iradon, radon

    image = np.random.default_rng(seed).random((128, 128))
    theta = np.arange(192) * 180.0 / 192
    out = {}
    for circle in (True, False):
        forward_s, sino = _timed(lambda: radon(image, theta, circle=circle), repeats)
        back_s, _ = _timed(lambda: iradon(sino, theta, filter_name=None, circle=circle, output_size=128), repeats)
        out[f"circle_{circle}"] = {"forward_s": round(forward_s, 4), "back_s": round(back_s, 4),
                                   "sinogram_shape": list(sino.shape)}
    return out


PROJECTOR_CASES = ("ecat921_2d", "demo_3d", "quadra_ssrb", "quadra_3d")


def projector_case(name, threads, repeats, mrd, span, fraction, seed=0):
    """The row of one :data:`PROJECTOR_CASES` entry (run it in a fresh process for its own
    peak memory); ``mrd``, ``span`` and ``fraction`` (views ``0::fraction``) are quadra_3d's."""
    torch.set_num_threads(threads)
    if name == "ecat921_2d":
        row = _projector_row(name, "ecat921_2d", (128, 128, 1), 4.0, {"mode": "2d"}, 8, repeats, seed=seed)
        row["skimage"] = _skimage_pair(repeats, seed)
        ours = row["forward_s"] + row["back_s"]
        row["speedup_vs_skimage"] = {
            key: round((v["forward_s"] + v["back_s"]) / ours, 2) for key, v in row["skimage"].items()}
        return row
    if name == "demo_3d":
        return _projector_row(name, "demo", (32, 32, 16), 4.0, {"mode": "3d", "max_ring_difference": 7}, 8,
                              repeats, seed=seed)
    if name == "quadra_ssrb":
        return _projector_row(name, "quadra", (192, 288, 96), 1.65, {"mode": "ssrb", "cache_bytes": 3 << 30},
                              19, 1, seed=seed)
    if name == "quadra_3d":
        options = {"mode": "3d", "max_ring_difference": mrd, "span": span}
        return _projector_row(name, "quadra", (192, 288, 96), 1.65, options, 19, 1, views_fraction=fraction,
                              seed=seed)
    raise ValueError(f"unknown case {name!r}")
