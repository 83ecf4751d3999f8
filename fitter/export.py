"""Export a fit or a track to the tools people animate with: glTF 2.0 binary (GLB), or plain
OBJ / PLY meshes per frame.

The GLB holds the identity's head in the rest pose (template + shape blendshapes) and maps
FLAME onto glTF almost one to one:

* **skin**: FLAME's joints as nodes (hierarchy from ``parents``; rest positions regressed from
  the shaped template), inverse bind matrices, per-vertex JOINTS_0 / WEIGHTS_0 (the 4 largest
  LBS weights per vertex, renormalised; FLAME and the stand-in have at most 3 non-zero);
* **morph targets**: one per expression coefficient (POSITION deltas = the expression
  blendshape), named in ``mesh.extras.targetNames``; with ``morph="split"`` two per
  coefficient (``exp_007+`` with the blendshape, ``exp_007-`` with its negative), each scaled so
  that its animated weight stays in [0, 1] (scales in ``mesh.extras.targetScales``), for tools
  that clamp shape-key values (Blender's glTF importer does: see `split_targets`);
* **pose correctives** (``correctives="bake"``, the default): FLAME's ``posedirs`` are vertex
  offsets linear in the pose feature (the entries of R_j - I for the joints after the root,
  9 (J - 1) of them) added before skinning, exactly like blendshapes; they become 9 (J - 1)
  more morph targets (``pose_000`` ...) whose animated weights are that feature at each frame.
  Playback is then exact. What glTF cannot express is the *dependence* on the pose: posing the
  bones by hand (in Blender, say) does not update them. ``correctives="drop"`` leaves them out
  and the export report measures the loss at the exported frames (max / mean mm). Models whose
  posedirs are all zero (the ICT stand-in) get no such targets either way;
* **animation**: one keyframe per frame at the clip's fps: joint rotations (quaternions from
  the axis-angle poses), joint translations and morph weights (the expression coefficients,
  and the pose features of baked correctives).

The translation channels are there because FLAME regresses its joints from the mesh *with*
the expression (``lbs`` blends shape and expression before regressing joints), so the joints
move a little with the expression. With the rest joints J0 (shape only), the frame's joints
J(t), dJ = J(t) - J0 and the frame's local rotations R, the node translation
``J_j - J_parent - R_j dJ_j + dJ_parent`` (root: ``J_0 - R_0 dJ_0``) makes glTF's joint
matrix (node world transform x inverse bind matrix) equal FLAME's skinning transform exactly.

The OBJ / PLY meshes are full FLAME evaluations, correctives included. Expression morph
targets carry POSITION deltas only: normals are the rest pose's (skinned, not morphed).

Colours: per-vertex albedo goes to COLOR_0 converted from the fit's (photo, sRGB-like) values
to linear, as glTF defines COLOR_0; a texture-space albedo goes in as its texture PNG
(sRGB, as glTF's baseColorTexture) with TEXCOORD_0 (vertices split along UV seams).

Coordinates: model space, metres, y up, +z towards the camera: glTF's own axes. The fit's
camera (K, R, t) is not exported.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from priors.assets import atomic_write
from priors.errors import UsageError
from priors.flame import FlameModel, lbs
from priors.flame import vertices2joints

from . import io
from .params import FitParams, load_fit
from .shading import vertex_normals

__all__ = ["FORMATS", "JOINT_NAMES", "Clip", "ExportReport", "axis_angle_to_quat", "blend_targets", "continuous_quats",
           "corrective_gap_mm", "export_clip", "export_file", "gltf_bytes", "iter_posed", "load_clip", "pose_features",
           "posed_vertices", "rest_skeleton", "split_targets", "split_uv_seams", "srgb_to_linear", "top_weights"]

FORMATS = ("glb", "obj", "ply")
MORPH_MODES = ("signed", "split")
CORRECTIVE_MODES = ("bake", "drop")
JOINT_NAMES = ("root", "neck", "jaw", "left_eye", "right_eye")  # FLAME's 5 joints
POSE_KEYS = ("global_pose", "neck_pose", "jaw_pose", "eye_pose")
TRACK_KEYS = ("shape", "exp", *POSE_KEYS, "fps")
MAX_INFLUENCES = 4  # JOINTS_0 / WEIGHTS_0 hold 4 per vertex
_FIX_INPUT = "fix: pass a fit.npz written by `cli.py fit` or a track.npz written by `cli.py track`"
_FIX_MODEL = "fix: pass the model it was made with (--model PATH)"

# glTF constants
_FLOAT, _UINT, _USHORT, _UBYTE = 5126, 5125, 5123, 5121
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_N_COMPONENTS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}
_DTYPES = {_FLOAT: np.float32, _UINT: np.uint32, _USHORT: np.uint16, _UBYTE: np.uint8}


# ----------------------------------------------------------------------------- input
@dataclass
class Clip:
    """A fit (T = 1) or a track (T frames), as export reads it.

    shape (n_shape,), exp T x n_exp, global_pose / neck_pose / jaw_pose T x 3, eye_pose T x 6
    (axis-angle), fps (keyframes per second; 1 for a fit), albedo (V, 3) per-vertex or (K,)
    texture-space coefficients or None, model: the tag recorded in the file ('' if none),
    n_verts: the vertex count the file implies (its vertices or per-vertex albedo) or None.
    """

    source: Path
    kind: str  # 'fit' | 'track'
    shape: np.ndarray
    exp: np.ndarray
    global_pose: np.ndarray
    neck_pose: np.ndarray
    jaw_pose: np.ndarray
    eye_pose: np.ndarray
    fps: float
    albedo: np.ndarray | None
    model: str
    n_verts: int | None

    @property
    def n_frames(self) -> int:
        return int(self.exp.shape[0])

    def pose(self) -> np.ndarray:
        """T x 15 full pose in FLAME's joint order (root, neck, jaw, left eye, right eye)."""
        return np.concatenate([self.global_pose, self.neck_pose, self.jaw_pose, self.eye_pose], axis=1)


