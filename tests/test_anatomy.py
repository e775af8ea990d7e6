"""Brain and dead-leaves phantoms: folded cortex geometry, tracer dependence, shape statistics,
lesion truth and determinism, on small grids."""

import numpy as np
import pytest
from scipy import ndimage

from guided_diffusion.pet import anatomy
from guided_diffusion.pet.fields import LatticeField, SphereTable, sphere_directions, zero_line_distance
from guided_diffusion.pet.phantoms import ANATOMIES, ORGAN_LABELS, make_phantom
from guided_diffusion.pet.shapes import Blob, RoundedBox, VoxelGrid, voxel_fraction
from guided_diffusion.pet.tracers import get_tracer

CORTEX_PATCH_MM = (120.0, 140.0, 50.0)  # the top of the head: cortex only, no deep nuclei


@pytest.fixture(scope="module")
def brain():
    return make_phantom(1, voxel_mm=2.0, anatomy="brain")


@pytest.fixture(scope="module")
def leaves():
    return make_phantom(2, voxel_mm=3.3, anatomy="dead_leaves")


def _mask(phantom, *organs):
    return np.isin(phantom.organ_labels, [ORGAN_LABELS[o] for o in organs])


def test_anatomies_and_default_fields_of_view(brain, leaves):
    assert ANATOMIES == ("whole_body", "brain", "dead_leaves")
    assert brain.activity.shape == (100, 120, 100) and brain.anatomy == "brain"
    assert leaves.activity.shape == tuple(round(f / 3.3) for f in anatomy.DEAD_LEAVES_FOV_MM)
    for phantom in (brain, leaves):
        assert phantom.activity.dtype == np.float32 and phantom.mu.dtype == np.float32
        assert phantom.organ_labels.dtype == np.int16 and phantom.lesion_labels.dtype == np.int16
        assert phantom.activity.min() >= 0 and phantom.mu.max() <= 0.0166
    present = set(np.unique(brain.organ_labels))
    assert {ORGAN_LABELS[o] for o in ("fat", "muscle", "bone", "csf", "brain_gm", "brain_wm", "cerebellum",
                                       "brainstem", "salivary")} <= present
    with pytest.raises(ValueError, match="unknown anatomy"):
        make_phantom(0, anatomy="liver")


def test_cortex_ribbon_has_the_thickness_drawn():
    """From every grey/white boundary voxel, the nearest voxel outside the brain tissue (CSF of
    the surface or of a sulcus) lies one ribbon thickness away; grey matter reaches deep into
    sulci, far below the brain surface."""
    phantom = make_phantom(3, voxel_mm=1.0, anatomy="brain", fov_mm=CORTEX_PATCH_MM)
    thickness = phantom.params["cortex_mm"]
    assert anatomy.CORTEX_MM[0] <= thickness <= anatomy.CORTEX_MM[1]
    grey, white = _mask(phantom, "brain_gm"), _mask(phantom, "brain_wm")
    boundary = white & ndimage.binary_dilation(grey)
    to_csf = ndimage.distance_transform_edt(grey | white)[boundary]
    assert boundary.sum() > 500
    assert np.median(to_csf) == pytest.approx(thickness, rel=0.25)
    # folded: most grey matter lies deeper than a smooth ribbon under the surface could
    cavity = grey | white | _mask(phantom, "csf")
    depth = ndimage.distance_transform_edt(cavity)[grey]
    assert (depth > thickness + phantom.params["csf_mm"] + 3.0).mean() > 0.25


