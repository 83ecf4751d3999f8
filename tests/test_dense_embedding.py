"""priors.dense_embedding: geometry helpers, derivation on a rendered head (known answer), the asset format,
install and doctor."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from priors import dense_embedding as DE
from priors.errors import AssetError
from tests.synthetic import synthetic_assets

needs_mediapipe = pytest.mark.skipif(importlib.util.find_spec("mediapipe") is None,
                                     reason="mediapipe is not installed")


# ----------------------------------------------------------------------------- geometry
def test_closest_points_match_a_brute_force_search():
    rng = np.random.default_rng(0)
    n = 300
    a, b, c = (rng.normal(size=(n, 3)) for _ in range(3))
    p = rng.normal(size=(n, 3)) * 1.5
    bary = DE.closest_points_on_triangles(p, a, b, c)
    assert (bary >= 0).all() and np.allclose(bary.sum(1), 1)
    q = bary[:, :1] * a + bary[:, 1:2] * b + bary[:, 2:] * c
    d = np.linalg.norm(q - p, axis=1)
    # brute force: a fine barycentric grid over each triangle
    k = 120
    i, j = np.mgrid[0:k + 1, 0:k + 1]
    keep = i + j <= k
    u, v = i[keep] / k, j[keep] / k
    grid = (1 - u - v)[None, :, None] * a[:, None] + u[None, :, None] * b[:, None] + v[None, :, None] * c[:, None]
    brute = np.linalg.norm(grid - p[:, None], axis=2).min(1)
    assert (d <= brute + 1e-9).all()  # never worse than any grid point
    assert np.abs(d - brute).max() < 0.02  # and the grid's spacing is ~0.02


def test_closest_point_of_a_point_above_the_triangle_is_its_foot():
    a, b, c = np.array([[0.0, 0, 0]]), np.array([[1.0, 0, 0]]), np.array([[0.0, 1, 0]])

    def closest(p):
        return DE.closest_points_on_triangles(np.array([p], float), a, b, c)[0]

    assert closest([0.2, 0.3, 5.0]) == pytest.approx([0.5, 0.2, 0.3])  # inside: the foot
    assert closest([2.0, 2.0, 1.0]) == pytest.approx([0.0, 0.5, 0.5])  # beyond edge bc: its middle
    assert closest([-1.0, -3.0, 0.0]) == pytest.approx([1.0, 0.0, 0.0])  # vertex a


def test_unproject_by_hand():
    from fitter.render import rasterize

    screen = np.array([[2.0, 2.0, 1.0], [30.0, 4.0, 1.0], [6.0, 28.0, 1.0]])
    faces = np.array([[0, 1, 2]])
    p2f = rasterize(torch.as_tensor(screen, dtype=torch.float32)[None], torch.as_tensor(faces), 32, 32).pix_to_face
    pts = np.array([[10.3, 9.7], [31.0, 31.0], [-3.0, 5.0]])
    face, bary = DE.unproject(pts, screen, faces, p2f[0].numpy())
    assert face.tolist() == [0, -1, -1]
    # hand solution of p = a + v (b - a) + w (c - a)
    A = np.array([[28.0, 4.0], [2.0, 26.0]])
    v, w = np.linalg.solve(A, pts[0] - screen[0, :2])
    assert bary[0] == pytest.approx([1 - v - w, v, w])


def test_dense_landmarks_are_barycentric_surface_points():
    rng = np.random.default_rng(2)
    verts = torch.as_tensor(rng.normal(size=(2, 40, 3)), dtype=torch.float32)
    faces = torch.as_tensor(rng.integers(0, 40, (70, 3)))
    b = rng.dirichlet(np.ones(3), DE.N_POINTS).astype(np.float32)
    emb = DE.DenseEmbedding(rng.integers(0, 70, DE.N_POINTS), b, np.ones(DE.N_POINTS, bool),
                            np.ones(DE.N_POINTS, np.float32), "", 70)
    out = DE.dense_landmarks(verts, faces, emb)
    assert out.shape == (2, DE.N_POINTS, 3)
    k = 123
    tri = faces[emb.faces[k]]
    expected = (verts[1, tri] * torch.as_tensor(b[k])[:, None]).sum(0)
    assert torch.allclose(out[1, k], expected, atol=1e-6)


# ----------------------------------------------------------------------------- derivation, known answer
def _known_points(model, rng, frontal: DE.View) -> tuple[np.ndarray, np.ndarray]:
    """478 (face, bary) on the stand-in: 468 on the front of the face (seen in the frontal render, facing +z,
    not eyeball, inside the 68 landmarks' box), 10 on the front of the eyeballs (within 6 mm of the eye
    axis)."""
    template, faces = DE.model_mesh(model)
    eyes = DE.eyeball_vertices(model.weights.numpy())
    n = np.cross(template[faces[:, 1]] - template[faces[:, 0]], template[faces[:, 2]] - template[faces[:, 0]])
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    centre = template[faces].mean(1)
    lmk = model.full_faces.numpy()
    lmk_pts = template[faces[lmk]].mean(1)
    lo, hi = lmk_pts.min(0), lmk_pts.max(0)
    eye_face = eyes[faces].all(1)
    seen = np.zeros(len(faces), bool)
    seen[np.unique(frontal.pix_to_face[frontal.pix_to_face >= 0])] = True
    face_ok = (seen & ~eye_face & (n[:, 2] > 0.6) & (centre[:, 0] > lo[0] + 0.01) & (centre[:, 0] < hi[0] - 0.01)
               & (centre[:, 1] > lo[1]) & (centre[:, 1] < hi[1]))
    J = (model.J_regressor @ model.v_template).numpy()
    lateral = np.minimum(np.linalg.norm(centre[:, :2] - J[3, :2], axis=1), np.linalg.norm(centre[:, :2] - J[4, :2],
                                                                                          axis=1))
    iris_ok = eye_face & (n[:, 2] > 0.8) & (lateral < 0.006)
    f = np.concatenate([rng.choice(np.nonzero(face_ok)[0], DE.N_MESH, replace=False),
                        rng.choice(np.nonzero(iris_ok)[0], 10, replace=False)])
    return f, rng.dirichlet(np.ones(3) * 3, DE.N_POINTS)


def test_derivation_recovers_known_surface_points(standin_model):
    """The detector is replaced by the exact projections of known surface points (+ 0.2 px noise), hidden
    ones included, as MediaPipe also reports points it cannot see. The solver must find them again."""
    model = standin_model
    rng = np.random.default_rng(5)
    template, faces = DE.model_mesh(model)
    views = ((0.0, 0.0), (-15.0, 0.0), (15.0, 0.0), (-30.0, 0.0), (30.0, 0.0), (0.0, -15.0), (0.0, 15.0))
    rendered = DE.render_views(model, views, res=384)
    known_f, known_b = _known_points(model, rng, rendered[0])

    def fake(image, view):
        assert image.shape == (384, 384, 3)
        return DE.surface_points(view.screen, faces, known_f, known_b)[:, :2] + rng.normal(0, 0.2, (DE.N_POINTS, 2))

    emb = DE.derive_dense_embedding(model, detector=fake, rendered=rendered)
    assert emb.valid.all() and emb.mesh_hash == DE.model_mesh_hash(model) and emb.n_faces == len(faces)
    got = DE.surface_points(template.astype(np.float64), faces, emb.faces, emb.bary)
    want = DE.surface_points(template.astype(np.float64), faces, known_f, known_b)
    err_mm = np.linalg.norm(got - want, axis=1) * 1000
    assert np.median(err_mm) < 0.3 and err_mm.max() < 1.0  # measured 0.10 and 0.35 mm
    assert err_mm[DE.N_MESH:].max() < 1.0  # the iris points, on the eyeballs
    eye_face = DE.eyeball_vertices(model.weights.numpy())[faces].all(1)
    assert eye_face[emb.faces[DE.N_MESH:]].all() and not eye_face[emb.faces[:DE.N_MESH]].any()
    assert emb.confidence.min() > 0.5  # consistent hits: spread well under 3 mm


def test_iris_is_invalid_on_a_model_without_eyeballs():
    template = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], float)
    faces = np.array([[0, 1, 2], [1, 3, 2]])
    screen = np.column_stack([template[:, :2] * 100, np.ones(4)])
    from fitter.render import rasterize

    p2f = rasterize(torch.as_tensor(screen, dtype=torch.float32)[None], torch.as_tensor(faces), 100, 100)
    p2f = p2f.pix_to_face[0].numpy()
    normals = np.tile([0.0, 0.0, -1.0], (4, 1))
    views = [DE.View(np.zeros((100, 100, 3), np.uint8), screen, p2f, normals, 0.0, 0.0) for _ in range(3)]
    det = np.random.default_rng(0).uniform(5, 95, (DE.N_POINTS, 2))
    emb, _ = DE.solve_dense_embedding(template, faces, np.zeros(4, bool), views, [det] * 3)
    assert emb.valid[:DE.N_MESH].all() and not emb.valid[DE.N_MESH:].any()
    assert (emb.confidence[DE.N_MESH:] == 0).all() and (DE.dense_weights(emb)[DE.N_MESH:] == 0).all()
    got = DE.surface_points(screen, faces, emb.faces, emb.bary)[:DE.N_MESH, :2]
    assert np.abs(got - det[:DE.N_MESH]).max() < 1e-4  # a flat mesh: each point is its own hit (float32 bary)


@needs_mediapipe
def test_mediapipe_finds_478_points_on_a_render(standin_model):
    view = DE.render_views(standin_model, ((0.0, 0.0),), res=384)[0]
    pts = DE.mediapipe_detector(view.image, view)
    assert pts is not None and pts.shape == (478, 2)
    inside = view.pix_to_face >= 0
    rows, cols = np.nonzero(inside)
    assert (pts[:, 0] > cols.min()).all() and (pts[:, 0] < cols.max() + 1).all()
    assert (pts[:, 1] > rows.min()).all() and (pts[:, 1] < rows.max() + 1).all()


@needs_mediapipe
def test_dense_embedding_for_derives_once_and_follows_mediapipe_topology(standin_model, tmp_path, monkeypatch):
    """The real derivation on the stand-in (15 renders): cached on first use, loaded after; the points land
    where MediaPipe's topology puts them."""
    model = standin_model
    monkeypatch.setattr(DE, "BUNDLED", tmp_path / "nothing-shipped")  # derive, not the shipped file
    emb = DE.dense_embedding_for(model, home=tmp_path)
    path = DE.embedding_path(DE.model_mesh_hash(model), tmp_path)
    assert path.is_file()
    again = DE.dense_embedding_for(model, home=tmp_path, derive=False)
    assert np.array_equal(again.faces, emb.faces) and np.allclose(again.bary, emb.bary)
    template, faces = DE.model_mesh(model)
    p = DE.surface_points(template.astype(np.float64), faces, emb.faces, emb.bary)
    assert emb.valid.sum() >= 470
    # subject's right eye (33, 133) at -x, left (263, 362) at +x (FLAME: +x = subject's left); nose tip 1 the
    # most forward of the mesh points; chin 152 the lowest of the face oval; forehead 10 the highest
    assert p[33, 0] < p[133, 0] < 0 < p[362, 0] < p[263, 0]
    assert np.argmax(p[:468, 2]) in (1, 4, 5, 19, 94, 195)
    oval = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148,
            176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109]
    assert oval[np.argmin(p[oval, 1])] == 152 and oval[np.argmax(p[oval, 1])] in (10, 338, 109)
    # the 68-point embedding's eye corners (36, 45) and mouth corners (48, 54) are near MediaPipe's 33, 263, 61, 291
    lmk = DE.surface_points(template.astype(np.float64), faces, model.full_faces.numpy(), model.full_bary.numpy())
    # (MediaPipe's chin 152 sits further under the chin than iBUG's 8: 7 mm on the stand-in)
    for ibug, mp, tol in ((36, 33, 6), (45, 263, 6), (48, 61, 6), (54, 291, 6), (30, 4, 6), (8, 152, 10)):
        assert np.linalg.norm(lmk[ibug] - p[mp]) < tol / 1000, (ibug, mp)
    # irises on the eyeballs, centre (468 / 473) within 3 mm of the eye's axis
    J = (model.J_regressor @ model.v_template).numpy()
    for centre in (468, 473):
        assert min(np.linalg.norm(p[centre, :2] - J[3, :2]), np.linalg.norm(p[centre, :2] - J[4, :2])) < 0.003


