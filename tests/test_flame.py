"""FLAME layer against independent references (numpy/scipy maths, the stand-in's own arrays)."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from priors.assets import load_model
from priors.flame import FlameModel, batch_rodrigues, dynamic_contour_rows, lbs, pose_transforms


@pytest.fixture(scope="module")
def standin(standin_path):
    return FlameModel(load_model(standin_path))


def zeros(model, B=1):
    z = lambda n: torch.zeros(B, n)
    return dict(shape=z(model.n_shape), exp=z(model.n_exp), global_pose=z(3), neck_pose=z(3), jaw_pose=z(3),
                eye_pose=z(6))


def test_rodrigues_matches_scipy():
    rv = torch.randn(20, 3, dtype=torch.float64)
    expected = Rotation.from_rotvec(rv.numpy()).as_matrix()
    np.testing.assert_allclose(batch_rodrigues(rv).numpy(), expected, atol=1e-7)
    np.testing.assert_allclose(batch_rodrigues(torch.zeros(1, 3)).numpy()[0], np.eye(3), atol=1e-6)


def test_zero_params_reproduce_template(standin):
    out = standin(**zeros(standin, B=2))
    assert out.vertices.shape == (2, 12788, 3)
    torch.testing.assert_close(out.vertices[1], standin.v_template, atol=1e-6, rtol=0)


def test_global_rotation_is_rigid_about_root(standin):
    p = zeros(standin)
    rv = torch.tensor([[0.1, 0.4, -0.2]])
    p["global_pose"] = rv
    out = standin(**p)
    R = Rotation.from_rotvec(rv[0].numpy()).as_matrix()
    j0 = (standin.J_regressor @ standin.v_template)[0].numpy()
    expected = (standin.v_template.numpy() - j0) @ R.T + j0
    np.testing.assert_allclose(out.vertices[0].numpy(), expected, atol=1e-5)


def test_jaw_moves_only_jaw_weighted_vertices(standin):
    p = zeros(standin)
    p["jaw_pose"] = torch.tensor([[0.3, 0.0, 0.0]])
    moved = (standin(**p).vertices[0] - standin.v_template).norm(dim=1)
    jaw_w = standin.weights[:, 2]
    assert moved[jaw_w == 0].max() < 1e-7
    assert moved[jaw_w > 0.9].min() > 5e-3  # the chin swings by centimetres
    # the chin landmark (8) drops (y decreases) when the jaw opens
    base = standin(**zeros(standin)).landmarks3d[0, 8]
    assert standin(**p).landmarks3d[0, 8, 1] < base[1] - 0.01


def test_blendshapes_are_linear(standin):
    p = zeros(standin)
    p["shape"][0, 3] = 2.0
    p["exp"][0, 5] = -1.5
    out = standin(**p).vertices[0]
    expected = standin.v_template + 2.0 * standin.dirs[:, :, 3] - 1.5 * standin.dirs[:, :, standin.n_shape + 5]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_landmarks_are_barycentric_points(standin_path):
    assets = load_model(standin_path)
    model = FlameModel(assets)
    p = zeros(model)
    p["exp"] = torch.randn(1, model.n_exp)
    out = model(**p)
    v = out.vertices[0].numpy()
    lm = assets.landmarks
    tri = assets.faces[lm.static_faces]
    static = (v[tri] * lm.static_bary[:, :, None]).sum(1)
    np.testing.assert_allclose(out.landmarks3d[0, 17:].numpy(), static, atol=1e-6)
    tri = assets.faces[lm.dynamic_faces[0]]  # frontal row at zero yaw
    contour = (v[tri] * lm.dynamic_bary[0][:, :, None]).sum(1)
    np.testing.assert_allclose(out.landmarks3d[0, :17].numpy(), contour, atol=1e-6)


@pytest.mark.parametrize("yaw,row", [(0.0, 0), (10.2, 10), (39.0, 39), (55.0, 39), (-1.0, 40), (-20.0, 59),
                                     (-39.0, 78), (-70.0, 78)])
def test_dynamic_rows(yaw, row):
    assert int(dynamic_contour_rows(torch.tensor([yaw]))[0]) == row


def test_yaw_picks_contour_row(standin_path):
    assets = load_model(standin_path)
    model = FlameModel(assets)
    p = zeros(model)
    p["global_pose"] = torch.tensor([[0.0, np.deg2rad(12.0), 0.0]], dtype=torch.float32)
    # total yaw 12 - 20 = -8 degrees -> row 47
    p["neck_pose"] = torch.tensor([[0.0, np.deg2rad(-20.0), 0.0]], dtype=torch.float32)
    out = model(**p)
    v = out.vertices[0].numpy()
    lm = assets.landmarks
    tri = assets.faces[lm.dynamic_faces[47]]
    expected = (v[tri] * lm.dynamic_bary[47][:, :, None]).sum(1)
    np.testing.assert_allclose(out.landmarks3d[0, :17].numpy(), expected, atol=1e-6)


def test_lbs_gradient_matches_finite_differences():
    torch.manual_seed(0)
    V, J, K = 12, 3, 4
    v_template = torch.randn(V, 3, dtype=torch.float64)
    dirs = torch.randn(V, 3, K, dtype=torch.float64) * 0.1
    posedirs = torch.randn(9 * (J - 1), V * 3, dtype=torch.float64) * 0.01
    J_reg = torch.softmax(torch.randn(J, V, dtype=torch.float64), dim=1)
    weights = torch.softmax(torch.randn(V, J, dtype=torch.float64), dim=1)
    parents = torch.tensor([-1, 0, 1])
    coeffs = torch.randn(1, K, dtype=torch.float64, requires_grad=True)
    pose = (0.3 * torch.randn(1, J * 3, dtype=torch.float64)).requires_grad_(True)
    fn = lambda c, p: lbs(c, p, v_template, dirs, posedirs, J_reg, parents, weights)[0]
    assert torch.autograd.gradcheck(fn, (coeffs, pose), eps=1e-6, atol=1e-5)


def test_lean_evaluation_matches_full(standin):
    torch.manual_seed(1)
    p = zeros(standin, B=2)
    p["shape"] = torch.randn(2, standin.n_shape)
    p["exp"] = torch.randn(2, standin.n_exp)
    p["global_pose"] = torch.tensor([[0.1, 0.5, 0.0], [0.0, -0.3, 0.1]])
    p["jaw_pose"] = torch.tensor([[0.2, 0.0, 0.0], [0.1, 0.0, 0.0]])
    full, lean = standin(**p), standin(**p, lean=True)
    assert lean.vertices.shape[1] == 0  # no vertex is skinned for landmark-only stages
    torch.testing.assert_close(lean.landmarks3d, full.landmarks3d, atol=1e-6, rtol=0)
    torch.testing.assert_close(lean.landmarks3d_full, full.landmarks3d_full, atol=1e-6, rtol=0)
    torch.testing.assert_close(lean.joints, full.joints, atol=1e-6, rtol=0)


def _strongly_posed(model, seed: int) -> dict:
    """Two random heads with global, neck and jaw rotations (where corners' skinning weights differ,
    surface points skinned on their own depart from the posed corners)."""
    torch.manual_seed(seed)
    p = zeros(model, B=2)
    p["shape"], p["exp"] = torch.randn(2, model.n_shape), torch.randn(2, model.n_exp)
    p["global_pose"] = torch.tensor([[0.1, 0.5, 0.0], [0.0, -0.3, 0.1]])
    p["neck_pose"] = torch.tensor([[0.3, 0.1, 0.0], [-0.2, 0.0, 0.2]])
    p["jaw_pose"] = torch.tensor([[0.3, 0.0, 0.0], [0.1, 0.0, 0.0]])
    return p


def _posed_bary(out_vertices, faces, f, b):
    return (out_vertices[:, faces[f]] * b[None, :, :, None]).sum(2)


def test_dense_points_are_skinned_surface_points(synthetic_model_dir):
    """attach_dense skins each point on its own (interpolated template, blendshapes, correctives and
    weights): equal to interpolating the posed corners where they share skinning weights, within
    a small second-order difference elsewhere; the lean and full evaluations agree, and the lean one
    skins no vertex."""
    model = FlameModel(load_model(synthetic_model_dir))
    assert model.has_correctives  # the synthetic model has pose correctives: they are interpolated too
    rng = np.random.default_rng(3)
    f = rng.integers(0, model.faces.shape[0], 300)
    b = torch.as_tensor(rng.dirichlet(np.ones(3), 300), dtype=torch.float32)
    model.attach_dense(f, b.numpy())
    p = _strongly_posed(model, seed=2)
    full, lean = model(**p), model(**p, lean=True)
    torch.testing.assert_close(lean.dense, full.dense, atol=1e-6, rtol=0)
    assert lean.vertices.shape[1] == 0
    exact = _posed_bary(full.vertices, model.faces, torch.as_tensor(f), b)
    w = model.weights[model.faces[torch.as_tensor(f)]]  # 300 x 3 x J
    same = (w - w[:, :1]).abs().amax(dim=(1, 2)) < 1e-6
    assert same.sum() > 50 and (~same).sum() > 20
    torch.testing.assert_close(full.dense[:, same], exact[:, same], atol=2e-6, rtol=0)
    size = (model.v_template[model.faces[torch.as_tensor(f)]] - model.v_template[model.faces[torch.as_tensor(f)]]
            .mean(1, keepdim=True)).norm(dim=-1).amax(1)  # each triangle's radius
    gap = (full.dense - exact).norm(dim=-1)
    assert (gap[:, ~same] <= 0.5 * size[~same]).all()  # second order: well inside the triangle's own size
    assert gap.max() > 0  # (the blended weights do differ from the posed corners' somewhere)


def test_landmarks_and_joints_match_the_posed_mesh(synthetic_model_dir):
    """The 68 landmarks are skinned as surface points (like the dense ones): where a landmark
    triangle's corners share their skinning weights they equal the posed corners interpolated,
    elsewhere they differ at second order only; the joints (joint blendshapes) equal lbs's."""
    model = FlameModel(load_model(synthetic_model_dir))
    p = _strongly_posed(model, seed=4)
    out = model(**p)
    exact = _posed_bary(out.vertices, model.faces, model.full_faces, model.full_bary)
    w = model.weights[model.faces[model.full_faces]]  # 68 x 3 x J
    same = (w - w[:, :1]).abs().amax(dim=(1, 2)) < 1e-6
    torch.testing.assert_close(out.landmarks3d_full[:, same], exact[:, same], atol=2e-6, rtol=0)
    tri = model.v_template[model.faces[model.full_faces]]
    size = (tri - tri.mean(1, keepdim=True)).norm(dim=-1).amax(1)
    assert ((out.landmarks3d_full - exact).norm(dim=-1)[:, ~same] <= 0.5 * size[~same]).all()
    pose = model.full_pose(p["global_pose"], p["neck_pose"], p["jaw_pose"], p["eye_pose"])
    verts, joints = lbs(torch.cat([p["shape"], p["exp"]], 1), pose, model.v_template, model.dirs, model.posedirs,
                        model.J_regressor, model.parents, model.weights)
    torch.testing.assert_close(out.joints, joints, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.vertices, verts, atol=1e-6, rtol=0)


