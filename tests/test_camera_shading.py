"""Projection and SH shading against hand-computed values."""

import torch

from fitter.camera import (
    ortho_init_from_landmarks,
    ortho_project,
    ortho_unproject_xy,
)
from fitter.shading import SH_CONSTANTS, ambient_light, cross, sh_shading, vertex_normals


def test_ortho_project_hand_case():
    pts = torch.tensor([[[0.0, 0.0, 0.1], [0.1, 0.05, -0.2]]])
    cam = torch.tensor([[5.0, 0.02, -0.01]])
    s = ortho_project(pts, cam, 200)
    # point 0: ndc = 5 * (0.02, -0.01) = (0.1, -0.05) -> x = 1.1 * 100, y = 1.05 * 100
    torch.testing.assert_close(s[0, 0], torch.tensor([110.0, 105.0, -0.1]))
    # point 1: ndc = 5 * (0.12, 0.04) = (0.6, 0.2) -> x = 160, y = 80
    torch.testing.assert_close(s[0, 1], torch.tensor([160.0, 80.0, 0.2]))
    torch.testing.assert_close(ortho_unproject_xy(s[..., :2], cam, 200), pts[..., :2])


def test_ortho_init_recovers_camera():
    torch.manual_seed(0)
    pts = torch.randn(2, 68, 3) * 0.05
    cam = torch.tensor([[9.0, 0.01, -0.02], [7.5, -0.03, 0.0]])
    target = ortho_project(pts, cam, 224)[..., :2]
    torch.testing.assert_close(ortho_init_from_landmarks(pts, target, 224), cam, atol=1e-4, rtol=1e-4)


def _octahedron():
    v = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=torch.float32)
    f = torch.tensor([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    return v[None], f


def test_cross_is_the_right_handed_cross_product():
    x, y, z = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(cross(x, y), z)  # by hand: x * y = z, y * z = x, and anticommuting
    torch.testing.assert_close(cross(y, z), x)
    torch.testing.assert_close(cross(y, x), -z)
    a = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(cross(a, b), torch.linalg.cross(a, b))
    assert torch.autograd.gradcheck(cross, (a, b))


def test_vertex_normals_point_outwards():
    v, f = _octahedron()
    n = vertex_normals(v, f)
    torch.testing.assert_close(n, v, atol=1e-6, rtol=0)


def test_sh_shading_ambient_and_directional():
    n = torch.nn.functional.normalize(torch.randn(1, 50, 3), dim=-1)
    amb = sh_shading(n, ambient_light(1, level=0.8))
    torch.testing.assert_close(amb, torch.full_like(amb, 0.8))
    light = torch.zeros(1, 9, 3)
    light[0, 3] = 1.0 / SH_CONSTANTS[3]  # linear in z
    torch.testing.assert_close(sh_shading(n, light), n[..., 2:3].expand(-1, -1, 3), atol=1e-6, rtol=0)
