"""The BC-DPM paper's 2D evaluation protocol (Shen et al. 2023, section 3.1 and Table 1).

Subcommands
-----------
``make-slices --out DIR --subjects N --seed S [--slices_per_subject K] [--image_size 128]
[--voxel_mm 4.0] [--fwhm_mm 6.0] [--val_subjects 1] [--test_subjects T] [--tracer FDG]``
    High-count 2D slices from procedural whole-body phantoms. Subject ``i`` is the phantom of
    seed ``SeedSequence([S, i])`` on an ``image_size x image_size`` transaxial grid of
    ``voxel_mm`` voxels (the whole body fits when ``image_size * voxel_mm`` >= 400 mm) and
    ``voxel_mm`` slices over 1 m. ``K`` axial slices per subject are drawn stratified over the
    body's axial extent (slices holding >= 10 % of the busiest slice's activity). The high-count
    image is the phantom slice blurred in-plane by a Gaussian of ``--fwhm_mm`` (the scanner
    resolution; 6 mm is the ECAT 921's transaxial resolution near the centre): a noise-free,
    reconstruction-like reference. It plays the role of the paper's full-count clinical images:
    the low-count data are simulated *from it*, so it is exactly the truth of the simulation.
    Subjects are split (seeded permutation) into ``--test_subjects`` (default ``ceil(N / 7)``,
    the paper's 60 : 10 ratio), ``--val_subjects`` (tuning of the baselines) and training.

    Files: ``DIR/slices/sNNNN_zZZZ.npz`` (``arr_0`` = ``(X, Y, 1)`` SUV, the single-volume
    layout that ``image_datasets`` reads in unpaired mode, plus ``affine``), ``train.txt``,
    ``val.txt``, ``test.txt`` (file lists relative to DIR; ``scripts/train.py`` uses
    ``train.txt``) and ``manifest.json`` (``voxel_mm`` read by ``train.py``, parameters, slices).

``evaluate --slices DIR --prior CKPT --out OUTDIR [--counts 1e6 3e5 1e5] [--n_test 20]
[--n_val 4] [--runs 5] [--steps 100] [--lam 0.2] [--l 5 10 15] [--mlem_iters 100]
[--inserter_iters N] [--gf_sigma_vox S] [--bm3d_factors F ...] [--seed 0] [--device cuda]``
    For every count level and slice (test slices, and validation slices for tuning): the
    noise-free sinogram is the ECAT-921-like 2D projection (``ecat921_2d``: 160 radial bins x
    192 views, no attenuation, as the paper states none) of the high-count slice; uniform randoms
    of 20 % of the trues are added; the expected total (trues + randoms) is scaled to the count
    level (1M / 0.3M / 0.1M events per slice) and Poisson noise drawn; 100 MLEM iterations with
    the randoms in the denominator give the low-count image. Methods:

    * ``MLEM (low-count)``: the low-count image itself (not in the paper's table; it anchors the
      gains and shows the count dependence).
    * ``Gaussian``: 2D Gaussian filter, sigma grid-searched per count level for the best mean
      PSNR on the ``--n_val`` validation slices.
    * ``BM3D``: 2D BM3D with its noise sigma grid-searched the same way (grid: multiples of the
      validation images' RMS error inside the body, ``--bm3d_factors``; each BM3D call costs
      about a second on a CPU core, so the grid dominates the baselines' time).
    * ``BC-DPM``: the 2D unconditional prior ``--prior`` (``cond "none"``, ``dims 2``) sampled
      with ``--steps`` respaced DDPM steps; in the last ``l`` steps the bidirectional
      conditioning block (Eq. 10) with ``lambda = --lam``; its Gaussian-filter condition uses the
      tuned Gaussian sigma of that count level (``--gf_sigma_vox`` overrides); its noise
      inserter re-simulates the same acquisition (projector, counts per unit activity, randoms)
      and reconstructs with ``--inserter_iters`` MLEM iterations (default ``--mlem_iters``, the
      paper's P-dagger; fewer are faster and, at the few active steps, change little). The
      result is the mean of ``--runs`` samples (the paper: 5); where the tuned Gaussian image
      exceeds 0.75 x the prior's SUV clip, the output blends to it (as ``scripts/test.py
      --hot_voxels input`` does with the input). The full protocol runs
      ``steps x runs`` UNet evaluations per slice and count level (30,000 for 20 slices): use a
      GPU (``--device cuda``, the default when present); BM3D and the metrics run on the CPU.
    * ``BC-DPM, start from low-count``: the same, but the chain starts at step ``l - 1`` from the
      low-count image diffused to that step (the toolkit's ``--bc_start``), so only the ``l``
      conditioned steps run (``l x runs`` UNet evaluations per slice and count level).

    Metrics on each 2D slice (whole image, UDPET convention applied in 2D):
    ``PSNR = 20 log10(max(ref) / RMSE)`` (``metrics.psnr`` on the ``(X, Y, 1)`` slice) and SSIM
    of both images divided by their own maximum, ``data_range=1``, 7x7 window, computed by
    skimage in 2D (``metrics.ssim`` is 3D and needs >= 3 slices). Denoised images are in SUV;
    BC-DPM's output is mapped back from the prior's model space (values above the
    normalisation's ``clip`` SUV are clipped there).

    Output in OUTDIR: ``table.md`` (the layout of the paper's Table 1: rows = methods, columns =
    PSNR / SSIM per count level, means over the test slices; plus the BC-DPM gain over Gaussian
    next to the paper's), ``table.json`` (means, standard deviations, per-slice values, tuned
    parameters, settings) and ``example.png`` (first test slice: reference, low-count and every
    method at every count level, as the paper's Fig. 3). The gain comparison is also printed.

Training the 2D prior (``scripts/train.py`` trains it; no extra subcommand)::

    python scripts/bcdpm_protocol.py make-slices --out data/bcdpm_slices --subjects 70 --seed 0 \\
        --slices_per_subject 50
    python scripts/train.py --cond none --dims 2 --data_dir data/bcdpm_slices \\
        --log_dir runs/bcdpm_prior2d --patch_size 1 128 128 --image_size 128 \\
        --num_channels 128 --num_res_blocks 2 --attention_resolutions 16,8 \\
        --diffusion_steps 1000 --noise_schedule linear --learn_sigma True \\
        --lr 1e-4 --weight_decay 0.01 --batch_size 8 --random_flip False
    python scripts/bcdpm_protocol.py evaluate --slices data/bcdpm_slices \\
        --prior runs/bcdpm_prior2d/ema_0.9999_NNNNNN.pt --out results/bcdpm_table1

(the paper: AdamW, lr 1e-4, weight decay 0.01, batch 8, T = 1000, linear betas 1e-4 .. 0.02;
3000 training slices from 60 patients, 400 test slices from 10; ``--random_flip False`` because
left-right is not symmetric in the body. ``train.py`` reads ``train.txt`` and the voxel size
from ``manifest.json``; with ``--dims 2`` and a one-slice patch its batches are ``(B, 1, X, Y)``
and it writes the ``.json`` sidecars that ``evaluate`` needs.)
"""

