"""
3D PET volume patches for training.

Model space
    :func:`suv_to_model` is THE map from SUV to what the diffusion model sees, and
    :func:`model_to_suv` its inverse; training, sampling and evaluation all call them with the
    checkpoint's ``normalisation`` dict ``{clip, scale, range}``: SUV is clipped to
    ``[0, clip]``, divided by ``scale`` and mapped linearly from ``[0, 1]`` onto ``range``
    (default clip 16, scale 16, range [-1, 1]; the published weights use range [0, 1]).

Data directory (searched recursively, files sorted by path)
    * ``*.npz`` in the published layout: ``arr_0[0]`` low-dose and ``arr_0[1]`` full-dose,
      each ``(X, Y, Z)`` in SUV. A 3D ``arr_0`` is a single full-dose volume (unpaired only).
    * NIfTI (``*.nii`` / ``*.nii.gz``): ``NAME_low[TAG].nii.gz`` is paired with
      ``NAME_full[TAG].nii.gz`` if present, else with ``NAME_full.nii.gz`` (so several dose
      levels ``sub01_low_drf4``, ``sub01_low_drf10`` share ``sub01_full``). In unpaired mode
      every NIfTI without ``_low`` in its name is a full-dose volume.
    Every file (every dose level of every subject) is one sample source; sources are mixed.

Sampling
    Sample ``k`` of rank ``r`` is a pure function of ``(seed, r, k)``: its source file, patch
    position, flip and intensity factor come from ``numpy.random.default_rng([seed, r, k])``.
    The batch iterator therefore resumes exactly from its counter (``state_dict``).
    Patches are biased toward the body: a patch whose full-dose mean is below
    ``body_threshold_suv`` is redrawn with probability ``1 - background_keep_prob``.
    Volumes smaller than the patch are zero-padded (at the high-index end of each axis).

2D models (``dims=2``)
    A 2D prior (the BC-DPM paper's protocol) trains on single slices: patch size ``(1, X, Y)``
    and ``dims=2`` make every item ``(1, X, Y)`` (the Z axis of size 1 dropped), so batches are
    ``(B, 1, X, Y)`` as a 2D UNet expects. Slice files are ordinary ``(X, Y, 1)`` volumes.
"""

import collections
import os

import numpy as np
import torch as th

from . import dist_util, logger
from .normalisation import (  # noqa: F401  (re-exported: the one SUV <-> model mapping)
    DEFAULT_NORMALISATION,
    model_to_suv,
    null_condition_like,
    resolve_normalisation,
    suv_to_model,
)
from .pet.volumes import read_json

_NIFTI_SUFFIXES = (".nii.gz", ".nii")


# ----------------------------------------------------------------------------- sources


def _strip_nifti_suffix(name):
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return None, None


def _split_list(path):
    """The files a ``SPLIT.txt`` list names (relative to its folder)."""
    base = os.path.dirname(path)
    with open(path, encoding="utf-8") as handle:
        return [os.path.join(base, line.strip()) for line in handle if line.strip()]


def _candidate_files(data_dir, split):
    """``(files, split lists)``: the files the ``split.txt`` lists under ``data_dir`` name, or
    every file below it when there are no such lists; both sorted. Symbolic links to folders are
    followed: a folder of links to several datasets trains on their union."""
    if not data_dir or not os.path.isdir(data_dir):
        raise ValueError(f"data directory {data_dir!r} does not exist")
    files = sorted(
        os.path.join(root, f) for root, _, names in os.walk(data_dir, followlinks=True) for f in names
    )
    split_lists = [f for f in files if os.path.basename(f) == f"{split}.txt"]
    if split_lists:
        files = sorted(path for split_list in split_lists for path in _split_list(split_list))
    return files, split_lists


