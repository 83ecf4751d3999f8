"""Synthetic faces with known parameters, for recovery benchmarks (shared by bench.fit and bench.identity)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fitter import io
from fitter.camera import ortho_project
from fitter.params import FitParams
from fitter.synth import face_mask_polygon, synthesize
from priors.flame import FlameModel

PHOTO_SIZE = 512


def random_params(model: FlameModel, rng: np.random.Generator, shape: np.ndarray | None = None,
                  yaw_deg: float | None = None) -> FitParams:
    """One plausible random face: identity ~ N(0, 1), expression ~ N(0, 0.8^2) (redrawn while the lips
    cross), yaw in +-30 degrees,
    a little pitch/roll, jaw 0..0.25 rad, coloured SH light, smooth skin-tone albedo."""
    t = lambda a: torch.as_tensor(np.asarray(a, np.float32))[None]  # noqa: E731
    p = FitParams.initial(1, model.n_shape, model.n_exp, model.n_verts)
    p.shape = t(rng.normal(0, 1, model.n_shape) if shape is None else shape)
    p.exp = t(rng.normal(0, 0.8, model.n_exp))
    while not lips_plausible(model, p):  # large Gaussian codes can push the lips through each other
        p.exp = t(rng.normal(0, 0.8, model.n_exp))
    yaw = np.deg2rad(rng.uniform(-30, 30) if yaw_deg is None else yaw_deg)
    p.global_pose = t([rng.uniform(-0.15, 0.15), yaw, rng.uniform(-0.08, 0.08)])
    p.jaw_pose = t([rng.uniform(0.0, 0.25), 0.0, 0.0])
    p.cam = t([rng.uniform(7.0, 8.5), rng.uniform(-0.01, 0.01), rng.uniform(-0.03, 0.0)])
    light = np.zeros((9, 3), np.float32)
    light[0] = rng.uniform(2.6, 3.4) * np.array([1.0, rng.uniform(0.9, 1.0), rng.uniform(0.8, 1.0)])
    light[1:4] = rng.normal(0, 0.5, (3, 1)) * np.ones((1, 3))
    p.light = t(light)
    v = model.v_template.numpy()
    tone = np.array([0.75, 0.55, 0.45]) * rng.uniform(0.7, 1.1)
    wave = 0.06 * np.sin(v[:, :1] * rng.uniform(20, 40) + rng.uniform(0, 6)) * np.cos(v[:, 1:2] * 30)
    p.albedo = t(np.clip(tone + wave, 0, 1))
    return p


def lips_plausible(model: FlameModel, params: FitParams, tol: float = 1e-3) -> bool:
    """False when the inner upper lip (iBUG 61-63) sits below the inner lower lip (67-65):
    an expression no face makes, which the Gaussian expression prior can still draw."""
    with torch.no_grad():
        lmk = model(params.shape, params.exp, *(torch.zeros_like(x) for x in (params.global_pose,
                    params.neck_pose, params.jaw_pose, params.eye_pose))).landmarks3d[0]
    return bool((lmk[[61, 62, 63], 1] >= lmk[[67, 66, 65], 1] - tol).all())


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour gradient with mild noise, float32 (size, size, 3) in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    a, b = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
    img = a * xx[..., None] + b * (1 - yy[..., None])
    return np.clip(img / 1.5 + rng.normal(0, 0.02, img.shape), 0, 1).astype(np.float32)


def render_photo(model: FlameModel, params: FitParams, rng: np.random.Generator,
                 size: int = PHOTO_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Render a 'photo' of the face over a random background -> (uint8 image, 68 x 2 landmarks in pixels)."""
    bg = torch.from_numpy(background(rng, size)).permute(2, 0, 1)[None]
    with torch.no_grad():
        pred = synthesize(model, params, size, background=bg)
    img = (pred["image"][0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return img, pred["landmarks2d"][0].numpy()


def grid_mask(image: np.ndarray, rng: np.random.Generator, keep: float = 0.6, cells: int = 6) -> np.ndarray:
    """GridMask occlusion: a square grid of dropped (grey) patches; `keep` of the area stays visible."""
    h, w = image.shape[:2]
    period = max(h, w) / cells
    side = period * np.sqrt(1 - keep)  # dropped square per cell
    off = rng.uniform(0, period, 2)
    yy, xx = np.mgrid[0:h, 0:w]
    drop = (((xx + off[0]) % period) < side) & (((yy + off[1]) % period) < side)
    out = image.copy()
    out[drop] = 128
    return out


def face_region(model: FlameModel) -> np.ndarray:
    """Indices of face-area vertices on any mesh: front-facing template vertices inside the
    polygon of the frontal landmarks (jaw contour + brows raised over the forehead)."""
    zero = FitParams.initial(1, model.n_shape, model.n_exp, model.n_verts)
    zero.cam = torch.tensor([[1.0, 0.0, 0.0]])
    with torch.no_grad():
        out = model(zero.shape, zero.exp, zero.global_pose, zero.neck_pose, zero.jaw_pose, zero.eye_pose)
        lmk = ortho_project(out.landmarks3d_full, zero.cam, 2)[0, :, :2].numpy()
        verts = ortho_project(out.vertices, zero.cam, 2)[0].numpy()
    import cv2

    poly = face_mask_polygon(lmk, forehead=0.3).astype(np.float32)
    inside = np.array([cv2.pointPolygonTest(poly, (float(x), float(y)), False) >= 0 for x, y in verts[:, :2]])
    front = out.vertices[0, :, 2].numpy() > np.percentile(out.vertices[0, :, 2].numpy(), 40)
    eyes = model.weights[:, 3:].sum(1).numpy() > 0.5  # eyeballs are not face surface
    return np.nonzero(inside & front & ~eyes)[0]


def similarity_align(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Best similarity transform (Umeyama) of src N x 3 onto dst N x 3; returns transformed src."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    U, S, Vt = np.linalg.svd(d0.T @ s0)
    D = np.eye(3)
    D[2, 2] = np.sign(np.linalg.det(U @ Vt))
    R = U @ D @ Vt
    scale = (S * np.diag(D)).sum() / (s0 ** 2).sum()
    return scale * s0 @ R.T + mu_d


def face_error_mm(pred_vertices: np.ndarray, true_vertices: np.ndarray, region: np.ndarray) -> float:
    """Mean face-area vertex distance (mm) after similarity alignment."""
    aligned = similarity_align(pred_vertices[region], true_vertices[region])
    return float(np.linalg.norm(aligned - true_vertices[region], axis=1).mean() * 1000)


def write_case(folder: Path, name: str, image: np.ndarray, landmarks: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    io.write_png(path, image)
    io.write_landmarks(folder / f"{name}.npy", landmarks.astype(np.float32))
    return path


def true_vertices(model: FlameModel, params: FitParams) -> np.ndarray:
    """Posed vertices of known params (what a perfect fit.npz `vertices` would hold)."""
    with torch.no_grad():
        out = model(params.shape, params.exp, params.global_pose, params.neck_pose, params.jaw_pose,
                    params.eye_pose)
    return out.vertices[0].numpy()
