"""The dense landmark term in the fit: iris points drive the gaze, detected points weigh less."""

import numpy as np
import torch

from fitter.camera import default_focal_px
from fitter.fit import Targets, make_objective, make_setup
from fitter.losses import TERMS, Context
from fitter.optimize import run_stage
from fitter.params import FitParams
from fitter.recipe import parse_recipe
from fitter.synth import synthesize


def eye_triangles(model, per_eye: int = 12) -> np.ndarray:
    """Some triangles on each eyeball's front (stand-ins for the 10 iris points) and on the face."""
    w = model.weights.numpy()
    faces = model.faces.numpy()
    z = model.v_template.numpy()[:, 2]
    picks = []
    for joint in (3, 4):
        on_eye = np.nonzero((w[faces, joint] > 0.5).all(1))[0]
        front = on_eye[np.argsort(-z[faces[on_eye]].mean(1))][:per_eye]
        picks.append(front)
    skin = np.nonzero((w[faces, 3:] < 0.01).all(1))[0][::997][:20]
    return np.concatenate(picks + [skin])


def test_iris_points_recover_a_known_gaze(standin_path):
    from fitter.fit import load_flame

    m = load_flame(standin_path)  # its own copy: attach_dense changes the model's lean buffers
    tris = eye_triangles(m)
    bary = np.full((len(tris), 3), 1 / 3, np.float32)
    m.attach_dense(tris, bary)
    res = 224
    truth = FitParams.initial(1, m.n_shape, m.n_exp, m.n_verts)
    focal = default_focal_px(res, res) / (res / 2)
    truth.cam = torch.tensor([[7.5, 0.0, 0.02, focal, 0.0, 0.0]])
    truth.eye_pose = torch.tensor([[0.0, 0.25, 0.0, 0.0, 0.25, 0.0]])  # both eyes look 14 degrees aside
    with torch.no_grad():
        pred = synthesize(m, truth, res, render=False)
    n = len(tris)
    targets = Targets(torch.zeros(1, 3, res, res), pred["landmarks2d"], torch.ones(1, 1, res, res), torch.ones(68),
                      torch.tensor([focal]), torch.zeros(1, 2), pred["dense2d"], torch.ones(1, n))
    data = {"lr": {"eye_pose": 0.01}, "stages": {"gaze": {
        "iterations": 20, "params": ["eye_pose"], "solver": "lm", "tol": 1e-8,
        "weights": {"dense_landmark": 1.0, "eye_limit": 1.0}}}}
    recipe = parse_recipe(data, "t", "t")
    setup = make_setup(m, recipe)
    start = FitParams(**{**dict(truth.items()), "eye_pose": torch.zeros(1, 6)})
    out, rep = run_stage(start, recipe, recipe.stages[0], make_objective(setup, targets))
    torch.testing.assert_close(out.eye_pose, truth.eye_pose, atol=5e-3, rtol=0)
    # without the dense points (no detection: weights 0) the gaze has nothing to go on
    blind = Targets(*[getattr(targets, f) for f in ("image", "landmarks", "mask", "lmk_weights", "focal",
                                                     "principal", "dense")], torch.zeros(1, n))
    out0, _ = run_stage(start, recipe, recipe.stages[0], make_objective(setup, blind))
    assert out0.eye_pose.abs().max() < 1e-4


def test_detector_trust_scales_the_landmark_terms():
    B = 2
    params = FitParams.initial(B, 3, 2, 5)
    pred = {"landmarks2d": torch.rand(B, 68, 2) * 100}
    target = Targets(torch.zeros(B, 3, 8, 8), torch.rand(B, 68, 2) * 100, torch.ones(B, 1, 8, 8), torch.ones(68),
                     trust=torch.tensor([1.0, 0.1]))
    full = Targets(target.image, target.landmarks, target.mask, target.lmk_weights)
    c, c1 = Context(params, pred, target, 224), Context(params, pred, full, 224)
    for name in ("landmark", "eye_closure", "lip_distance"):
        v, v1 = TERMS[name].fn(c), TERMS[name].fn(c1)
        torch.testing.assert_close(v, v1 * torch.tensor([1.0, 0.1]))
        r, r1 = TERMS[name].residual(c), TERMS[name].residual(c1)
        torch.testing.assert_close((r ** 2).sum(1), (r1 ** 2).sum(1) * torch.tensor([1.0, 0.1]))


