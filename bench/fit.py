"""Fit benchmark: `python -m bench.fit [--json] [--cases 12] [--recipes fast,default] [--skip ...] [--real DIR]`.

Test faces with known parameters (seeded; yaw spread over +-30 degrees, `--wide N` more at
+-35..45 and `--profile N` more at +-50..75, near profile, where MediaPipe's points degrade;
pitch/roll, expressions, jaw, coloured SH light, skin albedo with painted eyes, brows and lips,
cluttered backgrounds, blur and sensor noise) are rendered by bench.synthetic's own
pinhole camera and OpenCV rasterizer (not the fit's camera or renderer), the face 0.4-1.2 m
away and filling 40-60 % of the 512 px frame height. Sections (each can be skipped):

- pinhole:  fitted with their exact 68 landmarks given (dynamic contour, the fit's convention);
- detector: the same renders fitted as a user runs it, no landmarks given (`detector="auto"`);
- meanface: the mean face (zero shape, expression, jaw; posed like nothing) with no fit, for scale;
- oracle:   the landmark-only optimum, bench.synthetic.landmark_oracle (shape + expression by linear
            least squares from the 68 points with the TRUE camera and pose): the true points, and
            the detector's (when the detector section ran): what a fit from landmarks can reach;
- ortho:    (only with --ortho) the old generator: the fit's own orthographic camera and renderer;
- throughput, sgd, occlusion: images/s by batch size, Adam vs SGD, GridMask occlusion (pinhole cases);
- real:     `--real DIR` labelled photos, fit vs detector NME (see bench.real).

`--set KEY=VALUE` (repeatable) overrides the recipe for the recipe rows, as `cli.py fit --set` does.

Per recipe: mean and per-case face error (mm: mean vertex distance after similarity alignment
over the whole face region, bench.synthetic.whole_face_region; the older, inner region too),
landmark RMSE against the true points (px), s/image (wall, detection included) and R/image, with
R = bench.render's 224 px batch-1 forward+backward measured in the same run (before and after),
and per stage iterations and R/iteration per image (after one untimed warm-up fit per recipe:
the fixed cost of a process is bench.profile's). The recipe rows fit `--batch` images per
batched optimisation (default 8, as `cli.py fit` does; each image keeps its own parameters).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fitter.fit import FIT_BATCH, fit_images, fit_targets, load_flame, make_setup, prepare_target
from fitter.recipe import load_recipe

from .synthetic import (face_error_mm, face_region, grid_mask, landmark_oracle, nme_box, nme_iod, ortho_case,
                        random_params, random_pinhole, region_height, render_pinhole, whole_face_region, write_case)

SECTIONS = ("pinhole", "detector", "meanface", "oracle", "throughput", "sgd", "occlusion")
REGION_TEXT = ("whole face: neutral-template vertices facing the camera, above the jaw contour, between its ends "
               "(ears) and below brows + 0.45 x chin-to-brow height; eyeballs excluded")


@dataclass
class Case:
    name: str
    path: Path  # the PNG; <stem>.npy beside it holds the true landmarks2d
    vertices: np.ndarray  # V x 3 true posed vertices (model space)
    landmarks2d: np.ndarray  # 68 x 2 true, dynamic contour (original pixels)
    landmarks3d: np.ndarray  # 68 x 2 true, fixed contour
    info: dict  # yaw, distance, focal, fill
    params: object = None  # the true FitParams
    camera: object = None  # the true bench.synthetic.Pinhole (None for ortho renders)


def case_yaws(n: int, wide: int = 0, yaw_max: float = 30.0, profile: int = 0) -> list[float]:
    """n yaws evenly over +-yaw_max, then `wide` more alternating sign over 35..45 degrees and
    `profile` more over 50..75."""
    yaws = [-yaw_max + 2 * yaw_max * k / max(n - 1, 1) for k in range(n)] if n > 1 else [0.0] * n
    spread = lambda m, lo, hi: [(lo + (hi - lo) * k / max(m - 1, 1)) * (-1) ** k for k in range(m)]  # noqa: E731
    return yaws + spread(wide, 35, 45) + spread(profile, 50, 75)


# the test faces' groups in the summaries: the issue's cases, the wide ones, near profile (|yaw| upper bounds)
CASE_GROUPS = (("yaw30", 30.5), ("wide", 47.5), ("profile", 90.0))


def case_group(yaw: float) -> str:
    return next(name for name, top in CASE_GROUPS if abs(yaw) <= top)


def make_cases(model, n: int, folder: Path, seed: int = 0, occlude: bool = False, camera: str = "pinhole",
               wide: int = 0, region: np.ndarray | None = None, profile: int = 0) -> list[Case]:
    """Render the test faces (see the module docstring) into folder: <name>.png + <name>.npy."""
    rng = np.random.default_rng(seed)
    region = whole_face_region(model) if region is None else region
    cases = []
    for k, yaw in enumerate(case_yaws(n, wide, profile=profile)):
        p = random_params(model, rng, yaw_deg=yaw)
        if camera == "pinhole":
            cam = random_pinhole(model, p, rng, region=region)
            r = render_pinhole(model, p, cam, rng)
            info = {"yaw": yaw, "distance_m": cam.distance, "focal_px": cam.focal,
                    "fill": cam.focal * region_height(model, region) / cam.distance / cam.size}
        else:
            r = ortho_case(model, p, rng)
            info = {"yaw": yaw, "camera": "ortho"}
        image = grid_mask(r["image"], rng) if occlude else r["image"]
        path = write_case(folder, f"case{k:02d}", image, r["landmarks2d"])
        cases.append(Case(path.stem, path, r["vertices"], r["landmarks2d"], r["landmarks3d"], info, p, r["camera"]))
    return cases


def measure_R(model, repeats: int = 15) -> float:
    """bench.render's R: 224 px, batch 1, forward + backward, median ms."""
    from .render import time_case

    faces = torch.as_tensor(np.asarray(model.faces), dtype=torch.int64)
    return time_case(model.v_template, faces, 224, 1, torch.device("cpu"), repeats)[0]


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((np.asarray(a) - np.asarray(b)) ** 2).sum(1).mean()))


