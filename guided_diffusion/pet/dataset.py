"""Paired low-/full-dose whole-body PET training data from procedural phantoms.

For every subject (a procedural phantom, :mod:`~guided_diffusion.pet.phantoms`) and tracer, the
PET physics (projector, simulate, recon) gives a full-dose acquisition: expected counts with
attenuation, randoms, scatter and the scanner resolution (PSF), then a Poisson realisation.
Low-dose acquisitions at each dose reduction factor (DRF) are binomial thinnings of the
full-dose counts, so they are aligned with it and each is Poisson with mean ``ybar / DRF``.
Every acquisition is reconstructed by OSEM with the same PSF model and known attenuation /
randoms / scatter, giving SUV images. The volume is projected slab by slab (2D or SSRB direct
planes), the same projector serving every slab.

Output (:attr:`DatasetSettings.out` ``DIR``)::

    manifest.json                dataset: parameters, seed, split, one entry per subject
    train.txt val.txt test.txt   the split's .npz files (one per line, relative to DIR)
    preview.png                  with preview: coronal MIPs of the first subject
    s0000/manifest.json          subject: seed, split, uptake, lesions, counts, files (written last)
    s0000/s0000_FDG_drf10.npz    published layout: arr_0 = [low (DRF 10), full], (X, Y, Z) SUV, affine
    s0000/s0000_FDG_full.nii.gz  full-dose image; ..._truth.nii.gz phantom activity (SUV);
    s0000/s0000_FDG_lesions.nii.gz lesion labels; s0000_mu.nii.gz (1/mm), s0000_organs.nii.gz
    (with nifti_lowdose also s0000_FDG_drf10.nii.gz)

A subject is finished when its manifest exists; :func:`make_dataset` skips finished subjects
(resumable) and refuses to mix different parameters into one folder. Subject ``i`` uses the
seed derived from ``(seed, i)``, so the data do not depend on the number of ranks: with an MPI
communicator of N ranks, rank r makes subjects r, r + N, ...
"""

import dataclasses
import json
import math
import os
import time
from typing import Optional, Sequence

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from . import recon, simulate, volumes
from .dataset_manifest import SPLIT_NAMES as SPLITS
from .phantoms import ORGAN_LABELS, make_phantom, phantom_grid
from .projector import make_projector
from .tracers import TRACERS

# Acquisition and reconstruction settings per scanner. "demo" is an ECAT-921-like ring used in
# 2D (a 54 cm transaxial field of view holds a whole body with arms at 3.3 mm voxels; the tiny
# "demo" projector preset only covers 16 cm); "quadra" is the Biograph Vision Quadra with SSRB.
SCANNERS = {
    "demo": dict(preset="ecat921_2d", mode="2d", view_mashing=2, psf_fwhm_mm=4.5,
                 randoms_fraction=0.3, scatter_fraction=0.15),
    "quadra": dict(preset="quadra", mode="ssrb", view_mashing=4, psf_fwhm_mm=3.5,
                   randoms_fraction=0.3, scatter_fraction=0.3),
}
DEFAULT_DRFS = (4, 10, 20, 50, 100)
# Full-dose prompts per mm of axial length: 4e5/mm is 1.32M prompts per 3.3 mm slice (the
# BC-DPM paper's full dose is 1M per slice).
DEFAULT_COUNTS_PER_MM = 4.0e5
#: Environment variables set by mpiexec (MPICH / Open MPI / PMIx).
MPI_ENVIRONMENT = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")
CREATED_BY = "scripts/make_dataset.py"


class DatasetError(ValueError):
    """Settings that cannot make a dataset, or a folder made with other settings."""


