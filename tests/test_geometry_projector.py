"""Scanner geometry, sinogram layout and the torch projector (exact adjoint, line integrals)."""

import math

import numpy as np
import pytest
import torch

from guided_diffusion.pet import geometry
from guided_diffusion.pet.linear_operator import DiagonalOperator, GaussianPSF, compose
from guided_diffusion.pet.projector import make_projector

DEMO_SHAPE = (24, 22, 16)   # 4 mm voxels: 96 x 88 x 64 mm inside the demo scanner (64 mm axial FOV)


def _disk(n, voxel_mm, radius_mm, supersample=8):
    """Area fraction of each pixel inside a centred disk, (n, n)."""
    fine = (torch.arange(n * supersample, dtype=torch.float64) - (n * supersample - 1) / 2) * voxel_mm / supersample
    x, y = torch.meshgrid(fine, fine, indexing="ij")
    inside = (x ** 2 + y ** 2 <= radius_mm ** 2).to(torch.float64)
    return inside.view(n, supersample, n, supersample).mean(dim=(1, 3))


def _relative_adjoint_error(op, batch=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    x = torch.rand(lead + tuple(op.image_shape), generator=gen)
    y = torch.rand(lead + tuple(op.sinogram_shape), generator=gen)
    lhs = (op.forward(x).double() * y.double()).sum()
    rhs = (x.double() * op.adjoint(y).double()).sum()
    return abs((lhs - rhs) / lhs).item()


def test_presets_match_published_scanners():
    quadra = geometry.get_preset("quadra")
    assert quadra.ring_radius_mm * 2 == pytest.approx(820.0)
    assert quadra.crystal_size_mm == pytest.approx(3.2)
    assert quadra.axial_fov_mm == pytest.approx(1060.0)
    assert geometry.get_preset("uexplorer").axial_fov_mm == pytest.approx(1940.0)
    assert geometry.get_preset("uexplorer").ring_radius_mm * 2 == pytest.approx(786.0)
    ecat = geometry.make_layout("ecat921_2d", "2d", plane_z_mm=[0.0])
    assert ecat.shape == (160, 192, 1)
    assert np.allclose(ecat.scanner.view_angles()[[0, -1]], [0.0, math.pi * 191 / 192])
    with pytest.raises(ValueError, match="unknown scanner preset"):
        geometry.get_preset("nonexistent")


def test_layout_plane_counts_by_span_and_ring_difference():
    n = geometry.get_preset("demo").n_rings                 # 8 rings
    assert geometry.make_layout("demo", "ssrb").n_planes == 2 * n - 1
    span1 = geometry.make_layout("demo", "3d", max_ring_difference=3, span=1)
    assert [s.n_planes for s in span1.segments] == [8, 7, 7, 6, 6, 5, 5]
    assert span1.n_planes == n + 2 * sum(n - d for d in range(1, 4))
    span3 = geometry.make_layout("demo", "3d", max_ring_difference=7, span=3)
    # segment 0: |d| <= 1 -> 2N-1 planes; segment +-1: d in 2..4 -> 2N-1-2*2 planes; +-2: d in 5..7.
    assert [s.n_planes for s in span3.segments] == [15, 11, 11, 5, 5]
    assert [s.mean_ring_difference for s in span3.segments] == [0, 3, -3, 6, -6]
    assert geometry.sinogram_nbytes("demo", "3d", max_ring_difference=3) == 55 * 64 * span1.n_planes * 4
    for bad in (dict(span=2), dict(max_ring_difference=8), dict(max_ring_difference=-1)):
        with pytest.raises(ValueError):
            geometry.make_layout("demo", "3d", **bad)


def test_full_quadra_sinogram_is_refused_before_allocation():
    layout = geometry.make_layout("quadra", "3d", max_ring_difference=319, span=1)
    n_rings, n_radial, n_views = 320, layout.n_radial, 380
    assert layout.nbytes() == n_radial * n_views * n_rings ** 2 * 4    # span 1: N^2 ring pairs
    with pytest.raises(MemoryError, match="ssrb"):
        geometry.check_memory_budget(layout, budget_bytes=16 << 30)
    with pytest.raises(MemoryError):
        make_projector("demo", DEMO_SHAPE, 4.0, mode="3d", memory_budget_bytes=10_000)
    slab = make_projector("quadra", (8, 8, 6), 1.65, mode="3d", max_ring_difference=2)
    assert slab.sinogram_shape[2] < 60                       # only the slab's own planes


ADJOINT_CASES = {
    "2d": dict(mode="2d"),
    "ssrb": dict(mode="ssrb"),
    "3d_span1": dict(mode="3d", max_ring_difference=3),
    "3d_span3": dict(mode="3d", max_ring_difference=7, span=3),
    "3d_psf": dict(mode="3d", max_ring_difference=2, psf_fwhm_mm=6.0),
    "ssrb_mashed_offset": dict(mode="ssrb", view_mashing=2, axial_offset_mm=-4.0),
}


@pytest.mark.parametrize("case", sorted(ADJOINT_CASES))
def test_back_projection_is_exact_adjoint(case):
    shape = DEMO_SHAPE if case != "ssrb_mashed_offset" else (24, 22, 14)
    op = make_projector("demo", shape, 4.0, **ADJOINT_CASES[case])
    assert _relative_adjoint_error(op) < 1e-5
    assert _relative_adjoint_error(op, batch=2, seed=1) < 1e-5
    assert _relative_adjoint_error(op.subset(1, 4)) < 1e-5


def test_adjoint_of_composition_with_diagonal_operators():
    projector = make_projector("demo", DEMO_SHAPE, 4.0, mode="3d", max_ring_difference=2)
    gen = torch.Generator().manual_seed(3)
    norm = DiagonalOperator(0.5 + torch.rand(projector.sinogram_shape, generator=gen))
    attenuation = DiagonalOperator(torch.rand(projector.sinogram_shape, generator=gen))
    mask = DiagonalOperator(torch.rand(DEMO_SHAPE, generator=gen), space="image")
    psf = GaussianPSF(DEMO_SHAPE, 4.0, (5.0, 5.0, 8.0))
    model = norm @ attenuation @ projector @ psf @ mask
    assert model.sinogram_shape == projector.sinogram_shape and model.image_shape == DEMO_SHAPE
    assert _relative_adjoint_error(model) < 1e-5
    assert _relative_adjoint_error(model.T.T) < 1e-5
    assert _relative_adjoint_error(model.subset(2, 3)) < 1e-5
    x = torch.rand(DEMO_SHAPE, generator=gen)
    expected = norm.factor * attenuation.factor * projector.forward(psf.forward(x * mask.factor))
    assert torch.allclose(model.forward(x), expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(compose(norm, projector).forward(x), norm.forward(projector.forward(x)))
    with pytest.raises(ValueError, match="cannot compose"):
        projector @ norm


def test_subset_projects_every_nth_view():
    projector = make_projector("demo", DEMO_SHAPE, 4.0, mode="ssrb")
    x = torch.rand(DEMO_SHAPE, generator=torch.Generator().manual_seed(4))
    full = projector.forward(x)
    for k in range(3):
        assert torch.allclose(projector.subset(k, 3).forward(x), full[:, k::3], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        projector.subset(3, 3)


def test_disk_line_integrals_match_chord_length():
    n, voxel, radius = 96, 1.5, 50.0
    projector = make_projector("demo", (n, n, 1), voxel, mode="2d")
    sino = projector.forward(_disk(n, voxel, radius).float()[:, :, None])[..., 0]
    s = torch.as_tensor(projector.scanner.radial_positions_mm())
    chord = 2 * torch.sqrt((radius ** 2 - s ** 2).clamp(min=0))
    inner = s.abs() < 0.8 * radius
    rel = (sino[inner] - chord[inner, None]).abs() / chord[inner, None]
    assert rel.max() < 0.01
    assert sino[s.abs() > radius + 2 * voxel].abs().max() == 0


def test_oblique_path_length_and_ssrb_of_axially_uniform_cylinder():
    """An axially uniform cylinder: oblique LORs integrate chord / cos(theta); SSRB with the
    obliquity correction reproduces the direct-plane projection."""
    n, voxel, radius = 24, 4.0, 36.0
    cylinder = _disk(n, voxel, radius).float()[:, :, None].repeat(1, 1, 16)
    direct = make_projector("demo", cylinder.shape, voxel, mode="ssrb")
    oblique = make_projector("demo", cylinder.shape, voxel, mode="3d", max_ring_difference=3)
    sino_direct = direct.forward(cylinder)
    sino_3d = oblique.forward(cylinder)
    rebinned = geometry.ssrb(sino_3d, oblique.layout, direct.layout)
    z = torch.tensor(direct.layout.segments[0].plane_z_mm)
    central = z.abs() <= 16.0                                  # oblique LORs stay inside the volume
    assert torch.allclose(rebinned[..., central], sino_direct[..., central], rtol=1e-4, atol=1e-3)
    # segment +3 (last-but-one): values = direct values / cos(theta) at its central planes
    segment = oblique.layout.segments[-2]
    planes = oblique.layout.segment_slices()[-2]
    slope = torch.as_tensor(oblique.layout.axial_slope(segment), dtype=torch.float32)
    assert segment.mean_ring_difference == 3
    seg_z = torch.tensor(segment.plane_z_mm)
    mid = int(torch.argmin(seg_z.abs()))
    centre_plane = int(torch.argmin(z.abs()))
    expected = sino_direct[..., centre_plane] * torch.sqrt(1 + slope ** 2)[:, None]
    assert torch.allclose(sino_3d[..., planes][..., mid], expected, rtol=1e-4, atol=1e-3)
    assert (slope.abs().max() > 0.09) and (torch.sqrt(1 + slope ** 2).max() > 1.004)


def test_forward_is_differentiable_with_adjoint_gradient():
    projector = make_projector("demo", (12, 12, 8), 4.0, mode="3d", max_ring_difference=2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    x = torch.rand((12, 12, 8), generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(projector.sinogram_shape, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((projector.forward(x) * weights).sum(), x)
    assert torch.allclose(grad, projector.adjoint(weights), rtol=1e-10, atol=1e-12)


def test_psf_preserves_mass_and_has_requested_width():
    psf = GaussianPSF((41, 41, 41), 1.0, 6.0)
    impulse = torch.zeros(41, 41, 41)
    impulse[20, 20, 20] = 1.0
    blurred = psf.forward(impulse)
    assert blurred.sum().item() == pytest.approx(1.0, rel=1e-5)
    profile = blurred[:, 20, 20] / blurred[20, 20, 20]
    half = (profile >= 0.5).nonzero().squeeze(1)
    assert 5 <= (half.max() - half.min() + 1).item() <= 7     # FWHM 6 mm at 1 mm voxels


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_shape=(80, 80, 4), voxel_size_mm=4.0), "transaxial FOV"),
    (dict(image_shape=(16, 16, 40), voxel_size_mm=4.0), "axial FOV"),
    (dict(image_shape=(16, 16, 4), voxel_size_mm=-1.0), "voxel_size_mm"),
    (dict(image_shape=(16, 16), voxel_size_mm=4.0), "image_shape"),
    (dict(image_shape=(16, 16, 4), voxel_size_mm=4.0, mode="fan"), "mode"),
])
def test_bad_projector_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_projector("demo", **kwargs)


def test_wrong_input_shape_raises():
    projector = make_projector("demo", (16, 16, 4), 4.0, mode="2d")
    with pytest.raises(ValueError, match="expects shape"):
        projector.forward(torch.zeros(16, 16, 5))
    with pytest.raises(ValueError, match="expects shape"):
        projector.adjoint(torch.zeros(3, 3, 3))
