"""Behaviour of the pure-PyTorch rasterizer against independent expectations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fitter.render as render
from fitter.render import (
    interpolate,
    rasterize,
    render_mesh,
    soft_silhouette,
    vertex_visibility,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


# --------------------------------------------------------------------------------------
# helpers (independent of the renderer)
# --------------------------------------------------------------------------------------


def brute_force_cover(tri: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres inside a triangle (3 x 2, float64) and those within 1e-6 px of its border.

    Returns (inside, ambiguous), both H x W bool.
    """
    ys, xs = np.mgrid[0:height, 0:width]
    p = np.stack([xs + 0.5, ys + 0.5], axis=-1).astype(np.float64)
    d = []
    for k in range(3):
        a, b = tri[(k + 1) % 3], tri[(k + 2) % 3]
        e = b - a
        cross = e[0] * (p[..., 1] - a[1]) - e[1] * (p[..., 0] - a[0])
        d.append(cross / np.hypot(*e))
    d = np.stack(d) * np.sign(np.cross(tri[1] - tri[0], tri[2] - tri[0]))
    return (d > 0).all(axis=0), (np.abs(d) < 1e-6).any(axis=0) & (d > -1e-6).all(axis=0)


def uv_sphere(radius: float, centre: tuple[float, float], n_lat: int, n_lon: int):
    """Screen-space UV sphere with its poles along the view axis (so the silhouette is the
    equator). Returns verts V x 3 float64 (depth = -z, smaller nearer) and faces F x 3."""
    theta = np.linspace(0, np.pi, n_lat + 1)[1:-1]
    phi = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], -1).reshape(-1, 3)
    pts = np.concatenate([[[0, 0, 1]], ring, [[0, 0, -1]]]) * radius
    faces = []
    n_rings = len(theta)
    idx = lambda i, j: 1 + i * n_lon + (j % n_lon)  # noqa: E731
    for j in range(n_lon):
        faces.append([0, idx(0, j), idx(0, j + 1)])
        faces.append([len(pts) - 1, idx(n_rings - 1, j + 1), idx(n_rings - 1, j)])
    for i in range(n_rings - 1):
        for j in range(n_lon):
            a, b, c, d = idx(i, j), idx(i, j + 1), idx(i + 1, j), idx(i + 1, j + 1)
            faces += [[a, c, b], [b, c, d]]
    verts = np.stack([pts[:, 0] + centre[0], pts[:, 1] + centre[1], -pts[:, 2]], -1)
    return verts, np.asarray(faces, dtype=np.int64)


def tensor(x, device="cpu", dtype=torch.float64):
    return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)


