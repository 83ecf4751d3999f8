"""The fit pipeline end to end on synthetic photos with known answers."""

import numpy as np
import pytest
import torch

from bench.synthetic import face_error_mm, face_region, true_vertices
from fitter import io
from fitter.camera import project_opencv
from fitter.fit import fit_images
from fitter.outputs import write_fit_outputs
from fitter.params import load_fit
from fitter.synth import model_output
from priors.errors import FitError, ImageError, LandmarkError

FAST = ["stages.landmarks.patience=0"]


def test_fast_fit_recovers_known_face(standin_model, photo_set):
    folder, cases = photo_set
    path, params, lmk = cases[0]
    [result] = fit_images([path], recipe="fast", model=standin_model, landmarks=folder, detector="file",
                          overrides=FAST)
    # landmarks in original pixels, against the exact projected model landmarks
    assert result.landmarks2d.shape == (68, 2)
    np.testing.assert_allclose(result.landmarks2d_target, lmk, atol=1e-4)
    assert result.report["landmark_rmse_px"] < 1.5
    # geometry: face-area error after similarity alignment, far below the neutral head's
    region = face_region(standin_model)
    truth = true_vertices(standin_model, params)
    err = face_error_mm(result.vertices, truth, region)
    neutral = face_error_mm(standin_model.v_template.numpy(), truth, region)
    assert err < 0.6 * neutral and err < 3.0
    # the expression's main effect, the jaw opening, is recovered in sign and rough size
    assert abs(float(result.params.jaw_pose[0, 0]) - float(params.jaw_pose[0, 0])) < 0.1


def test_same_seed_same_result(standin_model, photo_set):
    folder, cases = photo_set
    runs = [fit_images([cases[1][0]], recipe="fast", model=standin_model, landmarks=folder, detector="file",
                       seed=3)[0] for _ in range(2)]
    for name, value in runs[0].params.items():
        assert torch.equal(value, getattr(runs[1].params, name)), name


def test_batch_matches_single_fits(standin_model, photo_set):
    folder, cases = photo_set
    paths = [c[0] for c in cases]
    # the least-squares stages stop per image; a short budget, since the optimiser amplifies float32
    # summation-order differences (the only thing batching changes) along flat directions
    overrides = ["stages.rigid.patience=0", "stages.landmarks.patience=0", "stages.rigid.iterations=20",
                 "stages.landmarks.iterations=30"]
    batched = fit_images(paths, recipe="fast", model=standin_model, landmarks=folder, detector="file",
                         batch_size=2, overrides=overrides)
    single = fit_images(paths, recipe="fast", model=standin_model, landmarks=folder, detector="file",
                        batch_size=1, overrides=overrides)
    # what batching must not change is the fit itself: the fitted points to a hundredth of a pixel.
    # Along the objective's flat directions (shape modes at the neck cut) float32 summation order,
    # which differs with the batch size and the thread count, moves the parameters by ~1e-3 and
    # some vertices far from the landmarks by up to ~0.6 mm; mixing the two images up moves them by
    # ~100 mm
    for b, s in zip(batched, single, strict=True):
        np.testing.assert_allclose(b.landmarks2d, s.landmarks2d, atol=0.01, rtol=0)
        torch.testing.assert_close(b.params.exp, s.params.exp, atol=5e-3, rtol=0)
        assert np.abs(b.vertices - s.vertices).max() < 2e-3
    assert np.abs(batched[0].vertices - single[1].vertices).max() > 0.02


def test_one_bad_image_does_not_stop_the_batch(standin_model, photo_set, tmp_path):
    folder, cases = photo_set
    bad = tmp_path / "broken.png"
    bad.write_text("not a png")
    seen = []
    outcomes = fit_images([bad, cases[0][0]], recipe="fast", model=standin_model, landmarks=folder,
                          detector="file", batch_size=2, on_target=lambda i, r: seen.append(i))
    assert isinstance(outcomes[0], ImageError) and "broken.png" in str(outcomes[0])
    assert not isinstance(outcomes[1], Exception)
    assert sorted(seen) == [0, 1]


