"""Detector accuracy on labelled photos: 68-point NME of `detect_landmarks` and whether every image is found.

    python -m bench.detect ../shared/data/real-visible ../shared/data/aflw-dev [--detector mediapipe]
    python -m bench.detect --fallbacks   # time of the first pass and of the retries, in R
    python -m bench.detect --turned 24   # stand-in renders turned 60-90 degrees, and the photo turned over

For each folder of images with iBUG `.pts` labels (flamefit's corner-origin pixels) it prints one
row per image and the mean: NME over the outer-eye-corner distance (36-45, the 300-W figure) and
over sqrt(w * h) of the labels' box (the AFLW2000-3D figure), plus the detection time. --fallbacks times
MediaPipe on the bundled photo (first pass), on it grey and small in a large canvas (found by the retries)
and on a blank image (every retry fails), as ratios to R (bench.render's 224^2 batch-1 forward+backward).
--turned N renders N stand-in test faces (bench.synthetic's pinhole photos) at |yaw| 60-90 degrees, where
MediaPipe finds some faces, misses others and lays some meshes on the ear or the wrong way round, and
adds the bundled photo turned by 0, 90, 180 and 270 degrees: per case whether a face was found, by which
attempt, and the box NME of its 68 points against the true ones (the renders' 3D convention); a find
with box NME over FALSE_FACE counts as a false face.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from fitter import io
from fitter.detect import detect_landmarks, detect_landmarks_dense
from priors.errors import NoFaceError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def nme(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(inter-ocular NME, box NME) of pred against truth, both 68 x 2."""
    err = np.linalg.norm(pred - truth, axis=1).mean()
    iod = np.linalg.norm(truth[36] - truth[45])
    w, h = truth.max(0) - truth.min(0)
    return float(err / iod), float(err / np.sqrt(w * h))


def labelled_images(folder: Path) -> list[tuple[Path, Path]]:
    return [(p, p.with_suffix(".pts")) for p in sorted(folder.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".pts").is_file()]


def run(folders: list[Path], detector: str = "mediapipe") -> list[dict]:
    rows = []
    for folder in folders:
        for image_path, pts in labelled_images(folder):
            image, scale = io.read_image_with_scale(image_path)
            truth = io.read_landmarks(pts)
            t0 = time.perf_counter()
            try:
                pred = detect_landmarks(image, detector) / scale
                found = True
            except NoFaceError:
                pred, found = None, False
            dt = time.perf_counter() - t0
            iod, box = nme(pred, truth) if found else (float("nan"), float("nan"))
            rows.append({"folder": folder.name, "image": image_path.name, "found": found, "nme_iod": iod,
                         "nme_box": box, "seconds": dt})
    return rows


def fallback_times(repeats: int = 3) -> dict:
    """Median seconds of detect_landmarks(., "mediapipe") per case, and of detect_landmarks_dense (the 68 and
    478 points with their weights, what a fit from the detector runs) on the photo; R in ms (same run)."""
    import cv2
    import torch

    from bench.render import time_case
    from priors.assets import load_model, resolve_model_path

    root = Path(__file__).resolve().parent.parent
    photo = io.read_image(root / "fitter" / "samples" / "astronaut.png")
    grey = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, (300, 300), interpolation=cv2.INTER_AREA)
    canvas = np.full((1800, 2400), 118, np.uint8)
    canvas[900:1200, 1500:1800] = small
    mp68 = lambda img: detect_landmarks(img, "mediapipe")  # noqa: E731
    cases = {"photo (first pass)": (mp68, photo),
             "photo, 68 + 478 points": (detect_landmarks_dense, photo),
             "small grey face, 1800x2400": (mp68, np.repeat(canvas[..., None], 3, 2)),
             "blank 480x640 (no face)": (mp68, np.full((480, 640, 3), 128, np.uint8))}
    model = load_model(resolve_model_path(None), require_landmarks=False)
    r_ms = time_case(model.v_template, torch.as_tensor(model.faces), 224, 1, torch.device("cpu"), 10)[0]
    detect_landmarks(photo, "mediapipe")  # load the detectors
    out = {}
    for name, (detect, img) in cases.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            try:
                detect(img)
            except NoFaceError:
                pass
            times.append(time.perf_counter() - t0)
        out[name] = float(np.median(times))
    return {"R_ms": r_ms, "seconds": out}


