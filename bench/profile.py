"""Where a fit's time goes: `python -m bench.profile [--json] [--image PATH] [--repeats N] [--set K=V]`.

Three parts, each figure also in units of R (bench.render's 224 px batch-1 forward + backward,
measured in the same run, before and after):

- **start-up**, in a fresh Python process (what one `cli.py fit` command pays before its first
  iteration): `import torch`, importing the fitter, loading the model, the first and a second
  MediaPipe detection on the image, preparing the fit (recipe, setup, targets, dense embedding),
  then one whole default fit and writing its outputs (fit.npz, mesh.obj, overlay.png, fit.json);
- **one least-squares iteration's pieces** (the default recipe's rigid and landmark stages on that
  image): the Jacobian by autodiff through the whole residual function, and through the model's
  points where the fit takes that way (`objective.residual_jacobian`: the landmark stage), and the
  normal equations with one damped solve;
- **one photometric iteration** of the default recipe on that image, forward + backward of each
  part on its own, on the mesh the stage renders (the part of the recipe's `render_faces`
  decimation, or of the model's own mesh, that can show inside the face mask): the model,
  normals + SH shading, rasterization + compositing (back faces culled, as the fit renders), and
  the whole objective (all terms, the landmark ones included); "terms and glue" is the whole
  minus the three parts. One Adam update is timed apart.
  The medians of `--repeats` runs after warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "fitter" / "samples" / "astronaut.png"

# Run in a fresh interpreter: prints one JSON object of phase -> seconds.
STARTUP = r"""
import json, sys, tempfile, time
from pathlib import Path
t = [time.perf_counter()]
import torch
t.append(time.perf_counter())
from fitter.fit import attach_dense_embedding, fit_targets, load_flame, make_setup, prepare_target, stack_targets
from fitter.outputs import write_fit_outputs
from fitter.recipe import load_recipe
t.append(time.perf_counter())
recipe = load_recipe("default")
flame = load_flame(None)
t.append(time.perf_counter())
target = prepare_target(sys.argv[1], recipe.resolution)
t.append(time.perf_counter())
prepare_target(sys.argv[1], recipe.resolution)
t.append(time.perf_counter())
setup = make_setup(flame, recipe)
attach_dense_embedding(setup, stack_targets([target], recipe.landmark_weights, "cpu", recipe.detector_trust))
t.append(time.perf_counter())
result = fit_targets(setup, [target])[0]
t.append(time.perf_counter())
with tempfile.TemporaryDirectory() as out:
    write_fit_outputs(Path(out), result, flame)
t.append(time.perf_counter())
names = ["import torch", "import fitter", "model load", "detection (first)", "detection (again)",
         "fit setup", "default fit", "write outputs"]
