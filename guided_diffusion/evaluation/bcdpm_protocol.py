"""The BC-DPM paper's 2D evaluation (Shen et al. 2023, section 3.1 and Table 1) on a slice
dataset of :mod:`guided_diffusion.pet.slices`.

For every count level and slice (:class:`Acquisition`): the noise-free sinogram is the 2D
projection (:data:`~guided_diffusion.pet.slices.SCANNER`, no attenuation) of the high-count
slice, uniform randoms of :data:`RANDOMS_FRACTION` of the trues are added, the expected total
is scaled to the count level and Poisson noise drawn; MLEM with the randoms in the denominator
gives the low-count image. Methods (:data:`METHODS`): the low-count image itself, a 2D Gaussian
and BM3D (tuned per count level on validation slices, :func:`tune_baselines`), and BC-DPM
(:func:`bcdpm_denoise`, the toolkit's :class:`~guided_diffusion.sampling.guidance.BCDPMFactory`
on a :class:`~guided_diffusion.sampling.guidance.KnownAcquisition`) in two variants: as the
paper states it (Algorithm 2: pure noise, constant lambda, the paper's l) and the toolkit's
improved variant (started from the diffused low-count image, lambda falling to 0 at the last
step, l and lambda tuned per count level on the validation slices, :func:`tune_improved`).
Metrics per slice: :func:`slice_quality`. Output
(:func:`evaluate`): ``table.md`` (:func:`markdown_table`), ``table.json`` and ``example.png``
(:func:`save_example`).
"""

import json
import os
import time

import numpy as np
import torch
from skimage.metrics import structural_similarity
from tqdm.auto import tqdm

from . import baselines, metrics
from .statistics import describe, finite_or_none
from ..checkpoint_hub import portable_paths
from ..checkpoints import load_model_and_diffusion
from ..normalisation import model_to_suv, saturation_suv, suv_to_model
from ..pet import simulate, volumes
from ..pet.projector import make_projector
from ..pet.recon import mlem
from ..pet.slices import SCANNER, derived_seed, load_split, read_manifest
from ..pet.volumes import atomic_write, atomic_write_bytes
from ..sampling.denoiser import diffused_start
from ..sampling.guidance import BCDPMFactory, KnownAcquisition
from ..sampling.hot_voxels import replace_hot_voxels

RANDOMS_FRACTION = 0.2            # uniform randoms = 20 % of the trues (the paper)
BODY_SUV_THRESHOLD = 0.05         # body voxels (for the BM3D sigma grid)
GAUSSIAN_SIGMA_GRID_VOX = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
BM3D_SIGMA_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
BCDPM_PAPER = "BC-DPM (paper, Algorithm 2)"
BCDPM_IMPROVED = "BC-DPM, improved"
METHODS = ("MLEM (low-count)", "Gaussian", "BM3D", BCDPM_PAPER, BCDPM_IMPROVED)
IMPROVED_L_GRID = (2, 4, 8)
IMPROVED_LAM_GRID = (0.0, 0.3, 0.6)
IMPROVED_SIGMA_FACTORS = (1.0, 2.0, 3.0)
METRICS_NOTE = ("2D, UDPET convention: PSNR 20 log10(max ref / RMSE); SSIM on images / own max, "
                "data_range 1, 7x7 window; whole image")

#: Table 1 of the paper (patient data): method -> count level -> (PSNR dB, SSIM).
PAPER_TABLE1 = {
    "Gaussian": {1e6: (32.9406, 0.9713), 3e5: (31.5443, 0.9611), 1e5: (30.9818, 0.9531)},
    "BM3D": {1e6: (32.0151, 0.9564), 3e5: (31.6693, 0.9527), 1e5: (28.2746, 0.9117)},
    "N2V-PT": {1e6: (34.4333, 0.9767), 3e5: (33.4353, 0.9695), 1e5: (31.0254, 0.9545)},
    "CycleWGAN": {1e6: (35.1976, 0.9821), 3e5: (33.6778, 0.9653), 1e5: (31.6183, 0.9500)},
    "BC-DPM": {1e6: (35.6297, 0.9831), 3e5: (33.9297, 0.9700), 1e5: (32.1648, 0.9621)},
}


