"""Projection of model-space points into crop pixels.

Screen space (what the rasterizer takes): x pixels right, y pixels down, origin at the
top-left corner of the crop, depth third with smaller = nearer. Model space: metres,
y up, +z towards the camera.
"""

from __future__ import annotations

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


def perspective_project(points: Tensor, focal: Tensor, R: Tensor, t: Tensor, res: int,
                        principal: Tensor | None = None) -> Tensor:
    """Pinhole projection; the camera looks down its -z axis (OpenGL convention).

    points B x N x 3 (model space), focal B (in crop widths: f_pixels = focal * res),
    R B x 3 x 3 and t B x 3 (camera-from-model), principal B x 2 in pixels (default the
    crop centre) -> B x N x 3 screen, depth = distance along the viewing axis.
    """
    pc = points @ R.transpose(1, 2) + t[:, None]
    depth = -pc[..., 2]
    f = (focal * res)[:, None]
    if principal is None:
        principal = torch.full((points.shape[0], 2), res / 2.0, dtype=points.dtype, device=points.device)
    x = principal[:, None, 0] + f * pc[..., 0] / depth
    y = principal[:, None, 1] - f * pc[..., 1] / depth
    return torch.stack([x, y, depth], dim=-1)


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
