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