def count_label(counts):
    """``1e6 -> "1M"``, ``3e5 -> "0.3M"`` (the paper's column names)."""
    return f"{counts / 1e6:g}M"


# ----------------------------------------------------------------------------- acquisition


class Acquisition:
    """The simulated low-count scans of a batch of slices at one count level.

    ``low`` ``(N, X, Y)`` SUV (``mlem_iters`` MLEM iterations), ``scale`` ``(N,)`` counts per
    unit of projected activity, ``randoms`` ``(N, radial, view, 1)`` expected randoms (counts),
    ``measured_counts`` ``(N,)``; ``projector`` the 2D projector; one Poisson seed per slice.
    ``counts``: expected events (trues + randoms) per slice, one for all or one per slice.
    """

    def __init__(self, references, counts, voxel_mm, mlem_iters, seeds, device):
        size_x, size_y = references.shape[1:]
        self.voxel_mm = float(voxel_mm)
        self.projector = make_projector(SCANNER, (size_x, size_y, 1), voxel_mm, mode="2d", device=device)
        activity = torch.as_tensor(references, device=device)[..., None]
        counts = np.broadcast_to(np.asarray(counts, dtype=float), (len(references),))
        groups = [slice(None)] if np.all(counts == counts[0]) else [slice(i, i + 1) for i in range(len(counts))]
        parts = [simulate.expected_data(activity[group], self.projector, randoms_fraction=RANDOMS_FRACTION,
                                        total_counts=float(counts[group][0])) for group in groups]
        ybar = torch.cat([part.ybar for part in parts])
        noisy = torch.stack([simulate.poisson(ybar[i], seed) for i, seed in enumerate(seeds)])
        self.scale = torch.cat([torch.as_tensor(part.scale).reshape(-1) for part in parts])
        self.randoms = torch.cat([part.randoms for part in parts])
        self.measured_counts = noisy.sum(dim=(1, 2, 3))
        image = mlem(noisy, self.projector, mlem_iters, additive=self.randoms, scale=self.scale)
        self.low = image[..., 0].cpu().numpy().astype(np.float32)

    def known(self, index, normalisation):
        """Slice ``index``'s scan as the guidance's acquisition model (BC-DPM's ``N``
        re-simulates exactly this projector, scale and randoms)."""
        return KnownAcquisition(self.projector, float(self.scale[index]), self.randoms[index],
                                normalisation=normalisation, voxel_mm=self.voxel_mm)


# ----------------------------------------------------------------------------- methods and metrics


def slice_quality(reference, image):
    """``(PSNR dB, SSIM)`` of a 2D ``image`` against ``reference`` (UDPET convention, in 2D:
    ``metrics.ssim`` is 3D and needs >= 3 slices, so SSIM is skimage's 2D one)."""
    reference = np.asarray(reference, dtype=np.float64)
    image = np.asarray(image, dtype=np.float64)
    psnr = metrics.psnr(reference[:, :, None], image[:, :, None])
    if reference.max() <= 0 or image.max() <= 0:
        raise ValueError("SSIM (UDPET convention) needs images with a positive maximum")
    ssim = structural_similarity(reference / reference.max(), image / image.max(),
                                 win_size=metrics.SSIM_WIN_SIZE, data_range=1.0)
    return float(psnr), float(ssim)


def gaussian_2d(image, sigma_vox):
    """The 2D Gaussian baseline (in-plane ``sigma_vox``) of an ``(X, Y)`` image."""
    return baselines.gaussian(image[:, :, None], sigma_vox=(sigma_vox, sigma_vox, 0.0))[:, :, 0]


def bm3d_2d(image, sigma):
    """2D BM3D with noise standard deviation ``sigma`` (SUV) of an ``(X, Y)`` image."""
    return baselines.bm3d(image[:, :, None], sigma)[:, :, 0]


