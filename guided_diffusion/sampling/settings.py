"""The one resolver of sampling settings, and the denoiser built from them.

Every script (``test.py``, the quality report, the benchmark, the tuning scripts) asks
:func:`resolve_settings` and builds its denoiser with :func:`build_denoiser`. Each setting comes
from the first of these that has a value (``None`` means "no value"):

1. ``given``: what the caller asked for (a command-line flag);
2. the checkpoint's BC-DPM tuning table (sidecar ``sampling.bc_tuning``): the row nearest in
   log noise index to the input's (:func:`tuned_row`), for the keys of :data:`TUNED_KEYS`, in
   the modes that use BC-DPM's block, when an input is given; likewise, for an ensemble of a
   paired posterior sampler, the x0 blend width of the sidecar's ``ensemble_spread`` fit
   (:func:`spread_sigma`);
3. the checkpoint sidecar's ``sampling`` recommendations (:data:`SIDECAR_KEYS`); the diffusion
   flags (``timestep_respacing``) fall back to the sidecar's ``flags``; for an ensemble
   (``given["members"]``, else :func:`recommended_members`, >= 2) the sidecar's
   ``ensemble_respacing`` (and ``ensemble_flips`` for ``flips``) comes first: a posterior sampler
   may recommend a one-step posterior-mean estimate for one member (averaged over mirrored
   inputs) and a sampling chain for an ensemble, whose spread is the uncertainty; in paired
   mode the ensemble's image is then that one-member estimate (``Resolved.estimate``), not the
   mean of its samples (a Monte Carlo estimate of the same posterior mean, with their spread in it);
4. :data:`DEFAULTS`.

The acquisition that BC-DPM and data consistency simulate resolves the same way per key
(:func:`resolve_acquisition`): given > the input's make_dataset.py subject manifest >
:data:`ACQUISITION_DEFAULTS`.
"""

import math
import os
from dataclasses import dataclass

import numpy as np

from .. import fp16_util
from ..pet import dataset_manifest, volumes
from .data_consistency import DataConsistencyFactory
from .denoiser import (SamplingSettings, VolumeDenoiser, flip_combinations, is_null_conditioned_prior,
                       serves_as_prior)
from .fusion import estimate_noise_index
from .guidance import LAMBDA_SCHEDULES, BCDPMFactory, LowDoseAcquisition, chain_factories
from .hot_voxels import HOT_MODES

MODES = ("paired", "bcdpm", "hybrid")

BC_STEPS_BY_NOISE = {"light": 5, "medium": 10, "heavy": 15}
"""BC-DPM paper: l = 5 / 10 / 15 conditioned reverse steps for light / medium / heavy noise."""

DEFAULTS = dict(
    timestep_respacing="", use_ddim=None, eta=0.0, clip_denoised=True,
    patch_z=None, patch_overlap=8, max_patch_voxels=None, batch_size=1, stitch="seamfree",
    precision="auto", hot_voxels="rescale", fusion_kappa=0.0,
    bc_steps=BC_STEPS_BY_NOISE["medium"], bc_lambda=0.2, bc_sigma_mm=4.0, bc_start=False,
    bc_lam_schedule="constant", bc_recon_iters=2, bc_recon_subsets=8, dc_steps=0, dc_iters=1, dc_subsets=1,
    x0_skip_sigma=None, flips="", std_fwhm_mm=0.0,
)
"""The last layer. ``use_ddim`` None: DDIM when the respacing is ``"ddimN"``; ``patch_z``
None: the checkpoint's training patch depth; ``precision`` auto: the checkpoint's
``use_fp16`` on CUDA, bf16 on a CPU; ``fusion_kappa`` 0: off; ``bc_lambda`` 0.2 and
``bc_lam_schedule`` constant: the paper's; ``x0_skip_sigma`` None: the blend width the checkpoint
was trained with (for an ensemble of a paired posterior sampler, the sidecar's
``ensemble_spread`` fit to the input's noise index comes first: :func:`spread_sigma`);
``flips`` "": no test-time flip averaging; ``std_fwhm_mm`` 0: an ensemble's std map is not
pooled (:mod:`.uncertainty`)."""

