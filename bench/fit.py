"""Synthetic recovery benchmark: `python -m bench.fit [--json] [--cases 12] [--recipes fast,default]`.

Renders K random faces with known parameters (seeded; yaw +-30 degrees, expressions, jaw,
coloured light), fits them with their exact projected landmarks given as files, and reports
per recipe: landmark RMSE (px), face-area vertex error (mm, after similarity alignment) and
seconds per image; images/second at several batch sizes; Adam against SGD on the same
budget; and the same cases under GridMask occlusion with the robust photometric loss and
with a plain L2 one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fitter.fit import fit_images, fit_targets, load_flame, make_setup, prepare_target
from fitter.recipe import load_recipe

from .synthetic import face_error_mm, face_region, grid_mask, random_params, render_photo, true_vertices, write_case


def make_cases(model, n: int, folder: Path, seed: int = 0, occlude: bool = False):
    rng = np.random.default_rng(seed)
    cases = []
    for k in range(n):
        p = random_params(model, rng, yaw_deg=-30 + 60 * k / max(n - 1, 1))
        image, lmk = render_photo(model, p, rng)
        if occlude:
            image = grid_mask(image, rng)
        path = write_case(folder, f"case{k:02d}", image, lmk)
        cases.append((path, true_vertices(model, p)))
    return cases


def evaluate(model, cases, recipe, region, batch_size=1, overrides=(), optimizer="adam"):
    """Fit the cases; returns per-case rows and the wall time."""
    paths = [c[0] for c in cases]
    folder = paths[0].parent
    start = time.perf_counter()
    if optimizer == "adam":
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
    rows = []
    for (path, truth), r in zip(cases, results, strict=True):
        if isinstance(r, Exception):
            raise r
        rows.append({"case": path.stem, "landmark_rmse_px": r.report["landmark_rmse_px"],
                     "face_error_mm": face_error_mm(r.vertices, truth, region), "seconds": r.report["seconds"],
                     "iterations": r.report["iterations"]})
    return rows, wall


def summary(rows, wall):
    return {"landmark_rmse_px": float(np.mean([r["landmark_rmse_px"] for r in rows])),
            "face_error_mm": float(np.mean([r["face_error_mm"] for r in rows])),
            "seconds_per_image": wall / len(rows),
            "iterations": float(np.mean([r["iterations"] for r in rows]))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--recipes", default="fast,default")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: recovery,throughput,sgd,occlusion")
    ap.add_argument("--sgd-scales", default="0.01,0.1,1", help="SGD learning rates = recipe's x each scale")
    ap.add_argument("--model", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = load_flame(args.model)
    region = face_region(model)
    skip = set(filter(None, args.skip.split(",")))
    out = {"device": "cpu", "threads": torch.get_num_threads(), "cases": args.cases, "model": model.tag,
           "face_region_vertices": int(len(region)), "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        cases = make_cases(model, args.cases, Path(tmp) / "clean")
        for recipe in args.recipes.split(",") if "recovery" not in skip else []:
            rows, wall = evaluate(model, cases, recipe, region)
            out["results"].append({"section": "recovery", "recipe": recipe, **summary(rows, wall), "per_case": rows})
        if "throughput" not in skip:
            n = max(int(b) for b in args.batches.split(","))
            many = (cases * ((n + len(cases) - 1) // len(cases)))[:n]
            for b in map(int, args.batches.split(",")):
                _, wall = evaluate(model, many, "fast", region, batch_size=b)
                out["results"].append({"section": "throughput", "recipe": "fast", "batch": b,
                                       "images_per_second": n / wall})
        if "sgd" not in skip:
            # same cases and iteration budget; SGD (momentum 0.9) gets the recipe's learning rates
            # times each scale, since Adam's per-parameter step sizes do not carry over to SGD
            no_stop = ["stages.landmarks.patience=0", "stages.rigid.patience=0"]
            lrs = load_recipe("fast").lr
            for opt, scale in [("adam", 1.0)] + [("sgd", float(x)) for x in args.sgd_scales.split(",")]:
                ov = no_stop + [f"lr.{k}={v * scale}" for k, v in lrs.items()]
                rows, wall = evaluate(model, cases, "fast", region, optimizer=opt, overrides=ov)
                out["results"].append({"section": "optimizer", "optimizer": opt, "lr_scale": scale,
                                       "recipe": "fast (no early stop)", **summary(rows, wall)})
        if "occlusion" not in skip:
            occluded = make_cases(model, args.cases, Path(tmp) / "occluded", occlude=True)
            l2 = ["stages.photometric.weights.photo=0", "stages.photometric.weights.photo_l2=0.5"]
            for label, ov in (("robust", []), ("l2", l2)):
                for name, cs in (("clean", cases), ("gridmask", occluded)):
                    rows, wall = evaluate(model, cs, "default", region, overrides=ov)
                    out["results"].append({"section": "occlusion", "photometric": label, "images": name,
                                           **summary(rows, wall)})
    if args.json:
        print(json.dumps(out))
    else:
        show(out)
    return out


def show(out):
    console = Console()
    t = Table("section", "setting", "landmark RMSE px", "face error mm", "s / image", "images / s", "iterations",
              title=f"bench.fit: {out['cases']} synthetic cases, {out['model'].split()[0]}, {out['threads']} threads")
    for r in out["results"]:
        setting = r.get("recipe", "")
        if r["section"] == "throughput":
            setting = f"fast, batch {r['batch']}"
        elif r["section"] == "optimizer":
            setting = f"{r['optimizer']}, lr x{r['lr_scale']:g}"
        elif r["section"] == "occlusion":
            setting = f"{r['photometric']} / {r['images']}"
        f = lambda k, fmt, r=r: format(r[k], fmt) if k in r else ""
        t.add_row(r["section"], setting, f("landmark_rmse_px", ".2f"), f("face_error_mm", ".2f"),
                  f("seconds_per_image", ".2f"), f("images_per_second", ".2f"), f("iterations", ".0f"))
    console.print(t)


if __name__ == "__main__":
    main()
