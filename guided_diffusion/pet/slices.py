"""The 2D slice dataset of the BC-DPM paper's protocol (Shen et al. 2023, section 3.1).

High-count 2D slices from procedural whole-body phantoms (:func:`make_slices`): subject ``i``
is the phantom of seed ``SeedSequence([seed, i])`` on an ``image_size x image_size``
transaxial grid of ``voxel_mm`` voxels and ``voxel_mm`` slices over 1 m; ``K`` axial slices
per subject are drawn stratified over the body's axial extent (:func:`body_slice_indices`).
The high-count image is the phantom slice blurred in-plane by the scanner resolution
(:func:`high_count_slice`): a noise-free, reconstruction-like reference, the truth of the
low-count simulation. Subjects are split by a seeded permutation into test, validation and
training subjects (:func:`split_of_subjects`).

Layout of a dataset directory ``DIR``::

    DIR/slices/sNNNN_zZZZ.npz    arr_0 = (X, Y, 1) float32 SUV, affine (4x4 mm)
    DIR/train.txt val.txt test.txt    the split's files, one per line, relative to DIR
    DIR/manifest.json            protocol "bcdpm_2d", voxel_mm, parameters, split sizes, slices

:func:`read_manifest` and :func:`load_split` read it back.
"""

import json
import math
import os

import numpy as np

from .dataset_manifest import SPLIT_NAMES
from .filters import fwhm_to_sigma, gaussian_filter
from .phantoms import ANATOMIES, ANATOMY_FOV_MM, make_phantom
from .projector import make_projector
from .volumes import atomic_write, atomic_write_bytes

PROTOCOL = "bcdpm_2d"
SCANNER = "ecat921_2d"            # the paper's scanner, one 2D sinogram per slice
BODY_AXIAL_THRESHOLD = 0.1        # slices with >= 10 % of the busiest slice's activity
MIN_BODY_FOV_MM = 400.0           # a transaxial field of view that holds the body (with arms)
PHANTOM_AXIAL_FOV_MM = 1000.0