def _read_npz(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UsageError(f"{path}: not a readable .npz ({type(exc).__name__}); {_FIX_INPUT}") from None


def _implied_verts(content: dict) -> int | None:
    vertices, albedo = content.get("vertices"), content.get("albedo")
    if isinstance(vertices, np.ndarray) and vertices.ndim == 2:
        return int(vertices.shape[0])
    if isinstance(albedo, np.ndarray) and albedo.ndim == 2:
        return int(albedo.shape[0])
    return None


def _track_clip(path: Path, content: dict) -> Clip:
    missing = [k for k in TRACK_KEYS if k not in content]
    if missing:
        raise UsageError(f"{path}: track.npz lacks {', '.join(missing)}; fix: re-run `cli.py track`")
    arrays = {}
    for key in TRACK_KEYS:
        try:
            arrays[key] = np.asarray(content[key], dtype=np.float64)
        except (TypeError, ValueError):
            raise UsageError(f"{path}: key '{key}' is not numeric (dtype {content[key].dtype}); fix: re-run "
                             "`cli.py track`") from None
    if arrays["shape"].ndim != 1:
        raise UsageError(f"{path}: key 'shape' has shape {arrays['shape'].shape}, a track has one identity "
                         "(n_shape,); fix: re-run `cli.py track`")
    exp = arrays["exp"]
    if exp.ndim != 2 or exp.shape[0] < 1:
        raise UsageError(f"{path}: key 'exp' has shape {exp.shape}, a track needs (T, n_exp); {_FIX_INPUT}")
    n = exp.shape[0]
    for key, width in (("global_pose", 3), ("neck_pose", 3), ("jaw_pose", 3), ("eye_pose", 6)):
        if arrays[key].shape != (n, width):
            raise UsageError(f"{path}: key '{key}' has shape {arrays[key].shape}, expected ({n}, {width}) "
                             f"for {n} frames; fix: re-run `cli.py track`")
    fps = float(arrays["fps"].reshape(-1)[0]) if arrays["fps"].size == 1 else float("nan")
    if not np.isfinite(fps) or fps <= 0:
        raise UsageError(f"{path}: key 'fps' is {content['fps']!r}, not a positive number; fix: re-run `cli.py track`")
    for key in TRACK_KEYS:
        if not np.isfinite(arrays[key]).all():
            raise UsageError(f"{path}: key '{key}' holds NaN or inf; fix: re-run `cli.py track`")
    albedo = content.get("albedo")
    return Clip(path, "track", arrays["shape"], exp, arrays["global_pose"], arrays["neck_pose"],
                arrays["jaw_pose"], arrays["eye_pose"], fps,
                None if albedo is None else np.asarray(albedo, np.float32), str(content.get("model", "")),
                _implied_verts(content))


def load_clip(path: str | Path) -> Clip:
    """Read a fit.npz (one keyframe) or a track.npz (contract schema) -> Clip.

    Raises UsageError (one line naming the file and the fix) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file; {_FIX_INPUT}")
    content = _read_npz(path)
    exp = content.get("exp")
    if "fps" in content or (isinstance(exp, np.ndarray) and exp.ndim == 2):
        return _track_clip(path, content)
    if not all(n in content for n in FitParams.names()):
        keys = ", ".join(sorted(content)[:8]) or "none"
        raise UsageError(f"{path}: neither a fit.npz nor a track.npz (its keys: {keys}); {_FIX_INPUT}")
    params, extras = load_fit(path)
    p = {n: v[0].numpy().astype(np.float64)[None] for n, v in params.items()}
    albedo = params.albedo[0].numpy()
    return Clip(path, "fit", p["shape"][0], p["exp"], p["global_pose"], p["neck_pose"], p["jaw_pose"],
                p["eye_pose"], 1.0, albedo, str(extras.get("model", "")), _implied_verts({**extras, "albedo": albedo}))


def check_clip(clip: Clip, model: FlameModel) -> None:
    """UsageError unless the clip was made with `model`: vertex count, coefficient counts, tag."""
    if clip.n_verts is not None and clip.n_verts != model.n_verts:
        raise UsageError(f"{clip.source}: made for a model with {clip.n_verts} vertices, the model in use has "
                         f"{model.n_verts}; {_FIX_MODEL}")
    if model.n_joints != len(JOINT_NAMES):
        raise UsageError(f"{model.name}: {model.n_joints} joints, FLAME has {len(JOINT_NAMES)} (root, neck, jaw, "
                         "eyes); fix: use a FLAME-format model")
    n_shape, n_exp = clip.shape.shape[0], clip.exp.shape[1]
    if n_shape != model.n_shape or n_exp != model.n_exp:
        raise UsageError(f"{clip.source}: {n_shape} shape / {n_exp} expression coefficients, the model has "
                         f"{model.n_shape} / {model.n_exp}; {_FIX_MODEL}")
    if clip.model and clip.model != model.tag:
        raise UsageError(f"{clip.source}: made with model '{clip.model}', the model in use is '{model.tag}'; "
                         f"{_FIX_MODEL}")


# ----------------------------------------------------------------------------- maths
def axis_angle_to_quat(aa: np.ndarray) -> np.ndarray:
    """Axis-angle N x 3 -> unit quaternions N x 4 in glTF's order (x, y, z, w)."""
    aa = np.asarray(aa, dtype=np.float64).reshape(-1, 3)
    angle = np.linalg.norm(aa, axis=1, keepdims=True)
    half = 0.5 * angle
    # sin(a/2)/a, with its series near 0 (1/2 - a^2/48)
    k = np.where(angle > 1e-8, np.sin(half) / np.maximum(angle, 1e-300), 0.5 - angle**2 / 48.0)
    return np.concatenate([aa * k, np.cos(half)], axis=1)


def continuous_quats(q: np.ndarray) -> np.ndarray:
    """Flip signs along a T x 4 quaternion sequence so neighbours lie in one hemisphere
    (q and -q are the same rotation; interpolation between keyframes takes the short way)."""
    q = np.array(q, dtype=np.float64)
    for i in range(1, len(q)):
        if np.dot(q[i], q[i - 1]) < 0:
            q[i] = -q[i]
    return q


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """Unit quaternions N x 4 (x, y, z, w) -> rotation matrices N x 3 x 3."""
    x, y, z, w = np.asarray(q, dtype=np.float64).reshape(-1, 4).T
    return np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
                     2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
                     2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], axis=1).reshape(-1, 3, 3)