def test_placed_static_landmarks_are_evaluated_where_placed(synthetic_model_dir):
    """place_static_landmarks moves the 51 inner landmarks (17..67) in both the dynamic-contour and the
    fixed-contour sets, to the given surface points (checked at the rest pose, where a skinned surface
    point is exactly its corners interpolated); the contour points stay; the lean evaluation agrees."""
    model = FlameModel(load_model(synthetic_model_dir))
    rng = np.random.default_rng(5)
    f = rng.integers(0, model.faces.shape[0], 51)
    b = rng.dirichlet(np.ones(3), 51).astype(np.float32)
    p = zeros(model, B=2)
    p["shape"], p["exp"] = torch.randn(2, model.n_shape), torch.randn(2, model.n_exp)
    before = model(**p)
    model.place_static_landmarks(f, b)
    out = model(**p)
    want = _posed_bary(out.vertices, model.faces, torch.as_tensor(f), torch.as_tensor(b))
    torch.testing.assert_close(out.landmarks3d_full[:, 17:], want, atol=2e-6, rtol=0)
    torch.testing.assert_close(out.landmarks3d[:, 17:], want, atol=2e-6, rtol=0)
    torch.testing.assert_close(out.landmarks3d[:, :17], before.landmarks3d[:, :17])
    torch.testing.assert_close(out.landmarks3d_full[:, :17], before.landmarks3d_full[:, :17])
    assert (out.landmarks3d[:, 17:] - before.landmarks3d[:, 17:]).norm(dim=-1).min() > 0  # they did move
    torch.testing.assert_close(model(**p, lean=True).landmarks3d, out.landmarks3d, atol=2e-6, rtol=0)


