"""Shared pytest fixtures.

Every test session gets its own empty FLAMEFIT_HOME (so tests never read or write the real
asset cache) and no FLAMEFIT_MODEL from the caller's shell.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.synthetic import as_default_pinhole, write_synthetic_flame

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def flamefit_home_dir(tmp_path_factory) -> Path:
    """A per-session, initially empty FLAMEFIT_HOME (autouse)."""
    home = tmp_path_factory.mktemp("flamefit_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("FLAMEFIT_HOME", str(home))
    mp.delenv("FLAMEFIT_MODEL", raising=False)
    yield home
    mp.undo()


@pytest.fixture(scope="session")
def synthetic_model_dir(tmp_path_factory) -> Path:
    """A folder with the synthetic FLAME-format model (generic_model.pkl, chumpy objects) and
    its landmark_embedding.npy (tests.synthetic defaults: n_shape 8, n_exp 6, seed 0)."""
    folder = tmp_path_factory.mktemp("synthetic_flame")
    write_synthetic_flame(folder)
    return folder


@pytest.fixture(scope="session")
def standin_path() -> Path:
    """The ICT-FLAME stand-in folder (<repo root>/../shared/models/ict-flame); skips if absent."""
    path = (REPO_ROOT.parent / "shared" / "models" / "ict-flame").resolve()
    if not (path / "generic_model.pkl").is_file():
        pytest.skip(f"ICT-FLAME stand-in not found at {path}")
    return path


@pytest.fixture(scope="session")
def standin_model(standin_path):
    """The stand-in as a FlameModel (CPU), loaded once per session."""
    from fitter.fit import load_flame

    return load_flame(standin_path)


@pytest.fixture(scope="session")
def photo_set(standin_model, tmp_path_factory):
    """Two synthetic 'photos' of known faces rendered with the stand-in, each with an exact
    landmark file (<stem>.npy, original pixels). Returns (folder, [(path, params, landmarks)])."""
    import numpy as np

    from bench.synthetic import random_params, render_photo, write_case

    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(7)
    cases = []
    for k, yaw in enumerate((-15.0, 20.0)):
        params = as_default_pinhole(random_params(standin_model, rng, yaw_deg=yaw), 320)
        image, lmk = render_photo(standin_model, params, rng, size=320)
        cases.append((write_case(folder, f"face{k}", image, lmk), params, lmk))
    return folder, cases
