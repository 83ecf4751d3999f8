"""Video tracking: temporal terms, the One-Euro filter, gap interpolation, resume, video decoding,
track.npz's schema and the CLI. The tracks run on a short synthetic clip of the stand-in (160 px
frames, exact landmark files, 96 px crops, few iterations) so the module stays fast."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.spatial.transform import Rotation

import cli
from bench.track import clip_params, render_clip, write_clip
from fitter import detect, io
from fitter import track as track_module
from fitter.camera import pinhole_project, project_opencv
from fitter.filters import OneEuroFilter, one_euro, one_euro_two_way
from fitter.losses import TERMS, Context, camera_translation, temporal_residual
from fitter.params import FitParams
from fitter.recipe import load_recipe
from fitter.track import (TrackOptions, clip_intrinsics, crop_camera, filter_landmarks, interpolate_missing,
                          landmark_jitter, opencv_extrinsics, read_detections, track_options, track_setups,
                          track_video)
from priors.errors import ImageError, NoFaceError, RecipeError

FRAMES, SIZE, GAP = 8, 160, 4  # frame GAP has no landmark file: a frame without a face
SMALL = ["resolution=96", "track.keyframes=3", "stages.key_joint.iterations=30", "stages.key_photometric.iterations=10",
         "stages.frame_landmarks.iterations=5"]
CONTRACT_KEYS = {"shape", "albedo", "exp", "global_pose", "neck_pose", "jaw_pose", "eye_pose", "R", "t", "landmarks2d",
                 "landmarks2d_target", "frame_ok", "K", "fps", "frames", "model", "recipe"}


def run(*args):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


# ----------------------------------------------------------------------------- temporal terms
def _params(B=2, n_exp=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    cam = torch.cat([5 + r(B, 1).abs(), 0.1 * r(B, 2), 3 + r(B, 1).abs(), torch.zeros(B, 2, dtype=dtype)], 1)
    return FitParams(r(B, 3), r(B, n_exp), 0.2 * r(B, 3), 0.2 * r(B, 3), 0.2 * r(B, 3), 0.2 * r(B, 6), cam,
                     r(B, 9, 3), r(B, 5, 3))


def _history(params_list):
    """name -> H x B x K from FitParams of earlier frames (most recent first)."""
    pose = lambda p: torch.cat([p.neck_pose, p.jaw_pose, p.eye_pose], 1)  # noqa: E731
    trans = lambda p: torch.stack([p.cam[:, 1], p.cam[:, 2], p.cam[:, 3] / p.cam[:, 0]], 1)  # noqa: E731
    return {"head": torch.stack([p.global_pose + p.neck_pose for p in params_list]),
            "pose": torch.stack([pose(p) for p in params_list]), "exp": torch.stack([p.exp for p in params_list]),
            "trans": torch.stack([trans(p) for p in params_list])}


def test_temporal_residual_hand_computed():
    x = torch.tensor([[1.0, 2.0]])
    hist = torch.tensor([[[0.5, 1.0]], [[0.0, 1.0]]])  # h0 (previous frame), h1 (the one before)
    assert torch.equal(temporal_residual(x, hist, 1), torch.tensor([[0.5, 1.0]]))
    assert torch.equal(temporal_residual(x, hist, 2), torch.tensor([[0.0, 1.0]]))  # 1 - 1 + 0, 2 - 2 + 1
    assert torch.equal(temporal_residual(x, hist[:1], 2), torch.zeros(1, 2))  # too early for an acceleration
    assert torch.equal(temporal_residual(x, None, 1), torch.zeros(1, 2))


def test_temporal_terms_values_and_residuals():
    now, prev1, prev2 = _params(seed=0), _params(seed=1), _params(seed=2)
    ctx = Context(now, {}, None, 96, {"history": _history([prev1, prev2])})
    d_exp = now.exp - 2 * prev1.exp + prev2.exp
    assert torch.allclose(TERMS["exp_accel"].fn(ctx), (d_exp ** 2).sum(1))
    # the head's velocity covers its rotation relative to the camera (global + neck); the pose's the
    # neck, the jaw and the eyes
    d_head = now.global_pose + now.neck_pose - prev1.global_pose - prev1.neck_pose
    assert torch.allclose(TERMS["head_velocity"].fn(ctx), (d_head ** 2).sum(1))
    d_rest = sum(((getattr(now, n) - getattr(prev1, n)) ** 2).sum(1) for n in ("neck_pose", "jaw_pose", "eye_pose"))
    assert torch.allclose(TERMS["pose_velocity"].fn(ctx), d_rest)
    dd_head = now.global_pose + now.neck_pose - 2 * (prev1.global_pose + prev1.neck_pose) + prev2.global_pose \
        + prev2.neck_pose
    assert torch.allclose(TERMS["head_accel"].fn(ctx), (dd_head ** 2).sum(1))
    dist = lambda p: p.cam[:, 3] / p.cam[:, 0]  # noqa: E731  the model origin's distance, metres
    d_depth = dist(now) - dist(prev1)
    d_xy = now.cam[:, 1:3] - prev1.cam[:, 1:3]
    assert torch.allclose(TERMS["trans_velocity"].fn(ctx), d_depth ** 2 + (d_xy ** 2).sum(1))
    for name in ("head_velocity", "head_accel", "pose_velocity", "pose_accel", "exp_velocity", "exp_accel",
                 "trans_velocity", "trans_accel"):
        term = TERMS[name]
        assert torch.allclose(term.fn(ctx), (term.residual(ctx) ** 2).sum(1))
    first = Context(now, {}, None, 96, {})  # the first frame of a track: nothing to compare with
    assert torch.equal(TERMS["pose_accel"].fn(first), torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("name", ["pose_accel", "exp_velocity", "trans_accel", "trans_velocity"])
def test_temporal_terms_gradient_matches_finite_differences(name):
    prev = _history([_params(seed=1), _params(seed=2)])
    base = _params(seed=0)
    group = {"pose_accel": "jaw_pose", "exp_velocity": "exp"}.get(name, "cam")

    def value(x):
        p = FitParams(**{**dict(base.items()), group: x})
        return TERMS[name].fn(Context(p, {}, None, 96, {"history": prev})).sum()

    x = getattr(base, group).clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(value(x), x)
    h = 1e-6
    fd = torch.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        if group == "cam" and idx[1] >= 4:  # the principal point is fixed by the photo (not in the term)
            continue
        e = torch.zeros_like(x)
        e[idx] = h
        fd[idx] = (value(x.detach() + e) - value(x.detach() - e)) / (2 * h)
    assert torch.allclose(grad, fd, rtol=1e-5, atol=1e-7)
    assert grad.abs().sum() > 0


def test_crop_camera_is_one_camera_for_every_crop():
    """The same model point seen through two frames' crops lands on the same pixel, the one the clip's
    K, R, t give; and camera_translation reads back what crop_camera was given."""
    trans, focal, size = np.array([0.01, -0.02, 0.6]), 500.0, (360, 480)
    point = torch.tensor([[[0.03, 0.05, 0.02]]])
    K = clip_intrinsics(focal, size)
    R, t = opencv_extrinsics(trans)
    expect = project_opencv(point[0].numpy(), K, R, t)[0]
    for box in (np.array([200.0, 170.0, 150.0]), np.array([260.0, 200.0, 90.0])):
        cam = crop_camera(trans, focal, box, size)
        assert np.allclose(camera_translation(cam)[0].numpy(), trans, atol=1e-6)
        px = pinhole_project(point, cam, 96)[0, :, :2].numpy()
        assert np.allclose(detect.from_crop(px, box, 96)[0], expect, atol=1e-3)


# ----------------------------------------------------------------------------- One-Euro filter
def test_one_euro_hand_computed():
    """Two steps of the filter worked out by hand from its definition (Casiez et al. 2012)."""
    alpha = lambda cutoff, dt: 1 / (1 + 1 / (2 * math.pi * cutoff) / dt)  # noqa: E731
    dt, beta = 0.1, 0.1
    # step 1: x 0 -> 1; derivative 10 smoothed at 1 Hz, cut-off 1 + beta * |dx_hat|
    dx1 = alpha(1.0, dt) * 10.0
    x1 = alpha(1.0 + beta * dx1, dt) * 1.0
    # step 2: x stays 1
    dx2 = alpha(1.0, dt) * ((1.0 - x1) / dt) + (1 - alpha(1.0, dt)) * dx1
    a2 = alpha(1.0 + beta * dx2, dt)
    x2 = a2 * 1.0 + (1 - a2) * x1
    got = one_euro(np.array([0.0, 1.0, 1.0]), np.array([0.0, 0.1, 0.2]), min_cutoff=1.0, beta=beta, d_cutoff=1.0)
    assert np.allclose(got, [0.0, x1, x2], atol=1e-12)
    assert abs(x1 - 0.4654) < 1e-3  # the number on paper: alpha(1.3859 Hz, 0.1 s)


def test_one_euro_smooths_noise_and_follows_fast_moves():
    rng = np.random.default_rng(0)
    t = np.arange(200) / 25.0
    still = 1.0 + rng.normal(0, 0.01, 200)
    out = one_euro(still, t, min_cutoff=1.0, beta=0.0)
    assert out[20:].std() < 0.5 * still[20:].std()
    ramp = np.concatenate([np.zeros(50), np.linspace(0, 10, 50), np.full(100, 10.0)])
    lag_slow = np.abs(one_euro(ramp, t, 1.0, 0.0) - ramp)[50:100].max()
    lag_fast = np.abs(one_euro(ramp, t, 1.0, 5.0) - ramp)[50:100].max()
    assert lag_fast < 0.5 * lag_slow  # beta raises the cut-off with speed: less lag
    with pytest.raises(ValueError):
        f = OneEuroFilter()
        f(0.0, 1.0)
        f(0.0, 1.0)


def test_one_euro_two_way_hand_computed():
    """beta 0: a fixed exponential smoother, a = alpha(1 Hz, 0.1 s). Forward over [0, 1, 1]:
    [0, a, a + (1 - a) a]; backward (over [1, 1, 0], then reversed): [1 - a, 1, 1]; the two-way is their mean."""
    a = 1 / (1 + 1 / (2 * math.pi * 1.0) / 0.1)
    got = one_euro_two_way(np.array([0.0, 1.0, 1.0]), np.array([0.0, 0.1, 0.2]), min_cutoff=1.0, beta=0.0)
    assert np.allclose(got, [(1 - a) / 2, (a + 1) / 2, (a + (1 - a) * a + 1) / 2], atol=1e-12)


def test_one_euro_two_way_does_not_trail_and_smooths_more():
    t = np.arange(200) / 25.0
    ramp = 2.0 * t  # constant speed: one way trails it by a steady amount, the two ways cancel
    lag = np.abs(one_euro(ramp, t, 1.0, 0.0) - ramp)[80:120].mean()
    assert lag > 0.2  # 2 units/s x about 0.16 s
    assert np.abs(one_euro_two_way(ramp, t, 1.0, 0.0) - ramp)[80:120].max() < 0.01 * lag
    still = 1.0 + np.random.default_rng(0).normal(0, 0.01, (200, 4))  # any array shape, per element
    one, two = one_euro(still, t, 1.0, 0.5), one_euro_two_way(still, t, 1.0, 0.5)
    assert two.shape == still.shape and two[20:180].std() < 0.9 * one[20:180].std()  # measured 0.83


def test_track_filter_is_two_way_unless_the_recipe_says_otherwise():
    rng = np.random.default_rng(1)
    raw = (100.0 + rng.normal(0, 2.0, (30, 68, 2))).astype(np.float32)
    raw[:, :, 0] += np.linspace(0, 60, 68)  # a face about 60 px wide
    raw[7] = np.nan  # a frame without a face is skipped, and stays NaN
    options = track_options(load_recipe("track"))
    assert options.two_way and options.beta == 2.0
    both = filter_landmarks(raw, 25.0, options)
    one = filter_landmarks(raw, 25.0, replace(options, two_way=False))
    ok = np.isfinite(raw).all((1, 2))
    scale = np.median([detect.square_box(p)[2] for p in raw[ok]])
    times = np.nonzero(ok)[0] / 25.0
    expected = one_euro_two_way(raw[ok].astype(np.float64) / scale, times, 1.0, 2.0, 1.0) * scale
    assert np.allclose(both[ok], expected, atol=1e-3) and np.isnan(both[7]).all()
    assert not np.allclose(both[ok], one[ok], atol=1e-3)
    with pytest.raises(RecipeError, match="track.two_way"):
        track_options(load_recipe("track", ["track.two_way=1"]))


# ----------------------------------------------------------------------------- interpolation
def test_interpolate_missing_linear_codes_slerp_rotations_hold_at_ends():
    ok = np.array([False, True, False, False, True, False])
    exp = np.zeros((6, 2), np.float32)
    exp[1], exp[4] = [0.0, 3.0], [3.0, 0.0]
    rot = np.zeros((6, 3), np.float32)
    rot[1], rot[4] = Rotation.from_euler("y", 10, degrees=True).as_rotvec(), \
        Rotation.from_euler("x", 70, degrees=True).as_rotvec()
    out = interpolate_missing({"exp": exp, "global_pose": rot, "eye_pose": np.concatenate([rot, rot], 1)}, ok)
    assert np.allclose(out["exp"][2], [1.0, 2.0]) and np.allclose(out["exp"][3], [2.0, 1.0])
    assert np.allclose(out["exp"][0], exp[1]) and np.allclose(out["exp"][5], exp[4])  # held at the ends
    r1, r4 = Rotation.from_rotvec(rot[1]), Rotation.from_rotvec(rot[4])
    total = (r1.inv() * r4).magnitude()
    for k, w in ((2, 1 / 3), (3, 2 / 3)):  # on the geodesic from r1 to r4, at its share of the way
        rk = Rotation.from_rotvec(out["global_pose"][k])
        assert abs((r1.inv() * rk).magnitude() - w * total) < 1e-5
        assert abs((rk.inv() * r4).magnitude() - (1 - w) * total) < 1e-5
        assert np.allclose(out["eye_pose"][k], np.concatenate([out["global_pose"][k]] * 2), atol=1e-6)
    assert np.array_equal(out["global_pose"][1], rot[1])  # good frames untouched


# ----------------------------------------------------------------------------- video decoding
def test_video_decoding_of_a_generated_clip(tmp_path):
    import av

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(12):
            img = np.full((48, 64, 3), 20 * k, np.uint8)
            img[:, : 4 + 4 * k, 0] = 255  # a red bar growing frame by frame
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    src = io.FrameSource(path)
    frames = list(src)
    assert src.fps == pytest.approx(10.0) and [f.index for f in frames] == list(range(12))
    assert frames[3].name == "000003" and frames[3].image.shape == (48, 64, 3)
    for k, f in enumerate(frames):
        assert abs(float(f.image[:, 40:, 1].mean()) - 20 * k) < 6  # grey level of frame k
    sub = io.FrameSource(path, start=2, end=9, every=3)
    assert [f.index for f in sub] == [2, 5, 8] and sub.fps == pytest.approx(10 / 3)
    assert abs(float(list(sub)[1].image[:, 40:, 1].mean()) - 100) < 6
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ImageError, match="bad.mp4"):
        io.FrameSource(bad)


def test_frame_folder_reports_corrupt_frames_and_goes_on(tmp_path):
    for k in range(3):
        io.write_png(tmp_path / f"f{k}.png", np.full((16, 16, 3), 50 * k, np.uint8))
    (tmp_path / "f1.png").write_bytes(b"\x89PNG broken")
    frames = list(io.FrameSource(tmp_path))
    assert [f.name for f in frames] == ["f0.png", "f1.png", "f2.png"]
    assert frames[1].image is None and "f1.png" in frames[1].error
    assert frames[2].image is not None and frames[2].image[0, 0, 0] == 100
    with pytest.raises(ImageError, match="select no frames"):
        io.FrameSource(tmp_path, start=3, end=2)


def test_write_video_round_trip(tmp_path):
    frames = [np.full((31, 41, 3), 30 * k, np.uint8) for k in range(5)]
    path = io.write_video(tmp_path / "v.mp4", frames, 12.5)
    back = list(io.FrameSource(path))
    assert len(back) == 5 and back[0].image.shape == (32, 42, 3)  # padded to even sizes
    assert abs(float(back[4].image.mean()) - 120) < 4
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]  # no temporary left behind


# ----------------------------------------------------------------------------- tracking
@pytest.fixture(scope="module")
def clip(standin_model, tmp_path_factory):
    """The benchmark's motion on FRAMES frames of SIZE px, with exact landmark files except for frame GAP."""
    root = tmp_path_factory.mktemp("clip")
    truth = clip_params(standin_model, 4 * FRAMES, SIZE, seed=3)[:FRAMES]  # the first quarter of the motion
    images, lmk = render_clip(standin_model, truth, SIZE, seed=3)
    folder = write_clip(root / "frames", images)
    lmk_dir = root / "lmk"
    lmk_dir.mkdir()
    for k in range(FRAMES):
        if k != GAP:
            io.write_landmarks(lmk_dir / f"{k:04d}.npy", lmk[k])
    return folder, lmk_dir, truth, lmk, images