def pose_features(pose: np.ndarray) -> np.ndarray:
    """FLAME's pose-corrective feature: full poses T x (J * 3) axis-angle -> T x 9 (J - 1), the
    entries of R_j - I (row-major) for joints 1 .. J - 1, the weights of the posedirs rows."""
    T = pose.shape[0]
    R = quat_to_matrix(axis_angle_to_quat(pose.reshape(-1, 3))).reshape(T, -1, 3, 3)
    return (R[:, 1:] - np.eye(3)).reshape(T, -1)


def top_weights(weights: np.ndarray, k: int = MAX_INFLUENCES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k largest skinning weights per vertex, renormalised to sum 1.

    weights V x J -> joints V x k (int), weights V x k (float32), dropped V (the weight sum left out
    before renormalising; 0 where a vertex has <= k non-zero weights). J < k pads with joint 0 weight 0."""
    w = np.asarray(weights, dtype=np.float64)
    V, J = w.shape
    if J < k:
        w = np.concatenate([w, np.zeros((V, k - J))], axis=1)
    order = np.argsort(-w, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(w, order, axis=1)
    total = w.sum(axis=1)
    dropped = np.clip(total - top.sum(axis=1), 0.0, None)
    norm = top.sum(axis=1, keepdims=True)
    top = np.where(norm > 0, top / np.where(norm > 0, norm, 1.0), 0.0)
    order = np.where((order < J) & (top > 0), order, 0)  # unused slots point at joint 0 (glTF validators ask)
    return order.astype(np.int64), top.astype(np.float32), dropped


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] -> linear (the IEC 61966-2-1 curve)."""
    c = np.clip(np.asarray(c, dtype=np.float64), 0.0, 1.0)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def split_uv_seams(faces: np.ndarray, ft: np.ndarray, vt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One glTF vertex per distinct (vertex, UV) corner pair.

    faces F x 3 and ft F x 3 (indices into vt T x 2) -> src N (the model vertex of each new
    vertex), uv N x 2 (OBJ convention, v up) and new faces F x 3 into the N vertices."""
    faces, ft = np.asarray(faces, np.int64), np.asarray(ft, np.int64)
    keys = faces.reshape(-1) * (int(len(vt)) + 1) + ft.reshape(-1)
    unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    src = faces.reshape(-1)[first]
    uv = np.asarray(vt, dtype=np.float32)[ft.reshape(-1)[first]]
    return src, uv, inverse.reshape(faces.shape).astype(np.int64)


def rest_skeleton(model: FlameModel, shape: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The identity in the rest pose: shape (n_shape,) -> vertices V x 3 (template + shape
    blendshapes) and joints J x 3 regressed from them (float64)."""
    with torch.no_grad():
        s = torch.as_tensor(np.asarray(shape), dtype=model.dirs.dtype, device=model.dirs.device)
        v = model.v_template + torch.einsum("k,vck->vc", s, model.dirs[:, :, : model.n_shape])
        joints = vertices2joints(model.J_regressor, v[None])[0]
    return v.double().cpu().numpy(), joints.double().cpu().numpy()


def clip_joints(model: FlameModel, clip: Clip) -> np.ndarray:
    """Each frame's rest joints (regressed from template + shape + that frame's expression): T x J x 3."""
    with torch.no_grad():
        dirs = model.dirs.double().cpu()
        coeffs = torch.cat([torch.as_tensor(clip.shape)[None].expand(clip.n_frames, -1),
                            torch.as_tensor(clip.exp)], dim=1)
        v = model.v_template.double().cpu()[None] + torch.einsum("bk,vck->bvc", coeffs, dirs)
        return vertices2joints(model.J_regressor.double().cpu(), v).numpy()


def _posed_chunks(model: FlameModel, clip: Clip, correctives: bool = True, chunk: int = 16):
    """FLAME's posed vertices, `chunk` frames at a time: yields T' x V x 3 (float64)."""
    dd = lambda t: t.double().cpu()
    buffers = dd(model.v_template), dd(model.dirs), dd(model.J_regressor), dd(model.weights)
    posedirs = dd(model.posedirs) if correctives else torch.zeros_like(dd(model.posedirs))
    pose = clip.pose()
    for a in range(0, clip.n_frames, chunk):
        b = min(a + chunk, clip.n_frames)
        # no_grad only around the computation, never across a yield: grad mode is global, and two
        # interleaved generators would otherwise restore each other's state and leave it off
        with torch.no_grad():
            coeffs = torch.cat([torch.as_tensor(clip.shape)[None].expand(b - a, -1), torch.as_tensor(clip.exp[a:b])],
                               dim=1)
            verts, _ = lbs(coeffs, torch.as_tensor(pose[a:b]), buffers[0], buffers[1], posedirs, buffers[2],
                           model.parents.cpu(), buffers[3])
        yield verts.numpy()


def iter_posed(model: FlameModel, clip: Clip, correctives: bool = True):
    """FLAME's posed vertices frame by frame: yields V x 3 (float64, model space, no camera)."""
    for block in _posed_chunks(model, clip, correctives):
        yield from block


def posed_vertices(model: FlameModel, clip: Clip, correctives: bool = True) -> np.ndarray:
    """FLAME's posed vertices of every frame: T x V x 3 (float64, model space, no camera).
    correctives=False evaluates without the pose correctives (what glTF skinning alone expresses)."""
    return np.concatenate(list(_posed_chunks(model, clip, correctives)))


def corrective_gap_mm(model: FlameModel, clip: Clip) -> tuple[float, float]:
    """What the pose correctives move over the clip's frames: (max, mean) vertex distance in mm
    between FLAME with and without them (0, 0 for a model without correctives)."""
    if not has_correctives(model):
        return 0.0, 0.0
    worst, total = 0.0, 0.0
    for full, rigid in zip(_posed_chunks(model, clip, True), _posed_chunks(model, clip, False), strict=True):
        gap = np.linalg.norm(full - rigid, axis=-1) * 1000.0
        worst, total = max(worst, float(gap.max())), total + float(gap.sum())
    return worst, total / (clip.n_frames * model.n_verts)


def has_correctives(model: FlameModel) -> bool:
    return bool(model.posedirs.abs().max() > 0)


def joint_tracks(model: FlameModel, clip: Clip, rest_joints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame node rotations T x J x 4 (quaternions, continuous) and translations T x J x 3 that
    make glTF's joint matrices (with inverse bind matrices from `rest_joints` J x 3) equal FLAME's
    skinning transforms (see the module docstring)."""
    parents = model.parents.cpu().numpy()
    T, J = clip.n_frames, model.n_joints
    aa = clip.pose().reshape(T, J, 3)
    quats = np.stack([continuous_quats(axis_angle_to_quat(aa[:, j])) for j in range(J)], axis=1)
    rot = quat_to_matrix(quats.reshape(-1, 4)).reshape(T, J, 3, 3)
    joints = clip_joints(model, clip)  # T x J x 3
    dj = joints - rest_joints[None]
    trans = np.empty((T, J, 3))
    for j in range(J):
        own = joints[:, j] - np.einsum("tab,tb->ta", rot[:, j], dj[:, j])
        trans[:, j] = own if parents[j] < 0 else own - joints[:, parents[j]] + dj[:, parents[j]]
    return quats, trans


# ----------------------------------------------------------------------------- GLB writing
class _Glb:
    """Accumulates one binary buffer of buffer views / accessors and the glTF JSON around it."""

    def __init__(self):
        self.blob = bytearray()
        self.doc: dict = {"asset": {"version": "2.0", "generator": "flamefit export"}, "buffers": [],
                          "bufferViews": [], "accessors": []}

    def view(self, data: bytes, target: int | None = None) -> int:
        while len(self.blob) % 4:
            self.blob.append(0)
        entry = {"buffer": 0, "byteOffset": len(self.blob), "byteLength": len(data)}
        if target is not None:
            entry["target"] = target
        self.blob += data
        self.doc["bufferViews"].append(entry)
        return len(self.doc["bufferViews"]) - 1

    def accessor(self, array: np.ndarray, kind: str, component: int, target: int | None = None,
                 bounds: bool = False) -> int:
        """Add an accessor for `array` (N x components, or N for SCALAR); `bounds` writes min/max."""
        arr = np.ascontiguousarray(np.asarray(array).astype(_DTYPES[component]))
        n = _N_COMPONENTS[kind]
        flat = arr.reshape(-1, n)
        entry = {"bufferView": self.view(arr.tobytes(), target), "componentType": component,
                 "count": int(flat.shape[0]), "type": kind}
        if bounds:
            entry["min"] = [float(x) if component == _FLOAT else int(x) for x in flat.min(axis=0)]
            entry["max"] = [float(x) if component == _FLOAT else int(x) for x in flat.max(axis=0)]
        self.doc["accessors"].append(entry)
        return len(self.doc["accessors"]) - 1

    def to_bytes(self) -> bytes:
        while len(self.blob) % 4:
            self.blob.append(0)
        self.doc["buffers"] = [{"byteLength": len(self.blob)}]
        text = json.dumps(self.doc, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 4)
        total = 12 + 8 + len(text) + 8 + len(self.blob)
        return b"".join([struct.pack("<4sII", b"glTF", 2, total), struct.pack("<I4s", len(text), b"JSON"), text,
                         struct.pack("<I4s", len(self.blob), b"BIN\x00"), bytes(self.blob)])


def _png_bytes(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise UsageError("export: the texture could not be encoded as PNG; fix: check the texture space")
    return data.tobytes()


def split_targets(names: list[str], deltas: list[np.ndarray], weights: np.ndarray
                  ) -> tuple[list[str], list[np.ndarray], np.ndarray, np.ndarray]:
    """Blend targets whose animated weights all lie in [0, 1], for tools that clamp shape-key values
    (Blender's importer clamps to [0, 1] widened only by the first keyframe's value).

    names K, deltas K x (V x 3), weights T x K -> a pair per target (`name+` with the delta, `name-`
    with its negative; weights max(w, 0) and max(-w, 0)), each delta scaled by s = max(1, its largest
    weight) and its weights divided by s: 2K names, 2K deltas, weights T x 2K, scales 2K. The blended
    result, sum_k w_k delta_k, is unchanged."""
    pairs = np.stack([np.clip(weights, 0, None), np.clip(-weights, 0, None)], axis=2).reshape(weights.shape[0], -1)
    scales = np.maximum(1.0, pairs.max(axis=0))
    out_names = [f"{n}{sign}" for n in names for sign in "+-"]
    out_deltas = [sign * d * scales[2 * k + i] for k, d in enumerate(deltas) for i, sign in enumerate((1.0, -1.0))]
    return out_names, out_deltas, pairs / scales, scales


def blend_targets(model: FlameModel, clip: Clip, correctives: str = "bake"
                  ) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    """The GLB's morph targets before any split: names K, deltas K x (V x 3) and animated weights
    T x K: the expression blendshapes (weights = coefficients), then, when baked and the model has
    them, the pose correctives (weights = the pose feature)."""
    n_exp = clip.exp.shape[1]
    exp_dirs = model.dirs[:, :, model.n_shape:model.n_shape + n_exp].double().cpu().numpy()
    names = [f"exp_{k:03d}" for k in range(n_exp)]
    deltas = [exp_dirs[:, :, k] for k in range(n_exp)]
    weights = clip.exp
    if correctives == "bake" and has_correctives(model):
        P = model.posedirs.shape[0]
        names += [f"pose_{p:03d}" for p in range(P)]
        deltas += list(model.posedirs.double().cpu().numpy().reshape(P, model.n_verts, 3))
        weights = np.concatenate([weights, pose_features(clip.pose())], axis=1)
    return names, deltas, weights


def _add_mesh(g: _Glb, model: FlameModel, clip: Clip, texture, names: list[str], deltas: list[np.ndarray],
              extras: dict) -> None:
    """Mesh 0 (rest-pose head, normals, colours or UVs + texture, skin attributes, morph targets)."""
    faces = model.faces.cpu().numpy()
    rest_v, _ = rest_skeleton(model, clip.shape)
    with torch.no_grad():
        normals = vertex_normals(torch.as_tensor(rest_v)[None], model.faces.cpu())[0].numpy()
    if texture is not None:
        src, uv, faces = split_uv_seams(faces, texture.ft.cpu().numpy(), texture.vt.cpu().numpy())
    else:
        src, uv = np.arange(model.n_verts), None
    joints4, weights4, _ = top_weights(model.weights.cpu().numpy())
    attrs = {"POSITION": g.accessor(rest_v[src], "VEC3", _FLOAT, _ARRAY_BUFFER, bounds=True),
             "NORMAL": g.accessor(normals[src], "VEC3", _FLOAT, _ARRAY_BUFFER),
             "JOINTS_0": g.accessor(joints4[src], "VEC4", _UBYTE, _ARRAY_BUFFER),
             "WEIGHTS_0": g.accessor(weights4[src], "VEC4", _FLOAT, _ARRAY_BUFFER)}
    material = {"name": "skin", "pbrMetallicRoughness": {"metallicFactor": 0.0, "roughnessFactor": 0.8}}
    if texture is not None:
        attrs["TEXCOORD_0"] = g.accessor(np.stack([uv[:, 0], 1.0 - uv[:, 1]], 1), "VEC2", _FLOAT, _ARRAY_BUFFER)
        coeffs = torch.as_tensor(clip.albedo, dtype=torch.float32).reshape(1, -1)
        g.doc["images"] = [{"bufferView": g.view(_png_bytes(texture.texture_image(coeffs))), "mimeType": "image/png",
                            "name": "albedo"}]
        g.doc["samplers"] = [{"magFilter": 9729, "minFilter": 9987, "wrapS": 33071, "wrapT": 33071}]
        g.doc["textures"] = [{"source": 0, "sampler": 0}]
        material["pbrMetallicRoughness"]["baseColorTexture"] = {"index": 0}
    elif clip.albedo is not None and clip.albedo.ndim == 2:
        attrs["COLOR_0"] = g.accessor(srgb_to_linear(clip.albedo)[src], "VEC3", _FLOAT, _ARRAY_BUFFER)
    targets = [{"POSITION": g.accessor(d[src], "VEC3", _FLOAT, _ARRAY_BUFFER, bounds=True)} for d in deltas]
    primitive = {"attributes": attrs, "indices": g.accessor(faces.reshape(-1), "SCALAR", _UINT, _ELEMENT_ARRAY_BUFFER),
                 "material": 0, "mode": 4, "targets": targets}
    g.doc["materials"] = [material]
    g.doc["meshes"] = [{"name": "head", "primitives": [primitive], "weights": [0.0] * len(names),
                        "extras": {"targetNames": names, **extras}}]


def _add_skin(g: _Glb, model: FlameModel, rest_joints: np.ndarray) -> list[int]:
    """Nodes (0 the armature `FLAME`, 1 the skinned mesh: both scene roots, as a skinned mesh ignores
    its parents; then the joints in FLAME's order) and skin 0; returns the joints' node indices."""
    parents = model.parents.cpu().numpy()
    J = model.n_joints
    joint_nodes = [2 + j for j in range(J)]
    nodes = [{"name": "FLAME", "children": [joint_nodes[0]]}, {"name": "head", "mesh": 0, "skin": 0}]
    for j, name in enumerate(JOINT_NAMES):
        rel = rest_joints[j] - (rest_joints[parents[j]] if parents[j] >= 0 else 0.0)
        node = {"name": name, "translation": [float(x) for x in rel]}
        kids = [joint_nodes[c] for c in range(J) if parents[c] == j]
        if kids:
            node["children"] = kids
        nodes.append(node)
    ibm = np.tile(np.eye(4), (J, 1, 1))  # rest rotations are the identity: inverse bind = translate(-J)
    ibm[:, :3, 3] = -rest_joints
    g.doc["nodes"] = nodes
    g.doc["skins"] = [{"name": "FLAME", "joints": joint_nodes, "skeleton": joint_nodes[0],
                       "inverseBindMatrices": g.accessor(ibm.transpose(0, 2, 1).reshape(J, 16), "MAT4", _FLOAT)}]
    g.doc["scenes"] = [{"name": "flamefit", "nodes": [0, 1]}]
    g.doc["scene"] = 0
    return joint_nodes


def _add_animation(g: _Glb, model: FlameModel, clip: Clip, joint_nodes: list[int], rest_joints: np.ndarray,
                   weights: np.ndarray) -> None:
    """Animation 0: one keyframe per frame (t = i / fps), LINEAR; per joint rotation + translation,
    and the morph weights T x K of mesh node 1."""
    t_acc = g.accessor(np.arange(clip.n_frames) / clip.fps, "SCALAR", _FLOAT, bounds=True)
    quats, trans = joint_tracks(model, clip, rest_joints)
    samplers, channels = [], []

    def channel(node: int, path: str, values: np.ndarray, kind: str) -> None:
        samplers.append({"input": t_acc, "output": g.accessor(values, kind, _FLOAT), "interpolation": "LINEAR"})
        channels.append({"sampler": len(samplers) - 1, "target": {"node": node, "path": path}})

    for j, node in enumerate(joint_nodes):
        channel(node, "rotation", quats[:, j], "VEC4")
        channel(node, "translation", trans[:, j], "VEC3")
    channel(1, "weights", weights.reshape(-1), "SCALAR")
    g.doc["animations"] = [{"name": clip.source.stem, "samplers": samplers, "channels": channels}]


def gltf_bytes(model: FlameModel, clip: Clip, texture=None, morph: str = "signed", correctives: str = "bake") -> bytes:
    """The GLB of a clip (see the module docstring). texture: a fitter.albedo.TextureAlbedo when the
    clip's albedo is texture-space coefficients, else None (per-vertex colours or none)."""
    if morph not in MORPH_MODES:
        raise UsageError(f"--morph {morph}: use one of {', '.join(MORPH_MODES)}")
    if correctives not in CORRECTIVE_MODES:
        raise UsageError(f"--correctives {correctives}: use one of {', '.join(CORRECTIVE_MODES)}")
    if any(p < 0 for p in model.parents.cpu().numpy()[1:]):
        raise UsageError(f"{model.name}: the model has more than one root joint; fix: use a FLAME-format model")
    g = _Glb()
    names, deltas, weights = blend_targets(model, clip, correctives)
    extras: dict = {}
    if morph == "split":
        names, deltas, weights, scales = split_targets(names, deltas, weights)
        extras["targetScales"] = [float(x) for x in scales]
    _add_mesh(g, model, clip, texture, names, deltas, extras)
    _, rest_joints = rest_skeleton(model, clip.shape)
    joint_nodes = _add_skin(g, model, rest_joints)
    _add_animation(g, model, clip, joint_nodes, rest_joints, weights)
    g.doc["asset"]["extras"] = {"source": clip.source.name, "kind": clip.kind, "model": model.tag, "fps": clip.fps,
                                "frames": clip.n_frames,
                                "pose_correctives": correctives if has_correctives(model) else "none in the model"}
    return g.to_bytes()


# ----------------------------------------------------------------------------- meshes
def write_ply(path: Path, verts: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None) -> None:
    """Binary little-endian PLY: verts V x 3 (float32 written), faces F x 3, colours V x 3 in [0, 1] or None."""
    verts = np.asarray(verts, dtype="<f4")
    header = ["ply", "format binary_little_endian 1.0", "comment flamefit export", f"element vertex {len(verts)}",
              "property float x", "property float y", "property float z"]
    fields = [("xyz", "<f4", (3,))]
    if colors is not None:
        header += ["property uchar red", "property uchar green", "property uchar blue"]
        fields.append(("rgb", "u1", (3,)))
    header += [f"element face {len(faces)}", "property list uchar int vertex_indices", "end_header"]
    vrec = np.empty(len(verts), dtype=fields)
    vrec["xyz"] = verts
    if colors is not None:
        vrec["rgb"] = (np.clip(colors, 0, 1) * 255).round().astype(np.uint8)
    frec = np.empty(len(faces), dtype=[("n", "u1"), ("idx", "<i4", (3,))])
    frec["n"] = 3
    frec["idx"] = faces
    Path(path).write_bytes(("\n".join(header) + "\n").encode("ascii") + vrec.tobytes() + frec.tobytes())


def _texture_vertex_colors(texture, coeffs: np.ndarray, n_verts: int, faces: np.ndarray) -> np.ndarray:
    """A colour per vertex from a texture: the texel under the vertex's first UV (PLY has no UVs)."""
    img = texture.texture_image(torch.as_tensor(coeffs, dtype=torch.float32)).astype(np.float64) / 255.0
    h, w = img.shape[:2]
    ft, vt = texture.ft.cpu().numpy(), texture.vt.cpu().numpy()
    uv = np.zeros((n_verts, 2))
    uv[faces.reshape(-1)[::-1]] = vt[ft.reshape(-1)[::-1]]  # reversed: the first occurrence wins
    cols = np.clip((uv[:, 0] * w).astype(int), 0, w - 1)
    rows = np.clip(((1.0 - uv[:, 1]) * h).astype(int), 0, h - 1)
    return img[rows, cols]


def _write_meshes(folder: Path, names: list[str], verts, model: FlameModel, clip: Clip, fmt: str,
                  texture) -> None:
    """One mesh per name in `folder`; verts: the frames' V x 3 vertices (an array or an iterator)."""
    faces = model.faces.cpu().numpy()
    colors = clip.albedo if clip.albedo is not None and clip.albedo.ndim == 2 else None
    if fmt == "obj":
        if texture is not None:
            io.write_png(folder / "texture.png", texture.texture_image(torch.as_tensor(clip.albedo).reshape(1, -1)))
        for name, v in zip(names, verts, strict=True):
            if texture is not None:
                io.write_obj(folder / name, v, faces, vt=texture.vt.cpu().numpy(), ft=texture.ft.cpu().numpy(),
                             texture_name="texture.png")
            else:
                io.write_obj(folder / name, v, faces, colors=colors)
        return
    if texture is not None:
        colors = _texture_vertex_colors(texture, clip.albedo, model.n_verts, faces)
    for name, v in zip(names, verts, strict=True):
        write_ply(folder / name, v, faces, colors)


# ----------------------------------------------------------------------------- export
@dataclass
class ExportReport:
    """What an export wrote and what it could not carry.

    correctives: 'baked' (as morph targets), 'dropped', 'none in the model' (posedirs all zero) or
    'included' (OBJ / PLY: full evaluation). corrective_max_mm / corrective_mean_mm: what the
    correctives move over the exported frames (distance between FLAME's vertices with and without
    them: max, mean), i.e. what is lost when dropped. weights_dropped_max: the largest skinning-
    weight sum a vertex lost to the 4-influence limit (0: nothing lost); verts_over_limit: how
    many vertices had more than 4 non-zero weights."""

    path: Path
    format: str
    frames: int
    fps: float
    vertices: int
    morph_targets: int
    joints: int
    textured: bool
    correctives: str
    corrective_max_mm: float
    corrective_mean_mm: float
    weights_dropped_max: float
    verts_over_limit: int


def _frame_names(clip: Clip, suffix: str) -> list[str]:
    return [f"frame_{i:04d}.{suffix}" for i in range(clip.n_frames)]


def export_clip(clip: Clip, model: FlameModel, fmt: str, out: str | Path, texture=None,
                morph: str = "signed", correctives: str = "bake") -> ExportReport:
    """Write `clip` as `fmt` to `out`, atomically (nothing half-written is left on failure).

    glb: one file. obj / ply: a single fit -> one file at `out` (an OBJ with a texture gets
    its .mtl and texture.png beside it); a track -> folder `out` with frame_0000.<fmt> ...
    texture: a fitter.albedo.TextureAlbedo for texture-space albedo, else None. morph, correctives:
    see the module docstring."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    check_clip(clip, model)
    out = Path(out)
    if out.is_dir() and (fmt == "glb" or clip.kind == "fit"):
        raise UsageError(f"{out}: is a folder; fix: give a file name, e.g. {out / ('head.' + fmt)}")
    _, _, dropped = top_weights(model.weights.cpu().numpy())
    w = model.weights.cpu().numpy()
    over = int(((np.abs(w) > 0).sum(axis=1) > MAX_INFLUENCES).sum())
    cmax, cmean = corrective_gap_mm(model, clip)
    n_targets, mode = 0, "included"
    if fmt == "glb":
        data = gltf_bytes(model, clip, texture, morph, correctives)
        atomic_write(out, lambda fh: fh.write(data))
        mode = "none in the model" if not has_correctives(model) else {"bake": "baked", "drop": "dropped"}[correctives]
        n_targets = (clip.exp.shape[1] + (model.posedirs.shape[0] if mode == "baked" else 0)) * (
            2 if morph == "split" else 1)
    else:
        if clip.kind == "fit":
            _write_single(out, posed_vertices(model, clip)[0], model, clip, fmt, texture)
        else:
            with io.atomic_dir(out) as tmp:
                _write_meshes(tmp, _frame_names(clip, fmt), iter_posed(model, clip), model, clip, fmt, texture)
    return ExportReport(out, fmt, clip.n_frames, clip.fps, model.n_verts, n_targets, model.n_joints,
                        texture is not None, mode, cmax, cmean, float(dropped.max()), over)


def _write_single(out: Path, verts: np.ndarray, model: FlameModel, clip: Clip, fmt: str, texture) -> None:
    """One mesh file at `out` (plus .mtl / texture.png for a textured OBJ): written in a temporary
    folder beside it, then moved into place, the mesh itself last."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_meshes(tmp, [out.name], verts[None], model, clip, fmt, texture)
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == out.name):
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_file(source: str | Path, fmt: str, out: str | Path, model=None, morph: str = "signed",
                correctives: str = "bake") -> ExportReport:
    """`cli.py export`: read a fit.npz / track.npz, load the model (path, FlameModel or None for the
    resolved default) and its texture space when the albedo needs one, and export."""
    from .albedo import texture_model_for
    from .fit import load_flame

    clip = load_clip(source)
    flame = load_flame(model)
    check_clip(clip, flame)
    texture = None
    if clip.albedo is not None and clip.albedo.ndim == 1:
        texture = texture_model_for(flame, torch.as_tensor(clip.albedo)[None])
    return export_clip(clip, flame, fmt, out, texture=texture, morph=morph, correctives=correctives)
