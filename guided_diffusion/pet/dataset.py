"""Paired low-/full-dose whole-body PET training data from procedural phantoms.

For every subject (a procedural phantom, :mod:`~guided_diffusion.pet.phantoms`) the PET physics
of :func:`~guided_diffusion.pet.acquisition.simulate_scan` gives a full-dose acquisition
(attenuation, randoms, scatter, the scanner's resolution, Poisson noise) and low-dose ones at
each dose reduction factor (DRF, binomial thinnings of the full-dose counts, so they are
aligned with it), all reconstructed by OSEM into SUV images.

Fixed datasets (the default): every subject and tracer is scanned the same way, the
:data:`SCANNERS` entry's acquisition reconstructed by OSEM ``iterations x subsets`` with its
PSF, at ``voxel_mm``, for the DRFs ``drf``.

Randomised datasets (``randomise``): per subject a
:class:`~guided_diffusion.pet.acquisition.ScanSettings` is drawn
(:data:`~guided_diffusion.pet.acquisition.DEFAULT_RANGES`: reconstruction, PSF, post-filter,
2D / SSRB, randoms, scatter, native voxel size), ``drfs_per_subject`` DRFs log-uniform over
``drf_range``, an anatomy from ``anatomies`` and one tracer from ``tracers``. The phantom is built
on the native grid and, with ``resample`` (default on), the images are resampled linearly to
``voxel_mm`` (the model grid, as ``scripts/test.py`` resamples inputs) and the labels by nearest
neighbour. Settings, anatomies and tracers named in ``hold_out`` are never drawn for train / val
subjects (test subjects draw from everything). The simulation runs on
:data:`SIMULATION_THREADS` torch threads, so the data do not depend on ``--threads``.

Every choice is recorded in the subject manifest's ``sample`` (also in the dataset manifest's
entries); :func:`reproduce_sample` rebuilds a subject's images from it bit for bit.

Output (:attr:`DatasetSettings.out` ``DIR``)::

    manifest.json                dataset: parameters, seed, split, held out settings, one entry per subject
    train.txt val.txt test.txt   the split's .npz files (one per line, relative to DIR)
    preview.png                  with preview: coronal MIPs of the first subject
    s0000/manifest.json          subject: seed, split, sample, uptake, lesions, counts, files (written last)
    s0000/s0000_FDG_drf10.npz    published layout: arr_0 = [low (DRF 10), full], (X, Y, Z) SUV, affine
    s0000/s0000_FDG_full.nii.gz  full-dose image; ..._truth.nii.gz phantom activity (SUV);
    s0000/s0000_FDG_lesions.nii.gz lesion labels; s0000_mu.nii.gz (1/mm), s0000_organs.nii.gz
    (with nifti_lowdose also s0000_FDG_drf10.nii.gz)

A subject is finished when its manifest exists; :func:`make_dataset` skips finished subjects
(resumable) and refuses to mix different parameters into one folder. Subject ``i`` uses the
seed derived from ``(seed, i)``, so the data do not depend on the number of ranks: with an MPI
communicator of N ranks the subjects are shared by estimated cost (:func:`rank_subjects`; for a
fixed dataset rank r makes subjects r, r + N, ...).
"""

import dataclasses
import json
import os
import time
from typing import Optional, Sequence

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from . import acquisition, phantoms, volumes
from .acquisition import SCANNERS, ScanSettings, noise_seed
from .dataset_manifest import SPLIT_NAMES as SPLITS
from .phantoms import ORGAN_LABELS, make_phantom, phantom_grid
from .tracers import TRACERS

