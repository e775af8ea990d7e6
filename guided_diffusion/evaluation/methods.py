"""A diffusion checkpoint as an evaluation method: loaded once, denoising one input at a time.

Every denoiser of the evaluation scripts (quality report, tuning, benchmark) comes from here,
and through :mod:`guided_diffusion.sampling.settings` as ``scripts/test.py``'s does: the
run-level settings (:func:`~guided_diffusion.sampling.settings.resolve_settings` without an
input) choose the timestep respacing the diffusion is built with; each input then gets its own
resolution (the checkpoint's BC-DPM tuning-table row for its noise level) and
:func:`~guided_diffusion.sampling.settings.build_denoiser`. The physics guidance simulates the
acquisition of :func:`~guided_diffusion.sampling.settings.resolve_acquisition`: the given
values, else the input file's make_dataset.py subject manifest.
"""

import sys

import numpy as np

from ..checkpoints import load_model_and_diffusion, read_metadata
from ..sampling import settings
from ..sampling.denoiser import member_network_evaluations, member_seed
from ..sampling.guidance import LowDoseAcquisition


class DiffusionMethod:
    """One checkpoint in one conditioning mode.

    :param model_path: the checkpoint ``.pt`` (with its JSON sidecar).
    :param mode: ``"paired"``, ``"bcdpm"``, ``"hybrid"`` or ``"auto"``
        (:func:`~guided_diffusion.sampling.settings.resolve_mode`; ValueError naming the file
        when the checkpoint cannot serve it).
    :param given: the resolver's ``given`` settings (``{key: value or None}``, e.g.
        :func:`~guided_diffusion.sampling.arguments.given_settings`), ``timestep_respacing``
        included.
    :param device: the torch device.
    :param precision: ``"auto"`` (:func:`~guided_diffusion.sampling.settings.resolve_precision`),
        ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    :param defaults: the resolver's ``defaults`` (e.g. ``bc_steps`` of the paper's noise class).
    :param acquisition: the given acquisition (``resolve_acquisition``'s ``given``; default:
        none, every value from the input's subject manifest).
    """

    def __init__(self, model_path, mode, given, *, device, precision="auto", defaults=None,
                 acquisition=None, progress=False):
        metadata = read_metadata(model_path)
        if metadata is None:
            raise ValueError(f"{model_path}: no JSON sidecar beside the checkpoint")
        self.model_path = model_path
        self.mode = settings.resolve_mode(mode, metadata, model_path)
        self.given = dict(given)
        self.defaults = defaults
        self.acquisition_given = dict(acquisition or {})
        self.progress = progress
        run = settings.resolve_settings(self.given, metadata, self.mode, defaults=defaults)
        self.model, self.diffusion, self.metadata = load_model_and_diffusion(
            model_path, {"timestep_respacing": run["timestep_respacing"]}, device=device)
        settings.check_settings(run, self.diffusion.num_timesteps)
        self.run = run
        self.precision = settings.resolve_precision(
            precision, bool(self.metadata["flags"].get("use_fp16", False)), device)
        self._acquisitions = {}
        for warning in settings.range_warnings(run, self.metadata, model_path):
            print(f"warning: {warning}", file=sys.stderr)

    @property
    def tuning(self):
        """The checkpoint's BC-DPM tuning table where this mode uses it, else ``None``."""
        table = self.metadata.get("sampling", {}).get("bc_tuning")
        return table if settings.uses_bcdpm(self.mode) else None

    def uses_guidance(self, resolved):
        """Whether ``resolved`` settings run the physics guidance (an acquisition is needed)."""
        return settings.uses_bcdpm(self.mode) or resolved["dc_steps"] > 0

    def resolve(self, low_dose, affine=None, **overrides):
        """The settings of one input ``(X, Y, Z)`` (SUV) with its affine (``None``: on the model's
        grid): ``overrides`` win over the method's given settings (``None``: not given)."""
        given = dict(self.given, **overrides)
        return settings.resolve_settings(given, self.metadata, self.mode, low_dose=low_dose,
                                         defaults=self.defaults, affine=affine)

    def acquisition(self, path, known=None):
        """The simulated acquisition of the input file ``path`` (cached per file), or of an
        in-memory case whose acquisition is ``known`` (``resolve_acquisition``'s kwargs; the
        method's given values still win)."""
        if known is not None:
            given = {k: v for k, v in self.acquisition_given.items() if v is not None}
            return self._low_dose_acquisition(dict(known, **given))
        if path not in self._acquisitions:
            kwargs, _ = settings.resolve_acquisition(self.acquisition_given, path)
            self._acquisitions[path] = self._low_dose_acquisition(kwargs)
        return self._acquisitions[path]

    def _low_dose_acquisition(self, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k in settings.ACQUISITION_DEFAULTS}
        return LowDoseAcquisition(normalisation=self.metadata["normalisation"],
                                  voxel_mm=self.metadata["voxel_mm"], **kwargs)

    def denoiser(self, low_dose, path, known_acquisition=None, affine=None, **overrides):
        """``(VolumeDenoiser, Resolved)`` for the input ``low_dose`` (with its ``affine``) of the
        file ``path`` (or of an in-memory case with its ``known_acquisition``)."""
        resolved = self.resolve(low_dose, affine, **overrides)
        acquisition = (self.acquisition(path, known_acquisition) if self.uses_guidance(resolved)
                       else None)
        denoiser = settings.build_denoiser(self.model, self.diffusion, self.metadata, resolved,
                                           precision=self.precision, acquisition=acquisition,
                                           progress=self.progress)
        return denoiser, resolved

    def denoise(self, case, seeds, **overrides):
        """Denoise a case (``low``, ``affine``, ``path`` or ``acquisition``; see :mod:`.cases`) with one member per
        seed: ``(SUV image (X, Y, Z), info)``; ``info`` has ``network_evaluations`` (all
        members and the one-member estimate), ``resolved``
        (:class:`~guided_diffusion.sampling.settings.Resolved`), the denoiser's ``members``
        (their infos), ``image`` (the members' mean or the one-member estimate), ``std``
        (voxel-wise, ``None`` for one seed), ``member_volumes``, ``first`` (the first member's
        volume) and ``members_mean`` (``None`` for one seed)."""
        denoiser, resolved = self.denoiser(case["low"], case["path"], case.get("acquisition"), case["affine"],
                                           **overrides)
        image, std, volumes, info = denoiser.denoise(case["low"], case["affine"], seeds)
        evaluations = sum(member_network_evaluations(m) for m in info["members"] + [info.get("estimate")] if m)
        return image, dict(info, network_evaluations=evaluations, resolved=resolved, std=std, first=volumes[0],
                           member_volumes=volumes,
                           members_mean=np.mean(volumes, axis=0) if len(volumes) > 1 else None)

    def ensemble_size(self, requested=None):
        """``requested`` members, else the checkpoint's ensemble size in this mode
        (:func:`~guided_diffusion.sampling.settings.recommended_members`)."""
        return requested or settings.recommended_members(self.metadata, self.mode)

    @property
    def deterministic(self):
        """True for a one-step regression checkpoint (every member is the same image)."""
        return bool(self.metadata["flags"].get("regression", False))


def case_seeds(seed, case, label, members):
    """The seeds of ``members`` ensemble members for a case and a method ``label``."""
    return [member_seed(seed, f"{case['name']}_{label}", k) for k in range(members)]
