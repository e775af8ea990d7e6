"""DICOM PET series writer: round trips through the toolkit's reader (and SimpleITK), copied
geometry and identity, new UIDs, atomic writes, one-line errors."""

import os

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from guided_diffusion.pet import volumes
from guided_diffusion.pet.dicom_writer import PET_IMAGE_STORAGE, write_dicom_series
from tests.dicom_helpers import AXIAL, write_pet_series

OBLIQUE = (0.6, 0.8, 0.0, -0.48, 0.36, 0.8)  # rotated about z and tilted: orthonormal rows/columns
IDENTITY = dict(PatientName="Müller^Jörg", PatientID="P-042", PatientBirthDate="19600102",
                PatientSex="F", StudyInstanceUID="1.2.3.4.5", StudyDate="20240301",
                StudyTime="095500", AccessionNumber="ACC7", FrameOfReferenceUID="1.2.3.4.6",
                SeriesDate="20240301", SpecificCharacterSet="ISO_IR 100")
SERIES = dict(slope=[0.5, 1.0, 2.0, 0.25, 1.5], intercept=0.0, weight_kg=70.0, dose_bq=370e6,
              half_life_s=6586.2, injection_time="100000", series_time="110000")


def _reference(directory, shape=(5, 4, 5), **kwargs):
    """A BQML reference series in ``directory`` with the patient/study fields of IDENTITY."""
    directory.mkdir()
    pixels = np.random.default_rng(0).integers(0, 4000, shape)
    write_pet_series(directory, pixels, **{**SERIES, "slope": SERIES["slope"][:shape[2]],
                                           **IDENTITY, **kwargs})
    return directory


def _read(directory):
    """The series' datasets, sorted along the slice normal as the reader sorts them."""
    return volumes.read_dicom_slices(directory)


def _denoised(suv):
    """A stand-in for a denoised volume: new values, one empty slice."""
    out = suv * 1.3 + 0.01
    out[:, :, 2] = 0.0
    return out


def _assert_suv_close(got, expected, slices, suv_per_value):
    """|error| <= half a quantisation step (RescaleSlope in SUV) per slice, plus float32."""
    for k, ds in enumerate(slices):
        step = float(ds.RescaleSlope) * suv_per_value
        assert step > 0 and float(ds.RescaleIntercept) == 0
        error = np.abs(got[:, :, k] - expected[:, :, k]).max()
        assert error <= step / 2 + 1e-6 * max(expected[:, :, k].max(), 1.0)


@pytest.mark.parametrize("orientation", [AXIAL, OBLIQUE], ids=["axial", "oblique"])
def test_round_trip_with_reference(tmp_path, orientation):
    reference = _reference(tmp_path / "ref", orientation=orientation)
    suv, affine = volumes.load_dicom_series(reference)
    volume = _denoised(suv)
    paths = write_dicom_series(tmp_path / "out", volume, affine, reference_dir=reference,
                               series_description="pet-3d-ddpm denoised (paired, demo_paired.pt)",
                               series_number=1001)
    assert sorted(os.listdir(tmp_path)) == ["out", "ref"]  # no temporary left over
    got, got_affine = volumes.load_dicom_series(tmp_path / "out")
    np.testing.assert_allclose(got_affine, affine, atol=1e-9)
    old, new = _read(reference), _read(tmp_path / "out")
    factor = volumes.dicom_suv_factor(old[0], reference)
    assert volumes.dicom_suv_factor(new[0], tmp_path / "out") == factor
    _assert_suv_close(got, volume, new, factor)
    assert float(new[2].RescaleSlope) > 0 and not new[2].pixel_array.any()  # the empty slice

    # returned paths in Z order; geometry slice by slice as in the reference
    assert [pydicom.dcmread(p).SOPInstanceUID for p in paths] == [ds.SOPInstanceUID for ds in new]
    for before, after in zip(old, new):
        assert after.ImagePositionPatient == before.ImagePositionPatient
        assert after.InstanceNumber == before.InstanceNumber
        for keyword in ("ImageOrientationPatient", "PixelSpacing", "SliceThickness"):
            assert after[keyword].value == before[keyword].value
    # patient, study and PET identity copied; Units and the dose / times used for SUV
    copied = [keyword for keyword in IDENTITY if keyword != "SpecificCharacterSet"]
    for keyword in copied + ["PatientWeight", "SeriesTime", "Units", "DecayCorrection"]:
        assert new[0][keyword].value == old[0][keyword].value, keyword
    info_old = old[0].RadiopharmaceuticalInformationSequence[0]
    info_new = new[0].RadiopharmaceuticalInformationSequence[0]
    for keyword in ("RadionuclideTotalDose", "RadionuclideHalfLife", "RadiopharmaceuticalStartTime"):
        assert info_new[keyword].value == info_old[keyword].value
    with open(paths[0], "rb") as handle:
        assert "Müller^Jörg".encode("utf-8") in handle.read()  # re-encoded as ISO_IR 192

    # a new series: new, valid, unique UIDs; a PET image header and 16-bit pixels
    sop_uids = [ds.SOPInstanceUID for ds in new]
    assert len(set(sop_uids)) == len(new)
    assert not set(sop_uids) & {ds.SOPInstanceUID for ds in old}
    assert {ds.SeriesInstanceUID for ds in new} == {new[0].SeriesInstanceUID}
    assert new[0].SeriesInstanceUID != old[0].SeriesInstanceUID
    for ds in new:
        assert all(UID(uid).is_valid for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID))
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == PET_IMAGE_STORAGE
        assert (ds.Modality, list(ds.ImageType), ds.SpecificCharacterSet) == (
            "PT", ["DERIVED", "SECONDARY"], "ISO_IR 192")
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 16, 15, 0)
        assert ds.SeriesDescription == "pet-3d-ddpm denoised (paired, demo_paired.pt)"
        assert ds.SeriesNumber == 1001 and ds.NumberOfSlices == len(new)


