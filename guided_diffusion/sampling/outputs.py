"""What a batch denoising run writes per input, and the store that lets it resume.

Per input ``NAME`` in the save directory: ``NAME_denoised.nii.gz`` / ``.npz`` (ensemble mean,
SUV, input grid and affine), for two or more members ``NAME_uncertainty.nii.gz`` / ``.npz``
(voxel-wise ensemble standard deviation), ``NAME_members.npz`` on request, ``NAME.png`` and
``NAME.json`` (settings, seeds, timings), written last: an input whose JSON exists is finished.
Every file is written to a temporary name and renamed (:mod:`guided_diffusion.pet.volumes`).
"""

import hashlib
import json
import os

import numpy as np

from ..pet import volumes


def output_paths(save_dir, name):
    """The output files of input ``name`` in ``save_dir``."""
    base = os.path.join(save_dir, name)
    return dict(
        denoised_nii=base + "_denoised.nii.gz", denoised_npz=base + "_denoised.npz",
        uncertainty_nii=base + "_uncertainty.nii.gz", uncertainty_npz=base + "_uncertainty.npz",
        members_npz=base + "_members.npz", png=base + ".png", json=base + ".json",
    )


def write_json(path, content):
    """``content`` as indented JSON, atomically."""
    volumes.atomic_write_bytes(path, json.dumps(content, indent=2, sort_keys=True, default=float) + "\n")


def write_outputs(paths, affine, mean, std, members, report, *, save_members=False, draw=None):
    """Write the volumes, then ``draw(paths["png"])`` (the picture), then the JSON report.

    :param std: the uncertainty map, or ``None`` for one member (no uncertainty files then).
    :return: the paths written (the JSON's ``outputs``).
    """
    written = dict(denoised_nii=paths["denoised_nii"], denoised_npz=paths["denoised_npz"])
    volumes.save_nifti(paths["denoised_nii"], mean, affine)
    volumes.save_npz(paths["denoised_npz"], mean, affine=affine)
    if std is not None:
        volumes.save_nifti(paths["uncertainty_nii"], std, affine)
        volumes.save_npz(paths["uncertainty_npz"], std, affine=affine)
        written.update(uncertainty_nii=paths["uncertainty_nii"], uncertainty_npz=paths["uncertainty_npz"])
    if save_members:
        volumes.save_stack(paths["members_npz"], np.stack(members), affine)
        written["members_npz"] = paths["members_npz"]
    if draw is not None:
        draw(paths["png"])
        written["png"] = paths["png"]
    written["json"] = paths["json"]
    write_json(paths["json"], dict(report, outputs=written))
    return written


def run_signature(settings):
    """Short hash of the settings that change a member's result (resume reuses only members
    made with the same settings)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class MemberStore:
    """Finished ensemble members of one input under ``SAVE_DIR/.partial/NAME`` (rank 0 writes)."""

    def __init__(self, save_dir, name, signature):
        self.directory = os.path.join(save_dir, ".partial", name)
        self.signature = signature

    def _path(self, member):
        return os.path.join(self.directory, f"member{member:03d}_{self.signature}.npz")

    def load(self, members):
        """``{member: volume}`` of the finished members among ``range(members)``."""
        done = {}
        for k in range(members):
            if os.path.exists(self._path(k)):
                done[k], _ = volumes.load_volume(self._path(k))
        return done

    def save(self, member, volume, affine):
        os.makedirs(self.directory, exist_ok=True)
        volumes.save_npz(self._path(member), volume, affine=affine)

    def clear(self):
        if os.path.isdir(self.directory):
            for entry in os.listdir(self.directory):
                os.remove(os.path.join(self.directory, entry))
            os.rmdir(self.directory)