# ----------------------------------------------------------------------------- file format
@pytest.fixture(scope="module")
def synth():
    return synthetic_assets()


def _embedding_for(assets, seed=0) -> DE.DenseEmbedding:
    rng = np.random.default_rng(seed)
    n_faces = len(assets.faces)
    return DE.DenseEmbedding(rng.integers(0, n_faces, DE.N_POINTS), rng.dirichlet(np.ones(3), DE.N_POINTS)
                             .astype(np.float32), rng.uniform(size=DE.N_POINTS) > 0.1,
                             rng.uniform(size=DE.N_POINTS).astype(np.float32), DE.model_mesh_hash(assets), n_faces)


def test_round_trip(tmp_path, synth):
    emb = _embedding_for(synth)
    path = DE.save_dense_embedding(tmp_path / "e.npz", emb)
    back = DE.load_dense_embedding(path, synth)
    for field in ("faces", "bary", "valid", "confidence"):
        assert np.array_equal(getattr(back, field), getattr(emb, field))
    assert back.mesh_hash == emb.mesh_hash and back.n_faces == emb.n_faces
    assert back.faces.dtype == np.int64 and back.bary.dtype == np.float32 and back.valid.dtype == bool


def test_mesh_hash_depends_on_the_mesh(synth):
    v, f = DE.model_mesh(synth)
    h = DE.mesh_hash(v, f)
    assert len(h) == 16 and h == DE.mesh_hash(v.astype(np.float64), f.astype(np.int32))
    v2 = v.copy()
    v2[0, 0] += 1e-3
    assert DE.mesh_hash(v2, f) != h and DE.mesh_hash(v, f[::-1]) != h


