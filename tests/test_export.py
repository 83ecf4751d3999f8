"""`cli.py export`: GLB structure read back with real glTF readers (pygltflib, trimesh), the
skinning round trip through our own small glTF skinning evaluator (bench.export.GltfSkinning,
which knows nothing of fitter/export.py), OBJ/PLY sequences, bad input. Tracks are synthetic
track.npz files per the contract's schema (bench.export.synthetic_track)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import trimesh
from click.testing import CliRunner

import cli
from bench.export import GltfSkinning as Gltf
from bench.export import flame_vertices, synthetic_track
from fitter import albedo as alb
from fitter import export as ex
from fitter import io
from fitter.params import FitParams, save_fit
from priors.errors import UsageError
from priors.flame import FlameModel, batch_rodrigues
from tests.synthetic import synthetic_assets

FPS = 25.0


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def synthetic_model():
    return FlameModel(synthetic_assets())


@pytest.fixture(params=["standin", "synthetic"])
def any_model(request, synthetic_model):
    if request.param == "standin":
        return request.getfixturevalue("standin_model")
    return synthetic_model


def write_track(path, model, **kw):
    np.savez(path, **synthetic_track(model, fps=FPS, **kw))
    return path


# ----------------------------------------------------------------------------- maths
def test_quaternions_match_rodrigues():
    q = ex.axis_angle_to_quat(np.array([[0, 0, np.pi / 2], [0, 0, 0]]))
    np.testing.assert_allclose(q, [[0, 0, np.sqrt(0.5), np.sqrt(0.5)], [0, 0, 0, 1]], atol=1e-12)
    aa = np.random.default_rng(1).normal(0, 1.0, (20, 3))
    expect = batch_rodrigues(torch.as_tensor(aa), eps=0.0).numpy()
    np.testing.assert_allclose(ex.quat_to_matrix(ex.axis_angle_to_quat(aa)), expect, atol=1e-10)
    flipped = ex.continuous_quats(np.array([[0, 0, 0, 1.0], [0, 0, 0.1, -0.99]]))
    assert flipped[1, 3] > 0 and flipped[1, 2] == -0.1


def test_top_four_weights_are_renormalised():
    w = np.array([[0.04, 0.4, 0.3, 0.2, 0.06], [0.0, 0.0, 1.0, 0.0, 0.0]])
    joints, top, dropped = ex.top_weights(w)
    assert joints[0].tolist() == [1, 2, 3, 4] and joints[1, 0] == 2
    np.testing.assert_allclose(top[0], np.array([0.4, 0.3, 0.2, 0.06]) / 0.96, rtol=1e-6)
    np.testing.assert_allclose(top[1], [1, 0, 0, 0])
    np.testing.assert_allclose(dropped, [0.04, 0.0], atol=1e-12)
    j2, t2, _ = ex.top_weights(np.array([[0.25, 0.75]]))  # fewer joints than influences: padded
    assert j2.tolist() == [[1, 0, 0, 0]] and t2.tolist() == [[0.75, 0.25, 0, 0]]
    assert (joints[1, 1:] == 0).all()  # slots with weight 0 point at joint 0


def test_models_lose_nothing_to_four_influences(any_model):
    w = any_model.weights.numpy()
    assert (np.count_nonzero(w, axis=1) <= 3).all()
    assert ex.top_weights(w)[2].max() == 0.0


def test_uv_seams_split_vertices():
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    ft = np.array([[0, 1, 2], [4, 2, 3]])  # vertex 0 has UV 0 in one triangle, UV 4 in the other
    vt = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0.5, 0.5]])
    src, uv, new = ex.split_uv_seams(faces, ft, vt)
    assert len(src) == 5 and sorted(src.tolist()) == [0, 0, 1, 2, 3]
    np.testing.assert_array_equal(src[new], faces)
    np.testing.assert_array_equal(uv[new], vt[ft])


def test_srgb_to_linear_known_values():
    np.testing.assert_allclose(ex.srgb_to_linear(np.array([0.0, 0.04045, 0.5, 1.0])),
                               [0.0, 0.04045 / 12.92, 0.21404, 1.0], atol=1e-5)


# ----------------------------------------------------------------------------- GLB
@pytest.mark.parametrize("correctives", ["bake", "drop"])
def test_glb_skin_and_morphs_reproduce_flame(any_model, correctives, tmp_path):
    m = any_model
    src = write_track(tmp_path / "track.npz", m, n_frames=5)
    report = ex.export_file(src, "glb", tmp_path / "head.glb", model=m, correctives=correctives)
    track = dict(np.load(src))
    frames = [0, 2, 4]
    gl = Gltf(tmp_path / "head.glb")
    no_corr = flame_vertices(m, track, frames, correctives=False)
    with_corr = flame_vertices(m, track, frames, correctives=True)
    assert np.linalg.norm(no_corr - with_corr[:, :1].mean(), axis=-1).max() > 0.05  # the head really moves
    expect = with_corr if correctives == "bake" else no_corr
    for k, f in enumerate(frames):
        err_mm = np.linalg.norm(gl.skinned_positions(f) - expect[k], axis=1) * 1000
        assert err_mm.max() < 0.1, (f, err_mm.max())
    gap = np.linalg.norm(with_corr - no_corr, axis=-1) * 1000
    assert report.corrective_max_mm >= gap.max() - 1e-3  # the report covers every exported frame
    if not m.posedirs.abs().max() > 0:  # the stand-in ships no correctives: nothing to bake, nothing lost
        assert report.correctives == "none in the model" and report.corrective_max_mm == 0.0
        assert report.morph_targets == m.n_exp
    else:
        assert gap.max() > 0.1  # the correctives matter at this tolerance: baking them is tested
        assert report.correctives == {"bake": "baked", "drop": "dropped"}[correctives]
        assert report.morph_targets == m.n_exp + (36 if correctives == "bake" else 0)


def test_baked_correctives_are_driven_by_the_pose_feature(synthetic_model, tmp_path):
    m = synthetic_model
    src = write_track(tmp_path / "track.npz", m, n_frames=3)
    ex.export_file(src, "glb", tmp_path / "head.glb", model=m)
    track = dict(np.load(src))
    gl = Gltf(tmp_path / "head.glb")
    prim = gl.g.meshes[0].primitives[0]
    names = gl.g.meshes[0].extras["targetNames"]
    assert names[m.n_exp:] == [f"pose_{p:03d}" for p in range(36)]
    np.testing.assert_allclose(gl.data(prim.targets[m.n_exp + 4]["POSITION"]), m.posedirs[4].view(-1, 3).numpy(),
                               atol=1e-9)
    pose = np.concatenate([track[k] for k in ("global_pose", "neck_pose", "jaw_pose", "eye_pose")], 1)
    R = batch_rodrigues(torch.as_tensor(pose.reshape(-1, 3), dtype=torch.float64), eps=1e-20).numpy()
    R = R.reshape(3, 5, 3, 3)
    feature = (R[:, 1:] - np.eye(3)).reshape(3, -1)
    for f in range(3):
        np.testing.assert_allclose(gl.morph_weights(1, f)[m.n_exp:], feature[f], atol=1e-6)


def test_export_leaves_autograd_on(synthetic_model, tmp_path):
    """Exporting (frames evaluated chunk by chunk under no_grad) must not switch gradients off for
    whatever runs next in the process, e.g. a fit."""
    src = write_track(tmp_path / "track.npz", synthetic_model, n_frames=20)
    for fmt in ("glb", "obj"):
        ex.export_file(src, fmt, tmp_path / f"out_{fmt}", model=synthetic_model)
        assert torch.is_grad_enabled()


def test_split_targets_by_hand():
    d = np.ones((2, 3))
    names, deltas, w, scales = ex.split_targets(["a"], [d], np.array([[0.5], [-3.0], [2.0]]))
    assert names == ["a+", "a-"]
    np.testing.assert_allclose(scales, [2.0, 3.0])  # largest positive weight 2, largest negative 3
    np.testing.assert_allclose(w, [[0.25, 0], [0, 1], [1, 0]])
    np.testing.assert_allclose(deltas[0], 2 * d)
    np.testing.assert_allclose(deltas[1], -3 * d)
    _, _, w1, s1 = ex.split_targets(["b"], [d], np.array([[0.5], [-0.2]]))  # within [0, 1]: unscaled
    np.testing.assert_allclose(s1, [1, 1])
    np.testing.assert_allclose(w1, [[0.5, 0], [0, 0.2]])


def test_split_morphs_keep_weights_in_unit_range_and_the_result(synthetic_model, tmp_path):
    m = synthetic_model
    src = write_track(tmp_path / "track.npz", m, n_frames=3)
    ex.export_file(src, "glb", tmp_path / "signed.glb", model=m)
    ex.export_file(src, "glb", tmp_path / "split.glb", model=m, morph="split")
    signed, split = Gltf(tmp_path / "signed.glb"), Gltf(tmp_path / "split.glb")
    names = split.g.meshes[0].extras["targetNames"]
    assert len(names) == 2 * (m.n_exp + 36) and names[:2] == ["exp_000+", "exp_000-"] and names[-1] == "pose_035-"
    assert max(np.abs(signed.morph_weights(1, f)).max() for f in range(3)) > 1  # scaling is needed
    for f in range(3):
        w = split.morph_weights(1, f)
        assert w.min() >= 0 and w.max() <= 1 + 1e-6
        np.testing.assert_allclose(split.skinned_positions(f), signed.skinned_positions(f), atol=1e-6)


def test_glb_structure_with_real_readers(standin_model, tmp_path):
    m = standin_model
    src = write_track(tmp_path / "track.npz", m, n_frames=6)
    ex.export_file(src, "glb", tmp_path / "head.glb", model=m)
    track = dict(np.load(src))
    gl = Gltf(tmp_path / "head.glb")
    g = gl.g
    assert g.asset.version == "2.0"
    prim = g.meshes[0].primitives[0]
    assert g.accessors[prim.attributes.POSITION].count == m.n_verts
    assert len(prim.targets) == m.n_exp == len(g.meshes[0].extras["targetNames"])
    assert g.meshes[0].extras["targetNames"][0] == "exp_000"
    np.testing.assert_array_equal(gl.faces(), m.faces.numpy())
    # skin: FLAME's joints, hierarchy from parents, inverse bind = translation by minus the shaped rest joint
    skin = g.skins[0]
    names = [g.nodes[j].name for j in skin.joints]
    assert names == ["root", "neck", "jaw", "left_eye", "right_eye"]
    parent = {c: i for i, n in enumerate(g.nodes) for c in (n.children or [])}
    assert [skin.joints.index(parent[j]) if parent[j] in skin.joints else -1 for j in skin.joints] == \
        m.parents.tolist()
    v_shaped = m.v_template.double().numpy() + np.einsum("k,vck->vc", track["shape"].astype(float),
                                                          m.dirs[:, :, :m.n_shape].double().numpy())
    rest_joints = m.J_regressor.double().numpy() @ v_shaped
    ibm = gl.data(skin.inverseBindMatrices).reshape(-1, 4, 4).transpose(0, 2, 1)
    np.testing.assert_allclose(ibm[:, :3, 3], -rest_joints, atol=1e-6)
    np.testing.assert_allclose(ibm[:, :3, :3], np.tile(np.eye(3), (5, 1, 1)))
    np.testing.assert_allclose(gl.data(prim.attributes.POSITION), v_shaped, atol=1e-6)
    np.testing.assert_allclose(gl.data(prim.targets[3]["POSITION"]), m.dirs[:, :, m.n_shape + 3].numpy(), atol=1e-7)
    np.testing.assert_allclose(gl.data(prim.attributes.WEIGHTS_0).sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(gl.data(prim.attributes.COLOR_0), ex.srgb_to_linear(track["albedo"]), atol=1e-6)
    # animation: one keyframe per frame at the fps; weights = expression coefficients; rotations = poses
    anim = g.animations[0]
    assert len(anim.channels) == 2 * 5 + 1
    times = gl.data(anim.samplers[0].input)
    np.testing.assert_allclose(times, np.arange(6) / FPS, atol=1e-6)
    weights = next(gl.data(anim.samplers[c.sampler].output) for c in anim.channels if c.target.path == "weights")
    np.testing.assert_allclose(weights.reshape(6, -1), track["exp"], atol=1e-6)
    jaw_rot = next(gl.data(anim.samplers[c.sampler].output) for c in anim.channels
                   if c.target.path == "rotation" and g.nodes[c.target.node].name == "jaw")
    angle = 2 * np.arccos(np.clip(np.abs(jaw_rot[:, 3]), 0, 1))
    np.testing.assert_allclose(angle, np.linalg.norm(track["jaw_pose"], axis=1), atol=1e-5)
    # trimesh, an independent loader, opens it: the rest mesh, same vertices and triangles
    scene = trimesh.load(tmp_path / "head.glb", force="scene", process=False)
    mesh = next(iter(scene.geometry.values()))
    assert mesh.vertices.shape == (m.n_verts, 3) and mesh.faces.shape == tuple(m.faces.shape)
    np.testing.assert_allclose(mesh.vertices, v_shaped, atol=1e-5)
    np.testing.assert_array_equal(mesh.faces, m.faces.numpy())


def write_fit(path, model, albedo=None, seed=3) -> dict:
    track = synthetic_track(model, n_frames=1, seed=seed)
    params = FitParams(**{n: torch.as_tensor(track[n][0] if n not in ("shape", "albedo") else track[n])[None]
                          for n in ("shape", "exp", "global_pose", "neck_pose", "jaw_pose", "eye_pose", "albedo")},
                       cam=torch.tensor([[1.0, 0, 0]]), light=torch.zeros(1, 9, 3))
    if albedo is not None:
        params.albedo = torch.as_tensor(albedo, dtype=torch.float32)[None]
    verts = flame_vertices(model, track, [0], correctives=True)[0]
    save_fit(path, params, {"vertices": verts.astype(np.float32), "model": model.tag, "recipe": "test"})
    return {**track, "vertices": verts}


def test_fit_exports_one_keyframe_and_single_meshes(synthetic_model, tmp_path):
    m = synthetic_model
    fit = write_fit(tmp_path / "fit.npz", m)
    r = ex.export_file(tmp_path / "fit.npz", "glb", tmp_path / "fit.glb", model=m)
    assert r.frames == 1
    gl = Gltf(tmp_path / "fit.glb")
    assert gl.g.accessors[gl.g.animations[0].samplers[0].input].count == 1
    no_corr = flame_vertices(m, fit, [0], correctives=False)[0]
    assert np.linalg.norm(gl.skinned_positions(0) - no_corr, axis=1).max() < 1e-4
    # OBJ / PLY of a single fit: one file each, the full FLAME evaluation (correctives included)
    ex.export_file(tmp_path / "fit.npz", "obj", tmp_path / "fit.obj", model=m)
    verts, faces = io.read_obj(tmp_path / "fit.obj")
    np.testing.assert_allclose(verts, fit["vertices"], atol=2e-6)
    np.testing.assert_array_equal(faces, m.faces.numpy())
    ex.export_file(tmp_path / "fit.npz", "ply", tmp_path / "fit.ply", model=m)
    ply = trimesh.load(tmp_path / "fit.ply", process=False)
    np.testing.assert_allclose(ply.vertices, fit["vertices"], atol=1e-6)
    np.testing.assert_array_equal(ply.faces, m.faces.numpy())
    np.testing.assert_array_equal(ply.visual.vertex_colors[:, :3], (fit["albedo"] * 255).round().astype(np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.glb", "fit.npz", "fit.obj", "fit.ply"]


def test_track_exports_mesh_sequences(synthetic_model, tmp_path):
    m = synthetic_model
    src = write_track(tmp_path / "track.npz", m, n_frames=3)
    track = dict(np.load(src))
    full = flame_vertices(m, track, [0, 1, 2], correctives=True)
    for fmt in ("obj", "ply"):
        ex.export_file(src, fmt, tmp_path / fmt, model=m)
        names = sorted(p.name for p in (tmp_path / fmt).iterdir())
        assert names == [f"frame_{i:04d}.{fmt}" for i in range(3)]
        for i, name in enumerate(names):
            verts = io.read_obj(tmp_path / fmt / name)[0] if fmt == "obj" else \
                trimesh.load(tmp_path / fmt / name, process=False).vertices
            np.testing.assert_allclose(verts, full[i], atol=2e-6)


def write_texture(path, model, vt, ft):
    """FLAME_texture.npz (0-255 BGR as FLAME ships it) for `model`: 8 x 8, 2 components."""
    rng = np.random.default_rng(5)
    mean = rng.uniform(0.2, 0.8, (8, 8, 3))
    basis = rng.normal(0, 0.05, (8, 8, 3, 2))
    np.savez(path, mean=mean[:, :, ::-1] * 255.0, tex_dir=basis[:, :, ::-1, :] * 255.0, vt=vt, ft=ft)
    return path


def test_textured_fit_exports_uvs_and_texture(synthetic_model, tmp_path):
    m = synthetic_model
    F = m.faces.shape[0]
    rng = np.random.default_rng(2)
    vt, ft = rng.uniform(0, 1, (3 * F, 2)), np.arange(3 * F).reshape(F, 3)  # a UV per triangle corner: all seams
    space = alb.load_albedo_space(write_texture(tmp_path / "FLAME_texture.npz", m, vt, ft))
    tex, warning = alb.albedo_model_for(m, space, require_flame=False)
    assert warning is None
    fit = write_fit(tmp_path / "fit.npz", m, albedo=[0.5, -1.0])
    clip = ex.load_clip(tmp_path / "fit.npz")
    ex.export_clip(clip, m, "glb", tmp_path / "tex.glb", texture=tex)
    gl = Gltf(tmp_path / "tex.glb")
    prim = gl.g.meshes[0].primitives[0]
    faces = gl.faces()
    uv = gl.data(prim.attributes.TEXCOORD_0)
    np.testing.assert_allclose(uv[faces], np.stack([vt[ft][..., 0], 1 - vt[ft][..., 1]], -1), atol=1e-6)
    assert prim.attributes.COLOR_0 is None
    # every split vertex still skins like its model vertex
    posed = gl.skinned_positions(0)
    no_corr = flame_vertices(m, fit, [0], correctives=False)[0]
    np.testing.assert_allclose(posed[faces], no_corr[m.faces.numpy()], atol=1e-4)
    # the embedded PNG is the fit's texture
    import cv2

    image = gl.g.images[0]
    view = gl.g.bufferViews[image.bufferView]
    png = cv2.imdecode(np.frombuffer(gl.blob[view.byteOffset:view.byteOffset + view.byteLength], np.uint8), 1)
    np.testing.assert_array_equal(png[:, :, ::-1], tex.texture_image(torch.tensor([[0.5, -1.0]])))
    assert gl.g.materials[0].pbrMetallicRoughness.baseColorTexture.index == 0
    scene = trimesh.load(tmp_path / "tex.glb", force="scene", process=False)
    assert next(iter(scene.geometry.values())).visual.uv.shape == (len(uv), 2)
    # OBJ of a textured fit: the mesh, its .mtl and the texture beside it, moved into place together
    (tmp_path / "obj").mkdir()
    ex.export_clip(clip, m, "obj", tmp_path / "obj" / "head.obj", texture=tex)
    assert sorted(p.name for p in (tmp_path / "obj").iterdir()) == ["head.mtl", "head.obj", "texture.png"]
    text = (tmp_path / "obj" / "head.obj").read_text()
    assert text.startswith("mtllib head.mtl") and text.count("\nvt ") == len(vt)
    np.testing.assert_array_equal(io.read_image(tmp_path / "obj" / "texture.png"),
                                  tex.texture_image(torch.tensor([[0.5, -1.0]])))
    # PLY has no UVs: each vertex gets the texel under its (first) UV
    ex.export_clip(clip, m, "ply", tmp_path / "head.ply", texture=tex)
    ply = trimesh.load(tmp_path / "head.ply", process=False)
    img = tex.texture_image(torch.tensor([[0.5, -1.0]]))
    v0 = int(m.faces[0, 0])
    u, v = vt[ft[0, 0]]
    np.testing.assert_array_equal(ply.visual.vertex_colors[v0, :3], img[int((1 - v) * 8), int(u * 8)])


# ----------------------------------------------------------------------------- bad input and the CLI
def test_bad_inputs_are_one_line_usage_errors(standin_model, synthetic_model, tmp_path):
    np.savez(tmp_path / "other.npz", foo=np.zeros(3))
    with pytest.raises(UsageError, match=r"other.npz: neither a fit.npz nor a track.npz .*fix: pass a fit.npz"):
        ex.load_clip(tmp_path / "other.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(UsageError, match=r"text.npz: not a readable .npz"):
        ex.load_clip(tmp_path / "text.npz")
    bad = synthetic_track(synthetic_model)
    bad["jaw_pose"] = bad["jaw_pose"][:2]
    np.savez(tmp_path / "short.npz", **bad)
    with pytest.raises(UsageError, match=r"short.npz: key 'jaw_pose' has shape \(2, 3\), expected \(4, 3\)"):
        ex.load_clip(tmp_path / "short.npz")
    bad = synthetic_track(synthetic_model)
    bad["fps"] = np.array("fast")
    np.savez(tmp_path / "short.npz", **bad)
    with pytest.raises(UsageError, match=r"short.npz: key 'fps' is not numeric"):
        ex.load_clip(tmp_path / "short.npz")
    src = write_track(tmp_path / "track.npz", synthetic_model)
    out = tmp_path / "head.glb"
    out.write_bytes(b"old")
    with pytest.raises(UsageError, match=r"track.npz: made for a model with 1094 vertices, the model in use has "
                                         r"12788; fix: pass the model it was made with \(--model PATH\)"):
        ex.export_file(src, "glb", out, model=standin_model)
    assert out.read_bytes() == b"old"
    write_fit(tmp_path / "fit.npz", synthetic_model, albedo=[0.5, -1.0])  # texture coefficients, none installed
    with pytest.raises(UsageError, match="2 texture-space coefficients but .*fix: install the texture space"):
        ex.export_file(tmp_path / "fit.npz", "glb", out, model=synthetic_model)
    with pytest.raises(UsageError, match=r"is a folder; fix: give a file name"):
        ex.export_file(src, "glb", tmp_path, model=synthetic_model)
    (tmp_path / "fit.npz").unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.glb", "other.npz", "short.npz", "text.npz",
                                                          "track.npz"]


def test_a_failed_sequence_leaves_no_folder(synthetic_model, tmp_path, monkeypatch):
    src = write_track(tmp_path / "track.npz", synthetic_model, n_frames=3)
    real, calls = ex.write_ply, []

    def failing(path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path, *a, **kw)

    monkeypatch.setattr(ex, "write_ply", failing)
    with pytest.raises(OSError):
        ex.export_file(src, "ply", tmp_path / "seq", model=synthetic_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["track.npz"]


def test_cli_export(synthetic_model_dir, tmp_path):
    from fitter.fit import load_flame

    m = load_flame(synthetic_model_dir)
    src = write_track(tmp_path / "track.npz", m, n_frames=2)
    r = CliRunner().invoke(cli.main, ["export", str(src), "--format", "glb", "--out", str(tmp_path / "a.glb"),
                                      "--model", str(synthetic_model_dir)])
    assert r.exit_code == 0, r.output
    # the CLI default --morph split: a +/- pair of targets per coefficient
    assert "2 frame(s) at 25 fps" in r.output and "84 morph targets; pose correctives baked" in r.output
    header = (tmp_path / "a.glb").read_bytes()[:20]
    assert header[:4] == b"glTF" and json.loads((tmp_path / "a.glb").read_bytes()[20:20 + int.from_bytes(
        header[12:16], "little")])["asset"]["version"] == "2.0"
    np.savez(tmp_path / "junk.npz", foo=np.zeros(2))
    r = CliRunner().invoke(cli.main, ["export", str(tmp_path / "junk.npz"), "--out", str(tmp_path / "b.glb"),
                                      "--model", str(synthetic_model_dir)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "b.glb").exists()


@pytest.mark.skipif(not os.environ.get("FLAMEFIT_BPY_PYTHON"),
                    reason="set FLAMEFIT_BPY_PYTHON to a Python with bpy (Blender as a module) to run")
def test_blender_importer_plays_split_morphs_exactly():
    """Blender's own glTF importer (an optional, external check): with --morph split its armature +
    shape-key animation reproduces FLAME's vertices; signed weights are clamped by Blender."""
    from bench.export import blender_check

    rows = {(r["model"], r["morph"]): r for r in blender_check(os.environ["FLAMEFIT_BPY_PYTHON"], n_frames=6)}
    for model in ("stand-in", "synthetic"):
        assert rows[(model, "split")]["max_mm"] < 0.1
        assert rows[(model, "split")]["keyframes"] == 6