@dataclasses.dataclass
class DatasetSettings:
    """Everything :func:`make_dataset` needs (the ``scripts/make_dataset.py`` flags)."""

    out: str
    subjects: int
    seed: int = 0
    voxel_mm: float = 3.3
    drf: Sequence[float] = DEFAULT_DRFS
    tracers: Sequence[str] = ("FDG",)
    scanner: str = "demo"
    split: Sequence[float] = (0.8, 0.1, 0.1)
    counts_per_mm: float = DEFAULT_COUNTS_PER_MM
    fov_mm: Optional[Sequence[float]] = None
    iterations: int = 2
    subsets: int = 8
    slab: int = 32
    arms: bool = True
    preview: bool = False
    nifti_lowdose: bool = False

    def checked(self):
        """A copy with DRFs as floats and tracer names upper case; DatasetError when invalid."""
        if self.subjects < 1:
            raise DatasetError(f"--subjects must be >= 1, got {self.subjects}")
        if self.voxel_mm <= 0 or self.counts_per_mm <= 0:
            raise DatasetError("--voxel_mm and --counts_per_mm must be positive")
        if any(d < 1 for d in self.drf) or len(set(self.drf)) != len(self.drf):
            raise DatasetError(f"--drf values must be distinct and >= 1, got {list(self.drf)}")
        unknown = [t for t in self.tracers if t.upper() not in TRACERS]
        if unknown:
            raise DatasetError(f"unknown tracer(s) {unknown}; choose from {sorted(TRACERS)}")
        if self.scanner not in SCANNERS:
            raise DatasetError(f"unknown scanner {self.scanner!r}; choose from {sorted(SCANNERS)}")
        if any(f < 0 for f in self.split) or sum(self.split) <= 0:
            raise DatasetError(f"--split fractions must be >= 0 with a positive sum, got {list(self.split)}")
        if self.iterations < 1 or self.subsets < 1 or self.slab < 1:
            raise DatasetError("--iterations, --subsets and --slab must be >= 1")
        return dataclasses.replace(self, drf=[float(d) for d in self.drf],
                                   tracers=[t.upper() for t in self.tracers])

    def config(self):
        """Everything that determines the data (recorded per subject, compared on resume)."""
        return {"seed": self.seed, "voxel_mm": self.voxel_mm, "drf": [float(d) for d in self.drf],
                "tracers": list(self.tracers), "scanner": self.scanner,
                "scanner_settings": SCANNERS[self.scanner], "counts_per_mm": self.counts_per_mm,
                "fov_mm": self.fov_mm, "osem_iterations": self.iterations,
                "osem_subsets": self.subsets, "slab": self.slab, "arms": self.arms}


def subject_seed(seed, index):
    """Seed of subject ``index`` in a dataset with seed ``seed`` (independent of the rank count)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def subject_name(index):
    return f"s{index:04d}"


def split_subjects(n_subjects, fractions, seed):
    """Subject index -> split name: a seeded permutation cut by the (normalised) fractions."""
    fractions = np.asarray(fractions, dtype=float) / np.sum(fractions)
    order = np.random.default_rng([seed, 5]).permutation(n_subjects)
    n_train = int(round(fractions[0] * n_subjects))
    n_val = min(int(round(fractions[1] * n_subjects)), n_subjects - n_train)
    names = {}
    for position, index in enumerate(order):
        names[int(index)] = SPLITS[0] if position < n_train else SPLITS[1] if position < n_train + n_val else SPLITS[2]
    return names


def _noise_seed(*keys):
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def simulate_scan(activity, mu, projector, drfs, total_counts, settings, n_iter, n_subsets, seed):
    """Full- and low-dose OSEM images of one phantom.

    activity, mu: (X, Y, Z) SUV and 1/mm; projector: for (X, Y, slab) slabs; drfs: low-dose
    factors; total_counts: full-dose expected prompts over the whole volume; settings: a
    :data:`SCANNERS` entry.
    Returns (images (1 + len(drfs), X, Y, Z) float32 [full, low...], prompts per image).
    """
    slab = projector.image_shape[2]
    depth = activity.shape[2]
    n_slabs = math.ceil(depth / slab)
    pad = ((0, 0), (0, 0), (0, n_slabs * slab - depth))
    activity = torch.from_numpy(np.pad(activity, pad))
    mu = torch.from_numpy(np.pad(mu, pad))
    expected = {}
    for k in range(n_slabs):
        part = activity[..., k * slab:(k + 1) * slab]
        if part.sum() > 0:
            expected[k] = simulate.expected_data(
                part, projector, mu[..., k * slab:(k + 1) * slab], counts_per_unit=1.0,
                randoms_fraction=settings["randoms_fraction"], scatter_fraction=settings["scatter_fraction"])
    unit_total = sum(float(e.ybar.sum()) for e in expected.values())
    if unit_total <= 0:
        raise ValueError("the phantom has no activity in the field of view")
    scale = total_counts / unit_total  # counts per unit of projected SUV at full dose
    factors = torch.tensor([1.0] + [float(d) for d in drfs], dtype=torch.float64)
    images = np.zeros((len(factors),) + tuple(activity.shape), np.float32)
    prompts = np.zeros(len(factors))
    for k, data in expected.items():
        full = simulate.poisson(data.ybar * scale, _noise_seed(seed, k, 0))
        counts = torch.stack([full] + [simulate.thin(full, 1.0 / d, _noise_seed(seed, k, 1 + i))
                                       for i, d in enumerate(drfs)])
        prompts += counts.double().sum(dim=(1, 2, 3)).numpy()
        level = (scale / factors).to(counts.dtype)
        additive = data.additive.unsqueeze(0) * level.reshape(-1, 1, 1, 1)
        image = recon.osem(counts, projector, n_iter, n_subsets, mult_factor=data.mult_factor,
                           additive=additive, scale=level)
        images[..., k * slab:(k + 1) * slab] = image.cpu().numpy()
    return images[..., :depth], prompts


def liver_noise(images, truth_labels, lesion_labels):
    """Std (SUV) in the liver interior of each image and of each low-dose minus full-dose image
    (the latter is pure noise: the thinned counts share the full-dose signal)."""
    liver = ndimage.binary_erosion(truth_labels == ORGAN_LABELS["liver"], iterations=2)
    liver &= ~ndimage.binary_dilation(lesion_labels > 0, iterations=2)
    if liver.sum() < 10:
        return None
    return {"image_std": [float(im[liver].std()) for im in images],
            "image_mean": [float(im[liver].mean()) for im in images],
            "difference_std": [float((im - images[0])[liver].std()) for im in images[1:]],
            "n_voxels": int(liver.sum())}


def _drf_tag(drf):
    return f"drf{drf:g}"


def write_preview(path, truth, images, drfs, voxel_mm, title):
    """Coronal maximum-intensity projections: phantom, full dose, each low dose."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("phantom (truth)", truth), ("full dose", images[0])]
    panels += [(f"DRF {d:g}", im) for d, im in zip(drfs, images[1:])]
    vmax = float(np.percentile(truth.max(axis=1), 99.5))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 6.0))
    for axis, (name, volume) in zip(np.atleast_1d(axes), panels):
        axis.imshow(volume.max(axis=1).T, origin="lower", cmap="gray_r", vmin=0, vmax=vmax,
                    aspect=voxel_mm[2] / voxel_mm[0], interpolation="nearest")
        axis.set_title(name, fontsize=9)
        axis.axis("off")
    fig.suptitle(f"{title}: coronal MIPs, SUV 0-{vmax:.0f}", fontsize=10)
    fig.tight_layout()
    volumes.atomic_write(path, lambda temporary: fig.savefig(temporary, dpi=90, format="png"), ".png")
    plt.close(fig)


