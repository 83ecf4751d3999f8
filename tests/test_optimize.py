"""The stage loop on objectives with known minima, rollback on non-finite loss, early stop."""

from pathlib import Path

import torch

from fitter.optimize import run_stage
from fitter.params import FitParams
from fitter.recipe import parse_recipe


def recipe(iterations=300, patience=0, lr=0.05):
    data = {"lr": {"shape": lr, "exp": lr},
            "stages": {"s": {"iterations": iterations, "params": ["shape"], "weights": {"shape_prior": 1.0},
                             "patience": patience, "tol": 1e-6}}}
    return parse_recipe(data, "test", "test")


def quadratic_objective(goal):
    def objective(params, stage, rows):
        d = ((params.shape[rows] - goal[rows]) ** 2).sum(1)
        return d, {"quad": d}
    return objective


def test_adam_reaches_known_minimum():
    p = FitParams.initial(2, 3, 2, 5)
    goal = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.3, -1.0]])
    r = recipe()
    out, rep = run_stage(p, r, r.stages[0], quadratic_objective(goal))
    torch.testing.assert_close(out.shape, goal, atol=2e-3, rtol=0)
    assert rep.iterations == 300 and len(rep.losses["quad"]) == 2
    torch.testing.assert_close(out.exp, p.exp)  # not in the stage: untouched


def test_non_finite_loss_rolls_back_and_lowers_lr():
    p = FitParams.initial(1, 2, 2, 5)
    goal = torch.tensor([[0.5, 0.5]])
    calls = {"n": 0}
    base = quadratic_objective(goal)

    def objective(params, stage, rows):
        calls["n"] += 1
        total, terms = base(params, stage, rows)
        if calls["n"] == 5:
            return total * float("nan"), terms
        return total, terms

    r = recipe(iterations=200)
    out, rep = run_stage(p, r, r.stages[0], objective)
    assert any("non-finite" in e for e in rep.events)
    assert torch.isfinite(out.shape).all()
    torch.testing.assert_close(out.shape, goal, atol=2e-2, rtol=0)


def test_early_stop_on_plateau():
    p = FitParams.initial(1, 2, 2, 5)
    r = recipe(iterations=1000, patience=10)
    _, rep = run_stage(p, r, r.stages[0], lambda params, s, rows: (params.shape.sum(1) * 0 + 1.0, {}))
    assert rep.iterations == 11  # first value sets the best, then 10 without improvement


def test_chunks_give_the_same_steps_as_one_batch():
    goal = torch.randn(5, 3)
    r = recipe(iterations=40)
    p = FitParams.initial(5, 3, 2, 4)
    whole, _ = run_stage(p, r, r.stages[0], quadratic_objective(goal))
    chunked, rep = run_stage(p, r, r.stages[0], quadratic_objective(goal),
                             chunks=[torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4])])
    torch.testing.assert_close(chunked.shape, whole.shape)
    assert len(rep.losses["quad"]) == 5


# ----------------------------------------------------------------------------- Levenberg-Marquardt
def lm_recipe(solver, iterations, lr=0.02):
    data = {"lr": {"shape": lr},
            "stages": {"s": {"iterations": iterations, "params": ["shape"], "weights": {"shape_prior": 1.0},
                             "solver": solver, "tol": 1e-10}}}
    return parse_recipe(data, "test", "test")


def curve_residuals(goal):
    """A small nonlinear least-squares problem per image (3 unknowns, 5 residuals, one exact optimum
    at `goal` when the data come from it, plus a prior that moves it a little)."""
    def residuals(chunk, stage, rows):
        a, b, c = chunk.shape[:, 0], chunk.shape[:, 1], chunk.shape[:, 2]
        g = goal[rows]
        f = lambda a, b, c: torch.stack([torch.exp(0.5 * a), a * b, b + c * c, torch.sin(c) + a, 0.3 * a * c], 1)  # noqa
        data = f(a, b, c) - f(g[:, 0], g[:, 1], g[:, 2])
        return torch.cat([data, 0.1 * chunk.shape], dim=1)

    def objective(params, stage, rows):
        r = residuals(params.select(rows.tolist()), stage, rows)
        v = (r * r).sum(1)
        return v, {"curve": v}

    objective.residuals = residuals
    return objective


def test_lm_jacobian_matches_finite_differences():
    from fitter.optimize import batched_jacobian

    goal = torch.tensor([[0.5, -1.0, 0.8], [1.2, 0.3, -0.5]], dtype=torch.float64)
    p = FitParams.initial(2, 3, 2, 5).map(lambda t: t.double())
    obj = curve_residuals(goal)
    x = torch.tensor([[0.1, 0.2, 0.3], [-0.4, 0.5, 0.9]], dtype=torch.float64)
    fn = lambda v: obj.residuals(FitParams(**{**dict(p.items()), "shape": v}), None, torch.arange(2))  # noqa: E731
    r, J = batched_jacobian(fn, x)
    eps = 1e-6
    fd = torch.stack([(fn(x + eps * torch.eye(3, dtype=x.dtype)[k]) - fn(x - eps * torch.eye(3, dtype=x.dtype)[k]))
                      / (2 * eps) for k in range(3)], dim=2)
    torch.testing.assert_close(J, fd, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(r, fn(x))


def test_chained_jacobian_is_the_chain_rule():
    """chained_jacobian(fn, q(x), dq/dx, x) against finite differences of x -> fn(q(x), x), with a part that
    uses x directly, one that uses q and x, one constant part and an empty one."""
    from fitter.optimize import chained_jacobian

    A = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0], [0.0, 1.0, 1.0], [2.0, 0.0, -1.0]], dtype=torch.float64)

    def q_of(x):  # B x 3 -> B x 4, nonlinear
        return torch.sin(x @ A.T) + x[:, :1] ** 2

    def fn(q, x):
        return [x ** 2 - 1.0, (q[:, :2] * x[:, 1:]).exp(), torch.ones_like(x[:, :1]), x[:, :0]]

    x = torch.tensor([[0.1, -0.3, 0.7], [0.4, 0.2, -0.5]], dtype=torch.float64)
    B, P = x.shape
    dq = torch.stack([torch.autograd.functional.jacobian(lambda v: q_of(v[None])[0], x[b]) for b in range(B)])
    r, J = chained_jacobian(fn, q_of(x), dq, x)
    whole = lambda v: torch.cat(fn(q_of(v), v), dim=1)  # noqa: E731
    eps, eye = 1e-6, torch.eye(P, dtype=x.dtype)
    fd = torch.stack([(whole(x + eps * eye[k]) - whole(x - eps * eye[k])) / (2 * eps) for k in range(P)], dim=2)
    torch.testing.assert_close(r, whole(x))
    torch.testing.assert_close(J, fd, atol=1e-7, rtol=1e-6)
    assert J.shape == (B, 3 + 2 + 1, P) and (J[:, 5] == 0).all()