def score_case(case: Case, r, regions: dict) -> dict:
    """One fit against the truth: face errors, landmark RMSE/NME of the fit and of its targets."""
    row = {"case": case.name, **case.info}
    if isinstance(r, Exception):
        return {**row, "error": str(r)}
    lmk3d = getattr(r, "landmarks3d", None)
    row.update({
        "face_error_mm": face_error_mm(r.vertices, case.vertices, regions["whole"]),
        "face_inner_mm": face_error_mm(r.vertices, case.vertices, regions["inner"]),
        "landmark_rmse_px": rmse(r.landmarks2d, case.landmarks2d),
        "nme_iod": nme_iod(r.landmarks2d, case.landmarks2d),
        "target_rmse_px": rmse(r.landmarks2d_target, case.landmarks2d),  # 0 with the true points given
        "target_nme_iod": nme_iod(r.landmarks2d_target, case.landmarks2d),
        "target_nme_box_3d": nme_box(r.landmarks2d_target, case.landmarks3d),
        "seconds": r.report["seconds"], "iterations": r.report["iterations"],
        "stages": [{k: s[k] for k in ("name", "iterations", "seconds")} for s in r.report["stages"]],
    })
    if lmk3d is not None:
        row["nme_box_3d"] = nme_box(np.asarray(lmk3d), case.landmarks3d)
    return row


def evaluate(model, cases: list[Case], recipe, regions: dict, batch_size: int = 1, overrides=(),
             optimizer: str = "adam", detector: bool = False):
    """Fit the cases (true landmarks given, or detector="auto" when `detector`); per-case rows and wall s."""
    paths = [c.path for c in cases]
    folder = paths[0].parent
    start = time.perf_counter()
    if detector:
        results = fit_images(paths, recipe=recipe, model=model, detector="auto", batch_size=batch_size,
                             overrides=overrides)
    elif optimizer == "adam":
        results = fit_images(paths, recipe=recipe, model=model, detector="file", landmarks=folder,
                             batch_size=batch_size, overrides=overrides)
    else:  # same loop, plain SGD with momentum
        rec = load_recipe(recipe, overrides)
        setup = make_setup(model, rec)
        results = []
        for p in paths:
            t = prepare_target(p, rec.resolution, folder / f"{p.stem}.npy")
            results += fit_targets(setup, [t], optimizer="sgd")
    wall = time.perf_counter() - start
    return [score_case(c, r, regions) for c, r in zip(cases, results, strict=True)], wall, results


