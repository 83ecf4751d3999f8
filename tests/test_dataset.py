"""Dataset jobs (fitter.dataset): options hash, --resume, manifest.jsonl, failures, the local and
Ray engines. The Ray tests share one local instance (ray.init(num_cpus=2)) for the module."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
from fitter import dataset
from fitter.dataset import HASH_KEY, MANIFEST, FitOptions, fit_dataset, options_hash
from fitter.fit import fit_images
from fitter.recipe import load_recipe

FIELDS = ("shape", "exp", "global_pose", "jaw_pose", "cam", "vertices", "landmarks2d")
CONTRACT_FILES = ["fit.json", "fit.npz", "mesh.obj", "overlay.png"]


def run(*args):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


def load_npz(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in FIELDS}


@pytest.fixture(scope="module")
def faces(standin_model, tmp_path_factory):
    """Four synthetic photos (256 px) of known faces with exact landmark files: (folder, paths)."""
    from bench.synthetic import random_params, render_photo, write_case

    folder = tmp_path_factory.mktemp("dataset_faces")
    rng = np.random.default_rng(12)
    paths = []
    for k in range(4):
        image, lmk = render_photo(standin_model, random_params(standin_model, rng), rng, size=256)
        paths.append(write_case(folder, f"face{k}", image, lmk))
    return folder, paths


@pytest.fixture(scope="module")
def opts(faces, standin_path):
    return FitOptions(model=str(standin_path), recipe="fast", detector="file", landmarks=str(faces[0]),
                      batch_size=2, seed=0)


@pytest.fixture(scope="module")
def expected(faces, standin_model):
    """The in-process fit of the four faces, batch size 2, seed 0, on one thread (as each Ray worker
    runs on a 2-core instance with 2 workers): stem -> fit.npz-like fields."""
    folder, paths = faces
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = fit_images(paths, recipe="fast", model=standin_model, detector="file", landmarks=folder,
                             batch_size=2, seed=0)
    finally:
        torch.set_num_threads(threads)
    out = {}
    for r in results:
        fields = {k: getattr(r.params, k)[0].numpy() for k in ("shape", "exp", "global_pose", "jaw_pose", "cam")}
        out[r.target.stem] = {**fields, "vertices": r.vertices, "landmarks2d": r.landmarks2d}
    return out


def assert_same_fit(got: dict, want: dict, loose: bool = False):
    """Equal to float32 rounding; `loose`: allow for a different torch thread count (reduction order)."""
    tol = 1e-4 if loose else 1e-6
    for k in FIELDS:
        np.testing.assert_allclose(got[k], want[k], rtol=tol, atol=tol, err_msg=k)


# ----------------------------------------------------------------------------- pure parts
def test_options_hash_tracks_what_changes_a_fit(opts, tmp_path):
    fast = load_recipe("fast")
    base = options_hash("m1", fast, opts)
    assert len(base) == 12 and base == options_hash("m1", load_recipe("fast"), opts)
    copy = tmp_path / "renamed.toml"  # the content counts, not the file's name
    copy.write_text((Path(load_recipe("fast").source)).read_text())
    assert options_hash("m1", load_recipe(str(copy)), opts) == base
    changed = {
        options_hash("m2", fast, opts),
        options_hash("m1", load_recipe("fast", ["stages.landmarks.iterations=10"]), opts),
        options_hash("m1", fast, FitOptions(**{**opts.__dict__, "seed": 1})),
        options_hash("m1", fast, FitOptions(**{**opts.__dict__, "batch_size": 4})),
        options_hash("m1", fast, FitOptions(**{**opts.__dict__, "init": "deca"})),
        options_hash("m1", fast, opts, detector="mediapipe"),
    }
    assert base not in changed and len(changed) == 6


def test_make_batches_and_stale_cleanup(tmp_path):
    assert dataset.make_batches(list("abcde"), 2) == [["a", "b"], ["c", "d"], ["e"]]
    for name in (".face0.tmp-x1", ".face0.old-y2", ".other.tmp-z", "face0"):
        (tmp_path / name).mkdir()
    removed = dataset.remove_stale(tmp_path, {"face0"})
    assert sorted(p.name for p in removed) == [".face0.old-y2", ".face0.tmp-x1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-z", "face0"]


def test_same_stem_twice_is_a_usage_error(faces, opts, tmp_path):
    other = tmp_path / "elsewhere" / "face0.png"
    other.parent.mkdir()
    other.write_bytes(faces[1][0].read_bytes())
    with pytest.raises(dataset.UsageError, match="face0.png and .*face0.png would both be written"):
        fit_dataset([faces[1][0], other], tmp_path / "out", opts)


def test_engine_ray_without_ray_says_how_to_install(faces, standin_path, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    folder, paths = faces
    r = run("fit", paths[0], "--out", tmp_path, "--landmarks", paths[0].with_suffix(".npy"), "--detector", "file",
            "--model", standin_path, "--recipe", "fast", "--engine", "ray")
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == ['error: --engine ray: Ray is not installed; fix: pip install ".[ray]" '
                                             '(or pip install ray==2.60.0)']
    r = run("fit", paths[0], "--out", tmp_path, "--model", standin_path, "--workers", "2")
    assert r.exit_code == 2 and "--workers: the local engine fits in this process; fix: add --engine ray" in r.output


# ----------------------------------------------------------------------------- local engine
def test_resume_skips_refits_changed_recipe_and_logs_every_run(faces, standin_path, tmp_path, expected):
    folder, paths = faces
    out = tmp_path / "out"
    args = ["fit", *paths[:2], "--out", out, "--landmarks", folder, "--detector", "file", "--model", standin_path,
            "--recipe", "fast", "--batch-size", "2", "--json"]

    first = run(*args, "--resume")  # nothing there yet: everything is fitted
    assert first.exit_code == 0, first.output
    s1 = json.loads(first.stdout)
    assert (s1["done"], s1["failed"], s1["skipped"]) == (2, 0, 0)
    for stem in ("face0", "face1"):
        assert sorted(p.name for p in (out / stem).iterdir()) == CONTRACT_FILES
        report = json.loads((out / stem / "fit.json").read_text())
        assert report[HASH_KEY] == s1["options_hash"] and report["run"] == s1["run"]
    before = {stem: (out / stem / "fit.npz").read_bytes() for stem in ("face0", "face1")}
    for stem in ("face0", "face1"):  # the same batches as fit_images(batch_size=2), seeded alike
        assert_same_fit(load_npz(out / stem / "fit.npz"), expected[stem], loose=True)

    second = run(*args, "--resume")
    s2 = json.loads(second.stdout)
    assert second.exit_code == 0 and (s2["done"], s2["skipped"]) == (0, 2) and s2["run"] != s1["run"]
    assert {stem: (out / stem / "fit.npz").read_bytes() for stem in ("face0", "face1")} == before

    (out / "face1" / "fit.npz").unlink()  # an output lost (or a job killed before it): only it is fitted again
    third = run(*args, "--resume")
    s3 = json.loads(third.stdout)
    assert (s3["done"], s3["skipped"]) == (1, 1)
    assert [r["status"] for r in s3["results"]] == ["skipped", "ok"]

    changed = run(*args, "--resume", "--set", "stages.landmarks.iterations=40")
    s4 = json.loads(changed.stdout)
    assert changed.exit_code == 0 and (s4["done"], s4["skipped"]) == (2, 0)
    assert s4["options_hash"] != s1["options_hash"]
    stages = json.loads((out / "face0" / "fit.json").read_text())["stages"]
    assert [s["name"] for s in stages] == ["rigid", "landmarks"] and stages[1]["iterations"] <= 40

    lines = manifest(out)
    assert [len([r for r in lines if r["run"] == s["run"]]) for s in (s1, s2, s3, s4)] == [2, 2, 2, 2]
    assert [r["status"] for r in lines] == ["done"] * 2 + ["skipped"] * 2 + ["skipped", "done"] + ["done"] * 2
    me = f"{socket.gethostname()}:{os.getpid()}"
    for r in lines:
        assert set(r) == {"image", "status", "reason", "seconds", "worker", "run"}
        assert r["worker"] == me and Path(r["image"]).parent == folder
        assert (r["reason"] is None) == (r["status"] == "done")
        assert r["seconds"] > 0 if r["status"] == "done" else r["seconds"] == 0


def test_failing_image_among_good_ones(faces, standin_path, tmp_path):
    folder, paths = faces
    bad = tmp_path / "in" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    args = ["fit", paths[0], bad, paths[1], "--out", out, "--landmarks", folder, "--detector", "file",
            "--model", standin_path, "--recipe", "fast", "--batch-size", "2", "--json", "--resume"]
    r = run(*args)
    assert r.exit_code == 1
    summary = json.loads(r.stdout)
    assert (summary["done"], summary["failed"], summary["skipped"]) == (2, 1, 0)
    rows = {Path(x["image"]).name: x for x in manifest(out)}
    assert rows["broken.png"]["status"] == "failed" and str(bad) in rows["broken.png"]["reason"]
    assert rows["face0.png"]["status"] == rows["face1.png"]["status"] == "done"
    assert sorted(p.name for p in out.iterdir()) == ["face0", "face1", MANIFEST]  # nothing for the bad one
    again = run(*args)  # resume: the good ones are skipped, the bad one fails again
    assert again.exit_code == 1
    assert {Path(x["image"]).name: x["status"] for x in manifest(out)[3:]} == {
        "face0.png": "skipped", "broken.png": "failed", "face1.png": "skipped"}


def test_interrupt_leaves_nothing_partial_and_resume_continues(faces, opts, standin_model, tmp_path):
    folder, paths = faces
    out = tmp_path / "out"
    calls = {"n": 0}

    def progress(stage, it, total, losses):  # Ctrl-C in the middle of the second batch's optimisation
        calls["n"] += 1
        if calls["n"] > 1 and settled["n"] == 2:
            raise KeyboardInterrupt

    settled = {"n": 0}
    on_row = lambda r, report: settled.__setitem__("n", settled["n"] + 1)  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        fit_dataset(paths, out, opts, on_row=on_row, progress=progress, flame=standin_model)
    assert sorted(p.name for p in out.iterdir()) == ["face0", "face1", MANIFEST]  # no half-written face2/3
    resumed = fit_dataset(paths, out, opts, resume=True, flame=standin_model)
    assert [r["status"] for r in resumed.rows] == ["skipped", "skipped", "done", "done"]
    assert sorted(p.name for p in out.iterdir()) == ["face0", "face1", "face2", "face3", MANIFEST]


# ----------------------------------------------------------------------------- Ray engine
@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance (2 CPUs) for the module's Ray tests."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")  # as fitter.dataset.start_ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def test_ray_fit_equals_in_process_fit(ray_instance, faces, standin_path, tmp_path, expected):
    folder, paths = faces
    out = tmp_path / "out"
    r = run("fit", folder, "--out", out, "--landmarks", folder, "--detector", "file", "--model", standin_path,
            "--recipe", "fast", "--batch-size", "2", "--engine", "ray", "--workers", "2", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert (summary["done"], summary["failed"], summary["skipped"]) == (4, 0, 0)
    for stem, want in expected.items():
        assert sorted(p.name for p in (out / stem).iterdir()) == CONTRACT_FILES
        assert_same_fit(load_npz(out / stem / "fit.npz"), want)
    workers = {x["worker"] for x in manifest(out)}
    assert len(workers) == 2 and f"{socket.gethostname()}:{os.getpid()}" not in workers  # fitted out of process


def test_ray_worker_killed_mid_batch_reruns_it(ray_instance, faces, opts, tmp_path, expected, monkeypatch):
    folder, paths = faces
    out = tmp_path / "out"
    marker = tmp_path / "fault-fired"
    # the worker that is about to write face1 (second image of batch [face0, face1]) dies mid-write, once
    monkeypatch.setenv(dataset.FAULT_ENV, f"face1:{marker}")
    result = fit_dataset(paths, out, opts, engine="ray", workers=2)
    assert marker.is_file()  # the fault did fire
    killed = marker.read_text().strip()
    assert result.summary["done"] == 4 and result.summary["failed"] == 0
    rows = manifest(out)
    assert sorted(Path(x["image"]).stem for x in rows) == ["face0", "face1", "face2", "face3"]  # once each
    by_stem = {Path(x["image"]).stem: x for x in rows}
    assert by_stem["face0"]["worker"] == by_stem["face1"]["worker"] != killed  # re-run whole, by a new process
    assert sorted(p.name for p in out.iterdir()) == ["face0", "face1", "face2", "face3", MANIFEST]  # no temp left
    for stem, want in expected.items():
        assert sorted(p.name for p in (out / stem).iterdir()) == CONTRACT_FILES
        assert_same_fit(load_npz(out / stem / "fit.npz"), want)
