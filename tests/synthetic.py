"""A small synthetic head model in FLAME's file formats, for tests (shared by the team).

`write_synthetic_flame(dir)` writes `generic_model.pkl` (FLAME 2020 layout, pickle protocol 2
written the way Python 2 wrote it, optionally with chumpy objects) and DECA's
`landmark_embedding.npy` next to it; `synthetic_assets()` returns the same model loaded.

The mesh: a closed ellipsoid "head" (semi-axes 0.09 x 0.12 x 0.10 m; y up, +z towards the
viewer, subject's left = +x; counter-clockwise seen from outside) and two eyeball spheres.
5 joints: root, neck, jaw, left eye (+x), right eye. 68 iBUG-like landmarks on the front.
Deterministic for a given seed; takes well under 0.5 s.
"""

from __future__ import annotations

import copyreg
import io
import pickle
import struct
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["HEAD_AXES", "JOINTS", "synthetic_assets", "write_synthetic_flame"]

HEAD_AXES = (0.09, 0.12, 0.10)  # semi-axes x, y, z in metres
N_LAT, N_LON = 24, 40  # head UV sphere: N_LAT - 1 rings of N_LON vertices + 2 poles
EYE_CENTRES = ((0.032, 0.03, 0.080), (-0.032, 0.03, 0.080))  # left (+x), right
EYE_RADIUS = 0.011
EYE_LAT, EYE_LON = 8, 12
#: joint positions on the template: root, neck, jaw, left eye, right eye
JOINTS = np.array([[0.0, -0.10, -0.015], [0.0, -0.065, -0.005], [0.0, -0.02, 0.03],
                   EYE_CENTRES[0], EYE_CENTRES[1]])
PARENTS = (-1, 0, 1, 1, 1)
N_IDENTITY, N_COLS = 300, 400


# ------------------------------------------------------------------------------- mesh