SIDECAR_KEYS = ("timestep_respacing", "use_ddim", "patch_z", "patch_overlap", "fusion_kappa", "flips", "std_fwhm_mm",
                "bc_steps", "bc_start", "bc_lam_schedule", "bc_lambda", "bc_sigma_mm")
"""Keys a checkpoint sidecar's ``sampling`` may recommend."""

ENSEMBLE_SOURCE = "checkpoint (ensemble)"
"""The source of a respacing taken from the sidecar's ``ensemble_respacing``."""

TUNED_KEYS = dict(bc_lambda=float, bc_sigma_mm=float, bc_steps=int, hot_voxels=str)
"""Keys of a BC-DPM tuning-table row, with their types (``scripts/tune_bcdpm.py`` writes them)."""

ACQUISITION_DEFAULTS = dict(scanner="quadra", mode="2d", view_mashing=None, psf_fwhm_mm=None,
                            randoms_fraction=0.2, total_counts=None)
"""The simulated acquisition without a flag or a manifest (randoms 20 % of trues: the paper's)."""


@dataclass
class Resolved:
    """Resolved settings: ``values[key]``, where each came from (``sources[key]``: ``"given"``,
    ``"tuning"``, ``"checkpoint"``, ``"default"``), the input's noise index when a tuning
    row was looked up, and for an ensemble that samples with the sidecar's ``ensemble_respacing``
    the one-member settings whose output is the ensemble's image (``estimate``)."""

    values: dict
    sources: dict
    mode: str
    noise_index: float = None
    estimate: "Resolved" = None

    def __getitem__(self, key):
        return self.values[key]

    def describe(self, keys):
        """``"key value (source), ..."`` for a log line."""
        return ", ".join(f"{key} {self.values[key]} ({self.sources[key]})" for key in keys)


def resolve_mode(requested, metadata, model_path):
    """The conditioning mode for ``requested`` (``"auto"``, ``"paired"``, ``"bcdpm"``,
    ``"hybrid"``): ``auto`` is paired for a paired checkpoint, bcdpm for an unconditional one.
    Raises ValueError naming ``model_path`` when the checkpoint cannot serve the mode."""
    cond = metadata["cond"]
    mode = ("paired" if cond == "paired" else "bcdpm") if requested in (None, "auto") else requested
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected auto or one of {MODES}")
    if mode in ("paired", "hybrid") and cond != "paired":
        raise ValueError(f"{model_path}: mode {mode} needs a paired checkpoint; this one is "
                         f"unconditional (use bcdpm)")
    if mode == "bcdpm" and not serves_as_prior(metadata):
        raise ValueError(f"{model_path}: mode bcdpm needs an unconditional prior or a paired "
                         f"checkpoint trained with --cond_dropout; this one is paired only "
                         f"(use hybrid)")
    return mode


def uses_bcdpm(mode):
    """Whether ``mode`` runs BC-DPM's block."""
    return mode in ("bcdpm", "hybrid")


def tuned_row(tuning, index):
    """The row of a BC-DPM tuning table nearest in log noise index to ``index`` (SUV), or
    ``None`` without a table or a measurable index. Rows carry ``noise_index`` (the validation
    inputs' mean index by the table's ``noise_estimator``,
    :func:`~guided_diffusion.sampling.fusion.estimate_noise_index`) and any of :data:`TUNED_KEYS`."""
    if not tuning or index is None or not index > 0:
        return None
    return min(tuning, key=lambda row: abs(math.log(index / float(row["noise_index"]))))


