"""The benchmark helpers' maths: NMEs, the pinhole test camera, the test rasterizer, aligned errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench.fit import case_group, case_yaws
from bench.real import jaw_outline_nme, polyline_distances, score_image, summarise
from bench.synthetic import (Pinhole, face_error_mm, lips_plausible, nme_box, nme_iod, paint_mesh, pinhole_project,
                             plausible_expression, random_params, random_pinhole, region_height, whole_face_region,
                             yaw_bin)
from bench.track import clip_params


def _ibug_like(w: float = 40.0, h: float = 10.0) -> np.ndarray:
    """68 points on a w x h box: all at (0, 0) except the outer eye corners and one at (w, h)."""
    pts = np.zeros((68, 2))
    pts[36] = [0.0, 0.0]
    pts[45] = [30.0, 0.0]  # inter-ocular distance 30
    pts[8] = [w, h]
    return pts


def test_nme_box_hand_computed():
    truth = _ibug_like()  # box 40 x 10 -> sqrt(w h) = 20
    pred = truth.copy()
    pred[:34] += [3.0, 4.0]  # half the points off by 5 px
    assert nme_box(pred, truth) == pytest.approx(2.5 / 20)


def test_nme_iod_hand_computed():
    truth = _ibug_like()
    pred = truth + [0.0, 6.0]  # every point 6 px off; IOD 30
    assert nme_iod(pred, truth) == pytest.approx(0.2)


def test_yaw_bins():
    assert [yaw_bin(y) for y in (0, -29.9, 30, -59, 60, 89, -90)] == ["0-30", "0-30", "30-60", "30-60",
                                                                      "60-90", "60-90", "60-90"]


def test_pinhole_projection_hand_computed():
    cam = Pinhole(focal=1000.0, cx=256.0, cy=250.0, t=np.array([0.01, -0.02, -0.8]), size=512)
    # model point (0.03, 0.05, 0.1) -> camera (0.04, 0.03, -0.7): 0.7 m in front
    out = pinhole_project(np.array([[0.03, 0.05, 0.1]]), cam)[0]
    assert out[0] == pytest.approx(256 + 1000 * 0.04 / 0.7)
    assert out[1] == pytest.approx(250 - 1000 * 0.03 / 0.7)  # y up in the model, down in pixels
    assert out[2] == pytest.approx(0.7)
    K = cam.K()
    pc = np.array([0.04, -0.03, 0.7])  # the same point in OpenCV camera axes (y down, z forward)
    uvw = K @ pc
    assert uvw[:2] / uvw[2] == pytest.approx(out[:2])


def test_paint_mesh_pixel_convention():
    """A square with corners at pixel-corner coordinates (2, 2)..(6, 6) covers exactly pixels 2..5."""
    verts = np.array([[2.0, 2.0, 1.0], [6.0, 2.0, 1.0], [6.0, 6.0, 1.0], [2.0, 6.0, 1.0]])
    faces = np.array([[0, 2, 1], [0, 3, 2]])  # counter-clockwise seen from the camera (y up)
    colours = np.tile([0.2, 0.4, 0.6], (4, 1))
    cam_pts = np.array([[0, 0, -1.0]] * 4) + [[0, 0, 0], [1, 0, 0], [1, -1, 0], [0, -1, 0]]  # y up: screen y down
    rgb, alpha = paint_mesh(verts, faces, colours, 10, cam_pts)
    np.testing.assert_allclose(alpha[2:6, 2:6], 1.0, atol=1e-6)
    ring = np.ones((10, 10), bool)
    ring[1:7, 1:7] = False
    assert alpha[ring].max() == 0
    # OpenCV's fill reaches half a supersampled pixel past each edge: 16 px^2 + at most 16 x 0.125
    assert 16.0 <= alpha.sum() <= 18.1
    assert alpha[1, 3] == pytest.approx(alpha[6, 3], abs=0.26)  # no shift to one side
    np.testing.assert_allclose(rgb[3, 3], [0.2, 0.4, 0.6], atol=1e-6)


def test_paint_mesh_near_triangle_wins_and_inside_is_dark():
    big = np.array([[0.0, 0.0, 2.0], [8.0, 0.0, 2.0], [0.0, 8.0, 2.0]])
    small = np.array([[0.0, 0.0, 1.0], [4.0, 0.0, 1.0], [0.0, 4.0, 1.0]])  # nearer
    verts = np.concatenate([small, big])
    faces = np.array([[0, 1, 2], [3, 4, 5]])
    colours = np.array([[1.0, 0, 0]] * 3 + [[0, 1.0, 0]] * 3)
    # camera-space corners: both triangles face the camera (normal towards the origin) ...
    front = np.array([[0, 0, -1.0], [0, -1, -1.0], [1, 0, -1.0]])
    rgb, _ = paint_mesh(verts, faces, colours, 8, np.concatenate([front, front]))
    assert rgb[1, 1].tolist() == pytest.approx([1.0, 0, 0])  # the near red one on top
    assert rgb[5, 1].tolist() == pytest.approx([0, 1.0, 0])
    # ... flipped (the camera sees their inside): drawn, but dark
    rgb, alpha = paint_mesh(verts, faces, colours, 8, np.concatenate([front[[0, 2, 1]], front[[0, 2, 1]]]))
    assert alpha[1, 1] == pytest.approx(1.0) and rgb[1, 1, 0] < 0.1


def test_face_error_zero_for_similar_copy():
    rng = np.random.default_rng(1)
    truth = rng.normal(0, 0.05, (200, 3))
    a = 0.7
    R = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    copy = 1.3 * truth @ R.T + [0.1, -0.2, 0.3]
    region = np.arange(0, 200, 2)
    assert face_error_mm(copy, truth, region) == pytest.approx(0.0, abs=1e-9)
    bumped = copy.copy()
    bumped[region[:10]] += 0.01  # a real difference does not vanish
    assert face_error_mm(bumped, truth, region) > 0.1


def test_case_yaws():
    assert case_yaws(3) == [-30.0, 0.0, 30.0]
    assert case_yaws(2, wide=2) == [-30.0, 30.0, 35.0, -45.0]
    assert case_yaws(1, wide=1, profile=3) == [0.0, 35.0, 50.0, -62.5, 75.0]
    assert [case_group(y) for y in (-30.0, 30.5, -35.0, 47.5, -50.0, 75.0)] == [
        "yaw30", "yaw30", "wide", "wide", "profile", "profile"]


def test_polyline_distances_hand_computed():
    line = np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 10.0]])  # an L: along x, then up
    pts = np.array([[5.0, 3.0], [13.0, 5.0], [-4.0, -3.0], [10.0, 0.0], [8.0, 4.0]])
    # above the first leg; right of the second; beyond the first end (to the corner (0, 0));
    # on the bend; nearer the second leg (2) than the first (4)
    np.testing.assert_allclose(polyline_distances(pts, line), [3.0, 3.0, 5.0, 0.0, 2.0])


def test_jaw_outline_ignores_spacing_along_the_jawline():
    truth = _ibug_like()
    truth[:17] = np.stack([np.linspace(0.0, 32.0, 17), np.zeros(17)], 1)  # a straight jawline
    truth[30] = [40.0, 10.0]  # the box stays 40 x 10
    slid = truth.copy()
    slid[:17, 0] = np.linspace(0.0, 32.0, 17) ** 2 / 32.0  # the same line, the points spaced otherwise
    assert jaw_outline_nme(slid, truth, "aflw") == pytest.approx(0.0, abs=1e-12)
    assert nme_box(slid, truth) > 0.01  # while the point-to-point NME sees the spacing
    lifted = truth.copy()
    lifted[:17, 1] += 3.0  # the whole jawline 3 px off: 3 / 20 (box) and 3 / 30 (inter-ocular)
    assert jaw_outline_nme(lifted, truth, "aflw") == pytest.approx(0.15)
    assert jaw_outline_nme(lifted, truth, "300w") == pytest.approx(0.1)


def test_real_scores_fall_back_and_bin():
    truth = _ibug_like()
    res = SimpleNamespace(landmarks2d=truth + [0.0, 6.0], landmarks2d_target=truth + [0.0, 3.0])
    row = score_image(res, truth, "aflw")
    assert row["landmarks_used"].startswith("landmarks2d")  # no landmarks3d: the 2D points stand in
    assert row["fit_nme"] == pytest.approx(6 / 20) and row["detector_nme"] == pytest.approx(3 / 20)
    res.landmarks3d = truth + [0.0, 2.0]
    row = score_image(res, truth, "aflw")
    assert row["landmarks_used"] == "landmarks3d" and row["fit_nme"] == pytest.approx(2 / 20)
    assert score_image(res, truth, "300w")["fit_nme"] == pytest.approx(6 / 30)  # landmarks2d, IOD
    rows = [{"fit_nme": 0.1, "detector_nme": 0.2, "yaw": 10.0, "yaw_bin": "0-30"},
            {"fit_nme": 0.3, "detector_nme": 0.2, "yaw": -40.0, "yaw_bin": "30-60"},
            {"error": "no face", "yaw": 70.0, "yaw_bin": "60-90"}]
    s = summarise(rows)
    assert (s["images"], s["fitted"]) == (3, 2)
    assert s["fit_nme"] == pytest.approx(0.2)
    assert s["by_yaw"]["30-60"] == {"images": 1, "fit_nme": 0.3, "detector_nme": 0.2}
    assert s["by_yaw"]["60-90"]["images"] == 0


def test_pinhole_camera_fills_the_frame(standin_model):
    """The random camera's fill: the frontal face region spans ~fill x the image height and is centred."""
    model = standin_model
    region = whole_face_region(model)
    assert 3000 < len(region) < 9000
    rng = np.random.default_rng(3)
    p = random_params(model, rng, yaw_deg=0.0)
    p.global_pose[:] = 0
    cam = random_pinhole(model, p, rng, fill=(0.5, 0.5), distance=(1.0, 1.0), region=region)
    from bench.synthetic import true_vertices

    verts = true_vertices(model, p)[region]
    assert pinhole_project(verts.mean(0)[None], cam)[0, 2] == pytest.approx(1.0)  # the face 1 m away
    px = pinhole_project(verts, cam)
    height = np.ptp(px[:, 1]) / cam.size
    assert height == pytest.approx(0.5 * np.ptp(verts[:, 1])
                                   / region_height(model, region), rel=0.1)
    assert np.abs(px[:, :2].mean(0) - cam.size / 2).max() < 0.07 * cam.size



