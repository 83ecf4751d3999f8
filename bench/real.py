"""Real-photo benchmark: `python -m bench.real DIR [DIR ...] [--json] [--recipes default]`.

Fits every image of DIR that has a `<stem>.pts` label with the default detector (the labels are
never given to the fit) and scores the fitted landmarks and the detector's own points
(FitResult.landmarks2d_target) against the labels:

- AFLW2000-3D protocol (a folder with `yaw.json`, or --protocol aflw): the 68 points in the
  dataset's 3D convention (static jawline), NME = mean point error / sqrt(w * h) of the labels'
  bounding box, on the fit's `landmarks3d` (the model's fixed-contour landmarks; while FitResult
  has none, its `landmarks2d` stand in and the output says so), by |yaw| bin 0-30 / 30-60 / 60-90
  when yaw.json gives the yaw (degrees);
- 300-W protocol (otherwise, or --protocol 300w): the 2D (silhouette) convention, inter-ocular NME
  (outer eye corners, iBUG 36 and 45) on the fit's `landmarks2d`.

Both NMEs of every landmark set are kept per image; the protocol picks the headline one. An image
the detector misses counts as not fitted (its message is kept). Every NME is also broken down by point
group (jaw, brows, nose, eyes, mouth), and, when the model has a MediaPipe embedding, the fitted head is
scored a second time with its 68 points in the detector's convention (DetectorConvention) instead of the
model's own 68-point embedding. The jaw is also scored without the spacing of its points along the
jawline (jaw_outline_nme: the labelled jaw points' distance to the polyline through the predicted ones),
where landmark definitions differ most.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fitter import io
from fitter.fit import FIT_BATCH, fit_images, load_flame
from priors.errors import FlamefitError

from .synthetic import box_size, interocular, nme_box, nme_iod, yaw_bin

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BINS = ("0-30", "30-60", "60-90")
#: iBUG-68 point groups, for the per-group breakdown
GROUPS = {"jaw": range(0, 17), "brows": range(17, 27), "nose": range(27, 36), "eyes": range(36, 48),
          "mouth": range(48, 68)}


def labelled_images(folder: Path) -> list[tuple[Path, Path]]:
    """(image, .pts) pairs of a folder, sorted by name."""
    pairs = []
    for p in sorted(Path(folder).iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".pts").is_file():
            pairs.append((p, p.with_suffix(".pts")))
    return pairs


def read_yaws(folder: Path) -> dict[str, float]:
    """yaw.json {stem: yaw degrees}, or {} when absent."""
    f = Path(folder) / "yaw.json"
    return {k: float(v) for k, v in json.loads(f.read_text()).items()} if f.is_file() else {}


def protocol_for(folder: Path, protocol: str = "auto") -> str:
    if protocol != "auto":
        return protocol
    return "aflw" if (Path(folder) / "yaw.json").is_file() else "300w"


def fit_landmarks(result, protocol: str) -> tuple[np.ndarray, str]:
    """The fit's points the protocol scores, and the FitResult field they came from."""
    if protocol == "aflw":
        lmk3d = getattr(result, "landmarks3d", None)
        if lmk3d is not None:
            return np.asarray(lmk3d), "landmarks3d"
        return np.asarray(result.landmarks2d), "landmarks2d (FitResult has no landmarks3d yet)"
    return np.asarray(result.landmarks2d), "landmarks2d"


def group_nme(pred: np.ndarray, truth: np.ndarray, protocol: str) -> dict[str, float]:
    """The protocol's NME over each GROUPS group of points alone (same normaliser as the whole set's)."""
    nme = nme_box if protocol == "aflw" else nme_iod
    errors = {}
    for name, ids in GROUPS.items():
        only = np.array(truth, dtype=np.float64)
        only[list(ids)] = np.asarray(pred)[list(ids)]  # this group's errors alone, the same normaliser
        errors[name] = nme(only, truth) * len(truth) / len(ids)
    return errors


