"""Albedo models: per-vertex colours or a UV texture space (fitter.albedo), in synthesis,
the fit's set-up and the written outputs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fitter import albedo as alb
from fitter import io
from fitter.camera import ortho_project
from fitter.params import FitParams
from fitter.render import render_mesh
from fitter.shading import sh_shading, vertex_normals
from fitter.synth import render_textured, synthesize
from priors.errors import UsageError
from priors.flame import FlameModel
from tests.synthetic import synthetic_assets

RED, GREEN, BLUE = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)


def write_flame_texture(path: Path, mean: np.ndarray, basis: np.ndarray, vt=None, ft=None) -> Path:
    """FLAME_texture.npz as FLAME ships it: mean (H, W, 3) and tex_dir (H, W, 3, K) in 0-255
    BGR order, plus vt (T, 2) / ft (F, 3). mean and basis are given as RGB in [0, 1]."""
    arrays = {"mean": mean[:, :, ::-1] * 255.0, "tex_dir": basis[:, :, ::-1, :] * 255.0}
    if vt is not None:
        arrays.update(vt=np.asarray(vt, np.float64), ft=np.asarray(ft, np.int64))
    np.savez(path, **arrays)
    return path


# ----------------------------------------------------------------------------- a textured square
# A square covering the whole 16 x 16 image: vertex 0 top-left, 1 top-right, 2 bottom-right,
# 3 bottom-left (screen pixels, y down). Its UVs (OBJ convention, v up) put the image's top-left
# corner at uv (0, 1) and its bottom-left at uv (0, 0), so the texture appears upright. vt is
# listed in a shuffled order with an unused extra entry: only ft ties corners to UVs.
RES = 16
SQUARE = torch.tensor([[[0.0, 0.0, 1.0], [16.0, 0.0, 1.0], [16.0, 16.0, 1.0], [0.0, 16.0, 1.0]]])
SQUARE_FACES = torch.tensor([[0, 1, 2], [0, 2, 3]])
SQUARE_VT = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.0, 0.0], [1.0, 1.0]]
SQUARE_FT = [[1, 4, 0], [1, 0, 3]]  # top-left (0,1), top-right (1,1), bottom-right (1,0), bottom-left (0,0)
BASIS0 = (0.2, 0.1, 0.05)  # a constant basis image


def square_texture_space(tmp_path: Path):
    """8 x 8 texture: left half red, right half blue, top two rows green; basis 0 constant,
    basis 1 random."""
    mean = np.zeros((8, 8, 3))
    mean[:, :4] = RED
    mean[:, 4:] = BLUE
    mean[:2] = GREEN
    rng = np.random.default_rng(0)
    basis = np.stack([np.broadcast_to(BASIS0, (8, 8, 3)), rng.uniform(-0.3, 0.3, (8, 8, 3))], axis=-1)
    path = write_flame_texture(tmp_path / "FLAME_texture.npz", mean, basis, SQUARE_VT, SQUARE_FT)
    return alb.load_albedo_space(path)


@pytest.fixture
def square_model(tmp_path):
    tiny = SimpleNamespace(n_verts=4, faces=SQUARE_FACES)
    model, warning = alb.albedo_model_for(tiny, square_texture_space(tmp_path), require_flame=False)
    assert warning is None and isinstance(model, alb.TextureAlbedo)
    return model


def render_square(model, coeffs, verts=SQUARE):
    shade = torch.ones(1, 4, 3)  # unit irradiance: the image is the albedo
    return render_textured(verts, SQUARE_FACES, model, coeffs, shade, RES, RES)


def test_texture_space_is_read_as_rgb_with_its_uv_layout(square_model):
    assert (square_model.n_tex, square_model.image_size, square_model.name) == (2, (8, 8), "FLAME")
    tex = square_model.texture(torch.zeros(1, 2))[0]  # 3 x 8 x 8, row 0 = top
    assert tex[:, 0, 0].tolist() == list(GREEN) and tex[:, 5, 1].tolist() == list(RED)
    assert tex[:, 5, 6].tolist() == list(BLUE)


def test_rendered_albedo_is_the_texture_at_the_pixels_uv(square_model):
    out = render_square(square_model, torch.zeros(1, 2))
    img = out["image"][0]
    assert torch.equal(out["alpha"], torch.ones(1, 1, RES, RES))  # the square covers every pixel
    # Pixel (row i, col j) has its centre at uv = ((j + .5) / 16, 1 - (i + .5) / 16), i.e. at
    # texel coordinates (u * 8, (1 - v) * 8) = (j / 2 + .25, i / 2 + .25): bilinear between the
    # texel centres around (j / 2 - .25, i / 2 - .25), clamped at the border.
    expect = {
        (8, 2): RED,  # texel (0.75, 3.75): columns 0-1, rows 3-4 -> red
        (8, 12): BLUE,  # (5.75, 3.75) -> blue
        (8, 7): (0.75, 0.0, 0.25),  # (3.25, ...): 3/4 column 3 (red) + 1/4 column 4 (blue)
        (0, 2): GREEN,  # row -0.25 clamps to row 0: the top rows (v near 1) are green
        (1, 2): GREEN,  # row 0.25: rows 0-1
        (3, 2): (0.25, 0.75, 0.0),  # row 1.25: 3/4 row 1 (green) + 1/4 row 2 (red)
        (15, 12): BLUE,  # the bottom row (v near 0) samples the image's last row
    }
    for (i, j), rgb in expect.items():
        torch.testing.assert_close(img[:3, i, j], torch.tensor(rgb), atol=1e-5, rtol=0,
                                   msg=f"pixel ({i}, {j})")
    torch.testing.assert_close(img[3:], torch.ones(3, RES, RES))  # the grey shading channel
    # coefficients add their basis images: basis 0 is constant
    img = render_square(square_model, torch.tensor([[0.5, 0.0]]))["image"][0]
    torch.testing.assert_close(img[:3, 8, 2], torch.tensor(RED) + 0.5 * torch.tensor(BASIS0), atol=1e-5, rtol=0)


def test_gradients_reach_the_coefficients_and_the_vertices(square_model):
    weights = torch.rand(1, 6, RES, RES, generator=torch.Generator().manual_seed(1))

    def loss(coeffs, verts=SQUARE):
        return (render_square(square_model, coeffs, verts)["image"] * weights).sum()

    coeffs = torch.tensor([[0.3, -0.4]], requires_grad=True)
    verts = SQUARE.clone().requires_grad_(True)
    value = loss(coeffs, verts)
    value.backward()
    h = 1e-2
    for k in range(2):
        step = torch.zeros(1, 2)
        step[0, k] = h
        with torch.no_grad():
            fd = (loss(coeffs + step) - loss(coeffs - step)) / (2 * h)
        torch.testing.assert_close(coeffs.grad[0, k], fd, rtol=1e-3, atol=1e-3)
    assert coeffs.grad.abs().min() > 0
    # the UVs move with the vertices: the texture's edges give the positions a gradient
    assert torch.isfinite(verts.grad).all() and verts.grad[..., :2].abs().sum() > 0


def test_uv_layout_must_match_the_triangles(tmp_path):
    space = square_texture_space(tmp_path)
    three = SimpleNamespace(n_verts=4, faces=SQUARE_FACES[:1])
    model, warning = alb.albedo_model_for(three, space, require_flame=False)
    assert isinstance(model, alb.VertexAlbedo)
    assert "FLAME_texture.npz not used" in warning and "2 triangles and the model 1" in warning


# ----------------------------------------------------------------------------- a FLAME-format model
@pytest.fixture(scope="module")
def synthetic_model():
    return FlameModel(synthetic_assets())


def sphere_uvs(model) -> tuple[np.ndarray, np.ndarray]:
    """One UV per vertex (a cylindrical projection); ft = the faces."""
    v = model.v_template.numpy()
    u = np.arctan2(v[:, 0], v[:, 2]) / (2 * np.pi) + 0.5
    w = (v[:, 1] - v[:, 1].min()) / np.ptp(v[:, 1])
    return np.stack([u, w], 1), model.faces.numpy()


def test_falls_back_to_per_vertex_with_a_warning(synthetic_model, standin_model, tmp_path):
    vt, ft = sphere_uvs(synthetic_model)
    path = write_flame_texture(tmp_path / "FLAME_texture.npz", np.full((8, 8, 3), 0.5), np.zeros((8, 8, 3, 1)),
                               vt, ft)
    space = alb.load_albedo_space(path)
    for model in (synthetic_model, standin_model):  # 1094 and 12,788 vertices: not FLAME's mesh
        chosen, warning = alb.albedo_model_for(model, space)
        assert isinstance(chosen, alb.VertexAlbedo) and chosen.n_verts == model.n_verts
        assert f"FLAME's 5023-vertex mesh and this model has {model.n_verts} vertices" in warning
        assert warning.startswith("albedo: texture space FLAME_texture.npz not used")
    assert alb.albedo_model_for(standin_model, None) == (alb.VertexAlbedo(standin_model.n_verts), None)
    # no UV layout (BFM's file has none): per-vertex, saying how to fix it
    mu = np.full(8 * 8 * 3, 0.5)
    np.savez(tmp_path / "FLAME_albedo_from_BFM.npz", MU=mu, PC=np.zeros((8 * 8 * 3, 2)))
    bfm = alb.load_albedo_space(tmp_path / "FLAME_albedo_from_BFM.npz")
    chosen, warning = alb.albedo_model_for(synthetic_model, bfm, require_flame=False)
    assert isinstance(chosen, alb.VertexAlbedo) and "no UV layout" in warning


def test_bfm_space_takes_the_uv_layout_from_head_template(synthetic_model, tmp_path):
    vt, ft = sphere_uvs(synthetic_model)
    f = synthetic_model.faces.numpy() + 1
    lines = [f"v {x} {y} {z}" for x, y, z in synthetic_model.v_template.numpy()]
    lines += [f"vt {a:.7f} {b:.7f}" for a, b in vt]
    lines += [f"f {a}/{x} {b}/{y} {c}/{z}" for (a, b, c), (x, y, z) in zip(f, ft + 1, strict=True)]
    (tmp_path / "head_template.obj").write_text("\n".join(lines) + "\n")
    np.savez(tmp_path / "FLAME_albedo_from_BFM.npz", MU=np.full(8 * 8 * 3, 0.5), PC=np.zeros((8 * 8 * 3, 3)))
    space = alb.load_albedo_space(tmp_path / "FLAME_albedo_from_BFM.npz")
    np.testing.assert_array_equal(space.ft, ft)
    np.testing.assert_allclose(space.vt, vt, atol=1e-6)
    chosen, warning = alb.albedo_model_for(synthetic_model, space, require_flame=False)
    assert warning is None and chosen.deca_tex and chosen.n_tex == 3


def random_params(model, batch=1, seed=0) -> FitParams:
    g = torch.Generator().manual_seed(seed)
    p = FitParams.initial(batch, model.n_shape, model.n_exp, model.n_verts)
    p.cam[:, 0] = 7.0  # the 0.24 m tall head fills most of the crop
    p.global_pose[:, 1] = 0.4
    p.jaw_pose[:, 0] = 0.1
    p.light = p.light + 0.2 * torch.rand(p.light.shape, generator=g)
    p.albedo = torch.rand(p.albedo.shape, generator=g)
    return p


def test_per_vertex_renders_are_unchanged(synthetic_model):
    m = synthetic_model
    params = random_params(m, batch=2)
    bg = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    plain = synthesize(m, params, 48, background=bg)
    with_model = synthesize(m, params, 48, background=bg, albedo_model=alb.VertexAlbedo(m.n_verts))
    # the synthesis as it was before texture spaces existed
    verts = m(params.shape, params.exp, params.global_pose, params.neck_pose, params.jaw_pose,
              params.eye_pose).vertices
    shade = sh_shading(vertex_normals(verts, m.faces), params.light)
    ref = render_mesh(ortho_project(verts, params.cam, 48), m.faces,
                      torch.cat([params.albedo * shade, shade], -1), 48, 48)
    ref_image = ref["image"][:, :3] + (1 - ref["alpha"]) * bg
    for out in (plain, with_model):
        assert torch.equal(out["image"], ref_image) and torch.equal(out["alpha"], ref["alpha"])
        assert torch.equal(out["shading"], ref["image"][:, 3:])
    assert (plain["alpha"] > 0).sum() > 100


def test_constant_texture_renders_like_constant_vertex_colours(synthetic_model, tmp_path):
    m = synthetic_model
    vt, ft = sphere_uvs(m)
    colour = (0.5, 0.6, 0.7)
    path = write_flame_texture(tmp_path / "FLAME_texture.npz", np.broadcast_to(colour, (8, 8, 3)).copy(),
                               np.random.default_rng(3).normal(0, 0.1, (8, 8, 3, 2)), vt, ft)
    tex, warning = alb.albedo_model_for(m, alb.load_albedo_space(path), require_flame=False)
    assert warning is None
    params = random_params(m)
    params.albedo = tex.initial_albedo(1)
    assert params.albedo.shape == (1, 2) and not params.albedo.any()
    textured = synthesize(m, params, 48, albedo_model=tex)
    flat = synthesize(m, FitParams(**{**dict(params.items()), "albedo": torch.tensor(colour).expand(1, m.n_verts, 3)}),
                      48)
    assert torch.equal(textured["alpha"], flat["alpha"]) and (flat["alpha"] > 0).sum() > 500
    torch.testing.assert_close(textured["image"], flat["image"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(textured["shading"], flat["shading"], atol=1e-6, rtol=1e-6)
    with pytest.raises(UsageError, match="texture-space coefficients"):
        synthesize(m, params, 48)


# ----------------------------------------------------------------------------- set-up and outputs
def install_texture(home: Path, model) -> Path:
    vt, ft = sphere_uvs(model)
    mean = np.zeros((8, 8, 3))
    mean[:, :4], mean[:, 4:] = (0.8, 0.5, 0.4), (0.6, 0.4, 0.3)
    (home / "albedo").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(4)
    return write_flame_texture(home / "albedo" / "FLAME_texture.npz", mean, rng.normal(0, 0.05, (8, 8, 3, 3)),
                               vt, ft)


def test_fit_setup_uses_the_installed_texture_space(synthetic_model, tmp_path, monkeypatch):
    from fitter.fit import Targets, initial_params, make_objective, make_setup
    from fitter.recipe import Stage, load_recipe

    m = synthetic_model
    install_texture(tmp_path, m)
    monkeypatch.setenv("FLAMEFIT_HOME", str(tmp_path))
    recipe = replace(load_recipe("fast"), resolution=64)
    # the synthetic head is not FLAME's mesh: per-vertex albedo, and the warning for fit.json
    setup = make_setup(m, recipe)
    assert isinstance(setup.albedo_model, alb.VertexAlbedo)
    assert any("FLAME_texture.npz not used" in w for w in setup.warnings)
    # with the topology check lifted the texture space is used
    monkeypatch.setattr(alb, "FLAME_N_VERTS", m.n_verts)
    setup = make_setup(m, recipe)
    assert isinstance(setup.albedo_model, alb.TextureAlbedo) and not setup.warnings
    truth = random_params(m)
    with torch.no_grad():
        pred = synthesize(m, truth, 64)
    targets = Targets(pred["image"], pred["landmarks2d"], torch.ones(1, 1, 64, 64), torch.ones(68))
    params = initial_params(setup, targets)
    assert params.albedo.shape == (1, 3) and not params.albedo.any()
    params.albedo.requires_grad_(True)
    total, terms = make_objective(setup, targets)(params, Stage("photo", 1, ["albedo"], {"photo": 1.0}),
                                                  torch.tensor([0]))
    total.sum().backward()
    assert params.albedo.grad.abs().sum() > 0


def test_outputs_write_textured_mesh(synthetic_model, tmp_path):
    from fitter.fit import FitResult, Target
    from fitter.outputs import write_fit_outputs

    m = synthetic_model
    space = alb.load_albedo_space(install_texture(tmp_path / "home", m))
    tex, _ = alb.albedo_model_for(m, space, require_flame=False)
    params = random_params(m)
    params.albedo = torch.tensor([[1.0, -0.5, 0.2]])
    with torch.no_grad():
        pred = synthesize(m, params, 64, albedo_model=tex)
    lmk = pred["landmarks2d"][0].numpy()
    target = Target(Path("face.png"), np.full((64, 64, 3), 90, np.uint8), 1.0, np.array([32.0, 32.0, 64.0]),
                    np.zeros((64, 64, 3), np.float32), lmk, lmk, np.ones((64, 64), np.float32))
    result = FitResult(target, params, pred["vertices"][0].numpy(), lmk, lmk, {"image": "face.png"}, m.tag,
                       "test", tex)
    out = write_fit_outputs(tmp_path / "out", result, m)
    assert sorted(p.name for p in out.iterdir()) == ["fit.json", "fit.npz", "mesh.mtl", "mesh.obj", "overlay.png",
                                                     "texture.png"]
    text = (out / "mesh.obj").read_text().splitlines()
    assert text[:2] == ["mtllib mesh.mtl", "usemtl material0"]
    assert sum(line.startswith("vt ") for line in text) == len(space.vt)
    first_face = next(line for line in text if line.startswith("f "))
    corners = zip(m.faces[0].tolist(), space.ft[0].tolist(), strict=True)
    assert first_face == "f " + " ".join(f"{v + 1}/{t + 1}" for v, t in corners)
    assert "map_Kd texture.png" in (out / "mesh.mtl").read_text()
    png = io.read_image(out / "texture.png")
    expect = (tex.texture(params.albedo)[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round()
    np.testing.assert_array_equal(png, expect.astype(np.uint8))  # row 0 = top = v 1, as vt expects
    with np.load(out / "fit.npz") as fit:
        assert fit["albedo"].shape == (3,) and str(fit["albedo_space"]).startswith("texture FLAME")
    overlay = io.read_image(out / "overlay.png")
    assert overlay.shape == (64, 192, 3)


def test_texture_coefficients_need_a_texture_space(synthetic_model):
    from fitter.outputs import render_rgba

    params = random_params(synthetic_model)
    params.albedo = torch.zeros(1, 3)
    with pytest.raises(UsageError, match="3 texture-space coefficients but no texture space is installed"):
        render_rgba(synthetic_model, params, 32)
    assert render_rgba(synthetic_model, params, 32, grey=True).shape == (32, 32, 4)  # grey needs no albedo
