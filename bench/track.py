"""Tracking benchmark: `python -m bench.track [--json] [--frames 48] [--size 512] [--skip detector]`.

Renders a synthetic clip of one random stand-in face through a fixed pinhole camera (the default
field of view, principal point at the centre): the head turns +-25 degrees and nods, the expression
moves through random keyframes, the jaw opens and closes. The frames are painted as bench.fit's test
faces are (bench.synthetic.render_pinhole: its own camera and OpenCV rasterizer, painted eyes, brows
and lips, a cluttered background, blur), with fresh sensor noise per frame, so that a detector sees a
face. Tracks it twice, from the true landmarks (files) and from the detector, and reports per run: seconds
per frame and the same as a multiple of R (bench.render's 224 x 224 batch-1 forward + backward, the
mean of its measures just before and just after each track), jitter (mean norm of the fitted
landmarks' second difference over frames) against the true motion's own, the mean face-vertex error
over frames (mm, similarity-aligned, bench.synthetic's face region), the identity error (neutral
shape against the true one, mm), and track.json's `detections` (the faces' exposure, whether the tracker
used its brightened pass).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.synthetic import (Pinhole, face_error_mm, face_region, plausible_expression, random_params, render_pinhole,
                             true_vertices)
from fitter import io
from fitter.camera import default_focal_px
from fitter.params import FitParams
from fitter.track import landmark_jitter

FPS = 25.0


def smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def clip_params(model, frames: int, size: int, seed: int = 0, yaw_deg: float = 25.0) -> list[FitParams]:
    """Per-frame true parameters (batch 1 each) of the benchmark's motion (see the module docstring)."""
    rng = np.random.default_rng(seed)
    base = random_params(model, rng, yaw_deg=0.0)
    # keys drawn as bench.fit's faces are (lips never crossed); at zero pose the lips' points are linear
    # in the code, so the blends between two plausible keys are plausible too
    keys = [np.zeros(model.n_exp)] + [plausible_expression(model, rng, 0.6, base.shape[0].numpy()) for _ in range(3)]
    focal = default_focal_px(size, size) / (size / 2.0)
    out = []
    for k in range(frames):
        u = k / max(frames - 1, 1)
        p = base.detach()
        p.global_pose = torch.tensor([[0.15 * np.sin(4 * np.pi * u), np.deg2rad(yaw_deg) * np.sin(2 * np.pi * u),
                                       0.03 * np.sin(2 * np.pi * u)]], dtype=torch.float32)
        p.jaw_pose = torch.tensor([[0.25 * max(0.0, np.sin(3 * np.pi * u)) ** 2, 0.0, 0.0]], dtype=torch.float32)
        seg = min(int(u * (len(keys) - 1)), len(keys) - 2)
        w = smoothstep(np.asarray(u * (len(keys) - 1) - seg))
        p.exp = torch.as_tensor(((1 - w) * keys[seg] + w * keys[seg + 1])[None], dtype=torch.float32)
        s = 5.0  # the face about half the frame's height: room to turn and nod
        p.cam = torch.tensor([[s, 0.01 * np.sin(2 * np.pi * u), 0.0, focal, 0.0, 0.0]], dtype=torch.float32)
        out.append(p)
    return out


def clip_camera(params: FitParams, size: int) -> Pinhole:
    """bench.synthetic's pinhole test camera for a frame's true camera (the fit's pinhole cam 1 x 6:
    s, tx, ty, focal in half-frame units, principal point 0): camera space = model + (tx, ty, -focal / s)."""
    s, tx, ty, f = (float(v) for v in params.cam[0, :4])
    return Pinhole(focal=f * size / 2.0, cx=size / 2.0, cy=size / 2.0, t=np.array([tx, ty, -f / s]), size=size)


def render_clip(model, params: list[FitParams], size: int, seed: int = 0, noise: float = 0.01):
    """Frames (uint8 size x size x 3) and true landmarks (68 x 2 pixels, dynamic contour): every frame
    painted by render_pinhole with the same face colours and background (one seed), then its own
    sensor noise (sd `noise` of the full range)."""
    frames, lmks = [], []
    for k, p in enumerate(params):
        out = render_pinhole(model, p, clip_camera(p, size), np.random.default_rng(seed + 1), noise=0.0)
        grain = np.random.default_rng((seed, k)).normal(0.0, 255.0 * noise, out["image"].shape)
        frames.append(np.clip(out["image"] + grain, 0, 255).round().astype(np.uint8))
        lmks.append(out["landmarks2d"])
    return frames, np.stack(lmks)


