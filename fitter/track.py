"""Tracking a video: one identity for the clip, then each frame's expression and pose.

1. read:     every selected frame (fitter.io.FrameSource); landmarks from files or the detector (with
             MediaPipe also its 478 dense points and their weights, as single-photo fits use them), the
             detections smoothed over time (One-Euro, fitter.filters); frames without a face are flagged.
2. identity: shape (and albedo) from a joint fit over K keyframes: the recipe's `key_*` stages, its
             least-squares ones per keyframe as a warm start, then its Adam ones jointly with one shared
             shape (fitset.fit_identity). The focal length (pixels) is fixed for the clip here.
3. frames:   in order, expression, jaw, neck, eyes, head pose and the camera translation (cam's s, tx,
             ty), warm-started from the previous frame, with the temporal terms against the two frames
             before (the recipe's `frame_*` stages; shape and albedo stay the identity's). With
             `track.camera = "moving"` (a handheld clip) the head-to-camera pose's temporal terms are left
             out (it follows each frame freely: MOVING_DROPS) and the outputs hold the
             head still: its rigid motion is written as a camera moving around it (R, t per frame,
             global_pose 0).
4. gaps:     frames without a face get parameters interpolated from their neighbours (linear for codes
             and translations, slerp for rotations); their frame_ok is False.

Resumable: DIR/.partial/ holds the detections, the identity and one file per finished frame, each
written atomically; a rerun with the same source, selection, recipe and model picks up after the
last finished frame. track.npz and track.json are written atomically at the end.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from priors.assets import atomic_write
from priors.errors import LandmarkError, NoFaceError, RecipeError, UsageError
from priors.flame import FlameModel

from . import detect, io
from .camera import crop_intrinsics, default_focal_px
from .filters import one_euro, one_euro_two_way
from .fit import (FitResult, FitSetup, Target, fit_targets, initial_params, load_flame, make_setup, polygon_mask,
                  stack_targets, use_dense_embedding, without_term)
from .fitset import Identity, fit_identity
from .losses import camera_translation, temporal_values
from .optimize import Progress
from .params import FitParams
from .recipe import Recipe, load_recipe
from .synth import face_mask_polygon, synthesize

POSES = ("global_pose", "neck_pose", "jaw_pose", "eye_pose")
ROTATIONS = ("global_pose", "neck_pose", "jaw_pose")  # eye_pose: two rotations side by side
PARTIAL = ".partial"
CAMERA_MODES = ("fixed", "moving")
# a moving (handheld) camera shakes: the head-to-camera pose is not smooth, so the frame stages leave out
# the temporal terms of the translation and of the head's rotation; the neck's, jaw's, eyes' and the
# expression's terms stay
MOVING_DROPS = ("trans_velocity", "trans_accel", "head_velocity", "head_accel")
FORMAT = 4  # bump when the .partial layout or its contents change (old partial folders are then started over)


# ----------------------------------------------------------------------------- options
@dataclass
class TrackOptions:
    """The recipe's [track] table."""

    keyframes: int = 8  # frames fitted jointly for the identity
    focal: str = "default"  # default (50 mm-equivalent field of view) | keyframes (their median estimate)
    filter: bool = True  # One-Euro filter on detected landmarks (landmark files are used as given)
    min_cutoff: float = 1.0  # Hz
    beta: float = 2.0  # cut-off rise per (face size / second) of landmark speed
    d_cutoff: float = 1.0  # Hz
    two_way: bool = True  # the filter run forward and backward over the clip (no lag); false: forward only
    camera: str = "fixed"  # fixed (the head moves before one still camera) | moving (handheld: see MOVING_DROPS)
    person_points: bool = True  # detected points' places on the head moved to where the keyframes put them


def track_options(recipe: Recipe) -> TrackOptions:
    table = dict(recipe.raw.get("track", {}))
    defaults = TrackOptions()
    out = {}
    for key, value in table.items():
        if not hasattr(defaults, key):
            raise RecipeError(f"{recipe.source}: unknown key 'track.{key}'; valid: "
                              f"{', '.join(TrackOptions.__dataclass_fields__)}")
        expected = type(getattr(defaults, key))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
            raise RecipeError(f"{recipe.source}: 'track.{key}' must be {expected.__name__}, got {value!r}")
        out[key] = value
    opts = TrackOptions(**out)
    if opts.keyframes < 1:
        raise RecipeError(f"{recipe.source}: 'track.keyframes' = {opts.keyframes} must be >= 1")
    if opts.focal not in ("default", "keyframes"):
        raise RecipeError(f"{recipe.source}: 'track.focal' = {opts.focal!r}; valid: default, keyframes")
    if opts.camera not in CAMERA_MODES:
        raise RecipeError(f"{recipe.source}: 'track.camera' = {opts.camera!r}; valid: {', '.join(CAMERA_MODES)}")
    if min(opts.min_cutoff, opts.d_cutoff) <= 0 or opts.beta < 0:
        raise RecipeError(f"{recipe.source}: 'track.min_cutoff' and 'track.d_cutoff' must be > 0, 'track.beta' >= 0")
    return opts


@dataclass
class TrackSetups:
    """The recipe split by role: key_* LM stages (per keyframe), key_* Adam stages (joint), frame_* stages."""

    keyframe: FitSetup
    joint: FitSetup
    frame: FitSetup
    options: TrackOptions