def derived_seed(*keys):
    """A 32-bit seed from integer keys (independent streams per subject / level / slice)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def body_slice_indices(activity, n_slices, rng, at_most=False):
    """``n_slices`` axial indices of ``activity`` ``(X, Y, Z)``, stratified over the body.

    The body's extent is the Z range whose slices hold >= 10 % of the busiest slice's activity;
    it is cut into ``n_slices`` equal strata and one slice drawn uniformly in each. A body
    shorter than ``n_slices`` is an error, unless ``at_most`` (then every slice of it is drawn).
    """
    per_slice = activity.sum(axis=(0, 1))
    inside = np.flatnonzero(per_slice >= BODY_AXIAL_THRESHOLD * per_slice.max())
    low, high = int(inside[0]), int(inside[-1]) + 1
    if at_most:
        n_slices = min(n_slices, high - low)
    if high - low < n_slices:
        raise ValueError(f"the body spans {high - low} slices, fewer than the {n_slices} requested")
    edges = np.linspace(low, high, n_slices + 1)
    return [int(min(high - 1, math.floor(a + rng.random() * (b - a)))) for a, b in zip(edges[:-1], edges[1:])]


def high_count_slice(activity_slice, voxel_mm, fwhm_mm):
    """The reference: a 2D phantom slice ``(X, Y)`` blurred in-plane by a Gaussian of
    ``fwhm_mm`` (zeros outside the grid; 0 leaves it unblurred)."""
    sigma_vox = fwhm_to_sigma(fwhm_mm) / voxel_mm
    return gaussian_filter(np.asarray(activity_slice, dtype=np.float32), sigma_vox, mode="constant")


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
    """Write ``arr_0`` = ``(X, Y, 1)`` float32 SUV and the 4x4 ``affine`` (atomic): the
    single-volume layout that ``image_datasets`` reads in unpaired mode."""
    arrays = {"arr_0": np.asarray(image, dtype=np.float32)[:, :, None], "affine": affine}

    def write(temporary):
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(path, write, ".npz")


def subject_kind(seed, index, tracers, anatomies, detail):
    """Subject ``index``'s ``(tracer, anatomy, detail)``: drawn uniformly from ``tracers`` and
    ``anatomies`` (a stream of its own, so one tracer and one anatomy give the same phantoms as
    without the choice); ``detail`` applies to the whole body only."""
    rng = np.random.default_rng(derived_seed(seed, index, 2))
    tracer = tracers[int(rng.integers(len(tracers)))]
    anatomy = anatomies[int(rng.integers(len(anatomies)))]
    return tracer, anatomy, bool(detail and anatomy == "whole_body")


def subject_phantom(subject_seed, voxel_mm, fov_mm, tracer, anatomy, detail):
    """The phantom of one subject on a ``fov_mm`` transaxial grid: the whole body over
    :data:`PHANTOM_AXIAL_FOV_MM`, other anatomies over their own axial extent."""
    axial_mm = PHANTOM_AXIAL_FOV_MM if anatomy == "whole_body" else ANATOMY_FOV_MM[anatomy][2]
    return make_phantom(subject_seed, voxel_mm=voxel_mm, tracer=tracer, fov_mm=(fov_mm, fov_mm, axial_mm),
                        anatomy=anatomy, detail=detail)


def make_slices(out, subjects, seed, slices_per_subject=10, image_size=128, voxel_mm=4.0, fwhm_mm=6.0,
                val_subjects=1, test_subjects=None, tracers=("FDG",), anatomies=("whole_body",), detail=False):
    """Write the slice dataset to ``out`` (see the module docstring) and return its manifest.

    ``test_subjects`` defaults to ``ceil(subjects / 7)`` (the paper's 60 : 10 ratio); the
    transaxial field of view ``image_size * voxel_mm`` must hold a body (>= 400 mm). Each
    subject's tracer and anatomy are drawn from ``tracers`` and ``anatomies``
    (:func:`subject_kind`); ``detail`` adds the whole body's fine structures.
    """
    tracers, anatomies = list(tracers), list(anatomies)
    unknown = [a for a in anatomies if a not in ANATOMIES]
    if not tracers or not anatomies or unknown:
        raise ValueError(f"need one or more tracers and anatomies from {ANATOMIES}, got {tracers} and {anatomies}")
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
    lists = {name: [] for name in SPLIT_NAMES}
    entries = []
    for index in range(subjects):
        subject_seed = derived_seed(seed, index)
        tracer, anatomy, subject_detail = subject_kind(seed, index, tracers, anatomies, detail)
        phantom = subject_phantom(subject_seed, voxel_mm, fov_mm, tracer, anatomy, subject_detail)
        rng = np.random.default_rng(derived_seed(seed, index, 1))
        # the head and dead leaves span ~50 slices at 4 mm: at most that many from them
        for z in body_slice_indices(phantom.activity, slices_per_subject, rng, at_most=anatomy != "whole_body"):
            name = os.path.join("slices", f"s{index:04d}_z{z:03d}.npz")
            affine = phantom.affine.copy()
            affine[:3, 3] += affine[:3, 2] * z  # voxel (i, j, 0) of the slice is voxel (i, j, z)
            save_slice(os.path.join(out, name), high_count_slice(phantom.activity[:, :, z], voxel_mm, fwhm_mm),
                       affine)
            lists[split[index]].append(name)
            entries.append(dict(file=name, subject=index, subject_seed=subject_seed, z=z,
                                z_mm=float(affine[2, 3]), split=split[index], tracer=tracer, anatomy=anatomy,
                                detail=subject_detail))
    for name, files in lists.items():
        atomic_write_bytes(os.path.join(out, f"{name}.txt"), "".join(f + "\n" for f in files))
    manifest = dict(protocol=PROTOCOL, seed=seed, subjects=subjects, slices_per_subject=slices_per_subject,
                    image_size=image_size, voxel_mm=voxel_mm, fwhm_mm=fwhm_mm, tracers=tracers,
                    anatomies=anatomies, detail=bool(detail),
                    split={name: len(files) for name, files in lists.items()}, slices=entries)
    atomic_write_bytes(os.path.join(out, "manifest.json"), json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(slices_dir):
    """The ``manifest.json`` of a :func:`make_slices` dataset (ValueError for anything else)."""
    path = os.path.join(slices_dir, "manifest.json")
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a slice dataset from 'make-slices' ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("protocol") != PROTOCOL:
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
