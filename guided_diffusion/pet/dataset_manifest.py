"""What a file of a ``scripts/make_dataset.py`` dataset is, read from its subject manifest.

Dataset layout (see ``scripts/make_dataset.py``)::

    DIR/train.txt val.txt test.txt    the split's .npz files, one per line (relative to DIR)
    DIR/s0000/manifest.json           subject: config (scanner_settings), files with kind,
                                      tracer, drf and counts (prompts of that acquisition)
    DIR/s0000/s0000_FDG_drf10.npz     arr_0 = [low, full], (X, Y, Z) SUV, affine (mm)
    DIR/s0000/s0000_organs.nii.gz, s0000_FDG_lesions.nii.gz   label volumes on the same grid
"""

import os

from . import volumes

SUBJECT_MANIFEST = "manifest.json"
SPLIT_NAMES = ("train", "val", "test")


def subject_manifest_path(path):
    """The subject manifest beside a dataset file: ``DIR/sNNNN/manifest.json``."""
    return os.path.join(os.path.dirname(os.path.abspath(os.fspath(path))), SUBJECT_MANIFEST)


def read_subject_manifest(path):
    """The subject manifest beside ``path`` as a dict, or ``None`` when there is none.

    Raises ValueError naming the manifest when it is not valid JSON or lacks ``files``.
    """
    manifest_path = subject_manifest_path(path)
    manifest = volumes.read_json(manifest_path, "subject manifest")
    if manifest is None:
        return None
    if not isinstance(manifest.get("files"), list):
        raise ValueError(f"{manifest_path}: subject manifest lacks the 'files' list")
    return manifest


def _file_of_kind(manifest, folder, kind, tracer=None):
    for entry in manifest["files"]:
        if entry.get("kind") == kind and (tracer is None or entry.get("tracer") == tracer):
            return os.path.join(folder, entry["file"])
    return None


def describe_file(path):
    """A dataset file as its subject manifest describes it, or ``None`` without a manifest.

    :return: dict with ``path``, ``subject``, ``tracer``, ``drf``, ``counts`` (total prompts of
        this acquisition, trues + randoms + scatter; ``None`` if not recorded),
        ``scanner_settings`` (make_dataset's ``SCANNERS`` entry, or ``{}``), and the paths
        ``organ_labels``, ``lesion_labels``, ``full_dose`` (``None`` where absent).
    Raises ValueError naming the manifest when it does not list ``path``.
    """
    manifest = read_subject_manifest(path)
    if manifest is None:
        return None
    name = os.path.basename(os.fspath(path))
    entry = next((f for f in manifest["files"] if f.get("file") == name), None)
    if entry is None:
        raise ValueError(f"{subject_manifest_path(path)}: does not list {name}")
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    tracer = entry.get("tracer")
    return dict(
        path=os.fspath(path),
        subject=manifest.get("subject", os.path.basename(folder)),
        tracer=tracer,
        drf=entry.get("drf"),
        counts=entry.get("counts"),
        scanner_settings=dict(manifest.get("config", {}).get("scanner_settings", {})),
        organ_labels=_file_of_kind(manifest, folder, "organ_labels"),
        lesion_labels=_file_of_kind(manifest, folder, "lesion_labels", tracer),
        full_dose=_file_of_kind(manifest, folder, "full_dose", tracer),
    )


def bcdpm_acquisition(description):
    """Keyword arguments of :class:`~guided_diffusion.sampling.guidance.BCDPMFactory` that
    simulate the acquisition of a described file (:func:`describe_file`).

    The factory models the additive background as uniform, so the dataset's scatter fraction
    is added to its randoms fraction (both are fractions of the trues): the count level and the
    Poisson noise then match the recorded prompts. Attenuation is not modelled by the factory.
    Raises ValueError when the manifest lacks the counts or the scanner settings.
    """
    settings = description["scanner_settings"]
    if description.get("counts") is None or "preset" not in settings:
        raise ValueError(f"{description['path']}: its subject manifest lacks the counts or the "
                         f"scanner settings BC-DPM needs")
    return dict(
        scanner=settings["preset"],
        mode=settings.get("mode", "2d"),
        view_mashing=settings.get("view_mashing"),
        psf_fwhm_mm=settings.get("psf_fwhm_mm"),
        total_counts=float(description["counts"]),
        randoms_fraction=float(settings.get("randoms_fraction", 0.0))
        + float(settings.get("scatter_fraction", 0.0)),
    )


def split_files(path, split):
    """The ``.npz`` files of one split: ``path`` is a split list (``val.txt``) or a dataset
    directory (its ``SPLIT.txt`` is read). Paths come back absolute, in list order."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLIT_NAMES}")
    path = os.fspath(path)
    if os.path.isdir(path):
        listed = os.path.join(path, f"{split}.txt")
        if not os.path.isfile(listed):
            raise FileNotFoundError(f"{path}: no {split}.txt (not a make_dataset.py directory)")
        path = listed
    return [os.path.abspath(f) for f in volumes.list_inputs(path)]
