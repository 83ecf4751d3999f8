"""Synthesis: parameters + the head model -> vertices, projected landmarks and a rendered image."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from priors.errors import UsageError
from priors.flame import FlameModel, FlameOutput, VertexSubset
from priors.mesh import decimate

from .camera import project, towards_camera
from .params import FitParams
from .render import composite_pixels, interpolate, rasterize, render_mesh
from .shading import sh_shading, vertex_normals


def model_output(model: FlameModel, params: FitParams, lean: bool = False, subset: VertexSubset | None = None):
    return model(params.shape, params.exp, params.global_pose, params.neck_pose, params.jaw_pose,
                 params.eye_pose, lean=lean, subset=subset)


@dataclass(frozen=True)
class RenderMesh:
    """Triangles over a subset of the model's vertices, each vertex evaluated exactly, that a fit
    renders instead of the model's whole mesh: the recipe's decimation (coarse_render_mesh) or the
    part that can show inside the face mask (visible_region). Landmarks and dense points do not
    change."""

    subset: VertexSubset  # the vertices the triangles use, and their rows of the model
    faces: Tensor  # F' x 3, indices into subset.ids: the triangles drawn
    normal_faces: Tensor  # the triangles the vertex normals sum over: `faces`, or more around their edge
    albedo_model: object = None  # a texture space's albedo model with its UV corners for these triangles


def coarse_render_mesh(model: FlameModel, n_faces: int, albedo_model=None) -> RenderMesh | None:
    """The model's mesh decimated to about n_faces triangles (UV seams kept for a texture-space
    albedo model), or None when the model has no more triangles than that."""
    faces = model.faces.cpu().numpy()
    if n_faces >= len(faces):
        return None
    texture = getattr(albedo_model, "kind", None) == "texture"
    coarse, uv = decimate(model.v_template.cpu().numpy(), faces, n_faces,
                          albedo_model.ft.cpu().numpy() if texture else None)
    ids, local = np.unique(coarse, return_inverse=True)
    dev = model.faces.device
    local = torch.as_tensor(local.reshape(-1, 3), device=dev)
    return RenderMesh(model.vertex_subset(torch.as_tensor(ids, device=dev)), local, local,
                      replace(albedo_model, ft=torch.as_tensor(uv, device=albedo_model.ft.device)) if texture else None)


def visible_region(model: FlameModel, params: FitParams, res: int, mask: Tensor, mesh: RenderMesh | None = None,
                   albedo_model=None, margin: float = 0.06, min_facing: float = -0.3) -> RenderMesh:
    """The triangles of `mesh` (default: the model's own) that can show inside the masks, as a
    RenderMesh of their own: those whose screen box meets the box of some image's mask (B x 1 x res x
    res, > 0; widened by margin x res pixels) while facing that image's camera (cosine above
    min_facing: a little below zero, for they are culled only while they face away). The fit's loss
    terms look at mask pixels only, so while the head moves less than the margins in a stage,
    rendering this region gives the same pixels there for less work."""
    with torch.no_grad():
        faces = model.faces if mesh is None else mesh.faces
        verts = model_output(model, params, subset=None if mesh is None else mesh.subset).vertices
        tri = project(verts, params.cam, res)[:, faces, :2]  # B x F x 3 x 2
        lo, hi = tri.amin(2), tri.amax(2)
        pad = margin * res
        meets = torch.ones(lo.shape[:2], dtype=torch.bool, device=lo.device)
        for axis, covered in ((0, (mask[:, 0] > 0).any(1)), (1, (mask[:, 0] > 0).any(2))):  # x: columns, y: rows
            at = torch.arange(res, device=lo.device, dtype=lo.dtype)
            first = torch.where(covered, at, torch.full_like(at, float(res))).amin(1)
            last = torch.where(covered, at + 1, torch.zeros_like(at)).amax(1)
            meets &= (hi[..., axis] >= (first - pad)[:, None]) & (lo[..., axis] <= (last + pad)[:, None])
        c = verts[:, faces]  # B x F x 3 x 3
        normal = torch.nn.functional.normalize(torch.linalg.cross(c[:, :, 1] - c[:, :, 0], c[:, :, 2] - c[:, :, 0]),
                                               dim=-1)
        facing = (normal * towards_camera(c.mean(2), params.cam)).sum(-1)
        keep = torch.nonzero((meets & (facing > min_facing)).any(0)).squeeze(1)
    # the vertex normals of the region's corners need every triangle around them
    touched = torch.zeros(int(faces.max()) + 1, dtype=torch.bool, device=faces.device)
    touched[faces[keep]] = True
    ring = torch.nonzero(touched[faces].any(1)).squeeze(1)
    used, local = torch.unique(faces[ring], return_inverse=True)
    local = local.view(-1, 3)
    ids = used if mesh is None else mesh.subset.ids[used]
    texture = mesh.albedo_model if mesh is not None else albedo_model
    texture = replace(texture, ft=texture.ft[keep]) if getattr(texture, "kind", None) == "texture" else None
    return RenderMesh(model.vertex_subset(ids), local[torch.searchsorted(ring, keep)], local, texture)


def landmark_pred(out: FlameOutput, cam: Tensor, res: int) -> dict:
    """What a lean synthesis returns (see synthesize): the model's vertices and points, and the points
    projected by `cam` into the crop (landmarks2d, landmarks2d_static, dense2d when the model has
    dense points)."""
    pred = {"vertices": out.vertices, "landmarks2d": project(out.landmarks3d, cam, res)[..., :2],
            "landmarks3d": out.landmarks3d, "landmarks2d_static": project(out.landmarks3d_full, cam, res)[..., :2]}
    if out.dense is not None:
        pred["dense2d"] = project(out.dense, cam, res)[..., :2]
    return pred


def synthesize(model: FlameModel, params: FitParams, res: int, render: bool = True,
               background: Tensor | None = None, lean: bool = False, albedo_model=None, maps: bool = True,
               cull_back: bool = False, fixed: dict | None = None, mesh: RenderMesh | None = None) -> dict:
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

    mesh: render this RenderMesh (coarse_render_mesh, visible_region) instead of the model's own
    mesh; `vertices`, `screen` and `pix_to_face` are then its.
    """
    if fixed is not None:
        pred, screen, normals = dict(fixed["pred"]), fixed["screen"], fixed["normals"]
        frags, cover = fixed["frags"], fixed["cover"]
    else:
        out = model_output(model, params, lean=lean and not render, subset=None if mesh is None else mesh.subset)
        pred = landmark_pred(out, params.cam, res)
        if not render:
            return pred
        screen = project(out.vertices, params.cam, res)
        normals = vertex_normals(out.vertices, model.faces if mesh is None else mesh.normal_faces)
        frags = cover = None
    faces, albedo = model.faces, params.albedo
    if mesh is not None:
        faces = mesh.faces
        if albedo.dim() == 2:
            albedo_model = mesh.albedo_model  # with the UV corners of the coarse triangles
        else:
            albedo = albedo[:, mesh.subset.ids]
    shade = sh_shading(normals, params.light)
    if albedo.dim() == 2:  # texture-space coefficients
        if getattr(albedo_model, "kind", None) != "texture":
            raise UsageError(f"albedo holds {params.albedo.shape[1]} texture-space coefficients but no texture "
                             "space was given; fix: pass the fit's albedo model (fitter.albedo)")
        extra = torch.cat([shade, normals], -1) if maps else shade
        out_r = render_textured(screen, faces, albedo_model, albedo, extra, res, res, cull_back, frags, cover)
    else:
        colors = albedo * shade
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
