"""Identity benchmark: `python -m bench.identity [--json] [--identities 3] [--ks 1,2,4,8]`.

For N synthetic identities (seeded; random shape ~ N(0, 1)) it renders max(K) photos each
with the identity fixed and everything else varied (expression ~ N(0, 0.8^2), jaw, yaw spread
over -30..+30 degrees, pitch/roll, coloured SH light, skin tone, background), with their exact
projected landmarks given as files. `--camera pinhole` (default): bench.synthetic's own pinhole
camera and rasterizer, the face 0.4-1.2 m away filling 40-60 % of the frame; `--camera ortho`:
the older renders with the fit's own orthographic camera and renderer. Then, per K:

- joint: the first K photos fitted together as one identity (`fit_identity`, shared mode,
  recipe identity-set);
- single: each of those K photos fitted on its own (`fit_images`, batch 1, recipe default).

The error is the whole-face-region vertex distance (mm, after similarity alignment) between the
NEUTRAL geometry of the fitted shape (shape only: zero expression, pose, jaw, eyes) and the
neutral geometry of the true shape. Reported per K, averaged over the identities: the joint
fit's error, the mean of the single-image fits' errors, their ratio (target at K = 4: <= 0.7),
the error of the plain average of the K single-fit shapes (a naive joint baseline), and
seconds (joint fit of K photos; sum of the K single fits).
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

from fitter.fit import fit_images, load_flame, make_setup, prepare_target
from fitter.fitset import fit_identity
from fitter.params import FitParams
from fitter.recipe import load_recipe

from .synthetic import (face_error_mm, random_params, random_pinhole, render_photo, render_pinhole,
                        whole_face_region, write_case)

# yaw of photo i (degrees): any prefix of this order spreads over -30..+30
YAW_ORDER = (0.0, -30.0, 30.0, -15.0, 15.0, -25.0, 25.0, 5.0, -5.0, -20.0, 20.0, 10.0, -10.0)


def yaw_for(i: int, rng: np.random.Generator) -> float:
    return YAW_ORDER[i] if i < len(YAW_ORDER) else float(rng.uniform(-30, 30))


def neutral_vertices(model, shape: np.ndarray) -> np.ndarray:
    """Vertices of `shape` (n_shape,) with zero expression, pose, jaw and eyes -> V x 3."""
    z = FitParams.initial(1, model.n_shape, model.n_exp, model.n_verts)
    s = torch.as_tensor(np.asarray(shape, np.float32))[None]
    with torch.no_grad():
        out = model(s, z.exp, z.global_pose, z.neck_pose, z.jaw_pose, z.eye_pose)
    return out.vertices[0].numpy()


def make_identity(model, folder: Path, n_photos: int, rng: np.random.Generator, camera: str = "pinhole",
                  region: np.ndarray | None = None):
    """One identity photographed n_photos times -> (true shape, [photo paths])."""
    shape = rng.normal(0, 1, model.n_shape).astype(np.float32)
    paths = []
    for i in range(n_photos):
        p = random_params(model, rng, shape=shape, yaw_deg=yaw_for(i, rng))
        if camera == "pinhole":
            r = render_pinhole(model, p, random_pinhole(model, p, rng, region=region), rng)
            image, lmk = r["image"], r["landmarks2d"]
        else:
            image, lmk = render_photo(model, p, rng)
        paths.append(write_case(folder, f"photo{i:02d}", image, lmk))
    return shape, paths


def fit_singles(model, paths, recipe: str, overrides) -> tuple[list[np.ndarray], list[float]]:
    """Each photo fitted on its own: shapes and wall seconds per photo."""
    shapes, seconds = [], []
    for p in paths:
        start = time.perf_counter()
        (r,) = fit_images([p], recipe=recipe, model=model, detector="file", landmarks=p.parent,
                          batch_size=1, overrides=overrides)
        seconds.append(time.perf_counter() - start)
        if isinstance(r, Exception):
            raise r
        shapes.append(r.params.shape[0].numpy())
    return shapes, seconds


def fit_joint(model, paths, recipe: str, overrides, batch_size: int) -> tuple[np.ndarray, float]:
    """The photos fitted jointly (shared shape): the identity shape and wall seconds."""
    start = time.perf_counter()
    rec = load_recipe(recipe, overrides)
    setup = make_setup(model, rec)
    targets = [prepare_target(p, rec.resolution, p.with_suffix(".npy")) for p in paths]
    identity, _ = fit_identity(targets, setup, "shared", batch_size=batch_size)
    return identity.shape, time.perf_counter() - start


def run(args) -> dict:
    torch.manual_seed(0)
    model = load_flame(args.model)
    region = whole_face_region(model)
    ks = sorted({int(k) for k in args.ks.split(",")})
    n_photos = max(ks)
    overrides = list(args.overrides)
    out = {"device": "cpu", "threads": torch.get_num_threads(), "model": model.tag, "identities": args.identities,
           "photos_per_identity": n_photos, "joint_recipe": args.recipe, "single_recipe": args.single_recipe,
           "overrides": overrides, "face_region_vertices": int(len(region)),
           "camera": getattr(args, "camera", "pinhole"), "results": [], "per_identity": []}
    from .fit import measure_R

    out["R_ms"] = R = measure_R(model)
    rows = {k: [] for k in ks}
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.identities):
            shape, paths = make_identity(model, Path(tmp) / f"id{n}", n_photos, rng,
                                         getattr(args, "camera", "pinhole"), region)
            truth = neutral_vertices(model, shape)
            err = lambda s, truth=truth: face_error_mm(neutral_vertices(model, s), truth, region)  # noqa: B023
            singles, single_s = fit_singles(model, paths, args.single_recipe, overrides)
            single_err = [err(s) for s in singles]
            ident = {"identity": n, "template_mm": err(np.zeros(model.n_shape)), "single_mm": single_err,
                     "joint": []}
            for k in ks:
                shape_k, joint_s = fit_joint(model, paths[:k], args.recipe, overrides, args.batch_size)
                row = {"identity": n, "k": k, "joint_mm": err(shape_k), "single_mm": float(np.mean(single_err[:k])),
                       "single_average_mm": err(np.mean(singles[:k], axis=0)), "joint_seconds": joint_s,
                       "single_seconds": float(np.sum(single_s[:k]))}
                rows[k].append(row)
                ident["joint"].append({"k": k, "joint_mm": row["joint_mm"], "seconds": joint_s})
            out["per_identity"].append(ident)
    for k in ks:
        r = rows[k]
        mean = lambda key, r=r: float(np.mean([x[key] for x in r]))
        out["results"].append({
            "k": k, "joint_mm": mean("joint_mm"), "single_mm": mean("single_mm"),
            "ratio": mean("joint_mm") / mean("single_mm"),
            "ratio_per_identity": [x["joint_mm"] / x["single_mm"] for x in r],
            "single_average_mm": mean("single_average_mm"),
            "joint_seconds": mean("joint_seconds"), "single_seconds": mean("single_seconds"),
            "joint_R": mean("joint_seconds") * 1000 / R, "single_R": mean("single_seconds") * 1000 / R,
        })
    out["template_mm"] = float(np.mean([i["template_mm"] for i in out["per_identity"]]))
    return out


def show(out: dict) -> None:
    console = Console()
    t = Table("K", "joint mm", "single mm (mean)", "joint / single", "avg of singles mm", "joint s (R)",
              "singles s (sum, R)",
              title=f"bench.identity: {out['identities']} synthetic identities x {out['photos_per_identity']} photos, "
                    f"{out['model'].split()[0]}, {out['threads']} threads, R = {out['R_ms']:.1f} ms")
    for r in out["results"]:
        t.add_row(str(r["k"]), f"{r['joint_mm']:.3f}", f"{r['single_mm']:.3f}", f"{r['ratio']:.2f}",
                  f"{r['single_average_mm']:.3f}", f"{r['joint_seconds']:.1f} ({r['joint_R']:.0f})",
                  f"{r['single_seconds']:.1f} ({r['single_R']:.0f})")
    console.print(t)
    console.print(f"joint: recipe {out['joint_recipe']} (shared shape); single: recipe {out['single_recipe']}; "
                  f"mean template (zero shape) error {out['template_mm']:.3f} mm; errors on the neutral whole face "
                  f"region ({out['face_region_vertices']} vertices), after similarity alignment; "
                  f"{out['camera']} renders")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--identities", type=int, default=3)
    ap.add_argument("--ks", default="1,2,4,8", help="comma list of photo counts fitted jointly")
    ap.add_argument("--recipe", default="identity-set", help="recipe of the joint fits")
    ap.add_argument("--single-recipe", default="default", help="recipe of the single-image fits")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override applied to both recipes (repeatable)")
    ap.add_argument("--batch-size", type=int, default=16, help="fit-set mini-batch size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--camera", choices=["pinhole", "ortho"], default="pinhole",
                    help="test renders: bench.synthetic's pinhole camera, or the fit's own orthographic one")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's; 1 is steadier on a shared machine)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = run(args)
    if args.json:
        print(json.dumps(out))
    else:
        show(out)
    return out


if __name__ == "__main__":
    main()