def summary(rows: list[dict], wall: float, R_ms: float, batch: int = 1) -> dict:
    """Means over the fitted cases; timing per image over all cases, also in R. A stage's R per
    iteration is per image: fitted `batch` at a time, an iteration's time is shared by the batch."""
    ok = [r for r in rows if "error" not in r]
    mean = lambda k: float(np.mean([r[k] for r in ok if k in r])) if any(k in r for r in ok) else None  # noqa: E731
    out = {"fitted": len(ok), "cases": len(rows)}
    for k in ("face_error_mm", "face_inner_mm", "landmark_rmse_px", "nme_iod", "nme_box_3d", "target_rmse_px",
              "target_nme_iod", "target_nme_box_3d", "seconds", "iterations"):
        v = mean(k)
        if v is not None:
            out[k] = v
    if ok:
        out["face_error_mm_max"] = float(max(r["face_error_mm"] for r in ok))
        bins = _by_group(ok)
        if bins["wide"] or bins["profile"]:  # the headline targets are over +-30; wider yaws apart
            out.update(_group_face_errors(bins))
        if bins["profile"] and "target_nme_box_3d" in bins["profile"][0]:  # fit vs detector near profile
            for k in ("nme_box_3d", "target_nme_box_3d"):
                out[f"{k}_profile"] = float(np.mean([r[k] for r in bins["profile"]]))
    out["seconds_per_image"] = wall / len(rows)
    out["R_per_image"] = out["seconds_per_image"] * 1000 / R_ms
    stages = {}
    for r in ok:
        for s in r["stages"]:
            st = stages.setdefault(s["name"], {"iterations": 0, "seconds": 0.0, "n": 0})
            st["iterations"] += s["iterations"]
            st["seconds"] += s["seconds"]
            st["n"] += 1
    out["stages"] = [{"name": k, "iterations": v["iterations"] / v["n"],
                      "R_per_iteration": v["seconds"] * 1000 / R_ms / max(v["iterations"], 1) / batch}
                     for k, v in stages.items()]
    return out


def mean_face_rows(model, cases: list[Case], regions: dict) -> list[dict]:
    """The template (zero shape, expression, pose, jaw) scored like a fit: the no-fit baseline."""
    v = model.v_template.numpy()
    return [{"case": c.name, **c.info, "face_error_mm": face_error_mm(v, c.vertices, regions["whole"]),
             "face_inner_mm": face_error_mm(v, c.vertices, regions["inner"])} for c in cases]


def _detector_name() -> str:
    """What detector="auto" resolves to here (the detector section's landmarks)."""
    from fitter.detect import resolve_detector

    try:
        return resolve_detector("auto")
    except Exception as exc:  # noqa: BLE001 - reported, the given-landmark sections still run
        return f"none ({exc})"


def oracle_rows(model, cases: list[Case], regions: dict, targets: list | None = None) -> list[dict]:
    """landmark_oracle per case (true camera and pose; shape + expression from 68 points): the true
    landmarks, or `targets` (68 x 2 each, e.g. the detector's points; None entries are skipped),
    weighted against the priors by their actual noise."""
    rows = []
    for k, c in enumerate(cases):
        lmk = c.landmarks2d if targets is None else targets[k]
        if lmk is None:
            rows.append({"case": c.name, **c.info, "error": "no target points"})
            continue
        # the oracle also knows the points' noise: sigma = their per-coordinate RMS error (>= 1 px)
        sigma = max(1.0, rmse(lmk, c.landmarks2d) / np.sqrt(2))
        v = landmark_oracle(model, c.params, c.camera, np.asarray(lmk, np.float64), sigma_px=sigma)
        rows.append({"case": c.name, **c.info, "sigma_px": sigma,
                     "face_error_mm": face_error_mm(v, c.vertices, regions["whole"]),
                     "face_inner_mm": face_error_mm(v, c.vertices, regions["inner"])})
    return rows


