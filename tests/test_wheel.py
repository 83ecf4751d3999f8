"""The package as a user installs it, not as it is cloned (issue 13, point 1): a non-editable wheel
carries the built-in recipes (the repository's top-level recipes/, mapped to fitter/recipes/), so
`recipes` and `fit --recipe fast` work from any directory.

The wheel is built from a copy of the sources (so the checkout gets no build/ or egg-info) and
installed with `pip install --target` into an empty folder, then run from another one."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "cli.py", "fitter", "priors", "bench", "recipes")


def _pip(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout, installed into an empty target folder; returns the folder."""
    if importlib.util.find_spec("setuptools") is None or importlib.util.find_spec("pip") is None:
        pytest.skip("cannot build a wheel here: setuptools or pip is not installed in this Python")
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(p, src / name)
    build = _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(root / "dist"), ".",
                 cwd=src)
    assert build.returncode == 0, build.stderr[-3000:]
    wheels = list((root / "dist").glob("flamefit-*.whl"))
    assert len(wheels) == 1, wheels
    target = root / "target"
    inst = _pip("install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheels[0]))
    assert inst.returncode == 0, inst.stderr[-3000:]
    return target


def _run_installed(target: Path, cwd: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    code = "import sys, cli, fitter; print('FITTER', fitter.__file__, file=sys.stderr); cli.main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_wheel_ships_the_repository_recipes(installed):
    shipped = sorted(p.name for p in (installed / "fitter" / "recipes").glob("*.toml"))
    assert shipped == sorted(p.name for p in (REPO / "recipes").glob("*.toml")) and "fast.toml" in shipped
    for name in shipped:  # the same bytes: one source of truth
        assert (installed / "fitter" / "recipes" / name).read_bytes() == (REPO / "recipes" / name).read_bytes()


def test_installed_recipes_command_from_another_directory(installed, tmp_path):
    r = _run_installed(installed, tmp_path, "recipes")
    assert r.returncode == 0, r.stderr
    assert f"FITTER {installed / 'fitter' / '__init__.py'}" in r.stderr  # the wheel's copy, not the checkout
    for name in ("default", "fast", "quality", "identity-set"):
        assert name in r.stdout, r.stdout
    show = _run_installed(installed, tmp_path, "recipes", "show", "fast")
    assert show.returncode == 0, show.stderr
    assert tomllib.loads(show.stdout) == tomllib.loads((REPO / "recipes" / "fast.toml").read_text())


def test_installed_fit_with_the_fast_recipe_from_another_directory(installed, tmp_path, standin_path):
    from fitter import io

    rng = np.random.default_rng(0)
    image = tmp_path / "photo.png"
    io.write_png(image, rng.integers(0, 255, (160, 160, 3), dtype=np.uint8))
    angle = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    io.write_landmarks(tmp_path / "photo.npy", np.stack([80 + 30 * np.cos(angle), 85 + 40 * np.sin(angle)], 1))
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = _run_installed(installed, work, "fit", image, "--landmarks", tmp_path / "photo.npy", "--recipe", "fast",
                       "--set", "stages.landmarks.iterations=10", "--model", standin_path, "--out", "out",
                       "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["failed"] == 0
    assert json.loads((work / "out" / "photo" / "fit.json").read_text())["recipe"] == "fast"
    assert (work / "out" / "photo" / "fit.npz").is_file()
