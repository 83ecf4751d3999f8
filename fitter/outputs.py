"""Turning fits into the contract's files: fit.npz, mesh.obj, overlay.png, fit.json."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from priors.flame import FlameModel

from . import detect, io
from .albedo import TextureAlbedo, texture_model_for
from .camera import zoom_camera
from .params import FitParams, save_fit
from .shading import SH_CONSTANTS
from .synth import synthesize

PREVIEW_GREY = 0.72


def preview_light(batch: int, device=None) -> torch.Tensor:
    """A fixed soft key light from the upper front, for grey geometry previews: B x 9 x 3."""
    light = torch.zeros(batch, 9, 3, device=device)
    light[:, 0] = 0.75 / SH_CONSTANTS[0]
    light[:, 2] = 0.25 / SH_CONSTANTS[2]  # from above (+y)
    light[:, 3] = 0.45 / SH_CONSTANTS[3]  # from the front (+z)
    return light


def preview_params(params: FitParams) -> FitParams:
    """The same geometry and camera with grey albedo and the preview light."""
    albedo = torch.full((params.batch, params.albedo.shape[1] if params.albedo.dim() == 3 else 1, 3),
                        PREVIEW_GREY, device=params.shape.device)
    return FitParams(**{**dict(params.items()), "light": preview_light(params.batch, params.shape.device),
                        "albedo": albedo})


def render_rgba(model: FlameModel, params: FitParams, res: int, grey: bool = False,
                albedo_model=None) -> np.ndarray:
    """Render one fit (batch 1) at res x res -> float32 RGBA (res, res, 4) in [0, 1].
    Texture-space albedo renders with `albedo_model`, else with the installed texture space."""
    p = preview_params(params) if grey else params
    texture = None if grey else texture_model_for(model, params.albedo, albedo_model)
    with torch.no_grad():
        pred = synthesize(model, p, res, albedo_model=texture)
    rgb = pred["image"][0].permute(1, 2, 0).clamp(0, 1).cpu().numpy()
    alpha = pred["alpha"][0, 0].cpu().numpy()
    return np.dstack([rgb, alpha]).astype(np.float32)


def uncrop(rgba: np.ndarray, box: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Warp a crop-space RGBA render back onto an image of size (H, W)."""
    res = rgba.shape[0]
    M = detect.corner_to_cv2(detect.crop_matrix(box, res))
    h, w = size
    return cv2.warpAffine(rgba, M, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def composite(photo: np.ndarray, rgba: np.ndarray, opacity: float = 1.0) -> np.ndarray:
    """Alpha-composite a float RGBA layer over a uint8 photo -> uint8."""
    a = rgba[..., 3:4] * opacity
    out = photo.astype(np.float32) / 255.0 * (1 - a) + rgba[..., :3] * a
    return (out * 255).round().clip(0, 255).astype(np.uint8)


def zoomed_out(params: FitParams, factor: float) -> FitParams:
    """The same view through a crop `factor` times larger around the same centre (cam scale / factor)."""
    return FitParams(**{**dict(params.items()), "cam": zoom_camera(params.cam, factor)})


def render_on_photo(model: FlameModel, params: FitParams, photo: np.ndarray, crop_box: np.ndarray,
                    grey: bool = False, opacity: float = 1.0, expand: float = 2.0,
                    albedo_model=None) -> np.ndarray:
    """The fit drawn in its own camera onto its photo (crop_box in the photo's pixels). The render
    covers `expand` x the crop box, so the whole head shows, not just the face crop."""
    box = np.array([crop_box[0], crop_box[1], crop_box[2] * expand])
    res = int(np.clip(box[2], 256, 1024))
    rgba = uncrop(render_rgba(model, zoomed_out(params, expand), res, grey=grey, albedo_model=albedo_model),
                  box, photo.shape[:2])
    return composite(photo, rgba, opacity)


def overlay_panels(model: FlameModel, params: FitParams, target, lmk_fit: np.ndarray,
                   lmk_target: np.ndarray, albedo_model=None) -> np.ndarray:
    """input | render (fitted albedo and light) | grey geometry over the photo with landmarks
    (target green, fitted red). Landmarks in the working image's pixels."""
    photo = target.image
    panel_render = render_on_photo(model, params, np.full_like(photo, 40), target.box, albedo_model=albedo_model)
    panel_overlay = render_on_photo(model, params, photo, target.box, grey=True, opacity=0.75)
    radius = max(1, round(float(target.box[2]) / 80))  # by the face size: small faces keep visible points
    panel_overlay = io.draw_points(panel_overlay, lmk_target, color=(0, 255, 0), radius=radius)
    panel_overlay = io.draw_points(panel_overlay, lmk_fit, color=(255, 40, 40), radius=radius)
    return io.hstack_images([photo, panel_render, panel_overlay])


def vertex_albedo(params: FitParams) -> np.ndarray | None:
    if params.albedo.dim() == 3:
        return params.albedo[0].clamp(0, 1).cpu().numpy()
    return None


def write_mesh(path: Path, vertices: np.ndarray, model: FlameModel, params: FitParams,
               texture: TextureAlbedo | None = None, texture_name: str = "texture.png") -> None:
    """The posed mesh as OBJ: per-vertex albedo as vertex colours, or, with a texture space,
    its UV layout (vt/ft) + an .mtl next to it + the fit's texture as `texture_name` (PNG)."""
    path = Path(path)
    if texture is None:
        io.write_obj(path, vertices, model.faces.cpu().numpy(), colors=vertex_albedo(params))
        return
    io.write_png(path.parent / texture_name, texture.texture_image(params.albedo[:1]))
    io.write_obj(path, vertices, model.faces.cpu().numpy(), vt=texture.vt.cpu().numpy(),
                 ft=texture.ft.cpu().numpy(), texture_name=texture_name)


def write_fit_outputs(out_root: Path, result, model: FlameModel) -> Path:
    """Write DIR/<stem>/ for one FitResult atomically; returns the folder."""
    t = result.target
    final = Path(out_root) / t.stem
    with io.atomic_dir(final) as tmp:
        extras = {
            "vertices": result.vertices.astype(np.float32),
            "landmarks2d": result.landmarks2d,
            "landmarks2d_target": result.landmarks2d_target,
            "image_size": np.array(t.original_size, dtype=np.int64),
            "model": result.model_tag,
            "recipe": result.recipe_name,
            "image": str(t.path),
            "crop_box": (t.box / t.scale).astype(np.float32),  # cx, cy, size in original pixels
        }
        if result.K is not None:
            extras.update(K=result.K, R=result.R, t=result.t, landmarks3d=result.landmarks3d)
        texture = texture_model_for(model, result.params.albedo, getattr(result, "albedo_model", None))
        if texture is not None:
            extras["albedo_space"] = texture.describe()
        save_fit(tmp / "fit.npz", result.params, extras)
        write_mesh(tmp / "mesh.obj", result.vertices, model, result.params, texture)
        overlay = overlay_panels(model, result.params.to(model.faces.device), t,
                                 result.landmarks2d * t.scale, result.landmarks2d_target * t.scale,
                                 albedo_model=texture)
        io.write_png(tmp / "overlay.png", overlay)
        io.write_json(tmp / "fit.json", result.report)
    return final
