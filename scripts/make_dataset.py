"""Generate paired low-/full-dose whole-body PET training data from procedural phantoms.

For every subject (a procedural phantom, ``guided_diffusion.pet.phantoms``) and tracer, the PET
physics (``guided_diffusion.pet``: projector, simulate, recon) gives a full-dose acquisition:
expected counts with attenuation, randoms, scatter and the scanner resolution (PSF), then a
Poisson realisation. Low-dose acquisitions at each dose reduction factor (DRF) are binomial
thinnings of the full-dose counts, so they are aligned with it and each is Poisson with mean
``ybar / DRF``. Every acquisition is reconstructed by OSEM with the same PSF model and known
attenuation / randoms / scatter, giving SUV images. The volume is projected slab by slab (2D or
SSRB direct planes), the same projector serving every slab.

Output (``--out DIR``)::

    manifest.json                dataset: parameters, seed, split, one entry per subject
    train.txt val.txt test.txt   the split's .npz files (one per line, relative to DIR)
    preview.png                  with --preview: coronal MIPs of the first subject
    s0000/manifest.json          subject: seed, split, uptake, lesions, counts, files (written last)
    s0000/s0000_FDG_drf10.npz    published layout: arr_0 = [low (DRF 10), full], (X, Y, Z) SUV, affine
    s0000/s0000_FDG_full.nii.gz  full-dose image; ..._truth.nii.gz phantom activity (SUV);
    s0000/s0000_FDG_lesions.nii.gz lesion labels; s0000_mu.nii.gz (1/mm), s0000_organs.nii.gz
    (with --nifti_lowdose also s0000_FDG_drf10.nii.gz)

A subject is finished when its manifest exists; a re-run skips finished subjects (resumable) and
refuses to mix different parameters into one folder. Subject ``i`` uses the seed derived from
``(--seed, i)``, so the data do not depend on the number of ranks. Under ``mpiexec -n N`` rank r
takes subjects r, r + N, ...; without ``mpiexec`` one process does all.

Example: ``python scripts/make_dataset.py --out data/phantoms --subjects 20 --seed 0 --preview``
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm


from guided_diffusion.pet import recon, simulate, volumes
from guided_diffusion.pet.phantoms import ORGAN_LABELS, make_phantom, phantom_grid
from guided_diffusion.pet.projector import make_projector
from guided_diffusion.pet.tracers import TRACERS

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
# Full-dose prompts per mm of axial length. 4e5/mm gives ~1.3M counts per 3.3 mm slice (the
# BC-DPM paper's full dose is 1M per slice) and a liver noise of ~10 % at full dose.
DEFAULT_COUNTS_PER_MM = 4.0e5
SPLITS = ("train", "val", "test")
MPI_ENVIRONMENT = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--subjects", type=int, required=True, help="number of subjects")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--voxel_mm", type=float, default=3.3, help="isotropic voxel size (mm)")
    parser.add_argument("--drf", type=float, nargs="+", default=list(DEFAULT_DRFS),
                        help="dose reduction factors of the low-dose images")
    parser.add_argument("--tracers", nargs="+", default=["FDG"], help=f"tracers: {sorted(TRACERS)}")
    parser.add_argument("--scanner", choices=sorted(SCANNERS), default="demo")
    parser.add_argument("--split", type=float, nargs=3, default=[0.8, 0.1, 0.1],
                        metavar=("TRAIN", "VAL", "TEST"), help="subject fractions")
    parser.add_argument("--preview", action="store_true", help="write preview.png for the first subject")
    parser.add_argument("--counts_per_mm", type=float, default=DEFAULT_COUNTS_PER_MM,
                        help="full-dose prompts per mm of axial field of view")
    parser.add_argument("--fov_mm", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="phantom field of view (default: the phantom's whole-body FOV)")
    parser.add_argument("--iterations", type=int, default=2, help="OSEM iterations")
    parser.add_argument("--subsets", type=int, default=8, help="OSEM subsets")
    parser.add_argument("--slab", type=int, default=32, help="slices projected together")
    parser.add_argument("--no_arms", action="store_true", help="phantoms without arms")
    parser.add_argument("--nifti_lowdose", action="store_true", help="also write low-dose NIfTI files")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / ranks)")
    return parser


def check_args(args):
    if args.subjects < 1:
        raise ValueError(f"--subjects must be >= 1, got {args.subjects}")
    if args.voxel_mm <= 0 or args.counts_per_mm <= 0:
        raise ValueError("--voxel_mm and --counts_per_mm must be positive")
    if any(d < 1 for d in args.drf) or len(set(args.drf)) != len(args.drf):
        raise ValueError(f"--drf values must be distinct and >= 1, got {args.drf}")
    unknown = [t for t in args.tracers if t.upper() not in TRACERS]
    if unknown:
        raise ValueError(f"unknown tracer(s) {unknown}; choose from {sorted(TRACERS)}")
    args.tracers = [t.upper() for t in args.tracers]
    if any(f < 0 for f in args.split) or sum(args.split) <= 0:
        raise ValueError(f"--split fractions must be >= 0 with a positive sum, got {args.split}")
    if args.iterations < 1 or args.subsets < 1 or args.slab < 1:
        raise ValueError("--iterations, --subsets and --slab must be >= 1")


def config_of(args):
    """Everything that determines the data (compared on resume)."""
    return {"seed": args.seed, "voxel_mm": args.voxel_mm, "drf": [float(d) for d in args.drf],
            "tracers": list(args.tracers), "scanner": args.scanner, "scanner_settings": SCANNERS[args.scanner],
            "counts_per_mm": args.counts_per_mm, "fov_mm": args.fov_mm, "osem_iterations": args.iterations,
            "osem_subsets": args.subsets, "slab": args.slab, "arms": not args.no_arms}


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
    factors; total_counts: full-dose expected prompts over the whole volume.
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


def write_text(path, text):
    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)

    volumes.atomic_write(path, write, os.path.splitext(path)[1])


def write_json(path, data):
    write_text(path, json.dumps(data, indent=1))


def make_subject(index, args, split, projector, preview_path=None):
    """Simulate and write one subject; returns its manifest (written last, atomically)."""
    start = time.perf_counter()
    name = subject_name(index)
    folder = os.path.join(args.out, name)
    os.makedirs(folder, exist_ok=True)
    seed = subject_seed(args.seed, index)
    settings = SCANNERS[args.scanner]
    entry = {"subject": name, "index": index, "seed": seed, "split": split, "config": config_of(args),
             "files": [], "tracers": {}}

    def save(file_name, kind, write, **info):
        write(os.path.join(folder, file_name))
        entry["files"].append({"file": file_name, "kind": kind, **info})

    for tracer_index, tracer in enumerate(args.tracers):
        phantom = make_phantom(seed, voxel_mm=args.voxel_mm, tracer=tracer, fov_mm=args.fov_mm,
                               arms=not args.no_arms)
        affine = phantom.affine
        if tracer_index == 0:
            save(f"{name}_mu.nii.gz", "mu", lambda p: volumes.save_nifti(p, phantom.mu, affine))
            save(f"{name}_organs.nii.gz", "organ_labels",
                 lambda p: volumes.save_nifti(p, phantom.organ_labels, affine, dtype=np.int16))
        total_counts = args.counts_per_mm * phantom.activity.shape[2] * phantom.voxel_mm[2]
        images, prompts = simulate_scan(phantom.activity, phantom.mu, projector, args.drf, total_counts,
                                        settings, args.iterations, args.subsets,
                                        _noise_seed(seed, tracer_index))
        stem = f"{name}_{tracer}"
        save(f"{stem}_truth.nii.gz", "truth", lambda p: volumes.save_nifti(p, phantom.activity, affine),
             tracer=tracer)
        save(f"{stem}_lesions.nii.gz", "lesion_labels",
             lambda p: volumes.save_nifti(p, phantom.lesion_labels, affine, dtype=np.int16), tracer=tracer)
        save(f"{stem}_full.nii.gz", "full_dose", lambda p: volumes.save_nifti(p, images[0], affine),
             tracer=tracer, drf=1.0, counts=float(prompts[0]))
        for i, drf in enumerate(args.drf):
            low = images[1 + i]
            save(f"{stem}_{_drf_tag(drf)}.npz", "pair", lambda p: volumes.save_npz(p, low, images[0], affine),
                 tracer=tracer, drf=float(drf), counts=float(prompts[1 + i]))
            if args.nifti_lowdose:
                save(f"{stem}_{_drf_tag(drf)}.nii.gz", "low_dose", lambda p: volumes.save_nifti(p, low, affine),
                     tracer=tracer, drf=float(drf), counts=float(prompts[1 + i]))
        entry["tracers"][tracer] = {
            "uptake": phantom.uptake, "lesions": phantom.lesions, "expected_full_counts": total_counts,
            "counts": {"full": float(prompts[0]), **{_drf_tag(d): float(c) for d, c in zip(args.drf, prompts[1:])}},
            "liver_noise": liver_noise(images, phantom.organ_labels, phantom.lesion_labels)}
        if preview_path is not None and tracer_index == 0:
            write_preview(preview_path, phantom.activity, images, args.drf, phantom.voxel_mm,
                          f"{name} {tracer} ({args.scanner}, {args.voxel_mm:g} mm)")
    entry.update(shape=list(phantom.activity.shape), voxel_mm=list(phantom.voxel_mm), affine=affine.tolist(),
                 seconds=round(time.perf_counter() - start, 2))
    write_json(os.path.join(folder, "manifest.json"), entry)
    return entry


def read_subject_manifest(out, index):
    path = os.path.join(out, subject_name(index), "manifest.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def write_dataset_manifest(args, splits):
    subjects = [read_subject_manifest(args.out, i) for i in range(args.subjects)]
    missing = [subject_name(i) for i, s in enumerate(subjects) if s is None]
    if missing:
        raise RuntimeError(f"subjects not finished: {missing}")
    for split in SPLITS:
        lines = [f"{s['subject']}/{f['file']}" for s in subjects if s["split"] == split
                 for f in s["files"] if f["kind"] == "pair"]
        write_text(os.path.join(args.out, f"{split}.txt"), "".join(line + "\n" for line in lines))
    manifest = {"created_by": "scripts/make_dataset.py", "subjects": args.subjects, **config_of(args),
                "layout": "arr_0[0] = low dose, arr_0[1] = full dose, (X, Y, Z) SUV; affine in mm",
                "split": {split: [subject_name(i) for i in range(args.subjects) if splits[i] == split]
                          for split in SPLITS},
                "entries": [{"subject": s["subject"], "seed": s["seed"], "split": s["split"],
                             "seconds": s["seconds"],
                             "files": [{**f, "file": f"{s['subject']}/{f['file']}"} for f in s["files"]]}
                            for s in subjects]}
    write_json(os.path.join(args.out, "manifest.json"), manifest)


def _mpi_world():
    """MPI.COMM_WORLD when started by mpiexec, else None (one process does everything)."""
    if not any(name in os.environ for name in MPI_ENVIRONMENT):
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD


def main(argv=None):
    args = create_argparser().parse_args(argv)
    try:
        check_args(args)
    except ValueError as error:
        print(f"make_dataset.py: error: {error}", file=sys.stderr)
        return 2
    comm = _mpi_world()
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // size))
    os.makedirs(args.out, exist_ok=True)
    splits = split_subjects(args.subjects, args.split, args.seed)
    config = config_of(args)

    mine = list(range(rank, args.subjects, size))
    todo = []
    for index in mine:
        done = read_subject_manifest(args.out, index)
        if done is None:
            todo.append(index)
        elif done["config"] != json.loads(json.dumps(config)):
            print(f"make_dataset.py: error: {subject_name(index)} in {args.out} was made with other "
                  f"parameters; use another --out", file=sys.stderr)
            return 2
    projector = None
    for index in tqdm(todo, desc=f"subjects (rank 0 of {size})", disable=rank != 0):
        if projector is None:
            grid = phantom_grid(voxel_mm=args.voxel_mm, fov_mm=args.fov_mm).shape
            settings = SCANNERS[args.scanner]
            projector = make_projector(settings["preset"], (grid[0], grid[1], min(args.slab, grid[2])),
                                       args.voxel_mm, mode=settings["mode"], psf_fwhm_mm=settings["psf_fwhm_mm"],
                                       view_mashing=settings["view_mashing"])
        preview = os.path.join(args.out, "preview.png") if args.preview and index == 0 else None
        make_subject(index, args, splits[index], projector, preview)
    if comm is not None:
        comm.Barrier()
    if rank == 0:
        write_dataset_manifest(args, splits)
        print(f"{args.subjects} subject(s) in {args.out} ({len(todo)} made here, "
              f"{len(mine) - len(todo)} already finished)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
