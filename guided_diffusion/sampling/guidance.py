"""The BC-DPM bidirectional conditioning block (Shen et al. 2023, Eq. (10)) as a sampler hook.

In the last ``l`` reverse transitions, the unconditional sample ``x'_{t-1}`` is replaced by

    x_{t-1} = (1 - lam) * (GF(y_{t-1}) + (I - GF)(x'_{t-1}))
              + lam * (y_{t-1} + x'_{t-1} - N(x'_{t-1})),

with ``y_{t-1} ~ q(y_{t-1} | y_0)`` the low-dose input diffused to the same noise level, ``GF`` a
Gaussian filter (the denoising condition GF(x_0) ~ GF(y_0)) and ``N(x) = P^+(Po(P x + r + s))``
the noise insertion through the PET system (the condition N(x_0) ~ y_0). The paper writes
``N(x_{t-1})`` on the right-hand side, which would make Eq. (10) implicit; like Algorithm 2 in
practice, we evaluate it at the available ``x'_{t-1}``.

Everything acts on model-layout tensors ``(B, C, Z, X, Y)`` (3D) or ``(B, C, X, Y)`` (2D
slices, the paper's protocol); the PET operators use the volume layout ``(B, X, Y, Z)``.
"""

import math
import numbers
from functools import partial

import torch
import torch.nn.functional as F

from .hot_voxels import DEFAULT_HOT_MODE
from .fusion import noise_index
from ..normalisation import model_to_suv, suv_to_model
from ..pet.projector import make_projector
from ..pet.recon import osem, osem_sensitivities


def _symmetric_indices(length, radius, device):
    """Source indices for half-sample symmetric padding (scipy's ``reflect``), any radius."""
    index = torch.arange(-radius, length + radius, device=device).remainder(2 * length)
    return torch.where(index >= length, 2 * length - 1 - index, index)


def gaussian_kernel_1d(sigma, truncate=4.0, dtype=torch.float64, device=None):
    """Normalised Gaussian taps for ``sigma`` voxels, radius ``int(truncate * sigma + 0.5)``
    (the same taps as ``scipy.ndimage.gaussian_filter``)."""
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def gaussian_filter(x, sigma, truncate=4.0):
    """Separable Gaussian filter over the spatial axes of ``x`` (all axes after the first two).

    :param x: ``(B, C, *spatial)`` floating tensor, 1 to 3 spatial axes (``(Z, X, Y)`` in 3D).
    :param sigma: standard deviation in voxels, a scalar or one value per spatial axis; 0 leaves
        an axis unfiltered.
    :param truncate: kernel radius in standard deviations.
    Borders use half-sample symmetric padding (``d c b a | a b c d``), i.e. scipy.ndimage's
    ``mode="reflect"``, so a constant image stays constant. Returns a tensor like ``x``.
    """
    spatial = x.ndim - 2
    if spatial < 1 or not torch.is_floating_point(x):
        raise ValueError(f"gaussian_filter needs a floating (B, C, *spatial) tensor, got {x.shape}")
    sigmas = (sigma,) * spatial if isinstance(sigma, numbers.Real) else tuple(sigma)
    if len(sigmas) != spatial or any(s < 0 for s in sigmas):
        raise ValueError(f"sigma must be >= 0, scalar or {spatial} values, got {sigma}")
    for axis, s in zip(range(2, x.ndim), sigmas):
        if s == 0:
            continue
        taps = gaussian_kernel_1d(float(s), truncate, x.dtype, x.device)
        radius = (taps.numel() - 1) // 2
        moved = x.movedim(axis, -1)
        length = moved.shape[-1]
        padded = moved.index_select(-1, _symmetric_indices(length, radius, x.device))
        rows = padded.reshape(-1, 1, length + 2 * radius)
        filtered = F.conv1d(rows, taps.view(1, 1, -1)).reshape(moved.shape)
        x = filtered.movedim(-1, axis)
    return x


