"""Synthesis outputs of a known head: normal and depth maps, landmarks on the rendered face."""

import torch

from fitter.params import FitParams
from fitter.synth import synthesize


def test_frontal_render_maps(standin_model):
    m = standin_model
    p = FitParams.initial(1, m.n_shape, m.n_exp, m.n_verts)
    p.cam = torch.tensor([[6.0, 0.0, 0.0]])
    with torch.no_grad():
        pred = synthesize(m, p, 128)
    nose = pred["landmarks2d"][0, 30]  # iBUG nose tip
    cheek = (pred["landmarks2d"][0, 2] + pred["landmarks2d"][0, 31]) / 2  # between contour and nostril
    at = lambda img, pt: img[0, :, int(pt[1]), int(pt[0])]  # noqa: E731
    n_nose, n_cheek = at(pred["normals"], nose), at(pred["normals"], cheek)
    assert n_nose[2] > 0.8  # the nose tip faces the camera (+z)
    assert n_cheek[0] < -0.2  # the subject's right cheek (image left) turns towards -x
    assert at(pred["depth"], nose) < at(pred["depth"], cheek)  # smaller depth = nearer
    assert pred["alpha"][0, 0, 0, 0] == 0 and at(pred["alpha"], nose) == 1
    assert torch.all(pred["normals"].norm(dim=1) <= 1 + 1e-5)


def test_fixed_geometry_renders_new_light_as_a_fresh_render(standin_model):
    """Appearance stages reuse the geometry of a first render (`fixed`): a new light and albedo
    then give what a full render gives, with the same gradients."""
    m = standin_model
    torch.manual_seed(0)
    p = FitParams.initial(1, m.n_shape, m.n_exp, m.n_verts)
    p.cam = torch.tensor([[6.0, 0.0, 0.0]])
    p.global_pose = torch.tensor([[0.1, 0.4, 0.0]])
    background = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        first = synthesize(m, p, 96, background=background, maps=False, cull_back=True)
    p.light = (p.light + 0.2 * torch.randn_like(p.light)).requires_grad_(True)
    p.albedo = (p.albedo * 0.8).requires_grad_(True)
    reused = synthesize(m, p, 96, background=background, maps=False, fixed=first["fixed"])
    fresh = synthesize(m, p, 96, background=background, maps=False, cull_back=True)
    assert not torch.allclose(reused["image"], first["image"], atol=1e-3)  # the new light shows
    torch.testing.assert_close(reused["image"], fresh["image"], atol=1e-6, rtol=0)
    g_reused = torch.autograd.grad(reused["image"].square().sum(), [p.light, p.albedo])
    g_fresh = torch.autograd.grad(fresh["image"].square().sum(), [p.light, p.albedo])
    for a, b in zip(g_reused, g_fresh, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reused["landmarks2d"], fresh["landmarks2d"])