def _map_objective(model, params, cam, target, coeffs):
    """Exact pinhole reprojection error (px, sigma 1)^2 + the Gaussian priors, at (shape, exp) coeffs."""
    import torch

    ns = model.n_shape
    shape = torch.as_tensor(coeffs[:ns], dtype=torch.float32)[None]
    exp = torch.as_tensor(coeffs[ns:], dtype=torch.float32)[None]
    with torch.no_grad():
        lmk = model(shape, exp, params.global_pose, params.neck_pose, params.jaw_pose,
                    params.eye_pose).landmarks3d[0].numpy()
    px = pinhole_project(lmk, cam)[:, :2]
    return float(((px - target) ** 2).sum() + (coeffs[:ns] ** 2).sum() + ((coeffs[ns:] / 0.8) ** 2).sum())


def test_landmark_oracle_is_the_map_optimum(standin_model):
    """The oracle's solve scores better than the true coefficients on its own objective (and better than
    nearby perturbations of itself), and from 1-px-noisy points of a face lands far closer than the mean face."""
    from bench.synthetic import landmark_oracle, landmark_oracle_coeffs, render_pinhole

    model = standin_model
    region = whole_face_region(model)
    rng = np.random.default_rng(5)
    p = random_params(model, rng, yaw_deg=20.0)
    cam = random_pinhole(model, p, rng, region=region)
    r = render_pinhole(model, p, cam, rng)
    target = r["landmarks2d"].astype(np.float64) + rng.normal(0, 1.0, (68, 2))
    c = landmark_oracle_coeffs(model, p, cam, target)
    best = _map_objective(model, p, cam, target, c)
    truth_c = np.concatenate([p.shape[0].numpy(), p.exp[0].numpy()])
    assert best < _map_objective(model, p, cam, target, truth_c)
    for _ in range(3):
        assert best <= _map_objective(model, p, cam, target, c + rng.normal(0, 0.05, c.shape)) + 1e-3
    err = face_error_mm(landmark_oracle(model, p, cam, target), r["vertices"], region)
    assert err < 0.5 * face_error_mm(model.v_template.numpy(), r["vertices"], region)