import argparse
import json
import math
import os
import time
from functools import partial

import numpy as np
import torch
from scipy import ndimage
from skimage.metrics import structural_similarity
from tqdm.auto import tqdm


from guided_diffusion.checkpoints import load_model_and_diffusion
from guided_diffusion.evaluation import baselines, metrics
from guided_diffusion.pet import simulate
from guided_diffusion.sampling.guidance import BidirectionalConditioner, PoissonNoiseInserter
from guided_diffusion.sampling.hot_voxels import replace_hot_voxels
from guided_diffusion.normalisation import model_to_suv, resolve_normalisation, suv_to_model
from guided_diffusion.pet.phantoms import make_phantom
from guided_diffusion.pet.projector import make_projector
from guided_diffusion.pet.recon import mlem
from guided_diffusion.pet.volumes import atomic_write, atomic_write_bytes

SCANNER = "ecat921_2d"
RANDOMS_FRACTION = 0.2            # uniform randoms = 20 % of the trues (the paper)
BODY_AXIAL_THRESHOLD = 0.1        # slices with >= 10 % of the busiest slice's activity
MIN_BODY_FOV_MM = 400.0           # a transaxial field of view that holds the body (with arms)
PHANTOM_AXIAL_FOV_MM = 1000.0
BODY_SUV_THRESHOLD = 0.05         # body voxels (for the BM3D sigma grid)
SSIM_WINDOW = 7
GAUSSIAN_SIGMA_GRID_VOX = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
BM3D_SIGMA_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
BCDPM_FROM_LOW = "BC-DPM, start from low-count"
METHODS = ("MLEM (low-count)", "Gaussian", "BM3D", "BC-DPM", BCDPM_FROM_LOW)
SPLITS = ("train", "val", "test")