def _bad(tmp_path, emb, **override):
    arrays = {**emb.arrays(), **override}
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case,match", [
    ("truncated", "not a readable .npz"),
    ("not_npz", "not a readable .npz"),
    ("no_faces", "key 'dense_faces' is missing"),
    ("shape", "key 'dense_bary' has shape"),
    ("bary_sum", "not summing to 1"),
    ("nan", "NaN"),
    ("range", "holds index"),
    ("float_faces", "expected integers"),
    ("confidence", "outside \\[0, 1\\]"),
])
def test_corrupt_files_are_refused_in_one_line(tmp_path, synth, case, match):
    emb = _embedding_for(synth)
    good = DE.save_dense_embedding(tmp_path / "good.npz", emb)
    if case == "truncated":
        path = tmp_path / "t.npz"
        path.write_bytes(good.read_bytes()[:300])
    elif case == "not_npz":
        path = tmp_path / "x.npz"
        path.write_text("hello")
    elif case == "no_faces":
        arrays = emb.arrays()
        del arrays["dense_faces"]
        path = tmp_path / "nf.npz"
        np.savez(path, **arrays)
    elif case == "shape":
        path = _bad(tmp_path, emb, dense_bary=emb.bary[:400])
    elif case == "bary_sum":
        path = _bad(tmp_path, emb, dense_bary=emb.bary * 2)
    elif case == "nan":
        b = emb.bary.copy()
        b[3, 0] = np.nan
        path = _bad(tmp_path, emb, dense_bary=b)
    elif case == "range":
        f = emb.faces.copy()
        f[7] = emb.n_faces + 5
        path = _bad(tmp_path, emb, dense_faces=f)
    elif case == "float_faces":
        path = _bad(tmp_path, emb, dense_faces=emb.faces.astype(np.float32) + 0.5)
    else:
        path = _bad(tmp_path, emb, dense_confidence=emb.confidence + 2)
    with pytest.raises(AssetError, match=match) as info:
        DE.load_dense_embedding(path, synth)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "fix:" in msg