def recommended_members(metadata, mode):
    """The ensemble size a checkpoint's settings were tuned for in ``mode``: in the modes that
    use BC-DPM's block, the largest ``members`` of its tuning table's rows (a table tuned on
    K-member means; rows without the key: 1); otherwise 1. ``--num_ensemble`` overrides it."""
    tuning = metadata.get("sampling", {}).get("bc_tuning") if uses_bcdpm(mode) else None
    return max((int(row.get("members", 1)) for row in tuning or ()), default=1)


def spread_sigma(spread, index):
    """The x0 blend width ``s`` (model units) of an ensemble for an input of noise index
    ``index``: the sidecar's ``ensemble_spread`` fit ``s_ref (index / noise_index)^power``
    clipped to its ``range``, or ``None`` without a measurable index."""
    if index is None or not index > 0:
        return None
    value = spread["x0_skip_sigma"] * (index / spread["noise_index"]) ** spread["power"]
    return float(np.clip(value, *spread["range"]))


def model_grid_noise_index(low_dose, affine, metadata, estimator):
    """The noise index (SUV) of the input ``low_dose`` ``(X, Y, Z)`` on the model's grid: resampled
    to the checkpoint's ``voxel_mm`` first (as the denoiser resamples it) when its voxels (from
    ``affine``; ``None``: taken as the model's) differ by more than 1 %. Tuning tables and fits
    measured theirs on validation volumes at the model's voxel size; an index on finer voxels
    reads lower for the same image noise."""
    if affine is not None:
        model_voxel = np.broadcast_to(np.asarray(metadata["voxel_mm"], dtype=float), (3,))
        if not np.allclose(volumes.voxel_sizes(affine), model_voxel, rtol=0.01):
            low_dose, _ = volumes.resample_image(low_dose, affine, model_voxel)
    return estimate_noise_index(low_dose, estimator)


def resolve_settings(given, metadata, mode, low_dose=None, defaults=None, affine=None):
    """Resolve every key of :data:`DEFAULTS` (see the module docstring).

    :param given: ``{key: value or None}``; keys outside :data:`DEFAULTS` are ignored, but for
        ``members`` (the ensemble size, default :func:`recommended_members`).
    :param metadata: the checkpoint's sidecar (``sampling``, ``flags``).
    :param mode: the resolved mode (:func:`resolve_mode`).
    :param low_dose: the input SUV volume ``(X, Y, Z)`` for the tuning-table lookup; ``None``
        skips it (run-level settings).
    :param affine: ``low_dose``'s 4x4 affine (mm): its noise index is measured on the model's grid
        (:func:`model_grid_noise_index`); ``None``: as given.
    :param defaults: entries replacing those of :data:`DEFAULTS` (e.g. ``bc_steps`` from the
        paper's noise class, ``--bc_noise``).
    :return: :class:`Resolved`.
    """
    sampling = metadata.get("sampling", {})
    sidecar = {key: sampling.get(key) for key in SIDECAR_KEYS}
    if sidecar["timestep_respacing"] is None:
        sidecar["timestep_respacing"] = metadata.get("flags", {}).get("timestep_respacing")
    members = given.get("members") or recommended_members(metadata, mode)
    ensemble = members >= 2 and bool(sampling.get("ensemble_respacing"))
    if ensemble:
        sidecar["timestep_respacing"] = sampling["ensemble_respacing"]
        sidecar["flips"] = sampling.get("ensemble_flips")
    tuning = sampling.get("bc_tuning") if uses_bcdpm(mode) else None
    spread = sampling.get("ensemble_spread") if members >= 2 and mode == "paired" else None
    index, row = None, {}
    if tuning and low_dose is not None and any(given.get(key) is None for key in TUNED_KEYS):
        index = model_grid_noise_index(low_dose, affine, metadata, tuning[0].get("noise_estimator", "highpass"))
        row = tuned_row(tuning, index) or {}
    if spread and low_dose is not None and given.get("x0_skip_sigma") is None:
        index = model_grid_noise_index(low_dose, affine, metadata, spread["noise_estimator"])
        row = dict(x0_skip_sigma=spread_sigma(spread, index))
    values, sources = {}, {}
    for key, default in dict(DEFAULTS, **(defaults or {})).items():
        for source, layer in (("given", given), ("tuning", row), ("checkpoint", sidecar),
                              ("default", {key: default})):
            if layer.get(key) is not None:
                value = layer[key]
                values[key], sources[key] = (TUNED_KEYS.get(key, float)(value) if source == "tuning" else value), source
                break
        else:
            values[key], sources[key] = None, "default"
    estimate = None
    if ensemble and sources["timestep_respacing"] == "checkpoint":
        sources["timestep_respacing"] = ENSEMBLE_SOURCE
        if mode == "paired":  # a posterior-mean estimate; one BC-DPM member is a sample
            # the ensemble's width is its own: the estimate keeps the trained blend; one paired
            # member looks nothing up by the input's noise
            estimate = resolve_settings(dict(given, members=1, x0_skip_sigma=None), metadata, mode, None, defaults)
    if values["use_ddim"] is None:
        values["use_ddim"] = str(values["timestep_respacing"]).startswith("ddim")
        sources["use_ddim"] = sources["timestep_respacing"]
    return Resolved(values, sources, mode, index, estimate)


