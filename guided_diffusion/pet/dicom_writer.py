"""Write an SUV volume as a DICOM PET series: the inverse of
:func:`guided_diffusion.pet.volumes.load_dicom_series`.

Axes and affine are the reader's: the volume is ``(X, Y, Z)`` = (image columns, image rows,
slices) in SUV body weight (g/mL), and the 4x4 affine maps voxel indices to RAS+ mm (DICOM LPS
with x and y negated).

With a reference series (the DICOM input the volume was read from) each new slice copies the
reference slice at the same position: geometry, patient and study identity, frame of reference,
radiopharmaceutical, series and acquisition times, Units and decay correction. Values are
converted back with the reader's own factor (:func:`~guided_diffusion.pet.volumes.dicom_suv_factor`:
Units BQML -> Bq/mL from the patient weight and the decayed dose; GML -> unchanged), so reading
the new series gives back the volume (to 16-bit quantisation) and the reference's affine.

Without a reference (NIfTI or npz input) the header is built from the affine and the values are
stored as SUV with Units ``GML`` (g/mL, SUV body weight) and DecayCorrection ``NONE``: no patient
weight or dose is made up, and the reader (like viewers) takes the values as SUV directly. Study
and Frame of Reference UIDs are new, patient fields empty, study and series date/time the time
of writing. DICOM readers order slices along the slice normal (row x column direction), so an
affine whose Z axis points against it (e.g. a radiological, LAS NIfTI) reads back flipped along
Z with the matching affine: the same image in patient space.

Every series gets a new SeriesInstanceUID and SOPInstanceUIDs, SOP class PET Image Storage,
ImageType DERIVED\\SECONDARY and unsigned 16-bit pixels with a per-slice RescaleSlope (slice
maximum / 65535; 1 for an empty slice) and RescaleIntercept 0, in explicit VR little endian files
with UTF-8 text (SpecificCharacterSet ISO_IR 192).
"""

import copy
import os
import shutil
import tempfile
from datetime import datetime

import numpy as np

from .volumes import (_check_affine, _is_dicom, _umask, check_volume, dicom_affine,
                      dicom_suv_factor, read_dicom_slices)

PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
MAX_PIXEL = 65535
DESCRIPTION_CHARS = 64  # SeriesDescription is a LO value
SPACING_TOLERANCE = 0.01  # largest deviation of a slice gap from the mean gap, relative to it
AFFINE_TOLERANCE_MM = 1e-3  # largest difference between the given and the reference affine

#: Copied from the reference's first slice onto every slice (the reader takes them from there).
SERIES_FIELDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientWeight",
    "PatientSize", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "StudyDescription",
    "AccessionNumber", "ReferringPhysicianName", "FrameOfReferenceUID",
    "PositionReferenceIndicator", "PatientPosition", "SeriesDate", "SeriesTime", "Units",
    "DecayCorrection", "CorrectedImage", "CountsSource", "SeriesType",
    "RadiopharmaceuticalInformationSequence", "PatientOrientationCodeSequence",
    "PatientGantryRelationshipCodeSequence", "ImageOrientationPatient", "PixelSpacing",
    "SliceThickness", "SpacingBetweenSlices",
)
#: Copied from each reference slice onto the new slice at the same position.
SLICE_FIELDS = (
    "ImagePositionPatient", "SliceLocation", "InstanceNumber", "ImageIndex", "AcquisitionDate",
    "AcquisitionTime", "AcquisitionDateTime", "FrameReferenceTime", "ActualFrameDuration",
    "DecayFactor",
)


def write_dicom_series(directory, volume_suv, affine, *, reference_dir=None, series_description,
                       series_number=None, overwrite=False):
    """Write ``volume_suv`` (float ``(X, Y, Z)`` SUV, g/mL, >= 0) on ``affine`` (4x4 voxel index
    -> RAS+ mm) as a DICOM PET series in ``directory``, one file per slice; returns the file
    paths in Z order.

    reference_dir: the DICOM series the volume was read from (same grid); its geometry, identity
    and Units are copied. series_description: SeriesDescription (cut to 64 characters).
    series_number: SeriesNumber (left empty when None). overwrite: replace an existing
    ``directory``, which must hold only DICOM files, once the new series is complete; without
    it an existing ``directory`` raises FileExistsError. Atomic: the series is written to a
    temporary directory beside ``directory`` and renamed; on any error nothing is left behind.
    Invalid volumes, affines and reference series raise ValueError naming the directory.
    """
    directory = os.path.abspath(os.fspath(directory))
    volume = _check_suv(volume_suv, directory)
    affine = _check_affine(affine, directory)
    now = datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    if reference_dir is None:
        headers = _headers_from_affine(volume.shape, affine, directory, date, time)
        suv_per_value = 1.0  # Units GML: the values are SUV
    else:
        headers, suv_per_value = _headers_from_reference(os.fspath(reference_dir), volume.shape, affine)
    _check_destination(directory, overwrite)
    common = _common_fields(volume.shape, series_description, series_number, date, time)
    width = max(4, len(str(len(headers))))
    names = [f"{k + 1:0{width}d}.dcm" for k in range(len(headers))]

    def write(temporary):
        import pydicom

        for k, (ds, name) in enumerate(zip(headers, names)):
            ds.update(common)
            _set_instance(ds, k)
            _set_pixels(ds, volume[:, :, k].astype(np.float64) / suv_per_value)
            with open(os.path.join(temporary, name), "wb") as handle:
                pydicom.dcmwrite(handle, ds, enforce_file_format=True)
                handle.flush()
                os.fsync(handle.fileno())

    _replace_directory(directory, write, overwrite)
    return [os.path.join(directory, name) for name in names]