@pytest.fixture(scope="module")
def cli_track(clip, standin_path, tmp_path_factory):
    folder, lmk_dir, *_ = clip
    out = tmp_path_factory.mktemp("tracked")
    r = run("track", folder, "--out", out, "--landmarks", lmk_dir, "--model", standin_path,
            *[a for s in SMALL for a in ("--set", s)])
    assert r.exit_code == 0, r.output
    return out, r


def test_cli_track_writes_the_contract(cli_track, clip, standin_model):
    out, r = cli_track
    assert sorted(p.name for p in out.iterdir()) == ["overlay.mp4", "track.json", "track.npz"]  # .partial gone
    assert "tracked 8 frames (7 with a face)" in r.output
    with np.load(out / "track.npz", allow_pickle=False) as data:
        a = {k: data[k] for k in data.files}
    assert set(a) == CONTRACT_KEYS
    T, m = FRAMES, standin_model
    shapes = {"shape": (m.n_shape,), "albedo": (m.n_verts, 3), "exp": (T, m.n_exp), "global_pose": (T, 3),
              "neck_pose": (T, 3), "jaw_pose": (T, 3), "eye_pose": (T, 6), "R": (T, 3, 3), "t": (T, 3),
              "landmarks2d": (T, 68, 2), "landmarks2d_target": (T, 68, 2), "frame_ok": (T,), "K": (3, 3),
              "fps": (), "frames": (T,)}
    assert {k: a[k].shape for k in shapes} == shapes
    assert a["frame_ok"].dtype == bool and a["frame_ok"].tolist() == [k != GAP for k in range(T)]
    assert a["frames"].tolist() == [f"{k:04d}.png" for k in range(T)] and float(a["fps"]) == 25.0
    assert str(a["model"]) == m.tag and str(a["recipe"]) == "track"
    assert np.allclose(a["K"], [[default_focal(), 0, SIZE / 2], [0, default_focal(), SIZE / 2], [0, 0, 1]])
    assert np.isnan(a["landmarks2d_target"][GAP]).all() and np.isfinite(a["landmarks2d"]).all()
    report = json.loads((out / "track.json").read_text())
    assert [f["ok"] for f in report["per_frame"]] == a["frame_ok"].tolist()
    gap = report["per_frame"][GAP]
    assert gap["landmark_rmse_px"] is None and "no face" in gap["warnings"][-1]
    assert all(f["landmark_rmse_px"] < 3.0 for f in report["per_frame"] if f["ok"])
    video = list(io.FrameSource(out / "overlay.mp4"))
    assert len(video) == T and video[0].image.shape == (SIZE, 2 * SIZE, 3)