def tune_baselines(val_low, val_ref, bm3d_factors=BM3D_SIGMA_FACTORS):
    """Best Gaussian sigma (voxels) and BM3D sigma (SUV) for mean PSNR on validation pairs.

    Gaussian grid: :data:`GAUSSIAN_SIGMA_GRID_VOX`; BM3D grid: ``bm3d_factors`` times the RMS
    error of the validation images inside the body (reference above 5 % of its maximum).
    """
    noisy = [image[:, :, None] for image in val_low]
    reference = [image[:, :, None] for image in val_ref]
    gaussian, _ = baselines.tune("gaussian", noisy, reference,
                                 [{"sigma_vox": (s, s, 0.0)} for s in GAUSSIAN_SIGMA_GRID_VOX])
    body = val_ref > BODY_SUV_THRESHOLD * val_ref.max()
    noise_sd = float(np.sqrt(np.mean((val_low - val_ref)[body] ** 2)))
    bm3d, _ = baselines.tune("bm3d", noisy, reference, [{"sigma": f * noise_sd} for f in bm3d_factors])
    return {"gaussian_sigma_vox": float(gaussian["sigma_vox"][0]), "bm3d_sigma_suv": float(bm3d["sigma"])}


def bcdpm_denoise(model, diffusion, normalisation, acquisition, index, *, steps_l, lam, gf_sigma_vox, runs,
                  inserter_iters, seed, start_from_low=False, lam_schedule="constant"):
    """BC-DPM of slice ``index`` of ``acquisition``: mean of ``runs`` samples, ``(X, Y)`` SUV.

    The ``runs`` samples are one batch; the hook is :class:`BCDPMFactory`'s (``l = steps_l``,
    Gaussian-filter sigma ``gf_sigma_vox`` voxels, ``P^+`` = ``inserter_iters`` MLEM
    iterations, ``lam_schedule`` over the l steps). ``start_from_low``: the toolkit's
    ``--bc_start``: begin at step ``l - 1`` from the low-count image diffused to that step
    (:func:`diffused_start`), instead of running the ``steps - l`` unconditioned steps from
    pure noise.
    """
    device = next(model.parameters()).device
    low = torch.as_tensor(acquisition.low[index], device=device)
    y0 = suv_to_model(low, normalisation).expand(runs, 1, *low.shape).contiguous()
    generator = torch.Generator(device=device).manual_seed(seed)
    factory = BCDPMFactory(acquisition.known(index, normalisation), num_steps_l=steps_l, lam=lam,
                           sigma_mm=gf_sigma_vox * acquisition.voxel_mm, recon_iters=inserter_iters,
                           recon_subsets=1, lam_schedule=lam_schedule)
    hook = factory(y0, diffusion, generator)
    start = dict(noise=None, start_t=None)
    if start_from_low:
        noise = torch.randn(y0.shape, generator=generator, device=device)
        start = dict(noise=diffused_start(diffusion, y0, steps_l - 1, noise), start_t=steps_l - 1)
    with torch.no_grad():
        samples = diffusion.p_sample_loop(model, tuple(y0.shape), clip_denoised=True, device=device,
                                          step_hook=hook, generator=generator, **start)
    return model_to_suv(samples, normalisation).clamp_min(0).mean(dim=0)[0].cpu().numpy()


def bcdpm_image(sample, gaussian, clip_suv):
    """BC-DPM's output where the prior represents it, the tuned Gaussian image above 0.75 x
    its saturation SUV (``scripts/test.py``'s hot passthrough)."""
    return replace_hot_voxels(sample, gaussian, gaussian, clip_suv)


