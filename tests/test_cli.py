"""The command line as a user drives it: exit codes, one-line errors, the contract's files."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from fitter import io
from fitter.params import load_fit

FAST = ["--recipe", "fast"]


def run(*args):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def fitted(photo_set, standin_path, tmp_path_factory):
    """Both synthetic photos fitted through the CLI (fast recipe)."""
    folder, cases = photo_set
    out = tmp_path_factory.mktemp("fits")
    r = run("fit", *[c[0] for c in cases], "--out", out, "--landmarks", folder, "--detector", "file",
            "--model", standin_path, *FAST, "--json")
    assert r.exit_code == 0, r.output
    return out, r


def test_fit_writes_contract_files_and_json_summary(fitted):
    out, r = fitted
    summary = json.loads(r.stdout)
    assert summary["failed"] == 0 and [row["status"] for row in summary["results"]] == ["ok", "ok"]
    for stem in ("face0", "face1"):
        assert sorted(p.name for p in (out / stem).iterdir()) == ["fit.json", "fit.npz", "mesh.obj", "overlay.png"]
        report = json.loads((out / stem / "fit.json").read_text())
        assert {"image", "model", "recipe", "device", "seconds", "iterations", "stages", "landmark_rmse_px"} <= set(
            report)
        assert [s["name"] for s in report["stages"]] == ["rigid", "landmarks"]


def test_bad_image_in_batch(photo_set, standin_path, tmp_path):
    folder, cases = photo_set
    bad = tmp_path / "in" / "bad.png"
    bad.parent.mkdir()
    bad.write_bytes(b"")
    r = run("fit", bad, cases[0][0], "--out", tmp_path / "out", "--landmarks", folder, "--detector", "file",
            "--model", standin_path, *FAST, "--quiet")
    assert r.exit_code == 1
    assert "bad.png: empty file" in r.output
    assert (tmp_path / "out" / "face0" / "fit.npz").is_file()
    assert not (tmp_path / "out" / "bad").exists()


def test_bad_recipe_override_names_the_key(photo_set, standin_path, tmp_path):
    folder, cases = photo_set
    r = run("fit", cases[0][0], "--out", tmp_path, "--landmarks", folder, "--model", standin_path,
            "--set", "stages.landmarks.weights.landmrk=1")
    assert r.exit_code == 7
    assert "unknown loss term 'stages.landmarks.weights.landmrk'" in r.output and "did you mean 'landmark'" in r.output


def test_missing_model_is_one_clear_line(photo_set, tmp_path):
    r = run("fit", photo_set[1][0][0], "--out", tmp_path, "--model", tmp_path / "nowhere.pkl")
    assert r.exit_code == 3 and "nowhere.pkl" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_recipes_and_doctor(standin_path):
    r = run("recipes")
    assert r.exit_code == 0 and "identity-set" in r.output and "fast" in r.output
    r = run("recipes", "show", "fast")
    assert r.exit_code == 0 and "[stages.landmarks]" in r.output
    r = run("doctor", "--model", standin_path)
    assert r.exit_code == 0 and "12788" in r.output.replace(",", "")


def test_assets_install_synthetic_chumpy_model(synthetic_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FLAMEFIT_HOME", str(tmp_path))
    r = run("assets", "install", synthetic_model_dir / "generic_model.pkl")
    assert r.exit_code == 0, r.output
    assert list((tmp_path / "models").glob("*/model.npz"))
    r = run("doctor")
    assert r.exit_code == 0 and "synthetic" in r.output


def test_render(fitted, tmp_path):
    out, _ = fitted
    png = tmp_path / "r.png"
    r = run("render", out / "face0" / "fit.npz", "--out", png, "--size", 200, "--yaw", 30)
    assert r.exit_code == 0, r.output
    assert io.read_image(png).shape == (200, 200, 3)
    r = run("render", out / "face0" / "fit.npz", "--out", png, "--background", "photo")
    assert r.exit_code == 0 and io.read_image(png).shape == (320, 320, 3)


def test_transfer_swap_and_mix(fitted, tmp_path):
    out, _ = fitted
    src, tgt = out / "face0" / "fit.npz", out / "face1" / "fit.npz"
    r = run("transfer", "--source", src, "--target", tgt, "--out", tmp_path / "swap")
    assert r.exit_code == 0, r.output
    s, _ = load_fit(src)
    t, _ = load_fit(tgt)
    res, extras = load_fit(tmp_path / "swap" / "transfer.npz")
    assert np.array_equal(res.shape, t.shape) and np.array_equal(res.exp, s.exp)
    assert np.array_equal(res.jaw_pose, s.jaw_pose) and np.array_equal(res.cam, t.cam)
    assert (tmp_path / "swap" / "transfer.png").is_file() and (tmp_path / "swap" / "mesh.obj").is_file()
    r = run("transfer", "--source", src, "--target", tgt, "--out", tmp_path / "mix", "--mode", "mix",
            "--mix", "exp.coarse=1,jaw=0.5")
    assert r.exit_code == 0, r.output
    res, extras = load_fit(tmp_path / "mix" / "transfer.npz")
    layers = list(extras["alpha_layers"])
    assert extras["alphas"][layers.index("jaw")] == 0.5
    np.testing.assert_allclose(res.jaw_pose, 0.5 * (s.jaw_pose + t.jaw_pose), atol=1e-6)
    r = run("transfer", "--source", src, "--target", tgt, "--out", tmp_path / "bad", "--mode", "mix",
            "--mix", "exp.coars=1")
    assert r.exit_code == 2 and "exp.coarse" in r.output and not (tmp_path / "bad").exists()


def test_animate(fitted, tmp_path):
    out, _ = fitted
    r = run("animate", out / "face1" / "fit.npz", "--expressions", out / "face0" / "fit.npz", "--jaw-sweep",
            "--out", tmp_path / "anim", "--quiet")
    assert r.exit_code == 0, r.output
    frames = sorted((tmp_path / "anim" / "frames").glob("*.png"))
    assert [f.name for f in frames[:2]] == ["0000.png", "0001.png"] and len(frames) == 1 + 10
    assert (tmp_path / "anim" / "animation.gif").stat().st_size > 0


def test_fit_the_bundled_photo_with_mediapipe(standin_path, tmp_path):
    """The demo's path: a real photo, landmarks detected by MediaPipe (skipped if not installed)."""
    pytest.importorskip("mediapipe")
    photo = cli.Path(cli.__file__).parent / "fitter" / "samples" / "astronaut.png"
    r = run("fit", photo, "--out", tmp_path, "--detector", "mediapipe", "--model", standin_path, *FAST, "--quiet")
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "astronaut" / "fit.npz") as fit:
        lmk, target = fit["landmarks2d"], fit["landmarks2d_target"]
        assert fit["image_size"].tolist() == [512, 512]
    # the face sits in the upper middle of the portrait; the fitted landmarks follow the detected ones
    assert 150 < target[:, 0].mean() < 300 and 50 < target[:, 1].mean() < 200
    assert np.sqrt(((lmk - target) ** 2).sum(1).mean()) < 3.0