def default_focal():
    from fitter.camera import default_focal_px

    return default_focal_px(SIZE, SIZE)


def test_track_follows_the_motion_and_fills_the_gap(cli_track, clip, standin_model):
    out, _ = cli_track
    _, _, truth, true_lmk, _ = clip
    with np.load(out / "track.npz") as data:
        a = {k: data[k] for k in data.files}
    # the fitted head's landmarks, projected with the clip's K, R, t, follow the true ones (px)
    err = np.sqrt(((a["landmarks2d"] - true_lmk) ** 2).sum(-1)).mean(1)
    assert err[a["frame_ok"]].max() < 2.5
    # the interpolated frame is off by less than the true motion from one neighbour to the other
    assert err[GAP] < np.linalg.norm(true_lmk[GAP + 1] - true_lmk[GAP - 1], axis=-1).mean()
    # the head's orientation (global then neck rotation; the truth has no neck rotation) within 4 degrees
    head = Rotation.from_rotvec(a["global_pose"]) * Rotation.from_rotvec(a["neck_pose"])
    true = Rotation.from_rotvec(np.concatenate([p.global_pose.numpy() for p in truth]))
    assert (head.inv() * true).magnitude()[a["frame_ok"]].max() < np.deg2rad(4)
    # the missing frame sits between its neighbours: linear codes, slerped rotations
    assert np.allclose(a["exp"][GAP], (a["exp"][GAP - 1] + a["exp"][GAP + 1]) / 2, atol=1e-5)
    r0, r1, rm = (Rotation.from_rotvec(a["global_pose"][k]) for k in (GAP - 1, GAP + 1, GAP))
    assert abs((r0.inv() * rm).magnitude() - (rm.inv() * r1).magnitude()) < 1e-5
    assert np.allclose(a["t"][GAP], (a["t"][GAP - 1] + a["t"][GAP + 1]) / 2, atol=1e-6)
    assert np.allclose(a["R"], np.diag([1.0, -1.0, -1.0]))  # one fixed camera; the head moves