print(json.dumps({n: b - a for n, a, b in zip(names, t, t[1:])}))
"""


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def startup(image: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", STARTUP, str(image)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    if out.returncode != 0:
        raise SystemExit(f"bench.profile: the start-up run failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def photometric_parts(image: Path, repeats: int, overrides: list[str] = ()) -> dict:
    import torch

    from fitter.camera import project
    from fitter.fit import attach_dense_embedding, initial_params, load_flame, make_objective, make_setup, \
        prepare_target, stack_targets
    from fitter.optimize import Adam
    from fitter.recipe import load_recipe
    from fitter.render import render_mesh
    from fitter.shading import sh_shading, vertex_normals
    from fitter.synth import model_output, visible_region

    flame = load_flame(None)
    recipe = load_recipe("default", overrides)
    setup = make_setup(flame, recipe)
    target = prepare_target(image, recipe.resolution)
    batch = attach_dense_embedding(setup, stack_targets([target], recipe.landmark_weights, "cpu",
                                                        recipe.detector_trust))
    objective = make_objective(setup, batch)
    stage = next(s for s in recipe.stages if s.name == "photometric")
    params = initial_params(setup, batch).map(lambda x: x.detach().clone().requires_grad_(True))
    rows = torch.arange(1)
    res = recipe.resolution

    def whole():
        objective(params, stage, rows)[0].sum().backward()

    with torch.no_grad():  # what the stage renders: the part of its mesh that can show in the mask
        mesh = visible_region(flame, params, res, batch.mask, setup.render_mesh, setup.albedo_model)
    subset, faces = mesh.subset, mesh.faces

    def model():
        model_output(flame, params, subset=subset).vertices.sum().backward()

    with torch.no_grad():
        verts = model_output(flame, params, subset=subset).vertices
    v = verts.clone().requires_grad_(True)

    def shading():
        (sh_shading(vertex_normals(v, mesh.normal_faces), params.light) * params.albedo[:, subset.ids]).sum().backward()

    screen = project(verts, params.cam, res).detach().requires_grad_(True)
    colors = torch.rand(1, verts.shape[1], 3, requires_grad=True)

    def raster():
        out = render_mesh(screen, faces, colors, res, res, background=batch.image, cull_back=True)
        (out["image"].sum() + out["alpha"].sum()).backward()

    leaves = {n: getattr(params, n) for n in stage.params}
    for t in leaves.values():
        t.grad = torch.randn_like(t)
    adam = Adam([{"params": [t], "lr": 1e-3} for t in leaves.values()])
    parts = {"model": median_ms(model, repeats), "normals + SH shading": median_ms(shading, repeats),
             "rasterize + composite": median_ms(raster, repeats), "Adam update": median_ms(adam.step, repeats)}
    parts["whole objective"] = median_ms(whole, repeats)
    parts["terms and glue"] = parts["whole objective"] - sum(parts[k] for k in list(parts)[:3])
    return {"resolution": res, "mesh_vertices": int(verts.shape[1]), "mesh_faces": int(faces.shape[0]), "ms": parts,
            "least_squares": least_squares_parts(setup, batch, objective, repeats)}


def least_squares_parts(setup, batch, objective, repeats: int) -> dict:
    """One Levenberg-Marquardt iteration's pieces for the default recipe's rigid and landmark stages on
    the photo (the detector's 68 + 478 points): the Jacobian (two reverse passes; and through the
    model's points where the fit uses that), the normal equations and one damped solve, ms."""
    import torch

    from fitter.fit import initial_params
    from fitter.optimize import batched_jacobian, flatten_params, lm_step, normal_equations, unflatten_params

    params = initial_params(setup, batch)
    rows = torch.arange(1)
    out = {}
    for stage in setup.recipe.stages:
        if stage.solver != "lm":
            continue
        names = list(stage.params)
        x = flatten_params(params, names)
        fn = lambda v, stage=stage, names=names: objective.residuals(unflatten_params(params, names, v), stage, rows)  # noqa: E731
        r, J = batched_jacobian(fn, x)
        H, g = normal_equations(J, r)
        out[stage.name] = {"P": int(x.shape[1]), "M": int(r.shape[1]),
                           "jacobian": median_ms(lambda fn=fn, x=x: batched_jacobian(fn, x), repeats),
                           "normal equations + solve": median_ms(
                               lambda J=J, r=r: lm_step(*normal_equations(J, r), torch.ones(1)), repeats)}
        if objective.residual_jacobian(params, names, stage, rows) is not None:  # what the fit uses here
            out[stage.name]["jacobian through the points"] = median_ms(
                lambda stage=stage, names=names: objective.residual_jacobian(params, names, stage, rows), repeats)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--image", type=Path, default=SAMPLE)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="default-recipe override for the iteration pieces (e.g. resolution=128); not the start-up")
    args = ap.parse_args(argv)
    from .fit import measure_R
    from fitter.fit import load_flame

    flame = load_flame(None)
    r_start = measure_R(flame)
    start = startup(args.image)
    step = photometric_parts(args.image, args.repeats, args.overrides)
    r_end = measure_R(flame)
    R = min(r_start, r_end)
    out = {"R_ms_start": r_start, "R_ms_end": r_end, "R_ms": R, "image": str(args.image), "overrides": args.overrides,
           "startup_s": start, "startup_R": {k: v * 1000 / R for k, v in start.items()},
           "photometric": step, "photometric_R": {k: v / R for k, v in step["ms"].items()},
           "least_squares_R": {n: {k: v / R for k, v in p.items() if k not in ("P", "M")}
                               for n, p in step["least_squares"].items()}}
    if args.json:
        print(json.dumps(out))
        return
    print(f"R = {R:.1f} ms (start {r_start:.1f}, end {r_end:.1f})")
    for k, v in start.items():
        print(f"  {k:24s} {v:7.2f} s  {v * 1000 / R:7.0f} R")
    print(f"one photometric iteration at {step['resolution']} px ({step['mesh_vertices']} vertices, "
          f"{step['mesh_faces']} triangles):")
    for k, v in step["ms"].items():
        print(f"  {k:24s} {v:7.1f} ms {v / R:6.2f} R")
    for name, part in step["least_squares"].items():
        print(f"least squares, stage {name} (P {part['P']} unknowns, M {part['M']} residuals):")
        for k in ("jacobian", "jacobian through the points", "normal equations + solve"):
            if k in part:
                print(f"  {k:28s} {part[k]:7.1f} ms {part[k] / R:6.2f} R")


if __name__ == "__main__":
    main()
