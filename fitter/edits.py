"""Transfer and animation runs: get fits (from fit.npz or by fitting photos), edit them with
fitter.transfer, and write the contract's outputs (transfer.npz, mesh.obj, transfer.png;
frames/NNNN.png and animation.gif)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from priors.errors import FlamefitError, UsageError
from priors.flame import FlameModel

from . import detect, io
from . import transfer as tr
from .fit import fit_images
from .albedo import texture_model_for
from .outputs import composite, render_on_photo, render_rgba, write_mesh, zoomed_out
from .params import FitParams, save_fit
from .synth import model_output, synthesize
from .views import BACKDROP, VIEW_ZOOM, fit_photo, load_fit_for, square_view

FRAME_SIZE = 384


@dataclass
class FitSource:
    """A fit with what is needed to draw it: its photo and crop box (original pixels), if known."""

    name: str
    params: FitParams  # batch of 1
    model_tag: str
    photo: np.ndarray | None
    crop_box: np.ndarray | None
    resolution: int = 224


def load_source(spec, model: FlameModel, recipe: str = "default", detector: str = "auto",
                device: str = "cpu", progress=None) -> FitSource:
    """A fit.npz is loaded; anything else is taken as a photo and fitted with `recipe`."""
    path = Path(spec)
    if path.suffix == ".npz":
        params, extras = load_fit_for(model, path)
        box = extras.get("crop_box")
        return FitSource(path.parent.name or path.stem, params, str(extras.get("model", model.tag)),
                         fit_photo(path, extras), None if box is None else np.asarray(box, np.float64))
    outcome = fit_images([path], recipe=recipe, model=model, detector=detector, device=device,
                         progress=progress)[0]
    if isinstance(outcome, FlamefitError):
        raise outcome
    t = outcome.target
    return FitSource(path.stem, outcome.params, outcome.model_tag, io.read_image(path, max_side=100_000),
                     t.box / t.scale, t.crop.shape[0])


def picture(model: FlameModel, src: FitSource, params: FitParams | None = None, grey: bool = False,
            size: int = FRAME_SIZE) -> np.ndarray:
    """params (default the source's own) drawn in the source's camera: on its photo when known."""
    params = src.params if params is None else params
    if src.photo is not None and src.crop_box is not None:
        return render_on_photo(model, params, src.photo, src.crop_box, grey=grey, opacity=0.85 if grey else 1.0)
    return square_view(model, params, size, grey=grey)


def stack_rows(rows: list[np.ndarray]) -> np.ndarray:
    """Stack images vertically, padding narrower rows with the backdrop grey."""
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=BACKDROP) for r in rows]
    return np.concatenate(padded, axis=0)


# ----------------------------------------------------------------------------- transfer
@dataclass
class TransferResult:
    params: FitParams
    vertices: np.ndarray  # V x 3 model space
    alphas: dict[str, float] | None
    mode: str


def run_transfer(model: FlameModel, source: FitSource, target: FitSource, mode: str = "swap",
                 mix_spec: str | None = None, regions: str | None = None, eyes: bool = False) -> TransferResult:
    tr.check_compatible(target.params, source.params, target.model_tag, source.model_tag)
    alphas = None
    if mode == "swap":
        params = tr.swap(target.params, source.params, eyes=eyes)
    elif mode == "mix":
        if not mix_spec:
            raise UsageError('--mode mix needs --mix SPEC, e.g. --mix "exp.coarse=1,jaw=0.5"')
        alphas = tr.parse_mix_spec(mix_spec)
        params = tr.mix(target.params, source.params, alphas)
    elif mode == "optimize":
        alphas, params = tr.optimize_mix(model, target.params, source.params)
    else:
        raise UsageError(f"--mode {mode}: use swap, mix or optimize")
    if regions:
        # only the named regions take the (swapped/mixed) expression; the rest stays T's
        params, verts = tr.regional_transfer(model, target.params, params, regions)
        vertices = verts[0]
    else:
        with torch.no_grad():
            vertices = model_output(model, params).vertices[0]
    return TransferResult(params, vertices.detach().cpu().numpy(), alphas, mode)


def write_transfer(out_dir, model: FlameModel, source: FitSource, target: FitSource, result: TransferResult) -> Path:
    out_dir = Path(out_dir)
    with io.atomic_dir(out_dir) as tmp:
        res = target.resolution
        with torch.no_grad():
            lmk = synthesize(model, result.params, res, render=False)["landmarks2d"][0].cpu().numpy()
            lmk_t = synthesize(model, target.params, res, render=False)["landmarks2d"][0].cpu().numpy()
        extras = {"vertices": result.vertices.astype(np.float32), "model": model.tag, "recipe": result.mode}
        if target.crop_box is not None:
            extras["landmarks2d"] = detect.from_crop(lmk, target.crop_box, res).astype(np.float32)
            extras["landmarks2d_target"] = detect.from_crop(lmk_t, target.crop_box, res).astype(np.float32)
            extras["crop_box"] = target.crop_box.astype(np.float32)
        if target.photo is not None:
            extras["image_size"] = np.array(target.photo.shape[:2], dtype=np.int64)
        if result.alphas is not None:
            extras["alphas"] = np.array([result.alphas.get(k, 0.0) for k in tr.LAYERS], np.float32)
            extras["alpha_layers"] = np.array(tr.LAYERS)
        save_fit(tmp / "transfer.npz", result.params, extras)
        texture = texture_model_for(model, result.params.albedo, None) if result.params.albedo.dim() == 2 else None
        write_mesh(tmp / "mesh.obj", result.vertices, model, result.params, texture)
        top = [picture(model, source), picture(model, target), picture(model, target, result.params)]
        bottom = [picture(model, source, grey=True), picture(model, target, grey=True),
                  picture(model, target, result.params, grey=True)]
        io.write_png(tmp / "transfer.png", stack_rows([io.hstack_images(top), io.hstack_images(bottom)]))
    return out_dir


# ----------------------------------------------------------------------------- animation
def animation_params(target: FitSource, expressions: list[FitSource], yaw: bool, jaw: bool) -> list[FitParams]:
    frames = tr.expression_sequence(target.params, [e.params for e in expressions])
    if yaw:
        frames += tr.yaw_sweep(target.params)
    if jaw:
        frames += tr.jaw_sweep(target.params)
    if not frames:
        raise UsageError("animate: nothing to draw; fix: give --expressions, --yaw-sweep or --jaw-sweep")
    return frames


def frame_image(model: FlameModel, target: FitSource, params: FitParams, size: int = FRAME_SIZE) -> np.ndarray:
    """One frame: the fitted appearance over T's photo crop (or the backdrop) | grey geometry."""
    if target.photo is not None and target.crop_box is not None:
        box = np.array([*target.crop_box[:2], target.crop_box[2] * VIEW_ZOOM])
        backdrop = (detect.crop_image(target.photo, box, size) * 255).round().astype(np.uint8)
    else:
        backdrop = np.full((size, size, 3), BACKDROP, np.uint8)
    look = composite(backdrop, render_rgba(model, zoomed_out(params, VIEW_ZOOM), size))
    return np.concatenate([look, square_view(model, params, size)], axis=1)


def write_animation(out_dir, model: FlameModel, target: FitSource, frames: list[FitParams], fps: int = 10,
                    progress=None) -> Path:
    import imageio.v2 as imageio

    out_dir = Path(out_dir)
    with io.atomic_dir(out_dir) as tmp:
        (tmp / "frames").mkdir()
        images = []
        for i, params in enumerate(frames):
            img = frame_image(model, target, params)
            io.write_png(tmp / "frames" / f"{i:04d}.png", img)
            images.append(img)
            if progress:
                progress("frames", i + 1, len(frames), {})
        imageio.mimsave(tmp / "animation.gif", images, duration=1000.0 / fps, loop=0)
        if shutil.which("ffmpeg"):
            _write_mp4(tmp / "animation.mp4", images, fps)
    return out_dir


def _write_mp4(path: Path, images: list[np.ndarray], fps: int) -> None:
    """H.264 through the system ffmpeg (raw RGB frames on stdin)."""
    import subprocess

    h, w = images[0].shape[:2]
    cmd = ["ffmpeg", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
           "-r", str(fps), "-i", "-", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(cmd, input=b"".join(np.ascontiguousarray(i).tobytes() for i in images), check=True)
