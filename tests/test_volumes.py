"""Volume I/O: exact round trips, atomic writes, clear errors, DICOM -> SUV, resampling."""

import os

import numpy as np
import pytest

from guided_diffusion.pet import volumes
from tests.dicom_helpers import write_pet_series


def _volume(shape=(6, 5, 4), seed=0):
    return np.random.default_rng(seed).gamma(2.0, 1.5, shape).astype(np.float32)


def _affine():
    affine = np.diag([3.3, 3.3, 2.0, 1.0])
    affine[:3, 3] = [-100.25, -80.5, 12.0]
    return affine


def test_npz_round_trip_exact_with_affine(tmp_path):
    low, full = _volume(seed=1), _volume(seed=2)
    path = tmp_path / "pair.npz"
    volumes.save_npz(path, low, full, _affine())
    with np.load(path) as data:
        assert data["arr_0"].shape == (2,) + low.shape  # published layout
    got_low, affine = volumes.load_volume(path)
    got_full, _ = volumes.load_volume(path, index=1)
    np.testing.assert_array_equal(got_low, low)
    np.testing.assert_array_equal(got_full, full)
    np.testing.assert_array_equal(affine, _affine())


def test_npz_low_only_and_default_affine(tmp_path):
    low = _volume()
    path = tmp_path / "low.npz"
    volumes.save_npz(path, low)
    got, affine = volumes.load_volume(path, voxel_mm=1.65)
    np.testing.assert_array_equal(got, low)
    np.testing.assert_array_equal(affine, np.diag([1.65, 1.65, 1.65, 1.0]))
    with pytest.raises(ValueError, match="low.npz.*index 1"):
        volumes.load_volume(path, index=1)


def test_bare_3d_arr_0_is_read(tmp_path):
    low = _volume()
    path = tmp_path / "sample.npz"
    np.savez(path, low)  # as the published sampler writes its outputs
    np.testing.assert_array_equal(volumes.load_volume(path)[0], low)


@pytest.mark.parametrize("name", ["vol.nii", "vol.nii.gz"])
def test_nifti_round_trip_exact_with_affine(tmp_path, name):
    arr = _volume()
    path = tmp_path / name
    volumes.save_nifti(path, arr, _affine())
    got, affine = volumes.load_volume(path)
    np.testing.assert_array_equal(got, arr)
    np.testing.assert_allclose(affine, _affine(), rtol=0, atol=1e-5)  # stored as float32


def test_label_nifti_keeps_integers(tmp_path):
    import nibabel as nib

    labels = np.random.default_rng(0).integers(0, 300, (5, 4, 3)).astype(np.int16)
    path = tmp_path / "labels.nii.gz"
    volumes.save_nifti(path, labels, _affine(), dtype=np.int16)
    assert nib.load(path).get_data_dtype() == np.int16
    np.testing.assert_array_equal(volumes.load_volume(path)[0], labels)


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    path = tmp_path / "out.npz"

    def failing_write(temporary):
        with open(temporary, "wb") as handle:
            handle.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        volumes.atomic_write(path, failing_write, ".npz")
    assert os.listdir(tmp_path) == []
    # an invalid volume is refused before anything is written, and an old file survives
    volumes.save_npz(path, _volume())
    before = path.read_bytes()
    with pytest.raises(ValueError, match="out.npz"):
        volumes.save_npz(path, np.full((3, 3, 3), np.nan))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.npz"]


def test_atomic_write_bytes_mode_and_missing_directory(tmp_path):
    path = tmp_path / "new" / "dir" / "table.json"
    volumes.atomic_write_bytes(path, '{"a": 1}\n')
    assert path.read_text() == '{"a": 1}\n'
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0o600
    volumes.atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(path.parent) == ["table.json"]


def test_bad_inputs_name_the_file(tmp_path):
    nan = _volume()
    nan[1, 1, 1] = np.nan
    np.savez(tmp_path / "nan.npz", nan)
    np.savez(tmp_path / "flat.npz", np.ones((4, 5), np.float32))
    np.savez(tmp_path / "nokey.npz", volume=_volume())
    np.savez(tmp_path / "zero.npz", np.ones((0, 3, 3), np.float32))
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip file at all")
    cases = {"nan.npz": "NaN", "flat.npz": "3D", "nokey.npz": "missing key 'arr_0'",
             "zero.npz": "empty", "empty.npz": "empty", "junk.npz": "unreadable"}
    for name, problem in cases.items():
        with pytest.raises(ValueError) as info:
            volumes.load_volume(tmp_path / name)
        assert name in str(info.value) and problem in str(info.value), str(info.value)
    inf = _volume()
    inf[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="x.nii.*infinite"):
        volumes.check_volume(inf, "x.nii")


