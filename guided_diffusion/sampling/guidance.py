"""Guidance: the sampler's per-step hooks that steer a sample towards the measured data.

The hook interface (one for every kind of guidance): the sampling loop calls
``hook(x_prev, t, out, model_kwargs)`` after each reverse step with the proposal ``x_prev`` (=
``x'_{t-1}``), the respaced step index ``t`` and the model output ``out`` (``pred_xstart``...);
the hook returns the replacement for ``x_prev`` or ``None`` (unchanged). An optional
``active(t)`` says at which steps it acts (a box-wise sampler gathers the whole volume only
then). A *factory* ``factory(y0, diffusion, generator, prepared) -> hook`` builds the hook of one
volume and ensemble member; :func:`chain_factories` runs several in order (:class:`HookChain`).

Hooks here: :class:`BidirectionalConditioner`, the BC-DPM block (Shen et al. 2023, Eq. (10)),
built by :class:`BCDPMFactory`; Poisson data consistency lives in :mod:`.data_consistency`. Both
simulate the acquisition through an *acquisition model*: :class:`LowDoseAcquisition` (the
count level of a low-dose reconstruction, on the model grid) or :class:`KnownAcquisition` (the
projector, scale and randoms of a simulated scan, as the paper's 2D protocol has them).

In the last ``l`` reverse transitions, BC-DPM replaces the unconditional sample ``x'_{t-1}`` by

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
from functools import partial

import torch

from ..normalisation import model_to_suv, suv_to_model
from ..pet.filters import gaussian_filter
from ..pet.projector import make_projector
from ..pet.recon import osem, osem_sensitivities


LAMBDA_SCHEDULES = ("constant", "linear")
"""``constant``: the paper's lambda at every conditioned step (Algorithm 2); ``linear``: the
toolkit's improved variant, lambda falling linearly to 0 at the last step (nothing denoises
after the last step, so its noise-insertion term would stay in the image)."""


def scheduled_lambda(lam, schedule, t, num_steps_l):
    """lambda at step index ``t`` of the last ``num_steps_l`` (``t = l - 1 .. 0``): ``lam``
    (constant), or ``lam * t / (l - 1)`` (linear: ``lam`` at the first conditioned step, 0 at
    the last; 0 throughout when ``l = 1``)."""
    if schedule not in LAMBDA_SCHEDULES:
        raise ValueError(f"unknown lambda schedule {schedule!r}; choose one of {LAMBDA_SCHEDULES}")
    if schedule == "constant":
        return float(lam)
    return float(lam) * t / (num_steps_l - 1) if num_steps_l > 1 else 0.0


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
    :param lam_schedule: one of :data:`LAMBDA_SCHEDULES` (:func:`scheduled_lambda`).
    :param gaussian_sigma_vox: Gaussian filter sigma in voxels, scalar or per spatial axis
        (``(Z, X, Y)`` or ``(X, Y)``).
    :param noise_inserter: ``N``, a callable on model-layout tensors (e.g.
        :class:`PoissonNoiseInserter`).
    :param generator: optional ``torch.Generator`` (on ``y0``'s device) for the ``y`` noise;
        one standard normal tensor like ``y0`` is drawn per active step with ``t > 0``.
    """

    def __init__(self, y0, alphas_cumprod, *, num_steps_l, lam=0.2, gaussian_sigma_vox,
                 noise_inserter, generator=None, lam_schedule="constant"):
        scheduled_lambda(lam, lam_schedule, 0, 1)  # checks the schedule's name
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
        self.lam_schedule = lam_schedule
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
        lam = scheduled_lambda(self.lam, self.lam_schedule, t, self.num_steps_l)
        with torch.no_grad():
            y = self.diffused_y(t).to(device=x_prev.device, dtype=x_prev.dtype)
            # (1-lam)(GF(y) + x' - GF(x')) + lam(y + x' - N(x')) = x' + (1-lam) GF(y - x') + lam (y - N(x'))
            result = x_prev
            if lam < 1.0:
                result = result + (1.0 - lam) * gaussian_filter(y - x_prev, self.gaussian_sigma_vox)
            if lam > 0.0:
                result = result + lam * (y - self.noise_inserter(x_prev))
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


class AcquisitionModel:
    """What the physics guidance needs of an acquisition: the map between model space and
    activity (the checkpoint's ``normalisation``), the voxel size ``voxel_mm`` (scalar or
    ``(x, y, z)``, mm) and :meth:`acquisition_of`."""

    def __init__(self, normalisation, voxel_mm):
        self.normalisation = normalisation
        self.voxel_mm = tuple(float(v) for v in torch.as_tensor(voxel_mm, dtype=torch.float64)
                              .expand(3).tolist())

    def model_to_activity(self, x):
        return model_to_suv(x, self.normalisation)

    def activity_to_model(self, a):
        return suv_to_model(a, self.normalisation)

    def acquisition_of(self, y0):
        """``(projector, counts_scale, additive)`` for the low-dose ``y0`` (model space)."""
        raise NotImplementedError


