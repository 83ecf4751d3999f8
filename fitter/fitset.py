"""Fitting a set of photos of one person into one identity.

`shared`: one shape (and albedo) for every image, optimised jointly; per-image expression,
pose, camera and light. `consistency`: each image keeps its own shape, tied by the
RingNet-style consistency term (hinge against other identities' shapes + a pull to the set
mean); the identity written is the mean shape. Same loop as `fit`, over mini-batches of
images whose gradients are accumulated (bounded memory for big sets).
"""

from __future__ import annotations

import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from priors.assets import atomic_write
from priors.errors import FlamefitError, UsageError

from .fit import (
    FitResult, Target, attach_dense_embedding, collect_results, deca_initializer, initial_params, load_flame,
    make_objective, make_setup,
    prepare_from_args, stack_targets,
)
from .optimize import Progress, run_recipe
from .params import load_fit
from .recipe import Recipe, load_recipe


@dataclass
class Identity:
    shape: np.ndarray  # (n_shape,)
    albedo: np.ndarray  # (V, 3) or (n_tex,)
    images: list[str]  # stems of the images that were fitted
    shape_mode: str
    spread: float  # RMS distance of the per-image shapes to their mean (0 in shared mode)


def load_negative_shapes(items, n_shape: int) -> torch.Tensor | None:
    """Shapes of other identities from fit.npz / identity.npz files or folders holding them -> N x n_shape."""
    shapes = []
    for item in items or ():
        p = Path(item)
        files = sorted(p.rglob("fit.npz")) + sorted(p.rglob("identity.npz")) if p.is_dir() else [p]
        if not files:
            raise UsageError(f"--negatives {p}: no fit.npz or identity.npz inside; fix: point at fits of other people")
        for f in files:
            if f.name == "identity.npz":
                try:
                    with np.load(f, allow_pickle=False) as data:
                        shape = np.asarray(data["shape"])
                except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
                    raise UsageError(f"{f}: not a readable identity.npz with a 'shape' array ({exc}); fix: pass "
                                     "an identity.npz written by `cli.py fit-set`") from None
            else:
                shape = load_fit(f)[0].shape[0].numpy()
            if shape.shape != (n_shape,):
                raise UsageError(f"{f}: {shape.shape[0]} shape coefficients, this model has {n_shape}; fix: use "
                                 "negatives fitted with the same model")
            shapes.append(torch.as_tensor(shape, dtype=torch.float32))
    return torch.stack(shapes) if shapes else None


def mini_batches(n: int, size: int, device) -> list[torch.Tensor]:
    return [torch.arange(i, min(i + size, n), device=device) for i in range(0, n, size)]


def fit_identity(targets: list[Target], setup, shape_mode: str = "shared", negatives=None, batch_size: int = 16,
                 progress: Progress | None = None, seed: int = 0, initializer=None) -> tuple[Identity, list[FitResult]]:
    """Jointly fit prepared targets of one person. initializer: targets -> initial FitParams
    (e.g. the DECA encoder's); in shared mode its per-image shapes start from their mean."""
    if shape_mode not in ("shared", "consistency"):
        raise UsageError(f"--shape-mode {shape_mode}: use shared or consistency")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be at least 1")
    torch.manual_seed(seed)
    start = time.perf_counter()
    batch = stack_targets(targets, setup.recipe.landmark_weights, setup.device, setup.recipe.detector_trust)
    batch = attach_dense_embedding(setup, batch)
    # this fit's negatives only (the caller's setup is not changed, so a later fit does not inherit them)
    extra = {k: v for k, v in setup.extra.items() if k != "negatives"}
    if negatives is not None:
        extra["negatives"] = negatives.to(setup.device)
    setup = replace(setup, extra=extra)
    params = initializer(targets) if initializer is not None else initial_params(setup, batch)
    if shape_mode == "shared":
        params.shape = params.shape.mean(0, keepdim=True).expand_as(params.shape).contiguous()
    objective = make_objective(setup, batch, tie_shape=shape_mode == "shared")
    chunks = mini_batches(len(targets), batch_size, setup.device)
    params, reports = run_recipe(params, setup.recipe, objective, progress, chunks=chunks)
    if shape_mode == "shared":
        params.shape = params.shape[:1].expand_as(params.shape).contiguous()
        params.albedo = params.albedo[:1].expand_as(params.albedo).contiguous()
    results = collect_results(setup, targets, params, reports, time.perf_counter() - start, setup.warnings)
    if shape_mode == "shared":  # row 0 itself: a mean of equal float32 rows can be off by an ulp
        shape, albedo, spread = params.shape[0], params.albedo[0], 0.0
    else:
        shape, albedo = params.shape.mean(0), params.albedo.mean(0)
        spread = float(((params.shape - shape) ** 2).sum(1).mean().sqrt())
    identity = Identity(shape.cpu().numpy(), albedo.cpu().numpy(), [t.stem for t in targets], shape_mode, spread)
    for r in results:
        r.report["shape_mode"] = shape_mode
    return identity, results


def fit_set(paths, recipe: str | Recipe = "identity-set", model=None, detector: str = "auto", landmarks=None,
            device: str = "cpu", batch_size: int = 16, seed: int = 0, overrides=(), shape_mode: str | None = None,
            negatives=None, face_index=None, progress: Progress | None = None,
            on_error=None, init: str = "zero") -> tuple[Identity, list[FitResult]]:
    """Prepare every image (bad ones reported through on_error(path, error) and skipped), then fit
    them as one identity. progress(stage, it, total, losses) hears 'prepare' once per image, then
    every iteration of each recipe stage with the set's summed loss terms."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    flame = load_flame(model, device)
    setup = make_setup(flame, recipe, device)
    initializer = deca_initializer(setup) if init == "deca" else None
    mode = shape_mode or recipe.shape_mode
    neg = load_negative_shapes(negatives, flame.n_shape)
    lmk_arg = Path(landmarks) if landmarks is not None else None
    if lmk_arg is not None and lmk_arg.is_file():
        raise UsageError(f"--landmarks {lmk_arg}: fit-set needs a directory of <stem>.pts/.npy/.json files")
    targets = []
    paths = [Path(p) for p in paths]
    for i, p in enumerate(paths, start=1):
        try:
            targets.append(prepare_from_args(p, recipe.resolution, lmk_arg, detector, device, face_index))
        except FlamefitError as exc:
            if on_error is None:
                raise
            on_error(p, exc)
        if progress is not None:  # reading and detecting can be the long part of a big set
            progress("prepare", i, len(paths), {})
    if not targets:
        raise UsageError("fit-set: no image could be prepared; see the errors above")
    return fit_identity(targets, setup, mode, neg, batch_size, progress, seed, initializer)


def write_identity(out_dir: Path, identity: Identity) -> Path:
    arrays = {"shape": identity.shape.astype(np.float32), "albedo": identity.albedo.astype(np.float32),
              "images": np.array(identity.images), "shape_mode": np.array(identity.shape_mode),
              "shape_spread": np.float32(identity.spread)}
    return atomic_write(Path(out_dir) / "identity.npz", lambda fh: np.savez(fh, **arrays))