def track_setups(model: FlameModel, recipe: Recipe, device: str) -> TrackSetups:
    for s in recipe.stages:
        if not s.name.startswith(("key_", "frame_")):
            raise RecipeError(f"{recipe.source}: stage '{s.name}': a track recipe names its stages key_* (keyframe "
                              "identity) or frame_* (every frame); fix: rename it")
        if s.name.startswith("frame_") and {"shape", "albedo"} & set(s.params):
            raise RecipeError(f"{recipe.source}: stage '{s.name}' optimises shape/albedo per frame; the identity is "
                              "fitted once on the keyframes; fix: drop them from its params")
    if not any(s.name.startswith("frame_") and s.iterations > 0 for s in recipe.stages):
        raise RecipeError(f"{recipe.source}: no frame_* stage with iterations > 0; fix: add one "
                          "(see recipes/track.toml)")
    options = track_options(recipe)
    base = make_setup(model, recipe, device)
    pick = lambda keep: replace(base, recipe=replace(recipe, stages=[s for s in recipe.stages if keep(s)]))  # noqa: E731
    frame = pick(lambda s: s.name.startswith("frame_"))
    if options.camera == "moving":
        for term in MOVING_DROPS:
            frame = replace(frame, recipe=without_term(frame.recipe, term))
    return TrackSetups(pick(lambda s: s.name.startswith("key_") and s.solver == "lm"),
                       pick(lambda s: s.name.startswith("key_") and s.solver != "lm"), frame, options)


# ----------------------------------------------------------------------------- detections
@dataclass
class Detections:
    """Per selected frame (T): source index, name, image size (H, W; 0 when unreadable), landmarks
    68 x 2 (NaN without a face; filtered when detected), raw detections, seconds, warnings; with
    MediaPipe also its dense points T x 478 x 2 (filtered alike; NaN without a face) and their
    weights T x 478 (detect.dense_point_weights; 0 without a face), else None. `detected`: the
    landmarks come from a detector (weighed by the recipe's detector_trust), not from files."""

    indices: np.ndarray
    names: list[str]
    sizes: np.ndarray
    landmarks: np.ndarray
    raw: np.ndarray
    seconds: np.ndarray
    warnings: list[list[str]]
    detected: bool = False
    dense: np.ndarray | None = None
    dense_weights: np.ndarray | None = None
    exposure: float = float("nan")  # median grey (0..1) of the faces MediaPipe found (NaN: no dense points)
    brightened: bool = False  # the points come from frames brightened from `exposure` (steadier_detections)

    @property
    def ok(self) -> np.ndarray:
        return np.isfinite(self.landmarks).all((1, 2))

    def target(self, k: int, image: np.ndarray, res: int, focal_px: float) -> Target:
        """Frame k prepared for fitting (frame_target) with its landmarks and dense points."""
        dense = None if self.dense is None or not np.isfinite(self.dense[k]).all() else self.dense[k]
        return frame_target(self.names[k], image, self.landmarks[k], res, focal_px, dense,
                            None if dense is None else self.dense_weights[k], self.detected)


def frame_landmarks(frame: io.FrameRead, landmarks_dir: Path | None, detector: str, device: str,
                    level: float | None = None):
    """(68 x 2 landmarks or None, MediaPipe's (478 x 2 points, 478 weights) or None, warning or None) for
    one frame; a setup problem (no detector) raises. MediaPipe gives both point sets in one run
    (detect.detect_points, as fit.prepare_target uses it). level: detect on the frame brightened from this
    grey level (detect.brightened)."""
    if frame.image is None:
        return None, None, frame.error
    dense = None
    try:
        if landmarks_dir is not None:
            file = io.landmarks_for_image(frame.name, landmarks_dir)
            if file is None:
                return None, None, f"frame {frame.name}: no landmark file {Path(frame.name).stem}.pts/.npy/.json " \
                                   f"in {landmarks_dir}; treated as a frame without a face"
            lmk = io.read_landmarks(file)
        else:
            image = frame.image if level is None else detect.brightened(frame.image, level)
            lmk, points, weights = detect.detect_points(image, detector, device)
            dense = None if points is None else [points, weights]
        return io.validate_landmarks(lmk, f"frame {frame.name}"), dense, None
    except (NoFaceError, LandmarkError) as exc:
        return None, None, f"frame {frame.name}: {exc}"


def read_detections(source: io.FrameSource, landmarks_dir: Path | None, detector: str, device: str,
                    options: TrackOptions, progress: Progress | None = None) -> Detections:
    """Every frame's landmarks (detected or from files), then, for a dark clip, the brightened pass when
    it is steadier (steadier_detections), then the One-Euro filter (detected points only)."""
    det = detection_pass(source, landmarks_dir, detector, device, progress)
    if det.detected and det.exposure < detect.DARK_FACE:
        det = steadier_detections(det, detection_pass(source, None, detector, device, progress, det.exposure))
    if options.filter and det.detected:
        det.landmarks = filter_landmarks(det.raw, source.fps, options)
        if det.dense is not None:  # the same filter, in the same face-size units as the 68
            det.dense = filter_landmarks(det.dense, source.fps, options, scale_from=det.raw)
    return det


def landmark_jitter(points: np.ndarray) -> float:
    """Mean norm of the second difference over frames (T x N x 2 -> px), over the runs of three frames
    with points (NaN rows: no face); NaN when there is no such run."""
    second = points[2:] - 2 * points[1:-1] + points[:-2]
    norms = np.linalg.norm(second, axis=-1)
    norms = norms[np.isfinite(norms).all(1)] if len(norms) else norms
    return float(norms.mean()) if norms.size else float("nan")