DEFAULT_DRFS = (4, 10, 20, 50, 100)
DEFAULT_DRF_RANGE = (2.0, 200.0)
DEFAULT_DRFS_PER_SUBJECT = 3
# Full-dose prompts per mm of axial length: 4e5/mm is 1.32M prompts per 3.3 mm slice (the
# BC-DPM paper's full dose is 1M per slice).
DEFAULT_COUNTS_PER_MM = 4.0e5
#: Torch threads of a randomised subject's simulation (ranks give the parallelism).
SIMULATION_THREADS = 1
#: Fixed cost of a subject in :func:`subject_cost` units (about 2.5 s on the demo scanner).
SUBJECT_OVERHEAD = 3e7
#: Splits whose subjects never draw held-out settings.
HELD_OUT_SPLITS = ("train", "val")
WHOLE_BODY = "whole_body"
#: Environment variables set by mpiexec (MPICH / Open MPI / PMIx).
MPI_ENVIRONMENT = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")
CREATED_BY = "scripts/make_dataset.py"


class DatasetError(ValueError):
    """Settings that cannot make a dataset, or a folder made with other settings."""


def anatomy_names():
    """The phantom anatomy classes (``phantoms.ANATOMIES``)."""
    return tuple(getattr(phantoms, "ANATOMIES", (WHOLE_BODY,)))


@dataclasses.dataclass
class DatasetSettings:
    """Everything :func:`make_dataset` needs (the ``scripts/make_dataset.py`` flags).

    ``drf``, ``iterations`` and ``subsets`` fix the scans of a dataset that is not randomised;
    ``drfs_per_subject``, ``drf_range``, ``anatomies``, ``hold_out`` and ``resample`` (None: on)
    only apply with ``randomise``; ``voxel_mm`` is the output (model) grid.
    """

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
    randomise: bool = False
    drfs_per_subject: int = DEFAULT_DRFS_PER_SUBJECT
    drf_range: Sequence[float] = DEFAULT_DRF_RANGE
    anatomies: Sequence[str] = (WHOLE_BODY,)
    detail: bool = False
    resample: Optional[bool] = None
    hold_out: Sequence[str] = ()

    def checked(self):
        """A copy with DRFs as floats, tracer names upper case and ``resample`` decided;
        DatasetError when invalid."""
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
        unknown = [a for a in self.anatomies if a not in anatomy_names()]
        if unknown:
            raise DatasetError(f"unknown anatomies {unknown}; choose from {list(anatomy_names())}")
        checked = dataclasses.replace(
            self, drf=[float(d) for d in self.drf], tracers=[t.upper() for t in self.tracers],
            anatomies=list(self.anatomies), hold_out=list(self.hold_out),
            drf_range=[float(d) for d in self.drf_range], resample=self.randomise and self.resample is not False)
        if self.randomise:
            checked._check_randomisation()
        elif self.hold_out or list(self.anatomies) != [WHOLE_BODY] or self.resample:
            raise DatasetError("--hold_out, --anatomies and --resample need --randomise")
        return checked

    def _check_randomisation(self):
        low, high = self.drf_range
        if self.drfs_per_subject < 1 or not 1 <= low <= high:
            raise DatasetError(f"--drfs_per_subject must be >= 1 and --drf_range 1 <= LOW <= HIGH, got "
                               f"{self.drfs_per_subject} and {list(self.drf_range)}")
        known = acquisition.possible_tags(self.scan_ranges()) | set(self.anatomies) | set(self.tracers)
        unknown = [label for label in self.hold_out if label not in known]
        if unknown:
            raise DatasetError(f"--hold_out {unknown} match nothing drawn; use settings tags "
                               f"({', '.join(sorted(acquisition.possible_tags(self.scan_ranges())))}), "
                               f"--anatomies or --tracers")
        if set(self.anatomies) <= set(self.hold_out) or set(self.tracers) <= set(self.hold_out):
            raise DatasetError("--hold_out leaves no anatomy or no tracer for training")
        try:
            acquisition.sample_scan_settings(np.random.default_rng(0), self.scan_ranges(), self.hold_out)
        except ValueError as error:
            raise DatasetError(f"--hold_out: {error}") from None

    def scan_ranges(self):
        """What a randomised subject's scan is drawn from: ``DEFAULT_RANGES`` on ``scanner``."""
        return dict(acquisition.DEFAULT_RANGES, scanner=(self.scanner,))

    def config(self):
        """Everything that determines the data (recorded per subject, compared on resume)."""
        config = {"seed": self.seed, "voxel_mm": self.voxel_mm, "drf": [float(d) for d in self.drf],
                  "tracers": list(self.tracers), "scanner": self.scanner,
                  "scanner_settings": SCANNERS[self.scanner], "counts_per_mm": self.counts_per_mm,
                  "fov_mm": self.fov_mm, "osem_iterations": self.iterations,
                  "osem_subsets": self.subsets, "slab": self.slab, "arms": self.arms}
        if self.detail:
            config["detail"] = True
        if not self.randomise:
            return config
        for fixed in ("drf", "osem_iterations", "osem_subsets"):
            del config[fixed]
        config["randomisation"] = {
            "ranges": self.scan_ranges(), "drfs_per_subject": self.drfs_per_subject,
            "drf_range": list(self.drf_range), "anatomies": list(self.anatomies),
            "resample": self.resample, "threads": SIMULATION_THREADS}
        config["held_out"] = {"labels": list(self.hold_out), "splits": list(HELD_OUT_SPLITS)}
        return json.loads(json.dumps(config))


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


