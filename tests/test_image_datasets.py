import json

import nibabel as nib
import numpy as np
import pytest
import torch as th

from guided_diffusion.image_datasets import (
    VolumePatchDataset,
    describe_datasets,
    list_volume_sources,
    load_data,
    manifest_voxel_mm,
    model_to_suv,
    suv_to_model,
)

SHAPE = (20, 18, 12)  # (X, Y, Z)
PATCH = (8, 10, 6)  # (Z, X, Y)


def coordinate_volume(shape=SHAPE):
    """SUV that encodes its own position: 1e-3 * (400 x + 20 y + z) (max < 8)."""
    x, y, z = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    return (1e-3 * (400 * x + 20 * y + z)).astype(np.float32)


def write_pair_npz(path, full, low_factor=0.5):
    np.savez(path, np.stack([low_factor * full, full]))


def test_normalisation_round_trip_and_clipping():
    suv = np.array([0.0, 1.0, 8.0, 16.0, 20.0, -1.0])
    model = suv_to_model(suv)
    np.testing.assert_allclose(model, [-1.0, -0.875, 0.0, 1.0, 1.0, -1.0])
    np.testing.assert_allclose(model_to_suv(model), [0.0, 1.0, 8.0, 16.0, 16.0, 0.0])
    published = dict(clip=16, scale=16, range=(0, 1))
    np.testing.assert_allclose(suv_to_model(suv, published), [0, 1 / 16, 0.5, 1, 1, 0])
    t = th.linspace(0, 16, 33, dtype=th.float64)
    assert th.allclose(model_to_suv(suv_to_model(t)), t, atol=1e-12)
    with pytest.raises(ValueError, match="normalisation"):
        suv_to_model(suv, dict(range=(1, -1)))


def test_paired_patches_are_blocks_of_the_volumes_in_model_order(tmp_path):
    full = coordinate_volume()
    write_pair_npz(tmp_path / "a.npz", full)
    data = load_data(
        data_dir=str(tmp_path), batch_size=3, patch_size=PATCH, paired=True,
        random_flip=False, shard=0, num_shards=1,
    )
    batch, kwargs = next(data)
    assert batch.shape == (3, 1) + PATCH and batch.dtype == th.float32
    assert kwargs["low_res"].shape == batch.shape
    pz, px, py = PATCH
    for high, low in zip(batch, kwargs["low_res"]):
        code = int(round(model_to_suv(high[0, 0, 0, 0].double()).item() * 1000))
        x0, y0, z0 = code // 400, (code % 400) // 20, code % 20
        block = full[x0 : x0 + px, y0 : y0 + py, z0 : z0 + pz].transpose(2, 0, 1)
        assert th.allclose(high[0], th.from_numpy(suv_to_model(block)), atol=1e-6)
        assert th.allclose(low[0], th.from_numpy(suv_to_model(0.5 * block)), atol=1e-6)


def test_cond_dropout_replaces_only_the_condition_by_the_empty_volume(tmp_path):
    full = coordinate_volume()
    write_pair_npz(tmp_path / "a.npz", full)
    common = dict(data_dir=str(tmp_path), batch_size=64, patch_size=PATCH, paired=True,
                  random_flip=False, shard=0, num_shards=1)
    batch, kwargs = next(load_data(**common))
    batch_dropped, kwargs_dropped = next(load_data(cond_dropout=0.5, **common))
    assert th.equal(batch, batch_dropped)  # the same patches, only the condition changes
    null = (kwargs_dropped["low_res"] == -1.0).flatten(1).all(dim=1)  # 0 SUV in [-1, 1] space
    assert 16 <= int(null.sum()) <= 48
    assert th.equal(kwargs_dropped["low_res"][~null], kwargs["low_res"][~null])
    with pytest.raises(ValueError, match="cond_dropout"):
        next(load_data(**dict(common, paired=False), cond_dropout=0.5))


def test_flip_and_jitter_apply_the_same_to_low_and_full(tmp_path):
    full = coordinate_volume()
    write_pair_npz(tmp_path / "a.npz", full)
    data = load_data(
        data_dir=str(tmp_path), batch_size=16, patch_size=PATCH, paired=True,
        random_flip=True, intensity_jitter=0.1, shard=0, num_shards=1,
    )
    batch, kwargs = next(data)
    high, low = model_to_suv(batch.double()), model_to_suv(kwargs["low_res"].double())
    assert th.allclose(low, 0.5 * high, atol=1e-5)
    # X (axis 2 of (B, 1, Z, X, Y)) runs up or down: flipped patches run down.
    dx = high[:, 0, 0, 1, 0] - high[:, 0, 0, 0, 0]
    ratio = dx.abs() / 0.4  # 0.4 SUV per X voxel times the jitter factor
    assert ((ratio > 0.9 - 1e-6) & (ratio < 1.1 + 1e-6)).all()
    assert (dx > 0).any() and (dx < 0).any()