FALSE_FACE = 0.25  # box NME over which a found face is not the face (a good one is ~0.02-0.15 here)


def turned_cases(n: int, seed: int = 0):
    """(name, image, true 68 x 2) for n stand-in renders at |yaw| 60..90 (alternating sign) and the
    bundled photo turned by 0, 90, 180, 270 degrees (truth: its upright detection, turned)."""
    from bench.synthetic import random_params, random_pinhole, render_pinhole, whole_face_region
    from fitter.detect import rotation_matrix
    from fitter.fit import load_flame

    model = load_flame(None)
    region = whole_face_region(model)
    rng = np.random.default_rng(seed)
    for yaw in np.linspace(60.0, 90.0, n) * (-1.0) ** np.arange(n):
        params = random_params(model, rng, yaw_deg=float(yaw))
        r = render_pinhole(model, params, random_pinhole(model, params, rng, region=region), rng)
        yield f"render yaw {yaw:+.0f}", r["image"], r["landmarks3d"]
    photo = io.read_image(Path(__file__).resolve().parent.parent / "fitter" / "samples" / "astronaut.png")
    upright = detect_landmarks(photo, "mediapipe")
    for k in range(4):
        M, _ = rotation_matrix(90.0 * k, photo.shape[:2])
        yield f"photo turned {90 * k}", np.ascontiguousarray(np.rot90(photo, k)), upright @ M[:, :2].T + M[:, 2]


def turned(n: int, seed: int = 0) -> list[dict]:
    from fitter.detect import mediapipe_meshes_how, mesh_to_ibug68

    rows = []
    for name, image, truth in turned_cases(n, seed):
        meshes, how = mediapipe_meshes_how(image)
        row = {"case": name, "found": bool(meshes), "how": how, "nme_box": float("nan")}
        if meshes:
            row["nme_box"] = nme(mesh_to_ibug68(meshes[0][:, :2]), truth)[1]
        row["false"] = bool(meshes) and row["nme_box"] > FALSE_FACE
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="*", type=Path)
    ap.add_argument("--detector", default="mediapipe")
    ap.add_argument("--fallbacks", action="store_true", help="time the first pass and the retries")
    ap.add_argument("--turned", type=int, default=0, metavar="N", help="N renders turned 60-90 degrees")
    args = ap.parse_args()
    if args.turned:
        rows = turned(args.turned)
        for r in rows:
            flag = "FALSE " if r["false"] else ""
            print(f"{r['case']:18s} {str(r['found']):>5s} {r['nme_box']:7.3f} {flag}{r['how']}")
        for label, sel in (("renders", rows[:-4]), ("photo turned", rows[-4:])):
            good = [r["nme_box"] for r in sel if r["found"] and not r["false"]]
            print(f"{label}: {len(sel)} cases, found {sum(r['found'] for r in sel)}, false "
                  f"{sum(r['false'] for r in sel)}, box NME of the true finds "
                  f"{np.mean(good) if good else float('nan'):.3f}")
        return
    if args.fallbacks:
        rec = fallback_times()
        for name, s in rec["seconds"].items():
            print(f"{name:30s} {s:7.3f} s = {s * 1000 / rec['R_ms']:7.1f} R")
        print(f"R = {rec['R_ms']:.1f} ms")
        return
    rows = run(args.folders, args.detector)
    print(f"{'folder':14s} {'image':18s} {'found':>5s} {'NME iod':>8s} {'NME box':>8s} {'s':>6s}")
    for r in rows:
        print(f"{r['folder']:14s} {r['image']:18s} {str(r['found']):>5s} {r['nme_iod']:8.4f} {r['nme_box']:8.4f} "
              f"{r['seconds']:6.2f}")
    for folder in sorted({r["folder"] for r in rows}):
        sel = [r for r in rows if r["folder"] == folder]
        ok = [r for r in sel if r["found"]]
        print(f"{folder:14s} {'mean':18s} {len(ok):>2d}/{len(sel):<2d} {np.mean([r['nme_iod'] for r in ok]):8.4f} "
              f"{np.mean([r['nme_box'] for r in ok]):8.4f} {np.mean([r['seconds'] for r in sel]):6.2f}")


if __name__ == "__main__":
    main()
