"""DECA warm start: checkpoint loading (DECA's tar layout), output split, initial parameters,
FLAME-topology check and refusal of unsafe or broken files. No real DECA weights needed."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fitter.params import FitParams
from priors import deca
from priors.errors import AssetError, UsageError
from tests.synthetic import write_synthetic_flame


class _Evil:
    """Unpickling this would create a marker file (it must never happen)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _model(n_shape: int, n_exp: int, n_verts: int = deca.FLAME_N_VERTS, name: str = "flame"):
    return SimpleNamespace(n_verts=n_verts, n_shape=n_shape, n_exp=n_exp, name=name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random encoder saved as DECA does (DataParallel prefix, an E_detail entry)."""
    torch.manual_seed(0)
    enc = deca.DecaEncoder()
    state = {k: v.clone() for k, v in enc.state_dict().items()}
    path = tmp_path_factory.mktemp("deca") / "deca_model.tar"
    torch.save({"E_flame": {"module." + k: v for k, v in state.items()},
                "E_detail": {"layers.0.weight": torch.zeros(2, 2)}}, path)
    return path, state


@pytest.fixture(scope="module")
def encoder(saved):
    return deca.load_deca_encoder(saved[0])


@pytest.fixture(scope="module")
def crops():
    torch.manual_seed(1)
    return torch.rand(2, 3, 224, 224)


def test_load_maps_every_key(saved, encoder):
    _, state = saved
    loaded = encoder.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert not encoder.training


def test_bare_state_dict_without_batch_counters(saved, tmp_path):
    """A file that is directly E_flame's state dict, from a torch without num_batches_tracked."""
    _, state = saved
    bare = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(bare, tmp_path / "e_flame.pt")
    enc = deca.load_deca_encoder(tmp_path / "e_flame.pt")
    assert torch.equal(enc.state_dict()["layers.2.weight"], state["layers.2.weight"])


def test_output_split(encoder, crops):
    with torch.no_grad():
        out = encoder(crops)
        code = encoder.code(crops)
    sizes = {k: tuple(v.shape) for k, v in out.items()}
    assert sizes == {"shape": (2, 100), "tex": (2, 50), "exp": (2, 50), "pose": (2, 6),
                     "cam": (2, 3), "light": (2, 9, 3)}
    assert code.shape == (2, deca.DECA_CODE_SIZE) == (2, 236)
    torch.testing.assert_close(out["light"], code[:, 209:].reshape(2, 9, 3))


def _check_fields(params: FitParams, code: torch.Tensor, n_shape: int, n_exp: int):
    k_s, k_e = min(n_shape, 100), min(n_exp, 50)
    assert params.shape.shape == (2, n_shape) and params.exp.shape == (2, n_exp)
    torch.testing.assert_close(params.shape[:, :k_s], code[:, :k_s])
    torch.testing.assert_close(params.exp[:, :k_e], code[:, 150:150 + k_e])
    assert torch.all(params.shape[:, k_s:] == 0) and torch.all(params.exp[:, k_e:] == 0)
    torch.testing.assert_close(params.global_pose, code[:, 200:203])
    torch.testing.assert_close(params.jaw_pose, code[:, 203:206])
    torch.testing.assert_close(params.cam, code[:, 206:209])
    torch.testing.assert_close(params.light, code[:, 209:236].reshape(2, 9, 3))


def test_initial_params_from_encoder(encoder, crops):
    with torch.no_grad():
        code = encoder.code(crops)
    for n_shape, n_exp in ((300, 100), (100, 50), (20, 10)):
        base = FitParams.initial(2, n_shape, n_exp, deca.FLAME_N_VERTS)
        base.neck_pose += 0.01
        params = deca.deca_initial_params(encoder, crops, _model(n_shape, n_exp), base)
        _check_fields(params, code, n_shape, n_exp)
        torch.testing.assert_close(params.albedo, base.albedo)  # per-vertex albedo kept
        torch.testing.assert_close(params.neck_pose, base.neck_pose)
        assert torch.all(params.eye_pose == 0)
        assert params.shape.data_ptr() != base.shape.data_ptr()  # base untouched
        assert torch.all(base.shape == 0)


def test_initial_params_texture_coefficients(encoder, crops):
    with torch.no_grad():
        tex = encoder.code(crops)[:, 100:150]
    for n_tex in (200, 30):
        base = FitParams.initial(2, 300, 100, deca.FLAME_N_VERTS)
        base.albedo = torch.full((2, n_tex), 0.5)
        params = deca.deca_initial_params(encoder, crops, _model(300, 100), base)
        k = min(50, n_tex)
        torch.testing.assert_close(params.albedo[:, :k], tex[:, :k])
        assert torch.all(params.albedo[:, k:] == 0.5)
        kept = deca.deca_initial_params(encoder, crops, _model(300, 100), base, use_tex=False)
        assert torch.all(kept.albedo == 0.5)


def test_initial_params_resizes_crops(encoder, crops):
    big = torch.nn.functional.interpolate(crops, size=(448, 448), mode="nearest")
    base = FitParams.initial(2, 100, 50, deca.FLAME_N_VERTS)
    params = deca.deca_initial_params(encoder, big, _model(100, 50), base)
    assert params.shape.shape == (2, 100) and torch.isfinite(params.cam).all()


def test_topology_check():
    deca.require_flame_topology(_model(300, 100))
    with pytest.raises(UsageError, match=r"needs the FLAME model \(5023 vertices.*'ict-flame' "
                                         r"has 12788 vertices; fix: .*--init zero"):
        deca.require_flame_topology(_model(100, 53, n_verts=12788, name="ict-flame"))


def test_initial_params_refuses_other_topology(encoder, crops):
    base = FitParams.initial(2, 100, 53, 12788)
    with pytest.raises(UsageError, match="12788 vertices"):
        deca.deca_initial_params(encoder, crops, _model(100, 53, n_verts=12788), base)


def test_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAMEFIT_HOME", str(tmp_path / "home"))
    assert deca.default_deca_path() == tmp_path / "home" / "deca" / "deca_model.tar"
    with pytest.raises(AssetError) as info:
        deca.load_deca_encoder()
    msg = str(info.value)
    assert "\n" not in msg and str(deca.default_deca_path()) in msg
    assert "not bundled" in msg and "github.com/yfeng95/DECA" in msg
    assert "flame.is.tue.mpg.de" in msg and "cli.py assets install deca_model.tar" in msg


def test_text_and_tar_files(tmp_path):
    text = tmp_path / "deca_model.tar"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(AssetError, match=r"deca_model.tar: not a readable torch checkpoint"):
        deca.load_deca_encoder(text)
    real_tar = tmp_path / "archive.tar"
    with tarfile.open(real_tar, "w") as tf:
        tf.add(text, arcname="x.txt")
    with pytest.raises(AssetError, match=r"archive.tar: not a readable"):
        deca.load_deca_encoder(real_tar)


def test_no_e_flame(tmp_path):
    path = tmp_path / "detail_only.tar"
    torch.save({"E_detail": {"w": torch.zeros(2)}, "opt": {"lr": torch.tensor(1.0)}}, path)
    with pytest.raises(AssetError, match=r"detail_only.tar: key 'E_flame' is missing "
                                         r"\(the file has: E_detail, opt\)"):
        deca.load_deca_encoder(path)


def test_wrong_shape_and_missing_key(tmp_path):
    path = tmp_path / "bad_shape.tar"
    torch.save({"E_flame": {"encoder.conv1.weight": torch.zeros(64, 3, 5, 5)}}, path)
    with pytest.raises(AssetError, match=r"bad_shape.tar: key 'E_flame.encoder.conv1.weight' has "
                                         r"shape \(64, 3, 5, 5\), expected \(64, 3, 7, 7\)"):
        deca.load_deca_encoder(path)
    path = tmp_path / "partial.tar"
    torch.save({"E_flame": {"layers.0.weight": torch.zeros(1024, 2048)}}, path)
    with pytest.raises(AssetError, match=r"partial.tar: key 'E_flame.encoder.conv1.weight' is "
                                         "missing"):
        deca.load_deca_encoder(path)
    path = tmp_path / "extra.tar"
    torch.save({"E_flame": {"layers.0.weight": torch.zeros(1024, 2048), "fc.weight": 1}}, path)
    with pytest.raises(AssetError, match=r"extra.tar: key 'E_flame.fc.weight' is not part"):
        deca.load_deca_encoder(path)


def test_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "deca_model.tar"
    torch.save({"E_flame": _Evil(marker)}, path)
    with pytest.raises(AssetError, match=r"deca_model.tar: refused to load"):
        deca.load_deca_encoder(path)
    raw = tmp_path / "raw.tar"
    raw.write_bytes(pickle.dumps({"E_flame": _Evil(marker)}, protocol=2))
    with pytest.raises(AssetError, match=r"raw.tar: "):
        deca.load_deca_encoder(raw)
    assert not marker.exists()


def test_require_deca_compatible(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAMEFIT_HOME", str(tmp_path / "home"))
    write_synthetic_flame(tmp_path / "synth")
    with pytest.raises(UsageError, match="--init deca needs the FLAME model"):
        deca.require_deca_compatible(str(tmp_path / "synth"))
    monkeypatch.setattr(deca, "load_model", lambda path, **kw: _model(300, 100))
    with pytest.raises(AssetError, match="DECA weights not found"):
        deca.require_deca_compatible(str(tmp_path / "synth"))
    weights = deca.default_deca_path()
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"x")
    assert deca.require_deca_compatible(str(tmp_path / "synth")) == weights


def test_fit_starts_from_the_encoder(saved, encoder, synthetic_model_dir, tmp_path, monkeypatch):
    """Through the fit pipeline (--init deca): with no iterations the result is the encoder's output.
    The synthetic model stands in for FLAME's topology (the vertex-count check is pointed at it)."""
    import shutil

    import numpy as np

    from bench.synthetic import random_params, render_photo, write_case
    from fitter.fit import fit_images, load_flame, prepare_target

    model = load_flame(synthetic_model_dir)
    monkeypatch.setattr(deca, "FLAME_N_VERTS", model.n_verts)
    monkeypatch.setenv("FLAMEFIT_HOME", str(tmp_path / "home"))
    deca.default_deca_path().parent.mkdir(parents=True)
    shutil.copy(saved[0], deca.default_deca_path())
    rng = np.random.default_rng(0)
    image, lmk = render_photo(model, random_params(model, rng), rng, size=256)
    photo = write_case(tmp_path, "face", image, lmk)
    zero = [f"stages.{s}.iterations=0" for s in ("rigid", "landmarks", "photometric")] + ["resolution=224"]
    [result] = fit_images([photo], model=model, landmarks=tmp_path, detector="file", init="deca", overrides=zero)
    crop = torch.from_numpy(prepare_target(photo, 224, tmp_path / "face.npy").crop).permute(2, 0, 1)[None]
    with torch.no_grad():
        code = encoder.code(crop)
    torch.testing.assert_close(result.params.shape[0], code[0, :model.n_shape])
    torch.testing.assert_close(result.params.exp[0], code[0, 150:150 + model.n_exp])
    torch.testing.assert_close(result.params.jaw_pose[0], code[0, 203:206])
    # DECA's weak-perspective camera, as the pinhole camera that frames the model origin's plane alike
    torch.testing.assert_close(result.params.cam[0, 0], code[0, 206])
    assert result.params.cam.shape == (1, 6) and result.report["camera"]["model"] == "pinhole"
