"""Expression transfer: swap, layer mixing, spec parsing, optimised mixing, regions, animation frames."""

import math

import numpy as np
import pytest
import torch

from fitter.params import FitParams
from fitter.transfer import (
    EXP_BANDS,
    LAYERS,
    check_compatible,
    expression_sequence,
    jaw_sweep,
    layer_slices,
    mix,
    optimize_mix,
    parse_mix_spec,
    region_weights,
    regional_transfer,
    swap,
    yaw_sweep,
)
from priors.assets import load_model
from priors.errors import UsageError
from priors.flame import FlameModel
from tests.synthetic import synthetic_assets

POSE_FIELDS = ("shape", "exp", "global_pose", "neck_pose", "jaw_pose", "eye_pose")


@pytest.fixture(scope="module")
def model(standin_path):
    return FlameModel(load_model(standin_path))


def random_fit(model, seed: int) -> FitParams:
    """Plausible random parameters, batch 1: N(0, 0.8) shape/exp, small poses, jaw slightly open."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sc=1.0: torch.randn(1, *s, generator=g) * sc  # noqa: E731
    jaw = torch.tensor([[0.05 + 0.15 * float(torch.rand(1, generator=g)), 0.0, 0.0]]) + r(3, sc=0.01)
    return FitParams(shape=r(model.n_shape, sc=0.8), exp=r(model.n_exp, sc=0.8), global_pose=r(3, sc=0.1),
                     neck_pose=r(3, sc=0.05), jaw_pose=jaw, eye_pose=r(6, sc=0.1),
                     cam=torch.tensor([[8.0, 0.01, -0.02]]) + r(3, sc=0.01), light=r(9, 3, sc=0.2),
                     albedo=torch.rand(1, model.n_verts, 3, generator=g))


def geometry(model, p: FitParams):
    return model(*(getattr(p, n) for n in POSE_FIELDS))


@pytest.fixture(scope="module")
def pair(model):
    return random_fit(model, 1), random_fit(model, 2)


# ----------------------------------------------------------------------------- swap / mix
def test_swap_copies_exactly(pair):
    T, S = pair
    out = swap(T, S)
    for name in ("shape", "global_pose", "neck_pose", "eye_pose", "cam", "albedo", "light"):
        assert torch.equal(getattr(out, name), getattr(T, name)), name
    assert torch.equal(out.exp, S.exp) and torch.equal(out.jaw_pose, S.jaw_pose)
    assert out.exp.data_ptr() != S.exp.data_ptr()  # copies, not views
    with_eyes = swap(T, S, eyes=True)
    assert torch.equal(with_eyes.eye_pose, S.eye_pose) and torch.equal(with_eyes.shape, T.shape)


def test_swap_rejects_different_sizes(model, pair):
    T, S = pair
    small = S.map(lambda t: t)
    small.exp = S.exp[:, :50]
    with pytest.raises(UsageError, match="exp size"):
        swap(T, small)


def test_band_slices_cover_every_coefficient_once():
    for n_exp in (100, 53, 6):
        slices = layer_slices(n_exp)
        assert list(slices) == list(EXP_BANDS)
        covered = np.concatenate([np.arange(n_exp)[s] for s in slices.values()])
        assert covered.tolist() == list(range(n_exp))
    assert layer_slices(53) == {"exp.coarse": slice(0, 10), "exp.mid": slice(10, 30), "exp.fine": slice(30, 53)}
    with pytest.raises(UsageError, match="band edges"):
        layer_slices(53, (30, 10))


def test_mix_endpoints_and_unnamed_layers(pair):
    T, S = pair
    field = {"shape": "shape", "jaw": "jaw_pose", "eyes": "eye_pose", "neck": "neck_pose",
             "global": "global_pose", "albedo": "albedo", "light": "light"}
    zero = mix(T, S, {layer: 0.0 for layer in LAYERS})
    for name, value in T.items():
        assert torch.equal(getattr(zero, name), value), name
    for layer, f in field.items():
        out = mix(T, S, {layer: 1.0})
        assert torch.equal(getattr(out, f), getattr(S, f)), layer
        for name, value in T.items():
            if name != f:
                assert torch.equal(getattr(out, name), value), (layer, name)
    full = mix(T, S, {b: 1.0 for b in EXP_BANDS})
    assert torch.equal(full.exp, S.exp) and torch.equal(full.cam, T.cam)


def test_mix_half_on_one_band(pair):
    T, S = pair
    out = mix(T, S, {"exp.mid": 0.5})
    mid = layer_slices(T.exp.shape[1])["exp.mid"]
    torch.testing.assert_close(out.exp[:, mid], 0.5 * (T.exp[:, mid] + S.exp[:, mid]))
    outside = torch.ones(T.exp.shape[1], dtype=torch.bool)
    outside[mid] = False
    assert torch.equal(out.exp[:, outside], T.exp[:, outside])
    assert torch.equal(out.shape, T.shape) and torch.equal(out.jaw_pose, T.jaw_pose)
    with pytest.raises(UsageError, match="outside"):
        mix(T, S, {"jaw": 2.0})


def test_check_compatible(pair):
    T, S = pair
    check_compatible(T, S, "ict-flame sha256:ab", "ict-flame sha256:ab")
    with pytest.raises(UsageError, match="model 'a sha256:1'.*'b sha256:2'"):
        check_compatible(T, S, "a sha256:1", "b sha256:2")
    other = S.map(lambda t: t)
    other.shape = S.shape[:, :50]
    with pytest.raises(UsageError, match=r"shape size \(target \(100,\), source \(50,\)\)"):
        check_compatible(T, other, "m", "m")


# ----------------------------------------------------------------------------- mix specs
def test_parse_mix_spec_valid():
    assert parse_mix_spec("exp.coarse=1,exp.mid=0.5,jaw=1") == {"exp.coarse": 1.0, "exp.mid": 0.5, "jaw": 1.0}
    assert parse_mix_spec(" shape = 0.25 , exp=1") == {"shape": 0.25, "exp.coarse": 1.0, "exp.mid": 1.0,
                                                       "exp.fine": 1.0}


@pytest.mark.parametrize("spec, message", [
    ("exp.coars=1", r"unknown layer 'exp.coars' \(did you mean 'exp.coarse'\?\)"),
    ("jaw=1.5", r"alpha 1.5 is outside \[0, 1\]"),
    ("jaw=-0.1", r"outside \[0, 1\]"),
    ("jaw=nan", r"outside \[0, 1\]"),
    ("jaw=lots", r"alpha 'lots' is not a number"),
    ("jaw", r"piece 'jaw' is not layer=alpha"),
    ("jaw=1,,eyes=1", r"piece '' is not layer=alpha"),
    ("jaw=1,jaw=0.5", r"layer 'jaw' is given twice"),
    ("exp=1,exp.mid=0", r"layer 'exp.mid' is given twice"),
    ("", r"is empty"),
])
def test_parse_mix_spec_errors(spec, message):
    with pytest.raises(UsageError, match=message) as info:
        parse_mix_spec(spec)
    text = str(info.value)
    assert "\n" not in text and "fix:" in text and "exp.coarse" in text  # names the valid layers


# ----------------------------------------------------------------------------- optimised mixing
def test_optimize_mix_recovers_a_known_mix(model, pair):
    T, S = pair
    truth = {"shape": 0.3, "exp.coarse": 0.8, "exp.mid": 0.5, "exp.fine": 0.2, "jaw": 1.0, "eyes": 0.0,
             "neck": 0.6}
    alphas, out = optimize_mix(model, T, S, goal=mix(T, S, truth))
    assert set(alphas) == set(truth)
    for layer, value in truth.items():
        assert abs(alphas[layer] - value) <= 0.05, (layer, alphas)
    expected = mix(T, S, alphas)
    for name, value in expected.items():
        assert torch.equal(getattr(out, name), value), name


def test_optimize_mix_keeps_identity_takes_expression(model, pair):
    T, S = pair
    alphas, out = optimize_mix(model, T, S)
    assert alphas["shape"] < 0.1, alphas
    assert all(alphas[b] > 0.9 for b in EXP_BANDS), alphas
    assert torch.equal(out.cam, T.cam) and torch.equal(out.albedo, T.albedo)
    with pytest.raises(UsageError, match="'light' cannot be optimised"):
        optimize_mix(model, T, S, layers=("light",))


def test_optimize_mix_on_a_small_model():
    small = FlameModel(synthetic_assets())  # n_exp 6: exp.mid and exp.fine are empty bands
    T, S = random_fit(small, 3), random_fit(small, 4)
    alphas, _ = optimize_mix(small, T, S, steps=60)
    assert alphas["exp.mid"] == 0.0 and alphas["exp.fine"] == 0.0
    assert alphas["shape"] < 0.1 and alphas["exp.coarse"] > 0.9, alphas


# ----------------------------------------------------------------------------- regions
def test_region_weights_landmark_derived(model):
    lmk = geometry(model, FitParams.initial(1, model.n_shape, model.n_exp, model.n_verts)).landmarks3d_full[0]
    nearest = torch.cdist(lmk, model.v_template).argmin(dim=1)  # the vertex at each landmark
    top = model.v_template[:9409, 1].argmax()  # top of the forehead (face area)
    for region, ids in {"mouth": range(48, 68), "eyes": range(36, 48), "brows": range(17, 27),
                        "nose": range(27, 36)}.items():
        w = region_weights(model, [region])
        assert w.shape == (model.n_verts,) and float(w.min()) >= 0 and float(w.max()) <= 1
        assert torch.all(w[nearest[list(ids)]] == 1), region
        assert w[top] == 0, region
        assert 0 < int(((w > 0) & (w < 1)).sum())  # a smooth falloff, not a hard edge
    both = region_weights(model, "mouth, eyes")
    torch.testing.assert_close(both, torch.maximum(region_weights(model, ["mouth"]),
                                                   region_weights(model, ["eyes"])))
    with pytest.raises(UsageError, match=r"unknown region 'mouht' \(did you mean 'mouth'\?\)"):
        region_weights(model, ["mouht"])


def test_region_weights_from_masks(model):
    lips = np.nonzero(region_weights(model, ["mouth"]).numpy() == 1)[0][:200]
    w = region_weights(model, ["mouth"], masks={"lips": lips})
    assert torch.all(w[torch.as_tensor(lips)] == 1) and w[model.v_template[:, 1].argmax()] == 0
    with pytest.raises(UsageError, match="masks lack region nose"):
        region_weights(model, ["nose"], masks={"lips": lips})
    with pytest.raises(UsageError, match="does not index this model"):
        region_weights(model, ["mouth"], masks={"lips": np.array([0, model.n_verts + 5])})


def test_region_weights_on_any_mesh():
    small = FlameModel(synthetic_assets())
    w = region_weights(small, ["mouth", "eyes"])
    assert w.shape == (small.n_verts,) and float(w.max()) == 1.0 and float(w.min()) == 0.0


def test_regional_transfer_mouth(model, pair):
    T, S = pair
    params, verts = regional_transfer(model, T, S, ["mouth"])
    w = region_weights(model, ["mouth"])
    base = geometry(model, T).vertices
    full = geometry(model, swap(T, S)).vertices
    still = (w == 0) & (model.weights[:, 2] == 0)  # outside the region and not skinned to the jaw
    assert int(still.sum()) > 5000
    assert torch.equal(verts[0, still], base[0, still])
    at_mouth = w == 1
    assert int(at_mouth.sum()) > 100
    torch.testing.assert_close(verts[0, at_mouth], full[0, at_mouth], atol=1e-6, rtol=0)
    assert float((full - base)[0, at_mouth].norm(dim=-1).mean()) > 1e-3  # the swap does move the mouth
    # params: S's jaw, T's identity/pose/appearance, exp projected so re-synthesis is close
    assert torch.equal(params.jaw_pose, S.jaw_pose) and torch.equal(params.shape, T.shape)
    assert torch.equal(params.cam, T.cam) and torch.equal(params.eye_pose, T.eye_pose)
    resynth = geometry(model, params).vertices
    err = lambda v: float((v - verts).norm(dim=-1).mean())  # noqa: E731
    # least squares beats both whole expressions (T's with S's jaw, and S's)
    assert err(resynth) < min(err(geometry(model, mix(T, S, {"jaw": 1.0})).vertices), err(full))
    eyes_only, verts_e = regional_transfer(model, T, S, ["eyes"])
    assert torch.equal(eyes_only.jaw_pose, T.jaw_pose)  # no mouth/jaw region: T's jaw
    with pytest.raises(UsageError, match="unknown region"):
        regional_transfer(model, T, S, ["ears"])


# ----------------------------------------------------------------------------- animation
def test_expression_sequence(model, pair):
    T, S = pair
    others = [random_fit(model, 10 + i) for i in range(3)]
    frames = expression_sequence(T, [S, *others])
    assert len(frames) == 4
    for frame, e in zip(frames, [S, *others], strict=True):
        assert torch.equal(frame.exp, e.exp) and torch.equal(frame.jaw_pose, e.jaw_pose)
        assert torch.equal(frame.shape, T.shape) and torch.equal(frame.cam, T.cam)


def test_yaw_and_jaw_sweeps(model, pair):
    T, _ = pair
    yaws = yaw_sweep(T)
    assert len(yaws) == 13
    torch.testing.assert_close(yaws[0].global_pose, torch.tensor([[0.0, -math.radians(30), 0.0]]))
    torch.testing.assert_close(yaws[6].global_pose, torch.zeros(1, 3))
    torch.testing.assert_close(yaws[-1].global_pose, torch.tensor([[0.0, math.radians(30), 0.0]]))
    assert all(torch.equal(f.exp, T.exp) and torch.equal(f.jaw_pose, T.jaw_pose) for f in yaws)
    jaws = jaw_sweep(T)
    assert len(jaws) == 10
    torch.testing.assert_close(jaws[0].jaw_pose, torch.zeros(1, 3))
    torch.testing.assert_close(jaws[-1].jaw_pose, torch.tensor([[math.radians(30), 0.0, 0.0]]))
    assert all(torch.equal(f.global_pose, T.global_pose) for f in jaws)
    # positive jaw pitch opens the mouth: the chin landmark moves down
    chin = [float(geometry(model, f).landmarks3d_full[0, 8, 1]) for f in (jaws[0], jaws[-1])]
    assert chin[1] < chin[0] - 0.01
    with pytest.raises(UsageError, match="at least 1 frame"):
        yaw_sweep(T, n=0)