def test_real_scores_by_point_group():
    """Per-group NME: a known displacement of the brows alone shows up in the brows only, with the whole
    set's normaliser (box 40 x 10 -> 20; IOD 30)."""
    from bench.real import GROUPS, group_nme

    truth = _ibug_like()
    pred = truth.copy()
    pred[17:27] += [6.0, 8.0]  # the ten brow points 10 px off
    pred[30] += [0.0, 4.0]  # one nose point (of 9) 4 px off
    g = group_nme(pred, truth, "aflw")
    assert g["brows"] == pytest.approx(10 / 20) and g["nose"] == pytest.approx(4 / 9 / 20)
    assert g["jaw"] == g["eyes"] == g["mouth"] == 0.0
    # the groups' point-weighted mean is the whole set's NME
    assert sum(g[k] * len(ids) for k, ids in GROUPS.items()) / 68 == pytest.approx(nme_box(pred, truth))
    assert group_nme(pred, truth, "300w")["brows"] == pytest.approx(10 / 30)
    res = SimpleNamespace(landmarks2d=pred, landmarks2d_target=truth, landmarks3d=pred)
    row = score_image(res, truth, "aflw")
    assert row["fit_groups"]["brows"] == pytest.approx(0.5) and row["detector_groups"]["brows"] == 0.0
    s = summarise([row, {**row, "fit_groups": {**row["fit_groups"], "brows": 0.3}}])
    assert s["groups"]["brows"] == {"fit": pytest.approx(0.4), "detector": 0.0}


