"""Each loss term: value on hand-computed cases and gradient against finite differences."""

import torch

from fitter.losses import (
    charbonnier,
    landmark_loss,
    landmark_weights,
    mesh_grams,
    photometric_l2,
    photometric_loss,
    quadratic_form,
    range_penalty,
    relative_distance_loss,
    sh_light_regulariser,
    shape_consistency,
    squared_norm,
)


def fd_check(fn, x, eps=1e-6, tol=1e-5):
    x = x.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: fn(t).sum(), (x,), eps=eps, atol=tol)


def test_charbonnier_values():
    x = torch.tensor([0.0, 3.0, -4.0])
    torch.testing.assert_close(charbonnier(x, 0.0), x.abs())
    torch.testing.assert_close(charbonnier(torch.tensor([1.0]), 1.0), torch.tensor([2 ** 0.5 - 1]))


def test_landmark_loss_hand_case():
    target = torch.zeros(1, 68, 2)
    pred = target.clone()
    pred[0, 30] = torch.tensor([3.0, 4.0])  # 5 px off on one point, res 100 -> 0.1 half-crop units
    w = torch.ones(68)
    value = landmark_loss(pred, target, w, res=100, eps=0.0)
    torch.testing.assert_close(value, torch.tensor([0.1 / 68]))
    w2 = landmark_weights({"nose": 3.0})  # point 30 is on the nose
    assert w2[30] == 3 and w2[0] == 1
    value2 = landmark_loss(pred, target, w2, res=100, eps=0.0)
    torch.testing.assert_close(value2, torch.tensor([0.3 / w2.sum()]))


def test_landmark_loss_gradient():
    target = torch.randn(2, 68, 2, dtype=torch.float64) * 20
    fd_check(lambda p: landmark_loss(p, target, torch.ones(68, dtype=torch.float64), 224), target + 1.5)


def test_relative_distance_hand_case():
    pred = torch.zeros(1, 68, 2)
    target = torch.zeros(1, 68, 2)
    target[0, [37, 38, 43, 44], 1] = -4.0  # target eyes open by 4 px, prediction closed
    v = relative_distance_loss(pred, target, [37, 38, 43, 44], [41, 40, 47, 46], res=200)
    torch.testing.assert_close(v, torch.tensor([0.04]))


def test_photometric_masked_mean():
    img = torch.zeros(1, 3, 4, 4)
    ren = torch.zeros(1, 3, 4, 4)
    ren[:, :, 0, 0] = 0.5  # only pixel (0,0) differs, by 0.5 per channel
    mask = torch.zeros(1, 1, 4, 4)
    mask[:, :, :2, :2] = 1  # 4 masked pixels
    v = photometric_loss(ren, img, mask, eps=0.0)
    torch.testing.assert_close(v, torch.tensor([1.5 / 4]))
    mask[:, :, 0, 0] = 0  # the differing pixel outside the mask does not count
    torch.testing.assert_close(photometric_loss(ren, img, mask, eps=0.0), torch.tensor([0.0]))
    fd_check(lambda r: photometric_loss(r, img.double(), mask.double() + 0.2), torch.rand(1, 3, 4, 4))
    mask[:, :, 0, 0] = 1
    torch.testing.assert_close(photometric_l2(ren, img, mask), torch.tensor([0.75 / 4]))


def test_priors_and_limits():
    torch.testing.assert_close(squared_norm(torch.tensor([[1.0, 2.0], [0.0, 3.0]])), torch.tensor([5.0, 9.0]))
    x = torch.tensor([[0.7, 0.0, -0.3]])
    v = range_penalty(x, torch.tensor([-0.05, -0.1, -0.1]), torch.tensor([0.6, 0.1, 0.1]))
    torch.testing.assert_close(v, torch.tensor([0.1 ** 2 + 0.2 ** 2]))
    light = torch.zeros(1, 9, 3)
    light[0, 0] = 3.0
    torch.testing.assert_close(sh_light_regulariser(light), torch.tensor([0.0]))  # grey ambient: free
    light[0, 0, 0] = 4.0  # a red cast
    assert sh_light_regulariser(light) > 0


def test_albedo_smoothness_and_symmetry():
    values = torch.tensor([[[0.0], [1.0], [3.0]]])
    edges = torch.tensor([[0, 1], [1, 2]])
    mirror = torch.tensor([2, 1, 0])
    smooth, sym = mesh_grams(edges, mirror, 3)
    torch.testing.assert_close(quadratic_form(values, smooth), torch.tensor([(1 + 4) / 2.0]))
    torch.testing.assert_close(quadratic_form(values, sym), torch.tensor([(9 + 0 + 9) / 3.0]))


def test_quadratic_form_gradient_matches_the_pairs():
    """Batched, several channels, a many-to-one mirror: value and gradient equal those of the
    differences written out pair by pair."""
    g = torch.Generator().manual_seed(0)
    values = torch.rand(2, 9, 3, generator=g, dtype=torch.float64)
    edges = torch.randint(0, 9, (20, 2), generator=g)
    mirror = torch.tensor([8, 7, 6, 5, 4, 3, 2, 1, 1])
    for pairs, gram in zip((edges, torch.stack([torch.arange(9), mirror], 1)), mesh_grams(edges, mirror, 9),
                           strict=True):
        x, y = values.clone().requires_grad_(True), values.clone().requires_grad_(True)
        direct = ((x[:, pairs[:, 0]] - x[:, pairs[:, 1]]) ** 2).sum(-1).mean(1)
        form = quadratic_form(y, gram)
        torch.testing.assert_close(form, direct)
        (direct * torch.tensor([1.0, -2.0], dtype=torch.float64)).sum().backward()
        (form * torch.tensor([1.0, -2.0], dtype=torch.float64)).sum().backward()
        torch.testing.assert_close(y.grad, x.grad)


def test_shape_consistency_hinge_and_pull():
    same = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    far_neg = torch.tensor([[10.0, 0.0]])
    torch.testing.assert_close(shape_consistency(same, 0.5, far_neg), torch.zeros(2))
    shapes = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    close_neg = torch.tensor([[0.0, 0.5]])
    # image 0: |b0-b1|^2 = 1, |b0-n|^2 = 0.25 -> hinge 1 + 0.5 - 0.25 = 1.25; pull 0.25
    # image 1: |b1-b0|^2 = 1, |b1-n|^2 = 1.25 -> hinge 0.25; pull 0.25
    torch.testing.assert_close(shape_consistency(shapes, 0.5, close_neg), torch.tensor([1.5, 0.5]))
    fd_check(lambda s: shape_consistency(s, 0.5, close_neg.double()), shapes + 0.1)
