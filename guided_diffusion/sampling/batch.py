"""A batch denoising run over many inputs, as ``scripts/test.py`` drives it.

:class:`BatchRun` holds one loaded checkpoint and what the user asked for; :meth:`BatchRun.denoise`
takes one input: resolves its settings (:mod:`.settings`, the input's own tuning-table row),
builds the denoiser, resumes finished members from the save directory, samples on every rank,
and on rank 0 writes the outputs (:mod:`.outputs`; DICOM series when asked) with the JSON last.
"""

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch.distributed as dist

from .. import dist_util, logger
from ..pet import dicom_writer
from . import outputs, settings
from .denoiser import member_seed

DICOM_OUT = ("auto", "always", "never")


@dataclass
class BatchRun:
    """One run's fixed part.

    :param given, defaults: the resolver's ``given`` flags and replaced defaults.
    :param acquisition_given: the ``--bc_*`` acquisition flags (:func:`~.settings.resolve_acquisition`).
    :param dicom_out: ``"auto"`` (DICOM series for DICOM input), ``"always"`` or ``"never"``.
    :param draw: optional ``draw(png_path, item, mean, std, mode)`` for the picture.
    """

    model: object
    diffusion: object
    metadata: dict
    mode: str
    model_path: str
    save_dir: str
    given: dict
    defaults: dict
    acquisition_given: dict
    precision: str
    seed: int = 0
    num_ensemble: int = 1
    overwrite: bool = False
    save_members: bool = False
    dicom_out: str = "auto"
    draw: Callable = None
    rank: int = 0
    world_size: int = 1

    def signature(self):
        """What a resumed member must share with this run."""
        given = dict(self.given, members=min(self.given.get("members") or 1, 2))  # 2 = any ensemble
        return outputs.run_signature(dict(
            given, defaults=self.defaults, acquisition=self.acquisition_given,
            model_path=self.model_path, seed=self.seed, mode=self.mode, precision=self.precision))

    def build(self, item):
        """``(denoiser, resolved, provenance)`` for one input; ValueError names its file."""
        resolved = settings.resolve_settings(self.given, self.metadata, self.mode,
                                             low_dose=item["low_dose"], defaults=self.defaults,
                                             affine=item["affine"])
        acquisition, provenance = None, dict(counts_source=None, bcdpm=None)
        try:
            if settings.uses_bcdpm(self.mode) or resolved["dc_steps"]:
                acquisition, sources = settings.resolve_acquisition(self.acquisition_given, item["path"],
                                                                     volume=item["low_dose"])
                provenance["counts_source"] = sources["total_counts"]
            denoiser = settings.build_denoiser(
                self.model, self.diffusion, self.metadata, resolved, precision=self.precision,
                acquisition=acquisition, rank=self.rank, world_size=self.world_size)
        except ValueError as error:
            message = str(error).splitlines()[0]
            raise ValueError(message if message.startswith(item["path"])
                             else f"{item['path']}: {message}") from None
        if settings.uses_bcdpm(self.mode):
            provenance["bcdpm"] = bcdpm_report(resolved)
            logger.log(f"{item['name']}: {bcdpm_log(resolved)}")
        elif resolved.sources["x0_skip_sigma"] == "tuning":
            logger.log(f"{item['name']}: ensemble blend width s {resolved['x0_skip_sigma']:.4f} for noise index "
                       f"{resolved.noise_index:.4f} SUV (the checkpoint's ensemble_spread)")
        return denoiser, resolved, provenance

    def denoise(self, item):
        """Denoise one input (``name, path, low_dose, affine``) and write its outputs."""
        paths = outputs.output_paths(self.save_dir, item["name"])
        if os.path.exists(paths["json"]) and not self.overwrite:
            logger.log(f"{item['name']}: outputs exist, skipped (--overwrite to redo)")
            return None
        if (item["low_dose"] < 0).any():
            logger.log(f"{item['name']}: {(item['low_dose'] < 0).mean():.2%} negative voxels clipped to 0")
        denoiser, resolved, provenance = self.build(item)
        seeds = [member_seed(self.seed, item["name"], k) for k in range(self.num_ensemble)]
        store = outputs.MemberStore(self.save_dir, item["name"], self.signature())
        done = self._finished_members(store, item["name"])

        def keep_member(k, volume, info):
            if self.rank == 0:
                store.save(k, volume, item["affine"])
            logger.log(f"{item['name']}: member {k} done in {info['seconds']:.1f} s"
                       f"{describe_post_processing(info)}")

        begin = time.perf_counter()
        mean, std, members, info = denoiser.denoise(item["low_dose"], item["affine"], seeds,
                                                    on_member=keep_member, skip=done)
        seconds = time.perf_counter() - begin
        if std is None:
            logger.log(f"{item['name']}: one ensemble member: no uncertainty map (--num_ensemble >= 2)")
        elif info["image"] != "members' mean":
            logger.log(f"{item['name']}: image: the one-member estimate ("
                       f"{resolved.estimate.describe(['timestep_respacing', 'flips'])}); uncertainty: the std of "
                       f"{len(members)} posterior samples")
        if self.rank == 0:
            report = dict(info, seconds=seconds, seeds=seeds, cond_mode=self.mode,
                          world_size=self.world_size, input=item["path"], **provenance,
                          checkpoint=dict(path=self.model_path, sha256=self.metadata["sha256"]),
                          flags=self.metadata["flags"],
                          uncertainty="ensemble std" if std is not None else "none (one ensemble member)",
                          settings=dict(resolved.values, precision=self.precision, seed=self.seed,
                                        num_ensemble=self.num_ensemble),
                          settings_sources=resolved.sources)
            report["dicom"] = self.write_dicom(item, mean, std)
            draw = None if self.draw is None else (lambda png: self.draw(png, item, mean, std, self.mode))
            outputs.write_outputs(paths, item["affine"], mean, std, members, report,
                                  save_members=self.save_members, draw=draw)
            store.clear()
        dist_util.barrier()
        logger.log(f"{item['name']}: done in {seconds:.1f} s -> {paths['denoised_nii']}")
        return paths

    def _finished_members(self, store, name):
        done = store.load(self.num_ensemble) if not self.overwrite else {}
        if self.world_size > 1:
            shared = [done]
            dist.broadcast_object_list(shared, src=0)
            done = shared[0]
        if done:
            logger.log(f"{name}: resuming, members {sorted(done)} already done")
        return done

    def write_dicom(self, item, mean, std):
        """The outputs as DICOM PET series (``dicom_out``): ``{kind: directory}`` or ``None``."""
        is_dicom = os.path.isdir(item["path"])
        if self.dicom_out == "never" or (self.dicom_out == "auto" and not is_dicom):
            return None
        written = {}
        for kind, volume in (("denoised", mean), ("uncertainty", std)):
            if volume is None:
                continue
            directory = os.path.join(self.save_dir, f"{item['name']}_{kind}_dicom")
            dicom_writer.write_dicom_series(
                directory, volume, item["affine"], reference_dir=item["path"] if is_dicom else None,
                series_description=f"pet-3d-ddpm {kind} ({self.mode}, {os.path.basename(self.model_path)})",
                overwrite=True)
            written[kind] = directory
        return written