def test_mismatched_model_is_refused(tmp_path, synth, standin_model):
    path = DE.save_dense_embedding(tmp_path / "e.npz", _embedding_for(synth))
    with pytest.raises(AssetError, match="made for a mesh with") as info:
        DE.load_dense_embedding(path, standin_model)  # other face count
    assert "\n" not in str(info.value)
    other = _embedding_for(synth)
    other.mesh_hash = "0123456789abcdef"  # same face count, another template
    path2 = DE.save_dense_embedding(tmp_path / "o.npz", other)
    with pytest.raises(AssetError, match="made for mesh 0123456789abcdef, the model's mesh is"):
        DE.load_dense_embedding(path2, synth)


def test_tracker_layout_is_accepted(tmp_path, synth):
    """The 105-point mediapipe_landmark_embedding.npz layout: listed points valid, the others not."""
    rng = np.random.default_rng(3)
    idx = np.sort(rng.choice(468, 105, replace=False))
    fi = rng.integers(0, len(synth.faces), 105)
    bc = rng.dirichlet(np.ones(3), 105)
    path = tmp_path / "mediapipe_landmark_embedding.npz"
    np.savez(path, lmk_face_idx=fi, lmk_b_coords=bc, landmark_indices=idx)
    emb = DE.load_dense_embedding(path, synth)
    assert emb.valid.sum() == 105 and emb.valid[idx].all()
    assert np.array_equal(emb.faces[idx], fi) and np.allclose(emb.bary[idx], bc)
    assert (DE.dense_weights(emb)[~emb.valid] == 0).all()


