"""Procedural phantoms: determinism, tracer tables, lesion truth, attenuation, partial volumes."""

import time

import numpy as np
import pytest
from scipy import ndimage

from guided_diffusion.pet import phantoms
from guided_diffusion.pet.phantoms import ORGAN_LABELS, Ellipsoid, VoxelGrid, make_phantom, voxel_fraction
from guided_diffusion.pet.tracers import ATTENUATION_PER_MM, TRACERS, get_tracer

COARSE_MM = 6.6
TORSO_FOV_MM = (528.0, 330.0, 560.0)  # vertex to pelvis


@pytest.fixture(scope="module")
def coarse():
    return make_phantom(3, voxel_mm=COARSE_MM)


@pytest.fixture(scope="module")
def torso():
    return make_phantom(11, voxel_mm=3.3, fov_mm=TORSO_FOV_MM)


def test_same_seed_is_bit_identical_and_seeds_differ(coarse):
    again = make_phantom(3, voxel_mm=COARSE_MM)
    for name in ("activity", "mu", "organ_labels", "lesion_labels", "affine"):
        np.testing.assert_array_equal(getattr(again, name), getattr(coarse, name))
    assert again.lesions == coarse.lesions and again.uptake == coarse.uptake
    other = make_phantom(4, voxel_mm=COARSE_MM)
    assert np.abs(other.activity - coarse.activity).mean() > 0.05
    assert (other.organ_labels != coarse.organ_labels).mean() > 0.01


def test_layout_and_types(coarse):
    shape = tuple(round(f / COARSE_MM) for f in phantoms.DEFAULT_FOV_MM)
    assert coarse.activity.shape == shape and coarse.activity.dtype == np.float32
    assert coarse.mu.dtype == np.float32
    assert coarse.organ_labels.dtype == np.int16 and coarse.lesion_labels.dtype == np.int16
    np.testing.assert_allclose(np.diag(coarse.affine), [COARSE_MM] * 3 + [1.0])
    assert coarse.activity.min() >= 0
    # Z runs feet -> head: the brain lies in the top quarter, the bladder below the liver
    z_of = lambda organ: np.nonzero(coarse.organ_labels == ORGAN_LABELS[organ])[2].mean()
    assert z_of("brain_gm") > 0.75 * shape[2]
    assert z_of("bladder") < z_of("kidney_cortex") < z_of("liver") < z_of("lung") < z_of("brain_gm")
    # every organ of the table is present in a whole-body phantom
    present = set(np.unique(coarse.organ_labels))
    assert present == set(ORGAN_LABELS.values())


def _interior(phantom, organ):
    mask = phantom.organ_labels == ORGAN_LABELS[organ]
    mask = ndimage.binary_erosion(mask, iterations=1)
    return mask & ~ndimage.binary_dilation(phantom.lesion_labels > 0, iterations=2)


@pytest.mark.parametrize("organ", ["liver", "lung", "muscle", "brain_wm", "spleen", "blood_pool"])
def test_organ_interior_means_match_uptake(torso, organ):
    inside = _interior(torso, organ)
    assert inside.sum() > 20
    assert torso.activity[inside].mean() == pytest.approx(torso.uptake[organ], rel=0.06)


def test_bladder_is_uniform_at_its_uptake(coarse):
    inside = _interior(coarse, "bladder")
    np.testing.assert_allclose(coarse.activity[inside], coarse.uptake["bladder"], rtol=1e-6)


def test_uptake_draws_follow_the_tracer_tables():
    for name, tracer in TRACERS.items():
        draws = [tracer.draw_uptake(np.random.default_rng(k)) for k in range(400)]
        for organ, (typical, spread) in tracer.uptake.items():
            values = np.array([d[organ] for d in draws])
            # the median of a log-normal draw is the typical value
            assert np.median(values) == pytest.approx(typical, rel=4 * spread / np.sqrt(400) + 0.02), (name, organ)
    fdg, psma, dotatate = (get_tracer(n).uptake for n in ("FDG", "psma", "DotaTate"))
    assert fdg["brain_gm"][0] >= 3 * fdg["brain_wm"][0] and fdg["lung"][0] < fdg["blood_pool"][0] < fdg["liver"][0]
    assert psma["kidney_cortex"][0] > psma["liver"][0] > 10 * psma["brain_gm"][0]
    assert dotatate["spleen"][0] > dotatate["liver"][0] > dotatate["muscle"][0]
    with pytest.raises(ValueError, match="unknown tracer 'XYZ'"):
        get_tracer("XYZ")


def test_tables_cover_every_organ():
    organs = set(ORGAN_LABELS) - {"background"}
    assert set(ATTENUATION_PER_MM) == organs | {"background"}
    for tracer in TRACERS.values():
        assert set(tracer.uptake) == organs