#: Table 1 of the paper (patient data): method -> count level -> (PSNR dB, SSIM).
PAPER_TABLE1 = {
    "Gaussian": {1e6: (32.9406, 0.9713), 3e5: (31.5443, 0.9611), 1e5: (30.9818, 0.9531)},
    "BM3D": {1e6: (32.0151, 0.9564), 3e5: (31.6693, 0.9527), 1e5: (28.2746, 0.9117)},
    "N2V-PT": {1e6: (34.4333, 0.9767), 3e5: (33.4353, 0.9695), 1e5: (31.0254, 0.9545)},
    "CycleWGAN": {1e6: (35.1976, 0.9821), 3e5: (33.6778, 0.9653), 1e5: (31.6183, 0.9500)},
    "BC-DPM": {1e6: (35.6297, 0.9831), 3e5: (33.9297, 0.9700), 1e5: (32.1648, 0.9621)},
}


def derived_seed(*keys):
    """A 32-bit seed from integer keys (independent streams per subject / level / slice)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def count_label(counts):
    """``1e6 -> "1M"``, ``3e5 -> "0.3M"`` (the paper's column names)."""
    return f"{counts / 1e6:g}M"


# ----------------------------------------------------------------------------- make-slices


def body_slice_indices(activity, n_slices, rng):
    """``n_slices`` axial indices of ``activity`` ``(X, Y, Z)``, stratified over the body.

    The body's extent is the Z range whose slices hold >= 10 % of the busiest slice's activity;
    it is cut into ``n_slices`` equal strata and one slice drawn uniformly in each.
    """
    per_slice = activity.sum(axis=(0, 1))
    inside = np.flatnonzero(per_slice >= BODY_AXIAL_THRESHOLD * per_slice.max())
    low, high = int(inside[0]), int(inside[-1]) + 1
    if high - low < n_slices:
        raise ValueError(f"the body spans {high - low} slices, fewer than the {n_slices} requested")
    edges = np.linspace(low, high, n_slices + 1)
    return [int(min(high - 1, math.floor(a + rng.random() * (b - a)))) for a, b in zip(edges[:-1], edges[1:])]


def high_count_slice(activity_slice, voxel_mm, fwhm_mm):
    """The reference: a 2D phantom slice ``(X, Y)`` blurred in-plane by the scanner resolution."""
    if fwhm_mm == 0:
        return activity_slice.astype(np.float32)
    sigma_vox = fwhm_mm / (2.0 * math.sqrt(2.0 * math.log(2.0))) / voxel_mm
    return ndimage.gaussian_filter(activity_slice.astype(np.float32), sigma_vox, mode="constant")


def split_of_subjects(n_subjects, n_val, n_test, seed):
    """Subject index -> split: a seeded permutation, test first, then validation, then train."""
    if n_val < 0 or n_test < 0 or n_val + n_test > n_subjects:
        raise ValueError(f"{n_val} validation + {n_test} test subjects exceed the {n_subjects} subjects")
    order = np.random.default_rng(derived_seed(seed, 7)).permutation(n_subjects)
    split = {}
    for position, subject in enumerate(order):
        split[int(subject)] = "test" if position < n_test else "val" if position < n_test + n_val else "train"
    return split


def save_slice(path, image, affine):
    """Write ``arr_0`` = ``(X, Y, 1)`` float32 SUV and the 4x4 ``affine`` (atomic)."""
    arrays = {"arr_0": np.asarray(image, dtype=np.float32)[:, :, None], "affine": affine}

    def write(temporary):
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(path, write, ".npz")


def make_slices(out, subjects, seed, slices_per_subject=10, image_size=128, voxel_mm=4.0, fwhm_mm=6.0,
                val_subjects=1, test_subjects=None, tracer="FDG"):
    """Write the slice dataset (see the module docstring) and return its manifest dict."""
    if subjects < 1 or slices_per_subject < 1 or image_size < 8:
        raise ValueError("need subjects >= 1, slices_per_subject >= 1 and image_size >= 8")
    if not (voxel_mm > 0 and fwhm_mm >= 0):
        raise ValueError(f"need voxel_mm > 0 and fwhm_mm >= 0, got {voxel_mm} and {fwhm_mm}")
    fov_mm = image_size * voxel_mm
    if fov_mm < MIN_BODY_FOV_MM:
        raise ValueError(f"image_size * voxel_mm = {fov_mm:g} mm cannot hold a body; "
                         f"need >= {MIN_BODY_FOV_MM:g} mm (e.g. 128 x 4 mm)")
    make_projector(SCANNER, (image_size, image_size, 1), voxel_mm, mode="2d")  # fails early if too wide
    test_subjects = math.ceil(subjects / 7) if test_subjects is None else test_subjects
    split = split_of_subjects(subjects, val_subjects, test_subjects, seed)
    lists = {name: [] for name in SPLITS}
    entries = []
    for index in range(subjects):
        subject_seed = derived_seed(seed, index)
        phantom = make_phantom(subject_seed, voxel_mm=voxel_mm, tracer=tracer,
                               fov_mm=(fov_mm, fov_mm, PHANTOM_AXIAL_FOV_MM))
        rng = np.random.default_rng(derived_seed(seed, index, 1))
        for z in body_slice_indices(phantom.activity, slices_per_subject, rng):
            name = os.path.join("slices", f"s{index:04d}_z{z:03d}.npz")
            affine = phantom.affine.copy()
            affine[:3, 3] += affine[:3, 2] * z  # voxel (i, j, 0) of the slice is voxel (i, j, z)
            save_slice(os.path.join(out, name), high_count_slice(phantom.activity[:, :, z], voxel_mm, fwhm_mm),
                       affine)
            lists[split[index]].append(name)
            entries.append(dict(file=name, subject=index, subject_seed=subject_seed, z=z,
                                z_mm=float(affine[2, 3]), split=split[index]))
    for name, files in lists.items():
        atomic_write_bytes(os.path.join(out, f"{name}.txt"), "".join(f + "\n" for f in files))
    manifest = dict(protocol="bcdpm_2d", seed=seed, subjects=subjects, slices_per_subject=slices_per_subject,
                    image_size=image_size, voxel_mm=voxel_mm, fwhm_mm=fwhm_mm, tracer=tracer,
                    split={name: len(files) for name, files in lists.items()}, slices=entries)
    atomic_write_bytes(os.path.join(out, "manifest.json"), json.dumps(manifest, indent=2) + "\n")
    return manifest


# ----------------------------------------------------------------------------- reading slices


def read_manifest(slices_dir):
    path = os.path.join(slices_dir, "manifest.json")
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a slice dataset from 'make-slices' ({error})") from None
    if manifest.get("protocol") != "bcdpm_2d":
        raise ValueError(f"{path}: not a slice dataset from 'make-slices'")
    return manifest


def load_split(slices_dir, split, limit):
    """``limit`` slices of ``split``, evenly spaced through its list (so they span its subjects):
    ``(names, images (N, X, Y) float32 SUV)``."""
    list_path = os.path.join(slices_dir, f"{split}.txt")
    try:
        with open(list_path, encoding="utf-8") as handle:
            names = [line.strip() for line in handle if line.strip()]
    except OSError as error:
        raise ValueError(f"{list_path}: cannot read the {split} list ({error})") from None
    if not names:
        raise ValueError(f"{list_path}: no {split} slices (make-slices with more subjects)")
    if limit < len(names):
        names = [names[int(i)] for i in np.round(np.linspace(0, len(names) - 1, limit))]
    images = []
    for name in names:
        path = os.path.join(slices_dir, name)
        with np.load(path) as data:
            image = data["arr_0"] if "arr_0" in data else None
        if image is None or image.ndim != 3 or image.shape[2] != 1:
            raise ValueError(f"{path}: expected arr_0 of shape (X, Y, 1)")
        images.append(image[:, :, 0].astype(np.float32))
    return names, np.stack(images)


# ----------------------------------------------------------------------------- acquisition


class Acquisition:
    """The simulated low-count scans of a batch of slices at one count level.

    ``low`` ``(N, X, Y)`` SUV (MLEM), ``scale`` ``(N,)`` counts per unit of projected activity,
    ``randoms`` ``(N, radial, view, 1)`` expected randoms (counts); ``projector`` the 2D projector.
    """

    def __init__(self, references, counts, voxel_mm, mlem_iters, seeds, device):
        size_x, size_y = references.shape[1:]
        self.projector = make_projector(SCANNER, (size_x, size_y, 1), voxel_mm, mode="2d", device=device)
        activity = torch.as_tensor(references, device=device)[..., None]
        data = simulate.expected_data(activity, self.projector, randoms_fraction=RANDOMS_FRACTION,
                                      total_counts=float(counts))
        noisy = torch.stack([simulate.poisson(data.ybar[i], seed) for i, seed in enumerate(seeds)])
        self.scale, self.randoms = data.scale, data.randoms
        self.measured_counts = noisy.sum(dim=(1, 2, 3))
        image = mlem(noisy, self.projector, mlem_iters, additive=data.randoms, scale=data.scale)
        self.low = image[..., 0].cpu().numpy().astype(np.float32)

    def noise_inserter(self, index, normalisation, inserter_iters, generator):
        """``P^+(Po(P x + r))`` of slice ``index``'s acquisition, on model-space tensors."""
        return PoissonNoiseInserter(
            self.projector,
            model_to_activity=lambda x: model_to_suv(x, normalisation),
            activity_to_model=lambda a: suv_to_model(a, normalisation),
            counts_scale=float(self.scale[index]),
            additive=self.randoms[index],
            recon=partial(mlem, n_iter=inserter_iters),
            generator=generator,
        )


# ----------------------------------------------------------------------------- methods and metrics


def slice_quality(reference, image):
    """``(PSNR dB, SSIM)`` of a 2D ``image`` against ``reference`` (UDPET convention, in 2D)."""
    reference = np.asarray(reference, dtype=np.float64)
    image = np.asarray(image, dtype=np.float64)
    psnr = metrics.psnr(reference[:, :, None], image[:, :, None])
    if reference.max() <= 0 or image.max() <= 0:
        raise ValueError("SSIM (UDPET convention) needs images with a positive maximum")
    ssim = structural_similarity(reference / reference.max(), image / image.max(), win_size=SSIM_WINDOW,
                                 data_range=1.0)
    return float(psnr), float(ssim)


def gaussian_2d(image, sigma_vox):
    return baselines.gaussian(image[:, :, None], sigma_vox=(sigma_vox, sigma_vox, 0.0))[:, :, 0]


def bm3d_2d(image, sigma):
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
                  inserter_iters, seed, start_from_low=False):
    """BC-DPM of slice ``index`` of ``acquisition``: mean of ``runs`` samples, ``(X, Y)`` SUV.

    ``start_from_low``: the toolkit's ``--bc_start``: begin at step ``l - 1`` from the low-count
    image diffused to that step, instead of running the ``steps - l`` unconditioned steps from
    pure noise (needs ``steps_l >= 1``).
    """
    device = next(model.parameters()).device
    low = torch.as_tensor(acquisition.low[index], device=device)
    y0 = suv_to_model(low, normalisation).expand(runs, 1, *low.shape).contiguous()
    generator = torch.Generator(device=device).manual_seed(seed)
    hook = BidirectionalConditioner(
        y0, diffusion.alphas_cumprod, num_steps_l=steps_l, lam=lam, gaussian_sigma_vox=gf_sigma_vox,
        noise_inserter=acquisition.noise_inserter(index, normalisation, inserter_iters, generator),
        generator=generator)
    start = dict(noise=None, start_t=None)
    if start_from_low:
        t = torch.full((runs,), steps_l - 1, device=device, dtype=torch.long)
        noise = torch.randn(y0.shape, generator=generator, device=device)
        start = dict(noise=diffusion.q_sample(y0, t, noise=noise), start_t=steps_l - 1)
    with torch.no_grad():
        samples = diffusion.p_sample_loop(model, tuple(y0.shape), clip_denoised=True, device=device,
                                          step_hook=hook, generator=generator, **start)
    return model_to_suv(samples, normalisation).clamp_min(0).mean(dim=0)[0].cpu().numpy()


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