def test_list_inputs(tmp_path):
    for name in ("b.npz", "a.nii.gz", "notes.md"):
        (tmp_path / name).write_bytes(b"x")
    assert volumes.list_inputs(tmp_path) == [str(tmp_path / "a.nii.gz"), str(tmp_path / "b.npz")]
    assert volumes.list_inputs(tmp_path / "b.npz") == [str(tmp_path / "b.npz")]
    (tmp_path / "inputs.txt").write_text("# cases\nb.npz\n\na.nii.gz\n")
    assert volumes.list_inputs(tmp_path / "inputs.txt") == [str(tmp_path / "b.npz"), str(tmp_path / "a.nii.gz")]
    (tmp_path / "bad.txt").write_text("missing.npz\n")
    with pytest.raises(ValueError, match="missing.npz"):
        volumes.list_inputs(tmp_path / "bad.txt")
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(ValueError, match="emptydir"):
        volumes.list_inputs(empty)


def test_dicom_suv_conversion(tmp_path):
    pixels = np.arange(3 * 2 * 4, dtype=np.uint16).reshape(3, 2, 4) * 100
    slope = [0.5, 1.0, 2.0, 0.25]
    # 70 kg, 370 MBq at 10:00:00, scan at 11:00:00, F-18 half-life 6586.2 s
    write_pet_series(tmp_path, pixels, slope, 1.0, 70.0, 370e6, 6586.2, "100000.00", "110000")
    suv, affine = volumes.load_volume(tmp_path)
    decayed_dose = 370e6 * 2.0 ** (-3600.0 / 6586.2)
    expected = (pixels * np.array(slope) + 1.0) * 70000.0 / decayed_dose
    assert suv.shape == (3, 2, 4)
    np.testing.assert_allclose(suv, expected, rtol=1e-5)
    # by hand: pixel (1, 0, 2) = 1000 at slope 2 -> 2001 Bq/mL; decay 2^(-3600/6586.2) = 0.684633
    assert pixels[1, 0, 2] == 1000
    np.testing.assert_allclose(suv[1, 0, 2], 2001.0 * 70000.0 / (370e6 * 0.684633), rtol=1e-5)
    # RAS affine: x, y flipped from LPS; z ascending from the lowest slice
    np.testing.assert_allclose(affine, [[-4, 0, 0, 10], [0, -2, 0, 20], [0, 0, 3, 100], [0, 0, 0, 1]])


@pytest.mark.parametrize("field", ["PatientWeight", "RadionuclideTotalDose", "RadionuclideHalfLife"])
def test_dicom_missing_field_is_named(tmp_path, field):
    write_pet_series(tmp_path, np.ones((2, 2, 2)), [1.0, 1.0], 0.0, 70.0, 370e6, 6586.2,
                     "100000", "110000", drop=field)
    with pytest.raises(ValueError, match=field):
        volumes.load_volume(tmp_path)


def test_resample_to_voxel_and_back():
    affine = _affine()
    affine[2, 2] = 3.3
    x = np.linspace(-1, 1, 12)
    arr = (x[:, None, None] * 2 + x[None, :, None] - x[None, None, :] + 5).astype(np.float32)
    coarse, coarse_affine = volumes.resample_to_voxel(arr, affine, 6.6)
    assert coarse.shape == (6, 6, 6)
    np.testing.assert_allclose(volumes.voxel_sizes(coarse_affine), [6.6] * 3)
    # same physical centre of the field of view
    centre = lambda a, s: (a @ np.append((np.array(s) - 1) / 2, 1))[:3]
    np.testing.assert_allclose(centre(coarse_affine, coarse.shape), centre(affine, arr.shape))
    # a linear field halved exactly: each coarse voxel is the mean of its 2x2x2 block
    blocks = arr.reshape(6, 2, 6, 2, 6, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(coarse, blocks, atol=1e-5)
    back = volumes.resample_like(coarse, coarse_affine, arr.shape, affine)
    interior = (slice(1, -1),) * 3  # linear interpolation is exact away from the edges
    np.testing.assert_allclose(back[interior], arr[interior], atol=1e-5)


def test_published_normalisation():
    """The published [0, 1] mapping (SUV clipped at 16, divided by 16) via the one SUV <-> model
    module, on numpy arrays and torch tensors."""
    from guided_diffusion.normalisation import PUBLISHED_NORMALISATION, model_to_suv, suv_to_model

    suv = np.array([-1.0, 0.0, 2.0, 16.0, 40.0])
    model = suv_to_model(suv, PUBLISHED_NORMALISATION)
    np.testing.assert_allclose(model, [0.0, 0.0, 0.125, 1.0, 1.0])
    np.testing.assert_allclose(model_to_suv(model, PUBLISHED_NORMALISATION), [0.0, 0.0, 2.0, 16.0, 16.0])
    torch = pytest.importorskip("torch")
    np.testing.assert_allclose(suv_to_model(torch.tensor(suv), PUBLISHED_NORMALISATION).numpy(),
                               [0.0, 0.0, 0.125, 1.0, 1.0])
