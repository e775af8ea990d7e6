"""Is an unconditional prior fit for BC-DPM? Its x0 estimate against a Gaussian filter of x_t.

BC-DPM (Shen et al. 2023) conditions the prior's last ``l`` reverse steps; there the prior's
job is to denoise ``x_t``. :func:`check_prior` diffuses held-out high-count images ``x0`` to
each step ``t`` of the 1000-step chain (``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, in
model space) and scores, in SUV, against ``x0``:

* ``prior``: the model's x0 estimate ``pred_xstart(x_t, t)`` (clipped as the sampler clips it,
  ``diffusion.x0_clip_range``);
* ``gaussian``: ``x_t / sqrt(abar_t)`` (an unbiased noisy ``x0``) Gaussian-filtered with the
  sigma that scores best at that ``t`` on the same images (an oracle-tuned filter, so the bar is
  conservative).

PSNR is the UDPET convention (``20 log10(max ref / RMSE)``) per image, averaged over images. A
prior is *fit* over a range of ``t`` when it beats the filter at every ``t`` checked there
(:func:`fit_over`). Images are model-layout arrays: ``(N, X, Y)`` for a 2D prior,
``(N, Z, X, Y)`` for a 3D one (crops of the prior's training patch size).
"""

import math

import numpy as np
import torch

from ..fp16_util import autocast
from ..normalisation import model_to_suv, suv_to_model
from ..pet import volumes
from ..pet.filters import gaussian_filter
from ..pet.slices import load_split
from . import metrics

#: Steps ``t`` (of 1000) checked by default: dense where BC-DPM conditions (100 respaced steps,
#: ``l`` <= 15: ``t`` <= 150), sparse above.
DEFAULT_STEPS = (1, 2, 5, 10, 20, 40, 70, 100, 150, 200, 300, 500, 700)
#: Gaussian sigmas (voxels) searched per ``t`` for the filter of ``x_t``.
SIGMA_GRID_VOX = (0.0, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6, 8.0)
BODY_SLICE_FRACTION = 0.1


def slice_images(slices_dir, split, limit):
    """``(N, X, Y)`` SUV: ``limit`` slices of a make-slices dataset's ``split`` (2D priors)."""
    return load_split(slices_dir, split, limit)[1]


