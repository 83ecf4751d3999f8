"""Shared pytest fixtures.

Every test session gets its own empty FLAMEFIT_HOME (so tests never read or write the real
asset cache) and no FLAMEFIT_MODEL from the caller's shell.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.synthetic import write_synthetic_flame

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
