"""The stage loop: a solver on the parameter groups a recipe stage names, against its weighted terms.

It does not know which terms exist: `objective(params, stage, rows)` returns the per-image
total and per-term values for the image rows `rows` of the batch. Two solvers, chosen per stage
by the recipe (`solver = "adam" | "lm"`):

- Adam (our own few lines, the same update as torch.optim.Adam, which costs a second or more
  of start-up on its first construction). With `chunks`, each step accumulates gradients over
  mini-batches of rows (bounded memory for big sets) before one update, so the result is the
  same joint optimisation. Early stop on plateau; a non-finite loss rolls back to the last good
  state and halves the learning rate.
- Levenberg-Marquardt, for stages whose terms all have a least-squares form
  (`objective.residuals(params, stage, rows) -> B x M`): per image, J by autodiff (two reverse
  passes, batched_jacobian), or from `objective.residual_jacobian` where the objective offers a
  cheaper one (fit.py: through the head model's points), then the damped normal equations
  (J^T J + lambda diag(J^T J)) delta = -J^T r, a step kept only where the true objective decreases
  (else lambda grows and the image waits). A handful of steps where Adam takes hundreds. Images
  must be independent (own parameters each).
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


class Adam:
    """Adam (Kingma & Ba), one learning rate per parameter group, numerically torch.optim.Adam's update."""

    def __init__(self, groups: list[dict], betas=(0.9, 0.999), eps: float = 1e-8):
        self.groups, self.betas, self.eps, self.steps = groups, betas, eps, 0
        self.state = [(torch.zeros_like(p), torch.zeros_like(p)) for g in groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True):
        for g in self.groups:
            for p in g["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self):
        self.steps += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.steps, 1 - b2 ** self.steps
        params = [(p, g["lr"]) for g in self.groups for p in g["params"]]
        for (p, lr), (m, v) in zip(params, self.state, strict=True):
            if p.grad is None:
                continue
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.addcdiv_(m, (v.sqrt() / c2 ** 0.5).add_(self.eps), value=-lr / c1)


def _make_optimizer(leaves: dict[str, Tensor], recipe: Recipe, stage: Stage, scale: float, kind: str):
    groups = [{"params": [t], "lr": recipe.lr[n] * stage.lr_scale * scale} for n, t in leaves.items()]
    if kind == "sgd":
        return torch.optim.SGD(groups, momentum=0.9)
    return Adam(groups)


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
    """Optimise the stage's parameter groups; the others stay fixed. Returns new params + report.
    The stage's solver decides; `optimizer` ("adam" or "sgd") is the first-order method for Adam stages."""
    if stage.solver == "lm" and optimizer == "adam":
        if getattr(objective, "residuals", None) is None:
            raise FitError(f"stage '{stage.name}': solver 'lm' needs an objective with residuals (images fitted "
                           "independently); fix: set solver = \"adam\" for this stage")
        return run_lm_stage(params, stage, objective, progress, chunks)
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


# ----------------------------------------------------------------------------- Levenberg-Marquardt
LM_LAMBDA0, LM_UP, LM_DOWN, LM_MAX_LAMBDA = 1e-3, 4.0, 3.0, 1e8


def flatten_params(params: FitParams, names: list[str]) -> Tensor:
    """The named groups of a batch as one B x P matrix."""
    return torch.cat([getattr(params, n).flatten(1) for n in names], dim=1)


def unflatten_params(params: FitParams, names: list[str], x: Tensor) -> FitParams:
    """params with the named groups read back from x B x P (the others kept)."""
    values, at = dict(params.items()), 0
    for n in names:
        t = values[n]
        k = t[0].numel()
        values[n] = x[:, at:at + k].reshape(t.shape)
        at += k
    return FitParams(**values)


def batched_jacobian(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """Residuals and their per-row Jacobian for fn: B x P -> B x M whose rows are independent
    (row b of the output depends on row b of the input only): -> (B x M, B x M x P).

    Two reverse passes instead of forward mode: g(u) = J^T u is built with its graph (at u = 0),
    and g's derivative in u applied to each of the P basis vectors gives J's columns, all P at
    once (a batched backward), each applied to every row. Torch's forward mode pays ~0.3 ms for
    every operation that mixes a differentiated tensor with a constant (its zero tangents go
    through Python), and its first use imports torch._dynamo (1.5-2 s): this does neither, and
    was as fast or faster on the fit's residuals (1.0-2x)."""
    B, P = x.shape
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        r = fn(xr)
        u = torch.zeros_like(r, requires_grad=True)
        (g,) = torch.autograd.grad((r * u).sum(), xr, create_graph=True)  # B x P, linear in u
        basis = torch.eye(P, dtype=x.dtype, device=x.device)[:, None, :].expand(P, B, P)
        cols = _batched_vjp(g, u, basis)  # P x B x M
    return r.detach(), cols.permute(1, 2, 0)


def chained_jacobian(fn: Callable[[Tensor, Tensor], list[Tensor]], q: Tensor, dq: Tensor, x: Tensor
                     ) -> tuple[Tensor, Tensor]:
    """Residuals fn(q, x) and their per-row Jacobian in x, where q = q(x) is given with its own Jacobian:
    q B x Q (the value at x), dq B x Q x P, x B x P -> (B x M, B x M x P); rows independent as in
    batched_jacobian. fn returns its residuals in parts (B x M_i each), concatenated here.

    The chain rule, J = dfn/dx + dfn/dq . dq, with batched_jacobian's two reverse passes over fn alone:
    g(u) = (dfn/dx^T u, dfn/dq^T u) is built with its graph, and its derivative in u applied to each
    column's pair (e_k, dq[..., k]) gives column k. The passes then never run through whatever makes q
    (the head model), whose Jacobian the caller can form more cheaply (fit.py: in closed form for the
    blendshape coefficients). One u per part: through a concatenation, each column's pass would fill
    and add an M-long gradient per part."""
    B, P = x.shape
    with torch.enable_grad():
        xr, qr = x.detach().requires_grad_(True), q.detach().requires_grad_(True)
        parts = fn(qr, xr)
        us = [torch.zeros_like(p, requires_grad=True) for p in parts]
        inner = sum((p * u).sum() for p, u in zip(parts, us, strict=True))
        gx, gq = torch.autograd.grad(inner, (xr, qr), create_graph=True, allow_unused=True)
        outputs, bases = [], []
        if gx is not None and gx.requires_grad:
            outputs.append(gx)
            bases.append(torch.eye(P, dtype=x.dtype, device=x.device)[:, None, :].expand(P, B, P))
        if gq is not None and gq.requires_grad:
            outputs.append(gq)
            bases.append(dq.permute(2, 0, 1))
        r = torch.cat([p.detach() for p in parts], dim=1)
        if not outputs:  # fn does not depend on x at all
            return r, r.new_zeros(B, r.shape[1], P)
        cols = _batched_vjp(outputs, us, bases)  # P x B x M_i per part; None where a part is constant
        cols = [c if c is not None else p.new_zeros(P, *p.shape) for c, p in zip(cols, parts, strict=True)]
    return r, torch.cat(cols, dim=2).permute(1, 2, 0)


def _batched_vjp(output: Tensor | list[Tensor], inp: Tensor | list[Tensor], grads: Tensor | list[Tensor]
                 ) -> Tensor | tuple[Tensor, ...]:
    """torch.autograd.grad(output, inp, grads, is_grads_batched=True), run the way torch runs it but
    without its check of the grads' shapes, whose first use imports sympy: 0.4-0.5 s inside every fit
    command's first least-squares stage. The shapes here are ours (grads: N x output's; several
    outputs, each with its grads, sum their products). One input gives one tensor; a list a tuple, with
    None for an input the outputs do not depend on. If torch's internals move, the public call is used."""
    outputs = tuple(output) if isinstance(output, list) else (output,)
    grads = tuple(grads) if isinstance(grads, list) else (grads,)
    inputs = tuple(inp) if isinstance(inp, list) else (inp,)
    unused = len(inputs) > 1  # several inputs: one the outputs do not reach gets None
    try:
        from torch._vmap_internals import _vmap
        from torch.autograd.graph import _engine_run_backward
    except ImportError:
        out = torch.autograd.grad(outputs, inputs, grads, is_grads_batched=True, allow_unused=unused)
    else:
        def vjp(*g: Tensor) -> tuple:
            return _engine_run_backward(outputs, g, False, False, inputs, unused, accumulate_grad=False)

        out = _vmap(vjp, (0,) * len(grads), 0, allow_none_pass_through=True)(*grads)
    return tuple(out) if isinstance(inp, list) else out[0]


def normal_equations(J: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """J^T J and J^T r per row, in float64 (normal equations square the condition number):
    J B x M x P, r B x M -> H B x P x P, g B x P. Made once per Jacobian; only the damping changes
    between an iteration's trial steps."""
    J64, r64 = J.double(), r.double()
    return J64.transpose(1, 2) @ J64, (J64.transpose(1, 2) @ r64[..., None])[..., 0]


def lm_step(H: Tensor, g: Tensor, lam: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Damped Gauss-Newton step per row: H B x P x P, g B x P (normal_equations), lam B -> delta
    B x P solving (H + lam diag(H) + tiny I) delta = -g. Columns that do not move the residuals
    (zero Jacobian) get a zero step; a singular system gives a row of NaN (rejected by the caller)."""
    diag = torch.diagonal(H, dim1=1, dim2=2)
    damp = lam.double()[:, None] * diag + 1e-9 * diag.mean(1, keepdim=True).clamp_min(1e-12)
    A = H + torch.diag_embed(damp)
    if A.is_cuda:
        return -torch.linalg.solve(A, g[..., None])[..., 0].to(dtype)
    # on the CPU one row at a time: torch's batched LU runs MKL's threaded dgetrf inside its own
    # parallel loop, and that nested OpenMP region was seen to spin forever with 2 threads (numpy's
    # solve, used before, competed with torch's spinning threads: ~5 ms instead of 0.2)
    rows = []
    for a, b in zip(A, g, strict=True):
        x, info = torch.linalg.solve_ex(a, b[:, None])
        rows.append(x[:, 0] if int(info) == 0 else torch.full_like(b, float("nan")))
    return -torch.stack(rows).to(dtype)


def run_lm_stage(params: FitParams, stage: Stage, objective: Objective, progress: Progress | None = None,
                 chunks: list[Tensor] | None = None) -> tuple[FitParams, StageReport]:
    """Levenberg-Marquardt over the stage's groups, per image; stops when every image's relative
    decrease is below stage.tol (or after stage.iterations Jacobians). Images in `chunks` are
    solved one chunk at a time (they are independent)."""
    start = time.perf_counter()
    params = params.detach()
    chunks = chunks if chunks is not None else [torch.arange(params.batch, device=params.shape.device)]
    names = list(stage.params)
    x = flatten_params(params, names)
    events: list[str] = []
    term_values: dict[str, list[Tensor]] = {}
    iterations = 0
    structured = getattr(objective, "residual_jacobian", None)
    for rows in chunks:
        base = params.select(rows.tolist())
        xc = x[rows].clone()

        def residual_fn(v: Tensor, base=base, rows=rows) -> Tensor:  # v: this chunk's rows
            return objective.residuals(unflatten_params(base, names, v), stage, rows)

        def value(v: Tensor, rows=rows) -> tuple[Tensor, dict]:  # the whole batch, this chunk's rows replaced
            with torch.no_grad():
                full = x.clone()
                full[rows] = v
                return objective(unflatten_params(params, names, full), stage, rows)

        f, terms = value(xc)
        if not torch.isfinite(f).all():
            raise FitError(f"stage '{stage.name}': the objective is not finite at the start; fix: check the "
                           "landmarks and the initial parameters")
        lam = torch.full_like(f, LM_LAMBDA0)
        active = torch.ones_like(f, dtype=torch.bool)
        for it in range(1, stage.iterations + 1):
            rJ = structured(unflatten_params(base, names, xc), names, stage, rows) if structured else None
            r, J = rJ if rJ is not None else batched_jacobian(residual_fn, xc)
            H, g = normal_equations(J, r)
            pending, gain = active.clone(), torch.zeros_like(f)
            for _ in range(6):  # per image: grow lambda until its step lowers the objective
                delta = lm_step(H, g, lam, xc.dtype)
                bad = ~torch.isfinite(delta).all(1)
                trial = xc + torch.where((pending & ~bad)[:, None], torch.nan_to_num(delta), 0.0)
                f_new, terms_new = value(trial)
                finite = torch.isfinite(f_new)
                if ((~finite | bad) & pending).any():  # rolled back: the image keeps its last good state
                    events.append(f"iteration {it}: non-finite trial step rejected, damping raised")
                ok = finite & (f_new <= f) & pending & ~bad
                gain = torch.where(ok, (f - f_new) / f.abs().clamp_min(1e-12), gain)
                xc = torch.where(ok[:, None], trial, xc)
                f = torch.where(ok, f_new, f)
                terms = {k: torch.where(ok, terms_new[k], v) for k, v in terms.items()}
                lam = torch.where(ok, (lam / LM_DOWN).clamp_min(1e-7), lam)
                pending = pending & ~ok
                lam = torch.where(pending, lam * LM_UP, lam)
                if not pending.any():
                    break
            converged = ~pending & (gain < stage.tol)
            active = active & ~converged & (lam < LM_MAX_LAMBDA)
            iterations = max(iterations, it)
            if progress is not None:
                progress(stage.name, it, stage.iterations, {k: float(v.sum()) for k, v in terms.items()})
            if not active.any():
                break
        x[rows] = xc
        for k, v in terms.items():
            term_values.setdefault(k, []).append(v)
    out = unflatten_params(params, names, x).detach()
    losses = {k: [float(t) for t in torch.cat(v)] for k, v in term_values.items()}
    return out, StageReport(stage.name, iterations, time.perf_counter() - start, losses, events)
