"""Asset loading, validation, cache, safe unpickling, textures, masks and doctor."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from priors import assets as A
from priors.assets import (
    install_asset,
    install_model,
    load_landmark_embedding,
    load_model,
    resolve_model_path,
)
from priors.doctor import doctor_items
from priors.errors import AssetError
from priors.safe_pickle import ChumpyStub, load_npy, load_pickle, loads_pickle, to_array
from priors.textures import find_masks, find_texture_space, load_masks, load_texture_space
from tests.synthetic import JOINTS, synthetic_assets, write_synthetic_flame

STANDIN_SHA = "74bdbe48fa6f5d824c116186d1cdbf5cda557ea3d3b690425340772c71b67e5b"
ARRAYS = ("v_template", "faces", "shapedirs", "expdirs", "posedirs", "J_regressor", "weights",
          "parents")
LMK = ("static_faces", "static_bary", "dynamic_faces", "dynamic_bary", "full_faces", "full_bary")


def assert_same_assets(a, b) -> None:
    for key in ARRAYS:
        x, y = getattr(a, key), getattr(b, key)
        assert x.dtype == y.dtype and np.array_equal(x, y), key
    for key in LMK:
        assert np.array_equal(getattr(a.landmarks, key), getattr(b.landmarks, key)), key


def plain_model_dict(folder: Path) -> dict:
    """The synthetic model as a dict of plain arrays (chumpy=False file, stock pickle)."""
    path = write_synthetic_flame(folder, chumpy=False)
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="latin1")


def write_model(folder: Path, model: dict, embedding_from: Path | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "generic_model.pkl"
    with open(path, "wb") as fh:
        pickle.dump(model, fh, protocol=2)
    if embedding_from is not None:
        shutil.copy(embedding_from / "landmark_embedding.npy", folder / "landmark_embedding.npy")
    return path


# ------------------------------------------------------------------------------ stand-in

def test_standin_loads_with_expected_layout(standin_path):
    m = load_model(standin_path)
    assert (m.n_verts, m.faces.shape, m.n_shape, m.n_exp) == (12788, (25360, 3), 100, 53)
    assert m.parents.tolist() == [-1, 0, 1, 1, 1]
    assert m.sha256 == STANDIN_SHA and m.name == "ict-flame"
    assert m.tag == f"ict-flame sha256:{STANDIN_SHA}"
    assert m.v_template.dtype == np.float32 and m.faces.dtype == np.int64
    assert m.J_regressor.shape == (5, 12788) and m.J_regressor.dtype == np.float32
    assert m.posedirs.shape == (12788, 3, 36) and m.weights.shape == (12788, 5)
    joints = m.J_regressor @ m.v_template
    assert np.allclose(joints[2], [0, -0.0055, 0.0182], atol=1e-4)  # jaw hinge, README
    lm = m.landmarks
    assert lm.full_faces.shape == (68,) and lm.full_bary.shape == (68, 3)
    assert lm.dynamic_faces.shape == (79, 17) and lm.static_bary.shape == (51, 3)
    assert load_model(standin_path) is m  # memoised


def test_standin_component_counts_can_be_lowered(standin_path):
    m = load_model(standin_path, n_shape=10, n_exp=5)
    full = load_model(standin_path)
    assert m.shapedirs.shape == (12788, 3, 10) and m.expdirs.shape == (12788, 3, 5)
    assert np.array_equal(m.shapedirs, full.shapedirs[:, :, :10])
    with pytest.raises(AssetError, match=r"n_shape=101 .* 100 non-zero"):
        load_model(standin_path, n_shape=101)


def test_install_roundtrip_and_cache_is_faster(standin_path, tmp_path):
    A._MEMO.clear()
    t0 = time.perf_counter()
    from_pkl = load_model(standin_path)
    t_pkl = time.perf_counter() - t0
    npz = install_model(standin_path, home=tmp_path)
    assert npz == tmp_path / "models" / "ict-flame" / "model.npz"
    A._MEMO.clear()
    t0 = time.perf_counter()
    from_npz = load_model(npz)
    t_npz = time.perf_counter() - t0
    assert_same_assets(from_pkl, from_npz)
    assert (from_npz.name, from_npz.sha256) == ("ict-flame", STANDIN_SHA)
    assert from_npz.source.endswith("generic_model.pkl")
    assert t_npz < t_pkl


# --------------------------------------------------------------------------- synthetic

def test_synthetic_chumpy_pickle_loads(synthetic_model_dir):
    m = load_model(synthetic_model_dir)
    assert (m.n_shape, m.n_exp) == (8, 6)
    assert m.name == synthetic_model_dir.name
    assert np.allclose(m.J_regressor @ m.v_template, JOINTS, atol=1e-6)
    assert np.allclose(m.J_regressor.sum(axis=1), 1.0) and (m.J_regressor >= 0).all()
    raw = load_pickle(synthetic_model_dir / "generic_model.pkl")
    assert isinstance(raw["v_template"], ChumpyStub)
    assert np.asarray(raw["v_template"]).shape == (m.n_verts, 3)


def test_synthetic_mesh_is_closed_and_outward():
    m = synthetic_assets()
    v, f = m.v_template.astype(np.float64), m.faces
    volume = np.einsum("fk,fk->f", np.cross(v[f[:, 0]], v[f[:, 1]]), v[f[:, 2]]).sum() / 6
    assert volume > 0.004  # counter-clockwise from outside: positive signed volume
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert (counts == 2).all()  # closed, manifold
    lm = m.landmarks
    pts = (v[f[lm.full_faces]] * lm.full_bary[:, :, None]).sum(axis=1)
    assert (pts[:, 2] > 0).all() and pts[30, 2] == pts[:, 2].max()  # nose tip most forward
    assert pts[36, 0] < 0 < pts[45, 0]  # right eye corner at -x, left at +x
    assert pts[19, 1] > pts[37, 1] > pts[30, 1] > pts[51, 1] > pts[8, 1]


def test_synthetic_chumpy_and_plain_agree(tmp_path):
    a = load_model(write_synthetic_flame(tmp_path / "ch", chumpy=True))
    b = load_model(write_synthetic_flame(tmp_path / "plain", chumpy=False))
    assert_same_assets(a, b)


def test_extra_shape_columns_are_tolerated(tmp_path):
    m = load_model(write_synthetic_flame(tmp_path, n_shape=5, n_exp=3, extra_shape_cols=4))
    assert (m.n_shape, m.n_exp) == (5, 3)


def test_synthetic_install_roundtrip(synthetic_model_dir, tmp_path):
    npz = install_model(synthetic_model_dir, home=tmp_path)
    assert_same_assets(load_model(synthetic_model_dir), load_model(npz))


def test_plain_npz_with_flame_keys(tmp_path):
    model = plain_model_dict(tmp_path / "src")
    model["J_regressor"] = model["J_regressor"].toarray()
    plain = {k: v for k, v in model.items() if isinstance(v, np.ndarray)}
    np.savez(tmp_path / "flame.npz", **plain)
    shutil.copy(tmp_path / "src" / "landmark_embedding.npy", tmp_path)
    m = load_model(tmp_path / "flame.npz")
    assert (m.n_shape, m.n_exp, m.name) == (8, 6, "flame")


def test_memo_notices_a_changed_file(tmp_path):
    path = write_synthetic_flame(tmp_path, n_shape=4)
    first = load_model(path)
    write_synthetic_flame(tmp_path, n_shape=5)
    os.utime(path, ns=(time.time_ns() + 10**9,) * 2)
    assert load_model(path).n_shape == 5 and first.n_shape == 4


# ----------------------------------------------------------------------------- resolve

def test_resolve_order(monkeypatch, tmp_path, synthetic_model_dir, standin_path):
    home = tmp_path / "home"
    monkeypatch.setenv("FLAMEFIT_HOME", str(home))
    monkeypatch.delenv("FLAMEFIT_MODEL", raising=False)
    assert resolve_model_path() == A.standin_dir()  # nothing else: the stand-in
    first = install_model(synthetic_model_dir)
    assert resolve_model_path() == first  # cache beats stand-in
    other = tmp_path / "other"
    write_synthetic_flame(other, seed=1)
    second = install_model(other)
    os.utime(second, ns=(time.time_ns() + 10**9,) * 2)
    assert resolve_model_path() == second  # newest install
    monkeypatch.setenv("FLAMEFIT_MODEL", str(standin_path))
    assert resolve_model_path() == standin_path  # env beats cache
    assert resolve_model_path(synthetic_model_dir) == synthetic_model_dir  # explicit beats env
    with pytest.raises(AssetError, match="does not exist"):
        resolve_model_path(tmp_path / "nope.pkl")
    monkeypatch.setenv("FLAMEFIT_MODEL", str(tmp_path / "gone"))
    with pytest.raises(AssetError, match="FLAMEFIT_MODEL"):
        resolve_model_path()


def test_resolve_without_anything_says_where_to_get_flame(monkeypatch, tmp_path):
    monkeypatch.setenv("FLAMEFIT_HOME", str(tmp_path))
    monkeypatch.setattr(A, "standin_dir", lambda: tmp_path / "no-standin")
    with pytest.raises(AssetError, match=r"flame\.is\.tue\.mpg\.de.*assets install"):
        resolve_model_path()


# ---------------------------------------------------------------------- unsafe pickles

class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize("kind", ["system", "eval", "popen"])
def test_malicious_pickle_is_refused_without_running(tmp_path, kind):
    import subprocess

    marker = tmp_path / "pwned"
    func, arg = {"system": (os.system, f"touch {marker}"),
                 "eval": (eval, f"open({str(marker)!r}, 'w')"),
                 "popen": (subprocess.Popen, ["touch", str(marker)])}[kind]
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps({"v_template": _Evil(func, arg)}, protocol=2))
    with pytest.raises(AssetError) as err:
        load_model(path)
    msg = str(err.value)
    assert str(path) in msg and "refuses to load" in msg and "\n" not in msg
    assert not marker.exists()


def test_malicious_embedding_npy_is_refused(tmp_path, synthetic_model_dir):
    marker = tmp_path / "pwned"
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(synthetic_model_dir / "generic_model.pkl", folder)
    np.save(folder / "landmark_embedding.npy", {"x": _Evil(os.system, f"touch {marker}")},
            allow_pickle=True)
    with pytest.raises(AssetError, match="landmark_embedding.npy: refuses to load"):
        load_model(folder)
    assert not marker.exists()


def test_truncated_pickle(tmp_path, synthetic_model_dir):
    data = (synthetic_model_dir / "generic_model.pkl").read_bytes()
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AssetError, match=r"generic_model.pkl: truncated or corrupt.*re-download"):
        load_model(path)


def test_chumpy_expression_without_array_is_reported():
    data = b"\x80\x02cchumpy.ch_ops\nadd\nq\x00)\x81q\x01}q\x02X\x01\x00\x00\x00aq\x03K\x01sb."
    obj = loads_pickle(data, "expr.pkl")
    with pytest.raises(ValueError, match="chumpy.ch_ops.add"):
        to_array(obj)


# -------------------------------------------------------------------------- validation

def _bad(model: dict, case: str) -> str:
    """Break the model dict in one way; returns the key the message must name."""
    if case == "missing":
        del model["weights"]
        return "weights"
    if case == "shape":
        model["shapedirs"] = model["shapedirs"][:-1]
        return "shapedirs"
    if case == "faces":
        model["f"] = model["f"].astype(np.int64)
        model["f"][3, 1] = 10**6
        return "'f'"
    if case == "nan":
        model["v_template"] = model["v_template"].copy()
        model["v_template"][0, 0] = np.nan
        return "v_template"
    if case == "weights":
        model["weights"] = model["weights"] * 0.5
        return "weights"
    if case == "kintree":
        model["kintree_table"] = np.array([[4294967295, 0, 1, 4, 1], [0, 1, 2, 3, 4]])
        return "kintree_table"
    if case == "columns":
        model["shapedirs"] = model["shapedirs"][:, :, :300]
        return "shapedirs"
    if case == "millimetres":
        model["v_template"] = model["v_template"] * 1000
        return "v_template"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "shape", "faces", "nan", "weights", "kintree",
                                  "columns", "millimetres"])
def test_broken_models_give_one_line_errors(tmp_path, case):
    model = plain_model_dict(tmp_path / "src")
    key = _bad(model, case)
    path = write_model(tmp_path / "bad", model, embedding_from=tmp_path / "src")
    with pytest.raises(AssetError) as err:
        load_model(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and key in msg and "fix:" in msg and "\n" not in msg


def test_missing_embedding(tmp_path, synthetic_model_dir):
    path = tmp_path / "generic_model.pkl"
    shutil.copy(synthetic_model_dir / "generic_model.pkl", path)
    with pytest.raises(AssetError, match=r"generic_model.pkl: no landmark embedding.*fix:"):
        load_model(path)
    assert load_model(path, require_landmarks=False).landmarks is None


def test_embedding_faces_out_of_range(tmp_path, synthetic_model_dir):
    shutil.copy(synthetic_model_dir / "generic_model.pkl", tmp_path)
    emb = load_npy(synthetic_model_dir / "landmark_embedding.npy")
    emb["static_lmk_faces_idx"] = emb["static_lmk_faces_idx"] + 10**6
    np.save(tmp_path / "landmark_embedding.npy", emb, allow_pickle=True)
    with pytest.raises(AssetError, match=r"landmark_embedding.npy: key 'static_lmk_faces_idx'"):
        load_model(tmp_path)


def test_ringnet_embedding(tmp_path, synthetic_model_dir):
    deca = load_model(synthetic_model_dir).landmarks
    shutil.copy(synthetic_model_dir / "generic_model.pkl", tmp_path)
    static = {"lmk_face_idx": deca.static_faces.astype(np.uint32),
              "lmk_b_coords": deca.static_bary.astype(np.float64)}
    (tmp_path / "flame_static_embedding.pkl").write_bytes(pickle.dumps(static, protocol=2))
    np.save(tmp_path / "flame_dynamic_embedding.npy",
            {"lmk_face_idx": deca.dynamic_faces, "lmk_b_coords": deca.dynamic_bary},
            allow_pickle=True)
    m = load_model(tmp_path)
    assert np.array_equal(m.landmarks.full_faces, deca.full_faces)
    assert np.allclose(m.landmarks.full_bary, deca.full_bary)
    (tmp_path / "flame_dynamic_embedding.npy").unlink()
    with pytest.raises(AssetError, match="flame_dynamic_embedding.npy: missing"):
        load_landmark_embedding(tmp_path / "flame_static_embedding.pkl")


def test_deca_embedding_with_torch_tensors(tmp_path, synthetic_model_dir):
    torch = pytest.importorskip("torch")
    emb = load_npy(synthetic_model_dir / "landmark_embedding.npy")
    emb["dynamic_lmk_faces_idx"] = torch.from_numpy(emb["dynamic_lmk_faces_idx"])
    emb["dynamic_lmk_bary_coords"] = torch.from_numpy(emb["dynamic_lmk_bary_coords"])
    np.save(tmp_path / "landmark_embedding.npy", emb, allow_pickle=True)
    got = load_landmark_embedding(tmp_path / "landmark_embedding.npy")
    assert np.array_equal(got.dynamic_faces, emb["dynamic_lmk_faces_idx"].numpy())
    assert got.dynamic_bary.dtype == np.float32


# --------------------------------------------------------------------- textures, masks

def _write_flame_texture(path: Path, size: int = 8, k: int = 5, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {"mean": rng.uniform(0, 255, (size, size, 3)),
              "tex_dir": rng.normal(0, 10, (size, size, 3, k)),
              "vt": rng.uniform(0, 1, (20, 2)), "ft": rng.integers(0, 20, (30, 3))}
    np.savez(path, **arrays)
    return arrays


def test_flame_texture_space(tmp_path):
    raw = _write_flame_texture(tmp_path / "FLAME_texture.npz")
    tex = load_texture_space(tmp_path / "FLAME_texture.npz")
    assert (tex.kind, tex.name, tex.image_size, tex.n_tex) == ("uv", "FLAME", (8, 8), 5)
    assert np.allclose(tex.mean, raw["mean"][:, :, ::-1] / 255.0, atol=1e-6)  # BGR -> RGB
    assert tex.basis.shape == (8, 8, 3, 5) and tex.ft.dtype == np.int64
    small = load_texture_space(tmp_path / "FLAME_texture.npz", n_tex=2, size=4)
    assert small.basis.shape == (4, 4, 3, 2)
    assert np.allclose(small.mean[0, 0], tex.mean[:2, :2].mean(axis=(0, 1)), atol=1e-6)


def test_bfm_albedo_space_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "FLAME_albedo_from_BFM.npz", MU=rng.uniform(0, 1, 16 * 16 * 3),
             PC=rng.normal(0, 0.1, (16 * 16 * 3, 4)))
    tex = load_texture_space(tmp_path / "FLAME_albedo_from_BFM.npz")
    assert (tex.kind, tex.name, tex.image_size, tex.n_tex, tex.vt) == ("uv", "BFM", (16, 16), 4,
                                                                        None)
    np.savez(tmp_path / "bad.npz", MU=np.zeros(10), PC=np.zeros((11, 2)))
    with pytest.raises(AssetError, match="bad.npz"):
        load_texture_space(tmp_path / "bad.npz")
    with pytest.raises(AssetError, match="bad.npz: key 'MU'"):
        install_asset(tmp_path / "bad.npz", tmp_path / "home")
    np.savez(tmp_path / "other.npz", foo=np.zeros(3))
    with pytest.raises(AssetError, match=r"other.npz: no texture space keys"):
        load_texture_space(tmp_path / "other.npz")


def _write_masks(path: Path) -> None:
    masks = {"face": np.arange(0, 50, dtype=np.int64), "lips": np.array([3, 4, 5], np.uint32)}
    path.write_bytes(pickle.dumps(masks, protocol=2))


def test_masks(tmp_path):
    _write_masks(tmp_path / "FLAME_masks.pkl")
    masks = load_masks(tmp_path / "FLAME_masks.pkl")
    assert set(masks) == {"face", "lips"} and masks["lips"].dtype == np.int64
    with pytest.raises(AssetError, match=r"FLAME_masks.pkl: mask 'face'.*outside"):
        load_masks(tmp_path / "FLAME_masks.pkl", n_verts=10)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_Evil(os.system, "true"), protocol=2))
    with pytest.raises(AssetError, match="evil.pkl: refuses to load"):
        load_masks(tmp_path / "evil.pkl")


# ------------------------------------------------------------------------ install_asset

def test_install_asset_dispatch(tmp_path, synthetic_model_dir):
    torch = pytest.importorskip("torch")
    home = tmp_path / "home"
    kind, dest = install_asset(synthetic_model_dir, home)
    assert kind == "model" and dest == home / "models" / synthetic_model_dir.name / "model.npz"

    zpath = tmp_path / "FLAME2020.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.write(synthetic_model_dir / "generic_model.pkl", "FLAME2020/generic_model.pkl")
        zf.writestr("FLAME2020/Readme.pdf", b"%PDF")
    kind, dest = install_asset(zpath, home)
    assert kind == "model" and dest == home / "models" / "FLAME2020" / "model.npz"
    assert load_model(dest, require_landmarks=False).sha256 == A.sha256_file(
        synthetic_model_dir / "generic_model.pkl")

    _write_flame_texture(tmp_path / "FLAME_texture.npz")
    assert install_asset(tmp_path / "FLAME_texture.npz", home) == (
        "albedo", home / "albedo" / "FLAME_texture.npz")
    assert find_texture_space(home) == home / "albedo" / "FLAME_texture.npz"

    _write_masks(tmp_path / "FLAME_masks.pkl")
    assert install_asset(tmp_path / "FLAME_masks.pkl", home) == (
        "masks", home / "masks" / "FLAME_masks.pkl")
    assert find_masks(home) == home / "masks" / "FLAME_masks.pkl"

    emb = synthetic_model_dir / "landmark_embedding.npy"
    assert install_asset(emb, home) == ("embedding", home / "embeddings" / emb.name)

    torch.save({"E_flame": {"w": torch.zeros(2)}}, tmp_path / "deca_model.tar")
    assert install_asset(tmp_path / "deca_model.tar", home) == (
        "deca", home / "deca" / "deca_model.tar")


def test_install_asset_rejects_unknown_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(AssetError, match=r"notes.txt: not a file flamefit knows.*FLAME_masks"):
        install_asset(tmp_path / "notes.txt", tmp_path / "home")
    (tmp_path / "deca_model.tar").write_bytes(os.urandom(256))
    with pytest.raises(AssetError, match=r"deca_model.tar: not a torch checkpoint"):
        install_asset(tmp_path / "deca_model.tar", tmp_path / "home")
    with pytest.raises(AssetError, match="does not exist"):
        install_asset(tmp_path / "missing.pkl", tmp_path / "home")


def test_embedding_installed_in_home_is_used(tmp_path, monkeypatch, synthetic_model_dir):
    monkeypatch.setenv("FLAMEFIT_HOME", str(tmp_path / "home"))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(synthetic_model_dir / "generic_model.pkl", bare)
    npz = install_model(bare)
    assert load_model(npz, require_landmarks=False).landmarks is None
    install_asset(synthetic_model_dir / "landmark_embedding.npy")
    assert load_model(npz).landmarks is not None


# ------------------------------------------------------------------------------- doctor

def test_doctor_reports_missing_items_with_fixes(monkeypatch, tmp_path, synthetic_model_dir):
    monkeypatch.setenv("FLAMEFIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    items = {i.name: i for i in doctor_items(synthetic_model_dir)}
    assert items["model"].ok and "1094 vertices" in items["model"].detail
    assert items["landmark embedding"].ok
    for name in ("albedo texture space", "FLAME masks", "FAN detector weights", "DECA weights"):
        assert not items[name].ok and items[name].fix, name
    assert "2DFAN4-11f355bf06.pth.tar" in items["FAN detector weights"].detail
    assert "device" in items and "mediapipe" in items
    bad = {i.name: i for i in doctor_items(tmp_path / "nope.pkl")}
    assert not bad["model"].ok and "nope.pkl" in bad["model"].detail and bad["model"].fix


def test_loads_pickle_accepts_plain_numpy():
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    for protocol in (2, 4, 5):
        out = loads_pickle(pickle.dumps({"a": arr, "s": {1, 2}}, protocol=protocol))
        assert np.array_equal(out["a"], arr) and out["s"] == {1, 2}
    buf = io.BytesIO()
    np.save(buf, arr)
    (Path(os.environ["FLAMEFIT_HOME"]) / "plain.npy").write_bytes(buf.getvalue())
    assert np.array_equal(load_npy(Path(os.environ["FLAMEFIT_HOME"]) / "plain.npy"), arr)


def test_python2_copy_reg_chumpy_object():
    data = (b"(dp0\nS'v'\np1\nccopy_reg\n_reconstructor\np2\n(cchumpy.ch\nCh\np3\n"
            b"c__builtin__\nobject\np4\nNtp5\nRp6\n(dp7\nS'x'\np8\n(lp9\nF1.5\naF2.5\nasbs.")
    out = loads_pickle(data, "py2.pkl")
    assert isinstance(out["v"], ChumpyStub) and out["v"].chumpy_class == "chumpy.ch.Ch"
    assert np.array_equal(np.asarray(out["v"]), [1.5, 2.5])


def test_truncated_cache_npz(tmp_path, synthetic_model_dir):
    npz = install_model(synthetic_model_dir, home=tmp_path)
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 3])
    with pytest.raises(AssetError, match=r"model.npz: truncated or corrupt .npz.*re-install"):
        load_model(npz)
