"""Synthetic DICOM PET series for the reader's and the writer's tests."""

import os

import numpy as np

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def write_pet_series(directory, pixels, slope, intercept, weight_kg, dose_bq, half_life_s,
                     injection_time, series_time, drop=None, orientation=AXIAL, offsets=None,
                     **fields):
    """A tiny PET series (X = columns, Y = rows, Units BQML), slices written in reverse order.

    pixels: uint16-valued ``(X, Y, Z)`` array; slope: RescaleSlope per slice. Slice k lies at
    ``(-10, -20, 100) + offsets[k] * normal`` mm (LPS; offsets default to 3 mm steps, normal =
    row x column direction of ``orientation``), with PixelSpacing 2 mm (rows) x 4 mm (columns).
    drop: a field to leave out (``Radionuclide*`` from the radiopharmaceutical item).
    fields: further DICOM keywords set on every slice (e.g. PatientName, StudyInstanceUID).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    nx, ny, nz = pixels.shape
    normal = np.cross(orientation[:3], orientation[3:])
    offsets = 3.0 * np.arange(nz) if offsets is None else offsets
    series_uid = generate_uid()
    for k in reversed(range(nz)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.128"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "PT"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelSpacing = [2.0, 4.0]  # row spacing (Y), column spacing (X)
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = [round(float(v), 6)
                                   for v in np.array([-10.0, -20.0, 100.0]) + offsets[k] * normal]
        ds.SliceThickness = 3.0
        ds.InstanceNumber = k + 1
        ds.RescaleSlope, ds.RescaleIntercept = slope[k], intercept
        ds.Units, ds.DecayCorrection = "BQML", "START"
        ds.PatientWeight = weight_kg
        ds.SeriesTime = series_time
        info = Dataset()
        info.RadionuclideTotalDose = dose_bq
        info.RadionuclideHalfLife = half_life_s
        info.RadiopharmaceuticalStartTime = injection_time
        ds.RadiopharmaceuticalInformationSequence = [info]
        for keyword, value in fields.items():
            setattr(ds, keyword, value)
        if drop:
            delattr(info if drop.startswith("Radionuclide") else ds, drop)
        ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T.astype(np.uint16)).tobytes()
        ds.save_as(os.path.join(directory, f"slice{k:03d}.dcm"), enforce_file_format=True)