def test_dense_embedding_for_uses_the_cache_and_says_when_missing(tmp_path, synth):
    with pytest.raises(AssetError, match="no MediaPipe embedding for this model yet") as info:
        DE.dense_embedding_for(synth, home=tmp_path, derive=False)
    assert "\n" not in str(info.value)
    emb = _embedding_for(synth)
    DE.save_dense_embedding(DE.embedding_path(emb.mesh_hash, tmp_path), emb)
    got = DE.dense_embedding_for(synth, home=tmp_path)  # no derivation: the cached file
    assert np.array_equal(got.faces, emb.faces)


# ----------------------------------------------------------------------------- install and doctor
def test_assets_install_and_doctor(tmp_path, monkeypatch, synthetic_model_dir):
    from click.testing import CliRunner

    import cli
    from priors.assets import load_model
    from priors.doctor import doctor_items

    home = tmp_path / "home"
    monkeypatch.setenv("FLAMEFIT_HOME", str(home))
    monkeypatch.setenv("FLAMEFIT_MODEL", str(synthetic_model_dir))
    assets = load_model(synthetic_model_dir, require_landmarks=False)
    item = next(i for i in doctor_items() if i.name == "MediaPipe embedding")
    assert not item.ok and "assets install" in item.fix and not item.required

    src = DE.save_dense_embedding(tmp_path / "mine.npz", _embedding_for(assets))
    result = CliRunner().invoke(cli.main, ["assets", "install", str(src)])
    assert result.exit_code == 0, result.output
    dest = DE.embedding_path(DE.model_mesh_hash(assets), home)
    assert dest.is_file() and "dense-embedding" in result.output
    assert np.array_equal(DE.load_dense_embedding(dest, assets).faces, _embedding_for(assets).faces)
    item = next(i for i in doctor_items() if i.name == "MediaPipe embedding")
    assert item.ok and str(dest) in item.detail

    bad = _embedding_for(assets)
    bad.mesh_hash = "ffffffffffffffff"
    src2 = DE.save_dense_embedding(tmp_path / "other.npz", bad)
    result = CliRunner().invoke(cli.main, ["assets", "install", str(src2)])
    assert result.exit_code == 3 and "made for mesh ffffffffffffffff" in result.output
    assert len(result.output.strip().splitlines()) == 1



def test_a_head_the_detector_never_finds_gets_a_clear_error(synth):
    from priors.flame import FlameModel

    model = FlameModel(synth)
    views = DE.render_views(model, ((0.0, 0.0), (15.0, 0.0)), res=128)
    assert views[0].image.shape == (128, 128, 3) and (views[0].pix_to_face >= 0).any()
    with pytest.raises(AssetError, match="fewer than 2 of its renders") as info:
        DE.derive_dense_embedding(model, detector=lambda image, view: None, rendered=views)
    assert "\n" not in str(info.value) and "assets install" in str(info.value)


def test_the_shipped_stand_in_embedding_is_what_derivation_gives(standin_model):
    """priors/data holds the stand-in's embedding (so a first fit does not spend ~15 s deriving it);
    it must load for the stand-in's mesh and agree with the MediaPipe layout like a derived one."""
    path = DE.find_dense_embedding(standin_model, home=Path("/nonexistent"))
    assert path is not None and path.parent == DE.BUNDLED
    emb = DE.load_dense_embedding(path, standin_model)
    template, faces = DE.model_mesh(standin_model)
    p = DE.surface_points(template.astype(np.float64), faces, emb.faces, emb.bary)
    assert emb.valid.sum() >= 470 and p[33, 0] < p[133, 0] < 0 < p[362, 0] < p[263, 0]