class LowDoseAcquisition(AcquisitionModel):
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
    :param randoms_per_slice: mode ``2d``: each slice's randoms in proportion to its own trues
        (slice-wise scans, the BC-DPM paper's protocol) instead of uniform over all planes.
    """

    def __init__(self, *, scanner, total_counts, randoms_fraction, normalisation, voxel_mm,
                 mode="2d", view_mashing=None, psf_fwhm_mm=None, randoms_per_slice=False):
        if randoms_per_slice and mode != "2d":
            raise ValueError("randoms_per_slice needs the 2d projector mode (one sinogram per slice)")
        if not total_counts > 0:
            raise ValueError(f"total_counts must be > 0, got {total_counts}")
        super().__init__(normalisation, voxel_mm)
        self.scanner = scanner
        self.total_counts = float(total_counts)
        self.randoms_fraction = float(randoms_fraction)
        self.mode = mode
        self.view_mashing = None if view_mashing is None else int(view_mashing)
        self.psf_fwhm_mm = psf_fwhm_mm
        self.randoms_per_slice = bool(randoms_per_slice)
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

    def acquisition_of(self, y0):
        """For the low-dose ``y0`` ``(1, 1, Z, X, Y)`` (model space): ``(projector,
        counts_scale, additive)``, with ``counts_scale`` the expected trues per unit of
        projected activity and ``additive`` the uniform randoms sinogram (counts)."""
        activity = model_to_volume(self.model_to_activity(y0)).clamp_min(0)
        projector = self.projector(tuple(activity.shape[1:]), y0.device)
        projected = projector.forward(activity)
        trues_per_unit = float(projected.sum())
        if trues_per_unit <= 0:
            raise ValueError("the low-dose volume is empty: nothing to condition on")
        trues = self.total_counts / (1.0 + self.randoms_fraction)
        shape = tuple(projector.sinogram_shape)
        if self.randoms_per_slice:  # plane p: randoms_fraction x its trues, uniform over its bins
            plane_share = projected.reshape(-1, *shape).sum(dim=(0, 1, 2)) / trues_per_unit
            per_bin = self.randoms_fraction * trues * plane_share / float(shape[0] * shape[1])
            additive = per_bin.to(y0.dtype).expand(shape).contiguous()
        else:
            additive = torch.full(shape, self.randoms_fraction * trues / float(math.prod(shape)),
                                  dtype=y0.dtype, device=y0.device)
        return projector, trues / trues_per_unit, additive


class KnownAcquisition(AcquisitionModel):
    """An acquisition whose projector, scale and randoms are known (a simulated scan).

    :param projector: the scan's projector (``.forward`` on ``(B, X, Y, Z)``).
    :param counts_scale: expected trues per unit of projected activity.
    :param additive: expected randoms (+ scatter) sinogram in counts, or ``None``.
    :param normalisation: the checkpoint's model-space normalisation; ``voxel_mm``: voxel size
        (scalar or ``(x, y, z)``, mm).
    """

    def __init__(self, projector, counts_scale, additive, *, normalisation, voxel_mm):
        super().__init__(normalisation, voxel_mm)
        self._acquisition = (projector, float(counts_scale), additive)

    def acquisition_of(self, y0):
        """``(projector, counts_scale, additive)``, whatever the low-dose ``y0``."""
        return self._acquisition


class BCDPMFactory:
    """Builds the BC-DPM hook for one volume and ensemble member (every script's BC-DPM).

    The noise-insertion condition simulates the acquisition of the current sample: Poisson
    noise on ``acquisition``'s expected counts, then ``recon_iters`` x ``recon_subsets`` OSEM
    (one subset: MLEM) as ``P^+``.

    :param acquisition: :class:`LowDoseAcquisition` or :class:`KnownAcquisition`.
    :param num_steps_l, lam: BC-DPM's ``l`` and ``lambda``.
    :param lam_schedule: ``constant`` (the paper) or ``linear`` (to 0 at the last step).
    :param sigma_mm: Gaussian-filter condition sigma in mm (converted per axis with the
        acquisition's voxel size).
    :param in_plane: filter within axial slices only (a 2D prior denoising slice by slice).
    """

    def __init__(self, acquisition, *, num_steps_l, lam, sigma_mm, recon_iters, recon_subsets,
                 lam_schedule="constant", in_plane=False):
        self.acquisition = acquisition
        self.in_plane = bool(in_plane)
        self.num_steps_l = int(num_steps_l)
        self.lam = float(lam)
        self.lam_schedule = lam_schedule
        self.sigma_mm = float(sigma_mm)
        self.recon_iters = int(recon_iters)
        self.recon_subsets = int(recon_subsets)

    def sigma_vox(self, ndim):
        """The filter sigma per spatial axis of a model tensor with ``ndim`` axes: ``(Z, X, Y)``
        for 5 (Z: 0 when ``in_plane``), ``(X, Y)`` for 4."""
        vx, vy, vz = self.acquisition.voxel_mm
        if ndim == 4:
            return (self.sigma_mm / vx, self.sigma_mm / vy)
        return (0.0 if self.in_plane else self.sigma_mm / vz, self.sigma_mm / vx, self.sigma_mm / vy)

    def __call__(self, y0, diffusion, generator, prepared=None):
        """The hook for low-dose ``y0`` (model space and layout) and one member's
        ``generator``; ``diffusion`` supplies the (respaced) ``alphas_cumprod``."""
        acquisition = self.acquisition
        projector, counts_scale, additive = acquisition.acquisition_of(y0)
        # Every conditioned step reconstructs the same acquisition: its EM denominators once.
        sensitivities = osem_sensitivities(projector, self.recon_subsets, scale=counts_scale)
        inserter = PoissonNoiseInserter(
            projector,
            model_to_activity=acquisition.model_to_activity,
            activity_to_model=acquisition.activity_to_model,
            counts_scale=counts_scale,
            additive=additive,
            recon=partial(osem, n_iter=self.recon_iters, n_subsets=self.recon_subsets,
                          sensitivities=sensitivities),
            generator=generator,
        )
        return BidirectionalConditioner(
            y0, diffusion.alphas_cumprod, num_steps_l=self.num_steps_l, lam=self.lam,
            gaussian_sigma_vox=self.sigma_vox(y0.ndim), noise_inserter=inserter,
            generator=generator, lam_schedule=self.lam_schedule)


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