def check_settings(resolved, num_timesteps):
    """Raise ValueError (one line, naming the flag) for settings the sampler of
    ``num_timesteps`` steps cannot run."""
    v = resolved.values
    if uses_bcdpm(resolved.mode) or v["bc_start"]:
        low = int(bool(v["bc_start"]))
        if not low <= v["bc_steps"] <= num_timesteps:
            raise ValueError(f"--bc_steps: BC-DPM's l = {v['bc_steps']} ({resolved.sources['bc_steps']}) must lie in "
                             f"[{low}, {num_timesteps}] (the sampler's steps)")
    if not 0 <= v["dc_steps"] <= num_timesteps or v["dc_iters"] < 1 or v["dc_subsets"] < 1:
        raise ValueError(f"--dc_steps {v['dc_steps']} must lie in [0, {num_timesteps}] and --dc_iters / "
                         f"--dc_subsets be >= 1")
    if v["x0_skip_sigma"] is not None and v["x0_skip_sigma"] < 0:
        raise ValueError(f"--x0_skip_sigma must be >= 0, got {v['x0_skip_sigma']}")
    if v["std_fwhm_mm"] < 0:
        raise ValueError(f"--std_fwhm_mm must be >= 0 (0: no pooling), got {v['std_fwhm_mm']}")
    if v["fusion_kappa"] < 0:
        raise ValueError(f"--fusion_kappa must be >= 0 (0: off), got {v['fusion_kappa']}")
    if v["hot_voxels"] not in HOT_MODES:
        raise ValueError(f"--hot_voxels must be one of {HOT_MODES}, got {v['hot_voxels']!r}")
    if not 0.0 <= v["bc_lambda"] <= 1.0:
        raise ValueError(f"--bc_lambda must lie in [0, 1], got {v['bc_lambda']}")
    if v["bc_lam_schedule"] not in LAMBDA_SCHEDULES:
        raise ValueError(f"--bc_lam_schedule must be one of {LAMBDA_SCHEDULES}, got {v['bc_lam_schedule']!r}")
    flip_combinations(v["flips"])
    for key in ("patch_overlap", "batch_size", "bc_recon_iters", "bc_recon_subsets"):
        if v[key] < (0 if key == "patch_overlap" else 1):
            raise ValueError(f"--{key} must be >= {0 if key == 'patch_overlap' else 1}, got {v[key]}")