def polyline_distances(points: np.ndarray, line: np.ndarray) -> np.ndarray:
    """Distance of each of N points (N x 2) to the polyline through `line` (M x 2, M >= 2) -> N."""
    a, b = line[:-1][None], line[1:][None]  # 1 x (M-1) x 2 segments a -> b
    ab = b - a
    t = np.clip(((points[:, None] - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0.0, 1.0)
    return np.linalg.norm(points[:, None] - (a + t[..., None] * ab), axis=-1).min(1)


def jaw_outline_nme(pred: np.ndarray, truth: np.ndarray, protocol: str) -> float:
    """How far the labelled jaw points (iBUG 0-16) lie from the predicted jawline, the polyline through
    the predicted jaw points, in the protocol's normaliser: the outline's error without the spacing of
    the points along it (where landmark definitions differ most), beside the point-to-point jaw NME."""
    truth = np.asarray(truth, dtype=np.float64)
    d = polyline_distances(truth[:17], np.asarray(pred, dtype=np.float64)[:17])
    return float(d.mean() / (box_size(truth) if protocol == "aflw" else interocular(truth)))


class DetectorConvention:
    """The fitted head's 68 points in the MediaPipe detector's convention instead of the model's own
    68-point embedding: fitter.detect.MEDIAPIPE_TO_IBUG68 composed with the model's derived MediaPipe
    embedding (priors.dense_embedding.composed_landmarks; the 3D, static-jaw points), and for the 2D
    convention the detector's own silhouette step (detect.snap_jaw_to_silhouette) on the fitted head's
    MediaPipe points. A diagnostic: the same fitted geometry scored in the other convention separates
    what the landmark convention costs from what the fitted shape costs."""

    def __init__(self, model):
        from fitter import detect
        from priors import dense_embedding as DE

        self.emb = DE.dense_embedding_for(model, derive=False)
        template, self.faces = DE.model_mesh(model)
        self.lmk_faces, self.lmk_bary = DE.composed_landmarks(self.emb, detect.MEDIAPIPE_TO_IBUG68, template,
                                                              self.faces, DE.outer_faces(template, self.faces))

    def landmarks(self, result, protocol: str) -> np.ndarray:
        """68 x 2 original-image pixels: static jaw for "aflw", silhouette jaw for "300w"."""
        from fitter import detect
        from priors.dense_embedding import N_MESH, surface_points

        def pixels(face, bary):
            points = surface_points(np.asarray(result.vertices, np.float64), self.faces, face, bary)
            uvw = (points @ result.R.T + result.t) @ result.K.T
            return uvw[:, :2] / uvw[:, 2:]

        static = pixels(self.lmk_faces, self.lmk_bary)
        if protocol == "aflw":
            return static
        return detect.snap_jaw_to_silhouette(pixels(self.emb.faces, self.emb.bary)[:N_MESH], static)


def score_image(result, truth: np.ndarray, protocol: str, convention: DetectorConvention | None = None) -> dict:
    """NMEs of the fit (the protocol's landmark set, and landmarks2d) and of the detector's points, and
    both by point group (`fit_groups`, `detector_groups`); with `convention`, also the fitted head's
    points in the detector's convention (`fit_detconv_nme`, `fit_detconv_groups`)."""
    fit, used = fit_landmarks(result, protocol)
    det = np.asarray(result.landmarks2d_target)
    nme = nme_box if protocol == "aflw" else nme_iod
    out = {"fit_nme": nme(fit, truth), "detector_nme": nme(det, truth), "landmarks_used": used,
           "fit_groups": group_nme(fit, truth, protocol), "detector_groups": group_nme(det, truth, protocol),
           "fit_nme_box": nme_box(fit, truth), "fit_nme_iod": nme_iod(fit, truth),
           "fit2d_nme_box": nme_box(np.asarray(result.landmarks2d), truth),
           "detector_nme_box": nme_box(det, truth), "detector_nme_iod": nme_iod(det, truth),
           "fit_jaw_outline": jaw_outline_nme(fit, truth, protocol),
           "detector_jaw_outline": jaw_outline_nme(det, truth, protocol)}
    if convention is not None:
        conv = convention.landmarks(result, protocol)
        out.update(fit_detconv_nme=nme(conv, truth), fit_detconv_groups=group_nme(conv, truth, protocol))
    return out


def summarise(rows: list[dict]) -> dict:
    """Means of fit and detector NME over the fitted images, overall and by |yaw| bin."""
    ok = [r for r in rows if "error" not in r]
    mean = lambda key, rs: float(np.mean([r[key] for r in rs])) if rs else None  # noqa: E731
    out = {"images": len(rows), "fitted": len(ok), "fit_nme": mean("fit_nme", ok),
           "detector_nme": mean("detector_nme", ok)}
    whos = [w for w in ("fit", "detector", "fit_detconv") if ok and all(f"{w}_groups" in r for r in ok)]
    if whos:
        out["groups"] = {g: {w: float(np.mean([r[f"{w}_groups"][g] for r in ok])) for w in whos} for g in GROUPS}
    if ok and all("fit_detconv_nme" in r for r in ok):
        out["fit_detconv_nme"] = mean("fit_detconv_nme", ok)
    if ok and all("fit_jaw_outline" in r for r in ok):
        out["jaw_outline"] = {w: mean(f"{w}_jaw_outline", ok) for w in ("fit", "detector")}
    if any("yaw" in r for r in ok):
        out["by_yaw"] = {b: {"images": len(rs), "fit_nme": mean("fit_nme", rs),
                             "detector_nme": mean("detector_nme", rs)}
                         for b in BINS for rs in [[r for r in ok if r.get("yaw_bin") == b]]}
    return out


def evaluate_real(folder: Path, recipe: str = "default", model=None, protocol: str = "auto",
                  overlays: Path | None = None, overrides=(), R_ms: float | None = None,
                  batch_size: int = FIT_BATCH) -> dict:
    """Fit a labelled folder with the default detector; returns {folder, protocol, recipe, per_image,
    summary, seconds_per_image (wall, detection included), R_ms and R_per_image (when R_ms is given)}
    (NME as fractions, not %)."""
    from fitter.outputs import write_fit_outputs

    folder = Path(folder)
    flame = load_flame(model)
    proto = protocol_for(folder, protocol)
    pairs = labelled_images(folder)
    yaws = read_yaws(folder)
    try:
        convention = DetectorConvention(flame)
    except FlamefitError:  # no MediaPipe embedding for this model: the diagnostic column is left out
        convention = None
    start = time.perf_counter()
    results = fit_images([p for p, _ in pairs], recipe=recipe, model=flame, detector="auto", overrides=overrides,
                         batch_size=batch_size)
    wall = time.perf_counter() - start
    rows = []
    for (img, pts), r in zip(pairs, results, strict=True):
        row = {"image": img.name}
        if img.stem in yaws:
            row.update(yaw=yaws[img.stem], yaw_bin=yaw_bin(yaws[img.stem]))
        if isinstance(r, Exception):
            row["error"] = str(r)
        else:
            row.update(score_image(r, io.read_landmarks(pts), proto, convention), seconds=r.report["seconds"])
            if overlays is not None:
                write_fit_outputs(Path(overlays) / f"real-{recipe}", r, flame)
        rows.append(row)
    out = {"folder": str(folder), "protocol": proto, "recipe": recipe, "overrides": list(overrides),
           "batch": batch_size, "nme": "box sqrt(w*h)" if proto == "aflw" else "inter-ocular (36-45)",
           "seconds_per_image": wall / max(len(pairs), 1), "summary": summarise(rows), "per_image": rows}
    if R_ms:
        out["R_ms"] = R_ms
        out["R_per_image"] = out["seconds_per_image"] * 1000 / R_ms
    return out


def show(records: list[dict], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for rec in records:
        s = rec["summary"]
        pct = lambda x: "" if x is None else f"{100 * x:.2f}"  # noqa: E731
        used = {r.get("landmarks_used") for r in rec["per_image"] if "landmarks_used" in r}
        conv = "fit_detconv_nme" in s
        extra = ["fit, detector's convention %"] if conv else []
        t = Table("image", "yaw", "fit NME %", "detector NME %", "s", *extra,
                  title=f"{rec['folder']}: {rec['protocol']} protocol, NME {rec['nme']}, recipe {rec['recipe']}, "
                        f"fit points: {', '.join(sorted(used))}")
        for r in rec["per_image"]:
            yaw = f"{r['yaw']:.1f}" if "yaw" in r else ""
            if "error" in r:
                t.add_row(r["image"], yaw, "not fitted", r["error"][:60], "")
            else:
                t.add_row(r["image"], yaw, pct(r["fit_nme"]), pct(r["detector_nme"]), f"{r['seconds']:.1f}",
                          *([pct(r["fit_detconv_nme"])] if conv else []))
        per = f"{rec['seconds_per_image']:.1f}" + (f" ({rec['R_per_image']:.0f} R)" if "R_per_image" in rec else "")
        t.add_row(f"mean ({s['fitted']}/{s['images']} fitted)", "", pct(s["fit_nme"]), pct(s["detector_nme"]), per,
                  *([pct(s["fit_detconv_nme"])] if conv else []))
        for b, v in s.get("by_yaw", {}).items():
            t.add_row(f"|yaw| {b} ({v['images']})", "", pct(v["fit_nme"]), pct(v["detector_nme"]), "")
        for g, v in s.get("groups", {}).items():
            t.add_row(f"{g} points (mean)", "", pct(v["fit"]), pct(v["detector"]), "",
                      *([pct(v["fit_detconv"])] if conv else []))
        if "jaw_outline" in s:
            v = s["jaw_outline"]
            t.add_row("jaw points to the jawline", "", pct(v["fit"]), pct(v["detector"]), "", *([""] if conv else []))
        console.print(t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--recipes", default="default")
    ap.add_argument("--protocol", choices=["auto", "aflw", "300w"], default="auto")
    ap.add_argument("--overlays", type=Path, default=None, help="write each fit's outputs (overlay.png) here")
    ap.add_argument("--model", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override, as `cli.py fit --set` (e.g. detector_trust=0.3); repeatable")
    args = ap.parse_args(argv)
    from .fit import measure_R

    model = load_flame(args.model)
    R_ms = measure_R(model)
    records = [evaluate_real(f, rec, model, args.protocol, args.overlays, args.overrides, R_ms=R_ms)
               for rec in args.recipes.split(",") for f in args.folders]
    if args.json:
        print(json.dumps({"real": records, "R_ms": R_ms}))
    else:
        show(records)
    return records


if __name__ == "__main__":
    main()
