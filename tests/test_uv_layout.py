"""FLAME's UV template and DECA's UV masks (issue 13, point 5): `assets install head_template.obj`
installs the UV layout for FLAME-topology models (vertex count checked against FLAME's, or an
installed model's whose triangles it must hold), texture spaces without vt/ft (BFM's) take it, and
doctor says whether it is there and fits the model. OBJ and PNG files are written by the tests."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import cli
from fitter import albedo as alb
from priors.assets import classify_asset, install_asset, load_model
from priors.doctor import doctor_items
from priors.errors import AssetError
from priors.textures import UVLayout, align_uv_layout, read_uv_layout, read_uv_mask


def write_uv_obj(path, n_verts: int, faces: np.ndarray, vt: np.ndarray, ft: np.ndarray, normals: bool = False):
    """An OBJ as DECA's head_template.obj is laid out: v lines, vt lines, then f v/vt triangles (1-based)."""
    rng = np.random.default_rng(0)
    lines = [f"v {x:.5f} {y:.5f} {z:.5f}" for x, y, z in rng.normal(0, 0.1, (n_verts, 3))]
    lines += [f"vt {a:.6f} {b:.6f}" for a, b in vt]
    tail = "/1" if normals else ""
    lines += ["f " + " ".join(f"{v + 1}/{t + 1}{tail}" for v, t in zip(fv, tv, strict=True))
              for fv, tv in zip(faces, ft, strict=True)]
    path.write_text("# uv template\n" + "\n".join(lines) + "\n")
    return path


def fake_flame_template(path, n_verts: int = 5023):
    """A FLAME-sized stand-in for head_template.obj: n_verts vertices, a strip of triangles, one UV each."""
    faces = np.array([[i, i + 1, i + 2] for i in range(n_verts - 2)])
    vt = np.random.default_rng(1).uniform(0, 1, (n_verts + 95, 2))
    ft = faces + 7  # texture indices differ from the vertex indices, as in FLAME's (seams split UVs)
    return write_uv_obj(path, n_verts, faces, vt, ft, normals=True)


def run(*args):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def test_read_uv_layout_round_trip(tmp_path):
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    vt = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.5, 0.5]])
    ft = np.array([[4, 1, 2], [4, 2, 3]])
    layout = read_uv_layout(write_uv_obj(tmp_path / "sq.obj", 4, faces, vt, ft))
    assert layout.n_verts == 4
    np.testing.assert_array_equal(layout.faces, faces)
    np.testing.assert_array_equal(layout.ft, ft)
    np.testing.assert_allclose(layout.vt, vt, atol=1e-6)


def test_align_uv_layout_matches_triangles_whatever_their_order():
    rng = np.random.default_rng(2)
    faces = np.array([[0, 1, 2], [0, 2, 3], [2, 4, 3], [1, 4, 2]])
    uv_of_vertex = np.arange(5)  # UV index = vertex index, so the aligned ft must equal the model's faces
    order = rng.permutation(len(faces))
    shuffled = np.array([np.roll(f, k) for f, k in zip(faces[order], (1, 2, 0, 1), strict=True)])
    layout = UVLayout("x.obj", 5, rng.uniform(0, 1, (5, 2)).astype(np.float32), uv_of_vertex[shuffled], shuffled)
    np.testing.assert_array_equal(align_uv_layout(layout, faces), faces)
    with pytest.raises(AssetError, match="not in the UV layout"):
        align_uv_layout(layout, np.array([[0, 1, 2], [0, 2, 3], [2, 4, 3], [0, 1, 4]]))