def steadier_detections(plain: Detections, bright: Detections) -> Detections:
    """The brightened pass if it finds a face in as many frames as the plain one and its raw points jump
    less from frame to frame, over the frames where both found one; else the plain pass. A detector's
    points on a dark face are both noisier and further off; on single images brightening could go either
    way, over a clip the steadier pass is the better one (BENCHMARKS.md, eleventh round)."""
    both = plain.ok & bright.ok
    keep = lambda d: np.where(both[:, None, None], d.raw, np.nan)  # noqa: E731
    if bright.ok.sum() >= plain.ok.sum() and landmark_jitter(keep(bright)) < landmark_jitter(keep(plain)):
        bright.brightened = True
        bright.exposure = plain.exposure
        bright.seconds = bright.seconds + plain.seconds
        return bright
    return plain


def detection_pass(source: io.FrameSource, landmarks_dir: Path | None, detector: str, device: str,
                   progress: Progress | None = None, level: float | None = None) -> Detections:
    """One pass over the frames (unfiltered: landmarks == raw); level: detect on frames brightened from
    this grey level. exposure: the median face_exposure of the faces found with dense points (plain pass
    only; steadier_detections gives a chosen brightened pass the plain one's)."""
    indices, names, sizes, lmks, denses, secs, warns, exposures = [], [], [], [], [], [], [], []
    size0 = None
    for k, frame in enumerate(source, start=1):
        start = time.perf_counter()
        lmk, dense, warning = frame_landmarks(frame, landmarks_dir, detector, device, level)
        shape = frame.image.shape[:2] if frame.image is not None else (0, 0)
        if frame.image is not None:
            size0 = size0 or shape
            if shape != size0:
                lmk, dense, warning = None, None, f"frame {frame.name}: {shape[1]}x{shape[0]} px, the clip is " \
                                                  f"{size0[1]}x{size0[0]}; skipped (one camera for the clip)"
        indices.append(frame.index)
        names.append(frame.name)
        sizes.append(shape)
        lmks.append(np.full((68, 2), np.nan, np.float32) if lmk is None else lmk.astype(np.float32))
        denses.append(dense)
        if dense is not None and level is None:  # a brightened pass keeps the plain pass's exposure
            exposures.append(detect.face_exposure(frame.image, dense[0]))
        secs.append(time.perf_counter() - start)
        warns.append([warning] if warning else [])
        if progress is not None:
            progress("read", k, k, {})
    if not names:
        raise UsageError(f"{source.path}: --start/--end/--every select no frames; fix: widen the range")
    raw = np.stack(lmks)
    det = Detections(np.array(indices), names, np.array(sizes, np.int64), raw.copy(), raw, np.array(secs), warns,
                     detected=landmarks_dir is None)
    if any(d is not None for d in denses):  # frames without dense points: NaN points, weight 0
        det.dense = np.stack([np.full((478, 2), np.nan, np.float32) if d is None else d[0] for d in denses])
        det.dense_weights = np.stack([np.zeros(478, np.float32) if d is None else d[1] for d in denses])
        det.exposure = float(np.median(exposures)) if exposures else det.exposure
    return det


def filter_landmarks(raw: np.ndarray, fps: float, options: TrackOptions, scale_from: np.ndarray | None = None
                     ) -> np.ndarray:
    """One-Euro filter over the frames with a face (T x N x 2, NaN rows skipped), in units of the face
    size (so the filter's settings mean the same at any resolution): the median crop size of the 68
    landmarks `scale_from` (T x 68 x 2; default raw itself). Forward and backward (options.two_way): the
    whole clip is read before it is fitted, so the filter need not trail the motion."""
    ok = np.isfinite(raw).all((1, 2))
    out = raw.copy()
    if ok.sum() < 2:
        return out
    pts = raw[ok].astype(np.float64)
    ref = raw if scale_from is None else scale_from
    scale = np.median([detect.square_box(p)[2] for p in ref[np.isfinite(ref).all((1, 2))]])
    times = np.nonzero(ok)[0] / fps
    smooth = one_euro_two_way if options.two_way else one_euro
    out[ok] = smooth(pts / scale, times, options.min_cutoff, options.beta, options.d_cutoff) * scale
    return out.astype(np.float32)


def frame_target(name: str, image: np.ndarray, landmarks: np.ndarray, res: int, focal_px: float,
                 dense: np.ndarray | None = None, dense_weights: np.ndarray | None = None,
                 detected: bool = False) -> Target:
    """A frame prepared for fitting as fit.prepare_target does a photo (same crop, mask, intrinsics and
    dense points; detected landmarks weigh the recipe's detector_trust)."""
    box = detect.square_box(landmarks)
    crop = detect.crop_image(image, box, res)
    lmk_crop = detect.to_crop(landmarks, box, res).astype(np.float32)
    mask = polygon_mask(face_mask_polygon(lmk_crop), res)
    dense_crop = detect.to_crop(dense, box, res).astype(np.float32) if dense is not None else None
    return Target(Path(name), image, 1.0, box, crop, landmarks.astype(np.float32), lmk_crop, mask, focal_px, "clip",
                  dense_crop=dense_crop, dense_weights=dense_weights, detected=detected)


# ----------------------------------------------------------------------------- camera in a frame's crop
def crop_camera(trans: np.ndarray, focal_px: float, box: np.ndarray, image_size) -> torch.Tensor:
    """The pinhole camera 1 x 6 of a frame's crop that puts the model origin at trans = (tx, ty, distance)
    (metres) and has the clip's focal length (pixels): the inverse of losses.camera_translation."""
    f, px, py = crop_intrinsics(focal_px, box, image_size)
    tx, ty, dist = (float(v) for v in trans)
    return torch.tensor([[f / dist, tx, ty, f, px, py]], dtype=torch.float32)


