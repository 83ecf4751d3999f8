"""Remake the README's pictures: `python -m bench.gallery` -> fitter/samples/gallery/*.png.

Fits the bundled sample photo, fits a synthetic source face (open jaw, strong expression,
exact landmark file), swaps the source's expression onto the photo, renders a jaw-sweep
animation frame and a 30-degree view. Everything goes through the same library calls as
the CLI.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

from fitter import io
from fitter.edits import animation_params, load_source, run_transfer, write_animation, write_transfer
from fitter.fit import fit_images, load_flame
from fitter.outputs import write_fit_outputs
from fitter.views import render_fit_file

from .synthetic import random_params, render_photo, write_case

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "fitter" / "samples" / "astronaut.png"
GALLERY = ROOT / "fitter" / "samples" / "gallery"


def shrink(src: Path, dst: Path, height: int = 360) -> None:
    img = io.read_image(src, max_side=100_000)
    w = round(img.shape[1] * height / img.shape[0])
    io.write_png(dst, cv2.resize(img, (w, height), interpolation=cv2.INTER_AREA))


def main() -> None:
    GALLERY.mkdir(parents=True, exist_ok=True)
    model = load_flame(None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        [fit] = fit_images([SAMPLE], recipe="default", model=model)
        target_dir = write_fit_outputs(tmp / "fits", fit, model)
        shrink(target_dir / "overlay.png", GALLERY / "fit_overlay.png")

        rng = np.random.default_rng(3)
        p = random_params(model, rng, yaw_deg=10.0)
        p.exp = p.exp * 1.5
        p.jaw_pose = torch.tensor([[0.3, 0.0, 0.0]])
        image, lmk = render_photo(model, p, rng)
        src_photo = write_case(tmp / "src", "source", image, lmk)
        [src_fit] = fit_images([src_photo], recipe="default", model=model, landmarks=tmp / "src", detector="file")
        source_dir = write_fit_outputs(tmp / "fits", src_fit, model)

        src = load_source(source_dir / "fit.npz", model)
        tgt = load_source(target_dir / "fit.npz", model)
        result = run_transfer(model, src, tgt, mode="swap")
        write_transfer(tmp / "transfer", model, src, tgt, result)
        shrink(tmp / "transfer" / "transfer.png", GALLERY / "transfer.png", height=480)

        frames = animation_params(tgt, [src], yaw=False, jaw=True)
        write_animation(tmp / "anim", model, tgt, frames)
        shutil.copy(tmp / "anim" / "frames" / f"{len(frames) - 1:04d}.png", GALLERY / "animate_frame.png")

        render_fit_file(target_dir / "fit.npz", GALLERY / "render_yaw30.png", yaw=30, size=320)


if __name__ == "__main__":
    main()