def test_composed_landmarks_recover_known_surface_points(synth):
    """A detector's landmarks defined as means of MediaPipe points (fitter.detect.MEDIAPIPE_TO_IBUG68's form),
    composed on the synthetic head: a single point is that surface point; the mean of a triangle edge's two
    end points is the edge's midpoint, itself on the surface, so it must come back exactly; an invalid point
    is refused in one line."""
    template, faces = DE.model_mesh(synth)
    template = template.astype(np.float64)
    eye_face = DE.eyeball_vertices(synth.weights)[faces].all(1)
    skin = np.nonzero(~eye_face)[0]
    rng = np.random.default_rng(4)
    tri = faces[rng.choice(skin, 3, replace=False)]  # three skin triangles: corners as MediaPipe points 0..8
    vert = tri.ravel()
    emb = DE.DenseEmbedding(np.zeros(DE.N_POINTS, np.int64), np.tile(np.float32([1, 0, 0]), (DE.N_POINTS, 1)),
                            np.zeros(DE.N_POINTS, bool), np.zeros(DE.N_POINTS, np.float32), "", len(faces))
    for j, v in enumerate(vert):  # point j sits on vertex v: any triangle holding v, one-hot barycentrics
        f = int(np.nonzero((faces == v).any(1) & ~eye_face)[0][0])
        emb.faces[j] = f
        emb.bary[j] = (faces[f] == v).astype(np.float32)
        emb.valid[j] = True
    groups = [(0,), (4,), (0, 1), (3, 5), (6, 7, 8)]
    face, bary = DE.composed_landmarks(emb, groups, template, faces, ~eye_face)
    got = DE.surface_points(template, faces, face, bary)
    want = np.array([template[vert[0]], template[vert[4]], template[vert[[0, 1]]].mean(0),
                     template[vert[[3, 5]]].mean(0)])
    assert np.abs(got[:4] - want).max() < 1e-7  # singles and edge midpoints (float32 barycentrics: 0.1 um)
    centroid = template[vert[6:9]].mean(0)  # the triangle's centroid: on the surface too
    assert np.abs(got[4] - centroid).max() < 1e-7
    assert face.dtype == np.int64 and bary.dtype == np.float32 and not eye_face[face].any()
    with pytest.raises(AssetError, match=r"point\(s\) \[9\] have no place") as exc:
        DE.composed_landmarks(emb, [(0,), (8, 9)], template, faces)
    assert "\n" not in str(exc.value)


def _views(template: np.ndarray, angles) -> tuple[np.ndarray, np.ndarray]:
    """The template turned by (yaw, pitch) radians, 0.6 m in front of an OpenCV camera (x right, y down,
    z forward; the model's y up and z towards the viewer) -> (posed K x V x 3, intrinsics K x 3 x 3)."""
    posed = []
    for yaw, pitch in angles:
        cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
        rot = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        p = template @ rot.T
        posed.append(np.stack([p[:, 0], -p[:, 1], 0.6 - p[:, 2]], 1))
    K = np.array([[1000.0, 0, 256], [0, 1000.0, 256], [0, 0, 1]])
    return np.stack(posed), np.tile(K, (len(angles), 1, 1))


def _project(points: np.ndarray, K: np.ndarray) -> np.ndarray:
    return points[..., :2] / points[..., 2:] * K[0, 0] + K[0, 2]


