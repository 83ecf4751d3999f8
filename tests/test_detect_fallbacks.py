"""fitter.detect: detection that does not give up (grey, small, rotated faces) and MediaPipe's dense points."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

from fitter import detect as D
from fitter.detect import (
    dense_point_weights,
    detect_landmarks,
    detect_landmarks_dense,
    mesh_to_ibug68,
    normalise_contrast,
    rotation_matrix,
    warp_points_back,
)
from fitter.io import read_image
from priors.errors import NoFaceError

ROOT = Path(__file__).resolve().parent.parent
ASTRONAUT = ROOT / "fitter" / "samples" / "astronaut.png"
needs_mediapipe = pytest.mark.skipif(importlib.util.find_spec("mediapipe") is None,
                                     reason="mediapipe is not installed")


def _nme(found: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(found - expected, axis=1).mean() / np.linalg.norm(expected[36] - expected[45]))


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return read_image(ASTRONAUT)


# ----------------------------------------------------------------------------- pure maths
@pytest.mark.parametrize("angle", [90.0, -90.0, 180.0, 30.0, -30.0])
def test_rotation_maps_pixels_like_the_warp(angle):
    h, w = 60, 90
    M, (nh, nw) = rotation_matrix(angle, (h, w))
    a = np.deg2rad(angle)
    assert (nh, nw) == (round(abs(w * np.sin(a)) + abs(h * np.cos(a))), round(abs(w * np.cos(a)) + abs(h * np.sin(a))))
    # the image centre goes to the canvas centre; +x turns counter-clockwise on screen (y down): up for 90
    assert M[:, :2] @ [w / 2, h / 2] + M[:, 2] == pytest.approx([nw / 2, nh / 2])
    assert M[:, :2] @ [1.0, 0.0] == pytest.approx([np.cos(a), -np.sin(a)], abs=1e-12)
    # a bright pixel moves where the matrix says (corner-origin centres)
    img = np.zeros((h, w), np.uint8)
    img[10, 70] = 255
    out = D._warp(img, M, (nh, nw))
    peak = np.unravel_index(np.argmax(out), out.shape)
    expected = M[:, :2] @ [70.5, 10.5] + M[:, 2]
    assert np.abs(np.array([peak[1] + 0.5, peak[0] + 0.5]) - expected).max() <= 0.75
    pts = np.random.default_rng(0).uniform(0, 60, (5, 3))
    moved = pts.copy()
    moved[:, :2] = pts[:, :2] @ M[:, :2].T + M[:, 2]
    assert warp_points_back(moved, M) == pytest.approx(pts)


def test_warp_points_back_scales_depth():
    M = np.array([[2.0, 0.0, 10.0], [0.0, 2.0, -4.0]])  # 2x zoom
    back = warp_points_back(np.array([[30.0, 16.0, 8.0]]), M)
    assert back == pytest.approx(np.array([[10.0, 10.0, 4.0]]))


def test_normalise_contrast_makes_grey_three_channels_and_spreads_a_dark_image():
    rng = np.random.default_rng(0)
    dark = (rng.uniform(0, 1, (64, 64)) ** 2 * 40).astype(np.uint8)  # values 0..40
    out = normalise_contrast(dark)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    assert out.std() > 2 * dark.std()


def test_dense_weights_follow_the_surface_facing():
    """Points on a sphere (MediaPipe's axes: z smaller = nearer): the weight is the cosine between the
    outward normal and the direction to the camera (-z), 0 on the far side."""
    rng = np.random.default_rng(1)
    v = rng.normal(size=(2000, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    pts = 100.0 * v[v[:, 2] < 0.3][:478]  # a cap facing the camera, plus a band past the silhouette
    w = dense_point_weights(pts)
    assert w.shape == (478,) and w.dtype == np.float32
    cos = np.clip(-pts[:, 2] / 100.0, 0, 1)
    inner = np.linalg.norm(pts[:, :2], axis=1) < 85  # neighbourhoods away from the cap's rim
    assert np.abs(w - cos)[:468][inner[:468]].max() < 0.08
    assert (w[:468][pts[:468, 2] > 10] < 0.05).all()  # turned away: ~0
    assert dense_point_weights(pts, floor=0.2).min() >= 0.2


def _face_mesh(roll_deg: float, centre=(200.0, 150.0), size: float = 80.0) -> np.ndarray:
    """A stand-in 478 x 3 mesh: random points in a square, chin (152) below the forehead (10) on the
    face's axis, the whole turned clockwise by roll_deg about centre."""
    pts = np.random.default_rng(2).uniform(-size / 2, size / 2, (478, 3))
    pts[152, :2], pts[10, :2] = (0.0, size / 2), (0.0, -size / 2)  # y down: the chin is below
    a = np.deg2rad(roll_deg)
    turn = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])  # clockwise on screen (y down)
    pts[:, :2] = pts[:, :2] @ turn.T + centre
    return pts