def tune_improved(prior, acquisition, references, gaussian_sigma_vox, *, l_grid, lam_grid, runs, inserter_iters,
                  seed, sigma_factors=IMPROVED_SIGMA_FACTORS):
    """The improved variant's best ``(l, lambda, condition sigma)`` for mean PSNR on validation
    slices ``references`` (scanned as ``acquisition``); the Gaussian-filter condition's sigma is
    ``sigma_factors`` times the tuned Gaussian's ``gaussian_sigma_vox`` (a wider condition leaves
    more of the band to the prior and less of the data's noise in the output): ``dict(l, lam,
    sigma_vox, psnr_db, grid)``. ``prior`` is ``(model, diffusion, normalisation)``."""
    model, diffusion, normalisation = prior
    clip_suv = saturation_suv(normalisation)
    grid = []
    for steps_l in l_grid:
        for lam in lam_grid:
            for factor in sigma_factors:
                sigma = float(factor) * gaussian_sigma_vox
                scores = []
                for index, reference in enumerate(references):
                    sample = bcdpm_denoise(model, diffusion, normalisation, acquisition, index, steps_l=steps_l,
                                           lam=lam, gf_sigma_vox=sigma, runs=runs, inserter_iters=inserter_iters,
                                           seed=derived_seed(seed, 4, steps_l, index), start_from_low=True,
                                           lam_schedule="linear")
                    gaussian = gaussian_2d(acquisition.low[index], gaussian_sigma_vox)
                    scores.append(slice_quality(reference, bcdpm_image(sample, gaussian, clip_suv))[0])
                grid.append(dict(l=int(steps_l), lam=float(lam), sigma_vox=sigma, psnr_db=float(np.mean(scores))))
    best = max(grid, key=lambda row: row["psnr_db"])
    return dict(best, grid=grid)


def load_prior(path, steps, device):
    """The 2D unconditional prior with ``steps`` respaced steps; checks it is one."""
    model, diffusion, metadata = load_model_and_diffusion(path, overrides={"timestep_respacing": str(steps)},
                                                          device=device)
    flags = metadata["flags"]
    if metadata["cond"] != "none" or flags.get("dims") != 2 or flags.get("in_channels") != 1:
        raise ValueError(f"{path}: BC-DPM needs an unconditional 2D prior (cond 'none', dims 2, in_channels 1), "
                         f"got cond {metadata['cond']!r}, dims {flags.get('dims')}, "
                         f"in_channels {flags.get('in_channels')}")
    return model, diffusion, metadata


# ----------------------------------------------------------------------------- tables and figures


def gaussian_on_same_slices(results, method, label):
    """The Gaussian's mean PSNR on the test slices ``method`` was scored on (the first ``n``)."""
    same = results[method][label].get("gaussian_psnr_same_slices")
    return (same or results["Gaussian"][label]["psnr"])["mean"]


def gain_comparison(results, counts):
    """Rows ``(label, paper variant, improved, published)`` of the BC-DPM PSNR gain over
    Gaussian (the toolkit's two variants; the paper's published gain, None if absent)."""
    rows = []
    for level in counts:
        label = count_label(level)
        ours, improved = (results[m][label]["psnr"]["mean"] - gaussian_on_same_slices(results, m, label)
                          for m in (BCDPM_PAPER, BCDPM_IMPROVED))
        paper = None
        if level in PAPER_TABLE1["BC-DPM"]:
            paper = PAPER_TABLE1["BC-DPM"][level][0] - PAPER_TABLE1["Gaussian"][level][0]
        rows.append((label, ours, improved, paper))
    return rows


def markdown_table(results, counts, tuned, n_test):
    """Table 1's layout (rows = methods, PSNR / SSIM per count level), the gains, the tuning."""
    labels = [count_label(level) for level in counts]
    lines = [f"PSNR (dB) / SSIM, mean over {n_test} test slices (layout of the BC-DPM paper's Table 1).", "",
             "| Methods | " + " | ".join(f"{label} PSNR | {label} SSIM" for label in labels) + " |",
             "|---|" + "---:|---:|" * len(labels)]
    for method in METHODS:
        cells = [f"{results[method][label]['psnr']['mean']:.4f} | {results[method][label]['ssim']['mean']:.4f}"
                 for label in labels]
        counted = {results[method][label]["psnr"]["n"] for label in labels}
        note = f" (first {max(counted)} test slices)" if max(counted) < n_test else ""
        lines.append(f"| {method}{note} | " + " | ".join(cells) + " |")
    lines += ["", "BC-DPM gain over Gaussian (PSNR, dB, on the slices each variant was scored on):", "",
              "| Count level | toolkit, paper's algorithm | toolkit, improved | published (paper) |",
              "|---|---:|---:|---:|"]
    for label, ours, improved, paper in gain_comparison(results, counts):
        lines.append(f"| {label} | {ours:+.2f} | {improved:+.2f} | "
                     f"{'n/a' if paper is None else f'{paper:+.2f}'} |")
    lines += ["", "Tuned on the validation slices (best mean PSNR):", ""]
    lines += [f"- {label}: Gaussian sigma {tuned[label]['gaussian_sigma_vox']:g} voxels, "
              f"BM3D sigma {tuned[label]['bm3d_sigma_suv']:.4g} SUV, improved BC-DPM l "
              f"{tuned[label]['improved']['l']} lambda {tuned[label]['improved']['lam']:g} condition sigma "
              f"{tuned[label]['improved']['sigma_vox']:g} voxels" for label in labels]
    return "\n".join(lines) + "\n"


