"""fit.npz round trip."""

import numpy as np
import pytest
import torch

from fitter.params import FitParams, load_fit, save_fit
from priors.errors import UsageError


def test_fit_npz_round_trip(tmp_path):
    torch.manual_seed(0)
    p = FitParams.initial(1, 5, 4, 7).map(lambda t: t + torch.randn_like(t))
    extras = {"vertices": np.random.rand(7, 3), "image_size": np.array([480, 640]), "model": "m sha256:ab",
              "recipe": "default"}
    save_fit(tmp_path / "fit.npz", p, extras)
    q, ex = load_fit(tmp_path / "fit.npz")
    for name, value in p.items():
        torch.testing.assert_close(getattr(q, name), value)
    assert ex["model"] == "m sha256:ab" and ex["vertices"].dtype == np.float32
    assert ex["image_size"].tolist() == [480, 640]
    with np.load(tmp_path / "fit.npz") as data:
        assert data["shape"].shape == (5,) and data["light"].shape == (9, 3) and data["shape"].dtype == np.float32


def test_load_fit_errors(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="bad.npz: not a readable fit.npz"):
        load_fit(tmp_path / "bad.npz")
    np.savez(tmp_path / "partial.npz", shape=np.zeros(3))
    with pytest.raises(UsageError, match="partial.npz: fit.npz lacks exp"):
        load_fit(tmp_path / "partial.npz")