def _uv_sphere(n_lat: int, n_lon: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit-sphere angles and faces. Returns theta (N,), phi (N,), faces (F, 3).

    Vertex 0 is the top pole (+y), then rings i = 1..n_lat-1 (theta = pi i / n_lat) of n_lon
    vertices (phi = pi (2 j / n_lon - 1): j = n_lon/2 faces +z), then the bottom pole.
    Quad cell (i, j) (i = 1..n_lat-2) is split into faces 2 * ((i-1) n_lon + j) + {0, 1}.
    """
    ring_theta = np.pi * np.arange(1, n_lat) / n_lat
    phi = np.pi * (2.0 * np.arange(n_lon) / n_lon - 1.0)
    theta = np.concatenate([[0.0], np.repeat(ring_theta, n_lon), [np.pi]])
    phis = np.concatenate([[0.0], np.tile(phi, n_lat - 1), [0.0]])

    def ring(i: int, j: int) -> int:
        return 1 + (i - 1) * n_lon + (j % n_lon)

    faces = []
    for i in range(1, n_lat - 1):
        for j in range(n_lon):
            a, b, c, d = ring(i, j), ring(i + 1, j), ring(i + 1, j + 1), ring(i, j + 1)
            faces += [(a, b, c), (a, c, d)]
    bottom = len(theta) - 1
    for j in range(n_lon):
        faces.append((0, ring(1, j + 1), ring(1, j)))
        faces.append((bottom, ring(n_lat - 1, j), ring(n_lat - 1, j + 1)))
    return theta, phis, np.array(faces, dtype=np.int64)


def _ellipsoid(theta: np.ndarray, phi: np.ndarray, axes, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    s = np.sin(theta)
    pts = np.stack([axes[0] * s * np.sin(phi), axes[1] * np.cos(theta),
                    axes[2] * s * np.cos(phi)], axis=-1)
    return pts + np.asarray(centre)


def _orient_outwards(verts: np.ndarray, faces: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Flip triangles whose normal points towards `centre` (convex pieces only)."""
    tri = verts[faces]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    inward = np.einsum("fk,fk->f", normal, tri.mean(axis=1) - centre) < 0
    out = faces.copy()
    out[inward] = out[inward][:, [0, 2, 1]]
    return out


def _build_mesh() -> dict[str, np.ndarray]:
    theta, phi, faces = _uv_sphere(N_LAT, N_LON)
    head = _ellipsoid(theta, phi, HEAD_AXES)
    head_faces = _orient_outwards(head, faces, np.zeros(3))
    verts, all_faces, part = [head], [head_faces], [np.zeros(len(head), np.int64)]
    offset = len(head)
    et, ep, ef = _uv_sphere(EYE_LAT, EYE_LON)
    for k, centre in enumerate(EYE_CENTRES):
        eye = _ellipsoid(et, ep, (EYE_RADIUS,) * 3, centre)
        all_faces.append(_orient_outwards(eye, ef, np.asarray(centre)) + offset)
        verts.append(eye)
        part.append(np.full(len(eye), k + 1, np.int64))
        offset += len(eye)
    return {"v": np.concatenate(verts), "f": np.concatenate(all_faces),
            "part": np.concatenate(part), "theta": theta, "phi": phi,
            "n_head_faces": np.int64(len(head_faces)), "n_eye_verts": np.int64(len(et))}


# ----------------------------------------------------------------------------- joints

def _ring_vertex(i: int, j: int) -> int:
    return 1 + (i - 1) * N_LON + (j % N_LON)


def _head_joint_row(target: np.ndarray, n_verts: int) -> np.ndarray:
    """Convex weights on 8 head vertices (two rings x back/right/front/left) giving target.

    target must be (0, y, z) inside the ellipsoid."""
    a, b, c = HEAD_AXES
    ring_y = b * np.cos(np.pi * np.arange(1, N_LAT) / N_LAT)  # decreasing
    i = int(np.searchsorted(-ring_y, -target[1], side="right"))  # ring_y[i-1] >= y > ring_y[i]
    i = min(max(i, 1), N_LAT - 2)
    y0, y1 = ring_y[i - 1], ring_y[i]
    u = (y0 - target[1]) / (y0 - y1)
    depth = (1 - u) * c * np.sin(np.pi * i / N_LAT) + u * c * np.sin(np.pi * (i + 1) / N_LAT)
    f = abs(target[2]) / depth
    side = (1.0 - f) / 2.0
    row = np.zeros(n_verts)
    # j = 0 back (phi = -pi), N/4 right (-x), N/2 front (+z), 3N/4 left (+x)
    near = N_LON // 2 if target[2] >= 0 else 0
    for ring, w_ring in ((i, 1 - u), (i + 1, u)):
        row[_ring_vertex(ring, near)] += w_ring * f
        row[_ring_vertex(ring, N_LON // 4)] += w_ring * side
        row[_ring_vertex(ring, 3 * N_LON // 4)] += w_ring * side
    return row


def _eye_joint_row(first: int, n_eye: int, n_verts: int) -> np.ndarray:
    """Poles + 4 equator vertices of an eyeball: their mean is its centre."""
    row = np.zeros(n_verts)
    eq = EYE_LAT // 2
    ids = [first, first + n_eye - 1] + [first + 1 + (eq - 1) * EYE_LON + j * EYE_LON // 4
                                        for j in range(4)]
    row[ids] = 1.0 / 6.0
    return row


def _joint_regressor(mesh: dict) -> np.ndarray:
    n = len(mesh["v"])
    n_head = int(np.sum(mesh["part"] == 0))
    n_eye = int(mesh["n_eye_verts"])
    rows = [_head_joint_row(JOINTS[k], n) for k in range(3)]
    rows += [_eye_joint_row(n_head, n_eye, n), _eye_joint_row(n_head + n_eye, n_eye, n)]
    return np.stack(rows)


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _skinning_weights(mesh: dict) -> np.ndarray:
    v, part = mesh["v"], mesh["part"]
    y, z = v[:, 1], v[:, 2]
    jaw = _smoothstep(JOINTS[2, 1], JOINTS[2, 1] - 0.03, y) * _smoothstep(0.0, 0.05, z)
    to_root = 1.0 - _smoothstep(JOINTS[0, 1] - 0.005, JOINTS[1, 1] + 0.005, y)
    w = np.zeros((len(v), 5))
    w[:, 2] = jaw
    w[:, 0] = (1 - jaw) * to_root
    w[:, 1] = (1 - jaw) * (1 - to_root)
    for k in (1, 2):
        w[part == k] = 0.0
        w[part == k, 2 + k] = 1.0
    return w


# ------------------------------------------------------------------------------ bases

def _features(p: np.ndarray) -> np.ndarray:
    """Smooth (quadratic) functions of normalised head coordinates: (N, 10)."""
    q = p / np.asarray(HEAD_AXES)
    x, y, z = q[:, 0], q[:, 1], q[:, 2]
    return np.stack([np.ones_like(x), x, y, z, x * x, y * y, z * z, x * y, y * z, x * z], 1)


def _random_dirs(mesh: dict, rng: np.random.Generator, n: int, mask: np.ndarray,
                 rms: float) -> np.ndarray:
    """n smooth random displacement fields (V, 3, n), each with RMS `rms` metres on the head.

    Eyeballs move rigidly with the field at their centre, times the mask there."""
    v, part = mesh["v"], mesh["part"]
    feats = _features(v)
    for k, centre in enumerate(EYE_CENTRES):
        feats[part == k + 1] = _features(np.asarray([centre]))
    out = np.zeros((len(v), 3, n))
    for k in range(n):
        field = feats @ rng.normal(size=(feats.shape[1], 3)) * mask[:, None]
        scale = np.sqrt(np.mean(np.sum(field[part == 0] ** 2, axis=1))) + 1e-12
        out[:, :, k] = field * (rms / (1.0 + 0.2 * k)) / scale
    return out


def _bases(mesh: dict, rng: np.random.Generator, n_shape: int, n_exp: int,
           extra: int) -> np.ndarray:
    """FLAME's shapedirs (V, 3, 400 + extra): identity cols 0..n_shape-1, expression 300.."""
    v, part = mesh["v"], mesh["part"]
    ones = np.ones(len(v))
    lower_front = _smoothstep(0.02, -0.03, v[:, 1]) * _smoothstep(0.0, 0.05, v[:, 2])
    lower_front[part != 0] = 0.0
    dirs = np.zeros((len(v), 3, N_COLS + extra))
    dirs[:, :, :n_shape] = _random_dirs(mesh, rng, n_shape, ones, 0.004)
    dirs[:, :, N_IDENTITY:N_IDENTITY + n_exp] = _random_dirs(mesh, rng, n_exp, lower_front, 0.003)
    return dirs


# -------------------------------------------------------------------------- landmarks

def _landmark_xy() -> np.ndarray:
    """68 iBUG-like landmark positions (x, y) in metres as seen from the front (+z)."""
    k = np.arange(17) / 16.0
    contour = np.stack([-0.072 * np.cos(np.pi * k), 0.015 - 0.10 * np.sin(np.pi * k)], 1)
    u = np.linspace(0, 1, 5)
    brow_r = np.stack([-0.058 + 0.044 * u, 0.048 + 0.008 * np.sin(np.pi * u)], 1)
    brow_l = brow_r[::-1] * [-1, 1]
    nose = [[0, 0.035], [0, 0.022], [0, 0.009], [0, -0.004],
            [-0.014, -0.016], [-0.007, -0.017], [0, -0.018], [0.007, -0.017], [0.014, -0.016]]
    eye = np.array([[-0.017, 0], [-0.007, 0.013], [0.007, 0.013], [0.017, 0], [0.007, -0.013],
                    [-0.007, -0.013]])
    eye_r = eye + [-0.032, 0.03]
    eye_l = eye + [0.032, 0.03]
    mouth = [[-0.025, -0.045], [-0.016, -0.037], [-0.006, -0.034], [0, -0.035], [0.006, -0.034],
             [0.016, -0.037], [0.025, -0.045], [0.016, -0.053], [0.007, -0.057], [0, -0.058],
             [-0.007, -0.057], [-0.016, -0.053],
             [-0.020, -0.045], [-0.008, -0.042], [0, -0.042], [0.008, -0.042], [0.020, -0.045],
             [0.008, -0.048], [0, -0.048], [-0.008, -0.048]]
    return np.concatenate([contour, brow_r, brow_l, nose, eye_r, eye_l, mouth]).astype(float)


def _angles(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(theta, phi) of the front-surface points of the head ellipsoid above (x, y)."""
    a, b, _ = HEAD_AXES
    theta = np.arccos(np.clip(xy[:, 1] / b, -1, 1))
    phi = np.arcsin(np.clip(xy[:, 0] / (a * np.sin(theta)), -1, 1))
    return theta, phi


def _embed(theta: float, phi: float, faces: np.ndarray) -> tuple[int, np.ndarray]:
    """Triangle index and barycentric coordinates (in that face's vertex order) of the point
    with head angles (theta, phi), interpolated linearly over the UV grid cell."""
    d_theta, d_phi = np.pi / N_LAT, 2 * np.pi / N_LON
    i = int(theta // d_theta)  # ring i at theta_i <= theta < theta_{i+1}
    if not 1 <= i <= N_LAT - 2:
        raise ValueError("landmark too close to a pole")
    jf = (phi + np.pi) / d_phi
    j = int(np.floor(jf)) % N_LON
    s, t = theta / d_theta - i, jf - np.floor(jf)
    a, b, c, d = (_ring_vertex(i, j), _ring_vertex(i + 1, j), _ring_vertex(i + 1, j + 1),
                  _ring_vertex(i, j + 1))
    cell = 2 * ((i - 1) * N_LON + j)
    if s >= t:
        fi, weights = cell, {a: 1 - s, b: s - t, c: t}
    else:
        fi, weights = cell + 1, {a: 1 - t, c: s, d: t - s}
    return fi, np.array([weights[int(v)] for v in faces[fi]])


def _landmark_embedding(faces: np.ndarray) -> dict[str, np.ndarray]:
    """DECA's dict: static 51, dynamic (79, 17) contour rows, full (1, 68)."""
    theta, phi = _angles(_landmark_xy())
    static = [_embed(theta[k], phi[k], faces) for k in range(17, 68)]
    margin = np.deg2rad(3.0)
    dyn_f, dyn_b = np.zeros((79, 17), np.int64), np.zeros((79, 17, 3))
    for r in range(79):
        yaw = np.deg2rad(r if r <= 39 else 39 - r)  # face turning towards +x for yaw > 0
        for k in range(17):
            p = phi[k]
            limit = np.pi / 2 - margin - abs(yaw)  # visible while |phi + yaw| < pi/2
            if yaw > 0 and p > 0:
                p = min(p, limit)
            elif yaw < 0 and p < 0:
                p = max(p, -limit)
            dyn_f[r, k], dyn_b[r, k] = _embed(theta[k], p, faces)
    full = [(dyn_f[0, k], dyn_b[0, k]) for k in range(17)] + static
    return {
        "static_lmk_faces_idx": np.array([f for f, _ in static], np.int64),
        "static_lmk_bary_coords": np.array([b for _, b in static], np.float32),
        "dynamic_lmk_faces_idx": dyn_f,
        "dynamic_lmk_bary_coords": dyn_b.astype(np.float32),
        "full_lmk_faces_idx": np.array([[f for f, _ in full]], np.int64),
        "full_lmk_bary_coords": np.array([[b for _, b in full]], np.float32),
    }


# ------------------------------------------------------------- FLAME-2020-style pickle

class _Ch:
    """Written to the pickle as `chumpy.ch.Ch` with state {'x': array}, as FLAME 2020 does."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x

    def __reduce_ex__(self, protocol):
        return (copyreg.__newobj__, (type(self),), {"x": self.x})


class _Csc:
    """Written as `scipy.sparse.csc.csc_matrix` (the pre-1.8 module path old pickles name)."""

    def __init__(self, dense: np.ndarray) -> None:
        import scipy.sparse as sp

        m = sp.csc_matrix(dense)
        self.state = {"_shape": tuple(int(s) for s in m.shape), "data": m.data,
                      "indices": m.indices.astype(np.int32), "indptr": m.indptr.astype(np.int32),
                      "maxprint": 50}

    def __reduce_ex__(self, protocol):
        return (copyreg.__newobj__, (type(self),), self.state)


_GLOBAL_NAMES = {_Ch: ("chumpy.ch", "Ch"), _Csc: ("scipy.sparse.csc", "csc_matrix")}


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it: bytes as BINSTRING (py2 str), our aliases as globals,
    numpy's array rebuild named `numpy.core.multiarray._reconstruct`."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj, name=None) -> None:
        alias = _GLOBAL_NAMES.get(obj)
        if alias is None and getattr(obj, "__name__", None) == "_reconstruct":
            alias = ("numpy.core.multiarray", "_reconstruct")
        if alias is None:
            return super().save_global(obj, name)
        self.write(pickle.GLOBAL + f"{alias[0]}\n{alias[1]}\n".encode())
        self.memoize(obj)
        return None

    dispatch[type] = save_global


def _pose_correctives(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """posedirs (V, 3, 36): small (0.1 mm per unit) random correctives for the neck and jaw
    features (columns 0-17), each scaled by that joint's skinning weight; none for the eyes,
    so eye poses move only the eyeballs."""
    posedirs = np.zeros((len(weights), 3, 36))
    for joint in (1, 2):
        cols = slice(9 * (joint - 1), 9 * joint)
        noise = rng.normal(scale=1e-4, size=(len(weights), 3, 9))
        posedirs[:, :, cols] = noise * weights[:, joint, None, None]
    return posedirs


def _model_dict(n_shape: int, n_exp: int, chumpy: bool, seed: int, extra: int
                ) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    mesh = _build_mesh()
    v = mesh["v"]
    jreg = _joint_regressor(mesh)
    weights = _skinning_weights(mesh)
    shapedirs = _bases(mesh, rng, n_shape, n_exp, extra)
    posedirs = _pose_correctives(rng, weights)
    wrap = _Ch if chumpy else (lambda a: a)
    if chumpy:
        j_regressor = _Csc(jreg)
    else:
        import scipy.sparse as sp

        j_regressor = sp.csc_matrix(jreg)
    model = {
        "f": mesh["f"].astype(np.uint32),
        "J_regressor": j_regressor,
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64),
        "J": wrap(jreg @ v),
        "weights": wrap(weights),
        "posedirs": wrap(posedirs),
        "bs_style": "lbs",
        "v_template": wrap(v),
        "shapedirs": wrap(shapedirs),
        "bs_type": "lrotmin",
    }
    return model, _landmark_embedding(mesh["f"])


def write_synthetic_flame(directory: str | Path, n_shape: int = 8, n_exp: int = 6,
                          chumpy: bool = True, seed: int = 0, extra_shape_cols: int = 0) -> Path:
    """Write `generic_model.pkl` + DECA's `landmark_embedding.npy` into directory.

    shapedirs is (V, 3, 400 + extra_shape_cols) float64: identity columns 0..n_shape-1 and
    expression columns 300..300+n_exp-1 non-zero, everything else zero (extra_shape_cols
    appends all-zero columns after FLAME's 400, a non-standard width loaders should tolerate).
    chumpy=True stores v_template, shapedirs, posedirs, weights and J as `chumpy.ch.Ch`
    objects and J_regressor as `scipy.sparse.csc.csc_matrix`, like FLAME 2020's file; with
    chumpy=False they are plain arrays and a current scipy csc_matrix (loads with
    `pickle.load(f, encoding="latin1")`, no chumpy needed). Returns the .pkl path.
    """
    if not (0 <= n_shape <= N_IDENTITY and 0 <= n_exp <= N_COLS - N_IDENTITY):
        raise ValueError("n_shape must be in 0..300 and n_exp in 0..100")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model, embedding = _model_dict(n_shape, n_exp, chumpy, seed, int(extra_shape_cols))
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(model)
    path = out / "generic_model.pkl"
    path.write_bytes(buf.getvalue())
    np.save(out / "landmark_embedding.npy", embedding, allow_pickle=True)
    return path


def synthetic_assets(n_shape: int = 8, n_exp: int = 6, seed: int = 0):
    """The synthetic model as FlameAssets (written to a temp folder and loaded, not memoised)."""
    from priors.assets import _load_model_uncached

    with tempfile.TemporaryDirectory() as tmp:
        path = write_synthetic_flame(tmp, n_shape=n_shape, n_exp=n_exp, seed=seed)
        assets = _load_model_uncached(path, n_shape=None, n_exp=None, require_landmarks=True)
    assets.source = f"synthetic(n_shape={n_shape}, n_exp={n_exp}, seed={seed})"
    assets.name = "synthetic"
    return assets


def as_default_pinhole(params, size: int):
    """The same framing through the pinhole camera a fit assumes for a size x size photo without EXIF
    (the default field of view, principal point at the centre): renders of it are what the default
    recipe expects, so known-answer fits test the optimisation, not a lens mismatch."""
    import torch

    from fitter.camera import default_focal_px

    cam = params.cam
    focal = default_focal_px(size, size) / (size / 2.0)
    params.cam = torch.cat([cam[:, :3], torch.full_like(cam[:, :1], focal), torch.zeros_like(cam[:, :2])], dim=1)
    return params