BC_DEFAULT_LAMBDA = 0.2  # the paper's lambda (Shen et al. 2023, Sec. 3)
BC_DEFAULT_SIGMA_MM = 4.0

BC_TUNED_TYPES = dict(bc_lambda=float, bc_sigma_mm=float, bc_steps=int, hot_voxels=str)
"""The per-noise-level BC-DPM settings of a tuning table row, with their types: ``lambda``,
the Gaussian-filter sigma (mm), ``l`` (conditioned last steps; with ``--bc_start`` also where
the chain starts, so it sets how much diffusion noise the prior has to remove) and the
hot-voxel mode (:mod:`guided_diffusion.sampling.hot_voxels`)."""

BC_DEFAULTS = dict(bc_lambda=BC_DEFAULT_LAMBDA, bc_sigma_mm=BC_DEFAULT_SIGMA_MM,
                   hot_voxels=DEFAULT_HOT_MODE)
"""Defaults of the tuned settings without a table (``l`` has none: it is the checkpoint's)."""

BC_FACTORY_KEYS = ("bc_lambda", "bc_sigma_mm", "bc_steps")
"""The tuned settings that :class:`BCDPMFactory` takes (the hot-voxel mode is the sampler's)."""


def tuned_bc_settings(tuning, index):
    """The row of a prior's BC-DPM tuning table for an input of noise index ``index``.

    :param tuning: ``[{"noise_index", "bc_lambda", "bc_sigma_mm", "bc_steps", "hot_voxels",
        ...}, ...]``, one row per tuned dose level (a checkpoint sidecar's
        ``sampling.bc_tuning``, written by ``scripts/tune_bcdpm.py``; any of the settings may
        be absent); ``noise_index`` is the
        validation inputs' mean :func:`~guided_diffusion.sampling.fusion.noise_index` (SUV).
    :param index: the input's noise index (SUV) or ``None`` (not measurable).
    :return: the row nearest in log noise index, or ``None`` without a table or an index.
    """
    if not tuning or index is None or not index > 0:
        return None
    return min(tuning, key=lambda row: abs(math.log(index / float(row["noise_index"]))))


def resolve_bc_settings(given, tuning, low_dose, defaults=None):
    """BC-DPM's ``lambda``, Gaussian-filter sigma (mm), ``l`` and hot-voxel mode for one input.

    For each key of :data:`BC_TUNED_TYPES`, a value given (not ``None``) wins; otherwise it
    comes from ``tuning``'s row for the noise index of ``low_dose`` (SUV volume ``(X, Y, Z)``,
    :func:`tuned_bc_settings`), else from ``defaults`` over :data:`BC_DEFAULTS`.

    :param given: ``{key: value or None}`` (e.g. the command line's ``--bc_lambda``).
    :param defaults: ``{key: value}`` replacing or adding to :data:`BC_DEFAULTS` (e.g. the
        checkpoint's recommended ``bc_steps``; a key without any value is a ``ValueError``).
    :return: ``(settings, report)``: ``settings`` maps each key to its value, ``report`` adds
        the noise index and where each value came from (``key + "_source"``: ``"given"``,
        ``"tuning"`` or ``"default"``).
    """
    missing = [key for key in BC_TUNED_TYPES if given.get(key) is None]
    index = noise_index(low_dose) if tuning and missing else None
    row = tuned_bc_settings(tuning, index) or {}
    defaults = dict(BC_DEFAULTS, **(defaults or {}))
    settings, report = {}, dict(noise_index=index)
    for key, kind in BC_TUNED_TYPES.items():
        for source, values in (("given", given), ("tuning", row), ("default", defaults)):
            if values.get(key) is not None:
                settings[key], report[key + "_source"] = kind(values[key]), source
                break
        else:
            raise ValueError(f"no value for {key}: give it or a default")
    report.update(settings)
    return settings, report


