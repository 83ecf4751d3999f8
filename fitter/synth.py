"""Synthesis: parameters + the head model -> vertices, projected landmarks and a rendered image."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from priors.errors import UsageError
from priors.flame import FlameModel

from .camera import project
from .params import FitParams
from .render import composite_pixels, interpolate, rasterize, render_mesh
from .shading import sh_shading, vertex_normals


def model_output(model: FlameModel, params: FitParams, lean: bool = False):
    return model(params.shape, params.exp, params.global_pose, params.neck_pose, params.jaw_pose,
                 params.eye_pose, lean=lean)


def synthesize(model: FlameModel, params: FitParams, res: int, render: bool = True,
               background: Tensor | None = None, lean: bool = False, albedo_model=None, maps: bool = True,
               cull_back: bool = False, fixed: dict | None = None) -> dict:
    """Evaluate a fit at crop resolution `res`.

    Returns vertices B x V x 3 (model space), landmarks2d B x 68 x 2 (crop pixels, silhouette
    contour), landmarks2d_static B x 68 x 2 (the fixed 3D jawline),
    landmarks3d B x 68 x 3 (lean, without render: only the vertices landmarks need are
    evaluated, and `vertices` holds just those) and, when `render`: image B x 3 x res x res (albedo x SH shading,
    composited over `background` B x 3 x res x res or black), alpha B x 1 x res x res (soft),
    shading B x 3 x res x res (irradiance x alpha), normals B x 3 x res x res (interpolated
    unit vertex normals, model/camera axes, x alpha), depth B x 1 x res x res (smaller = nearer,
    0 where empty), pix_to_face B x res x res, and `fixed`: what depends on the geometry alone. maps=False
    leaves out shading and normals (the fit's loss terms do not look at them; three channels render
    faster than nine). cull_back: skip the triangles facing away (fitter.render.rasterize).

    fixed: the `fixed` entry of an earlier result for the same shape, expression, pose and camera:
    the model, its normals, the rasterization and the antialiasing are reused, only albedo and
    light are applied anew (for stages that fit appearance on a fixed geometry).

    params.albedo B x V x 3 is per-vertex colour (interpolated like the shading);
    params.albedo B x K are coefficients of `albedo_model`, a fitter.albedo.TextureAlbedo
    (required then): see :func:`render_textured`.
    """
    if fixed is not None:
        pred, screen, normals = dict(fixed["pred"]), fixed["screen"], fixed["normals"]
        frags, cover = fixed["frags"], fixed["cover"]
    else:
        out = model_output(model, params, lean=lean and not render)
        lmk = project(out.landmarks3d, params.cam, res)[..., :2]
        pred = {"vertices": out.vertices, "landmarks2d": lmk, "landmarks3d": out.landmarks3d,
                "landmarks2d_static": project(out.landmarks3d_full, params.cam, res)[..., :2]}
        if out.dense is not None:
            pred["dense2d"] = project(out.dense, params.cam, res)[..., :2]
        if not render:
            return pred
        screen = project(out.vertices, params.cam, res)
        normals = vertex_normals(out.vertices, model.faces)
        frags = cover = None
    faces = model.faces
    shade = sh_shading(normals, params.light)
    if params.albedo.dim() == 2:  # texture-space coefficients
        if getattr(albedo_model, "kind", None) != "texture":
            raise UsageError(f"albedo holds {params.albedo.shape[1]} texture-space coefficients but no texture "
                             "space was given; fix: pass the fit's albedo model (fitter.albedo)")
        extra = torch.cat([shade, normals], -1) if maps else shade
        out_r = render_textured(screen, faces, albedo_model, params.albedo, extra, res, res, cull_back, frags, cover)
    else:
        colors = params.albedo * shade
        if maps:  # B x V x 9: colour, shading, normal
            colors = torch.cat([colors, shade, normals], dim=-1)
        out_r = render_mesh(screen, faces, colors, res, res, cull_back=cull_back, frags=frags,
                            cover=cover)  # premultiplied by the soft alpha
    alpha = out_r["alpha"]
    image = out_r["image"][:, :3]
    geometry = dict(pred)
    pred.update(
        image=image if background is None else image + (1 - alpha) * background,
        alpha=alpha,
        **({"shading": out_r["image"][:, 3:6], "normals": out_r["image"][:, 6:9]} if maps else {}),
        depth=out_r["depth"],
        pix_to_face=out_r["pix_to_face"],
        screen=screen,
        fixed={"pred": geometry, "screen": screen, "normals": normals, "frags": out_r["frags"],
               "cover": out_r["cover"]},
    )
    return pred


def render_textured(screen: Tensor, faces: Tensor, albedo_model, coeffs: Tensor, shade: Tensor,
                    height: int, width: int, cull_back: bool = False, frags=None, cover=None) -> dict:
    """Render a texture-space albedo under per-vertex shading.

    screen: B x V x 3 screen-space vertices, faces: F x 3, albedo_model: a TextureAlbedo,
    coeffs: B x K, shade: B x V x C with the SH irradiance per vertex in its first 3 channels
    (further channels, e.g. normals, are interpolated alongside). Each covered pixel gets the
    albedo sampled from the texture at its UV times the irradiance interpolated from the hit
    triangle's corners (Gouraud shading, as in the per-vertex path: cheap, and on FLAME's
    dense mesh the irradiance varies slowly); antialiasing and compositing as render_mesh.
    Returns render_mesh's dict with image B x (3 + C) x H x W: colour, then the interpolated
    `shade` channels, premultiplied by the soft alpha. cull_back, frags, cover: as render_mesh's.
    """
    frags = rasterize(screen, faces, height, width, cull_back) if frags is None else frags
    albedo = albedo_model.to(screen.device).sample(coeffs, frags)  # B x 3 x H x W, 0 where empty
    maps = interpolate(shade, faces, frags).permute(0, 3, 1, 2)  # B x C x H x W
    return composite_pixels(screen, faces, frags, torch.cat([albedo * maps[:, :3], maps], dim=1), cover=cover)


def face_mask_polygon(landmarks: np.ndarray, forehead: float = 0.35) -> np.ndarray:
    """Polygon (N, 2) around the face from 68 landmarks: the jaw contour, then the brows lifted
    by `forehead` x (chin-to-brow height) to take in the forehead."""
    contour = landmarks[0:17]
    brows = landmarks[26:16:-1].copy()  # 26..17, right to left so the polygon closes
    height = landmarks[8, 1] - landmarks[17:27, 1].mean()
    brows[:, 1] -= forehead * height
    return np.concatenate([contour, brows], axis=0)