def test_an_image_whose_fit_fails_does_not_take_its_batch_along(standin_model, photo_set, monkeypatch):
    import fitter.fit as fit_module

    folder, cases = photo_set
    paths = [c[0] for c in cases]
    alone = fit_images(paths[:1], recipe="fast", model=standin_model, landmarks=folder, detector="file")[0]
    real, calls = fit_module.fit_targets, []

    def failing_on_face1(setup, targets, *args, **kwargs):  # face1's fit fails (a non-finite objective, say)
        calls.append([t.path.stem for t in targets])
        if any(t.path.stem == "face1" for t in targets):
            raise FitError("stage 'rigid': the objective is not finite at the start")
        return real(setup, targets, *args, **kwargs)

    monkeypatch.setattr(fit_module, "fit_targets", failing_on_face1)
    seen = []
    outcomes = fit_images(paths, recipe="fast", model=standin_model, landmarks=folder, detector="file",
                          batch_size=2, on_target=lambda i, r: seen.append(i))
    assert calls == [["face0", "face1"], ["face0"], ["face1"]]  # the batch, then each image on its own
    assert isinstance(outcomes[1], FitError)
    np.testing.assert_array_equal(outcomes[0].landmarks2d, alone.landmarks2d)  # face0 fitted as if alone
    assert sorted(seen) == [0, 1]


def test_missing_landmark_file_with_detector_file(standin_model, photo_set, tmp_path):
    folder, cases = photo_set
    [outcome] = fit_images([cases[0][0]], recipe="fast", model=standin_model, landmarks=tmp_path,
                           detector="file")
    assert isinstance(outcome, LandmarkError) and "face0.pts/.npy/.json" in str(outcome)


def test_outputs_follow_the_contract(standin_model, photo_set, tmp_path):
    folder, cases = photo_set
    [result] = fit_images([cases[0][0]], recipe="fast", model=standin_model, landmarks=folder, detector="file")
    out = write_fit_outputs(tmp_path, result, standin_model)
    assert sorted(p.name for p in out.iterdir()) == ["fit.json", "fit.npz", "mesh.obj", "overlay.png"]
    with np.load(out / "fit.npz") as fit:
        n_v = standin_model.n_verts
        expected = {"shape": (100,), "exp": (53,), "global_pose": (3,), "neck_pose": (3,), "jaw_pose": (3,),
                    "eye_pose": (6,), "cam": (6,), "light": (9, 3), "albedo": (n_v, 3), "vertices": (n_v, 3),
                    "landmarks2d": (68, 2), "landmarks2d_target": (68, 2), "image_size": (2,),
                    "K": (3, 3), "R": (3, 3), "t": (3,), "landmarks3d": (68, 2)}
        for key, shape in expected.items():
            assert fit[key].shape == shape, key
            assert fit[key].dtype == (np.int64 if key == "image_size" else np.float32), key
        assert fit["image_size"].tolist() == [320, 320]
        assert str(fit["model"]).startswith("ict-flame sha256:") and str(fit["recipe"]) == "fast"
        rmse = np.sqrt(((fit["landmarks2d"] - fit["landmarks2d_target"]) ** 2).sum(1).mean())
        assert rmse < 1.5
        # the contract's camera: the fitted landmarks are the model's, seen through K, R, t
        params, _ = load_fit(out / "fit.npz")
        with torch.no_grad():
            lmk3 = model_output(standin_model, params)
        K, R, t = (fit[k].astype(np.float64) for k in ("K", "R", "t"))
        for points, key in ((lmk3.landmarks3d, "landmarks2d"), (lmk3.landmarks3d_full, "landmarks3d")):
            np.testing.assert_allclose(project_opencv(points[0].numpy().astype(np.float64), K, R, t), fit[key],
                                       atol=1e-2)
        # the static jawline differs from the silhouette contour (the face is turned), the rest is the same
        assert np.abs(fit["landmarks3d"][:17] - fit["landmarks2d"][:17]).max() > 0.5
        np.testing.assert_allclose(fit["landmarks3d"][17:], fit["landmarks2d"][17:], atol=1e-3)
        assert abs(K[0, 2] - 160.0) < 1e-2 and abs(K[1, 2] - 160.0) < 1e-2  # principal point: the photo centre
    verts, faces = io.read_obj(out / "mesh.obj")
    assert verts.shape == (standin_model.n_verts, 3) and faces.shape == (standin_model.faces.shape[0], 3)
    overlay = io.read_image(out / "overlay.png")
    assert overlay.shape == (320, 960, 3)  # input | render | overlay