def subject_sample(settings, index, split):
    """Every choice that makes subject ``index`` of checked ``settings`` in ``split`` (JSON-able):
    ``seed`` (the phantom's), ``scan`` (ScanSettings dict) and its ``label``, ``anatomy``,
    ``detail``, ``tracers``, ``drfs``, ``noise_seeds`` (one per tracer), ``native_voxel_mm``,
    ``model_voxel_mm``, ``resample``, ``counts_per_mm``, ``fov_mm``, ``slab``, ``arms`` and
    ``held_out`` (what was excluded from its draws). :func:`make_subject` adds ``threads``."""
    seed = subject_seed(settings.seed, index)
    sample = {"randomised": settings.randomise, "seed": seed, "anatomy": WHOLE_BODY,
              "tracers": list(settings.tracers), "drfs": list(settings.drf),
              "model_voxel_mm": settings.voxel_mm, "resample": settings.resample,
              "counts_per_mm": settings.counts_per_mm, "fov_mm": settings.fov_mm, "slab": settings.slab,
              "arms": settings.arms, "held_out": []}
    if settings.randomise:
        held = list(settings.hold_out) if split in HELD_OUT_SPLITS else []
        rngs = [np.random.default_rng([seed, k]) for k in range(1, 5)]
        scan = acquisition.sample_scan_settings(rngs[0], settings.scan_ranges(), held)
        anatomies = [a for a in settings.anatomies if a not in held]
        tracers = [t for t in settings.tracers if t not in held]
        sample.update(drfs=acquisition.sample_drfs(rngs[1], settings.drfs_per_subject, *settings.drf_range),
                      anatomy=anatomies[int(rngs[2].integers(len(anatomies)))],
                      tracers=[tracers[int(rngs[3].integers(len(tracers)))]], held_out=held)
    else:
        scan = acquisition.fixed_scan(settings.scanner, settings.iterations, settings.subsets, settings.voxel_mm)
    sample.update(detail=settings.detail and sample["anatomy"] == WHOLE_BODY, scan=scan.to_dict(),
                  label=scan.label(), native_voxel_mm=scan.voxel_mm,
                  noise_seeds=[noise_seed(seed, i) for i in range(len(sample["tracers"]))])
    return json.loads(json.dumps(sample))


def subject_config(settings, sample):
    """The ``config`` of a subject's manifest: the dataset's, with the ``scanner_settings``
    (preset, mode, view mashing, true PSF, randoms and scatter fractions) of its scan."""
    config = settings.config()
    if sample["randomised"]:
        scan = sample["scan"]
        config["scanner_settings"] = dict(SCANNERS[settings.scanner], mode=scan["mode"],
                                          randoms_fraction=scan["randoms_fraction"],
                                          scatter_fraction=scan["scatter_fraction"])
    return config