def list_volume_sources(data_dir, paired, split="train"):
    """
    Find the sample sources under ``data_dir``.

    Datasets from ``scripts/make_dataset.py`` carry split lists: when ``SPLIT.txt`` files
    (``train.txt`` by default; ``val.txt`` for validation) exist under ``data_dir``, only the
    volumes they list (paths relative to each list) are used, so validation/test subjects and
    the phantom truth, attenuation and label volumes never enter training. Otherwise every
    ``.npz`` and NIfTI file below ``data_dir`` is a candidate.

    :return: sorted list of ``(low_path, full_path, npz)`` tuples: for ``.npz`` both paths
        are the file and ``npz`` is True; for NIfTI ``low_path`` is None in unpaired mode.
    """
    files, split_lists = _candidate_files(data_dir, split)
    existing = set(files)
    sources = []
    for path in files:
        if path.endswith(".npz"):
            sources.append((path, path, True))
            continue
        stem, suffix = _strip_nifti_suffix(path)
        if stem is None:
            continue
        name = os.path.basename(stem)
        if "_low" in name:
            if paired:
                sources.append((path, _full_partner(stem, suffix, existing, path), False))
        elif paired and "_full" in name:
            continue
        elif not paired:
            sources.append((None, path, False))
    if not sources:
        listed_in = f" listed in its {split}.txt files" if split_lists else ""
        raise ValueError(f"no .npz or NIfTI volumes found in {data_dir}{listed_in}")
    return sources


def _full_partner(stem, suffix, existing, low_path):
    head, _, tag = stem.rpartition("_low")
    for candidate in (f"{head}_full{tag}{suffix}", f"{head}_full{suffix}"):
        if candidate in existing:
            return candidate
    raise ValueError(f"no full-dose partner ({head}_full{tag}{suffix} or {head}_full{suffix}) for {low_path}")


#: Dataset manifest entries that say how a data directory was made (``scripts/make_dataset.py``).
DATASET_KEYS = ("created_by", "seed", "subjects", "voxel_mm", "voxel_size_mm", "drf", "tracers",
                "scanner", "counts_per_mm", "fov_mm", "osem_iterations", "osem_subsets", "slab",
                "arms")


def _manifest(folder):
    return read_json(os.path.join(folder, "manifest.json"), "dataset manifest")


def manifest_voxel_mm(data_dir):
    """``voxel_mm`` (or ``voxel_size_mm``) of ``data_dir/manifest.json``; None without one."""
    content = _manifest(data_dir) or {}
    for key in ("voxel_mm", "voxel_size_mm"):
        if key in content:
            return content[key]
    return None


def describe_datasets(data_dir, split="train"):
    """How the ``split`` volumes of ``data_dir`` were made, in words a model card can keep (no
    paths of this machine): one dict per non-empty ``SPLIT.txt`` list under ``data_dir`` (or
    one for ``data_dir`` itself without lists) with ``path`` (its folder relative to
    ``data_dir``), ``files`` (how many the list names; None without lists) and, from the
    ``manifest.json`` beside it, the :data:`DATASET_KEYS` entries and ``split_subjects`` (how
    many subjects the split has; the manifest lists them or counts them)."""
    _, split_lists = _candidate_files(data_dir, split)
    folders = [(os.path.dirname(path), len(_split_list(path))) for path in split_lists]
    folders = [(folder, files) for folder, files in folders if files]
    descriptions = []
    for folder, files in folders or [(data_dir, None)]:
        manifest = _manifest(folder) or {}
        entry = dict(path=os.path.relpath(folder, data_dir), files=files)
        entry.update({key: manifest[key] for key in DATASET_KEYS if key in manifest})
        if isinstance(manifest.get("split"), dict) and split in manifest["split"]:
            subjects = manifest["split"][split]  # a list of subjects, or their count
            entry["split_subjects"] = subjects if isinstance(subjects, int) else len(subjects)
        descriptions.append(entry)
    return descriptions


def read_source(source, paired):
    """
    Read one source as float32 SUV arrays ``(low, full)`` of shape ``(X, Y, Z)``
    (``low`` is None when not ``paired``).
    """
    low_path, full_path, is_npz = source
    if is_npz:
        with np.load(full_path) as f:
            if "arr_0" not in f:
                raise ValueError(f"{full_path}: no 'arr_0' array")
            arr = f["arr_0"]
        if arr.ndim == 3 and not paired:
            return None, arr.astype(np.float32)
        if arr.ndim != 4 or arr.shape[0] < 2:
            raise ValueError(
                f"{full_path}: arr_0 has shape {arr.shape}; expected (2, X, Y, Z) "
                f"[low, full]{'' if paired else ' or a single (X, Y, Z) volume'}"
            )
        low = arr[0].astype(np.float32) if paired else None
        return low, arr[1].astype(np.float32)
    import nibabel as nib

    def load(path):
        data = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        if data.ndim != 3:
            raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
        return data

    low = load(low_path) if paired else None
    full = load(full_path)
    if low is not None and low.shape != full.shape:
        raise ValueError(f"{low_path} {low.shape} and {full_path} {full.shape} differ in shape")
    return low, full


# ----------------------------------------------------------------------------- patches