def _write_json(path, data):
    volumes.atomic_write_bytes(path, json.dumps(data, indent=1))


def scanner_projector(settings):
    """The projector of ``settings.scanner`` for slabs of the phantom grid (``settings.slab``
    slices, at most the grid's depth)."""
    grid = phantom_grid(voxel_mm=settings.voxel_mm, fov_mm=settings.fov_mm).shape
    scanner = SCANNERS[settings.scanner]
    return make_projector(scanner["preset"], (grid[0], grid[1], min(settings.slab, grid[2])),
                          settings.voxel_mm, mode=scanner["mode"], psf_fwhm_mm=scanner["psf_fwhm_mm"],
                          view_mashing=scanner["view_mashing"])


def make_subject(index, settings, split, projector, preview_path=None):
    """Simulate and write one subject of ``settings`` (checked :class:`DatasetSettings`);
    returns its manifest (written last, atomically)."""
    start = time.perf_counter()
    name = subject_name(index)
    folder = os.path.join(settings.out, name)
    os.makedirs(folder, exist_ok=True)
    seed = subject_seed(settings.seed, index)
    scanner = SCANNERS[settings.scanner]
    entry = {"subject": name, "index": index, "seed": seed, "split": split, "config": settings.config(),
             "files": [], "tracers": {}}

    def save(file_name, kind, write, **info):
        write(os.path.join(folder, file_name))
        entry["files"].append({"file": file_name, "kind": kind, **info})

    for tracer_index, tracer in enumerate(settings.tracers):
        phantom = make_phantom(seed, voxel_mm=settings.voxel_mm, tracer=tracer, fov_mm=settings.fov_mm,
                               arms=settings.arms)
        affine = phantom.affine
        if tracer_index == 0:
            save(f"{name}_mu.nii.gz", "mu", lambda p: volumes.save_nifti(p, phantom.mu, affine))
            save(f"{name}_organs.nii.gz", "organ_labels",
                 lambda p: volumes.save_nifti(p, phantom.organ_labels, affine, dtype=np.int16))
        total_counts = settings.counts_per_mm * phantom.activity.shape[2] * phantom.voxel_mm[2]
        images, prompts = simulate_scan(phantom.activity, phantom.mu, projector, settings.drf, total_counts,
                                        scanner, settings.iterations, settings.subsets,
                                        _noise_seed(seed, tracer_index))
        stem = f"{name}_{tracer}"
        save(f"{stem}_truth.nii.gz", "truth", lambda p: volumes.save_nifti(p, phantom.activity, affine),
             tracer=tracer)
        save(f"{stem}_lesions.nii.gz", "lesion_labels",
             lambda p: volumes.save_nifti(p, phantom.lesion_labels, affine, dtype=np.int16), tracer=tracer)
        save(f"{stem}_full.nii.gz", "full_dose", lambda p: volumes.save_nifti(p, images[0], affine),
             tracer=tracer, drf=1.0, counts=float(prompts[0]))
        for i, drf in enumerate(settings.drf):
            low = images[1 + i]
            save(f"{stem}_{_drf_tag(drf)}.npz", "pair", lambda p: volumes.save_npz(p, low, images[0], affine),
                 tracer=tracer, drf=float(drf), counts=float(prompts[1 + i]))
            if settings.nifti_lowdose:
                save(f"{stem}_{_drf_tag(drf)}.nii.gz", "low_dose", lambda p: volumes.save_nifti(p, low, affine),
                     tracer=tracer, drf=float(drf), counts=float(prompts[1 + i]))
        entry["tracers"][tracer] = {
            "uptake": phantom.uptake, "lesions": phantom.lesions, "expected_full_counts": total_counts,
            "counts": {"full": float(prompts[0]),
                       **{_drf_tag(d): float(c) for d, c in zip(settings.drf, prompts[1:])}},
            "liver_noise": liver_noise(images, phantom.organ_labels, phantom.lesion_labels)}
        if preview_path is not None and tracer_index == 0:
            write_preview(preview_path, phantom.activity, images, settings.drf, phantom.voxel_mm,
                          f"{name} {tracer} ({settings.scanner}, {settings.voxel_mm:g} mm)")
    entry.update(shape=list(phantom.activity.shape), voxel_mm=list(phantom.voxel_mm), affine=affine.tolist(),
                 seconds=round(time.perf_counter() - start, 2))
    _write_json(os.path.join(folder, "manifest.json"), entry)
    return entry