def test_threads_option_sets_torch_threads():
    import torch

    before = torch.get_num_threads()
    try:
        assert run("--threads", 1, "recipes").exit_code == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_animate_parses_several_values_after_one_flag():
    """--expressions a b c (the contract's form), a folder, and the repeated flag all give the list."""
    def parsed(*args):
        return cli.animate.make_context("animate", list(args)).params

    p = parsed("T", "--expressions", "a.npz", "b.npz", "c.npz", "--out", "D", "--jaw-sweep")
    assert p["target"] == "T" and p["expressions"] == ("a.npz", "b.npz", "c.npz") and p["out"] == "D"
    assert parsed("T", "--expressions", "a.npz", "--expressions", "b.npz", "--out", "D")["expressions"] == (
        "a.npz", "b.npz")
    assert parsed("T", "--out", "D", "--expressions", "folder/")["expressions"] == ("folder/",)
    assert parsed("T", "--out", "D", "--yaw-sweep")["expressions"] == ()


def test_animate_three_files_after_one_flag(fitted, tmp_path):
    out, _ = fitted
    a, b = out / "face0" / "fit.npz", out / "face1" / "fit.npz"
    r = run("animate", b, "--expressions", a, b, a, "--out", tmp_path / "anim", "--quiet")
    assert r.exit_code == 0, r.output
    frames = sorted((tmp_path / "anim" / "frames").glob("*.png"))
    assert len(frames) == 3
    first, second, third = (io.read_image(f) for f in frames)
    assert np.array_equal(first, third) and not np.array_equal(first, second)  # a, b, a in order
