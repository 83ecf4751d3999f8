"""The decimated mesh that the stages moving the head render (priors.mesh.decimate,
fitter.synth.RenderMesh, recipe key render_faces): vertices kept where they are and evaluated
exactly, borders and UV seams kept, renders close to the full mesh's."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fitter import albedo as alb
from fitter.params import FitParams
from fitter.synth import RenderMesh, coarse_render_mesh, synthesize, visible_region
from priors.flame import FlameModel
from priors.mesh import decimate, mesh_edges, per_faces
from tests.synthetic import synthetic_assets


def bumpy_sheet(n: int = 31) -> tuple[np.ndarray, np.ndarray]:
    """A square sheet facing +z with a smooth bump and a square hole in the middle; counter-clockwise
    seen from +z."""
    xs = np.linspace(-1.0, 1.0, n)
    X, Y = np.meshgrid(xs, xs)
    verts = np.stack([X.ravel(), Y.ravel(), 0.3 * np.exp(-2 * (X ** 2 + Y ** 2)).ravel()], axis=1)
    faces = []
    for i in range(n - 1):
        for j in range(n - 1):
            if abs(xs[j] + xs[j + 1]) < 0.4 and abs(xs[i] + xs[i + 1]) < 0.4:
                continue  # the hole
            a, b, c, d = i * n + j, i * n + j + 1, (i + 1) * n + j, (i + 1) * n + j + 1
            faces += [(a, b, d), (a, d, c)]
    return verts, np.array(faces, np.int64)


def edge_counts(faces: np.ndarray) -> dict:
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    keys, counts = np.unique(e, axis=0, return_counts=True)
    return dict(zip(map(tuple, keys), counts, strict=True))


def border_edges(faces: np.ndarray) -> set:
    return {e for e, c in edge_counts(faces).items() if c == 1}


def normals_z(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    p = verts[faces]
    return np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])[:, 2]


def test_decimate_keeps_the_vertices_the_borders_and_the_facing():
    verts, faces = bumpy_sheet()
    target = len(faces) // 3
    coarse, uv = decimate(verts, faces, target)
    assert uv is None
    assert 0.8 * target <= len(coarse) <= target + 2
    assert border_edges(coarse) == border_edges(faces)  # the outer rim and the hole, edge for edge
    up = normals_z(verts, coarse)
    assert (up > -1e-12).all()  # no triangle faces down (a few along the straight rim stand on edge, area ~0)
    assert np.abs(normals_z(verts, coarse)).sum() == pytest.approx(np.abs(normals_z(verts, faces)).sum(), rel=0.02)
    same, none = decimate(verts, faces, len(faces))
    assert none is None and np.array_equal(same, faces)


def test_decimate_keeps_uv_seams():
    verts, faces = bumpy_sheet()
    right = verts[faces].mean(1)[:, 0] > 0  # two UV islands: a seam down the middle column
    uv_faces = faces + np.where(right, len(verts), 0)[:, None]
    coarse, uv = decimate(verts, faces, len(faces) // 3, uv_faces)
    island = uv >= len(verts)
    assert (island.all(1) | (~island).all(1)).all()  # no triangle straddles the seam
    assert np.array_equal(uv - np.where(island, len(verts), 0), coarse)  # each corner keeps its own UV
    on_left, on_right = faces[~right], faces[right]
    seam = set(edge_counts(on_left)) & set(edge_counts(on_right))
    assert len(seam) == 24 and seam <= set(edge_counts(coarse))  # the seam's edges (30 less the hole's 6) survive
    assert (normals_z(verts, coarse) > -1e-12).all()


@pytest.fixture(scope="module")
def model():
    return FlameModel(synthetic_assets())


def posed_params(model, seed: int = 0) -> FitParams:
    g = torch.Generator().manual_seed(seed)
    p = FitParams.initial(1, model.n_shape, model.n_exp, model.n_verts)
    p.shape = torch.randn(p.shape.shape, generator=g)
    p.exp = torch.randn(p.exp.shape, generator=g)
    p.global_pose = torch.tensor([[0.1, 0.5, -0.05]])
    p.neck_pose = torch.tensor([[0.2, -0.1, 0.05]])
    p.jaw_pose = torch.tensor([[0.25, 0.0, 0.0]])
    p.cam[:, 0] = 7.0
    p.light = p.light + 0.2 * torch.rand(p.light.shape, generator=g)
    p.albedo = torch.rand(p.albedo.shape, generator=g)
    return p


def test_a_vertex_subset_evaluates_exactly_those_vertices(model):
    assert model.has_correctives  # the correctives' rows are taken with the vertices
    p = posed_params(model)
    ids = torch.as_tensor(np.random.default_rng(1).choice(model.n_verts, 300, replace=False))
    args = (p.shape, p.exp, p.global_pose, p.neck_pose, p.jaw_pose, p.eye_pose)
    full, part = model(*args), model(*args, subset=model.vertex_subset(ids))
    assert part.vertices.shape == (1, 300, 3)
    torch.testing.assert_close(part.vertices, full.vertices[:, ids], atol=1e-6, rtol=0)
    torch.testing.assert_close(part.landmarks3d, full.landmarks3d, atol=0, rtol=0)


def test_a_render_mesh_of_every_vertex_renders_as_the_model(model):
    p = posed_params(model)
    every = RenderMesh(model.vertex_subset(torch.arange(model.n_verts)), model.faces, model.faces)
    a, b = synthesize(model, p, 64), synthesize(model, p, 64, mesh=every)
    assert (a["alpha"] > 0).sum() > 1000
    torch.testing.assert_close(b["image"], a["image"], atol=1e-6, rtol=0)


def test_the_decimated_mesh_renders_close_and_only_its_vertices_get_colour_gradients(model):
    n_faces = model.faces.shape[0]
    assert coarse_render_mesh(model, n_faces) is None  # nothing to decimate
    mesh = coarse_render_mesh(model, n_faces // 2)
    assert mesh.faces.shape[0] <= n_faces // 2 + 2 and mesh.faces.max() < len(mesh.subset.ids)
    p = posed_params(model)
    p.albedo = (0.5 + 2 * model.v_template).clamp(0, 1)[None].clone().requires_grad_(True)  # smooth colours
    full = synthesize(model, p, 64, cull_back=True)
    coarse = synthesize(model, p, 64, cull_back=True, mesh=mesh)
    assert coarse["vertices"].shape[1] == len(mesh.subset.ids) < model.n_verts
    inside = (full["alpha"] > 0.5).float()
    assert (full["alpha"] - coarse["alpha"]).abs().mean() < 0.01
    assert ((full["image"] - coarse["image"]).abs() * inside).sum() / (3 * inside.sum()) < 0.02
    coarse["image"].sum().backward()
    used = torch.zeros(model.n_verts, dtype=torch.bool)
    used[mesh.subset.ids] = True
    grad = p.albedo.grad[0].abs().sum(1)
    assert (grad[~used] == 0).all() and (grad[used] > 0).sum() > 100


def test_a_texture_space_keeps_its_uv_corners_on_the_decimated_mesh(model, tmp_path):
    from tests.test_albedo import sphere_uvs, write_flame_texture

    vt, ft = sphere_uvs(model)  # one UV per vertex: the UV index is the vertex index
    colour = (0.5, 0.6, 0.7)
    path = write_flame_texture(tmp_path / "FLAME_texture.npz", np.broadcast_to(colour, (8, 8, 3)).copy(),
                               np.zeros((8, 8, 3, 1)), vt, ft)
    tex, _ = alb.albedo_model_for(model, alb.load_albedo_space(path), require_flame=False)
    mesh = coarse_render_mesh(model, model.faces.shape[0] // 2, tex)
    assert torch.equal(mesh.albedo_model.ft, mesh.subset.ids[mesh.faces])
    p = posed_params(model)
    flat = synthesize(model, replace(p, albedo=torch.tensor(colour).expand(1, model.n_verts, 3)), 48, mesh=mesh)
    textured = synthesize(model, replace(p, albedo=tex.initial_albedo(1)), 48, albedo_model=tex, mesh=mesh)
    assert (flat["alpha"] > 0).sum() > 500
    torch.testing.assert_close(textured["image"], flat["image"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decimated", [False, True])
def test_the_visible_region_renders_the_same_pixels_inside_the_mask(model, decimated):
    """Only triangles that can show inside the mask's box (and face the camera, or nearly) are kept;
    inside the mask the render is the same as its mesh's whole render, shading at the region's edge
    included (the normals sum over the triangles around it)."""
    mesh = coarse_render_mesh(model, model.faces.shape[0] // 2) if decimated else None
    p = posed_params(model)
    p.albedo = (0.5 + 2 * model.v_template).clamp(0, 1)[None]
    mask = torch.zeros(1, 1, 64, 64)
    mask[:, :, 20:40, 24:44] = 1.0
    region = visible_region(model, p, 64, mask, mesh)
    whole = mesh.faces.shape[0] if decimated else model.faces.shape[0]
    assert 0 < region.faces.shape[0] < 0.5 * whole
    a = synthesize(model, p, 64, cull_back=True, mesh=mesh)
    b = synthesize(model, p, 64, cull_back=True, mesh=region)
    assert (a["alpha"] * mask).sum() > 300
    torch.testing.assert_close(b["image"] * mask, a["image"] * mask, atol=1e-6, rtol=0)
    torch.testing.assert_close(b["alpha"] * mask, a["alpha"] * mask, atol=1e-6, rtol=0)
    assert (b["alpha"] * (1 - mask)).sum() < 0.9 * (a["alpha"] * (1 - mask)).sum()  # less drawn outside
    everything = visible_region(model, p, 64, torch.ones(1, 1, 64, 64), mesh, min_facing=-1.1)
    assert everything.faces.shape[0] == whole  # a mask over the whole crop, any facing: every triangle


def test_the_fit_renders_the_decimated_mesh_only_in_stages_that_move_the_head(model):
    from fitter.fit import Targets, make_objective, make_setup
    from fitter.recipe import Stage, load_recipe

    n_faces = model.faces.shape[0]
    setup = make_setup(model, replace(load_recipe("default"), resolution=64, render_faces=n_faces // 2))
    assert setup.render_mesh is not None and setup.render_mesh.faces.shape[0] <= n_faces // 2 + 2
    truth = posed_params(model, seed=1)
    with torch.no_grad():
        pred = synthesize(model, truth, 64)
    targets = Targets(pred["image"], pred["landmarks2d"], torch.ones(1, 1, 64, 64), torch.ones(68))
    objective = make_objective(setup, targets)
    used = torch.zeros(model.n_verts, dtype=torch.bool)
    used[setup.render_mesh.subset.ids] = True
    for params_fitted, decimated in ((["shape", "albedo"], True), (["albedo"], False)):
        p = posed_params(model, seed=2)
        p.albedo.requires_grad_(True)
        objective(p, Stage("photo", 1, params_fitted, {"photo": 1.0}), torch.tensor([0]))[0].sum().backward()
        grad = p.albedo.grad[0].abs().sum(1)
        assert bool((grad[~used] == 0).all()) == decimated


def test_per_faces_memoises_by_content_and_keeps_32():
    store, calls = {}, []
    build = lambda faces: lambda: calls.append(1) or faces.sum().item()  # noqa: E731
    faces = torch.tensor([[0, 1, 2], [1, 3, 2]])
    assert per_faces(store, faces, build(faces)) == 9 and per_faces(store, faces, build(faces)) == 9
    assert len(calls) == 1
    faces[1, 1] = 0  # changed in place: same tensor, other content -> built again
    assert per_faces(store, faces, build(faces)) == 6 and len(calls) == 2
    assert per_faces(store, faces, build(faces), "other key") == 6 and len(calls) == 3
    kept = [torch.tensor([[k, k + 1, k + 2]]) for k in range(32)]
    for f in kept:
        per_faces(store, f, build(f))
    assert len(store) == 32 and len(calls) == 35
    per_faces(store, kept[-1], build(kept[-1]))  # still there
    per_faces(store, faces, build(faces))  # dropped as the oldest: built again
    assert len(calls) == 36


def test_mesh_edges_lists_each_undirected_edge_once():
    # a square cut into two triangles, wound opposite ways, plus a lone triangle on vertices 4..6
    faces = torch.tensor([[0, 1, 2], [0, 3, 2], [6, 5, 4]])
    expected = [[0, 1], [0, 2], [0, 3], [1, 2], [2, 3], [4, 5], [4, 6], [5, 6]]
    assert mesh_edges(faces).tolist() == expected
    # on a real mesh: against the set of sorted corner pairs, built independently in Python
    model = FlameModel(synthetic_assets())
    pairs = {tuple(sorted((a, b))) for f in model.faces.tolist() for a, b in ((f[0], f[1]), (f[1], f[2]), (f[2], f[0]))}
    assert mesh_edges(model.faces).tolist() == sorted(map(list, pairs))