def _pad_to(volume, shape):
    pad = [(0, max(0, s - v)) for v, s in zip(volume.shape, shape)]
    return np.pad(volume, pad) if any(p[1] for p in pad) else volume


class VolumePatchDataset(th.utils.data.Dataset):
    """
    Random 3D patches from a list of sources; item ``k`` is deterministic in ``(seed, shard, k)``.

    ``dataset[k]`` returns ``(full, kwargs)``: ``full`` a float32 tensor ``(1, Z, X, Y)`` in
    model space (``(1, X, Y)`` with ``dims=2``), ``kwargs`` holding ``low_res`` of the same shape
    when ``paired``.

    :param patch_size: ``(Z, X, Y)`` patch size in voxels (model axis order).
    :param random_flip: flip low and full together along X (left-right) with probability 1/2.
    :param intensity_jitter: multiply low and full SUV by one factor drawn from
        ``U(1 - j, 1 + j)`` before normalisation.
    :param length: ``len(dataset)`` for ``DataLoader`` use (items beyond are valid too).
    :param cache_volumes: number of decoded sources kept in memory (least recently used out).
    :param dims: 3 (volume patches) or 2 (single slices for a 2D model: needs ``Z == 1`` in
        ``patch_size``; the Z axis is dropped from every item).
    :param cond_dropout: paired only: probability that an item's ``low_res`` is replaced by the
        null condition (:func:`~guided_diffusion.normalisation.null_condition_like`, an
        empty volume), so that one model also learns the unconditional prior.
    """

    def __init__(
        self,
        sources,
        patch_size,
        *,
        paired,
        random_flip=True,
        intensity_jitter=0.0,
        normalisation=None,
        seed=0,
        shard=0,
        body_threshold_suv=0.05,
        background_keep_prob=0.1,
        max_redraws=10,
        length=10**6,
        cache_volumes=8,
        dims=3,
        cond_dropout=0.0,
    ):
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints (Z, X, Y), got {patch_size}")
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        if dims == 2 and patch_size[0] != 1:
            raise ValueError(f"dims=2 trains on single slices: patch_size must be (1, X, Y), got {patch_size}")
        if not 0.0 <= intensity_jitter < 1.0:
            raise ValueError(f"intensity_jitter must be in [0, 1), got {intensity_jitter}")
        if not sources:
            raise ValueError("VolumePatchDataset needs at least one source")
        if not 0.0 <= cond_dropout < 1.0 or (cond_dropout and not paired):
            raise ValueError(f"cond_dropout must be in [0, 1) and needs paired data, got "
                             f"{cond_dropout} (paired={paired})")
        self.sources = list(sources)
        self.patch_zxy = tuple(int(p) for p in patch_size)
        self.paired = paired
        self.random_flip = random_flip
        self.intensity_jitter = intensity_jitter
        self.normalisation = resolve_normalisation(normalisation)
        self.seed = seed
        self.shard = shard
        self.body_threshold_suv = body_threshold_suv
        self.background_keep_prob = background_keep_prob
        self.max_redraws = max_redraws
        self.length = length
        self.cache_volumes = cache_volumes
        self.dims = dims
        self.cond_dropout = float(cond_dropout)
        self._cache = collections.OrderedDict()

    def __len__(self):
        return self.length

    def _volumes(self, index):
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        low, full = read_source(self.sources[index], self.paired)
        patch_xyz = (self.patch_zxy[1], self.patch_zxy[2], self.patch_zxy[0])
        full = _pad_to(full, patch_xyz)
        low = None if low is None else _pad_to(low, patch_xyz)
        self._cache[index] = (low, full)
        if len(self._cache) > self.cache_volumes:
            self._cache.popitem(last=False)
        return low, full

    def source_index(self, k, rng):
        """Source of item ``k``: drawn at random (the generator passes ``rng``)."""
        return int(rng.integers(len(self.sources)))

    def _draw_corner(self, full, rng):
        pz, px, py = self.patch_zxy
        shape = full.shape
        for _ in range(self.max_redraws):
            corner = [int(rng.integers(s - p + 1)) for s, p in zip(shape, (px, py, pz))]
            block = full[corner[0] : corner[0] + px, corner[1] : corner[1] + py, corner[2] : corner[2] + pz]
            if block.mean() >= self.body_threshold_suv or rng.random() < self.background_keep_prob:
                break
        return corner

    def __getitem__(self, k):
        rng = np.random.default_rng([self.seed, self.shard, int(k)])
        low, full = self._volumes(self.source_index(k, rng))
        x0, y0, z0 = self._draw_corner(full, rng)
        pz, px, py = self.patch_zxy
        flip = self.random_flip and rng.random() < 0.5
        factor = 1.0 + self.intensity_jitter * (2.0 * rng.random() - 1.0)

        def to_tensor(volume):
            block = volume[x0 : x0 + px, y0 : y0 + py, z0 : z0 + pz] * np.float32(factor)
            block = np.transpose(block, (2, 0, 1))  # (X, Y, Z) -> (Z, X, Y)
            if flip:
                block = block[:, ::-1, :]
            model = suv_to_model(np.ascontiguousarray(block), self.normalisation)
            if self.dims == 2:
                model = model[0]  # (1, X, Y) -> (X, Y): one slice
            return th.from_numpy(model.astype(np.float32))[None]

        kwargs = {"low_res": to_tensor(low)} if self.paired else {}
        if self.cond_dropout and rng.random() < self.cond_dropout:
            kwargs["low_res"] = null_condition_like(kwargs["low_res"], self.normalisation)
        return to_tensor(full), kwargs


