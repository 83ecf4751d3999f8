"""Pictures of fits: a fit.npz rendered alone or on its photo, with an optional extra yaw."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from priors.errors import FlamefitError, UsageError
from priors.flame import FlameModel

from . import io
from .outputs import composite, render_on_photo, render_rgba, zoomed_out
from .params import FitParams, load_fit

BACKDROP = 40  # grey level behind renders without a photo
VIEW_ZOOM = 1.6  # square views show this many times the face crop, so the whole head fits


def with_yaw(params: FitParams, yaw_deg: float) -> FitParams:
    """Turn the head by yaw_deg about the vertical axis (after its fitted global rotation)."""
    if yaw_deg == 0:
        return params
    R = Rotation.from_rotvec(params.global_pose.detach().cpu().numpy().astype(np.float64))
    turned = Rotation.from_euler("y", yaw_deg, degrees=True) * R
    pose = torch.as_tensor(turned.as_rotvec(), dtype=params.global_pose.dtype, device=params.global_pose.device)
    return FitParams(**{**dict(params.items()), "global_pose": pose.reshape(params.batch, 3)})


def square_view(model: FlameModel, params: FitParams, size: int, grey: bool = True,
                zoom: float = VIEW_ZOOM) -> np.ndarray:
    """The fit's view (its crop, widened `zoom` times) at size x size over a dark backdrop -> uint8."""
    rgba = render_rgba(model, zoomed_out(params, zoom), size, grey=grey)
    return composite(np.full((size, size, 3), BACKDROP, np.uint8), rgba)


def fit_photo(fit_path: Path, extras: dict) -> np.ndarray | None:
    """The photo a fit was made from (path recorded in fit.npz or fit.json), or None if gone."""
    candidates = []
    if "image" in extras:
        candidates.append(Path(str(extras["image"])))
    report = Path(fit_path).with_name("fit.json")
    if report.is_file():
        try:
            candidates.append(Path(json.loads(report.read_text())["image"]))
        except (ValueError, KeyError):
            pass
    for path in candidates:
        if path.is_file():
            try:
                return io.read_image(path, max_side=100_000)
            except FlamefitError:
                return None
    return None


def check_model(extras: dict, model: FlameModel, fit_path) -> None:
    tag = str(extras.get("model", ""))
    if tag and tag != model.tag:
        raise UsageError(f"{fit_path}: fitted with model '{tag}', but the model in use is '{model.tag}'; "
                         "fix: pass the same --model")
    if "vertices" in extras and extras["vertices"].shape[0] != model.n_verts:
        raise UsageError(f"{fit_path}: {extras['vertices'].shape[0]} vertices, the model has {model.n_verts}; "
                         "fix: pass the model it was fitted with (--model)")


def load_fit_for(model: FlameModel, fit_path) -> tuple[FitParams, dict]:
    params, extras = load_fit(fit_path, device=model.faces.device)
    check_model(extras, model, fit_path)
    if params.shape.shape[1] != model.n_shape or params.exp.shape[1] != model.n_exp:
        raise UsageError(f"{fit_path}: {params.shape.shape[1]} shape / {params.exp.shape[1]} expression "
                         f"coefficients, the model has {model.n_shape} / {model.n_exp}; fix: use the same model")
    return params, extras


def render_fit_file(fit_file, out, yaw: float = 0.0, size: int = 512, background: str = "none",
                    model=None) -> Path:
    """`cli.py render`: grey geometry in the fit's view (background none), or the fitted
    appearance on the original photo (background photo; needs the photo and yaw 0)."""
    from .fit import load_flame

    flame = load_flame(model)
    params, extras = load_fit_for(flame, fit_file)
    params = with_yaw(params, yaw)
    if background == "photo":
        photo = fit_photo(Path(fit_file), extras)
        if photo is None or "crop_box" not in extras:
            raise UsageError(f"{fit_file}: the photo it was fitted from is not found; fix: use --background none")
        image = render_on_photo(flame, params, photo, extras["crop_box"])
    else:
        image = square_view(flame, params, size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    io.write_png(out, image)
    return out
