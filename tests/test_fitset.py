"""fit-set: one identity from several photos (shared shape, or per-image shapes tied by the
RingNet-style consistency term), through the library and the CLI, on synthetic photos of one
known face rendered with the stand-in (exact landmark files, small crops, no photometric stage
unless stated, so the whole module runs in seconds)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
from bench.identity import neutral_vertices
from tests.synthetic import as_default_pinhole
from bench.synthetic import face_error_mm, face_region, random_params, render_photo, write_case
from fitter.fit import make_setup, prepare_target
from fitter.fitset import Identity, fit_identity, fit_set, load_negative_shapes, write_identity
from fitter.params import FitParams, load_fit, save_fit
from fitter.recipe import load_recipe
from priors.errors import UsageError

SMALL = ["resolution=96", "stages.photometric.iterations=0"]  # landmark stages only, 96 px crops
YAWS = (-25.0, 0.0, 25.0)


@pytest.fixture(scope="module")
def one_person(standin_model, tmp_path_factory):
    """Three photos of one synthetic identity (same shape; own expression, jaw, yaw, light,
    background), 160 px, each with its exact landmarks as <stem>.npy next to it.
    Returns (folder, paths, true shape)."""
    folder = tmp_path_factory.mktemp("person")
    rng = np.random.default_rng(1)
    shape = rng.normal(0, 1, standin_model.n_shape).astype(np.float32)
    paths = []
    for k, yaw in enumerate(YAWS):
        params = as_default_pinhole(random_params(standin_model, rng, shape=shape, yaw_deg=yaw), 160)
        image, lmk = render_photo(standin_model, params, rng, size=160)
        paths.append(write_case(folder, f"img{k}", image, lmk))
    return folder, paths, shape


def prepared(model, paths, overrides=()):
    recipe = load_recipe("identity-set", [*SMALL, *overrides])
    targets = [prepare_target(p, recipe.resolution, p.with_suffix(".npy")) for p in paths]
    return make_setup(model, recipe), targets


def run(*args):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


# ----------------------------------------------------------------------------- library
def test_shared_mode_one_shape_own_expressions(standin_model, one_person):
    folder, paths, shape = one_person
    identity, results = fit_set(paths, model=standin_model, detector="file", landmarks=folder, overrides=SMALL)
    assert identity.shape_mode == "shared" and identity.spread == 0.0
    assert identity.images == ["img0", "img1", "img2"] and identity.shape.shape == (standin_model.n_shape,)
    assert [r.target.stem for r in results] == identity.images
    for r in results:  # every image uses exactly the identity's shape (and albedo)
        assert np.array_equal(r.params.shape[0].numpy(), identity.shape)
        assert np.array_equal(r.params.albedo[0].numpy(), identity.albedo)
        assert r.report["shape_mode"] == "shared" and r.report["landmark_rmse_px"] < 1.5
    exps = [r.params.exp[0] for r in results]
    for i in range(3):
        for j in range(i):
            assert float((exps[i] - exps[j]).abs().max()) > 0.1  # own expressions
    # the identity's neutral geometry (shape only) against the truth; measured 1.03 mm, the mean
    # template (zero shape) is 1.87 mm off
    region = face_region(standin_model)
    truth = neutral_vertices(standin_model, shape)
    err = face_error_mm(neutral_vertices(standin_model, identity.shape), truth, region)
    template = face_error_mm(neutral_vertices(standin_model, np.zeros_like(shape)), truth, region)
    assert err < 1.3 and err < 0.7 * template


def test_negatives_from_fit_and_identity_files(standin_model, tmp_path):
    n = standin_model.n_shape
    a, b = np.linspace(-1, 1, n, dtype=np.float32), np.full(n, 0.25, np.float32)
    params = FitParams.initial(1, n, standin_model.n_exp, standin_model.n_verts)
    params.shape = torch.from_numpy(a)[None]
    (tmp_path / "other").mkdir()
    save_fit(tmp_path / "other" / "fit.npz", params, {})
    write_identity(tmp_path / "set", Identity(b, np.zeros(3, np.float32), ["x"], "shared", 0.0))
    neg = load_negative_shapes([tmp_path / "other" / "fit.npz", tmp_path / "set" / "identity.npz"], n)
    assert neg.shape == (2, n) and neg.dtype == torch.float32
    assert np.array_equal(neg[0].numpy(), a) and np.array_equal(neg[1].numpy(), b)
    from_dir = load_negative_shapes([tmp_path], n)  # folders: every fit.npz, then every identity.npz inside
    assert np.array_equal(from_dir.numpy(), neg.numpy())
    assert load_negative_shapes([], n) is None and load_negative_shapes(None, n) is None
    with pytest.raises(UsageError, match="shape coefficients"):
        load_negative_shapes([tmp_path / "set" / "identity.npz"], n + 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no fit.npz or identity.npz"):
        load_negative_shapes([tmp_path / "empty"], n)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "identity.npz").write_text("not an npz")
    with pytest.raises(UsageError, match="identity.npz"):
        load_negative_shapes([tmp_path / "broken"], n)


def test_consistency_mode_pulls_shapes_together(standin_model, one_person, tmp_path):
    folder, paths, _ = one_person
    n = standin_model.n_shape
    # one negative of each kind: a fit.npz and an identity.npz of "other people"
    rng = np.random.default_rng(5)
    params = FitParams.initial(1, n, standin_model.n_exp, standin_model.n_verts)
    params.shape = torch.from_numpy(rng.normal(0, 1, n).astype(np.float32))[None]
    save_fit(tmp_path / "fit.npz", params, {})
    write_identity(tmp_path / "other", Identity(rng.normal(0, 1, n).astype(np.float32), np.zeros(3, np.float32),
                                                ["y"], "shared", 0.0))
    negatives = [tmp_path / "fit.npz", tmp_path / "other" / "identity.npz"]
    weight = "stages.landmarks.weights.shape_consistency="
    fits = {}
    for w in (0.0, 1e-2):
        fits[w] = fit_set(paths, model=standin_model, detector="file", landmarks=folder, shape_mode="consistency",
                          negatives=negatives, overrides=[*SMALL, f"{weight}{w}"], seed=0)
    for identity, results in fits.values():
        shapes = np.stack([r.params.shape[0].numpy() for r in results])
        assert identity.shape_mode == "consistency"
        assert not np.array_equal(shapes[0], shapes[1]) and not np.array_equal(shapes[1], shapes[2])
        np.testing.assert_allclose(identity.shape, shapes.mean(0), atol=1e-6)  # the identity is the mean
        spread = np.sqrt(((shapes - shapes.mean(0)) ** 2).sum(1).mean())
        assert identity.spread == pytest.approx(spread, rel=1e-4)
    loose, tight = fits[0.0][0].spread, fits[1e-2][0].spread
    assert tight < 0.25 * loose, (tight, loose)  # measured: 0.065 against 1.61


# ----------------------------------------------------------------------------- mini-batches
@pytest.mark.parametrize("mode", ["shared", "consistency"])
def test_mini_batches_match_one_batch(standin_model, one_person, mode):
    """Gradients are accumulated over mini-batches before each Adam step, so the optimisation is
    the same; only float32 summation order differs. That difference stays ~1e-5 for the first
    ~190 landmark iterations, then Adam amplifies it (shared mode, 250 iterations: 0.05 in shape
    coefficients, 0.02 mm of geometry; in float64 the two agree to 1e-12). Hence a shorter stage
    here, and no early stop (the plateau test could flip on a rounding-level difference)."""
    _, paths, _ = one_person
    setup, targets = prepared(standin_model, paths, ["stages.landmarks.iterations=50", "stages.rigid.patience=0",
                                                     "stages.landmarks.patience=0"])
    (one, r1), (three, r3) = (fit_identity(targets, setup, mode, batch_size=b, seed=0) for b in (1, 3))
    np.testing.assert_allclose(one.shape, three.shape, atol=1e-4)
    for a, b in zip(r1, r3, strict=True):
        for name in ("shape", "exp", "global_pose", "jaw_pose", "cam"):
            torch.testing.assert_close(getattr(a.params, name), getattr(b.params, name), atol=1e-4, rtol=0)


def test_fit_identity_leaves_setup_alone(standin_model, one_person):
    _, paths, _ = one_person
    setup, targets = prepared(standin_model, paths[:2], ["stages.landmarks.iterations=5", "stages.rigid.iterations=5"])
    before = set(setup.extra)
    fit_identity(targets, setup, "consistency", negatives=torch.zeros(1, standin_model.n_shape))
    assert "negatives" not in setup.extra and set(setup.extra) == before  # no leak into the next fit
    with pytest.raises(UsageError, match="shape-mode"):
        fit_identity(targets, setup, "joint")


# ----------------------------------------------------------------------------- CLI
def test_cli_fit_set_writes_identity_and_per_image_fits(standin_path, one_person, tmp_path):
    folder, paths, _ = one_person
    out = tmp_path / "out"
    r = run("fit-set", folder, "--out", out, "--landmarks", folder, "--detector", "file", "--model", standin_path,
            "--set", "resolution=96", "--set", "stages.photometric.iterations=3", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["failed"] == 0 and summary["shape_mode"] == "shared"
    assert [row["status"] for row in summary["results"]] == ["ok"] * 3
    with np.load(out / "identity.npz") as data:
        assert {"shape", "albedo", "images"} <= set(data.files)
        shape, albedo, images = data["shape"], data["albedo"], list(data["images"])
    assert images == ["img0", "img1", "img2"] and shape.shape == (100,) and albedo.shape == (12788, 3)
    for stem in images:
        assert sorted(p.name for p in (out / stem).iterdir()) == ["fit.json", "fit.npz", "mesh.obj", "overlay.png"]
        params, extras = load_fit(out / stem / "fit.npz")
        assert np.array_equal(params.shape[0].numpy(), shape)
        report = json.loads((out / stem / "fit.json").read_text())
        assert report["recipe"] == "identity-set" and report["shape_mode"] == "shared"
        assert [s["name"] for s in report["stages"]] == ["rigid", "landmarks", "photometric"]


def test_cli_fit_set_skips_a_corrupt_image(standin_path, one_person, tmp_path):
    folder, paths, _ = one_person
    images = tmp_path / "images"
    images.mkdir()
    for p in paths[:2]:
        (images / p.name).write_bytes(p.read_bytes())
        (images / f"{p.stem}.npy").write_bytes(p.with_suffix(".npy").read_bytes())
    (images / "bad.png").write_text("this is not a picture")
    out = tmp_path / "out"
    r = run("fit-set", images, "--out", out, "--landmarks", images, "--detector", "file", "--model", standin_path,
            *[a for o in SMALL for a in ("--set", o)], "--quiet")
    assert r.exit_code != 0
    assert "bad.png: not a recognised image format" in r.output and "1 of 3 image(s) failed" in r.output
    assert not (out / "bad").exists()
    for stem in ("img0", "img1"):
        assert (out / stem / "fit.npz").is_file()
    with np.load(out / "identity.npz") as data:
        assert list(data["images"]) == ["img0", "img1"]


def test_cli_fit_set_consistency_with_negatives(standin_path, one_person, tmp_path):
    folder, paths, _ = one_person
    other = tmp_path / "others"
    write_identity(other, Identity(np.full(100, 0.5, np.float32), np.zeros(3, np.float32), ["z"], "shared", 0.0))
    out = tmp_path / "out"
    r = run("fit-set", *paths[:2], "--out", out, "--landmarks", folder, "--detector", "file", "--model", standin_path,
            "--shape-mode", "consistency", "--negatives", other, *[a for o in SMALL for a in ("--set", o)],
            "--set", "stages.landmarks.iterations=40", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["shape_mode"] == "consistency" and summary["shape_spread"] > 0
    with np.load(out / "identity.npz") as data:
        mean = data["shape"]
    shapes = [load_fit(out / s / "fit.npz")[0].shape[0].numpy() for s in ("img0", "img1")]
    assert not np.array_equal(shapes[0], shapes[1])
    np.testing.assert_allclose(mean, np.mean(shapes, axis=0), atol=1e-6)


def test_a_shared_identity_carries_its_priors_once(standin_model, one_person):
    """Three copies of one photo with one shared identity are one photo seen three times: its evidence
    adds up, the shape prior counts once. The set's total is then three times
    that of the single photo fitted with those priors at a third of their weight; Adam's steps do not
    change when a parameter's gradient is scaled, so the two fits agree (float rounding apart). With
    the prior counted per image the set would match the single photo at full weight instead."""
    _, paths, _ = one_person
    steps = ["stages.landmarks.iterations=60", "stages.rigid.patience=0", "stages.landmarks.patience=0"]
    setup, targets = prepared(standin_model, paths[:1], steps)
    three, _ = fit_identity(targets * 3, setup, "shared", seed=0)
    w = next(st for st in setup.recipe.stages if st.name == "landmarks").weights["shape_prior"]
    setup_third, _ = prepared(standin_model, paths[:1], [*steps, f"stages.landmarks.weights.shape_prior={w / 3}"])
    one_third, _ = fit_identity(targets, setup_third, "shared", seed=0)
    one_full, _ = fit_identity(targets, setup, "shared", seed=0)
    np.testing.assert_allclose(three.shape, one_third.shape, atol=2e-3)
    assert np.abs(three.shape - one_full.shape).max() > 10 * np.abs(three.shape - one_third.shape).max()


def test_identity_priors_per_image_given_and_detected(standin_model, one_person):
    """Shared identity, three images: one with given points carries a third of the shape prior, one with
    detected points all of it; terms on the image's own parameters, and every term of unshared fits,
    stay whole."""
    from dataclasses import replace

    from fitter.fit import initial_params, make_objective, stack_targets
    from fitter.recipe import Stage

    _, paths, _ = one_person
    setup, targets = prepared(standin_model, paths)
    batch = stack_targets(targets, setup.recipe.landmark_weights, setup.device)
    batch = replace(batch, detected=torch.tensor([False, True, False]))
    params = initial_params(setup, batch)
    params.shape = torch.randn(3, standin_model.n_shape, generator=torch.Generator().manual_seed(0))
    params.exp = torch.randn(3, standin_model.n_exp, generator=torch.Generator().manual_seed(1))
    stage = Stage("s", 1, ["shape", "exp"], {"shape_prior": 2.0, "exp_prior": 3.0})
    rows = torch.arange(3)
    _, tied = make_objective(setup, batch, tie_shape=True)(params, stage, rows)
    _, own = make_objective(setup, batch)(params, stage, rows)
    shared = 2.0 * float((params.shape[0] ** 2).sum())  # row 0's shape is the set's
    torch.testing.assert_close(tied["shape_prior"], torch.tensor([shared / 3, shared, shared / 3]))
    torch.testing.assert_close(tied["exp_prior"], 3.0 * (params.exp ** 2).sum(1))
    torch.testing.assert_close(own["shape_prior"], 2.0 * (params.shape ** 2).sum(1))