def test_folded_surface_is_much_larger_than_its_hull():
    """Monte-Carlo pial area (coarea: volume of the band |sdf| < eps / 2 eps) of the cortex shape
    against its unfolded hull, and grey-matter volume / pial area against the ribbon thickness."""
    grid = VoxelGrid((50, 60, 50), (4.0, 4.0, 4.0), (-98.0, -118.0, 0.0))
    tracer = get_tracer("FDG")
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(4).spawn(3)]
    uptake = tracer.draw_uptake(np.random.default_rng(0), extra=True)
    scene = anatomy.brain_scene(grid, tracer, uptake, *rngs)
    cortex = next(layer.shape for layer in scene.layers if layer.organ == "brain_gm")
    thickness = scene.params["cortex_mm"]
    low, high = cortex.bbox
    points = np.random.default_rng(1).uniform(low, high, size=(400_000, 3)).T
    d = cortex.sdf(*points)
    volume, eps = np.prod(high - low), 0.3
    area = (np.abs(d) < eps).mean() * volume / (2 * eps)
    hull_area = (np.abs(cortex.solid.sdf(*points)) < eps).mean() * volume / (2 * eps)
    grey_volume = ((d < 0) & (d > -thickness)).mean() * volume
    assert area > 1.8 * hull_area
    # narrow gyri are grey through and through, so the ribbon holds a little less than area x t
    assert 0.55 * thickness < grey_volume / area < 1.0 * thickness


def test_fdg_grey_white_ratio_and_cold_csf(brain):
    grey = ndimage.binary_erosion(_mask(brain, "brain_gm"))
    white = ndimage.binary_erosion(_mask(brain, "brain_wm"))
    inside = ~ndimage.binary_dilation(brain.lesion_labels > 0, iterations=2)
    ratio = brain.activity[grey & inside].mean() / brain.activity[white & inside].mean()
    assert 2.0 < ratio < 4.5
    assert 2.5 < brain.uptake["brain_wm"] < 3.6 and 6.5 < brain.uptake["brain_gm"] < 12.0
    ventricles = ndimage.binary_erosion(_mask(brain, "csf"), iterations=1)
    assert np.median(brain.activity[ventricles]) < 0.5
    skull = _mask(brain, "bone")
    assert brain.mu[skull].mean() > 0.014 > 0.0099 > brain.mu[grey].mean() > 0.009


def test_non_fdg_brain_is_faint_and_shares_the_anatomy():
    fdg = make_phantom(5, voxel_mm=4.0, anatomy="brain", tracer="FDG")
    psma = make_phantom(5, voxel_mm=4.0, anatomy="brain", tracer="PSMA")
    np.testing.assert_array_equal(fdg.organ_labels, psma.organ_labels)
    np.testing.assert_array_equal(fdg.lesion_labels, psma.lesion_labels)
    grey = _mask(psma, "brain_gm") & (psma.lesion_labels == 0)
    assert psma.activity[grey].mean() < 0.5 < 5.0 < fdg.activity[grey].mean()
    assert psma.activity[_mask(psma, "salivary")].mean() > 10 * psma.activity[grey].mean()


