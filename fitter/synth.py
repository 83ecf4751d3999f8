"""Synthesis: parameters + the head model -> vertices, projected landmarks and a rendered image."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from priors.flame import FlameModel

from .camera import ortho_project
from .params import FitParams
from .render import render_mesh
from .shading import sh_shading, vertex_normals


def model_output(model: FlameModel, params: FitParams, lean: bool = False):
    return model(params.shape, params.exp, params.global_pose, params.neck_pose, params.jaw_pose,
                 params.eye_pose, lean=lean)


def synthesize(model: FlameModel, params: FitParams, res: int, render: bool = True,
               background: Tensor | None = None, lean: bool = False) -> dict:
    """Evaluate a fit at crop resolution `res`.

    Returns vertices B x V x 3 (model space), landmarks2d B x 68 x 2 (crop pixels),
    landmarks3d B x 68 x 3 (lean, without render: only the vertices landmarks need are
    evaluated, and `vertices` holds just those) and, when `render`: image B x 3 x res x res (albedo x SH shading,
    composited over `background` B x 3 x res x res or black), alpha B x 1 x res x res (soft),
    shading B x 3 x res x res (irradiance x alpha), pix_to_face B x res x res.
    """
    out = model_output(model, params, lean=lean and not render)
    lmk = ortho_project(out.landmarks3d, params.cam, res)[..., :2]
    pred = {"vertices": out.vertices, "landmarks2d": lmk, "landmarks3d": out.landmarks3d}
    if not render:
        return pred
    faces = model.faces
    screen = ortho_project(out.vertices, params.cam, res)
    shade = sh_shading(vertex_normals(out.vertices, faces), params.light)
    colors = torch.cat([params.albedo * shade, shade], dim=-1)  # B x V x 6: colour and grey shading
    out_r = render_mesh(screen, faces, colors, res, res)  # premultiplied by the soft alpha
    alpha = out_r["alpha"]
    image = out_r["image"][:, :3]
    pred.update(
        image=image if background is None else image + (1 - alpha) * background,
        alpha=alpha,
        shading=out_r["image"][:, 3:],
        pix_to_face=out_r["pix_to_face"],
        screen=screen,
    )
    return pred


def face_mask_polygon(landmarks: np.ndarray, forehead: float = 0.35) -> np.ndarray:
    """Polygon (N, 2) around the face from 68 landmarks: the jaw contour, then the brows lifted
    by `forehead` x (chin-to-brow height) to take in the forehead."""
    contour = landmarks[0:17]
    brows = landmarks[26:16:-1].copy()  # 26..17, right to left so the polygon closes
    height = landmarks[8, 1] - landmarks[17:27, 1].mean()
    brows[:, 1] -= forehead * height
    return np.concatenate([contour, brows], axis=0)