def _check_suv(volume, directory):
    volume = check_volume(volume, directory)
    negative = volume < 0
    if negative.any():
        raise ValueError(f"{directory}: {int(negative.sum())} negative voxels (minimum "
                         f"{float(volume.min()):.4g} SUV); DICOM PET pixels are unsigned, clip at 0")
    return volume


def _ds(value):
    """A float as a DICOM DS string (at most 16 characters)."""
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def _headers_from_affine(shape, affine, directory, date, time):
    """Per-slice datasets with the geometry of ``affine`` and an anonymous SUV (Units GML)
    header. Raises ValueError when the affine is not a DICOM geometry."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    col_spacing, row_spacing = np.linalg.norm(lps[:3, :2], axis=0)  # X: columns, Y: rows
    step = lps[:3, 2]
    if not np.array_equal(lps[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"{directory}: the affine's last row is {lps[3].tolist()}, not [0, 0, 0, 1]")
    if not min(col_spacing, row_spacing) > 0:
        raise ValueError(f"{directory}: the affine's X or Y axis has zero length")
    row_dir, col_dir = lps[:3, 0] / col_spacing, lps[:3, 1] / row_spacing
    normal = np.cross(row_dir, col_dir)
    if abs(row_dir @ col_dir) > 1e-6:
        raise ValueError(f"{directory}: the affine's X and Y axes are not perpendicular, as DICOM "
                         f"image rows and columns must be")
    if not abs(step @ normal) > 1e-6 * np.linalg.norm(step):
        raise ValueError(f"{directory}: the affine's Z axis lies in the image plane")

    base = Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID",
                    "AccessionNumber", "ReferringPhysicianName", "PositionReferenceIndicator",
                    "CorrectedImage"):
        setattr(base, keyword, "")  # type 2: present, empty
    base.StudyInstanceUID, base.FrameOfReferenceUID = generate_uid(), generate_uid()
    base.StudyDate = base.SeriesDate = date
    base.StudyTime = base.SeriesTime = time
    base.Units, base.DecayCorrection = "GML", "NONE"
    base.CountsSource, base.SeriesType = "EMISSION", ["STATIC", "IMAGE"]
    base.RadiopharmaceuticalInformationSequence = []
    base.ImageOrientationPatient = [_ds(v) for v in np.concatenate([row_dir, col_dir])]
    base.PixelSpacing = [_ds(row_spacing), _ds(col_spacing)]
    base.SliceThickness = _ds(abs(step @ normal))
    headers = []
    for k in range(shape[2]):
        ds = copy.deepcopy(base)
        ds.ImagePositionPatient = [_ds(v) for v in lps[:3, 3] + k * step]
        headers.append(ds)
    return headers


def _headers_from_reference(reference_dir, shape, affine):
    """Per-slice datasets copying the reference series (:data:`SERIES_FIELDS`,
    :data:`SLICE_FIELDS`), and the reader's factor from the reference's pixel values to SUV.
    Raises ValueError naming ``reference_dir`` when the series does not fit the volume."""
    from pydicom.dataset import Dataset

    slices = read_dicom_slices(reference_dir)
    grid = (int(slices[0].Columns), int(slices[0].Rows), len(slices))
    if grid != tuple(shape):
        raise ValueError(f"{reference_dir}: the reference series has {grid[0]} columns x {grid[1]} "
                         f"rows x {grid[2]} slices but the (X, Y, Z) volume is {tuple(shape)}")
    _check_spacing(slices, reference_dir)
    suv_per_value = dicom_suv_factor(slices[0], reference_dir)
    difference = float(np.abs(affine - dicom_affine(slices)).max())
    if difference > AFFINE_TOLERANCE_MM:
        raise ValueError(f"{reference_dir}: the affine differs from the reference series' by up "
                         f"to {difference:.4g} mm; resample the volume onto the reference grid")
    headers = []
    for reference in slices:
        ds = Dataset()
        for source, keywords in ((slices[0], SERIES_FIELDS), (reference, SLICE_FIELDS)):
            for keyword in keywords:
                if keyword in source:
                    ds.add(copy.deepcopy(source[keyword]))
        headers.append(ds)
    return headers, suv_per_value


def _check_spacing(slices, directory):
    """Raise ValueError unless the sorted slices are evenly spaced (each gap within
    :data:`SPACING_TOLERANCE` of the mean gap), as the reader's affine assumes."""
    positions = np.array([ds.ImagePositionPatient for ds in slices], dtype=float)
    if len(positions) < 2:
        return
    gaps = np.diff(positions, axis=0)
    mean_gap = (positions[-1] - positions[0]) / (len(positions) - 1)
    deviation = np.linalg.norm(gaps - mean_gap, axis=1).max()
    if not np.linalg.norm(mean_gap) > 0 or deviation > SPACING_TOLERANCE * np.linalg.norm(mean_gap):
        distances = np.linalg.norm(gaps, axis=1)
        raise ValueError(f"{directory}: slices are not evenly spaced (neighbouring slices "
                         f"{distances.min():.4g} to {distances.max():.4g} mm apart)")