def test_detector_convention_is_the_detectors_mapping_on_the_models_mediapipe_points(standin_model):
    """bench.real's second scoring of a fit: the fitted head's 68 points in the MediaPipe detector's
    convention. Independent expectation: fitter.detect.mesh_to_ibug68 (the detector's own mapping, silhouette
    step included) applied to the head's 478 MediaPipe points projected through the fit's camera; the
    composed surface points differ from it only by the snap to the surface (< 1 mm) and perspective."""
    from bench.real import DetectorConvention
    from fitter import detect
    from priors import dense_embedding as DE

    model = standin_model
    conv = DetectorConvention(model)
    verts = model.v_template.numpy().astype(np.float64)
    res = SimpleNamespace(vertices=verts, R=np.diag([1.0, -1.0, -1.0]), t=np.array([0.0, 0.0, 0.6]),
                          K=np.array([[1000.0, 0, 256], [0, 1000.0, 256], [0, 0, 1]]))
    cam = DE.dense_landmarks(torch.as_tensor(verts[None]), model.faces, conv.emb)[0].numpy() @ res.R.T + res.t
    uv = cam @ res.K.T
    mesh = uv[:, :2] / uv[:, 2:]
    want2d = detect.mesh_to_ibug68(mesh[:detect.N_MESH])
    want3d = np.array([mesh[list(ids)].mean(0) for ids in detect.MEDIAPIPE_TO_IBUG68])
    got2d, got3d = conv.landmarks(res, "300w"), conv.landmarks(res, "aflw")
    assert np.abs(got3d - want3d).max() < 1.5  # px; 1 mm at 0.6 m is 1.7 px
    assert np.abs(got2d - want2d).max() < 1.5
    own = model.full_faces.numpy()  # the model's own 68 points (ICT's landmark vertices) are elsewhere
    own_px = DE.surface_points(verts, model.faces.numpy(), own, model.full_bary.numpy()) @ res.R.T + res.t
    own_px = (own_px @ res.K.T)[:, :2] / (own_px @ res.K.T)[:, 2:]
    assert np.linalg.norm(own_px - got3d, axis=1).max() > 5.0