@pytest.mark.parametrize("kind", ["brain", "dead_leaves"])
def test_same_seed_same_arrays_other_seed_differs(kind):
    def make(seed):
        return make_phantom(seed, voxel_mm=5.0, anatomy=kind, fov_mm=(160.0, 160.0, 100.0))

    first, again, other = make(7), make(7), make(8)
    for name in ("activity", "mu", "organ_labels", "lesion_labels", "affine"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert first.lesions == again.lesions and first.params == again.params
    assert np.abs(first.activity - other.activity).mean() > 0.05


@pytest.mark.parametrize("kind", ["brain", "leaves"])
def test_lesion_table_matches_labels(kind, brain, leaves):
    phantom = {"brain": brain, "leaves": leaves}[kind]
    assert phantom.lesions
    keys = {"id", "organ", "host", "center_mm", "radii_mm", "suv", "n_voxels", "volume_ml", "mean_suv"}
    for lesion in phantom.lesions:
        assert set(lesion) == keys
        inside = phantom.lesion_labels == lesion["id"]
        assert inside.sum() == lesion["n_voxels"] >= 1
        assert phantom.activity[inside].mean() == pytest.approx(lesion["mean_suv"], rel=1e-5)
        assert lesion["host"] in ORGAN_LABELS


def test_dead_leaves_sizes_span_scales(leaves):
    radii = np.array(leaves.params["shape_radius_mm"])
    assert leaves.params["n_shapes"] == len(radii) >= anatomy.LEAF_COUNT[0]
    low, high = anatomy.LEAF_RADIUS_MM
    assert radii.min() >= low and radii.max() <= high
    small, large = (radii < 2 * low).sum(), (radii > high / 3).sum()
    assert large >= 3 and small > 5 * large  # many small, few large
    # a power law: the counts per octave fall by about 2**(exponent - 1)
    octaves = np.histogram(radii, bins=low * 2.0 ** np.arange(5))[0]
    assert np.all(np.diff(octaves) < 0)
    assert set(leaves.params["shape_kind"]) == set(anatomy.LEAF_KINDS)


def test_dead_leaves_intensities_and_cold_shapes(leaves):
    suv = np.array(leaves.params["shape_suv"])
    hot = suv[suv > 0]
    assert hot.min() >= anatomy.LEAF_SUV_RANGE[0] and hot.max() <= anatomy.LEAF_SUV_RANGE[1]
    assert (suv == 0).sum() >= 10
    structure = _mask(leaves, "structure") & (leaves.lesion_labels == 0)
    assert structure.mean() > 0.1
    cold = structure & (leaves.activity == 0) & (leaves.mu > 0)  # inside a cold shape, attenuating
    assert cold.sum() > 20
    assert np.percentile(leaves.activity[structure], 99) > 5 * np.median(leaves.activity[_mask(leaves, "muscle")])
    assert leaves.mu[structure].max() > 0.015 and leaves.mu[structure & (leaves.mu > 0)].min() < 0.004


def test_new_shapes_voxelise_to_their_volume():
    grid = VoxelGrid((24, 24, 24), (1.0, 1.0, 1.0), (-11.5, -11.5, -11.5))
    r = 2.0
    box = RoundedBox((0.2, -0.3, 0.1), (8.0, 5.0, 6.0), r)
    p, q, s = 16.0 - 2 * r, 10.0 - 2 * r, 12.0 - 2 * r  # the inner box grown by a ball (Steiner)
    exact = p * q * s + 2 * (p * q + q * s + p * s) * r + np.pi * (p + q + s) * r**2 + 4 / 3 * np.pi * r**3
    assert voxel_fraction(box, grid, 2)[1].sum() == pytest.approx(exact, rel=0.01)
    flat = Blob((0.0, 0.0, 0.0), 9.0, lambda x, y, z: np.zeros(np.broadcast(x, y, z).shape), roughness=0.3)
    assert voxel_fraction(flat, grid, 2)[1].sum() == pytest.approx(4 / 3 * np.pi * 9.0**3, rel=0.01)


def test_zero_line_distance_of_a_known_field():
    """f = z, zero line the equator: the first-order distance f / |grad f| is tan(latitude)."""
    table = SphereTable([zero_line_distance(lambda u: u[..., 2], 90)])
    u, _, _ = sphere_directions(90)
    latitude = np.pi / 2 - np.arccos(u[..., 2])
    np.testing.assert_allclose(table.values[0].reshape(90, 181)[:, :180], np.tan(latitude), rtol=1e-4, atol=1e-6)
    probe = np.array([[0.6, 0.0, 0.8], [0.0, -1.0, 0.0]])
    np.testing.assert_allclose(table(*probe.T)[0], [np.tan(np.arcsin(0.8)), 0.0], rtol=2e-2, atol=1e-3)
    field = LatticeField(np.random.default_rng(0), (-20,) * 3, (20,) * 3, 6.0)
    values = field(*np.random.default_rng(1).uniform(-20, 20, (3, 2000)))
    assert abs(values.mean()) < 0.25 and 0.6 < values.std() < 1.4