def test_refit_embedding_moves_points_to_where_the_views_see_them(synth):
    """Views of a known head whose detections sit at other surface points than the embedding's (the same
    place in every view, as a detector's bias on one person): each point moves to the detected place when
    that place is a candidate (within the radius, a grid barycentric); a point detected where it is, or
    weighed 0 in every view, stays; a strong prior keeps every point; no point goes beyond the radius;
    none goes to a triangle of another label."""
    template, faces = DE.model_mesh(synth)
    template = template.astype(np.float64)
    eye_face = DE.eyeball_vertices(synth.weights)[faces].all(1)
    centroid = template[faces].mean(1)
    front = np.nonzero(~eye_face & (centroid[:, 2] > 0.08) & (np.abs(centroid[:, 0]) < 0.04))[0]
    rng = np.random.default_rng(1)
    own = rng.choice(front, 4, replace=False)
    face, bary = own.copy(), np.full((4, 3), 1 / 3)
    # targets: a neighbouring triangle's grid point (0.5, 0.5, 0), an edge's middle; point 2 detected where it is
    target_f = np.array([int(np.nonzero((faces == faces[f][0]).any(1) & (np.arange(len(faces)) != f))[0][0])
                         for f in own])
    target_b = np.tile([0.5, 0.5, 0.0], (4, 1))
    target_f[2], target_b[2] = face[2], bary[2]
    posed, K = _views(template, [(0.0, 0.0), (0.35, 0.0), (-0.35, 0.1), (0.15, -0.2)])
    where = np.stack([DE.surface_points(p, faces, target_f, target_b) for p in posed])
    det = _project(where, K[0])
    weights = np.ones((4, 4))
    weights[:, 3] = 0.0  # point 3: nothing seen
    kwargs = dict(radius=0.03, sigma_move=1.0)
    got_f, got_b = DE.refit_embedding(face, bary, template, faces, posed, K, det, weights, **kwargs)
    got = DE.surface_points(template, faces, got_f, got_b)
    want = DE.surface_points(template, faces, target_f, target_b)
    start = DE.surface_points(template, faces, face, bary)
    assert np.linalg.norm(want[:2] - start[:2], axis=1).min() > 0.004  # the targets are real moves
    np.testing.assert_allclose(got[:3], want[:3], atol=1e-6)
    np.testing.assert_allclose(got[3], start[3], atol=1e-9)
    assert got_b.dtype == np.float32 and np.allclose(got_b.sum(1), 1, atol=1e-6) and (got_b >= 0).all()
    # a prior far stronger than the views: nothing moves
    kept_f, kept_b = DE.refit_embedding(face, bary, template, faces, posed, K, det, weights, radius=0.03,
                                        sigma_move=1e-6)
    np.testing.assert_allclose(DE.surface_points(template, faces, kept_f, kept_b), start, atol=1e-9)
    # a radius smaller than the moves: each point stays within it
    near_f, near_b = DE.refit_embedding(face, bary, template, faces, posed, K, det, weights, radius=0.002,
                                        sigma_move=1.0)
    moved = np.linalg.norm(DE.surface_points(template, faces, near_f, near_b) - start, axis=1)
    assert (moved <= 0.002 + 1e-9).all()
    # labels (e.g. the joint that moves a triangle): point 0's target triangle is another part, so point 0
    # stays on triangles of its own part, while point 1, whose target shares its label, still gets there
    labels = np.zeros(len(faces), np.int64)
    labels[target_f[0]] = 1
    part_f, part_b = DE.refit_embedding(face, bary, template, faces, posed, K, det, weights, labels=labels, **kwargs)
    assert labels[part_f[0]] == 0 and labels[part_f[1]] == 0 and labels[face[1]] == 0
    np.testing.assert_allclose(DE.surface_points(template, faces, part_f[1:2], part_b[1:2]), want[1:2], atol=1e-6)


def test_refit_embedding_is_not_dragged_by_one_wild_view(synth):
    """Five views agree that a point sits where it is; a sixth puts it 40 px away, at the place of a
    surface point within reach. With the robust (Cauchy) view cost the point stays; with robust so large
    that the cost is the plain square, the one view drags it off."""
    template, faces = DE.model_mesh(synth)
    template = template.astype(np.float64)
    eye_face = DE.eyeball_vertices(synth.weights)[faces].all(1)
    centroid = template[faces].mean(1)
    own = np.nonzero(~eye_face & (centroid[:, 2] > 0.08) & (np.abs(centroid[:, 0]) < 0.04))[0][:1]
    face, bary = own.copy(), np.full((1, 3), 1 / 3)
    posed, K = _views(template, [(0.0, 0.0), (0.2, 0.0), (-0.2, 0.0), (0.0, 0.15), (0.0, -0.15), (0.3, 0.1)])
    det = _project(np.stack([DE.surface_points(p, faces, face, bary) for p in posed]), K[0])
    det[-1] += 40.0  # the wild view
    weights = np.ones((6, 1))
    start = DE.surface_points(template, faces, face, bary)
    kept_f, kept_b = DE.refit_embedding(face, bary, template, faces, posed, K, det, weights, radius=0.03,
                                        sigma_move=0.01)
    np.testing.assert_allclose(DE.surface_points(template, faces, kept_f, kept_b), start, atol=1e-9)
    drag_f, drag_b = DE.refit_embedding(face, bary, template, faces, posed, K, det, weights, radius=0.03,
                                        sigma_move=0.01, robust=1e6)
    assert np.linalg.norm(DE.surface_points(template, faces, drag_f, drag_b) - start) > 0.003