def write_clip(folder: Path, frames, landmarks=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, img in enumerate(frames):
        io.write_png(folder / f"{k:04d}.png", img)
        if landmarks is not None:
            io.write_landmarks(folder / f"{k:04d}.npy", landmarks[k].astype(np.float32))
    return folder


def evaluate(model, track, truth: list[FitParams], true_lmk: np.ndarray, region: np.ndarray) -> dict:
    a = track.arrays
    errs = []
    for k, p in enumerate(truth):
        fit = FitParams(**{**dict(p.items()), "shape": torch.as_tensor(a["shape"])[None],
                           **{n: torch.as_tensor(a[n][k])[None] for n in ("exp", "global_pose", "neck_pose",
                                                                           "jaw_pose", "eye_pose")}})
        errs.append(face_error_mm(true_vertices(model, fit), true_vertices(model, p), region))
    zero = lambda p: FitParams(**{**dict(p.items()), **{n: torch.zeros_like(getattr(p, n))  # noqa: E731
                                                         for n in ("exp", "global_pose", "neck_pose", "jaw_pose",
                                                                   "eye_pose")}})
    ident = zero(FitParams(**{**dict(truth[0].items()), "shape": torch.as_tensor(a["shape"])[None]}))
    id_err = face_error_mm(true_vertices(model, ident), true_vertices(model, zero(truth[0])), region)
    fitted = a["landmarks2d"]
    rmse = np.sqrt(((fitted - true_lmk) ** 2).sum(-1).mean(-1))
    ok = a["frame_ok"]
    return {"face_error_mm": round(float(np.mean(errs)), 3), "face_error_mm_worst": round(float(np.max(errs)), 3),
            "face_error_mm_frames_ok": round(float(np.mean(np.array(errs)[ok])), 3) if ok.any() else None,
            "identity_error_mm": round(id_err, 3), "jitter_px": round(landmark_jitter(fitted), 4),
            "true_jitter_px": round(landmark_jitter(true_lmk), 4),
            "jitter_ratio": round(landmark_jitter(fitted) / landmark_jitter(true_lmk), 3),
            "landmark_rmse_to_truth_px": round(float(rmse.mean()), 3), "frames_ok": int(a["frame_ok"].sum())}


def write_gif(path: Path, model, track, folder: Path, every: int = 2, height: int = 200, fps: float = FPS) -> Path:
    """The overlay (input | fitted head) of a track as a small looping GIF."""
    import cv2
    import imageio.v2 as imageio

    from fitter.track import overlay_frames

    frames = [cv2.resize(f, (round(f.shape[1] * height / f.shape[0]), height), interpolation=cv2.INTER_AREA)
              for k, f in enumerate(overlay_frames(model, track, io.FrameSource(folder))) if k % every == 0]
    imageio.mimsave(path, frames, duration=1000.0 * every / fps, loop=0)
    return path


def run(frames: int = 48, size: int = 512, skip=(), seed: int = 0, overrides=(), gif: Path | None = None) -> dict:
    from bench.fit import measure_R
    from fitter.fit import load_flame
    from fitter.track import track_video

    model = load_flame(None)
    region = face_region(model)
    truth = clip_params(model, frames, size, seed)
    images, true_lmk = render_clip(model, truth, size, seed)
    results, r_all = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_clip(Path(tmp) / "clip", images)
        lmk_dir = Path(tmp) / "lmk"
        lmk_dir.mkdir()
        for k, lmk in enumerate(true_lmk):
            io.write_landmarks(lmk_dir / f"{k:04d}.npy", lmk.astype(np.float32))
        runs = [("true landmarks", lmk_dir), ("detector", None)]
        for name, lmk in runs:
            if name.split()[0] in skip:
                continue
            r_before = measure_R(model, repeats=10)
            start = time.perf_counter()
            track = track_video(folder, Path(tmp) / f"out-{name.split()[0]}", model=model, landmarks=lmk,
                                overrides=overrides)
            seconds = time.perf_counter() - start
            r_ms = (r_before + measure_R(model, repeats=10)) / 2  # the machine's speed drifts: R around the run
            r_all.append(r_ms)
            row = {"input": name, "frames": frames, "size": size, "s_per_frame": round(seconds / frames, 3),
                   "R_ms": round(r_ms, 2), "R_per_frame": round(seconds / frames * 1000 / r_ms, 1)}
            row.update(evaluate(model, track, truth, true_lmk, region))
            row.update(track.report["detections"])  # the faces' exposure; whether a brightened pass was used
            results.append(row)
            if gif is not None and lmk is not None:
                write_gif(gif, model, track, folder)
    r_mean = round(float(np.mean(r_all)), 2) if r_all else None
    return {"results": results, "R_ms": r_mean, "threads": torch.get_num_threads(), "model": model.tag,
            "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.track", description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", default="", help="comma list: true, detector")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override KEY=VALUE")
    parser.add_argument("--gif", type=Path, default=None, help="write the true-landmark track's overlay as a GIF")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    record = run(args.frames, args.size, tuple(s for s in args.skip.split(",") if s), args.seed, args.overrides,
                 args.gif)
    if args.json:
        print(json.dumps(record))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bench.track: {record['model']}, R = {record['R_ms']} ms, {record['threads']} threads")
    cols = ["input", "frames", "s_per_frame", "R_per_frame", "jitter_ratio", "face_error_mm", "identity_error_mm",
            "landmark_rmse_to_truth_px", "frames_ok"]
    for c in cols:
        table.add_column(c, justify="right")
    for r in record["results"]:
        table.add_row(*(str(r[c]) for c in cols))
    Console().print(table)


if __name__ == "__main__":
    main()
