"""The stage loop on objectives with known minima, rollback on non-finite loss, early stop."""

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