def _means(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    out = {"fitted": len(ok), "cases": len(rows)}
    for k in ("face_error_mm", "face_inner_mm"):
        out[k] = float(np.mean([r[k] for r in ok])) if ok else None
    groups = _group_face_errors(_by_group(ok))
    out.update({k: v for k, v in groups.items() if v is not None or k == "face_error_mm_yaw30"})
    return out


def _by_group(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows by yaw group (CASE_GROUPS order; a row without a yaw counts as frontal)."""
    return {name: [r for r in rows if case_group(r.get("yaw", 0.0)) == name] for name, _ in CASE_GROUPS}


def _group_face_errors(bins: dict[str, list[dict]]) -> dict[str, float | None]:
    """face_error_mm_<group>: each group's mean face error, None for an empty group."""
    return {f"face_error_mm_{name}": float(np.mean([r["face_error_mm"] for r in rs])) if rs else None
            for name, rs in bins.items()}


def run(args) -> dict:
    """The whole benchmark for parsed arguments (see main); returns the JSON record."""
    torch.manual_seed(0)
    model = load_flame(args.model)
    regions = {"whole": whole_face_region(model), "inner": face_region(model)}
    skip = set(filter(None, args.skip.split(",")))
    recipes = [r for r in args.recipes.split(",") if r]
    R_start = measure_R(model)
    out = {"device": "cpu", "threads": torch.get_num_threads(), "cases": args.cases, "wide": args.wide,
           "profile": args.profile,
           "model": model.tag, "camera": "pinhole (bench.synthetic), 512 px, 0.4-1.2 m, fill 0.4-0.6",
           "face_region_vertices": int(len(regions["whole"])), "face_region": REGION_TEXT,
           "inner_region_vertices": int(len(regions["inner"])), "results": [], "R_ms_start": R_start,
           "detector": _detector_name(), "overrides": list(args.overrides)}
    R = R_start

    def add(section, recipe, rows, wall, R_here=None, batch=1, **extra):
        R_here = R if R_here is None else R_here
        out["results"].append({"section": section, "recipe": recipe, **extra, "batch": batch,
                               **summary(rows, wall, R_here, batch), "R_ms": R_here, "per_case": rows})

    def between_R(run):
        """run() between two measurements of R, and their mean: the machine's speed drifts over a long
        benchmark, so each fitting section is put in units of the R measured around it."""
        before = measure_R(model)
        result = run()
        return result, (before + measure_R(model)) / 2

    with tempfile.TemporaryDirectory() as tmp:
        cases = make_cases(model, args.cases, Path(tmp) / "pinhole", seed=args.seed, wide=args.wide,
                           region=regions["whole"], profile=args.profile)
        out["case_info"] = [{"case": c.name, **c.info} for c in cases]
        if args.keep_renders:
            Path(args.keep_renders).mkdir(parents=True, exist_ok=True)
            for c in cases:
                (Path(args.keep_renders) / c.path.name).write_bytes(c.path.read_bytes())
        if "meanface" not in skip:
            rows = mean_face_rows(model, cases, regions)
            out["results"].append({"section": "meanface", "recipe": "none (template)", **_means(rows),
                                   "per_case": rows})
        if "oracle" not in skip:
            rows = oracle_rows(model, cases, regions)
            out["results"].append({"section": "oracle", "recipe": "lsq-true-camera",
                                   "landmarks": "true", **_means(rows), "per_case": rows})
        detector_targets = None
        # one untimed fit per recipe first (from the detector, so MediaPipe starts too): what a
        # process pays once (first calls into autograd, the detector's start-up) is the fixed cost,
        # which bench.profile measures; the rows are then per image
        for recipe in recipes:
            start = time.perf_counter()
            evaluate(model, cases[:1], recipe, regions, detector=True, overrides=args.overrides)
            out.setdefault("warmup_s", {})[recipe] = time.perf_counter() - start
        for recipe in recipes:
            if "pinhole" not in skip:
                run = partial(evaluate, model, cases, recipe, regions, args.batch, overrides=args.overrides)
                (rows, wall, _), R_here = between_R(run)
                add("pinhole", recipe, rows, wall, R_here, args.batch, landmarks="true (given)")
            if "detector" not in skip:
                run = partial(evaluate, model, cases, recipe, regions, args.batch, detector=True,
                              overrides=args.overrides)
                (rows, wall, results), R_here = between_R(run)
                add("detector", recipe, rows, wall, R_here, args.batch, landmarks="detector (auto)")
                if detector_targets is None:
                    detector_targets = [None if isinstance(r, Exception) else r.landmarks2d_target for r in results]
                if args.overlays:
                    from fitter.outputs import write_fit_outputs

                    for r in results:
                        if not isinstance(r, Exception):
                            write_fit_outputs(Path(args.overlays) / f"detector-{recipe}", r, model)
        if detector_targets is not None and "oracle" not in skip:
            rows = oracle_rows(model, cases, regions, detector_targets)
            out["results"].append({"section": "oracle", "recipe": "lsq-true-camera",
                                   "landmarks": "detector", **_means(rows), "per_case": rows})
        if args.ortho:
            ortho = make_cases(model, args.cases, Path(tmp) / "ortho", seed=args.seed, camera="ortho", wide=args.wide)
            for recipe in recipes:
                rows, wall, _ = evaluate(model, ortho, recipe, regions, args.batch, overrides=args.overrides)
                add("ortho", recipe, rows, wall, batch=args.batch, landmarks="true (given)")
        if "throughput" not in skip:
            n = max(int(b) for b in args.batches.split(","))
            many = (cases * ((n + len(cases) - 1) // len(cases)))[:n]
            for b in map(int, args.batches.split(",")):
                _, wall, _ = evaluate(model, many, "fast", regions, batch_size=b)
                out["results"].append({"section": "throughput", "recipe": "fast", "batch": b,
                                       "images_per_second": n / wall, "R_per_image": wall / n * 1000 / R})
        if "sgd" not in skip:
            # same cases and iteration budget; SGD (momentum 0.9) gets the recipe's learning rates
            # times each scale, since Adam's per-parameter step sizes do not carry over to SGD
            no_stop = ["stages.landmarks.patience=0", "stages.rigid.patience=0"]
            lrs = load_recipe("fast").lr
            for opt, scale in [("adam", 1.0)] + [("sgd", float(x)) for x in args.sgd_scales.split(",")]:
                ov = no_stop + [f"lr.{k}={v * scale}" for k, v in lrs.items()]
                rows, wall, _ = evaluate(model, cases, "fast", regions, optimizer=opt, overrides=ov)
                add("optimizer", "fast (no early stop)", rows, wall, optimizer=opt, lr_scale=scale)
        if "occlusion" not in skip:
            occluded = make_cases(model, args.cases, Path(tmp) / "occluded", seed=args.seed, occlude=True,
                                  wide=args.wide, region=regions["whole"])
            l2 = ["stages.photometric.weights.photo=0", "stages.photometric.weights.photo_l2=0.5"]
            for label, ov in (("robust", []), ("l2", l2)):
                for name, cs in (("clean", cases), ("gridmask", occluded)):
                    rows, wall, _ = evaluate(model, cs, "default", regions, overrides=ov)
                    add("occlusion", "default", rows, wall, photometric=label, images=name)
    if args.real:
        from .real import evaluate_real

        out["real"] = []
        for rec in recipes:
            for f in args.real:
                before = measure_R(model)
                res = evaluate_real(f, rec, model, overlays=args.overlays, overrides=args.overrides, R_ms=before,
                                    batch_size=args.batch)
                res["R_ms_after"] = measure_R(model)
                out["real"].append(res)
    out["R_ms_end"] = measure_R(model)
    out["R_ms"] = float(np.mean([out["R_ms_start"], out["R_ms_end"]]))
    out["R_note"] = ("pinhole/detector rows: R/image and R/iteration in units of the mean R measured just before "
                     "and after that row (its R_ms); real: R measured just before (R_ms_after beside it); other "
                     "rows: R_ms_start")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--cases", type=int, default=12, help="test faces over yaw +-30")
    ap.add_argument("--wide", type=int, default=0, help="extra test faces at |yaw| 35..45")
    ap.add_argument("--profile", type=int, default=0, help="extra test faces at |yaw| 50..75 (near profile)")
    ap.add_argument("--recipes", default="fast,default")
    ap.add_argument("--batch", type=int, default=FIT_BATCH,
                    help=f"images per batched optimisation in the recipe rows, as `cli.py fit --batch-size` "
                         f"(default {FIT_BATCH}, the CLI's)")
    ap.add_argument("--batches", default="1,4,16", help="batch sizes of the throughput section")
    ap.add_argument("--skip", default="", help=f"comma list of sections to skip: {','.join(SECTIONS)}")
    ap.add_argument("--ortho", action="store_true", help="also fit the old orthographic renders")
    ap.add_argument("--real", type=Path, action="append", default=[], metavar="DIR",
                    help="labelled photo folder (images + .pts, optional yaw.json); repeatable")
    ap.add_argument("--overlays", type=Path, default=None, help="write detector and real fits' outputs here")
    ap.add_argument("--keep-renders", type=Path, default=None, help="copy the pinhole renders here")
    ap.add_argument("--sgd-scales", default="0.01,0.1,1", help="SGD learning rates = recipe's x each scale")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override for the recipe rows (pinhole, detector, ortho, real), as `cli.py fit --set`")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = run(args)
    if args.json:
        print(json.dumps(out))
    else:
        show(out)
    return out


def show(out: dict) -> None:
    console = Console()
    f = lambda r, k, fmt: format(r[k], fmt) if r.get(k) is not None else ""  # noqa: E731
    t = Table("section", "setting", "fitted", "face mm", "max", "inner mm", "lmk RMSE px", "target RMSE px",
              "s / image", "R / image",
              title=f"bench.fit: {out['cases']}+{out['wide']}+{out.get('profile', 0)} pinhole cases, "
                    f"{out['model'].split()[0]}, "
                    f"{out['threads']} threads, R = {out['R_ms_start']:.1f} ms (end {out['R_ms_end']:.1f})")
    for r in out["results"]:
        setting = r.get("recipe", "")
        if r["section"] == "throughput":
            setting = f"fast, batch {r['batch']}"
        elif r["section"] == "optimizer":
            setting = f"{r['optimizer']}, lr x{r['lr_scale']:g}"
        elif r["section"] == "occlusion":
            setting = f"{r['photometric']} / {r['images']}"
        elif r["section"] == "oracle":
            setting = f"{r['landmarks']} points"
        elif r.get("batch", 1) > 1:
            setting = f"{setting}, batch {r['batch']}"
        t.add_row(r["section"], setting, f"{r['fitted']}/{r['cases']}" if "fitted" in r else "",
                  f(r, "face_error_mm", ".2f"), f(r, "face_error_mm_max", ".2f"), f(r, "face_inner_mm", ".2f"),
                  f(r, "landmark_rmse_px", ".2f"), f(r, "target_rmse_px", ".2f"), f(r, "seconds_per_image", ".2f"),
                  f(r, "R_per_image", ".0f"))
    console.print(t)
    console.print(f"face error: {out['face_region']} ({out['face_region_vertices']} vertices), after similarity "
                  f"alignment; inner = the older region ({out['inner_region_vertices']} vertices)")
    for r in out["results"]:
        if r["section"] in ("pinhole", "detector", "ortho", "oracle"):
            console.print(f"{r['section']} {r['recipe']} ({r.get('landmarks', '')}) per case mm: " + " ".join(
                f"{c['face_error_mm']:.2f}" if "face_error_mm" in c else "FAIL" for c in r["per_case"]))
        if r.get("face_error_mm_profile") is not None:
            console.print(f"{r['section']} {r['recipe']} by |yaw| (<=30 / 35-45 / 50-75) mm: " + " / ".join(
                f(r, f"face_error_mm_{name}", ".2f") or "-" for name, _ in CASE_GROUPS)
                + (f"; near profile box NME fit {r['nme_box_3d_profile']:.3f}, detector "
                   f"{r['target_nme_box_3d_profile']:.3f}" if r.get("nme_box_3d_profile") is not None else ""))
        if r.get("stages"):
            console.print(f"{r['section']} {r['recipe']} stages (iterations @ R / iteration per image): " + ", ".join(
                f"{s['name']} {s['iterations']:.0f} @ {s['R_per_iteration']:.2f}" for s in r["stages"]))
    if out.get("real"):
        from .real import show as show_real

        show_real(out["real"], console)


if __name__ == "__main__":
    main()