def test_failed_write_leaves_no_folder(standin_model, photo_set, tmp_path, monkeypatch):
    folder, cases = photo_set
    [result] = fit_images([cases[0][0]], recipe="fast", model=standin_model, landmarks=folder, detector="file")

    def boom(*args, **kwargs):
        raise ImageError("disk full")

    monkeypatch.setattr(io, "write_png", boom)
    with pytest.raises(ImageError):
        write_fit_outputs(tmp_path, result, standin_model)
    assert list(tmp_path.iterdir()) == []


def test_appearance_stage_reuses_its_geometry_exactly(standin_model, photo_set):
    """A stage that fits light and albedo alone renders its fixed geometry once; its values equal
    those of a stage that re-renders everything, after the light changes, and again after the
    geometry changes under it (the kept render is then made anew)."""
    from dataclasses import replace

    from fitter.fit import initial_params, make_objective, make_setup, prepare_target, stack_targets
    from fitter.recipe import load_recipe

    folder, cases = photo_set
    recipe = load_recipe("default", ["perceptual=off", "render_faces=0"])  # the moving stage: the same mesh
    setup = make_setup(standin_model, recipe)
    path = cases[0][0]
    target = prepare_target(path, recipe.resolution, folder / f"{path.stem}.npy")
    batch = stack_targets([target], recipe.landmark_weights, "cpu")
    objective = make_objective(setup, batch)
    appearance = next(s for s in recipe.stages if s.name == "appearance")
    assert set(appearance.params) == {"light", "albedo"}
    moving = replace(appearance, name="moving", params=[*appearance.params, "cam"])  # renders every call
    params = initial_params(setup, batch)
    rows = torch.arange(1)
    for change in ("light", "cam", "light"):
        if change == "light":
            params.light = params.light + 0.1 * torch.randn_like(params.light)
        else:
            params.cam = params.cam * torch.tensor([1.02, 1, 1, 1, 1, 1])
        kept, fresh = objective(params, appearance, rows)[0], objective(params, moving, rows)[0]
        torch.testing.assert_close(kept, fresh, atol=1e-7, rtol=1e-6)


def test_a_stage_at_a_lower_resolution_sees_the_same_landmarks(standin_model, photo_set):
    """Coarse-to-fine stages (a stage's `resolution`): the crop and mask are averaged down, the points
    scaled, so that the landmark terms (measured in half-crop units) are the same at any size and
    the photometric term compares like with like."""
    from dataclasses import replace

    from fitter.fit import initial_params, make_objective, make_setup, prepare_target, stack_targets
    from fitter.recipe import load_recipe

    folder, cases = photo_set
    recipe = load_recipe("default", ["perceptual=off", "resolution=224"])
    setup = make_setup(standin_model, recipe)
    path = cases[0][0]
    target = prepare_target(path, recipe.resolution, folder / f"{path.stem}.npy")
    batch = stack_targets([target], recipe.landmark_weights, "cpu")
    small = batch.at_resolution(112)
    assert small.image.shape[-1] == 112 and small.mask.shape[-1] == 112
    torch.testing.assert_close(small.landmarks, batch.landmarks / 2)
    torch.testing.assert_close(small.image[0, :, 10, 20], batch.image[0, :, 20:22, 40:42].mean(dim=(1, 2)))
    objective = make_objective(setup, batch)
    full = next(s for s in recipe.stages if s.name == "photometric")
    coarse = replace(full, name="coarse", resolution=112)
    params = initial_params(setup, batch)
    rows = torch.arange(1)
    _, at_full = objective(params, full, rows)
    _, at_coarse = objective(params, coarse, rows)
    for term in ("landmark", "eye_closure", "lip_distance", "shape_prior"):
        torch.testing.assert_close(at_coarse[term], at_full[term], atol=1e-6, rtol=1e-5)
    assert abs(float(at_coarse["photo"] / at_full["photo"]) - 1) < 0.1  # the same picture, fewer pixels
    r_full = objective.residuals(params, replace(full, name="lm", weights={"landmark": 1.0}), rows)
    r_coarse = objective.residuals(params, replace(coarse, name="lm2", weights={"landmark": 1.0}), rows)
    torch.testing.assert_close(r_coarse, r_full, atol=1e-6, rtol=1e-5)