@pytest.mark.parametrize("roll", [0.0, 30.0, 90.0, -90.0, 150.0])
def test_face_roll_and_the_upright_crop(roll):
    mesh = _face_mesh(roll)
    assert D.face_roll_deg(mesh) == pytest.approx(roll)
    M = D.upright_crop_matrix(mesh, res=256, margin=2.0)
    up = mesh[:, :2] @ M[:, :2].T + M[:, 2]
    # in the crop the face stands upright (forehead straight above the chin), centred, half the side wide
    assert up[10, 0] == pytest.approx(up[152, 0], abs=1e-9) and up[10, 1] < up[152, 1]
    assert up[:468].mean(0) == pytest.approx([128.0, 128.0])
    assert np.ptp(up[:468], axis=0).max() == pytest.approx(128.0)


@pytest.mark.parametrize("again, expected", [("same", True), ("shifted", False), ("none", False)])
def test_a_face_is_kept_only_when_found_again_upright(monkeypatch, again, expected):
    mesh = _face_mesh(60.0)
    image = np.zeros((300, 400, 3), np.uint8)
    seen = []

    def once(img):  # the crop's detector: the same mesh in crop pixels, one moved by half its width, none
        seen.append(img.shape)
        M = D.upright_crop_matrix(mesh)
        found = mesh.copy()
        shift = 0.0 if again == "same" else 0.5 * D.CONFIRM_RES / D.CONFIRM_MARGIN
        found[:, :2] = mesh[:, :2] @ M[:, :2].T + M[:, 2] + shift
        return [] if again == "none" else [found]

    monkeypatch.setattr(D, "_mediapipe_once", once)
    assert D.confirmed_face(image, mesh) is expected
    assert seen == [(D.CONFIRM_RES, D.CONFIRM_RES, 3)]


def test_face_exposure_is_the_median_grey_inside_the_face():
    mesh = _face_mesh(0.0, centre=(100.0, 100.0))  # extent 80 px around (100, 100)
    image = np.full((200, 300, 3), 250, np.uint8)  # bright background, not counted
    image[40:160, 40:160] = 51  # 0.2 of the range under and around the face
    image[95:105, 95:105] = 255  # a small highlight does not move the median
    assert D.face_exposure(image, mesh) == pytest.approx(0.2)
    assert D.face_exposure(image[..., 0], mesh[:, :2]) == pytest.approx(0.2)  # grey input, 2D points


def test_brightened_takes_the_level_to_the_target_and_keeps_order():
    ramp = np.arange(256, dtype=np.uint8)
    out = D.brightened(ramp, 0.1, 0.4)  # x -> x ** g with g = log 0.4 / log 0.1 = 0.398
    assert out[51] == round(255 * 0.2 ** 0.39794)  # by hand: 0.2 ** 0.398 = 0.527 -> 134
    assert abs(out[26] / 255 - 0.4) < 0.01  # grey 0.1 (25.5) becomes 0.4
    assert out[0] == 0 and out[255] == 255 and np.all(np.diff(out.astype(int)) >= 0)
    assert np.array_equal(D.brightened(ramp, 0.4, 0.4), ramp)  # already at the target: unchanged