def _common_fields(shape, description, number, date, time):
    """The fields every slice of the new series shares."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    common = Dataset()
    common.SpecificCharacterSet = "ISO_IR 192"
    common.ImageType = ["DERIVED", "SECONDARY"]
    common.SOPClassUID = PET_IMAGE_STORAGE
    common.Modality = "PT"
    common.SeriesInstanceUID = generate_uid()
    common.SeriesDescription = _description(description)
    common.SeriesNumber = number
    common.ContentDate, common.ContentTime = date, time
    common.NumberOfSlices = shape[2]
    common.Rows, common.Columns = shape[1], shape[0]
    common.SamplesPerPixel = 1
    common.PhotometricInterpretation = "MONOCHROME2"
    common.BitsAllocated, common.BitsStored, common.HighBit = 16, 16, 15
    common.PixelRepresentation = 0
    return common


def _description(text):
    """``text`` as a valid LO value: control characters as spaces, no backslash (the value
    separator), at most 64 characters."""
    clean = "".join(" " if ch < " " else ch for ch in str(text)).replace("\\", "/")
    return clean[:DESCRIPTION_CHARS].strip()


def _set_instance(ds, k):
    """New SOPInstanceUID and file meta; InstanceNumber and ImageIndex ``k + 1`` unless copied."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds.SOPInstanceUID = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    for keyword in ("InstanceNumber", "ImageIndex"):
        if keyword not in ds:
            setattr(ds, keyword, k + 1)


def _set_pixels(ds, values):
    """Store ``values`` (float ``(X, Y)`` >= 0, in the series' Units) as unsigned 16-bit pixels
    (rows = Y) with RescaleSlope = maximum / 65535 (1 when all zero) and RescaleIntercept 0."""
    slope = float(values.max()) / MAX_PIXEL
    ds.RescaleSlope = _ds(slope if slope > 0 else 1.0)
    ds.RescaleIntercept = 0
    pixels = np.rint(values / float(ds.RescaleSlope))  # the slope as stored
    ds.PixelData = np.clip(pixels, 0, MAX_PIXEL).astype("<u2").T.tobytes()


def _check_destination(directory, overwrite):
    """Raise FileExistsError unless ``directory`` is absent or, with ``overwrite``, a directory
    holding only DICOM files."""
    if not os.path.lexists(directory):
        return
    if not overwrite:
        raise FileExistsError(f"{directory}: already exists; pass overwrite=True to replace it")
    if os.path.islink(directory) or not os.path.isdir(directory):
        raise FileExistsError(f"{directory}: exists and is not a directory; not replacing it")
    others = sorted(name for name in os.listdir(directory)
                    if not _is_dicom(os.path.join(directory, name)))
    if others:
        raise FileExistsError(f"{directory}: holds entries that are not DICOM files "
                              f"({', '.join(others[:3])}); not replacing it")


def _replace_directory(directory, write, overwrite):
    """Call ``write(temporary)`` on a new directory beside ``directory``, then rename it to
    ``directory``; an old ``directory`` is moved aside first and deleted only after the rename.
    On any error, including KeyboardInterrupt, the temporary directory is removed, an old
    ``directory`` restored and the error propagates."""
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.", suffix=".tmp",
                                 dir=parent)
    backup = None
    try:
        write(temporary)
        os.chmod(temporary, 0o777 & ~_umask())  # mkdtemp's mode is 0o700
        _check_destination(directory, overwrite)  # again: it may have appeared meanwhile
        if os.path.lexists(directory):
            os.rename(directory, temporary + ".old")
            backup = temporary + ".old"
        os.rename(temporary, directory)
    except BaseException:
        if backup and not os.path.lexists(directory):
            os.rename(backup, directory)
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if backup:
        shutil.rmtree(backup)