def bcdpm_log(resolved):
    """``"BC-DPM l 1 (tuning), lambda 0.3 (tuning), ..."`` for an input's log line."""
    v, s = resolved.values, resolved.sources
    text = (f"BC-DPM l {v['bc_steps']} ({s['bc_steps']}), lambda {v['bc_lambda']:g} ({s['bc_lambda']}), "
            f"schedule {v['bc_lam_schedule']} ({s['bc_lam_schedule']}), "
            f"sigma {v['bc_sigma_mm']:g} mm ({s['bc_sigma_mm']}), hot voxels {v['hot_voxels']} "
            f"({s['hot_voxels']})")
    return text + (f", noise index {resolved.noise_index:.4f} SUV" if resolved.noise_index else "")


def bcdpm_report(resolved):
    """BC-DPM's settings of one input and where each came from (the JSON's ``bcdpm``)."""
    keys = tuple(settings.TUNED_KEYS) + ("bc_start", "bc_lam_schedule")
    return dict({k: resolved[k] for k in keys}, noise_index=resolved.noise_index,
                **{k + "_source": resolved.sources[k] for k in keys})


def describe_post_processing(info):
    """``"; hot voxels ...; fusion ..."`` for a member's log line."""
    text = ""
    hot = info.get("hot_voxels", {})
    if hot.get("mode") == "rescale":
        text += f"; hot voxels from a second pass on the input / {hot['factor']:.2f}"
    fusion = info.get("fusion")
    if fusion is not None:
        if fusion["noise_index"] is None:
            text += "; fusion skipped (too little tissue to measure the noise)"
        else:
            text += (f"; fusion: noise index {fusion['noise_index']:.4f} SUV, mean input weight "
                     f"{fusion['mean_weight']:.2f}")
    return text