def check_bc_steps(bc_steps, num_timesteps, bc_start):
    """Raise ``ValueError`` unless ``l`` fits the sampler: ``0 <= l <= num_timesteps``, and
    ``l >= 1`` when the chain starts at step ``l`` (``bc_start``)."""
    if not int(bc_start) <= bc_steps <= num_timesteps:
        raise ValueError(f"BC-DPM's l = {bc_steps} must lie in [{int(bool(bc_start))}, "
                         f"{num_timesteps}] (the sampler's steps)")


def step_index(t):
    """The (common) respaced step index of a sampler's ``t`` (int or tensor of equal values)."""
    if torch.is_tensor(t):
        values = t.flatten()
        if values.numel() == 0 or not bool((values == values[0]).all()):
            raise ValueError(f"conditioning needs one step index for the batch, got t={t}")
        return int(values[0])
    return int(t)


class BidirectionalConditioner:
    """Sampler ``step_hook`` applying BC-DPM's Eq. (10) in the last ``num_steps_l`` transitions.

    :param y0: low-dose input in model space and layout, same shape as the samples.
    :param alphas_cumprod: the sampler's cumulative alphas, indexed by the step index ``t`` the
        loop passes (for a ``SpacedDiffusion`` the respaced ones). ``abar_{t-1}`` is
        ``alphas_cumprod_prev[t]``, 1 for ``t == 0`` (then ``y_{-1} = y_0``).
    :param num_steps_l: ``l``; the hook acts at step indices ``t < l`` (the paper's ``t <= l``
        with 1-based steps), i.e. the last ``l`` transitions.
    :param lam: balance ``lambda`` in [0, 1] between the Gaussian-filter condition (weight
        ``1 - lam``) and the noise-insertion condition (``lam``). With ``lam == 0`` the noise
        inserter is never called.
    :param gaussian_sigma_vox: Gaussian filter sigma in voxels, scalar or per spatial axis
        (``(Z, X, Y)`` or ``(X, Y)``).
    :param noise_inserter: ``N``, a callable on model-layout tensors (e.g.
        :class:`PoissonNoiseInserter`).
    :param generator: optional ``torch.Generator`` (on ``y0``'s device) for the ``y`` noise;
        one standard normal tensor like ``y0`` is drawn per active step with ``t > 0``.
    """

    def __init__(self, y0, alphas_cumprod, *, num_steps_l, lam=0.2, gaussian_sigma_vox,
                 noise_inserter, generator=None):
        if not 0.0 <= float(lam) <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        if int(num_steps_l) < 0:
            raise ValueError(f"num_steps_l must be >= 0, got {num_steps_l}")
        if y0.ndim not in (4, 5):
            raise ValueError(f"y0 must be (B, C, X, Y) or (B, C, Z, X, Y), got {tuple(y0.shape)}")
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if int(num_steps_l) > alphas_cumprod.numel():
            raise ValueError(
                f"num_steps_l={num_steps_l} exceeds the {alphas_cumprod.numel()} sampler steps"
            )
        self.y0 = y0
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        self.num_steps_l = int(num_steps_l)
        self.lam = float(lam)
        self.gaussian_sigma_vox = gaussian_sigma_vox
        self.noise_inserter = noise_inserter
        self.generator = generator

    def diffused_y(self, t):
        """A draw of ``y_{t-1} ~ q(y_{t-1} | y_0)`` for step index ``t``."""
        abar_prev = float(self.alphas_cumprod_prev[t])
        if abar_prev == 1.0:
            return self.y0
        noise = torch.randn(self.y0.shape, generator=self.generator, dtype=self.y0.dtype,
                            device=self.y0.device)
        return math.sqrt(abar_prev) * self.y0 + math.sqrt(1.0 - abar_prev) * noise

    def active(self, t):
        """Whether the block acts at step index ``t`` (the last ``l`` steps)."""
        return step_index(t) < self.num_steps_l

    def __call__(self, x_prev, t, out=None, model_kwargs=None):
        """Eq. (10) on ``x_prev`` (= ``x'_{t-1}``) when ``t < l``; otherwise ``None`` (unchanged)."""
        if not self.active(t):
            return None
        t = step_index(t)
        if x_prev.shape != self.y0.shape:
            raise ValueError(
                f"sample shape {tuple(x_prev.shape)} differs from y0 {tuple(self.y0.shape)}"
            )
        with torch.no_grad():
            y = self.diffused_y(t).to(device=x_prev.device, dtype=x_prev.dtype)
            # (1-lam)(GF(y) + x' - GF(x')) + lam(y + x' - N(x')) = x' + (1-lam) GF(y - x') + lam (y - N(x'))
            result = x_prev
            if self.lam < 1.0:
                result = result + (1.0 - self.lam) * gaussian_filter(y - x_prev, self.gaussian_sigma_vox)
            if self.lam > 0.0:
                result = result + self.lam * (y - self.noise_inserter(x_prev))
        return result