# ----------------------------------------------------------------------------- evaluate


def summarise(values):
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "per_slice": values.tolist()}


def gain_comparison(results, counts):
    """Rows ``(label, ours, ours_from_low, paper)`` of the BC-DPM PSNR gain over Gaussian (as in
    the paper, and started from the low-count image; paper: None if absent)."""
    rows = []
    for level in counts:
        label = count_label(level)
        gaussian = results["Gaussian"][label]["psnr"]["mean"]
        ours, from_low = (results[m][label]["psnr"]["mean"] - gaussian for m in ("BC-DPM", BCDPM_FROM_LOW))
        paper = None
        if level in PAPER_TABLE1["BC-DPM"]:
            paper = PAPER_TABLE1["BC-DPM"][level][0] - PAPER_TABLE1["Gaussian"][level][0]
        rows.append((label, ours, from_low, paper))
    return rows


def markdown_table(results, counts, tuned, n_test):
    labels = [count_label(level) for level in counts]
    lines = [f"PSNR (dB) / SSIM, mean over {n_test} test slices (layout of the BC-DPM paper's Table 1).", "",
             "| Methods | " + " | ".join(f"{label} PSNR | {label} SSIM" for label in labels) + " |",
             "|---|" + "---:|---:|" * len(labels)]
    for method in METHODS:
        cells = [f"{results[method][label]['psnr']['mean']:.4f} | {results[method][label]['ssim']['mean']:.4f}"
                 for label in labels]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "BC-DPM gain over Gaussian (PSNR, dB):", "",
              "| Count level | this toolkit | this toolkit, start from low-count | paper |",
              "|---|---:|---:|---:|"]
    for label, ours, from_low, paper in gain_comparison(results, counts):
        lines.append(f"| {label} | {ours:+.2f} | {from_low:+.2f} | "
                     f"{'n/a' if paper is None else f'{paper:+.2f}'} |")
    lines += ["", "Tuned on the validation slices (best mean PSNR):", ""]
    lines += [f"- {label}: Gaussian sigma {tuned[label]['gaussian_sigma_vox']:g} voxels, "
              f"BM3D sigma {tuned[label]['bm3d_sigma_suv']:.4g} SUV" for label in labels]
    return "\n".join(lines) + "\n"