def simulate_tracer(sample, tracer_index):
    """The phantom (native grid) and :func:`acquisition.simulate_scan` result of one tracer of
    a subject's ``sample``."""
    scan = ScanSettings.from_dict(sample["scan"])
    options = {}  # the defaults are not passed, so a fixed dataset calls make_phantom as it always did
    if sample["anatomy"] != WHOLE_BODY:
        options["anatomy"] = sample["anatomy"]
    if sample["detail"]:
        options["detail"] = True
    phantom = make_phantom(sample["seed"], voxel_mm=scan.voxel_mm, tracer=sample["tracers"][tracer_index],
                           fov_mm=sample["fov_mm"], arms=sample["arms"], **options)
    result = acquisition.simulate_scan(
        phantom, scan, sample["drfs"], sample["noise_seeds"][tracer_index], sample["counts_per_mm"],
        sample["model_voxel_mm"] if sample["resample"] else None, slab=sample["slab"])
    return phantom, result


def reproduce_sample(entry, tracers=None):
    """Rebuild a subject's images exactly from its subject manifest or dataset manifest entry
    (or its ``sample``): tracer -> :func:`acquisition.simulate_scan` result (``full``,
    ``low`` in ``sample["drfs"]`` order, ...), for ``tracers`` (default all), run on the recorded
    torch thread count."""
    sample = entry.get("sample", entry)
    with acquisition.torch_threads(sample["threads"]):
        return {tracer: simulate_tracer(sample, i)[1] for i, tracer in enumerate(sample["tracers"])
                if tracers is None or tracer in tracers}