def model_to_volume(x):
    """``(B, 1, Z, X, Y)`` -> ``(B, X, Y, Z)``; 2D slices ``(B, 1, X, Y)`` -> ``(B, X, Y, 1)``."""
    if x.ndim not in (4, 5) or x.shape[1] != 1:
        raise ValueError(f"expected (B, 1, Z, X, Y) or (B, 1, X, Y), got {tuple(x.shape)}")
    if x.ndim == 4:
        return x[:, 0, :, :, None]
    return x[:, 0].permute(0, 2, 3, 1)


def volume_to_model(volume, ndim):
    """Inverse of :func:`model_to_volume` for model tensors with ``ndim`` axes (4 or 5)."""
    if ndim == 4:
        return volume[..., 0].unsqueeze(1)
    return volume.permute(0, 3, 1, 2).unsqueeze(1)


class PoissonNoiseInserter:
    """``N(x) = P^+(Po(P x + r + s))`` on model-space tensors.

    Steps: ``model_to_activity(x)`` clamped at 0 (the Poisson mean must be non-negative; noisy
    diffusion samples can dip below 0) -> volume layout ``(B, X, Y, Z)`` -> expected counts
    ``ybar = counts_scale * mult_factor * P(a) + additive`` -> ``Po(ybar)`` (with
    ``generator``) -> ``recon(counts, projector, mult_factor=counts_scale * mult_factor,
    additive=additive)`` (so the reconstruction is in activity units again) ->
    ``activity_to_model`` -> model layout.

    :param projector: operator with ``.forward`` on ``(B, X, Y, Z)`` tensors (DESIGN projector).
    :param model_to_activity, activity_to_model: callables between model space and activity
        (e.g. ``lambda x: 16 * x`` and ``lambda a: a / 16`` for the published normalisation).
    :param counts_scale: expected counts per unit of ``mult_factor * P(activity)``.
    :param mult_factor: optional sinogram of multiplicative factors (attenuation x
        normalisation); ``additive``: optional expected randoms + scatter in counts.
    :param recon: ``recon(counts, projector, mult_factor=..., additive=...) -> (B, X, Y, Z)``,
        e.g. ``functools.partial(recon.osem, n_iter=4, n_subsets=6)``.
    :param generator: optional ``torch.Generator`` for the Poisson draws.
    """

    def __init__(self, projector, *, model_to_activity, activity_to_model, counts_scale,
                 mult_factor=None, additive=None, recon, generator=None):
        if not float(counts_scale) > 0:
            raise ValueError(f"counts_scale must be > 0, got {counts_scale}")
        self.projector = projector
        self.model_to_activity = model_to_activity
        self.activity_to_model = activity_to_model
        self.counts_scale = float(counts_scale)
        self.mult_factor = mult_factor
        self.additive = additive
        self.recon = recon
        self.generator = generator

    def effective_mult_factor(self, like):
        """``counts_scale * mult_factor`` as a sinogram-shaped tensor on ``like``'s device."""
        if self.mult_factor is None:
            return torch.full(tuple(self.projector.sinogram_shape), self.counts_scale,
                              dtype=like.dtype, device=like.device)
        return self.counts_scale * self.mult_factor.to(device=like.device, dtype=like.dtype)

    def expected_counts(self, activity):
        """``ybar`` for a non-negative activity ``(B, X, Y, Z)``."""
        projection = self.projector.forward(activity)
        ybar = self.effective_mult_factor(projection) * projection
        if self.additive is not None:
            ybar = ybar + self.additive
        return ybar

    def __call__(self, x):
        activity = model_to_volume(self.model_to_activity(x)).clamp_min(0)
        counts = torch.poisson(self.expected_counts(activity), generator=self.generator)
        recon = self.recon(counts, self.projector, mult_factor=self.effective_mult_factor(counts),
                           additive=self.additive)
        return self.activity_to_model(volume_to_model(recon, x.ndim)).to(x.dtype)