def grid_mesh(n: int, cell: float, origin: float, jitter: float, seed: int):
    """Planar grid of n x n cells, both diagonal directions, vertices optionally jittered by
    multiples of 1/8 px (so that many pixel centres fall exactly on edges and vertices)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0 : n + 1, 0 : n + 1]
    v = np.stack([xs, ys], -1).reshape(-1, 2) * cell + origin
    inner = ((xs > 0) & (xs < n) & (ys > 0) & (ys < n)).reshape(-1)
    v[inner] += np.round(rng.uniform(-jitter, jitter, (inner.sum(), 2)) * 8) / 8
    faces = []
    for i in range(n):
        for j in range(n):
            a, b = i * (n + 1) + j, i * (n + 1) + j + 1
            c, d = a + n + 1, b + n + 1
            faces += [[a, b, d], [a, d, c]] if (i + j) % 2 else [[a, b, c], [b, d, c]]
    verts = np.concatenate([v, np.zeros((len(v), 1))], 1)
    return verts, np.asarray(faces, dtype=np.int64)


# --------------------------------------------------------------------------------------
# coverage
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_single_triangle_matches_brute_force(device):
    rng = np.random.default_rng(0)
    height, width = 48, 64
    for trial in range(30):
        scale = [3, 10, 40, 90][trial % 4]  # small ones and some larger than the image
        centre = rng.uniform([0, 0], [width, height])
        tri = centre + rng.uniform(-scale, scale, (3, 2))
        if abs(np.cross(tri[1] - tri[0], tri[2] - tri[0])) < 1:
            continue
        for order in ([0, 1, 2], [0, 2, 1]):  # both windings
            verts = np.concatenate([tri[order], rng.uniform(1, 2, (3, 1))], 1)
            frags = rasterize(tensor(verts, device)[None], tensor([[0, 1, 2]], device,
                                                                  torch.int64), height, width)
            got = (frags.pix_to_face[0] == 0).cpu().numpy()
            want, ambiguous = brute_force_cover(tri[order], height, width)
            assert np.array_equal(got[~ambiguous], want[~ambiguous]), (trial, order)
            assert set(frags.pix_to_face.unique().tolist()) <= {-1, 0}


def test_float32_matches_brute_force_away_from_edges():
    rng = np.random.default_rng(1)
    for _ in range(20):
        tri = rng.uniform(-10, 60, (3, 2))
        verts = np.concatenate([tri, np.ones((3, 1))], 1)
        frags = rasterize(tensor(verts, dtype=torch.float32)[None],
                          torch.tensor([[0, 1, 2]]), 50, 50)
        want, _ = brute_force_cover(tri, 50, 50)
        # pixels further than 1e-3 px from every edge must agree exactly
        ys, xs = np.mgrid[0:50, 0:50]
        p = np.stack([xs + 0.5, ys + 0.5], -1)
        near = np.zeros((50, 50), bool)
        for k in range(3):
            a, b = tri[(k + 1) % 3], tri[(k + 2) % 3]
            e = b - a
            dist = (e[0] * (p[..., 1] - a[1]) - e[1] * (p[..., 0] - a[0])) / np.hypot(*e)
            near |= np.abs(dist) < 1e-3
        got = (frags.pix_to_face[0] == 0).numpy()
        assert np.array_equal(got[~near], want[~near])


def per_triangle_counts(verts: torch.Tensor, faces: torch.Tensor, height: int, width: int):
    """How many triangles of a mesh claim each pixel centre (each triangle rasterized alone)."""
    counts = torch.zeros(height, width, dtype=torch.int64)
    for f in range(faces.shape[0]):
        frags = rasterize(verts[None], faces[f : f + 1], height, width)
        counts += (frags.pix_to_face[0] >= 0).long().cpu()
    return counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_edges_and_vertices_drawn_exactly_once(dtype):
    # a 6 x 6 grid with vertices on pixel centres and corners and edges through pixel centres
    for seed, (cell, origin, jitter) in enumerate([(4.0, 2.5, 0.0), (5.0, 2.0, 1.5)]):
        verts, faces = grid_mesh(6, cell, origin, jitter, seed)
        size = 36
        counts = per_triangle_counts(tensor(verts, dtype=dtype), torch.as_tensor(faces),
                                     size, size)
        ys, xs = np.mgrid[0:size, 0:size] + 0.5
        lo, hi = origin, origin + 6 * cell
        strictly_inside = (xs > lo) & (xs < hi) & (ys > lo) & (ys < hi)
        assert (counts.numpy()[strictly_inside] == 1).all(), seed
        assert (counts.numpy()[(xs < lo) | (xs > hi) | (ys < lo) | (ys > hi)] == 0).all()


def test_fan_around_a_pixel_centre_claims_it_once():
    n = 12
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rim = np.stack([10.5 + 6 * np.cos(ang), 10.5 + 6 * np.sin(ang)], -1)
    v = np.concatenate([[[10.5, 10.5]], rim])
    verts = np.concatenate([v, np.zeros((n + 1, 1))], 1)
    faces = np.array([[0, 1 + i, 1 + (i + 1) % n] for i in range(n)])
    counts = per_triangle_counts(tensor(verts, dtype=torch.float32), torch.as_tensor(faces),
                                 21, 21)
    assert counts[10, 10] == 1
    assert counts.max() == 1


def test_nearer_triangle_wins_and_empty_is_minus_one():
    a = [[2, 2, 5.0], [30, 4, 5.0], [6, 30, 5.0]]
    b = [[4, 3, 1.0], [28, 28, 1.0], [3, 26, 1.0]]
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    for za, zb, winner in [(5.0, 1.0, 1), (1.0, 5.0, 0)]:
        v = tensor(a + b)
        v[:3, 2], v[3:, 2] = za, zb
        frags = rasterize(v[None], faces, 32, 32)
        both = brute_force_cover(v[:3, :2].numpy(), 32, 32)[0] & brute_force_cover(
            v[3:, :2].numpy(), 32, 32)[0]
        assert both.sum() > 50
        assert (frags.pix_to_face[0].numpy()[both] == winner).all()
        assert frags.zbuf[0].numpy()[both] == pytest.approx(min(za, zb))
    empty = frags.pix_to_face[0] < 0
    assert empty[31, 31] and empty[0, 31]
    assert torch.isinf(frags.zbuf[0][empty]).all()
    assert (frags.bary[0][empty] == 0).all()


def test_degenerate_and_offscreen_triangles_are_skipped():
    v = tensor([[1, 1, 1], [20, 20, 1], [10, 10, 1],  # collinear
                [-50, -50, 1], [-40, -50, 1], [-45, -40, 1],  # off screen
                [5, 5, 1], [5, 5, 1], [5, 5, 1]])  # a point
    faces = torch.arange(9).view(3, 3)
    frags = rasterize(v[None], faces, 24, 24)
    assert (frags.pix_to_face < 0).all()


def test_chunked_index_pass_matches(monkeypatch):
    verts, faces = uv_sphere(20, (24, 20), 16, 24)
    v, f = tensor(verts)[None], torch.as_tensor(faces)
    ref = rasterize(v, f, 40, 48).pix_to_face
    monkeypatch.setattr(render, "_MAX_CANDIDATES", 50)
    assert torch.equal(rasterize(v, f, 40, 48).pix_to_face, ref)


# --------------------------------------------------------------------------------------
# barycentrics, interpolation, gradients
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_barycentrics_reproduce_pixel_centres_and_linear_functions(device):
    verts, faces = uv_sphere(25, (30, 28), 12, 20)
    v = tensor(verts, device)[None]
    f = torch.as_tensor(faces, device=device)
    frags = rasterize(v, f, 56, 64)
    hit = frags.pix_to_face[0] >= 0
    assert hit.sum() > 1500
    assert torch.allclose(frags.bary[0][hit].sum(-1), torch.ones(1, device=device, dtype=v.dtype))
    xy = interpolate(v[..., :2], f, frags)[0]
    ys, xs = torch.meshgrid(torch.arange(56, device=device), torch.arange(64, device=device),
                            indexing="ij")
    centres = torch.stack([xs, ys], -1).to(v.dtype) + 0.5
    assert torch.allclose(xy[hit], centres[hit], atol=1e-9)
    assert (xy[~hit] == 0).all()
    lin = 0.3 * v[..., 0:1] - 1.7 * v[..., 1:2] + 2.0 * v[..., 2:3] + 4.0
    got = interpolate(lin, f, frags)[0, ..., 0]
    want = 0.3 * centres[..., 0] - 1.7 * centres[..., 1] + 2.0 * frags.zbuf[0] + 4.0
    assert torch.allclose(got[hit], want[hit], atol=1e-9)


def test_gradcheck_interpolation_wrt_vertices_and_attributes():
    torch.manual_seed(0)
    v = tensor([[3.3, 2.2, 1.0], [17.1, 4.4, 2.0], [5.2, 15.7, 3.0], [18.6, 16.9, 0.5]])
    faces = torch.tensor([[0, 1, 2], [1, 3, 2]])
    attrs = torch.randn(1, 4, 2, dtype=torch.float64)
    weight = torch.randn(1, 20, 20, 2, dtype=torch.float64)

    def loss(verts, attrs):
        frags = rasterize(verts[None], faces, 20, 20)
        img = interpolate(attrs, faces, frags)
        z = torch.where(frags.pix_to_face >= 0, frags.zbuf, torch.zeros_like(frags.zbuf))
        bary = (frags.bary[..., :2] * weight).sum()
        return (img * weight).sum() + (z * weight[..., 0]).sum() + (img**2).sum() + bary

    assert torch.autograd.gradcheck(loss, (v.clone().requires_grad_(), attrs.requires_grad_()))


def triangle_area(p: torch.Tensor) -> torch.Tensor:
    e1, e2 = p[1, :2] - p[0, :2], p[2, :2] - p[0, :2]
    return 0.5 * (e1[0] * e2[1] - e1[1] * e2[0]).abs()


def test_soft_silhouette_area_and_its_derivative():
    faces = torch.tensor([[0, 1, 2]])
    v = tensor([[10.3, 8.1, 1.0], [52.6, 14.2, 1.0], [21.7, 49.4, 1.0]]).requires_grad_()
    frags = rasterize(v[None], faces, 60, 64)
    alpha = soft_silhouette(v[None], faces, frags)
    assert alpha.min() >= 0 and alpha.max() <= 1
    area = triangle_area(v)
    assert alpha.sum().item() == pytest.approx(area.item(), rel=0.01)
    (grad,) = torch.autograd.grad(alpha.sum(), v)
    (want,) = torch.autograd.grad(area, v)
    # d(area)/d(vertex) points outward; sigma = 0.5 should give it with small error
    for k in range(3):
        assert torch.dot(grad[k, :2], want[k, :2]) > 0
        assert torch.linalg.norm(grad[k, :2] - want[k, :2]) < 0.15 * torch.linalg.norm(want[k, :2])
    assert torch.all(grad[:, 2] == 0)

    # the alpha sum changes continuously with the gradient predicted by autograd
    def alpha_sum(x):
        p = v.detach().clone()
        p[1, 0] += x
        return soft_silhouette(p[None], faces, rasterize(p[None], faces, 60, 64)).sum().item()

    fd = (alpha_sum(0.25) - alpha_sum(-0.25)) / 0.5
    assert fd == pytest.approx(grad[1, 0].item(), rel=0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_sphere_mask_area(device):
    r = 60.0
    verts, faces = uv_sphere(r, (112.3, 111.8), 64, 128)
    v = tensor(verts, device, torch.float32)[None]
    f = torch.as_tensor(faces, device=device)
    frags = rasterize(v, f, 224, 224)
    disk = math.pi * r * r
    assert (frags.pix_to_face >= 0).sum().item() == pytest.approx(disk, rel=0.01)
    alpha = soft_silhouette(v, f, frags)
    assert alpha.sum().item() == pytest.approx(disk, rel=0.01)
    # only the near hemisphere (depth < 0 here) is visible; near the pole the triangles are
    # too small to cover a pixel centre, elsewhere nearly all of its vertices are seen
    vis = vertex_visibility(v, f, frags)[0].cpu().numpy()
    assert not vis[verts[:, 2] > 1e-6].any()
    assert vis[(verts[:, 2] < -5) & (verts[:, 2] > -50)].mean() > 0.9


def test_non_finite_vertices_render_the_rest_without_warnings():
    """A failed fitting step can leave some vertices NaN or infinite: the triangles touching them
    are skipped, the silhouette's walk steps around them silently (numpy is told to be quiet, as
    torch is), and every pixel comes out finite."""
    import warnings

    verts, faces = uv_sphere(40.0, (64.0, 64.0), 24, 48)
    v = torch.as_tensor(verts, dtype=torch.float32)[None].clone()
    v[0, ::7, 0] = float("inf")
    v[0, 3::11] = float("nan")
    f = torch.as_tensor(faces)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = render_mesh(v, f, torch.rand(1, v.shape[1], 3), 128, 128)
    assert torch.isfinite(out["image"]).all() and torch.isfinite(out["alpha"]).all()
    assert out["alpha"].sum() > 0.5 * math.pi * 40.0 ** 2  # the triangles away from them are drawn (0.65 here)


def test_soft_silhouette_gradient_moves_edges_towards_target():
    verts, faces = uv_sphere(12, (20, 20), 12, 24)
    v = tensor(verts)[None].requires_grad_()
    f = torch.as_tensor(faces)
    base = tensor(verts)[None]
    target = soft_silhouette(base, f, rasterize(base, f, 40, 40))
    grown = (v - tensor([20, 20, 0])) * 1.1 + tensor([20, 20, 0])  # a larger sphere
    alpha = soft_silhouette(grown, f, rasterize(grown, f, 40, 40))
    ((alpha - target) ** 2).sum().backward()
    rim = np.abs(verts[:, 2]) < 1e-6
    radial = torch.as_tensor(verts[:, :2] - 20.0)
    push = (v.grad[0, :, :2] * radial).sum(-1)[rim]
    assert (push > 0).float().mean() > 0.9  # descending the loss shrinks the rim


# --------------------------------------------------------------------------------------
# batches, conveniences, devices
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_batch_equals_single_renders(device):
    va, faces = uv_sphere(14, (20, 16), 10, 16)
    vb = va.copy()
    vb[:, :2] = (va[:, :2] - [20, 16]) * [1.3, 0.8] + [26, 18]
    f = torch.as_tensor(faces, device=device)
    colors = torch.rand(2, len(va), 3, dtype=torch.float64, device=device)
    both = render_mesh(tensor(np.stack([va, vb]), device), f, colors, 36, 44)
    for i, v in enumerate([va, vb]):
        one = render_mesh(tensor(v, device)[None], f, colors[i : i + 1], 36, 44)
        assert torch.equal(both["pix_to_face"][i], one["pix_to_face"][0])
        for key in ("image", "alpha", "depth"):
            assert torch.allclose(both[key][i], one[key][0])


def test_render_mesh_outputs_and_compositing():
    verts, faces = uv_sphere(10, (16, 16), 10, 16)
    v = tensor(verts, dtype=torch.float32)[None].requires_grad_()
    f = torch.as_tensor(faces)
    colors = torch.full((1, len(verts), 3), 0.25, requires_grad=True)
    bg = torch.rand(1, 3, 32, 32)
    out = render_mesh(v, f, colors, 32, 32, background=bg)
    assert out["image"].shape == (1, 3, 32, 32) and out["alpha"].shape == (1, 1, 32, 32)
    assert out["depth"].shape == (1, 1, 32, 32) and out["pix_to_face"].shape == (1, 32, 32)
    a = out["alpha"][0, 0].detach()
    img = out["image"][0].detach()
    assert torch.allclose(img[:, a == 0], bg[0][:, a == 0])
    assert torch.allclose(img[:, a == 1], torch.full_like(img[:, a == 1], 0.25))
    # band pixels mix the mesh colour and the background
    band = (a > 0) & (a < 1)
    assert band.sum() > 20
    assert torch.allclose(img[:, band], 0.25 * a[band] + bg[0][:, band] * (1 - a[band]))
    assert (out["depth"][0, 0][out["pix_to_face"][0] < 0] == 0).all()
    (out["image"].sum() + out["alpha"].sum()).backward()
    assert torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0
    assert colors.grad.abs().sum() > 0
    no_bg = render_mesh(v, f, colors, 32, 32)["image"][0].detach()
    assert (no_bg[:, a == 0] == 0).all()


def test_render_mesh_broadcasts_one_background_over_the_batch():
    verts, faces = uv_sphere(8, (12, 12), 8, 12)
    v = tensor(np.stack([verts, verts + [3, 0, 0]]), dtype=torch.float32)
    bg = torch.rand(1, 3, 24, 24)
    out = render_mesh(v, torch.as_tensor(faces), torch.ones(2, len(verts), 3), 24, 24, bg)
    for i in range(2):
        empty = out["alpha"][i, 0] == 0
        assert torch.equal(out["image"][i][:, empty], bg[0][:, empty])


def test_vertex_visibility_of_overlapping_triangles():
    v = tensor([[2, 2, 5.0], [30, 2, 5.0], [2, 30, 5.0], [1, 1, 1.0], [31, 1, 1.0],
                [1, 31, 1.0], [40, 40, 1.0]])
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    vis = vertex_visibility(v[None], faces, rasterize(v[None], faces, 32, 32))
    assert vis.tolist() == [[False, False, False, True, True, True, False]]


@cuda_only
def test_cuda_matches_cpu():
    verts, faces = uv_sphere(30, (40.2, 35.7), 24, 48)
    colors = torch.rand(1, len(verts), 3)
    outs = []
    for device in ("cpu", "cuda"):
        v = tensor(verts, device, torch.float32)[None].requires_grad_()
        out = render_mesh(v, torch.as_tensor(faces, device=device), colors.to(device), 80, 80)
        (out["image"].sum() + out["alpha"].sum()).backward()
        outs.append((out, v.grad))
    (cpu, gcpu), (gpu, ggpu) = outs
    assert torch.equal(cpu["pix_to_face"], gpu["pix_to_face"].cpu())
    assert torch.allclose(cpu["image"], gpu["image"].cpu(), atol=1e-5)
    assert torch.allclose(gcpu, ggpu.cpu(), atol=1e-4)


def test_cull_back_keeps_the_picture_of_a_closed_surface():
    # uv_sphere is built in screen space (y down), where its triangles run clockwise seen from
    # outside; reversed, they run counter-clockwise as a projected FLAME mesh does. Culled, the far
    # half is skipped but every pixel shows the same triangle as before
    verts, faces = uv_sphere(50.0, (64.2, 63.7), 24, 48)
    faces = faces[:, [0, 2, 1]]
    v = tensor(verts, dtype=torch.float32)[None]
    f = torch.as_tensor(faces)
    full = rasterize(v, f, 128, 128)
    culled = rasterize(v, f, 128, 128, cull_back=True)
    assert torch.equal(full.pix_to_face, culled.pix_to_face)
    assert (full.pix_to_face >= 0).sum() > 7000
    # wound the other way round, the near half faces away: culled, the inside of the far half shows
    inside_out = rasterize(v, f[:, [0, 2, 1]], 128, 128, cull_back=True).pix_to_face
    assert torch.equal(inside_out >= 0, full.pix_to_face >= 0)
    seen = inside_out[inside_out >= 0]
    assert (v[0, f[seen], 2].mean(dim=1) > 0).all()  # depth > 0: the far half only


def test_cull_back_shows_the_background_through_a_hole():
    verts, faces = uv_sphere(50.0, (64.0, 64.0), 24, 48)
    faces = faces[:, [0, 2, 1]]  # counter-clockwise on screen seen from outside (see above)
    v = tensor(verts, dtype=torch.float32)[None]
    near_pole = 0  # depth -50: the vertex nearest to the viewer
    keep = ~np.isin(faces, np.nonzero(verts[:, 2] < -40)[0]).any(1)  # a hole around the near pole
    assert not keep[(faces == near_pole).any(1)].any()
    f = torch.as_tensor(faces[keep])
    full = rasterize(v, f, 128, 128)
    culled = rasterize(v, f, 128, 128, cull_back=True)
    centre_full, centre_culled = full.pix_to_face[0, 64, 64], culled.pix_to_face[0, 64, 64]
    assert centre_full >= 0 and verts[faces[keep][centre_full], 2].min() > 40  # the inside of the far half
    assert centre_culled == -1  # culled: the hole is empty
    ring = (full.pix_to_face[0] >= 0) & (culled.pix_to_face[0] >= 0)
    assert torch.equal(full.pix_to_face[0][ring], culled.pix_to_face[0][ring])  # around it, unchanged