RAS = np.array([[2.0, 0, 0, -30], [0, 3.0, 0, 12], [0, 0, 4.0, -50], [0, 0, 0, 1]])
ROTATED = RAS.copy()
ROTATED[:3, :3] = [[0.6 * 2, -0.8 * 3, 0], [0.8 * 2, 0.6 * 3, 0], [0, 0, 4.0]]


@pytest.mark.parametrize("affine", [RAS, ROTATED], ids=["ras", "rotated"])
def test_round_trip_from_affine(tmp_path, affine):
    volume = np.random.default_rng(1).gamma(2.0, 1.5, (6, 5, 4)).astype(np.float32)
    write_dicom_series(tmp_path / "out", volume, affine, series_description="x" * 70 + "\\y")
    got, got_affine = volumes.load_dicom_series(tmp_path / "out")
    np.testing.assert_allclose(got_affine, affine, atol=1e-9)
    new = _read(tmp_path / "out")
    _assert_suv_close(got, volume, new, 1.0)
    assert (new[0].Units, new[0].DecayCorrection) == ("GML", "NONE")
    assert volumes.dicom_suv_factor(new[0], tmp_path / "out") == 1.0
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "SeriesInstanceUID"):
        assert UID(new[0][keyword].value).is_valid
    assert new[0].SeriesDescription == "x" * 64  # LO: at most 64 characters