def test_assets_install_head_template(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("FLAMEFIT_HOME", str(home))
    src = fake_flame_template(tmp_path / "head_template.obj")
    assert classify_asset(src) == "uv layout"
    r = run("assets", "install", src)
    assert r.exit_code == 0, r.output
    installed = home / "uv" / "head_template.obj"
    assert installed.read_bytes() == src.read_bytes() and "uv layout" in r.output
    layout = read_uv_layout(installed)
    assert layout.n_verts == 5023 and len(layout.ft) == 5021 and len(layout.vt) == 5118


@pytest.mark.parametrize("case, words", [
    ("count", "5000 vertices, but FLAME's UV template has 5023"),
    ("no_uv", "line 4: 'f 1 2 3' is not a triangle with texture indices"),
    ("no_faces", "no UV layout"),
    ("quads", "line 5: 'f 1/1 2/2 3/3 4/4' is not a triangle"),
    ("range", "outside the 4 'vt' lines"),
    ("text", "line 2:"),
])
def test_bad_uv_templates_are_refused_in_one_line(tmp_path, case, words):
    path = tmp_path / "head_template.obj"
    if case == "count":
        fake_flame_template(path, n_verts=5000)
    elif case == "no_uv":
        path.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    elif case == "no_faces":
        path.write_text("v 0 0 0\nvt 0 0\n")
    elif case == "quads":
        path.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nv 1 1 0\nf 1/1 2/2 3/3 4/4\nvt 0 0\nvt 1 0\nvt 0 1\nvt 1 1\n")
    elif case == "range":
        path.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 0 1\nvt 1 1\nf 1/1 2/2 3/9\n")
    else:
        path.write_text("v 0 0 0\nv one 0 0\n")
    with pytest.raises(AssetError) as info:
        install_asset(path, tmp_path / "home")
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg and words in msg, msg
    assert not (tmp_path / "home" / "uv" / "head_template.obj").exists()


def test_uv_template_checked_against_an_installed_model(tmp_path, synthetic_model_dir):
    home = tmp_path / "home"
    install_asset(synthetic_model_dir / "generic_model.pkl", home)
    model = load_model(next((home / "models").glob("*/model.npz")), require_landmarks=False)
    faces, n = model.faces, model.n_verts  # 1094 vertices: accepted because an installed model has them
    rng = np.random.default_rng(3)
    order = rng.permutation(len(faces))
    obj = write_uv_obj(tmp_path / "head_template.obj", n, faces[order], rng.uniform(0, 1, (n, 2)), faces[order])
    kind, dest = install_asset(obj, home)
    assert kind == "uv layout" and dest == home / "uv" / "head_template.obj"
    other = faces.copy()
    other[5] = [other[5][0], other[5][1], (other[5][2] + 1) % n]  # one triangle that is not the model's
    if frozenset(other[5].tolist()) in {frozenset(f) for f in faces.tolist()}:
        other[5][2] = (other[5][2] + 1) % n
    (tmp_path / "bad").mkdir()
    bad = write_uv_obj(tmp_path / "bad" / "head_template.obj", n, other, rng.uniform(0, 1, (n, 2)), other)
    with pytest.raises(AssetError, match="not those of the installed model"):
        install_asset(bad, home)


def test_bfm_space_takes_the_installed_uv_layout_matched_to_the_model(tmp_path, synthetic_model_dir, monkeypatch):
    from priors.flame import FlameModel

    home = tmp_path / "home"
    install_asset(synthetic_model_dir / "generic_model.pkl", home)
    assets = load_model(next((home / "models").glob("*/model.npz")))
    model = FlameModel(assets)
    faces, n = assets.faces, assets.n_verts
    # the OBJ lists the triangles in another order, corners rotated; UV index = vertex index
    rng = np.random.default_rng(4)
    order = rng.permutation(len(faces))
    obj_faces = np.array([np.roll(f, int(k)) for f, k in zip(faces[order], rng.integers(0, 3, len(faces)),
                                                              strict=True)])
    uv = rng.uniform(0, 1, (n, 2))
    install_asset(write_uv_obj(tmp_path / "head_template.obj", n, obj_faces, uv, obj_faces), home)
    bfm = tmp_path / "FLAME_albedo_from_BFM.npz"
    np.savez(bfm, MU=np.full(8 * 8 * 3, 0.5), PC=np.zeros((8 * 8 * 3, 2)))
    install_asset(bfm, home)
    chosen, warning = alb.installed_albedo_model(model, home=home, require_flame=False)
    assert warning is None and isinstance(chosen, alb.TextureAlbedo), warning
    np.testing.assert_array_equal(chosen.ft.numpy(), faces)  # aligned to the model's own triangles
    np.testing.assert_allclose(chosen.vt.numpy()[faces], uv[faces], atol=1e-6)
    # a FLAME-sized template on this 1094-vertex mesh is refused at use with a reason, not misapplied
    fake_flame_template(home / "uv" / "head_template.obj")
    chosen, warning = alb.installed_albedo_model(model, home=home, require_flame=False)
    assert isinstance(chosen, alb.VertexAlbedo) and "5023 vertices and the model 1094" in warning


def test_doctor_says_whether_the_uv_layout_fits_the_model(tmp_path, monkeypatch, synthetic_model_dir, standin_path):
    home = tmp_path / "home"
    monkeypatch.setenv("FLAMEFIT_HOME", str(home))
    items = {i.name: i for i in doctor_items(standin_path)}
    assert not items["UV layout"].ok and "head_template.obj" in items["UV layout"].fix
    fake_flame_template(tmp_path / "head_template.obj")
    install_asset(tmp_path / "head_template.obj", home)
    item = {i.name: i for i in doctor_items(standin_path)}["UV layout"]
    assert not item.ok and item.status == "no match" and "5023 vertices" in item.detail
    assert "12788" in item.detail
    r = run("doctor", "--model", standin_path)
    assert r.exit_code == 0 and "no match" in r.output
    # the synthetic model with its own layout installed: it matches
    assets = load_model(synthetic_model_dir / "generic_model.pkl", require_landmarks=False)
    write_uv_obj(home / "uv" / "head_template.obj", assets.n_verts, assets.faces,
                 np.zeros((assets.n_verts, 2)), assets.faces)
    item = {i.name: i for i in doctor_items(synthetic_model_dir)}["UV layout"]
    assert item.ok and "matches the model" in item.detail


def write_mask_png(path, value=None, size=32):
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2) * 255
    arr = np.full((size, size), value, np.uint8) if value is not None else disc.astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def test_uv_masks_install_validate_and_doctor(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("FLAMEFIT_HOME", str(home))
    src = write_mask_png(tmp_path / "uv_face_eye_mask.png")
    mask = read_uv_mask(src)
    assert mask.shape == (32, 32) and mask[16, 16] == 1.0 and mask[0, 0] == 0.0
    r = run("assets", "install", src)
    assert r.exit_code == 0, r.output
    assert (home / "uv" / "uv_face_eye_mask.png").read_bytes() == src.read_bytes()
    item = {i.name: i for i in doctor_items()}["UV face masks"]
    assert item.ok and "32x32" in item.detail and "uv_face_eye_mask.png" in item.detail
    (tmp_path / "b").mkdir()
    black = write_mask_png(tmp_path / "b" / "uv_face_mask.png", 0)
    r = run("assets", "install", black)
    assert r.exit_code != 0 and "black" in r.output and str(black) in r.output
    assert not (home / "uv" / "uv_face_mask.png").exists()
    junk = tmp_path / "c" / "uv_face_mask.png"
    junk.parent.mkdir()
    junk.write_bytes(b"not a png")
    with pytest.raises(AssetError, match="not a readable image"):
        install_asset(junk, home)