def test_resume_after_interruption_refits_nothing_and_matches(cli_track, clip, standin_model, tmp_path):
    out_ref, _ = cli_track
    folder, lmk_dir, *_ = clip
    stop_after = 3

    def interrupt(k, rec):
        if k == stop_after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        track_video(folder, tmp_path, model=standin_model, landmarks=lmk_dir, overrides=SMALL, on_frame=interrupt)
    done = sorted(p.name for p in (tmp_path / ".partial" / "frames").iterdir())
    assert done == [f"{k:06d}.npz" for k in range(stop_after + 1)]
    assert not (tmp_path / "track.npz").exists()
    with np.load(tmp_path / ".partial" / "identity.npz") as d:  # landmark files are exact: no point is moved
        assert not [k for k in d.files if k.startswith("person_")]
    fitted = []
    track = track_video(folder, tmp_path, model=standin_model, landmarks=lmk_dir, overrides=SMALL,
                        on_frame=lambda k, rec: fitted.append(k))
    assert fitted == list(range(stop_after + 1, FRAMES)) and track.fitted_frames == FRAMES - stop_after - 1
    assert track.report["resumed"] and track.report["person_points"] == {}
    with np.load(out_ref / "track.npz") as data:
        for key in CONTRACT_KEYS - {"frames", "model", "recipe"}:
            np.testing.assert_allclose(track.arrays[key], data[key], rtol=0, atol=1e-6, err_msg=key)
    # another selection of the same clip does not reuse the old partial results
    other = track_video(folder, tmp_path, model=standin_model, landmarks=lmk_dir, overrides=SMALL, end=5)
    assert other.fitted_frames == 5 and not other.report["resumed"]