def test_the_jacobian_does_not_import_sympy():
    """torch's public batched backward checks the grads' shapes with a module whose first import
    pulls in sympy (0.4-0.5 s of every fit command); batched_jacobian runs it without that check,
    with the same columns (the test above) and without the import, in a fresh interpreter."""
    import subprocess
    import sys

    code = ("import sys, torch; from fitter.optimize import batched_jacobian; "
            "r, J = batched_jacobian(lambda x: torch.cat([x * x, x.sum(1, keepdim=True)], 1), torch.ones(2, 3)); "
            "print(J.shape, 'sympy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch.Size([2, 4, 3]) False"


def test_lm_reaches_adams_optimum_in_a_few_steps():
    goal = torch.tensor([[0.5, -1.0, 0.8], [1.2, 0.3, -0.5]])
    p = FitParams.initial(2, 3, 2, 5)
    obj = curve_residuals(goal)
    r_lm, r_adam = lm_recipe("lm", 30), lm_recipe("adam", 4000)
    lm, rep_lm = run_stage(p, r_lm, r_lm.stages[0], obj)
    adam, _ = run_stage(p, r_adam, r_adam.stages[0], obj)
    torch.testing.assert_close(lm.shape, adam.shape, atol=3e-3, rtol=0)
    assert rep_lm.iterations <= 30
    v_lm, v_adam = obj(lm, None, torch.arange(2))[0], obj(adam, None, torch.arange(2))[0]
    assert (v_lm <= v_adam + 1e-6).all()
    assert (lm.shape - goal).abs().max() < 0.2  # the prior only nudges the optimum off the data's


def test_lm_rejects_non_finite_steps():
    goal = torch.tensor([[0.5, -1.0, 0.8]])
    base = curve_residuals(goal)
    calls = {"n": 0}

    def objective(params, stage, rows):
        calls["n"] += 1
        v, terms = base(params, stage, rows)
        if calls["n"] in (2, 3):  # the first trial steps come back NaN
            v = v * float("nan")
        return v, terms

    objective.residuals = base.residuals
    r = lm_recipe("lm", 40)
    out, rep = run_stage(FitParams.initial(1, 3, 2, 5), r, r.stages[0], objective)
    assert torch.isfinite(out.shape).all()
    assert any("non-finite" in e for e in rep.events)
    torch.testing.assert_close(out.shape, run_stage(FitParams.initial(1, 3, 2, 5), r, r.stages[0], base)[0].shape,
                               atol=1e-3, rtol=0)


def test_lm_refuses_terms_without_a_least_squares_form():
    import pytest

    from priors.errors import RecipeError

    data = {"lr": {"shape": 0.1, "light": 0.1, "albedo": 0.1},
            "stages": {"s": {"iterations": 3, "params": ["shape"], "weights": {"photo": 1.0}, "solver": "lm"}}}
    with pytest.raises(RecipeError, match="'photo' has no least-squares form"):
        parse_recipe(data, "test", "test")


def test_lm_in_chunks_solves_each_image_against_its_own_data():
    goal = torch.tensor([[0.5, -1.0, 0.8], [1.2, 0.3, -0.5], [-0.3, 0.6, 0.2]])
    obj, r = curve_residuals(goal), lm_recipe("lm", 30)
    whole, _ = run_stage(FitParams.initial(3, 3, 2, 5), r, r.stages[0], obj)
    chunked, _ = run_stage(FitParams.initial(3, 3, 2, 5), r, r.stages[0], obj,
                           chunks=[torch.tensor([0]), torch.tensor([1, 2])])
    torch.testing.assert_close(chunked.shape, whole.shape, atol=1e-5, rtol=0)


def test_least_squares_stages_import_no_dynamo(standin_path, photo_set):
    """The issue's lazy start-up: a fit whose stages are least squares (Jacobians by two reverse
    passes) runs without importing torch._dynamo, which torch's forward mode imports on first use
    (1.5-2 s of every command), nor scipy.spatial (0.2-0.3 s; only the albedo terms' mirror index
    needs it, and the fast recipe has none)."""
    import subprocess
    import sys

    folder, cases = photo_set
    code = ("import sys; from fitter.fit import fit_images; "
            f"[r] = fit_images([{str(cases[0][0])!r}], recipe='fast', model={str(standin_path)!r}, "
            f"landmarks={str(folder)!r}, detector='file'); "
            "assert r.report['stages'][0]['iterations'] > 0; "
            "print('torch._dynamo' in sys.modules, 'scipy.spatial' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip().splitlines()[-1] == "False False"
