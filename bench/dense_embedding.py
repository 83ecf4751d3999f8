"""Deriving the MediaPipe 478-point embedding for the installed model: time per phase and a picture.

    python -m bench.dense_embedding [--out DIR] [--model PATH]

Renders the model as priors.dense_embedding.derive_dense_embedding does, runs MediaPipe, solves, and
prints the seconds of each phase and their ratio to R (bench.render's 224^2 batch-1 forward+backward,
measured in the same run). Writes DIR/dense_embedding.png: the neutral head, frontal and turned, with
MediaPipe's contours (face oval, brows, eyes, lips, irises) drawn through the derived points. Nothing
is cached.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from bench.render import time_case
from fitter import io
from fitter.fit import load_flame
from priors import dense_embedding as DE


def reference_ms(model) -> float:
    """R: bench.render's 224^2 batch-1 forward+backward (median ms)."""
    return time_case(model.v_template.cpu().numpy(), model.faces.cpu(), 224, 1, torch.device("cpu"), 10)[0]


def contour_picture(model, emb: DE.DenseEmbedding, scale: int = 2) -> np.ndarray:
    """Frontal and (25 yaw, 10 pitch) renders with the embedding's points joined along MediaPipe's contours
    (green) and irises (blue); invalid points are left out. Falls back to dots without mediapipe."""
    try:
        from mediapipe.python.solutions import face_mesh_connections as conn

        lines = [(conn.FACEMESH_CONTOURS, (0, 255, 0)), (conn.FACEMESH_IRISES, (0, 80, 255))]
    except ImportError:
        lines = []
    _, faces = DE.model_mesh(model)
    panels = []
    for view in DE.render_views(model, ((0.0, 0.0), (25.0, 10.0)), expression_sigma=0.0):
        pts = DE.surface_points(view.screen, faces, emb.faces, emb.bary)[:, :2] * scale
        img = np.ascontiguousarray(np.repeat(np.repeat(view.image, scale, 0), scale, 1))
        for edges, colour in lines:
            for a, b in edges:
                if emb.valid[a] and emb.valid[b]:
                    cv2.line(img, tuple(int(v) for v in pts[a]), tuple(int(v) for v in pts[b]), colour, 1,
                             cv2.LINE_AA)
        if not lines:
            img = io.draw_points(img, pts[emb.valid], (255, 0, 0), 1)
        h, w = img.shape[:2]
        panels.append(img[int(0.12 * h):int(0.82 * h), int(0.15 * w):int(0.85 * w)])
    return io.hstack_images(panels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    model = load_flame(args.model)
    R = reference_ms(model)
    t0 = time.perf_counter()
    views = DE.render_views(model)
    t1 = time.perf_counter()
    detections = [DE.mediapipe_detector(v.image, v) for v in views]
    t2 = time.perf_counter()
    template, faces = DE.model_mesh(model)
    outer = DE.outer_faces(template, faces)
    emb, spread = DE.solve_dense_embedding(template.astype(np.float64), faces,
                                           DE.eyeball_vertices(model.weights.cpu().numpy()), views, detections, outer)
    t3 = time.perf_counter()
    R_after = reference_ms(model)
    found = sum(d is not None for d in detections)
    print(f"model {model.name} ({model.n_verts} vertices), {len(views)} renders at {DE.RENDER_RES} px, "
          f"MediaPipe found the head in {found}")
    for name, s in (("render", t1 - t0), ("detect", t2 - t1), ("solve", t3 - t2), ("total", t3 - t0)):
        print(f"{name:7s} {s:6.1f} s  = {s * 1000 / R:7.0f} R")
    print(f"R = {R:.1f} ms before, {R_after:.1f} ms after")
    valid = emb.valid
    print(f"valid points {int(valid.sum())}/478 (iris {int(valid[DE.N_MESH:].sum())}/10); hit spread median "
          f"{np.median(spread[valid]) * 1000:.2f} mm, 90th percentile "
          f"{np.percentile(spread[valid], 90) * 1000:.2f} mm; "
          f"confidence median {np.median(emb.confidence[valid]):.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "dense_embedding.png"
    io.write_png(path, contour_picture(model, emb))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