def test_slices_against_the_normal_read_back_flipped(tmp_path):
    """A radiological (LAS) affine: slices ordered along the normal, same image in space."""
    affine = RAS @ np.diag([-1.0, 1.0, 1.0, 1.0])
    volume = np.random.default_rng(2).gamma(2.0, 1.5, (6, 5, 4)).astype(np.float32)
    write_dicom_series(tmp_path / "out", volume, affine, series_description="las")
    got, got_affine = volumes.load_dicom_series(tmp_path / "out")
    flip = np.diag([1.0, 1.0, -1.0, 1.0])
    flip[2, 3] = volume.shape[2] - 1
    np.testing.assert_allclose(got_affine, affine @ flip, atol=1e-9)
    np.testing.assert_allclose(got, volume[:, :, ::-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("volume, problem", [
    (np.full((3, 3, 2), np.nan), "NaN"),
    (np.full((3, 3, 2), np.inf), "infinite"),
    (np.full((3, 3, 2), -1.0), "negative"),
    (np.ones((3, 3)), "3D"),
])
def test_invalid_volume(tmp_path, volume, problem):
    with pytest.raises(ValueError, match=problem):
        write_dicom_series(tmp_path / "out", volume, RAS, series_description="x")
    assert os.listdir(tmp_path) == []


def test_reference_must_match_the_volume(tmp_path):
    reference = _reference(tmp_path / "ref")
    suv, affine = volumes.load_dicom_series(reference)
    for volume, what in ((suv[:, :, :4], "slices"), (suv[:4], "columns")):
        with pytest.raises(ValueError, match=what):
            write_dicom_series(tmp_path / "out", volume, affine, reference_dir=reference,
                               series_description="x")
    with pytest.raises(ValueError, match="affine differs"):
        write_dicom_series(tmp_path / "out", suv, affine @ np.diag([1.0, 1.0, 2.0, 1.0]),
                           reference_dir=reference, series_description="x")
    assert os.listdir(tmp_path) == ["ref"]


@pytest.mark.parametrize("problem, kwargs", [
    ("ImagePositionPatient", dict(drop="ImagePositionPatient")),
    ("PixelSpacing", dict(drop="PixelSpacing")),
    ("RadiopharmaceuticalInformationSequence", dict(drop="RadiopharmaceuticalInformationSequence")),
    ("not evenly spaced", dict(offsets=[0.0, 3.0, 7.0, 10.0, 13.0])),
    ("not evenly spaced", dict(offsets=[0.0, 3.0, 3.0, 6.0, 9.0])),
])
def test_bad_reference_is_one_line_naming_it(tmp_path, problem, kwargs):
    reference = _reference(tmp_path / "ref", **kwargs)
    with pytest.raises(ValueError) as error:
        write_dicom_series(tmp_path / "out", np.ones((5, 4, 5)), RAS, reference_dir=reference,
                           series_description="x")
    message = str(error.value)
    assert message.startswith(f"{reference}: ") and problem in message and "\n" not in message
    assert os.listdir(tmp_path) == ["ref"]


def test_existing_directory_needs_overwrite(tmp_path):
    volume = np.ones((3, 3, 2), np.float32)
    write_dicom_series(tmp_path / "out", volume, RAS, series_description="first")
    with pytest.raises(FileExistsError, match=str(tmp_path / "out")):
        write_dicom_series(tmp_path / "out", volume, RAS, series_description="second")
    assert _read(tmp_path / "out")[0].SeriesDescription == "first"
    (tmp_path / "out" / "stale.dcm").write_bytes(b"")  # a DICOM file name: replaced as well
    write_dicom_series(tmp_path / "out", 2 * volume, RAS, series_description="second", overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["0001.dcm", "0002.dcm"]
    assert _read(tmp_path / "out")[0].SeriesDescription == "second"
    assert os.listdir(tmp_path) == ["out"]
    (tmp_path / "notes.txt").mkdir()
    (tmp_path / "notes.txt" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not DICOM"):  # never deletes other files
        write_dicom_series(tmp_path / "notes.txt", volume, RAS, series_description="x", overwrite=True)
    assert (tmp_path / "notes.txt" / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch, existing):
    volume = np.ones((3, 3, 5), np.float32)
    if existing:
        write_dicom_series(tmp_path / "out", volume, RAS, series_description="old")
    real, calls = pydicom.dcmwrite, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        real(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmwrite", failing)
    with pytest.raises(OSError, match="disk full"):
        write_dicom_series(tmp_path / "out", volume, RAS, series_description="new", overwrite=True)
    assert os.listdir(tmp_path) == (["out"] if existing else [])
    if existing:  # the old series is untouched
        assert len(os.listdir(tmp_path / "out")) == 5
        assert _read(tmp_path / "out")[0].SeriesDescription == "old"


def test_simpleitk_reads_the_series(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    reference = _reference(tmp_path / "ref", orientation=OBLIQUE)
    suv, affine = volumes.load_dicom_series(reference)
    volume = _denoised(suv)
    write_dicom_series(tmp_path / "out", volume, affine, reference_dir=reference,
                       series_description="sitk")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "out")))
    reader.SetOutputPixelType(sitk.sitkFloat64)
    image = reader.Execute()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # ITK works in LPS
    np.testing.assert_allclose(image.GetSpacing(), volumes.voxel_sizes(affine), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), lps[:3, 3], atol=1e-6)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)),
                               lps[:3, :3] / volumes.voxel_sizes(affine), atol=1e-6)
    bqml = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (Z, Y, X) -> (X, Y, Z), rescaled
    factor = volumes.dicom_suv_factor(_read(reference)[0], reference)
    _assert_suv_close(bqml * factor, volume, _read(tmp_path / "out"), factor)