class LowDoseAcquisition:
    """The low-dose PET acquisition of a volume on the model grid, for the physics conditions.

    Projector of scanner ``scanner`` on the model grid (``mode``, default ``"2d"``: one
    sinogram per transaxial slice, so volumes longer than the scanner's axial FOV work),
    expected trues scaled so the low-dose volume itself would give ``total_counts`` counts
    including uniform randoms of ``randoms_fraction`` x trues. Attenuation and scatter are not
    modelled here (no attenuation map is needed); the noise level is set by the count level.

    :param normalisation: the checkpoint's model-space normalisation.
    :param voxel_mm: model voxel size (scalar or ``(x, y, z)``, mm).
    :param view_mashing: optional view mashing of the projector (default: the preset's).
    :param psf_fwhm_mm: optional image-space Gaussian resolution model of the projector (FWHM in
        mm, scalar or ``(x, y, z)``; default: none), as in the acquisition being simulated.
    """

    def __init__(self, *, scanner, total_counts, randoms_fraction, normalisation, voxel_mm,
                 mode="2d", view_mashing=None, psf_fwhm_mm=None):
        if not total_counts > 0:
            raise ValueError(f"total_counts must be > 0, got {total_counts}")
        self.scanner = scanner
        self.total_counts = float(total_counts)
        self.randoms_fraction = float(randoms_fraction)
        self.normalisation = normalisation
        self.voxel_mm = tuple(float(v) for v in torch.as_tensor(voxel_mm, dtype=torch.float64)
                              .expand(3).tolist())
        self.mode = mode
        self.view_mashing = None if view_mashing is None else int(view_mashing)
        self.psf_fwhm_mm = psf_fwhm_mm
        self._projectors = {}

    def projector(self, image_shape, device):
        """The (cached) projector for an ``(X, Y, Z)`` model grid."""
        key = (tuple(image_shape), str(device))
        if key not in self._projectors:
            self._projectors[key] = make_projector(self.scanner, image_shape, self.voxel_mm,
                                                   mode=self.mode, device=device,
                                                   view_mashing=self.view_mashing,
                                                   psf_fwhm_mm=self.psf_fwhm_mm)
        return self._projectors[key]

    def model_to_activity(self, x):
        return model_to_suv(x, self.normalisation)

    def activity_to_model(self, a):
        return suv_to_model(a, self.normalisation)

    def acquisition_of(self, y0):
        """For the low-dose ``y0`` ``(1, 1, Z, X, Y)`` (model space): ``(projector,
        counts_scale, additive)``, with ``counts_scale`` the expected trues per unit of
        projected activity and ``additive`` the uniform randoms sinogram (counts)."""
        activity = model_to_volume(self.model_to_activity(y0)).clamp_min(0)
        projector = self.projector(tuple(activity.shape[1:]), y0.device)
        trues_per_unit = float(projector.forward(activity).sum())
        if trues_per_unit <= 0:
            raise ValueError("the low-dose volume is empty: nothing to condition on")
        trues = self.total_counts / (1.0 + self.randoms_fraction)
        n_bins = float(torch.tensor(projector.sinogram_shape).prod())
        additive = torch.full(tuple(projector.sinogram_shape), self.randoms_fraction * trues / n_bins,
                              dtype=y0.dtype, device=y0.device)
        return projector, trues / trues_per_unit, additive