def save_example(path, reference, examples, counts, quality):
    """Figure (as the paper's Fig. 3): rows = count levels; columns = reference, then every
    method on the first test slice, with its PSNR. Atomic write."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ("Reference",) + METHODS
    figure, axes = plt.subplots(len(counts), len(columns), figsize=(2.4 * len(columns), 2.6 * len(counts)),
                                squeeze=False)
    vmax = float(reference.max())
    for row, level in enumerate(counts):
        label = count_label(level)
        for column, name in enumerate(columns):
            image = reference if name == "Reference" else examples[label][name]
            axis = axes[row, column]
            axis.imshow(image.T, cmap="gray_r", vmin=0, vmax=vmax)  # rows: y (anterior at the top)
            title = name if name == "Reference" else f"{name}\n{quality[label][name][0]:.2f} dB"
            axis.set_title(f"{label}: {title}" if column == 0 else title, fontsize=8)
            axis.axis("off")
    figure.tight_layout()
    try:
        atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"), ".png")
    finally:
        plt.close(figure)


# ----------------------------------------------------------------------------- slice stacks


def make_stack(slices_dir, out, *, split="test", n_slices=8, hottest_counts=1e6, mlem_iters=100, seed=0,
               device="cpu"):
    """A NIfTI volume of slices scanned slice-wise, for ``scripts/test.py`` with a 2D prior:
    ``n_slices`` slices of ``split`` stacked along Z, slice ``i`` scanned with
    ``hottest_counts x a_i / max a`` expected events (``a``: the slice's activity; randoms 20 %
    of each slice's trues) and reconstructed with ``mlem_iters`` MLEM iterations. Writes
    ``out/low.nii.gz``, ``out/reference.nii.gz`` (``(X, Y, Z)`` SUV) and ``out/stack.json`` (the
    slices and their counts); returns the JSON's record."""
    voxel_mm = float(read_manifest(slices_dir)["voxel_mm"])
    names, references = load_split(slices_dir, split, n_slices)
    activity = references.sum(axis=(1, 2), dtype=np.float64)
    counts = hottest_counts * activity / activity.max()
    scan = Acquisition(references, counts, voxel_mm, mlem_iters,
                       [derived_seed(seed, 6, i) for i in range(len(references))], torch.device(device))
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    os.makedirs(out, exist_ok=True)
    volumes.save_nifti(os.path.join(out, "low.nii.gz"), np.transpose(scan.low, (1, 2, 0)), affine)
    volumes.save_nifti(os.path.join(out, "reference.nii.gz"), np.transpose(references, (1, 2, 0)), affine)
    record = dict(slices=names, counts=counts.tolist(), hottest_counts=float(hottest_counts), scanner=SCANNER,
                  randoms_fraction=RANDOMS_FRACTION, mlem_iters=mlem_iters, seed=seed, voxel_mm=voxel_mm,
                  source=portable_paths(os.path.abspath(slices_dir)), split=split)
    atomic_write_bytes(os.path.join(out, "stack.json"), json.dumps(record, indent=2) + "\n")
    return record


# ----------------------------------------------------------------------------- evaluate


def check_settings(counts, steps_l, *, n_test, n_val, runs, steps, mlem_iters, bm3d_factors,
                   improved_l=IMPROVED_L_GRID, improved_lams=IMPROVED_LAM_GRID, paper_n_test=None):
    """ValueError for settings :func:`evaluate` cannot run (before anything is loaded)."""
    if any(not 1 <= value <= steps for value in improved_l) or any(not 0 <= v <= 1 for v in improved_lams):
        raise ValueError(f"every --improved_l must be in [1, --steps={steps}] and every --improved_lams in [0, 1]")
    if len(steps_l) != len(counts):
        raise ValueError(f"--l needs one value per count level: {len(steps_l)} for {len(counts)} levels")
    if any(c <= 0 for c in counts) or runs < 1 or steps < 1 or mlem_iters < 1:
        raise ValueError("counts, --runs, --steps and --mlem_iters must be positive")
    if n_test < 1 or n_val < 1 or min(bm3d_factors) <= 0 or (paper_n_test is not None and paper_n_test < 1):
        raise ValueError("--n_test, --n_val, --paper_n_test and every --bm3d_factors value must be positive")
    if any(not 1 <= value <= steps for value in steps_l):
        raise ValueError(f"every --l must be in [1, --steps={steps}], got {list(steps_l)}")


def load_checked_prior(prior, steps, device, voxel_mm, slices):
    """:func:`load_prior`, and a check that it was trained at the slices' voxel size."""
    model, diffusion, metadata = load_prior(prior, steps, device)
    prior_voxel = np.broadcast_to(np.asarray(metadata.get("voxel_mm", voxel_mm), dtype=float), (3,))
    if not np.allclose(prior_voxel[:2], voxel_mm):
        raise ValueError(f"{prior}: the prior was trained at {prior_voxel.tolist()} mm voxels, "
                         f"the slices in {slices} have {voxel_mm} mm")
    return model, diffusion, metadata


def evaluate(slices, prior, out, *, device, counts=(1e6, 3e5, 1e5), steps_l=(5, 10, 15), n_test=20, n_val=4,
             runs=5, steps=100, lam=0.2, mlem_iters=100, inserter_iters=None, gf_sigma_vox=None,
             bm3d_factors=BM3D_SIGMA_FACTORS, improved_l=IMPROVED_L_GRID, improved_lams=IMPROVED_LAM_GRID,
             improved_sigma_factors=IMPROVED_SIGMA_FACTORS, paper_n_test=None, seed=0, log=print):
    """Run the protocol on the slice dataset ``slices`` with the 2D prior ``prior``; write
    ``table.md``, ``table.json`` and ``example.png`` to ``out`` and return the report (what
    ``table.json`` holds). The arguments are the ``evaluate`` command's flags (``steps_l`` is
    ``--l``; ``paper_n_test``: the paper's variant, ``steps x runs`` evaluations per slice, on
    the first that many test slices only, default all); ``log`` gets one progress line per
    count level, then the table."""
    counts = [float(c) for c in counts]
    steps_l, bm3d_factors = list(steps_l), list(bm3d_factors)
    check_settings(counts, steps_l, n_test=n_test, n_val=n_val, runs=runs, steps=steps, mlem_iters=mlem_iters,
                   bm3d_factors=bm3d_factors, improved_l=improved_l, improved_lams=improved_lams,
                   paper_n_test=paper_n_test)
    inserter_iters = mlem_iters if inserter_iters is None else inserter_iters
    device = torch.device(device)
    voxel_mm = float(read_manifest(slices)["voxel_mm"])
    model, diffusion, metadata = load_checked_prior(prior, steps, device, voxel_mm, slices)
    normalisation = metadata["normalisation"]
    clip_suv = saturation_suv(normalisation)
    test_names, test_ref = load_split(slices, "test", n_test)
    _, val_ref = load_split(slices, "val", n_val)

    results = {method: {} for method in METHODS}
    tuned, examples, example_quality, acquisitions = {}, {}, {}, {}
    started = time.time()
    for level_index, (level, level_l) in enumerate(zip(counts, steps_l)):
        label = count_label(level)
        val = Acquisition(val_ref, level, voxel_mm, mlem_iters,
                          [derived_seed(seed, 1, level_index, i) for i in range(len(val_ref))], device)
        tuned[label] = tune_baselines(val.low, val_ref, bm3d_factors)
        level_sigma = tuned[label]["gaussian_sigma_vox"] if gf_sigma_vox is None else gf_sigma_vox
        tuned[label]["improved"] = improved = tune_improved(
            (model, diffusion, normalisation), val, val_ref, level_sigma, l_grid=improved_l, lam_grid=improved_lams,
            runs=runs, inserter_iters=inserter_iters, seed=derived_seed(seed, 5, level_index),
            sigma_factors=improved_sigma_factors)
        test = Acquisition(test_ref, level, voxel_mm, mlem_iters,
                           [derived_seed(seed, 2, level_index, i) for i in range(len(test_ref))], device)
        acquisitions[label] = dict(mean_measured_counts=float(test.measured_counts.mean()))
        scores = {method: [] for method in METHODS}
        for index, reference in enumerate(tqdm(test_ref, desc=f"{label} test slices", leave=False)):
            low = test.low[index]
            images = {
                "MLEM (low-count)": low,
                "Gaussian": gaussian_2d(low, tuned[label]["gaussian_sigma_vox"]),
                "BM3D": bm3d_2d(low, tuned[label]["bm3d_sigma_suv"]),
            }
            variants = {BCDPM_IMPROVED: dict(steps_l=improved["l"], lam=improved["lam"], start_from_low=True,
                                             lam_schedule="linear", gf_sigma_vox=improved["sigma_vox"])}
            if paper_n_test is None or index < paper_n_test:
                variants[BCDPM_PAPER] = dict(steps_l=level_l, lam=lam, gf_sigma_vox=level_sigma)
            for method, variant in variants.items():
                sample = bcdpm_denoise(model, diffusion, normalisation, test, index,
                                       runs=runs, inserter_iters=inserter_iters,
                                       seed=derived_seed(seed, 3, level_index, index), **variant)
                images[method] = bcdpm_image(sample, images["Gaussian"], clip_suv)
            for method, image in images.items():
                scores[method].append(slice_quality(reference, image))
            if index == 0:
                examples[label] = images
                example_quality[label] = {method: scores[method][0] for method in METHODS}
        for method in METHODS:  # mean, sd (ddof 1) and n over the finite values, and every value
            results[method][label] = {metric: dict(describe(values), per_slice=list(values))
                                      for metric, values in zip(("psnr", "ssim"), zip(*scores[method]))}
            results[method][label]["gaussian_psnr_same_slices"] = describe(
                [value for value, _ in scores["Gaussian"][:len(scores[method])]])
        log(f"[{time.time() - started:.0f} s] {label}: " + ", ".join(
            f"{method} {results[method][label]['psnr']['mean']:.2f} dB" for method in METHODS))

    os.makedirs(out, exist_ok=True)
    report = finite_or_none(dict(
        results=results, tuned=tuned, acquisitions=acquisitions, test_slices=test_names,
        paper_table1={method: {count_label(c): v for c, v in by_level.items()}
                      for method, by_level in PAPER_TABLE1.items()},
        gain_over_gaussian_db=[dict(counts=label, toolkit_paper_algorithm=ours, toolkit_improved=improved, paper=paper)
                               for label, ours, improved, paper in gain_comparison(results, counts)],
        settings=dict(counts=counts, l=steps_l, lam=lam, steps=steps, runs=runs, mlem_iters=mlem_iters,
                      paper_n_test=paper_n_test,
                      improved_l=list(improved_l), improved_lams=list(improved_lams),
                      improved_sigma_factors=list(improved_sigma_factors),
                      inserter_iters=inserter_iters, gf_sigma_vox=gf_sigma_vox, bm3d_factors=bm3d_factors,
                      n_test=len(test_ref), n_val=len(val_ref), seed=seed, scanner=SCANNER,
                      randoms_fraction=RANDOMS_FRACTION, voxel_mm=voxel_mm, prior=portable_paths(os.path.abspath(prior)),
                      prior_sha256=metadata["sha256"], slices=portable_paths(os.path.abspath(slices)), device=str(device),
                      metrics=METRICS_NOTE),
    ))
    atomic_write_bytes(os.path.join(out, "table.json"), json.dumps(report, indent=2) + "\n")
    table = markdown_table(results, counts, tuned, len(test_ref))
    atomic_write_bytes(os.path.join(out, "table.md"), table)
    save_example(os.path.join(out, "example.png"), test_ref[0], examples, counts, example_quality)
    log(table.rstrip("\n"))
    return report
