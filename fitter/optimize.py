"""The stage loop: Adam on the parameter groups a recipe stage names, against its weighted terms.

It does not know which terms exist: `objective(params, stage, rows)` returns the per-image
total and per-term values for the image rows `rows` of the batch. With `chunks`, each step
accumulates gradients over mini-batches of rows (bounded memory for big sets) before one
Adam update, so the result is the same joint optimisation. Early stop on plateau; a
non-finite loss rolls back to the last good state and halves the learning rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from priors.errors import FitError

from .params import FitParams
from .recipe import Recipe, Stage

Objective = Callable[[FitParams, Stage, Tensor], tuple[Tensor, dict[str, Tensor]]]
Progress = Callable[[str, int, int, dict[str, float]], None]
MAX_ROLLBACKS = 8


@dataclass
class StageReport:
    name: str
    iterations: int
    seconds: float
    losses: dict[str, list[float]]  # term -> one weighted value per image, at the stage's end
    events: list[str] = field(default_factory=list)


def _make_optimizer(leaves: dict[str, Tensor], recipe: Recipe, stage: Stage, scale: float, kind: str):
    groups = [{"params": [t], "lr": recipe.lr[n] * stage.lr_scale * scale} for n, t in leaves.items()]
    if kind == "sgd":
        return torch.optim.SGD(groups, momentum=0.9)
    return torch.optim.Adam(groups)


def evaluate(objective: Objective, params: FitParams, stage: Stage, chunks: list[Tensor]):
    """Forward + backward over the chunks: (finite, total over all images, per-term values B)."""
    totals, terms = [], {}
    for rows in chunks:
        total, chunk_terms = objective(params, stage, rows)
        loss = total.sum()
        if not torch.isfinite(loss):
            return False, loss.detach(), {}
        if loss.requires_grad:
            loss.backward()
        totals.append(loss.detach())
        for k, v in chunk_terms.items():
            terms.setdefault(k, []).append(v.detach())
    return True, torch.stack(totals).sum(), {k: torch.cat(v) for k, v in terms.items()}


def run_stage(params: FitParams, recipe: Recipe, stage: Stage, objective: Objective,
              progress: Progress | None = None, optimizer: str = "adam",
              chunks: list[Tensor] | None = None) -> tuple[FitParams, StageReport]:
    """Optimise the stage's parameter groups; the others stay fixed. Returns new params + report."""
    if chunks is None:
        chunks = [torch.arange(params.batch, device=params.shape.device)]
    start = time.perf_counter()
    values = {n: t.detach().clone() for n, t in params.items()}
    leaves = {n: values[n].requires_grad_(True) for n in stage.params}
    good = {n: t.detach().clone() for n, t in leaves.items()}
    scale, events, rollbacks = 1.0, [], 0
    opt = _make_optimizer(leaves, recipe, stage, scale, optimizer)
    best, since_best, it = float("inf"), 0, 0
    good_terms: dict[str, Tensor] = {}
    for it in range(1, stage.iterations + 1):
        opt.zero_grad(set_to_none=True)
        finite, loss, terms = evaluate(objective, FitParams(**values), stage, chunks)
        if finite:
            finite = all(t.grad is None or bool(torch.isfinite(t.grad).all()) for t in leaves.values())
        if not finite:
            rollbacks += 1
            if rollbacks > MAX_ROLLBACKS:
                raise FitError(f"stage '{stage.name}': the loss stayed non-finite after {MAX_ROLLBACKS} "
                               "rollbacks; fix: lower the learning rates in the recipe")
            with torch.no_grad():
                for n, t in leaves.items():
                    t.copy_(good[n])
            scale *= 0.5
            opt = _make_optimizer(leaves, recipe, stage, scale, optimizer)
            events.append(f"iteration {it}: non-finite loss or gradient, rolled back, learning rate x{scale:g}")
            continue
        with torch.no_grad():
            for n, t in leaves.items():
                good[n].copy_(t)
        good_terms = terms
        opt.step()
        value = float(loss)
        if progress is not None:
            progress(stage.name, it, stage.iterations, {k: float(v.sum()) for k, v in terms.items()})
        if stage.patience > 0:
            if value < best * (1 - stage.tol) or best == float("inf"):
                best, since_best = value, 0
            else:
                since_best += 1
                if since_best >= stage.patience:
                    break
    # the state the last finite loss was measured at, and its terms
    with torch.no_grad():
        for n, t in leaves.items():
            t.copy_(good[n])
    out = FitParams(**{n: t.detach() for n, t in values.items()})
    report = StageReport(stage.name, it, time.perf_counter() - start,
                         {k: [float(x) for x in v] for k, v in good_terms.items()}, events)
    return out, report


def run_recipe(params: FitParams, recipe: Recipe, objective: Objective, progress: Progress | None = None,
               optimizer: str = "adam", chunks: list[Tensor] | None = None) -> tuple[FitParams, list[StageReport]]:
    """All stages of a recipe in order."""
    reports = []
    for stage in recipe.stages:
        if stage.iterations == 0:
            continue
        params, report = run_stage(params, recipe, stage, objective, progress, optimizer, chunks)
        reports.append(report)
    return params, reports