class BCDPMFactory(LowDoseAcquisition):
    """Builds the BC-DPM hook for one volume and ensemble member (used by ``scripts/test.py``).

    The noise-insertion condition simulates the low-dose acquisition
    (:class:`LowDoseAcquisition`) of the current sample: Poisson noise, then
    ``recon_iters`` x ``recon_subsets`` OSEM as ``P^+``.

    :param num_steps_l, lam: BC-DPM's ``l`` and ``lambda``.
    :param sigma_mm: Gaussian-filter condition sigma in mm.
    :param acquisition: keyword arguments of :class:`LowDoseAcquisition`.
    """

    def __init__(self, *, num_steps_l, lam, sigma_mm, recon_iters, recon_subsets, **acquisition):
        super().__init__(**acquisition)
        self.num_steps_l = int(num_steps_l)
        self.lam = float(lam)
        self.sigma_mm = float(sigma_mm)
        self.recon_iters = int(recon_iters)
        self.recon_subsets = int(recon_subsets)

    def __call__(self, y0, diffusion, generator, prepared=None):
        """The hook for low-dose ``y0`` ``(1, 1, Z, X, Y)`` (model space) and one member's
        ``generator``; ``diffusion`` supplies the (respaced) ``alphas_cumprod``."""
        projector, counts_scale, additive = self.acquisition_of(y0)
        # Every conditioned step reconstructs the same acquisition: its EM denominators once.
        sensitivities = osem_sensitivities(projector, self.recon_subsets, scale=counts_scale)
        inserter = PoissonNoiseInserter(
            projector,
            model_to_activity=self.model_to_activity,
            activity_to_model=self.activity_to_model,
            counts_scale=counts_scale,
            additive=additive,
            recon=partial(osem, n_iter=self.recon_iters, n_subsets=self.recon_subsets,
                          sensitivities=sensitivities),
            generator=generator,
        )
        vx, vy, vz = self.voxel_mm
        sigma_vox = (self.sigma_mm / vz, self.sigma_mm / vx, self.sigma_mm / vy)
        return BidirectionalConditioner(
            y0, diffusion.alphas_cumprod, num_steps_l=self.num_steps_l, lam=self.lam,
            gaussian_sigma_vox=sigma_vox, noise_inserter=inserter, generator=generator)


class HookChain:
    """Sampler step hooks applied in order, each to the previous one's result.

    ``active(t)`` is true when any hook acts at step ``t`` (a hook without ``active`` counts as
    always active), so a box-wise sampler gathers the whole volume only when needed.
    """

    def __init__(self, hooks):
        self.hooks = list(hooks)

    def active(self, t):
        return any(getattr(hook, "active", lambda _: True)(t) for hook in self.hooks)

    def __call__(self, x_prev, t, out=None, model_kwargs=None):
        result = None
        for hook in self.hooks:
            replaced = hook(x_prev if result is None else result, t, out, model_kwargs)
            if replaced is not None:
                result = replaced
        return result


def chain_factories(factories):
    """One conditioner factory ``(y0, diffusion, generator, prepared) -> hook`` from several
    (``None`` entries are skipped); ``None`` when there are none."""
    factories = [f for f in factories if f is not None]
    if not factories:
        return None
    if len(factories) == 1:
        return factories[0]

    def factory(y0, diffusion, generator, prepared=None):
        return HookChain(f(y0, diffusion, generator, prepared) for f in factories)

    return factory