def test_distinct_faces_drops_a_face_found_twice():
    a, b = _face_mesh(0.0, centre=(100.0, 100.0)), _face_mesh(0.0, centre=(300.0, 100.0))
    again = a.copy()
    again[:, :2] += 15.0  # the same face from another crop: moved by under half its extent (80 px)
    kept = D.distinct_faces([a, b, again])
    assert len(kept) == 2 and kept[0] is a and kept[1] is b
    assert len(D.distinct_faces([a, _face_mesh(0.0, centre=(145.0, 100.0))])) == 2  # 45 px apart: two faces


# ----------------------------------------------------------------------------- real MediaPipe runs
def _small_grey(astronaut: np.ndarray, angle: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The astronaut in grey, downscaled to a sixth of a 1800 x 2400 grey canvas' height and pasted off
    centre; returns (canvas RGB, 2 x 3 corner-origin map from the photo to the canvas)."""
    grey = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)
    H, W, side = 1800, 2400, 300
    k = side / astronaut.shape[0]
    small = cv2.resize(grey, (round(astronaut.shape[1] * k), side), interpolation=cv2.INTER_AREA)
    canvas = np.full((H, W), 118, np.uint8)
    ox, oy = 1500, 900
    canvas[oy:oy + side, ox:ox + small.shape[1]] = small
    M = np.array([[small.shape[1] / astronaut.shape[1], 0, ox], [0, k, oy]])
    if angle:
        R, size = rotation_matrix(angle, (H, W))
        canvas = D._warp(canvas, R, size)
        M = D._compose(R, M)
    return np.repeat(canvas[..., None], 3, axis=2), M


@needs_mediapipe
def test_small_grey_face_is_found_on_the_face(astronaut):
    reference = detect_landmarks(astronaut, "mediapipe")
    canvas, M = _small_grey(astronaut)
    assert D.mediapipe_meshes(canvas, retry=False) == []  # the plain detector misses it
    found = detect_landmarks(canvas, "mediapipe")
    meshes, how = D.mediapipe_meshes_how(canvas)
    assert how == "full-range detector zoom" and len(meshes) == 1
    assert D.mediapipe_meshes_how(astronaut)[1] == "first pass"
    assert D.mediapipe_meshes_how(np.full((240, 320, 3), 128, np.uint8)) == ([], None)
    expected = reference @ M[:, :2].T + M[:, 2]
    assert _nme(found, expected) < 0.05  # measured 0.014


@needs_mediapipe
def test_every_small_face_of_a_group_is_found(astronaut):
    """Two small faces that only the full-range detector finds: both come back, each on its face, and
    --face-index can pick either."""
    canvas, M = _small_grey(astronaut)
    group = canvas.copy()
    half = group.shape[1] // 2
    group[:, :half] = canvas[:, ::-1][:, :half]  # the face (right half) mirrored into the left half
    meshes, how = D.mediapipe_meshes_how(group)
    assert how == "full-range detector zoom" and len(meshes) == 2
    reference = detect_landmarks(astronaut, "mediapipe")
    right = reference @ M[:, :2].T + M[:, 2]
    left = right.copy()
    left[:, 0] = group.shape[1] - left[:, 0]
    found = sorted((mesh_to_ibug68(m[:468, :2]) for m in meshes), key=lambda p: p[:, 0].mean())
    assert _nme(found[1], right) < 0.05
    midline = [8, 27, 28, 29, 30, 33, 51, 57, 62, 66]  # points that mirroring leaves in place
    iod = np.linalg.norm(right[36] - right[45])
    assert np.linalg.norm(found[0][midline] - left[midline], axis=1).mean() / iod < 0.1
    both = {tuple(np.round(detect_landmarks(group, "mediapipe", face_index=k)[8])) for k in (0, 1)}
    assert len(both) == 2


@needs_mediapipe
def test_small_grey_face_rotated_90_is_found(astronaut):
    reference = detect_landmarks(astronaut, "mediapipe")
    canvas, M = _small_grey(astronaut, angle=90.0)
    found = detect_landmarks(canvas, "mediapipe")
    expected = reference @ M[:, :2].T + M[:, 2]
    assert _nme(found, expected) < 0.08


@needs_mediapipe
@pytest.mark.parametrize("k", [1, 3])
def test_photo_rotated_90_lands_on_the_face(astronaut, k):
    reference = detect_landmarks(astronaut, "mediapipe")
    rotated = np.ascontiguousarray(np.rot90(astronaut, k))  # counter-clockwise k x 90 degrees
    M, size = rotation_matrix(90.0 * k, astronaut.shape[:2])
    assert rotated.shape[:2] == size
    expected = reference @ M[:, :2].T + M[:, 2]
    assert _nme(detect_landmarks(rotated, "mediapipe"), expected) < 0.2  # measured 0.04 and 0.17 (jaw)


@needs_mediapipe
def test_starting_mediapipe_prints_nothing():
    """Its graph starts on background threads that log to file descriptor 2 (TFLite, absl) after the
    constructor returns; none of it may reach the console, even when the first detection comes later."""
    import subprocess
    import sys

    code = "import time; from fitter import detect; detect._mediapipe(); time.sleep(1.0); print('ok')"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok"
    assert r.stderr == ""


@needs_mediapipe
def test_upside_down_photo_lands_on_the_face(astronaut):
    """Upside down, FaceMesh's first pass lays a mesh the wrong way round on the face; it is not found
    again upright, so the retries go on to a turned copy that is."""
    reference = detect_landmarks(astronaut, "mediapipe")
    M, size = rotation_matrix(180.0, astronaut.shape[:2])
    upside_down = D._warp(astronaut, M, size)
    expected = reference @ M[:, :2].T + M[:, 2]
    unchecked = D._mediapipe_once(upside_down)
    assert len(unchecked) == 1 and _nme(mesh_to_ibug68(unchecked[0][:468, :2]), expected) > 0.3  # measured 0.6
    assert not D.confirmed_face(upside_down, unchecked[0])
    meshes, how = D.mediapipe_meshes_how(upside_down)
    assert how != "first pass" and "rotated" in how
    assert _nme(mesh_to_ibug68(meshes[0][:468, :2]), expected) < 0.2  # measured 0.17 (a 90-degree turn)


@needs_mediapipe
@pytest.mark.parametrize("kind", ["blank", "noise"])
def test_no_face_is_still_a_clear_error(kind):
    rng = np.random.default_rng(0)
    img = np.full((240, 320, 3), 128, np.uint8) if kind == "blank" else \
        rng.integers(0, 256, (240, 320, 3)).astype(np.uint8)
    for call in (lambda: detect_landmarks(img, "mediapipe"), lambda: detect_landmarks_dense(img)):
        with pytest.raises(NoFaceError) as info:
            call()
        assert "no face found by mediapipe" in str(info.value) and "\n" not in str(info.value)


@needs_mediapipe
def test_dense_detection_gives_the_68_and_478_points(astronaut):
    lmk68, dense, weights = detect_landmarks_dense(astronaut)
    assert lmk68.shape == (68, 2) and dense.shape == (478, 2) and weights.shape == (478,)
    assert lmk68.dtype == dense.dtype == weights.dtype == np.float32
    assert np.array_equal(lmk68, detect_landmarks(astronaut, "mediapipe"))
    # the table's single-point entries are the mesh points themselves (e.g. chin 8 = mesh 152)
    assert lmk68[8] == pytest.approx(dense[152], abs=1e-3)
    assert lmk68[36] == pytest.approx(dense[33], abs=1e-3)
    # each iris centre sits between its eye's corners
    for iris, (a, b) in ((468, (33, 133)), (473, (362, 263))):
        lo, hi = np.minimum(dense[a], dense[b]), np.maximum(dense[a], dense[b])
        assert lo[0] < dense[iris, 0] < hi[0]
    assert 0.0 <= weights.min() and weights.max() <= 1.0
    assert np.median(weights[[1, 4, 5, 6, 168, 197]]) > 0.6  # the nose ridge faces the camera