def save_example(path, reference, examples, counts, quality):
    """Figure: rows = count levels; columns = reference, then every method on the first test slice."""
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
    figure.savefig(path, dpi=100)
    plt.close(figure)


def evaluate(args):
    """Run the protocol (see the module docstring); returns the JSON-able result dict."""
    counts = [float(c) for c in args.counts]
    if len(args.l) != len(counts):
        raise ValueError(f"--l needs one value per count level: {len(args.l)} for {len(counts)} levels")
    if any(c <= 0 for c in counts) or args.runs < 1 or args.steps < 1 or args.mlem_iters < 1:
        raise ValueError("counts, --runs, --steps and --mlem_iters must be positive")
    if args.n_test < 1 or args.n_val < 1 or min(args.bm3d_factors) <= 0:
        raise ValueError("--n_test, --n_val and every --bm3d_factors value must be positive")
    if any(not 1 <= l_value <= args.steps for l_value in args.l):
        raise ValueError(f"every --l must be in [1, --steps={args.steps}], got {args.l}")
    inserter_iters = args.mlem_iters if args.inserter_iters is None else args.inserter_iters
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    manifest = read_manifest(args.slices)
    voxel_mm = float(manifest["voxel_mm"])
    model, diffusion, metadata = load_prior(args.prior, args.steps, device)
    prior_voxel = np.broadcast_to(np.asarray(metadata.get("voxel_mm", voxel_mm), dtype=float), (3,))
    if not np.allclose(prior_voxel[:2], voxel_mm):
        raise ValueError(f"{args.prior}: the prior was trained at {prior_voxel.tolist()} mm voxels, "
                         f"the slices in {args.slices} have {voxel_mm} mm")
    normalisation = metadata["normalisation"]
    clip_suv = resolve_normalisation(normalisation)["clip"]
    test_names, test_ref = load_split(args.slices, "test", args.n_test)
    _, val_ref = load_split(args.slices, "val", args.n_val)

    results = {method: {} for method in METHODS}
    tuned, examples, example_quality, acquisitions = {}, {}, {}, {}
    started = time.time()
    for level_index, (level, steps_l) in enumerate(zip(counts, args.l)):
        label = count_label(level)
        val = Acquisition(val_ref, level, voxel_mm, args.mlem_iters,
                          [derived_seed(args.seed, 1, level_index, i) for i in range(len(val_ref))], device)
        tuned[label] = tune_baselines(val.low, val_ref, args.bm3d_factors)
        gf_sigma = tuned[label]["gaussian_sigma_vox"] if args.gf_sigma_vox is None else args.gf_sigma_vox
        test = Acquisition(test_ref, level, voxel_mm, args.mlem_iters,
                           [derived_seed(args.seed, 2, level_index, i) for i in range(len(test_ref))], device)
        acquisitions[label] = dict(mean_measured_counts=float(test.measured_counts.mean()))
        scores = {method: [] for method in METHODS}
        for index, reference in enumerate(tqdm(test_ref, desc=f"{label} test slices", leave=False)):
            low = test.low[index]
            images = {
                "MLEM (low-count)": low,
                "Gaussian": gaussian_2d(low, tuned[label]["gaussian_sigma_vox"]),
                "BM3D": bm3d_2d(low, tuned[label]["bm3d_sigma_suv"]),
            }
            for method, from_low in (("BC-DPM", False), (BCDPM_FROM_LOW, True)):
                sample = bcdpm_denoise(
                    model, diffusion, normalisation, test, index, steps_l=steps_l, lam=args.lam,
                    gf_sigma_vox=gf_sigma, runs=args.runs, inserter_iters=inserter_iters,
                    seed=derived_seed(args.seed, 3, level_index, index), start_from_low=from_low)
                # above the prior's SUV range: the tuned Gaussian (scripts/test.py's hot passthrough)
                images[method] = replace_hot_voxels(sample, images["Gaussian"], images["Gaussian"],
                                                    clip_suv)
            for method, image in images.items():
                scores[method].append(slice_quality(reference, image))
            if index == 0:
                examples[label] = images
                example_quality[label] = {method: scores[method][0] for method in METHODS}
        for method in METHODS:
            psnr, ssim = zip(*scores[method])
            results[method][label] = {"psnr": summarise(psnr), "ssim": summarise(ssim)}
        print(f"[{time.time() - started:.0f} s] {label}: " + ", ".join(
            f"{method} {results[method][label]['psnr']['mean']:.2f} dB" for method in METHODS), flush=True)

    os.makedirs(args.out, exist_ok=True)
    report = dict(
        results=results, tuned=tuned, acquisitions=acquisitions, test_slices=test_names,
        paper_table1={method: {count_label(c): v for c, v in by_level.items()}
                      for method, by_level in PAPER_TABLE1.items()},
        gain_over_gaussian_db=[dict(counts=label, toolkit=ours, toolkit_start_from_low=from_low, paper=paper)
                               for label, ours, from_low, paper in gain_comparison(results, counts)],
        settings=dict(counts=counts, l=list(args.l), lam=args.lam, steps=args.steps, runs=args.runs,
                      mlem_iters=args.mlem_iters, inserter_iters=inserter_iters, gf_sigma_vox=args.gf_sigma_vox,
                      bm3d_factors=list(args.bm3d_factors),
                      n_test=len(test_ref), n_val=len(val_ref), seed=args.seed, scanner=SCANNER,
                      randoms_fraction=RANDOMS_FRACTION, voxel_mm=voxel_mm, prior=os.path.abspath(args.prior),
                      prior_sha256=metadata["sha256"], slices=os.path.abspath(args.slices), device=str(device),
                      metrics="2D, UDPET convention: PSNR 20 log10(max ref / RMSE); SSIM on images / own max, "
                              "data_range 1, 7x7 window; whole image"),
    )
    atomic_write_bytes(os.path.join(args.out, "table.json"), json.dumps(report, indent=2) + "\n")
    table = markdown_table(results, counts, tuned, len(test_ref))
    atomic_write_bytes(os.path.join(args.out, "table.md"), table)
    save_example(os.path.join(args.out, "example.png"), test_ref[0], examples, counts, example_quality)
    print(table, end="")
    return report