def test_tracers_share_the_anatomy():
    fdg = make_phantom(5, voxel_mm=COARSE_MM, tracer="FDG")
    psma = make_phantom(5, voxel_mm=COARSE_MM, tracer="PSMA")
    np.testing.assert_array_equal(fdg.organ_labels, psma.organ_labels)
    kidney, brain = (psma.organ_labels == ORGAN_LABELS[o] for o in ("kidney_cortex", "brain_gm"))
    assert psma.activity[kidney].mean() > 20 * psma.activity[brain].mean()
    assert fdg.activity[brain].mean() > 2 * fdg.activity[kidney].mean()


def test_lesion_table_matches_label_volume(torso):
    voxel = np.array(torso.voxel_mm)
    assert torso.lesions, "expected at least one lesion"
    assert set(np.unique(torso.lesion_labels)) - {0} <= {l["id"] for l in torso.lesions}
    for lesion in torso.lesions:
        inside = torso.lesion_labels == lesion["id"]
        assert inside.sum() == lesion["n_voxels"] >= 1
        assert torso.activity[inside].mean() == pytest.approx(lesion["mean_suv"], rel=1e-5)
        assert 4.0 / 2 * 0.7 <= min(lesion["radii_mm"]) and max(lesion["radii_mm"]) <= 15.0 * 1.4
        # labelled voxels lie within the ellipsoid grown by half a voxel diagonal
        centre, radii = np.array(lesion["center_mm"]), np.array(lesion["radii_mm"])
        positions = (torso.affine @ np.vstack([np.array(np.nonzero(inside)), np.ones(inside.sum())]))[:3].T
        assert np.linalg.norm(positions - centre, axis=1).max() <= radii.max() + np.linalg.norm(voxel) / 2
        if radii.min() >= np.sqrt(3) * voxel.max():  # the centre voxel is fully inside: exact uptake
            index = tuple(np.round(np.linalg.solve(torso.affine, np.append(centre, 1))[:3]).astype(int))
            assert torso.activity[index] == pytest.approx(lesion["suv"], rel=1e-5)
            expected_voxels = 4 / 3 * np.pi * np.prod(radii) / np.prod(voxel)
            assert lesion["n_voxels"] == pytest.approx(expected_voxels, rel=0.35)


def test_attenuation_ranges(coarse):
    mu, labels = coarse.mu, coarse.organ_labels
    assert mu.min() >= 0 and mu.max() <= 0.02
    assert mu[labels == 0].max() < 0.0086  # air only gets partial-volume spill
    mean = lambda organ: mu[labels == ORGAN_LABELS[organ]].mean()
    assert 0.002 < mean("lung") < 0.0045 < 0.009 < mean("muscle") < 0.0105 < mean("bone") <= 0.0165
    assert mean("fat") < mean("muscle")


def test_edges_carry_partial_volumes(coarse):
    body = coarse.mu > 0
    edge = body & ~ndimage.binary_erosion(body)
    intermediate = (coarse.mu[edge] > 0.0005) & (coarse.mu[edge] < 0.0080)
    assert intermediate.mean() > 0.5  # a blocky mask would have none


def test_voxel_fraction_matches_sphere_volume():
    grid = VoxelGrid((20, 20, 20), (2.0, 2.0, 2.0), (-19.0, -19.0, -19.0))
    sphere = Ellipsoid((0.3, -0.7, 1.1), (10.0, 10.0, 10.0))
    for supersample, tolerance in ((1, 0.02), (2, 0.01)):
        slices, fraction = voxel_fraction(sphere, grid, supersample)
        assert fraction.sum() * 8.0 == pytest.approx(4 / 3 * np.pi * 1000, rel=tolerance)
    # exact signed distance for a sphere
    np.testing.assert_allclose(sphere.sdf(np.array([10.3]), np.array([-0.7]), np.array([1.1])), 0.0, atol=1e-12)
    np.testing.assert_allclose(sphere.sdf(np.array([0.3]), np.array([-0.7]), np.array([1.1])), -10.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="voxel_mm"):
        make_phantom(0, voxel_mm=0)
    with pytest.raises(ValueError, match="either shape or fov_mm"):
        make_phantom(0, shape=(10, 10, 10), fov_mm=(10, 10, 10))
    with pytest.raises(ValueError, match="unknown tracer"):
        make_phantom(0, voxel_mm=COARSE_MM, tracer="water")


@pytest.mark.slow
def test_demo_size_takes_seconds():
    start = time.perf_counter()
    phantom = make_phantom(0, voxel_mm=phantoms.DEMO_VOXEL_MM)
    assert time.perf_counter() - start < 15.0
    assert phantom.activity.shape == (160, 100, 303)
