"""Projection of model-space points into crop pixels.

Screen space (what the rasterizer takes): x pixels right, y pixels down, origin at the
top-left corner of the crop, depth third with smaller = nearer. Model space: metres,
y up, +z towards the camera.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def ortho_project(points: Tensor, cam: Tensor, res: int) -> Tensor:
    """Weak-perspective (DECA) projection into a square crop of `res` pixels.

    points B x N x 3, cam B x 3 = (scale, tx, ty) in normalised device units
    (ndc = scale * (xy + t), ndc in [-1, 1] spans the crop, y up) -> B x N x 3 screen.
    """
    s, t = cam[:, None, :1], cam[:, None, 1:3]
    ndc = s * (points[..., :2] + t)
    half = res / 2.0
    x = (ndc[..., 0] + 1.0) * half
    y = (1.0 - ndc[..., 1]) * half
    return torch.stack([x, y, -points[..., 2]], dim=-1)


def ortho_unproject_xy(screen_xy: Tensor, cam: Tensor, res: int) -> Tensor:
    """Inverse of ortho_project for x, y: screen B x N x 2 -> model-space x, y B x N x 2."""
    half = res / 2.0
    ndc = torch.stack([screen_xy[..., 0] / half - 1.0, 1.0 - screen_xy[..., 1] / half], dim=-1)
    return ndc / cam[:, None, :1] - cam[:, None, 1:3]


def ortho_init_from_landmarks(model_lmk: Tensor, target_px: Tensor, res: int) -> Tensor:
    """Closed-form scale and translation matching model landmarks to 2D targets.

    model_lmk B x L x 3 (model space, frontal), target_px B x L x 2 (crop pixels)
    -> cam B x 3 minimising || ortho_project(model_lmk)[..., :2] - target ||^2 over s, tx, ty.
    """
    half = res / 2.0
    ndc = torch.stack([target_px[..., 0] / half - 1.0, 1.0 - target_px[..., 1] / half], dim=-1)
    m = model_lmk[..., :2]
    mc, nc = m - m.mean(1, keepdim=True), ndc - ndc.mean(1, keepdim=True)
    s = (mc * nc).sum((1, 2)) / (mc * mc).sum((1, 2)).clamp_min(1e-12)
    t = ndc.mean(1) / s[:, None] - m.mean(1)
    return torch.cat([s[:, None], t], dim=1)


# ----------------------------------------------------------------------------- pinhole (the default)
# cam B x 6 = (s, tx, ty, f, px, py): (s, tx, ty) mean what they mean for weak perspective at the
# depth of the model origin, f is the focal length and (px, py) the principal point, both in the
# crop's normalised device units (f_pixels = f * res / 2; ndc y up). The model origin sits at
# distance D = f / s in front of the camera, so as f grows with s fixed this becomes weak
# perspective. The principal point is fixed by the photo (its centre) and never optimised.
ORTHO_DISTANCE = 1000.0  # metres: weak perspective written as a pinhole camera this far away
DEFAULT_FOCAL_35MM = 50.0  # without EXIF: a "normal" lens, 47 degrees across the diagonal
FULL_FRAME_DIAGONAL_MM = 43.27


def default_focal_px(height: int, width: int) -> float:
    """Focal length in pixels of the default field of view for an image of height x width."""
    return DEFAULT_FOCAL_35MM / FULL_FRAME_DIAGONAL_MM * float(np.hypot(height, width))


def crop_intrinsics(focal_px: float, box, image_size: tuple[int, int]) -> tuple[float, float, float]:
    """A photo's focal length (pixels) and centre as the crop's normalised device units:
    box = [cx, cy, size] of the crop in the same pixels, image_size (H, W) -> (f, px, py)."""
    cx, cy, size = (float(v) for v in box)
    h, w = image_size
    half_box = size / 2.0
    return focal_px / half_box, (w / 2.0 - cx) / half_box, -(h / 2.0 - cy) / half_box


def is_pinhole(cam: Tensor) -> bool:
    return cam.shape[-1] == 6


def project(points: Tensor, cam: Tensor, res: int) -> Tensor:
    """Project with whichever camera `cam` is (B x 3 weak perspective, B x 6 pinhole) -> B x N x 3 screen."""
    return pinhole_project(points, cam, res) if is_pinhole(cam) else ortho_project(points, cam, res)


def pinhole_project(points: Tensor, cam: Tensor, res: int) -> Tensor:
    """Pinhole projection into a square crop: points B x N x 3 (model space), cam B x 6 -> B x N x 3
    screen (x, y pixels; depth = distance along the optical axis, metres)."""
    s, t, f = cam[:, None, :1], cam[:, None, 1:3], cam[:, None, 3:4]
    pp = cam[:, None, 4:6].detach()
    depth = f / s - points[..., 2:3]
    ndc = f * (points[..., :2] + t) / depth + pp
    half = res / 2.0
    return torch.stack([(ndc[..., 0] + 1.0) * half, (1.0 - ndc[..., 1]) * half, depth[..., 0]], dim=-1)


def towards_camera(points: Tensor, cam: Tensor) -> Tensor:
    """Unit vectors from model-space points B x N x 3 towards the camera `cam` (B x 3 weak perspective:
    +z everywhere; B x 6 pinhole: towards its centre, at (-tx, -ty, f / s)) -> B x N x 3."""
    if not is_pinhole(cam):
        return torch.zeros_like(points) + torch.tensor([0.0, 0.0, 1.0], dtype=points.dtype, device=points.device)
    centre = torch.stack([-cam[:, 1], -cam[:, 2], cam[:, 3] / cam[:, 0]], dim=1)[:, None]
    return torch.nn.functional.normalize(centre - points, dim=-1)


def camera_init_from_landmarks(model_lmk: Tensor, target_px: Tensor, res: int, focal: Tensor | None = None,
                               principal: Tensor | None = None) -> Tensor:
    """Closed-form start: weak perspective fitted around the principal point, then the pinhole
    camera with that scale at the model origin's depth. model_lmk B x L x 3, target_px B x L x 2
    (crop pixels), focal B and principal B x 2 (ndc) -> cam B x 6, or B x 3 when focal is None."""
    if focal is None:
        return ortho_init_from_landmarks(model_lmk, target_px, res)
    half = res / 2.0
    shift = torch.stack([principal[:, 0] * half, -principal[:, 1] * half], dim=1)[:, None]  # ndc -> pixels
    st = ortho_init_from_landmarks(model_lmk, target_px - shift, res)
    return torch.cat([st, focal[:, None], principal], dim=1)


def pinhole_from_ortho(cam: Tensor, focal: Tensor, principal: Tensor) -> Tensor:
    """A weak-perspective camera B x 3 (about the crop centre, e.g. DECA's) as the pinhole camera
    B x 6 with focal B and principal point B x 2 (ndc) that projects the model origin's plane alike."""
    s, t = cam[:, :1], cam[:, 1:3]
    return torch.cat([s, t - principal / s, focal[:, None], principal], dim=1)


def zoom_camera(cam: Tensor, factor: float) -> Tensor:
    """The same view through a crop `factor` times larger around the same centre."""
    cam = cam.clone()
    cam[:, 0] = cam[:, 0] / factor
    if is_pinhole(cam):
        cam[:, 3:6] = cam[:, 3:6] / factor
    return cam


def with_focal(cam: Tensor, focal: Tensor) -> Tensor:
    """A camera with a new focal length (ndc, B) and the same distance to the model origin."""
    if not is_pinhole(cam):
        return cam
    cam = cam.clone()
    distance = cam[:, 3] / cam[:, 0]
    cam[:, 3] = focal
    cam[:, 0] = focal / distance
    return cam


def opencv_camera(cam: Tensor, box, res: int, scale: float = 1.0):
    """The fit's camera as OpenCV intrinsics and extrinsics in ORIGINAL image pixels.

    cam 3 or 6 (one image), box = [cx, cy, size] of the crop in working-image pixels, `scale`
    working pixels per original pixel -> K (3, 3), R (3, 3), t (3,) as float64 numpy, with
    x right, y down, z forward, such that pixels = project(K, points @ R.T + t) for model-space
    points. Weak perspective is returned as its pinhole limit, a camera ORTHO_DISTANCE away.
    """
    c = [float(v) for v in cam.detach().cpu().reshape(-1)]
    if len(c) == 3:
        s, tx, ty, f, px, py = c[0], c[1], c[2], c[0] * ORTHO_DISTANCE, 0.0, 0.0
    else:
        s, tx, ty, f, px, py = c
    half = res / 2.0
    k_crop = np.array([[half * f, 0.0, half * (1.0 + px)], [0.0, half * f, half * (1.0 - py)], [0.0, 0.0, 1.0]])
    cx, cy, size = (float(v) for v in box)
    k = size / res
    to_image = np.array([[k, 0.0, cx - size / 2.0], [0.0, k, cy - size / 2.0], [0.0, 0.0, 1.0]])
    to_original = np.diag([1.0 / scale, 1.0 / scale, 1.0])
    K = to_original @ to_image @ k_crop
    R = np.diag([1.0, -1.0, -1.0])
    t = np.array([tx, -ty, f / s])
    return K, R, t


def project_opencv(points, K, R, t):
    """pixels (N, 2) = project(K, points @ R.T + t): the OpenCV pinhole model, numpy."""
    pc = points @ R.T + t
    uv = pc @ K.T
    return uv[:, :2] / uv[:, 2:3]