# ----------------------------------------------------------------------------- command line


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-slices", help="high-count 2D slices from phantoms")
    make.add_argument("--out", required=True, help="output directory")
    make.add_argument("--subjects", type=int, required=True, help="number of phantom subjects")
    make.add_argument("--seed", type=int, required=True, help="dataset seed")
    make.add_argument("--slices_per_subject", type=int, default=10)
    make.add_argument("--image_size", type=int, default=128, help="slice size X = Y in voxels")
    make.add_argument("--voxel_mm", type=float, default=4.0, help="voxel size (mm), in-plane and axial")
    make.add_argument("--fwhm_mm", type=float, default=6.0, help="in-plane resolution of the reference (mm)")
    make.add_argument("--val_subjects", type=int, default=1, help="subjects for tuning the baselines")
    make.add_argument("--test_subjects", type=int, default=None, help="test subjects (default ceil(N / 7))")
    make.add_argument("--tracer", default="FDG")

    run = commands.add_parser("evaluate", help="Table 1: Gaussian, BM3D and BC-DPM at each count level")
    run.add_argument("--slices", required=True, help="directory from make-slices")
    run.add_argument("--prior", required=True, help="2D unconditional prior .pt (with its .json sidecar)")
    run.add_argument("--out", required=True, help="output directory (table.md, table.json, example.png)")
    run.add_argument("--counts", type=float, nargs="+", default=[1e6, 3e5, 1e5], help="total events per slice")
    run.add_argument("--n_test", type=int, default=20, help="test slices (evenly spaced through test.txt)")
    run.add_argument("--n_val", type=int, default=4, help="validation slices for tuning the baselines")
    run.add_argument("--runs", type=int, default=5, help="BC-DPM samples averaged per slice")
    run.add_argument("--steps", type=int, default=100, help="respaced sampling steps")
    run.add_argument("--lam", type=float, default=0.2, help="BC-DPM lambda")
    run.add_argument("--l", type=int, nargs="+", default=[5, 10, 15], help="BC-DPM l per count level")
    run.add_argument("--mlem_iters", type=int, default=100, help="MLEM iterations of the low-count images")
    run.add_argument("--inserter_iters", type=int, default=None,
                     help="MLEM iterations in BC-DPM's noise inserter (default: --mlem_iters)")
    run.add_argument("--gf_sigma_vox", type=float, default=None,
                     help="Gaussian-filter condition sigma (voxels; default: the tuned Gaussian sigma)")
    run.add_argument("--bm3d_factors", type=float, nargs="+", default=list(BM3D_SIGMA_FACTORS),
                     help="BM3D sigma grid, in units of the validation images' RMS error in the body")
    run.add_argument("--seed", type=int, default=0, help="seed of the noise and the samplers")
    run.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if args.command == "make-slices":
        manifest = make_slices(args.out, args.subjects, args.seed, args.slices_per_subject, args.image_size,
                               args.voxel_mm, args.fwhm_mm, args.val_subjects, args.test_subjects, args.tracer)
        print(f"wrote {len(manifest['slices'])} slices to {args.out}: {manifest['split']}")
        return manifest
    return evaluate(args)


if __name__ == "__main__":
    main()