def test_track_a_video_file(clip, standin_model, tmp_path, cli_track):
    """The clip as an mp4: same frames (decoded), landmark files named by the frame index."""
    folder, lmk_dir, _, true_lmk, images = clip
    video = io.write_video(tmp_path / "clip.mp4", images, 25.0, crf=10)
    named = tmp_path / "lmk"
    named.mkdir()
    for p in lmk_dir.iterdir():
        (named / f"{int(p.stem):06d}.npy").write_bytes(p.read_bytes())
    track = track_video(video, tmp_path / "out", model=standin_model, landmarks=named, overrides=SMALL, every=2)
    a = track.arrays
    assert a["frames"].tolist() == [0, 2, 4, 6] and float(a["fps"]) == pytest.approx(12.5)
    assert a["frame_ok"].tolist() == [True, True, False, True]  # frame 4 has no landmark file
    err = np.sqrt(((a["landmarks2d"] - true_lmk[::2]) ** 2).sum(-1)).mean(1)
    assert err[a["frame_ok"]].max() < 3.0


def test_bad_inputs_are_one_line(tmp_path, standin_path):
    r = run("track", tmp_path, "--out", tmp_path / "o", "--model", standin_path)
    assert r.exit_code == ImageError.exit_code and "holds no frames" in r.output
    io.write_png(tmp_path / "f0.png", np.zeros((32, 32, 3), np.uint8))
    r = run("track", tmp_path, "--out", tmp_path / "o", "--model", standin_path, "--set", "track.keyframe=3")
    assert r.exit_code == 7 and "track.keyframe" in r.output  # RecipeError, naming the key


def test_exported_track_plays_the_tracked_frames(cli_track, standin_path, tmp_path):
    """track.npz as written goes through `cli.py export` (its reader checks the contract's keys)."""
    out, _ = cli_track
    r = run("export", out / "track.npz", "--format", "glb", "--out", tmp_path / "clip.glb", "--model", standin_path)
    assert r.exit_code == 0, r.output
    assert f"{FRAMES} frame(s) at 25 fps" in r.output and (tmp_path / "clip.glb").stat().st_size > 0


# ----------------------------------------------------------------------------- MediaPipe's dense points
GAZE = np.array([0.0, 0.3, 0.0, 0.0, 0.3, 0.0], np.float32)  # both eyes 17 degrees aside; the renders look ahead


@pytest.fixture(scope="module")
def dense_clip(clip, standin_path):
    """A stand-in MediaPipe for the clip: per frame (found by its pixels) the true 68 landmarks and the
    true 478 dense points (the stand-in's own MediaPipe embedding, through the clip's camera) of the
    clip's head looking aside (GAZE), all weights 1. Only the dense iris points can show the gaze."""
    from fitter.fit import load_flame
    from fitter.synth import synthesize
    from priors.dense_embedding import dense_embedding_for

    folder, _, truth, _, images = clip
    m = load_flame(standin_path)  # its own copy: attach_dense changes the model's lean buffers
    emb = dense_embedding_for(m)
    m.attach_dense(emb.faces, emb.bary)
    found = {}
    for img, p in zip(images, truth, strict=True):
        p = FitParams(**{**dict(p.items()), "eye_pose": torch.as_tensor(GAZE)[None]})
        with torch.no_grad():
            pred = synthesize(m, p, SIZE, render=False)
        found[img.tobytes()] = (pred["landmarks2d"][0].numpy(), pred["dense2d"][0].numpy(), np.ones(478, np.float32))
    return folder, found