def test_small_volumes_are_zero_padded_and_patches_prefer_the_body(tmp_path):
    full = np.zeros((30, 30, 4), np.float32)
    full[:6, :6, :] = 2.0  # the "body": 4 % of the transaxial area
    np.savez(tmp_path / "single.npz", full)  # a single 3D volume: unpaired only
    ds = VolumePatchDataset(
        list_volume_sources(str(tmp_path), paired=False), (6, 6, 6), paired=False,
        random_flip=False,
    )
    patches = th.stack([ds[k][0] for k in range(400)])
    assert patches.shape == (400, 1, 6, 6, 6)
    assert (patches[:, :, 4:] == -1.0).all()  # Z padded from 4 to 6 with SUV 0
    in_body = (model_to_suv(patches).mean(dim=(1, 2, 3, 4)) >= 0.05).double().mean().item()
    # Uniform corners hit the body with probability p; a background draw is kept with
    # probability 0.1, else redrawn (10 draws at most): P(body) = p * sum_i ((1-p) 0.9)^i.
    padded = np.pad(full, ((0, 0), (0, 0), (0, 2)))
    p = np.mean([padded[x : x + 6, y : y + 6].mean() >= 0.05 for x in range(25) for y in range(25)])
    expected = p * sum(((1 - p) * 0.9) ** i for i in range(10))
    assert expected > 5 * p
    assert abs(in_body - expected) < 0.08  # ~3.5 binomial standard deviations
    with pytest.raises(ValueError, match="single.npz"):
        VolumePatchDataset(list_volume_sources(str(tmp_path), paired=True), PATCH, paired=True)[0]


def test_sharding_is_disjoint_and_covers_all_files(tmp_path):
    for i in range(5):
        write_pair_npz(tmp_path / f"s{i}.npz", coordinate_volume() * (i + 1) / 5)
    shards = [
        load_data(data_dir=str(tmp_path), batch_size=1, patch_size=PATCH, paired=True,
                  shard=r, num_shards=2).dataset.sources
        for r in range(2)
    ]
    names = [{s[1] for s in shard} for shard in shards]
    assert names[0].isdisjoint(names[1])
    assert len(names[0]) == 3 and len(names[1]) == 2
    assert names[0] | names[1] == {str(tmp_path / f"s{i}.npz") for i in range(5)}


def test_iterator_state_resumes_exactly(tmp_path):
    write_pair_npz(tmp_path / "a.npz", coordinate_volume())
    write_pair_npz(tmp_path / "b.npz", coordinate_volume()[::-1].copy())

    def make():
        return load_data(data_dir=str(tmp_path), batch_size=2, patch_size=PATCH, paired=True,
                         intensity_jitter=0.05, seed=3, shard=0, num_shards=1)

    straight = make()
    next(straight)
    state = straight.state_dict()
    expected, _ = next(straight)
    resumed = make()
    resumed.load_state_dict(state)
    got, _ = next(resumed)
    assert th.equal(got, expected)
    other_seed = load_data(data_dir=str(tmp_path), batch_size=2, patch_size=PATCH, paired=True,
                           seed=4, shard=0, num_shards=1)
    with pytest.raises(ValueError, match="seed"):
        other_seed.load_state_dict(state)


def test_nifti_pairs_share_the_full_dose_volume(tmp_path):
    full = coordinate_volume()
    for name, vol in [("sub01_full", full), ("sub01_low_drf4", 0.25 * full), ("sub01_low_drf10", 0.1 * full)]:
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    sources = list_volume_sources(str(tmp_path), paired=True)
    assert sorted((s[0].rsplit("/", 1)[1], s[1].rsplit("/", 1)[1]) for s in sources) == [
        ("sub01_low_drf10.nii.gz", "sub01_full.nii.gz"),
        ("sub01_low_drf4.nii.gz", "sub01_full.nii.gz"),
    ]
    assert [s[1].rsplit("/", 1)[1] for s in list_volume_sources(str(tmp_path), paired=False)] == [
        "sub01_full.nii.gz"
    ]
    ds = VolumePatchDataset(sources, PATCH, paired=True, random_flip=False)
    high, kwargs = ds[0]
    ratio = model_to_suv(kwargs["low_res"].double()) / model_to_suv(high.double()).clamp_min(1e-9)
    assert {round(r, 3) for r in ratio[high > -1].tolist()} <= {0.25, 0.1}
    (tmp_path / "sub01_full.nii.gz").unlink()
    with pytest.raises(ValueError, match="sub01_low_drf10"):
        list_volume_sources(str(tmp_path), paired=True)


