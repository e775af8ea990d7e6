"""The files of a ``scripts/make_dataset.py`` dataset as evaluation cases.

A *case* is one dataset file (a subject, tracer and dose reduction factor) loaded with what an
evaluation needs: the low and full dose, the organ and lesion labels, the body mask and the
voxel size, optionally cropped to an axial slab (a cheap CPU run). The quality report, the
tuning of sampling settings and the benchmark read their inputs through here.
"""

import math
import os

import numpy as np

from ..pet import dataset_manifest, volumes


def add_validation_run_arguments(parser):
    """The flags of a tuning script that denoises validation volumes: which volumes (``--drf
    --max_subjects --z_range``), the body mask (``--mask_suv``), the runtime (threads, seed,
    precision, device) and the patching flags."""
    from ..sampling.arguments import add_patching_arguments
    from ..script_util import add_runtime_arguments

    parser.add_argument("--drf", type=float, nargs="+", default=None, help="DRFs to use (default all)")
    parser.add_argument("--max_subjects", type=int, default=0, help="first N subjects (0: all)")
    parser.add_argument("--z_range", type=int, nargs=2, default=None, metavar=("START", "STOP"))
    parser.add_argument("--mask_suv", type=float, default=0.05, help="body mask: full dose > this SUV")
    add_runtime_arguments(parser, seed_help="sampling seed", device=True)
    add_patching_arguments(parser)


def check_z_range(z_range):
    """Raise ValueError unless ``z_range`` is ``None`` or ``(START, STOP)`` with 0 <= START < STOP."""
    if z_range is not None and not 0 <= z_range[0] < z_range[1]:
        raise ValueError(f"--z_range needs 0 <= START < STOP, got {list(z_range)}")


def body_mask(full_dose, threshold_suv):
    """Voxels of the full-dose image above ``threshold_suv`` (boolean ``(X, Y, Z)``)."""
    mask = np.asarray(full_dose) > threshold_suv
    if not mask.any():
        raise ValueError(f"no full-dose voxel above {threshold_suv} SUV: empty body mask")
    return mask


def crop_z(volume, affine, z_range):
    """Axial slab ``z_range = (start, stop)`` of ``volume`` ``(X, Y, Z)`` and its affine."""
    if z_range is None:
        return volume, affine
    start, stop = z_range
    if stop > volume.shape[2]:
        raise ValueError(f"--z_range {start} {stop} exceeds the {volume.shape[2]} slices")
    shifted = np.array(affine, dtype=np.float64)
    shifted[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, start]) + affine[:3, 3]
    return volume[:, :, start:stop], shifted


def select_files(split_path, split, drfs=None, max_subjects=0):
    """Described dataset files of a split (:func:`~guided_diffusion.pet.dataset_manifest.describe_file`),
    restricted to the dose reduction factors ``drfs`` (``None``: all) and the first
    ``max_subjects`` subjects (0: all)."""
    described = []
    for path in dataset_manifest.split_files(split_path, split):
        description = dataset_manifest.describe_file(path)
        if description is None:
            raise ValueError(f"{path}: no make_dataset.py subject manifest beside it")
        described.append(description)
    if drfs is not None:
        described = [d for d in described if any(math.isclose(d["drf"], f) for f in drfs)]
    subjects = list(dict.fromkeys(d["subject"] for d in described))
    if max_subjects:
        subjects = subjects[:max_subjects]
    chosen = [d for d in described if d["subject"] in subjects]
    if not chosen:
        raise ValueError(f"{split_path}: no {split} file with DRF in {drfs}")
    return chosen


def load_case(description, z_range=None, mask_suv=0.05):
    """One described dataset file as a case (cropped to ``z_range``): the description with
    ``low``, ``full``, ``organs``, ``lesions`` (``None`` where absent), ``affine``,
    ``voxel_mm``, ``mask`` (full dose > ``mask_suv`` SUV) and ``name`` (the file's stem)."""
    path = description["path"]
    low, affine = volumes.load_volume(path, index=0)
    full, _ = volumes.load_volume(path, index=1)
    organs = lesions = None
    if description["organ_labels"]:
        organs, _ = volumes.load_volume(description["organ_labels"])
    if description["lesion_labels"]:
        lesions, _ = volumes.load_volume(description["lesion_labels"])
    arrays = dict(low=low, full=full, organs=organs, lesions=lesions)
    for key, volume in arrays.items():
        if volume is not None and volume.shape != low.shape:
            raise ValueError(f"{path}: {key} volume shape {volume.shape} differs from {low.shape}")
    arrays = {k: None if v is None else crop_z(v, affine, z_range)[0] for k, v in arrays.items()}
    return dict(description, **arrays, affine=crop_z(low, affine, z_range)[1],
                voxel_mm=volumes.voxel_sizes(affine),
                mask=body_mask(arrays["full"], mask_suv),
                name=os.path.splitext(os.path.basename(path))[0])