def test_a_stages_own_detector_trust_weighs_detected_points_only(synthetic_model_dir):
    """A stage's detector_trust replaces the recipe's for that stage: a detected image's landmark
    terms scale by their ratio (in the Adam and the least-squares forms), a given image's stay."""
    from fitter.fit import load_flame

    m = load_flame(synthetic_model_dir)
    stage = {"iterations": 1, "params": ["exp"], "weights": {"landmark": 1.0, "eye_closure": 0.5}}
    data = {"detector_trust": 0.5, "lr": {"exp": 0.01},
            "stages": {"a": dict(stage), "b": {**stage, "detector_trust": 0.125}}}
    recipe = parse_recipe(data, "t", "t")
    assert [s.detector_trust for s in recipe.stages] == [None, 0.125]
    B, res = 2, 64
    torch.manual_seed(3)
    params = FitParams.initial(B, m.n_shape, m.n_exp, m.n_verts)
    params.cam = torch.tensor([[7.5, 0.0, 0.0, 2.4, 0.0, 0.0]]).repeat(B, 1)
    detected = torch.tensor([False, True])  # image 0 given (trust 1), image 1 detected (the recipe's 0.5)
    targets = Targets(torch.zeros(B, 3, res, res), torch.rand(B, 68, 2) * res, torch.ones(B, 1, res, res),
                      torch.ones(68), torch.tensor([2.4, 2.4]), torch.zeros(B, 2), trust=torch.tensor([1.0, 0.5]),
                      detected=detected)
    objective = make_objective(make_setup(m, recipe), targets)
    rows = torch.arange(B)
    _, terms_a = objective(params, recipe.stages[0], rows)
    _, terms_b = objective(params, recipe.stages[1], rows)
    for name in ("landmark", "eye_closure"):
        torch.testing.assert_close(terms_b[name], terms_a[name] * torch.tensor([1.0, 0.25]))
    ra = objective.residuals(params, recipe.stages[0], rows)
    rb = objective.residuals(params, recipe.stages[1], rows)
    torch.testing.assert_close((rb ** 2).sum(1), (ra ** 2).sum(1) * torch.tensor([1.0, 0.25]))


def test_the_landmark_stages_jacobian_through_the_models_points(synthetic_model_dir):
    """objective.residual_jacobian (the chain rule through the model's points, their coefficient
    derivative in closed form) gives autodiff's Jacobian of the same residuals, on a model with pose
    correctives and dense points, every geometry group free; and neither Jacobian's double reverse
    pass falls back to one column at a time inside torch's vmap (tensor indexing, in-place writes
    and clamps did, and cost most of the Jacobian's time)."""
    import warnings

    from fitter.fit import load_flame
    from fitter.optimize import batched_jacobian, flatten_params, unflatten_params

    m = load_flame(synthetic_model_dir)  # its own copy (attach_dense changes it)
    rng = np.random.default_rng(8)
    n = 30
    m.attach_dense(rng.integers(0, m.faces.shape[0], n), rng.dirichlet(np.ones(3), n))
    res = 224
    torch.manual_seed(8)
    truth = FitParams.initial(2, m.n_shape, m.n_exp, m.n_verts)
    truth.cam = torch.tensor([[7.5, 0.0, 0.02, 2.4, 0.0, 0.0], [6.0, 0.01, -0.02, 2.0, 0.0, 0.0]])
    truth.global_pose, truth.neck_pose = torch.tensor([[0.1, 0.5, 0.0], [0.0, -0.3, 0.1]]), 0.1 * torch.randn(2, 3)
    truth.jaw_pose, truth.eye_pose = torch.tensor([[0.2, 0.0, 0.0], [0.1, 0.0, 0.0]]), 0.1 * torch.randn(2, 6)
    truth.shape, truth.exp = torch.randn(2, m.n_shape), torch.randn(2, m.n_exp)
    with torch.no_grad():
        pred = synthesize(m, truth, res, render=False)
    noisy = lambda t: t + 2.0 * torch.randn_like(t)  # noqa: E731
    targets = Targets(torch.zeros(2, 3, res, res), noisy(pred["landmarks2d"]), torch.ones(2, 1, res, res),
                      torch.ones(68), torch.tensor([2.2, 2.2]), torch.zeros(2, 2), noisy(pred["dense2d"]),
                      torch.ones(2, n))
    names = ["cam", "global_pose", "neck_pose", "jaw_pose", "eye_pose", "shape", "exp"]
    weights = {"landmark": 1.0, "dense_landmark": 1.0, "eye_closure": 0.5, "lip_distance": 0.5, "shape_prior": 1e-4,
               "exp_prior": 1e-4, "jaw_limit": 1.0, "neck_prior": 1e-3, "focal_prior": 1e-2, "eye_limit": 1.0}
    stages = {"lmk": {"iterations": 5, "params": names, "solver": "lm", "weights": weights}}
    recipe = parse_recipe({"lr": dict.fromkeys(names, 0.01), "stages": stages}, "t", "t")
    stage, rows = recipe.stages[0], torch.arange(2)
    objective = make_objective(make_setup(m, recipe), targets)
    start = FitParams(**{**dict(truth.items()), "shape": truth.shape * 0.5, "exp": truth.exp * 0.5})
    x = flatten_params(start, names)
    fallback = getattr(torch._C, "_debug_only_display_vmap_fallback_warnings", None)
    if fallback is not None:
        fallback(True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r, J = objective.residual_jacobian(start, names, stage, rows)
            r0, J0 = batched_jacobian(lambda v: objective.residuals(unflatten_params(start, names, v), stage, rows), x)
    finally:
        if fallback is not None:
            fallback(False)
    torch.testing.assert_close(r, r0)
    torch.testing.assert_close(J, J0, atol=2e-5 * float(J0.abs().max()), rtol=1e-4)
    assert J.shape == (2, r0.shape[1], x.shape[1]) and (J[..., -m.n_exp:].abs().amax() > 0)
    assert not [w for w in caught if "batching rule" in str(w.message)], caught[0].message if caught else ""