def clip_intrinsics(focal_px: float, image_size) -> np.ndarray:
    """K (3, 3), original pixels: the clip's focal length, principal point at the frame centre."""
    h, w = image_size
    return np.array([[focal_px, 0.0, w / 2.0], [0.0, focal_px, h / 2.0], [0.0, 0.0, 1.0]], np.float32)


def opencv_extrinsics(trans: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """R (3, 3), t (3,) world-to-camera (OpenCV axes) of a model origin at trans = (tx, ty, distance), as
    camera.opencv_camera writes them."""
    return np.diag([1.0, -1.0, -1.0]).astype(np.float32), np.array([trans[0], -trans[1], trans[2]], np.float32)


def moving_camera_extrinsics(model: FlameModel, identity: Identity, values: dict) -> tuple[np.ndarray, np.ndarray]:
    """R (T, 3, 3), t (T, 3) of a camera moving around a head held still (global_pose 0) that sees what
    the fitted head-to-camera poses show. FLAME's global rotation G turns the whole posed head about
    the root joint J (v -> G (v - J) + J; J from the frame's shape and expression), so the head with
    global_pose 0 seen with R = R0 G, t = R0 (J - G J) + t0 projects exactly like the fitted one seen
    with opencv_extrinsics' R0, t0. values: name -> T x ... (exp, poses, trans), as fitted."""
    from scipy.spatial.transform import Rotation

    T = len(values["trans"])
    t_ = lambda a: torch.as_tensor(np.asarray(a, np.float32))  # noqa: E731
    zeros = torch.zeros(T, 3)
    with torch.no_grad():
        joints = model(t_(identity.shape)[None].expand(T, -1), t_(values["exp"]), zeros, zeros, zeros,
                       torch.zeros(T, 6), lean=True).joints  # the joints alone: no vertex is skinned
    root = joints[:, 0].double().numpy()  # T x 3, the root joint (its rest position: nothing turns it)
    G = Rotation.from_rotvec(values["global_pose"].astype(np.float64)).as_matrix()
    R0, _ = opencv_extrinsics(np.zeros(3))
    t0 = np.stack([opencv_extrinsics(t)[1] for t in values["trans"]]).astype(np.float64)
    R = R0 @ G
    t = (R0 @ (root - (G @ root[..., None])[..., 0])[..., None])[..., 0] + t0
    return R, t


# ----------------------------------------------------------------------------- per-frame records
FRAME_FIELDS = ("exp", "global_pose", "neck_pose", "jaw_pose", "eye_pose", "light", "trans", "box",
                "landmarks2d", "landmarks2d_target")


def record_from_result(result, trans: np.ndarray, seconds: float) -> dict:
    p = result.params
    rec = {n: getattr(p, n)[0].cpu().numpy().astype(np.float32) for n in ("exp", *POSES, "light")}
    rec.update(trans=trans.astype(np.float32), box=result.target.box.astype(np.float32),
               landmarks2d=result.landmarks2d, landmarks2d_target=result.landmarks2d_target,
               ok=np.bool_(True), landmark_rmse_px=np.float32(result.report["landmark_rmse_px"]),
               seconds=np.float32(seconds))
    return rec


def missing_record(n_exp: int) -> dict:
    nan = lambda *s: np.full(s, np.nan, np.float32)  # noqa: E731
    return {"exp": nan(n_exp), "global_pose": nan(3), "neck_pose": nan(3), "jaw_pose": nan(3), "eye_pose": nan(6),
            "light": nan(9, 3), "trans": nan(3), "box": nan(3), "landmarks2d": nan(68, 2),
            "landmarks2d_target": nan(68, 2), "ok": np.bool_(False), "landmark_rmse_px": np.float32(np.nan),
            "seconds": np.float32(0.0)}


def params_from_record(rec: dict, identity: Identity, cam: torch.Tensor, device) -> FitParams:
    t = lambda a: torch.as_tensor(np.asarray(a, np.float32), device=device)[None]  # noqa: E731
    return FitParams(shape=t(identity.shape), exp=t(rec["exp"]), global_pose=t(rec["global_pose"]),
                     neck_pose=t(rec["neck_pose"]), jaw_pose=t(rec["jaw_pose"]), eye_pose=t(rec["eye_pose"]),
                     cam=cam.to(device), light=t(rec["light"]), albedo=t(identity.albedo))


def history_from(records: list[dict], identity: Identity, device) -> dict[str, torch.Tensor]:
    """The temporal terms' history (losses: name -> H x 1 x K, most recent first) from the last two
    finished frames with a face (any focal length: the translation does not depend on it)."""
    hist: dict[str, list] = {}
    for rec in records[:2]:
        tx, ty, dist = (float(v) for v in rec["trans"])
        cam = torch.tensor([[1.0 / dist, tx, ty, 1.0, 0.0, 0.0]])
        for k, v in temporal_values(params_from_record(rec, identity, cam, device)).items():
            hist.setdefault(k, []).append(v)
    return {k: torch.stack(v) for k, v in hist.items()}


# ----------------------------------------------------------------------------- interpolation
def slerp_rotvec(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
    """Rotation between axis-angle a and b (3,) at fraction w in [0, 1] along the shortest arc."""
    from scipy.spatial.transform import Rotation

    ra, rb = Rotation.from_rotvec(a), Rotation.from_rotvec(b)
    rel = (ra.inv() * rb).as_rotvec()
    return (ra * Rotation.from_rotvec(w * rel)).as_rotvec().astype(np.float32)


def interpolate_missing(values: dict[str, np.ndarray], ok: np.ndarray) -> dict[str, np.ndarray]:
    """Fill the frames where ok is False (T,) from the nearest frames with a face on either side:
    linear in time for codes, translations and boxes, slerp for the rotations (ROTATIONS, and eye_pose
    as two); before the first / after the last good frame the nearest good one is held.
    values: name -> T x ... arrays; returns new arrays."""
    good = np.nonzero(ok)[0]
    if len(good) == 0:
        raise NoFaceError("no frame of the clip has a face; fix: check the video, or give --landmarks")
    out = {k: v.copy() for k, v in values.items()}
    for i in np.nonzero(~ok)[0]:
        after = good[good > i]
        before = good[good < i]
        lo = before[-1] if len(before) else after[0]
        hi = after[0] if len(after) else before[-1]
        w = 0.0 if hi == lo else (i - lo) / (hi - lo)
        for k, v in values.items():
            if k in ROTATIONS:
                out[k][i] = slerp_rotvec(v[lo], v[hi], w)
            elif k == "eye_pose":
                out[k][i] = np.concatenate([slerp_rotvec(v[lo, :3], v[hi, :3], w),
                                            slerp_rotvec(v[lo, 3:], v[hi, 3:], w)])
            else:
                out[k][i] = (1 - w) * v[lo] + w * v[hi]
    return out


# ----------------------------------------------------------------------------- resume folder
def _source_key(source: io.FrameSource, recipe: Recipe, model: FlameModel, landmarks_dir, detector: str) -> dict:
    st = source.path.stat()
    recipe_hash = hashlib.sha256(json.dumps(recipe.raw, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"format": FORMAT, "source": str(source.path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "files": len(source.files), "start": source.start, "end": source.end, "every": source.every,
            "recipe": recipe_hash, "model": model.tag, "detector": detector,
            "landmarks": str(Path(landmarks_dir).resolve()) if landmarks_dir is not None else None}


def _write_json_atomic(path: Path, obj) -> None:
    text = json.dumps(io._finite(obj), indent=2, default=io._jsonable, allow_nan=False) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode()))


def _save_npz(path: Path, arrays: dict) -> None:
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def _load_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


class PartialDir:
    """DIR/.partial: meta.json (what is being tracked), detections.npz, identity.npz, frames/NNNNNN.npz."""

    def __init__(self, out_dir: Path, key: dict):
        self.root = Path(out_dir) / PARTIAL
        self.resumed = False
        meta = self.root / "meta.json"
        if self.root.exists():
            try:
                same = json.loads(meta.read_text()) == json.loads(json.dumps(key))
            except (OSError, ValueError):
                same = False
            if same:
                self.resumed = True
            else:  # another clip, selection, recipe or model: start over
                shutil.rmtree(self.root)
        (self.root / "frames").mkdir(parents=True, exist_ok=True)
        if not self.resumed:
            _write_json_atomic(meta, key)

    def load_detections(self) -> Detections | None:
        path = self.root / "detections.npz"
        if not path.is_file():
            return None
        d = _load_npz(path)
        return Detections(d["indices"], [str(n) for n in d["names"]], d["sizes"], d["landmarks"], d["raw"],
                          d["seconds"], json.loads(str(d["warnings"])), bool(d["detected"]), d.get("dense"),
                          d.get("dense_weights"), float(d["exposure"]), bool(d["brightened"]))

    def save_detections(self, det: Detections) -> None:
        dense = {} if det.dense is None else {"dense": det.dense, "dense_weights": det.dense_weights}
        _save_npz(self.root / "detections.npz", {
            "indices": det.indices, "names": np.array(det.names), "sizes": det.sizes, "landmarks": det.landmarks,
            "raw": det.raw, "seconds": det.seconds, "warnings": np.array(json.dumps(det.warnings)),
            "detected": np.bool_(det.detected), "exposure": np.float64(det.exposure),
            "brightened": np.bool_(det.brightened), **dense})

    def load_identity(self) -> tuple[Identity, float, str, list[str], dict[str, np.ndarray]] | None:
        """(identity, focal px, its source, warnings, person_points' arrays)."""
        path = self.root / "identity.npz"
        if not path.is_file():
            return None
        d = _load_npz(path)
        ident = Identity(d["shape"], d["albedo"], [str(n) for n in d["images"]], "shared", 0.0)
        person = {k[len("person_"):]: v for k, v in d.items() if k.startswith("person_")}
        return ident, float(d["focal_px"]), str(d["focal_source"]), [str(w) for w in d["warnings"]], person

    def save_identity(self, ident: Identity, focal_px: float, focal_source: str, warnings: list[str],
                      person: dict[str, np.ndarray]) -> None:
        _save_npz(self.root / "identity.npz", {
            "shape": ident.shape.astype(np.float32), "albedo": ident.albedo.astype(np.float32),
            "images": np.array(ident.images), "focal_px": np.float64(focal_px), "focal_source": np.array(focal_source),
            "warnings": np.array(warnings, dtype=str), **{f"person_{k}": v for k, v in person.items()}})

    def frame_path(self, k: int) -> Path:
        return self.root / "frames" / f"{k:06d}.npz"

    def load_frame(self, k: int) -> dict | None:
        path = self.frame_path(k)
        if not path.is_file():
            return None
        try:
            return _load_npz(path)
        except (OSError, ValueError, EOFError):  # cannot happen with atomic writes, but never trust a leftover
            return None

    def save_frame(self, k: int, rec: dict) -> None:
        _save_npz(self.frame_path(k), rec)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# ----------------------------------------------------------------------------- the track
@dataclass
class Track:
    """The tracked clip, as track.npz holds it (arrays first axis T), plus track.json's report."""

    arrays: dict[str, np.ndarray]
    report: dict
    boxes: np.ndarray  # T x 3 crop boxes (interpolated where no face), for rendering
    lights: np.ndarray  # T x 9 x 3
    fitted_frames: int = 0  # frames fitted in this run (the others came from .partial)
    warnings: list[str] = field(default_factory=list)
    values: dict[str, np.ndarray] = field(default_factory=dict)  # per frame as fitted: exp, poses, trans (the
    # head relative to the camera, whichever camera mode wrote the arrays), for rendering


def pick_keyframes(ok: np.ndarray, k: int) -> np.ndarray:
    """k frames with a face spread evenly over the clip (always including the first one)."""
    good = np.nonzero(ok)[0]
    return np.unique(good[np.linspace(0, len(good) - 1, min(k, len(good))).round().astype(int)])


def fit_keyframe_identity(setups: TrackSetups, targets: list[Target], progress: Progress | None):
    """Identity over the keyframes: the key_* LM stages per keyframe, then the key_* Adam stages
    jointly (fitset.fit_identity, shared shape). Returns (Identity, per-keyframe FitResults)."""
    first = fit_targets(setups.keyframe, targets, progress) if setups.keyframe.recipe.stages else None
    start = FitParams.cat([r.params for r in first]) if first else None
    return fit_identity(targets, setups.joint, "shared", batch_size=len(targets), progress=progress,
                        initializer=(lambda _: start) if start is not None else None)


def person_points(setup: FitSetup, det: Detections, keys: np.ndarray, key_results: list[FitResult]
                  ) -> dict[str, np.ndarray]:
    """Where the detector's points sit on this person's head, from the keyframes' fits and detections
    (priors.dense_embedding.refit_embedding): MediaPipe's dense points but the iris ("dense_faces",
    "dense_bary"), when the frames weigh them, and the 51 inner points of the 68 ("static_faces",
    "static_bary"; the jaw's contour follows the silhouette and is not moved), each with how far its
    points moved on the template ("dense_moved_mm", "static_moved_mm"). Empty for landmark files (they
    are exact)."""
    if not det.detected:
        return {}
    from priors.dense_embedding import (IRIS, dense_embedding_for, dense_weights, model_mesh, refit_embedding,
                                        surface_points)

    model = setup.model
    template, faces = model_mesh(model)
    posed = np.stack([r.vertices @ r.R.T + r.t for r in key_results])
    K = np.stack([r.K for r in key_results])
    part = model.weights.cpu().numpy()[faces].mean(1).argmax(1)  # the joint that moves each triangle most
    out = {}

    def refit(name: str, face: np.ndarray, bary: np.ndarray, points: np.ndarray, weights: np.ndarray) -> None:
        out[f"{name}_faces"], out[f"{name}_bary"] = refit_embedding(face, bary, template, faces, posed, K, points,
                                                                    weights, labels=part)
        moved = surface_points(template, faces, out[f"{name}_faces"], out[f"{name}_bary"]) - \
            surface_points(template, faces, face, bary)
        out[f"{name}_moved_mm"] = (1000.0 * np.linalg.norm(moved, axis=1)).astype(np.float32)

    if model.has_landmarks:
        points = det.landmarks[keys][:, 17:]
        refit("static", model.static_faces.cpu().numpy(), model.static_bary.cpu().numpy(), points,
              np.isfinite(points).all(-1).astype(np.float64))
    if det.dense is not None and setup.recipe.uses("dense_landmark"):
        emb = dense_embedding_for(model)
        weights = det.dense_weights[keys] * dense_weights(emb)[None]
        weights[:, list(IRIS)] = 0.0  # the keyframes do not fit the gaze: the iris points stay
        refit("dense", emb.faces, emb.bary, det.dense[keys], weights)
    return out


def person_points_report(points: dict[str, np.ndarray]) -> dict:
    """track.json's summary of person_points: per point set, the mean and largest move (mm)."""
    return {name: {"points": int(points[f"{name}_moved_mm"].size),
                   "mean_move_mm": round(float(points[f"{name}_moved_mm"].mean()), 2),
                   "max_move_mm": round(float(points[f"{name}_moved_mm"].max()), 2)}
            for name in ("static", "dense") if f"{name}_moved_mm" in points}


def use_person_points(setup: FitSetup, points: dict[str, np.ndarray]) -> None:
    """Make the setup's model evaluate person_points' places (from now on: call it on a model of its own)."""
    if "static_faces" in points:
        setup.model.place_static_landmarks(points["static_faces"], points["static_bary"])
    if "dense_faces" in points:
        from priors.dense_embedding import dense_embedding_for

        emb = dense_embedding_for(setup.model)
        use_dense_embedding(setup, replace(emb, faces=points["dense_faces"], bary=points["dense_bary"]))


def track_video(source, out_dir, recipe: str | Recipe = "track", model=None, landmarks=None, detector: str = "auto",
                device: str = "cpu", start: int = 0, end: int | None = None, every: int = 1,
                progress: Progress | None = None, on_frame: Callable[[int, dict], None] | None = None,
                overrides=()) -> Track:
    """Track a video file or a folder of frames; finished frames go to out_dir/.partial as they are done
    (so a rerun resumes). progress(stage, i, total, losses): 'read' per frame, the keyframe stages, then
    'track' per frame with its landmark error (px). on_frame(k, record) after each newly fitted frame."""
    started = time.perf_counter()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    flame = load_flame(model, device)
    if flame is model:  # use_person_points moves points on the model: not on the caller's
        flame = copy.deepcopy(flame)
    setups = track_setups(flame, recipe, device)
    src = source if isinstance(source, io.FrameSource) else io.FrameSource(source, start, end, every)
    lmk_dir = Path(landmarks) if landmarks is not None else None
    if lmk_dir is not None and not lmk_dir.is_dir():
        raise UsageError(f"--landmarks {lmk_dir}: track needs a folder of <frame>.pts/.npy/.json files")
    partial = PartialDir(Path(out_dir), _source_key(src, recipe, flame, lmk_dir, detector))
    res = recipe.resolution

    det = partial.load_detections()
    if det is None:
        det = read_detections(src, lmk_dir, detector, device, setups.options, progress)
        partial.save_detections(det)
    ok = det.ok
    if not ok.any():
        raise NoFaceError(f"{src.path}: no frame of the clip has a face; fix: check the video, or give --landmarks")
    size = tuple(int(v) for v in det.sizes[ok][0])
    T = len(det.names)

    loaded = partial.load_identity()
    if loaded is None:
        focal_px, focal_source = default_focal_px(*size), "default"
        keys = pick_keyframes(ok, setups.options.keyframes)
        wanted = set(det.indices[keys].tolist())
        images = {int(f.index): f.image for f in src if f.index in wanted}
        targets = [det.target(k, images[int(det.indices[k])], res, focal_px) for k in keys]
        identity, key_results = fit_keyframe_identity(setups, targets, progress)
        if setups.options.focal == "keyframes":
            focal_px = float(np.median([r.K[0, 0] for r in key_results]))
            focal_source = "keyframes"
        warnings = list(dict.fromkeys(setups.frame.warnings))
        person = person_points(setups.frame, det, keys, key_results) if setups.options.person_points else {}
        partial.save_identity(identity, focal_px, focal_source, warnings, person)
    else:
        identity, focal_px, focal_source, warnings, person = loaded
    use_person_points(setups.frame, person)

    records: list[dict] = []
    fitted = 0
    history: list[dict] = []  # finished frames with a face, most recent first
    for k, frame in enumerate(src):
        if k >= T:
            break
        rec = partial.load_frame(k)
        if rec is None:
            rec = fit_one_frame(setups.frame, frame, det, k, identity, history, focal_px, size, res)
            partial.save_frame(k, rec)
            fitted += 1
            if on_frame is not None:
                on_frame(k, rec)
        records.append(rec)
        if bool(rec["ok"]):
            history.insert(0, rec)
            del history[2:]
        if progress is not None:
            err = float(rec["landmark_rmse_px"])
            progress("track", k + 1, T, {"lmk_px": err} if np.isfinite(err) else {"no face": 1.0})
    if len(records) != T:
        raise UsageError(f"{src.path}: the clip gave {len(records)} frames on a second read, {T} the first time; "
                         "fix: do not change the input while tracking")
    track = assemble(flame, recipe, src, det, identity, records, focal_px, focal_source, res, warnings,
                     time.perf_counter() - started, setups.options.camera)
    track.fitted_frames = fitted
    track.report["resumed"] = partial.resumed
    track.report["person_points"] = person_points_report(person)
    track.report["detections"] = {"face_exposure": None if np.isnan(det.exposure) else round(det.exposure, 3),
                                  "brightened": det.brightened}
    return track


def fit_one_frame(setup: FitSetup, frame: io.FrameRead, det: Detections, k: int, identity: Identity,
                  history: list[dict], focal_px: float, size, res: int) -> dict:
    """Fit frame k (its landmarks from det) warm-started from the last finished frame with a face."""
    if not det.ok[k] or frame.image is None:
        return missing_record(setup.model.n_exp)
    start = time.perf_counter()
    target = det.target(k, frame.image, res, focal_px)
    device = setup.device
    if history:
        init = params_from_record(history[0], identity, crop_camera(history[0]["trans"], focal_px, target.box, size),
                                  device)
    else:  # the track's first face: a fresh start (neutral expression, camera from the landmarks)
        init = initial_params(setup, stack_targets([target], setup.recipe.landmark_weights, device))
        init.shape = torch.as_tensor(identity.shape, device=device)[None]
        init.albedo = torch.as_tensor(identity.albedo, device=device)[None]
    # the history goes into the setup's own extra (not a copy), so that what fit_targets caches there
    # once (the dense embedding's confidence) serves every frame
    setup.extra["history"] = history_from(history, identity, device)
    result = fit_targets(setup, [target], init=init)[0]
    trans = camera_translation(result.params.cam)[0].cpu().numpy()  # with the clip's focal length: see crop_camera
    return record_from_result(result, trans, time.perf_counter() - start + float(det.seconds[k]))


def frame_params(identity: Identity, values: dict, light: np.ndarray, k: int, focal_px: float, box, size,
                 device) -> FitParams:
    rec = {n: values[n][k] for n in ("exp", *POSES)}
    rec["light"] = light
    return params_from_record(rec, identity, crop_camera(values["trans"][k], focal_px, box, size), device)


def assemble(model: FlameModel, recipe: Recipe, src: io.FrameSource, det: Detections, identity: Identity,
             records: list[dict], focal_px: float, focal_source: str, res: int, warnings: list[str],
             seconds: float, camera: str = "fixed") -> Track:
    ok = np.array([bool(r["ok"]) for r in records])
    values = {n: np.stack([r[n] for r in records]) for n in ("exp", *POSES, "trans", "box")}
    values = interpolate_missing(values, ok)
    lights = np.stack([r["light"] for r in records])
    lights = interpolate_missing({"light": lights.reshape(len(records), -1)}, ok)["light"].reshape(lights.shape)
    size = tuple(int(v) for v in det.sizes[ok][0])
    lmk = np.stack([r["landmarks2d"] for r in records])
    for k in np.nonzero(~ok)[0]:  # the interpolated head's landmarks
        p = frame_params(identity, values, lights[k], k, focal_px, values["box"][k], size, "cpu")
        with torch.no_grad():
            pred = synthesize(model.to("cpu"), p, res, render=False)
        lmk[k] = detect.from_crop(pred["landmarks2d"][0].numpy(), values["box"][k], res)
    if camera == "moving":
        Rs, ts = moving_camera_extrinsics(model.to("cpu"), identity, values)
        poses = {**values, "global_pose": np.zeros_like(values["global_pose"])}
    else:
        Rs, ts = (np.stack(a) for a in zip(*(opencv_extrinsics(t) for t in values["trans"]), strict=True))
        poses = values
    frames = det.indices.astype(np.int64) if src.kind == "video" else np.array(det.names)
    arrays = {
        "shape": identity.shape.astype(np.float32), "albedo": identity.albedo.astype(np.float32),
        **{n: poses[n].astype(np.float32) for n in ("exp", *POSES)},
        "R": Rs.astype(np.float32), "t": ts.astype(np.float32), "landmarks2d": lmk.astype(np.float32),
        "landmarks2d_target": np.stack([r["landmarks2d_target"] for r in records]).astype(np.float32),
        "frame_ok": ok, "K": clip_intrinsics(focal_px, size), "fps": np.float32(src.fps), "frames": frames,
        "model": np.array(model.tag), "recipe": np.array(recipe.name),
    }
    per_frame = []
    all_warnings = list(warnings)
    for k, r in enumerate(records):
        err = float(r["landmark_rmse_px"])
        notes = list(det.warnings[k])
        if not ok[k]:
            notes.append("no face: parameters interpolated from the neighbouring frames")
        per_frame.append({"frame": det.names[k], "index": int(det.indices[k]), "ok": bool(ok[k]),
                          "landmark_rmse_px": round(err, 3) if np.isfinite(err) else None,
                          "seconds": round(float(r["seconds"]), 3), **({"warnings": notes} if notes else {})})
        all_warnings += det.warnings[k]
    errs = np.array([float(r["landmark_rmse_px"]) for r in records])
    report = {
        "source": str(src.path), "kind": src.kind, "frames": len(records), "frames_ok": int(ok.sum()),
        "fps": round(float(src.fps), 4), "model": model.tag, "recipe": recipe.name,
        "camera": {"focal_px": round(float(focal_px), 2), "focal_source": focal_source, "mode": camera},
        "keyframes": identity.images, "seconds": round(seconds, 3),
        "landmark_rmse_px_mean": round(float(np.nanmean(errs)), 3) if ok.any() else None,
        "per_frame": per_frame, **({"warnings": all_warnings} if all_warnings else {}),
    }
    return Track(arrays, report, values["box"], lights, warnings=all_warnings, values=values)


# ----------------------------------------------------------------------------- outputs
def write_track_outputs(out_dir, track: Track, model: FlameModel, source: io.FrameSource, overlay: bool = True,
                        progress: Progress | None = None) -> Path:
    """DIR/track.npz and DIR/track.json (atomically), DIR/overlay.mp4 (input | fitted head); then the
    .partial folder is removed (the track is complete)."""
    out = Path(out_dir)
    _save_npz(out / "track.npz", track.arrays)
    _write_json_atomic(out / "track.json", track.report)
    if overlay:
        io.write_video(out / "overlay.mp4", overlay_frames(model, track, source, progress), float(track.arrays["fps"]))
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    return out


def overlay_frames(model: FlameModel, track: Track, src: io.FrameSource, progress: Progress | None = None,
                   max_height: int = 512):
    """input | grey fitted head over the input with landmarks (target green, fitted red), per frame."""
    from .outputs import render_on_photo

    a = track.arrays
    ident = Identity(a["shape"], a["albedo"], [], "shared", 0.0)
    K = a["K"]
    size = (round(K[1, 2] * 2), round(K[0, 2] * 2))
    focal = float(K[0, 0])
    values = track.values  # the head relative to the camera, as fitted (a moving camera's arrays hold it still)
    T = len(a["frame_ok"])
    for k, frame in enumerate(src):
        if k >= T:
            break
        photo = frame.image if frame.image is not None and frame.image.shape[:2] == size else \
            np.full((*size, 3), 60, np.uint8)
        params = frame_params(ident, values, track.lights[k], k, focal, track.boxes[k], size, model.faces.device)
        head = render_on_photo(model, params, photo, track.boxes[k], grey=True, opacity=0.8)
        r = max(1, round(max(size) / 300))
        if a["frame_ok"][k]:
            head = io.draw_points(head, a["landmarks2d_target"][k], color=(0, 255, 0), radius=r)
        head = io.draw_points(head, a["landmarks2d"][k], color=(255, 40, 40), radius=r)
        panel = io.hstack_images([photo, head])
        if panel.shape[0] > max_height:
            import cv2

            scale = max_height / panel.shape[0]
            panel = cv2.resize(panel, (round(panel.shape[1] * scale), max_height), interpolation=cv2.INTER_AREA)
        if progress is not None:
            progress("overlay", k + 1, T, {})
        yield panel