def subject_cost(sample):
    """Relative cost of simulating a subject's ``sample``, in voxel-updates of the reconstruction
    (each OSEM sub-iteration over the slabs and their halos, twice with a PSF model) plus the
    phantom's voxels and a fixed overhead (fitted to measured times on the demo scanner)."""
    scan = ScanSettings.from_dict(sample["scan"])
    shape = phantom_grid(voxel_mm=scan.voxel_mm, fov_mm=sample["fov_mm"]).shape
    slab = min(sample["slab"], shape[2])
    slab_voxels = shape[0] * shape[1] * -(-shape[2] // slab) * (slab + 2 * acquisition.halo_slices(scan))
    updates = scan.iterations * scan.subsets * (2 if scan.psf_mm > 0 else 1) + scan.iterations / 3
    return len(sample["tracers"]) * (slab_voxels * updates + float(np.prod(shape)) + SUBJECT_OVERHEAD)


def rank_subjects(settings, splits, rank, size):
    """The subjects rank ``rank`` of ``size`` makes, costliest first: each subject in turn goes to
    the least loaded rank (:func:`subject_cost`; ties to the lowest rank), so when all cost the
    same (a fixed dataset) rank r makes r, r + N, ..."""
    costs = [subject_cost(subject_sample(settings, i, splits[i])) for i in range(settings.subjects)]
    loads, mine = np.zeros(size), []
    for index in sorted(range(settings.subjects), key=lambda i: -costs[i]):
        chosen = int(np.argmin(loads))
        loads[chosen] += costs[index]
        if chosen == rank:
            mine.append(index)
    return mine


def output_grid(phantom, result):
    """The phantom's activity, mu, organ and lesion labels on the grid of ``result``."""
    arrays = phantom.activity, phantom.mu, phantom.organ_labels, phantom.lesion_labels
    if not result["resampled"]:
        return arrays
    voxel = result["voxel_mm"]
    return (*(volumes.resample_image(a, phantom.affine, voxel)[0] for a in arrays[:2]),
            *(acquisition.resample_labels(a, phantom.affine, voxel)[0] for a in arrays[2:]))


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


def make_subject(index, settings, split, preview_path=None):
    """Simulate and write one subject of ``settings`` (checked :class:`DatasetSettings`);
    returns its manifest (written last, atomically). Lesion sizes in it are the phantom's, on
    the native grid."""
    start = time.perf_counter()
    name = subject_name(index)
    folder = os.path.join(settings.out, name)
    os.makedirs(folder, exist_ok=True)
    sample = subject_sample(settings, index, split)
    sample["threads"] = SIMULATION_THREADS if settings.randomise else torch.get_num_threads()
    entry = {"subject": name, "index": index, "seed": sample["seed"], "split": split,
             "config": subject_config(settings, sample), "files": [], "tracers": {}}

    def save(file_name, kind, write, **info):
        write(os.path.join(folder, file_name))
        entry["files"].append({"file": file_name, "kind": kind, **info})

    with acquisition.torch_threads(sample["threads"]):
        for tracer_index, tracer in enumerate(sample["tracers"]):
            phantom, result = simulate_tracer(sample, tracer_index)
            truth, mu, organs, lesions = output_grid(phantom, result)
            affine, full, prompts = result["affine"], result["full"], result["prompts"]
            if tracer_index == 0:
                save(f"{name}_mu.nii.gz", "mu", lambda p: volumes.save_nifti(p, mu, affine))
                save(f"{name}_organs.nii.gz", "organ_labels",
                     lambda p: volumes.save_nifti(p, organs, affine, dtype=np.int16))
            stem = f"{name}_{tracer}"
            save(f"{stem}_truth.nii.gz", "truth", lambda p: volumes.save_nifti(p, truth, affine), tracer=tracer)
            save(f"{stem}_lesions.nii.gz", "lesion_labels",
                 lambda p: volumes.save_nifti(p, lesions, affine, dtype=np.int16), tracer=tracer)
            save(f"{stem}_full.nii.gz", "full_dose", lambda p: volumes.save_nifti(p, full, affine),
                 tracer=tracer, drf=1.0, counts=prompts[0])
            for drf, low, counts in zip(sample["drfs"], result["low"], prompts[1:]):
                save(f"{stem}_{_drf_tag(drf)}.npz", "pair", lambda p: volumes.save_npz(p, low, full, affine),
                     tracer=tracer, drf=float(drf), counts=counts)
                if settings.nifti_lowdose:
                    save(f"{stem}_{_drf_tag(drf)}.nii.gz", "low_dose", lambda p: volumes.save_nifti(p, low, affine),
                         tracer=tracer, drf=float(drf), counts=counts)
            images = [full, *result["low"]]
            entry["tracers"][tracer] = {
                "uptake": phantom.uptake, "lesions": phantom.lesions,
                "expected_full_counts": result["expected_full_counts"],
                "counts": {"full": prompts[0], **{_drf_tag(d): c for d, c in zip(sample["drfs"], prompts[1:])}},
                "liver_noise": liver_noise(images, organs, lesions)}
            if preview_path is not None and tracer_index == 0:
                write_preview(preview_path, truth, images, sample["drfs"], (result["voxel_mm"],) * 3,
                              f"{name} {tracer} ({settings.scanner}, {sample['label']})")
    entry.update(sample=sample, shape=list(full.shape), voxel_mm=[result["voxel_mm"]] * 3, affine=affine.tolist(),
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
                             "seconds": s["seconds"], "sample": s.get("sample"),
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

    mine = rank_subjects(settings, splits, rank, size)
    todo = []
    for index in mine:
        done = read_subject_manifest(settings.out, index)
        if done is None:
            todo.append(index)
        elif done["config"] != json.loads(json.dumps(
                subject_config(settings, subject_sample(settings, index, splits[index])))):
            raise DatasetError(f"{subject_name(index)} in {settings.out} was made with other "
                               f"parameters; use another --out")
    for index in tqdm(todo, desc=f"subjects (rank 0 of {size})", disable=rank != 0):
        preview = os.path.join(settings.out, "preview.png") if settings.preview and index == 0 else None
        make_subject(index, settings, splits[index], preview)
    if comm is not None:
        comm.Barrier()
    if rank == 0:
        write_dataset_manifest(settings, splits)
    return dict(rank=rank, size=size, made=len(todo), finished=len(mine) - len(todo))