def fake_mediapipe(monkeypatch, found):
    """detect.detect_landmarks_dense answers from `found` (no face for unknown frames); counts its calls."""
    calls = []

    def detect_dense(image, face_index=None):
        calls.append(1)
        if image.tobytes() not in found:
            raise NoFaceError("no face found by mediapipe")
        return tuple(np.array(a, np.float32) for a in found[image.tobytes()])

    monkeypatch.setattr(detect, "detect_landmarks_dense", detect_dense)
    return calls


def spy_reports(monkeypatch) -> list[dict]:
    """The fit.json-style reports of every fit the track makes (keyframes, then each frame)."""
    reports = []
    real_fit = track_module.fit_targets

    def spy(setup, targets, *a, **k):
        out = real_fit(setup, targets, *a, **k)
        reports.extend(r.report for r in out)
        return out

    monkeypatch.setattr(track_module, "fit_targets", spy)
    return reports


@pytest.fixture(scope="module")
def dense_track(dense_clip, standin_path, tmp_path_factory):
    """The clip tracked from the stand-in MediaPipe: (Track, the reports of its fits)."""
    from fitter.fit import load_flame

    folder, found = dense_clip
    mp = pytest.MonkeyPatch()
    fake_mediapipe(mp, found)
    reports = spy_reports(mp)
    try:
        track = track_video(folder, tmp_path_factory.mktemp("dense"), model=load_flame(standin_path),
                            detector="mediapipe", overrides=SMALL)
    finally:
        mp.undo()
    return track, reports


def test_dense_detections_are_filtered_like_the_68(clip, monkeypatch):
    """Dense points that are copies of the 68 come out of the One-Euro filter exactly as the 68 do
    (the same filter in the same face-size units), and smoother than detected."""
    folder, _, _, true_lmk, images = clip
    rng = np.random.default_rng(0)
    noisy = true_lmk + rng.normal(0, 1.5, true_lmk.shape).astype(np.float32)
    found = {}
    for k, img in enumerate(images):
        dense = np.concatenate([noisy[k], noisy[k].mean(0) + rng.normal(0, 20, (478 - 68, 2))]).astype(np.float32)
        found[img.tobytes()] = (noisy[k], dense, np.linspace(0, 1, 478, dtype=np.float32))
    fake_mediapipe(monkeypatch, found)
    det = read_detections(io.FrameSource(folder), None, "mediapipe", "cpu", TrackOptions())
    assert det.detected and det.dense.shape == (FRAMES, 478, 2) and det.dense_weights.shape == (FRAMES, 478)
    np.testing.assert_allclose(det.dense[:, :68], det.landmarks, atol=1e-4)
    np.testing.assert_array_equal(det.raw, noisy)
    assert landmark_jitter(det.landmarks) < 0.7 * landmark_jitter(noisy)  # the filter smooths
    assert np.allclose(det.dense_weights, np.linspace(0, 1, 478)) and det.ok.all()
    # landmark files have no dense points and are used as given
    det_files = read_detections(io.FrameSource(folder), clip[1], "mediapipe", "cpu", TrackOptions())
    assert det_files.dense is None and not det_files.detected


def test_landmark_jitter_hand_computed_and_skips_frames_without_a_face():
    pts = np.zeros((5, 1, 2))
    pts[:, 0, 0] = [0.0, 1.0, 4.0, 9.0, 16.0]  # second differences 2, 2, 2
    assert landmark_jitter(pts) == pytest.approx(2.0)
    pts[3] = np.nan  # only the run (0, 1, 2) is left
    assert landmark_jitter(pts) == pytest.approx(2.0)
    pts[1] = np.nan
    assert np.isnan(landmark_jitter(pts))


def _dark_clip(tmp_path, grey: int, frames: int = 6):
    folder = tmp_path / f"grey{grey}"
    folder.mkdir()
    for k in range(frames):
        io.write_png(folder / f"{k:04d}.png", np.full((120, 160, 3), grey, np.uint8))
    return folder


def _fake_dark_detector(monkeypatch):
    """MediaPipe stand-in: a face in the middle of any frame; its points jump by +-3 px from call to call on
    a dark frame (median grey under 0.3), by +-0.3 px on a brighter one. Returns the medians it was shown."""
    rng = np.random.default_rng(0)
    base = np.stack(np.meshgrid(np.linspace(50, 110, 26), np.linspace(30, 90, 19)), -1).reshape(-1, 2)[:478]
    seen = []

    def detect_dense(image, face_index=None):
        seen.append(float(np.median(image)))
        noise = 3.0 if np.median(image) < 0.3 * 255 else 0.3
        dense = (base + rng.normal(0, noise, base.shape)).astype(np.float32)
        return dense[:68].copy(), dense, np.ones(478, np.float32)

    monkeypatch.setattr(detect, "detect_landmarks_dense", detect_dense)
    return seen