def range_warnings(resolved, metadata, model_path):
    """One-line warnings for settings outside what the checkpoint was trained or validated on:
    a prior trained only for t < ``trained_max_t`` sampled from pure noise (no ``--bc_start``),
    and axial slabs deeper than both its training patches and its recommended ``patch_z`` (the
    group norms see other statistics; BENCHMARKS.md measures what that costs)."""
    recommended = metadata.get("sampling", {})
    warnings = []
    if recommended.get("trained_max_t") and not resolved["bc_start"]:
        warnings.append(f"{model_path} was trained only for t < {recommended['trained_max_t']}: sampling "
                        f"from pure noise leaves its training range (use --bc_start)")
    depths = [d for d in (metadata.get("patch_size_zxy", [None])[0], recommended.get("patch_z")) if d]
    if depths and resolved["patch_z"] and resolved["patch_z"] > max(depths):
        warnings.append(f"--patch_z {resolved['patch_z']}: slabs deeper than the {max(depths)} slices "
                        f"{model_path} was trained and validated on; its output may degrade")
    return warnings


def resolve_precision(requested, use_fp16, device):
    """``auto``: ``use_fp16`` (the checkpoint's flag) on CUDA; on a CPU bf16 where it has native
    bf16 units, else fp32 (:func:`~guided_diffusion.fp16_util.auto_cpu_precision`); else as
    requested."""
    if requested in (None, "auto"):
        precision = fp16_util.resolve_precision(use_fp16, device)
        return fp16_util.auto_cpu_precision() if getattr(device, "type", str(device)) == "cpu" else precision
    return fp16_util.resolve_precision(use_fp16, device, requested)


def sampling_settings(resolved, metadata, precision, progress=True):
    """The :class:`~.denoiser.SamplingSettings` of resolved settings (``precision`` resolved)."""
    v = resolved.values
    return SamplingSettings(
        use_ddim=bool(v["use_ddim"]), eta=v["eta"], clip_denoised=v["clip_denoised"],
        patch_z=v["patch_z"], overlap=v["patch_overlap"], max_patch_voxels=v["max_patch_voxels"],
        batch_size=v["batch_size"], stitch=v["stitch"],
        start_t=v["bc_steps"] - 1 if v["bc_start"] else None, precision=precision,
        progress=progress, hot_voxels=v["hot_voxels"], fusion_kappa=v["fusion_kappa"] or None,
        null_condition=is_null_conditioned_prior(metadata, resolved.mode), flips=v["flips"],
        std_fwhm_mm=float(v["std_fwhm_mm"]))


def slice_wise_total_counts(slice_counts, volume):
    """Total events of a slice-wise (2D) acquisition of ``volume`` ``(X, Y, Z)`` whose hottest
    axial slice has ``slice_counts`` events and every other slice events in proportion to its
    activity (the BC-DPM paper's protocol)."""
    per_slice = np.clip(np.asarray(volume, dtype=np.float64), 0, None).sum(axis=(0, 1))
    if not per_slice.max() > 0:
        raise ValueError("the volume is empty: no slice activity to scale --bc_slice_counts by")
    return float(slice_counts) * float(per_slice.sum() / per_slice.max())