def _lip_gaps_mm(model, shape, exp) -> np.ndarray:
    """Inner upper lip (iBUG 61-63) minus inner lower lip (67-65) in height, mm, at zero pose, read off
    the template and the blendshapes at the landmarks' triangles (not through the model's forward pass)."""
    coeffs = np.concatenate([shape, exp])
    v = model.v_template.numpy() + np.einsum("vck,k->vc", model.dirs.numpy(), coeffs)
    corners = v[model.faces.numpy()[model.full_faces.numpy()]]  # 68 x 3 corners x 3
    lmk = np.einsum("lc,lcd->ld", model.full_bary.numpy(), corners)
    return (lmk[[61, 62, 63], 1] - lmk[[67, 66, 65], 1]) * 1000


def test_lips_plausible_and_the_redrawn_expression(standin_model):
    model = standin_model
    shape = np.random.default_rng(0).normal(0, 1, model.n_shape)
    params = random_params(model, np.random.default_rng(0))
    params.shape = torch.as_tensor(shape, dtype=torch.float32)[None]
    # the gap is linear in the code: push it to -5 mm (crossed) and +5 mm (open) along its gradient
    basis = np.eye(model.n_exp)
    gap0 = _lip_gaps_mm(model, shape, np.zeros(model.n_exp))[1]
    grad = np.array([_lip_gaps_mm(model, shape, e)[1] - gap0 for e in basis])
    for target, plausible in ((-5.0, False), (gap0 + 5.0, True)):
        exp = (target - gap0) * grad / (grad @ grad)
        assert _lip_gaps_mm(model, shape, exp)[1] == pytest.approx(target, abs=1e-3)
        params.exp = torch.as_tensor(exp, dtype=torch.float32)[None]
        params.jaw_pose = torch.tensor([[0.3, 0.0, 0.0]])  # the jaw does not count: it never crosses the lips
        assert lips_plausible(model, params) is plausible
    # a seed whose first wide draw crosses the lips: plausible_expression draws again
    draw = lambda s: np.random.default_rng(s).normal(0, 1.5, model.n_exp)  # noqa: E731
    seed = next(s for s in range(100) if _lip_gaps_mm(model, shape, draw(s)).min() < -1.0)
    first = draw(seed)
    exp = plausible_expression(model, np.random.default_rng(seed), 1.5, shape)
    assert not np.allclose(exp, first) and _lip_gaps_mm(model, shape, exp).min() >= -1.0


def test_track_clip_expressions_never_cross_the_lips(standin_model):
    """bench.track's clips blend key expressions; seed 4's keys crossed the lips by up to 20 mm before
    they were drawn as bench.fit's faces are. With 4 frames every frame is a key."""
    for seed in (1, 2, 4):
        for p in clip_params(standin_model, 4, 256, seed):
            gaps = _lip_gaps_mm(standin_model, p.shape[0].numpy(), p.exp[0].numpy())
            assert gaps.min() >= -1.0, (seed, gaps)
