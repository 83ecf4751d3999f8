"""Deriving the MediaPipe 478-point embedding for the installed model: time per phase and a picture.

    python -m bench.dense_embedding [--out DIR] [--model PATH] [--check N]

Renders the model as priors.dense_embedding.derive_dense_embedding does, runs MediaPipe, solves, and
prints the seconds of each phase and their ratio to R (bench.render's 224^2 batch-1 forward+backward,
measured in the same run). Writes DIR/dense_embedding.png: the neutral head, frontal and turned, with
MediaPipe's contours (face oval, brows, eyes, lips, irises) drawn through the derived points. Nothing
is cached. --check N: on N bench.synthetic renders (random identity, expression, yaw +-30), MediaPipe's
478 points against the derived embedding's true projections, beside its 68 points against the true 68
(mean error over the outer-eye-corner distance).
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


def check(model, emb: DE.DenseEmbedding, n: int, seed: int = 11) -> list[dict]:
    """Per render: yaw, 68-point NME, dense NME (all valid points, weight-averaged, iris)."""
    from bench.synthetic import random_params, render_photo
    from fitter.camera import ortho_project
    from fitter.detect import detect_landmarks_dense

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        p = random_params(model, rng)
        image, lmk = render_photo(model, p, rng)
        lmk68, dense, weights = detect_landmarks_dense(image)
        with torch.no_grad():
            out = model(p.shape, p.exp, p.global_pose, p.neck_pose, p.jaw_pose, p.eye_pose)
            true = ortho_project(DE.dense_landmarks(out.vertices, model.faces, emb), p.cam, image.shape[0])
        true = true[0, :, :2].numpy()
        iod = np.linalg.norm(lmk[36] - lmk[45])
        err = np.linalg.norm(dense - true, axis=1) / iod
        w = weights * DE.dense_weights(emb)
        nme68 = float(np.linalg.norm(lmk68 - lmk, axis=1).mean() / iod)
        rows.append({"yaw": float(np.rad2deg(p.global_pose[0, 1])), "nme68": nme68,
                     "dense": float(err[emb.valid].mean()), "weighted": float((err * w).sum() / w.sum()),
                     "iris": float(err[DE.N_MESH:][emb.valid[DE.N_MESH:]].mean())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--check", type=int, default=0, metavar="N")
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
    if args.check:
        rows = check(model, emb, args.check)
        print("yaw     68-pt NME  dense NME  dense weighted  iris")
        for r in rows:
            print(f"{r['yaw']:6.1f}  {r['nme68']:9.4f}  {r['dense']:9.4f}  {r['weighted']:14.4f}  {r['iris']:.4f}")
        print("mean    " + "  ".join(f"{np.mean([r[k] for r in rows]):9.4f}" for k in ("nme68", "dense", "weighted",
                                                                                       "iris")))


if __name__ == "__main__":
    main()