def _fake_make_dataset(folder, seed, train, val=()):
    """A make_dataset.py folder: split lists naming pair files, and its manifest."""
    folder.mkdir(parents=True)
    full = coordinate_volume()
    for split, names in (("train", train), ("val", val), ("test", ())):
        (folder / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
        for name in names:
            write_pair_npz(folder / name, full)
    (folder / "manifest.json").write_text(json.dumps(dict(
        created_by="scripts/make_dataset.py", seed=seed, subjects=len(train) + len(val),
        voxel_mm=3.3, split=dict(train=list(train), val=list(val), test=[]), layout="...",
        entries=[{"subject": "s0000", "seconds": 1.0}])))


def test_split_lists_choose_the_files_and_describe_the_datasets(tmp_path):
    _fake_make_dataset(tmp_path / "a", 100, ["a0.npz", "a1.npz"])
    _fake_make_dataset(tmp_path / "b", 200, ["b0.npz"], val=["b1.npz"])
    _fake_make_dataset(tmp_path / "v", 800, [], val=["v0.npz"])  # no training subjects
    np.savez(tmp_path / "a" / "unlisted.npz", coordinate_volume())
    assert [s[1] for s in list_volume_sources(str(tmp_path), paired=True)] == [
        str(tmp_path / n) for n in ("a/a0.npz", "a/a1.npz", "b/b0.npz")]
    assert [s[1] for s in list_volume_sources(str(tmp_path), paired=True, split="val")] == [
        str(tmp_path / n) for n in ("b/b1.npz", "v/v0.npz")]
    common = dict(created_by="scripts/make_dataset.py", voxel_mm=3.3)
    assert describe_datasets(str(tmp_path)) == [
        dict(common, path="a", files=2, seed=100, subjects=2, split_subjects=2),
        dict(common, path="b", files=1, seed=200, subjects=2, split_subjects=1)]
    assert [d["path"] for d in describe_datasets(str(tmp_path), "val")] == ["b", "v"]
    assert manifest_voxel_mm(str(tmp_path / "a")) == 3.3 and manifest_voxel_mm(str(tmp_path)) is None


def test_a_folder_of_links_trains_on_the_union_of_the_linked_datasets(tmp_path):
    _fake_make_dataset(tmp_path / "a", 100, ["a0.npz"])
    _fake_make_dataset(tmp_path / "b", 200, ["b0.npz", "b1.npz"])
    mix = tmp_path / "mix"
    mix.mkdir()
    for name in ("a", "b"):
        (mix / name).symlink_to(tmp_path / name, target_is_directory=True)
    assert [s[1] for s in list_volume_sources(str(mix), paired=True)] == [
        str(mix / n) for n in ("a/a0.npz", "b/b0.npz", "b/b1.npz")]
    assert [(d["path"], d["seed"], d["files"]) for d in describe_datasets(str(mix))] == [("a", 100, 1), ("b", 200, 2)]


def test_empty_directory_raises(tmp_path):
    with pytest.raises(ValueError, match="no .npz or NIfTI"):
        list_volume_sources(str(tmp_path), paired=False)


def test_dims2_yields_whole_slices_without_the_z_axis(tmp_path):
    """A (X, Y, 1) slice volume with patch (1, X, Y) and dims=2 gives (B, 1, X, Y) batches."""
    slice_volume = coordinate_volume((16, 12, 1))
    np.savez(tmp_path / "slice.npz", slice_volume)
    data = load_data(data_dir=str(tmp_path), batch_size=2, patch_size=(1, 16, 12), paired=False,
                     random_flip=False, shard=0, num_shards=1, dims=2)
    batch, kwargs = next(data)
    assert batch.shape == (2, 1, 16, 12) and kwargs == {}
    expected = th.from_numpy(suv_to_model(slice_volume[:, :, 0]))
    assert th.allclose(batch[0, 0], expected, atol=1e-6) and th.allclose(batch[1, 0], expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"patch_size must be \(1, X, Y\)"):
        load_data(data_dir=str(tmp_path), batch_size=1, patch_size=(2, 16, 12), paired=False,
                  shard=0, num_shards=1, dims=2)