def test_a_dark_clip_takes_the_brightened_pass_when_it_is_steadier(tmp_path, monkeypatch):
    seen = _fake_dark_detector(monkeypatch)
    det = read_detections(io.FrameSource(_dark_clip(tmp_path, 40)), None, "mediapipe", "cpu", TrackOptions())
    assert det.exposure == pytest.approx(40 / 255) and det.brightened
    # the second pass saw each frame brightened to the target level
    assert seen == [40.0] * 6 + [round(255 * detect.EXPOSURE_TARGET)] * 6
    assert landmark_jitter(det.raw) < 0.5 * 3.0 and det.ok.all()


def test_a_bright_clip_is_read_once(tmp_path, monkeypatch):
    seen = _fake_dark_detector(monkeypatch)
    det = read_detections(io.FrameSource(_dark_clip(tmp_path, 120)), None, "mediapipe", "cpu", TrackOptions())
    assert seen == [120.0] * 6 and not det.brightened and det.exposure == pytest.approx(120 / 255)


def test_a_dark_clip_keeps_the_plain_pass_when_brightening_makes_it_jumpier():
    rng = np.random.default_rng(1)
    def make(noise):  # landmarks = raw: 6 frames of points that jump by `noise` px
        points = 50 + rng.normal(0, noise, (6, 68, 2))
        return track_module.Detections(np.arange(6), [f"{k}" for k in range(6)], np.full((6, 2), 100), points, points,
                                       np.ones(6), [[] for _ in range(6)], detected=True, exposure=0.1)

    plain, bright = make(0.5), make(2.0)
    assert track_module.steadier_detections(plain, bright) is plain and not plain.brightened
    plain, bright = make(2.0), make(0.5)
    bright.raw = bright.landmarks = bright.raw.copy()
    bright.raw[5] = np.nan  # steadier, but it lost a face: not taken
    assert track_module.steadier_detections(plain, bright) is plain
    plain, bright = make(2.0), make(0.5)
    chosen = track_module.steadier_detections(plain, bright)
    assert chosen is bright and chosen.brightened and chosen.exposure == 0.1 and np.allclose(chosen.seconds, 2.0)


def test_dense_points_reach_the_frame_fit(dense_clip, dense_track, standin_path, tmp_path, monkeypatch):
    """Detections with dense points: the frame stage's dense term is live (its iris points fit the gaze,
    which the 68 landmarks cannot show); with the term's weight 0 the eyes stay where they start."""
    from fitter.fit import load_flame

    folder, found = dense_clip
    track, reports = dense_track
    stages = [s for r in reports for s in r["stages"]]
    frame_dense = [s["losses"]["dense_landmark"] for s in stages if s["name"] == "frame_landmarks"]
    assert len(frame_dense) == FRAMES and all(v > 0 for v in frame_dense)
    assert all(s["losses"]["dense_landmark"] > 0 for s in stages if s["name"] == "key_landmarks")
    yaw = track.arrays["eye_pose"][:, [1, 4]]  # each eye's turn about the vertical axis, per frame
    assert abs(yaw.mean() - GAZE[1]) < 0.06 and yaw.min() > 0.15, yaw
    assert all(f["landmark_rmse_px"] < 3.0 for f in track.report["per_frame"])
    fake_mediapipe(monkeypatch, found)
    blind = track_video(folder, tmp_path, model=load_flame(standin_path), detector="mediapipe",
                        overrides=[*SMALL, "stages.frame_landmarks.weights.dense_landmark=0"])
    assert np.abs(blind.arrays["eye_pose"][:, [1, 4]]).max() < 0.02


def test_resume_keeps_the_dense_detections(dense_clip, dense_track, standin_path, tmp_path, monkeypatch):
    """An interrupted track from the detector resumes from .partial: the detector is not run again, the
    stored dense points are used (the gaze comes out as before), and the result is the uninterrupted one."""
    from fitter.fit import load_flame

    folder, found = dense_clip
    calls = fake_mediapipe(monkeypatch, found)

    def interrupt(k, rec):
        if k == 2:
            raise KeyboardInterrupt

    model = load_flame(standin_path)
    with pytest.raises(KeyboardInterrupt):
        track_video(folder, tmp_path, model=model, detector="mediapipe", overrides=SMALL, on_frame=interrupt)
    assert len(calls) == FRAMES
    with np.load(tmp_path / ".partial" / "detections.npz") as d:
        assert d["dense"].shape == (FRAMES, 478, 2) and bool(d["detected"])
    with np.load(tmp_path / ".partial" / "identity.npz") as d:  # the person's points, for the frames to come
        assert d["person_dense_faces"].shape == (478,) and d["person_static_bary"].shape == (51, 3)
    resumed = track_video(folder, tmp_path, model=model, detector="mediapipe", overrides=SMALL)
    assert len(calls) == FRAMES and resumed.report["resumed"] and resumed.fitted_frames == FRAMES - 3
    assert not model.has_dense  # the caller's model is not the one whose points were moved
    moves = resumed.report["person_points"]  # track.json says how far they moved: within the 12 mm radius
    assert moves == dense_track[0].report["person_points"]
    assert moves["static"]["points"] == 51 and moves["dense"]["points"] == 478
    assert all(0 <= m["mean_move_mm"] <= m["max_move_mm"] <= 12.0 for m in moves.values())
    for key in CONTRACT_KEYS - {"frames", "model", "recipe"}:
        np.testing.assert_allclose(resumed.arrays[key], dense_track[0].arrays[key], rtol=0, atol=1e-5, err_msg=key)