def read_subject_manifest(out, index):
    """The manifest of subject ``index`` in the dataset folder ``out``; None until it is finished."""
    return volumes.read_json(os.path.join(out, subject_name(index), "manifest.json"), "subject manifest")


def write_dataset_manifest(settings, splits):
    """The split lists and the dataset manifest, from the finished subjects' manifests."""
    subjects = [read_subject_manifest(settings.out, i) for i in range(settings.subjects)]
    missing = [subject_name(i) for i, s in enumerate(subjects) if s is None]
    if missing:
        raise RuntimeError(f"subjects not finished: {missing}")
    for split in SPLITS:
        lines = [f"{s['subject']}/{f['file']}" for s in subjects if s["split"] == split
                 for f in s["files"] if f["kind"] == "pair"]
        volumes.atomic_write_bytes(os.path.join(settings.out, f"{split}.txt"),
                                   "".join(line + "\n" for line in lines))
    manifest = {"created_by": CREATED_BY, "subjects": settings.subjects, **settings.config(),
                "layout": "arr_0[0] = low dose, arr_0[1] = full dose, (X, Y, Z) SUV; affine in mm",
                "split": {split: [subject_name(i) for i in range(settings.subjects) if splits[i] == split]
                          for split in SPLITS},
                "entries": [{"subject": s["subject"], "seed": s["seed"], "split": s["split"],
                             "seconds": s["seconds"],
                             "files": [{**f, "file": f"{s['subject']}/{f['file']}"} for f in s["files"]]}
                            for s in subjects]}
    _write_json(os.path.join(settings.out, "manifest.json"), manifest)


def mpi_world():
    """MPI.COMM_WORLD when started by mpiexec, else None (one process does everything)."""
    if not any(name in os.environ for name in MPI_ENVIRONMENT):
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD


def make_dataset(settings, comm=None):
    """Make (or finish) the dataset of ``settings`` in ``settings.out``.

    :param settings: :class:`DatasetSettings` (checked here).
    :param comm: an MPI communicator (``Get_rank``, ``Get_size``, ``Barrier``) whose ranks share
        the subjects, or None for one process.
    :return: dict with ``rank``, ``size``, ``made`` (subjects made by this rank) and
        ``finished`` (this rank's subjects that were already there).
    :raises DatasetError: invalid settings, or a finished subject made with other settings.
    """
    settings = settings.checked()
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    os.makedirs(settings.out, exist_ok=True)
    splits = split_subjects(settings.subjects, settings.split, settings.seed)
    config = json.loads(json.dumps(settings.config()))

    mine = list(range(rank, settings.subjects, size))
    todo = []
    for index in mine:
        done = read_subject_manifest(settings.out, index)
        if done is None:
            todo.append(index)
        elif done["config"] != config:
            raise DatasetError(f"{subject_name(index)} in {settings.out} was made with other "
                               f"parameters; use another --out")
    projector = None
    for index in tqdm(todo, desc=f"subjects (rank 0 of {size})", disable=rank != 0):
        if projector is None:
            projector = scanner_projector(settings)
        preview = os.path.join(settings.out, "preview.png") if settings.preview and index == 0 else None
        make_subject(index, settings, splits[index], projector, preview)
    if comm is not None:
        comm.Barrier()
    if rank == 0:
        write_dataset_manifest(settings, splits)
    return dict(rank=rank, size=size, made=len(todo), finished=len(mine) - len(todo))