def test_lean_coeff_jacobian_is_the_points_derivative(synthetic_model_dir):
    """lean_coeff_jacobian (closed form: blendshapes through the blended rotations, joint blendshapes
    through the chain) against finite differences of the lean evaluation in float64, on a model with
    pose correctives and dense points, with heads turned far enough to pick different contour rows."""
    model = FlameModel(load_model(synthetic_model_dir))
    rng = np.random.default_rng(5)
    model.attach_dense(rng.integers(0, model.faces.shape[0], 40), rng.dirichlet(np.ones(3), 40))
    model.double()
    p = {k: v.double() for k, v in _strongly_posed(model, seed=6).items()}
    p["global_pose"][1, 1] = -0.6  # the two heads use different rows of the dynamic contour
    pose = model.full_pose(p["global_pose"], p["neck_pose"], p["jaw_pose"], p["eye_pose"])
    A = pose_transforms(pose, model.joint_template[None].expand(2, -1, -1), model.parents)[1]
    assert len(set(model._contour_rows(A).tolist())) == 2

    def points(coeffs):
        out = model(coeffs[:, :model.n_shape], coeffs[:, model.n_shape:], p["global_pose"], p["neck_pose"],
                    p["jaw_pose"], p["eye_pose"], lean=True)
        return torch.cat([out.landmarks3d, out.landmarks3d_full, out.dense], dim=1)

    coeffs = torch.cat([p["shape"], p["exp"]], dim=1)
    J = model.lean_coeff_jacobian(coeffs, pose)
    assert J.shape == (2, 68 + 68 + 40, 3, coeffs.shape[1])
    eye = torch.eye(coeffs.shape[1], dtype=coeffs.dtype)
    fd = torch.stack([(points(coeffs + 1e-4 * e) - points(coeffs - 1e-4 * e)) / 2e-4 for e in eye], dim=-1)
    torch.testing.assert_close(J, fd, atol=1e-9, rtol=1e-7)
    assert J.abs().max() > 1e-3  # (and the columns are not trivially zero)