# ----------------------------------------------------------------------------- a moving camera
def test_camera_option_changes_the_frame_objective(standin_model):
    fixed = track_setups(standin_model, load_recipe("track"), "cpu")
    moving = track_setups(standin_model, load_recipe("track", ["track.camera=moving"]), "cpu")
    assert fixed.options.camera == "fixed" and moving.options.camera == "moving"
    pose_terms = ("trans_velocity", "trans_accel", "head_velocity", "head_accel")
    for f, m in zip(fixed.frame.recipe.stages, moving.frame.recipe.stages, strict=True):
        assert {k: w for k, w in f.weights.items() if k not in pose_terms} == m.weights
    assert all(fixed.frame.recipe.stages[0].weights[k] > 0 for k in pose_terms)
    # the expression, neck, jaw and eyes are still smoothed
    assert all(moving.frame.recipe.stages[0].weights[k] > 0 for k in ("exp_velocity", "pose_velocity", "pose_accel"))
    assert fixed.keyframe.recipe.stages == moving.keyframe.recipe.stages  # the identity is fitted alike
    with pytest.raises(RecipeError, match="track.camera.*fixed, moving"):
        track_setups(standin_model, load_recipe("track", ["track.camera=handheld"]), "cpu")


def test_moving_camera_holds_the_head_and_moves_the_camera(clip, cli_track, standin_model, tmp_path):
    """camera = "moving": global_pose 0 in every frame, R and t carry the head's motion, and the head as
    written (shape, exp, poses) seen through K, R, t lands on the fitted landmarks, which follow the true
    ones as a fixed camera's track does (the fixed camera's R is the same every frame, its head turns)."""
    folder, lmk_dir, _, true_lmk, _ = clip
    track = track_video(folder, tmp_path, model=standin_model, landmarks=lmk_dir,
                        overrides=[*SMALL, "track.camera=moving"])
    a = track.arrays
    assert np.array_equal(a["global_pose"], np.zeros((FRAMES, 3))) and track.report["camera"]["mode"] == "moving"
    turn = Rotation.from_matrix(a["R"][0]).inv() * Rotation.from_matrix(a["R"][-1])
    assert turn.magnitude() > np.deg2rad(5)  # the head turned: now the camera does
    t = lambda x: torch.as_tensor(x)  # noqa: E731
    with torch.no_grad():
        out = standin_model(t(a["shape"])[None].expand(FRAMES, -1), t(a["exp"]), t(a["global_pose"]),
                            t(a["neck_pose"]), t(a["jaw_pose"]), t(a["eye_pose"]))
    for k in range(FRAMES):  # iBUG 17-67 (the jaw contour's choice of points depends on the view)
        px = project_opencv(out.landmarks3d[k, 17:].double().numpy(), a["K"], a["R"][k], a["t"][k])
        assert np.abs(px - a["landmarks2d"][k, 17:]).max() < 0.05
    err = np.sqrt(((a["landmarks2d"] - true_lmk) ** 2).sum(-1)).mean(1)  # the head follows as with a fixed one
    assert err[a["frame_ok"]].max() < 2.5
    with np.load(cli_track[0] / "track.npz") as fixed:
        assert np.allclose(fixed["R"], np.diag([1.0, -1.0, -1.0])) and np.abs(fixed["global_pose"]).max() > 0.1


def test_moving_camera_follows_a_shaking_camera_closer(clip, standin_model, tmp_path):
    """A handheld camera: the head-to-camera pose shakes from frame to frame (+-2 degrees, +-1 cm, +-2 cm in
    depth). Exact landmark files of the shaking views: the moving-camera track follows them closer than
    the fixed camera's, whose temporal terms hold the pose back."""
    from fitter.synth import synthesize

    folder, _, truth, _, _ = clip
    rng = np.random.default_rng(7)
    lmk_dir = tmp_path / "shaky"
    lmk_dir.mkdir()
    shaky = []
    for k, p in enumerate(truth):
        turn = Rotation.from_rotvec(rng.normal(0, np.deg2rad(2.0), 3)) * Rotation.from_rotvec(p.global_pose[0].numpy())
        s, tx, ty, f = (float(v) for v in p.cam[0, :4])
        depth = f / s + rng.normal(0, 0.02)
        q = FitParams(**{**dict(p.items()), "global_pose": torch.tensor(turn.as_rotvec(), dtype=torch.float32)[None],
                         "cam": torch.tensor([[f / depth, tx + rng.normal(0, 0.01), ty + rng.normal(0, 0.01), f,
                                               0.0, 0.0]])})
        with torch.no_grad():
            shaky.append(synthesize(standin_model, q, SIZE, render=False)["landmarks2d"][0].numpy())
        io.write_landmarks(lmk_dir / f"{k:04d}.npy", shaky[-1])
    err = {}
    for mode in ("fixed", "moving"):
        a = track_video(folder, tmp_path / mode, model=standin_model, landmarks=lmk_dir,
                        overrides=[*SMALL, f"track.camera={mode}"]).arrays
        err[mode] = np.sqrt(((a["landmarks2d"] - np.stack(shaky)) ** 2).sum(-1)).mean(1)[2:].mean()
    assert err["moving"] < 0.8 * err["fixed"], err