def resolve_acquisition(given, path=None, volume=None):
    """The simulated low-dose acquisition: ``(kwargs of LowDoseAcquisition without the
    normalisation and voxel size, sources)``.

    :param given: ``{key: value or None}`` for the keys of :data:`ACQUISITION_DEFAULTS`, plus
        ``full_counts`` and ``drf``: without ``total_counts`` or a manifest's counts,
        ``full_counts / drf`` sets the count level; plus ``slice_counts``: the events of the
        hottest axial slice of a slice-wise acquisition (:func:`slice_wise_total_counts` of
        ``volume``, the low-dose ``(X, Y, Z)`` SUV; randoms per slice in proportion to its
        trues, mode ``2d``).
    :param path: the input file; a make_dataset.py subject manifest beside it supplies the
        scanner settings and the file's counts
        (:func:`~guided_diffusion.pet.dataset_manifest.bcdpm_acquisition`).
    Raises ValueError naming ``path`` when no count level is known.
    """
    described = {}
    description = dataset_manifest.describe_file(path) if path and os.path.isfile(path) else None
    if description is not None and description.get("counts") is not None:
        described = dataset_manifest.bcdpm_acquisition(description)
    from_dose = {}
    if given.get("drf") and given.get("full_counts"):
        from_dose["total_counts"] = float(given["full_counts"]) / float(given["drf"])
    if given.get("slice_counts"):
        if given.get("total_counts") or volume is None:
            raise ValueError(f"{path}: --bc_slice_counts needs the input volume and excludes --bc_counts")
        given = dict(given, total_counts=slice_wise_total_counts(given["slice_counts"], volume), mode="2d")
    manifest = dataset_manifest.subject_manifest_path(path) if described else None
    kwargs, sources = {}, {}
    for key, default in ACQUISITION_DEFAULTS.items():
        for source, layer in (("given", given), (manifest, described), ("full_counts / drf", from_dose),
                              ("default", {key: default})):
            if layer.get(key) is not None or source == "default":
                kwargs[key], sources[key] = layer.get(key), source
                break
    if kwargs["total_counts"] is None:
        raise ValueError(f"{path}: the physics guidance needs the low-dose count level: give the "
                         f"counts, or the full-dose counts with the DRF, or a make_dataset.py "
                         f"subject manifest listing the file's counts")
    if given.get("slice_counts"):
        kwargs["randoms_per_slice"], sources["total_counts"] = True, "slice counts"
    return kwargs, sources


def guidance_factory(resolved, metadata, acquisition=None):
    """The guidance factory of resolved settings: BC-DPM's block (bcdpm / hybrid) and/or
    Poisson data consistency (``dc_steps``) on ``acquisition`` (an
    :class:`~.guidance.AcquisitionModel`, or the kwargs of :class:`~.guidance.LowDoseAcquisition`
    from :func:`resolve_acquisition`); ``None`` when neither runs."""
    v = resolved.values
    use_bc, use_dc = uses_bcdpm(resolved.mode), v["dc_steps"] > 0
    if not (use_bc or use_dc):
        return None
    if acquisition is None:
        raise ValueError("the physics guidance needs an acquisition (count level, scanner)")
    if isinstance(acquisition, dict):
        acquisition = LowDoseAcquisition(normalisation=metadata["normalisation"],
                                         voxel_mm=metadata["voxel_mm"], **acquisition)
    bc = BCDPMFactory(acquisition, num_steps_l=v["bc_steps"], lam=v["bc_lambda"],
                      lam_schedule=v["bc_lam_schedule"], sigma_mm=v["bc_sigma_mm"], recon_iters=v["bc_recon_iters"],
                      recon_subsets=v["bc_recon_subsets"],
                      in_plane=metadata["flags"].get("dims") == 2) if use_bc else None
    dc = DataConsistencyFactory(acquisition, num_steps=v["dc_steps"], iters=v["dc_iters"],
                                subsets=v["dc_subsets"], use_ddim=v["use_ddim"]) if use_dc else None
    return chain_factories([bc, dc])


def build_denoiser(model, diffusion, metadata, resolved, *, precision, acquisition=None,
                   progress=True, rank=0, world_size=1):
    """The :class:`~.denoiser.VolumeDenoiser` of resolved settings (checked first)."""
    check_settings(resolved, diffusion.num_timesteps)
    estimate = None if resolved.estimate is None else build_denoiser(
        model, diffusion.respaced(resolved.estimate["timestep_respacing"]), metadata, resolved.estimate,
        precision=precision, acquisition=acquisition, progress=progress, rank=rank, world_size=world_size)
    if resolved["x0_skip_sigma"] is not None:
        diffusion = diffusion.with_x0_skip_sigma(resolved["x0_skip_sigma"])
    return VolumeDenoiser(model, diffusion, metadata, sampling_settings(resolved, metadata, precision, progress),
                          guidance_factory=guidance_factory(resolved, metadata, acquisition),
                          estimate=estimate, rank=rank, world_size=world_size)