def volume_crops(paths, patch_zxy, voxel_mm, per_volume=2, index=1):
    """``(N, Z, X, Y)`` SUV crops of the prior's patch size ``patch_zxy`` (3D priors):
    ``per_volume`` axial crops, evenly spaced over each volume's body (the slices holding
    >= 10 % of the busiest slice's activity), centred transaxially; volume ``index`` of each file (1: the full dose of a
    paired ``.npz``). ValueError for a file at another voxel size or smaller than the patch."""
    depth, width, height = (int(v) for v in patch_zxy)
    crops = []
    for path in paths:
        volume, affine = volumes.load_volume(path, index=index)
        spacing = volumes.voxel_sizes(affine)
        if not np.allclose(spacing, voxel_mm, rtol=0.02):
            raise ValueError(f"{path}: voxels {np.round(spacing, 3).tolist()} mm, the prior's are {voxel_mm} mm")
        nx, ny, nz = volume.shape
        if nx < width or ny < height or nz < depth:
            raise ValueError(f"{path}: volume {volume.shape} (X, Y, Z) is smaller than the patch "
                             f"{(width, height, depth)}")
        x0, y0 = (nx - width) // 2, (ny - height) // 2
        per_slice = volume.sum(axis=(0, 1))
        busy = np.flatnonzero(per_slice >= BODY_SLICE_FRACTION * per_slice.max())
        for centre in np.linspace(busy[0], busy[-1], per_volume + 2)[1:-1]:
            z0 = int(np.clip(round(centre) - depth // 2, 0, nz - depth))
            crop = volume[x0:x0 + width, y0:y0 + height, z0:z0 + depth]
            crops.append(np.transpose(crop, (2, 0, 1)))
    return np.stack(crops).astype(np.float32)


def image_psnr(reference_suv, image_suv):
    """Mean over images of the UDPET PSNR (dB) of ``(N, ...)`` SUV arrays."""
    values = []
    for reference, image in zip(reference_suv, image_suv):
        reference = np.asarray(reference, dtype=np.float64)
        image = np.asarray(image, dtype=np.float64)
        if reference.ndim == 2:
            reference, image = reference[:, :, None], image[:, :, None]
        values.append(metrics.psnr(reference, image))
    return float(np.mean(values))


def _filtered(images, sigma_vox, spatial_dims):
    """``images`` ``(N, ...)`` Gaussian-filtered over their last ``spatial_dims`` axes."""
    if sigma_vox == 0:
        return images
    sigma = (0.0,) + (float(sigma_vox),) * spatial_dims
    return gaussian_filter(images, sigma, mode="reflect")


def tuned_gaussian(noisy_model, reference_suv, normalisation, spatial_dims, sigmas=SIGMA_GRID_VOX):
    """``(best PSNR dB, best sigma in voxels)`` of Gaussian filters of ``noisy_model`` (model
    space) mapped to SUV, against ``reference_suv``."""
    best = (-math.inf, None)
    for sigma in sigmas:
        filtered = _filtered(noisy_model, sigma, spatial_dims)
        suv = model_to_suv(torch.as_tensor(filtered), normalisation).clamp_min(0).numpy()
        best = max(best, (image_psnr(reference_suv, suv), float(sigma)), key=lambda pair: pair[0])
    return best


def x0_estimates(model, diffusion, x0, t, noise, precision="fp32", batch_size=8):
    """The model's ``pred_xstart`` at step ``t`` (of ``diffusion``'s steps) from ``x0`` diffused
    with ``noise`` (both ``(N, 1, ...)`` model-space tensors), clipped to
    ``diffusion.x0_clip_range``."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, x0.shape[0], batch_size):
        x_start = x0[start:start + batch_size].to(device)
        steps = torch.full((x_start.shape[0],), int(t), device=device, dtype=torch.long)
        x_t = diffusion.q_sample(x_start, steps, noise=noise[start:start + batch_size].to(device))
        with torch.no_grad(), autocast(device, precision):
            result = diffusion.p_mean_variance(model, x_t, steps, clip_denoised=True)
        out.append(result["pred_xstart"].float().cpu())
    return torch.cat(out)


def check_prior(model, diffusion, images_suv, normalisation, *, steps=DEFAULT_STEPS, seed=0,
                precision="fp32", sigmas=SIGMA_GRID_VOX, batch_size=8, progress=None):
    """Rows ``{t, prior_psnr, gaussian_psnr, gaussian_sigma_vox, margin_db}`` for each ``t`` in
    ``steps`` (``diffusion`` unrespaced, 1000 steps), on ``images_suv`` (``(N, X, Y)`` or
    ``(N, Z, X, Y)`` SUV). One noise draw per image and ``t`` (seeded)."""
    images_suv = np.asarray(images_suv, dtype=np.float32)
    spatial_dims = images_suv.ndim - 1
    x0 = suv_to_model(torch.as_tensor(images_suv), normalisation)[:, None]
    reference = model_to_suv(x0, normalisation).clamp_min(0)[:, 0].numpy()  # what the model space holds
    rows = []
    for index, t in enumerate(steps):
        if not 0 <= int(t) < diffusion.num_timesteps:
            raise ValueError(f"step t={t} is outside the prior's {diffusion.num_timesteps} steps")
        generator = torch.Generator().manual_seed(int(seed) * 1000 + index)
        noise = torch.randn(x0.shape, generator=generator)
        estimate = x0_estimates(model, diffusion, x0, t, noise, precision, batch_size)
        prior_suv = model_to_suv(estimate, normalisation).clamp_min(0)[:, 0].numpy()
        abar = float(diffusion.alphas_cumprod[int(t)])
        unbiased = ((math.sqrt(abar) * x0 + math.sqrt(1.0 - abar) * noise) / math.sqrt(abar))[:, 0].numpy()
        gaussian_psnr, sigma = tuned_gaussian(unbiased, reference, normalisation, spatial_dims, sigmas)
        prior_psnr = image_psnr(reference, prior_suv)
        rows.append(dict(t=int(t), prior_psnr=prior_psnr, gaussian_psnr=gaussian_psnr, gaussian_sigma_vox=sigma,
                         margin_db=prior_psnr - gaussian_psnr))
        if progress is not None:
            progress(rows[-1])
    return rows


def fit_over(rows, max_t):
    """Whether the prior beats the tuned filter at every checked ``t <= max_t`` (and any was)."""
    checked = [row for row in rows if row["t"] <= max_t]
    return bool(checked) and all(row["margin_db"] > 0 for row in checked)


def plot_rows(path, rows, title, conditioned_max_t):
    """PNG of PSNR against ``t`` (log axis) for the prior and the tuned filter, the conditioned
    range shaded. Atomic write."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .figures import save_figure

    steps = [max(row["t"], 0.5) for row in rows]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.axvspan(min(steps), conditioned_max_t, color="0.9", label=f"BC-DPM conditioned (t <= {conditioned_max_t})")
    axis.plot(steps, [row["prior_psnr"] for row in rows], "o-", label="prior x0 estimate")
    axis.plot(steps, [row["gaussian_psnr"] for row in rows], "s--", label="Gaussian of x_t (tuned per t)")
    axis.set_xscale("log")
    axis.set_xlabel("diffusion step t (of 1000)")
    axis.set_ylabel("PSNR (dB, UDPET)")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    save_figure(figure, path)