class OrderedVolumePatchDataset(VolumePatchDataset):
    """Item ``k`` comes from source ``k % len(sources)`` (cyclic order, random positions)."""

    def source_index(self, k, rng):
        return int(k) % len(self.sources)


class PatchBatchIterator:
    """
    Endless iterator of ``(batch, kwargs)`` from a dataset, ``batch_size`` items per step.

    ``state_dict()`` / ``load_state_dict()`` save and restore the position exactly.
    """

    def __init__(self, dataset, batch_size):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.next_index = 0

    def __iter__(self):
        return self

    def __next__(self):
        items = [self.dataset[self.next_index + i] for i in range(self.batch_size)]
        self.next_index += self.batch_size
        batch = th.stack([x for x, _ in items])
        kwargs = {key: th.stack([kw[key] for _, kw in items]) for key in items[0][1]}
        return batch, kwargs

    def state_dict(self):
        return {"next_index": self.next_index, "seed": self.dataset.seed, "shard": self.dataset.shard}

    def load_state_dict(self, state):
        if state["seed"] != self.dataset.seed or state["shard"] != self.dataset.shard:
            raise ValueError(
                f"data iterator state for seed {state['seed']} shard {state['shard']} does not "
                f"match this iterator (seed {self.dataset.seed}, shard {self.dataset.shard})"
            )
        self.next_index = int(state["next_index"])


def shard_sources(sources, shard, num_shards):
    """Sources of rank ``shard``: ``sources[shard::num_shards]``, or all when too few files."""
    if len(sources) < num_shards:
        logger.warn(
            f"{len(sources)} source files for {num_shards} ranks: every rank samples all files"
        )
        return list(sources)
    return list(sources[shard::num_shards])


def load_data(
    *,
    data_dir,
    batch_size,
    patch_size,
    paired,
    deterministic=False,
    random_flip=True,
    intensity_jitter=0.0,
    normalisation=None,
    seed=0,
    shard=None,
    num_shards=None,
    **dataset_options,
):
    """
    Endless generator of ``(batch, kwargs)`` for training.

    ``batch``: float32 tensor ``(B, 1, Z, X, Y)`` (``(B, 1, X, Y)`` with ``dims=2``), full-dose
    patches in model space (:func:`suv_to_model`); ``kwargs["low_res"]``: the low-dose patches, same shape and
    normalisation, when ``paired``. Rank ``r`` of ``N`` uses files ``r::N`` (default rank and
    size from :mod:`dist_util`) and its own random stream. ``deterministic=True`` visits the
    rank's files in cyclic order instead of at random. Extra keyword arguments go to
    :class:`VolumePatchDataset`. The returned iterator has ``state_dict``/``load_state_dict``.
    """
    shard = dist_util.rank() if shard is None else shard
    num_shards = dist_util.world_size() if num_shards is None else num_shards
    sources = shard_sources(list_volume_sources(data_dir, paired), shard, num_shards)
    cls = OrderedVolumePatchDataset if deterministic else VolumePatchDataset
    dataset = cls(
        sources,
        patch_size,
        paired=paired,
        random_flip=random_flip,
        intensity_jitter=intensity_jitter,
        normalisation=normalisation,
        seed=seed,
        shard=shard,
        **dataset_options,
    )
    return PatchBatchIterator(dataset, batch_size)
