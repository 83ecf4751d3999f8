"""MediaPipe's 478 points (468 face mesh + 10 iris) as barycentric points on a head model's surface.

The format (one .npz per model mesh, in `<FLAMEFIT_HOME>/embeddings/mediapipe478/<mesh hash>.npz`):

    dense_faces       (478,) int64    triangle of each MediaPipe point, an index into the model's faces
    dense_bary        (478, 3) float32 barycentric weights in that triangle (>= 0, rows sum to 1)
    dense_valid       (478,) bool     False where the point has no place on this model (e.g. the iris
                                      on a model without eyeballs); such rows hold face 0, bary (1, 0, 0)
    dense_confidence  (478,) float32  in [0, 1]: how consistently the derivation placed the point
                                      (1 / (1 + (spread / 3 mm)^2), fewer than 4 views scale it down)
    mesh_hash         str             mesh_hash(v_template, faces) of the model it was made for
    n_faces           int64           len(faces) of that model

Point k is MediaPipe's landmark k (refine_landmarks=True: 468..472 and 473..477 are the two irises'
centre then ring). `dense_landmarks(vertices, model.faces, emb)` evaluates it like the 68-point
embedding (priors.flame.vertices2landmarks).

The derivation (derive_dense_embedding) needs no file: it renders the model's own head with
flamefit's renderer under varied poses and small expressions, with a painted albedo (skin,
darker lips and brows, white eyes with a dark iris) that MediaPipe reads as a face, runs the
detector on every render, unprojects each detected point onto the rendered surface (the
rasterizer's triangle at that pixel and the point's barycentrics in it), maps the hits to the
neutral template, keeps the hits from views where the current estimate is visible and facing the
camera, takes their median and snaps it to the nearest surface point (mesh points on the skin,
iris points on the eyeballs). dense_embedding_for(model) loads the cached embedding or derives
and caches it once.

Rendering lives in fitter/; it is imported only inside the derivation.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from priors.assets import atomic_write, flamefit_home
from priors.errors import AssetError
from priors.mesh import face_normals

N_POINTS = 478
N_MESH = 468
IRIS = tuple(range(N_MESH, N_POINTS))
FORMAT_VERSION = 1
FOLDER = "mediapipe478"
_FIX = "fix: delete it (flamefit derives a new one for the model) or install one made for this model"

#: (yaw, pitch) degrees of the derivation's renders
DEFAULT_VIEWS = tuple((y, p) for p in (0.0, -15.0, 15.0) for y in (0.0, -15.0, 15.0, -30.0, 30.0))
RENDER_RES = 512
FACE_FILL = 1.03  # the 68 landmarks' extent in the renders, in units of half the image (about half of it)
FACE_RAISE = 0.113  # the image centre sits this share of that extent above the landmarks' centre
VISIBLE_COS = 0.25  # a view counts for a point when the estimated surface there faces it this much
DEPTH_TOL = 0.004  # metres: the estimate is visible when no surface lies this much in front of it
OUTLIER_M = 0.006  # hits this far from the estimate are dropped in the refinement rounds
SPREAD_HALF = 0.003  # metres: a point whose hits spread this much (median distance) gets confidence 1/2


@dataclass
class DenseEmbedding:
    """See the module docstring. faces (478,) int64, bary (478, 3) float32, valid (478,) bool,
    confidence (478,) float32, mesh_hash str, n_faces int."""

    faces: np.ndarray
    bary: np.ndarray
    valid: np.ndarray
    confidence: np.ndarray
    mesh_hash: str
    n_faces: int

    def arrays(self) -> dict:
        return {"flamefit_dense_embedding": np.int64(FORMAT_VERSION), "dense_faces": self.faces,
                "dense_bary": self.bary, "dense_valid": self.valid, "dense_confidence": self.confidence,
                "mesh_hash": np.str_(self.mesh_hash), "n_faces": np.int64(self.n_faces)}


# ----------------------------------------------------------------------------- model identity and cache
def mesh_hash(v_template: np.ndarray, faces: np.ndarray) -> str:
    """16 hex digits of SHA-256 over the template (V, 3) as float32 and the faces (F, 3) as int64: the
    mesh an embedding belongs to (the same for a model's .pkl and its installed model.npz)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(v_template, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(faces, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def model_mesh(model) -> tuple[np.ndarray, np.ndarray]:
    """(v_template (V, 3) float32, faces (F, 3) int64) of a FlameModel or FlameAssets."""
    v, f = model.v_template, model.faces
    if isinstance(v, Tensor):
        v, f = v.detach().cpu().numpy(), f.detach().cpu().numpy()
    return np.asarray(v, np.float32), np.asarray(f, np.int64)


def model_mesh_hash(model) -> str:
    return mesh_hash(*model_mesh(model))


BUNDLED = Path(__file__).resolve().parent / "data"  # embeddings shipped with flamefit, by mesh hash


def embedding_path(hash_: str, home: str | Path | None = None) -> Path:
    """Where the embedding of the mesh with this hash is cached."""
    root = Path(home) if home is not None else flamefit_home()
    return root / "embeddings" / FOLDER / f"{hash_}.npz"


def find_dense_embedding(model, home: str | Path | None = None) -> Path | None:
    """The embedding file for this model's mesh: the cached (installed or derived) one, else one shipped
    with flamefit (the ICT-FLAME stand-in's, derived by this module), else None."""
    hash_ = model_mesh_hash(model)
    for path in (embedding_path(hash_, home), BUNDLED / f"mediapipe478-{hash_}.npz"):
        if path.is_file():
            return path
    return None


# ----------------------------------------------------------------------------- file format
def save_dense_embedding(path: str | Path, emb: DenseEmbedding) -> Path:
    """Write atomically (a temp file moved into place)."""
    return atomic_write(Path(path), lambda fh: np.savez(fh, **emb.arrays()))


def load_dense_embedding(path: str | Path, model=None) -> DenseEmbedding:
    """Read and validate an embedding file; with `model` (FlameModel or FlameAssets) also check that it
    belongs to that model's mesh. Accepts flamefit's format (module docstring) and the 105-point
    `mediapipe_landmark_embedding.npz` layout (lmk_face_idx, lmk_b_coords, landmark_indices) that
    FLAME-based trackers publish, whose other points become invalid. One-line AssetError otherwise."""
    path = Path(path)
    label = str(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise AssetError(f"{label}: no such file; fix: check the path") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise AssetError(f"{label}: not a readable .npz ({str(exc).splitlines()[0][:80]}); {_FIX}") from None
    if "lmk_face_idx" in raw and "landmark_indices" in raw:
        raw = _from_tracker_layout(raw, label)
    for key in ("dense_faces", "dense_bary"):
        if key not in raw:
            raise AssetError(f"{label}: key '{key}' is missing (not a flamefit dense embedding); {_FIX}")
    faces, bary = raw["dense_faces"], raw["dense_bary"]
    valid = raw.get("dense_valid", np.ones(N_POINTS, bool))
    conf = raw.get("dense_confidence", valid.astype(np.float32))
    for key, arr, shape in (("dense_faces", faces, (N_POINTS,)), ("dense_bary", bary, (N_POINTS, 3)),
                            ("dense_valid", valid, (N_POINTS,)), ("dense_confidence", conf, (N_POINTS,))):
        if arr.shape != shape:
            raise AssetError(f"{label}: key '{key}' has shape {arr.shape}, expected {shape}; {_FIX}")
    if faces.dtype.kind not in "iu":
        raise AssetError(f"{label}: key 'dense_faces' has dtype {faces.dtype}, expected integers; {_FIX}")
    if bary.dtype.kind != "f" or conf.dtype.kind != "f" or valid.dtype.kind not in "bi":
        raise AssetError(f"{label}: dense_bary/dense_confidence must be floats and dense_valid booleans; {_FIX}")
    bary = bary.astype(np.float32)
    valid = valid.astype(bool)
    conf = conf.astype(np.float32)
    if not (np.isfinite(bary).all() and np.isfinite(conf).all()):
        raise AssetError(f"{label}: key 'dense_bary' or 'dense_confidence' holds NaN or infinite values; {_FIX}")
    if bary.min() < -1e-4 or np.abs(bary.sum(1) - 1).max() > 1e-3:
        raise AssetError(f"{label}: key 'dense_bary' has rows outside [0, 1] or not summing to 1; {_FIX}")
    if conf.min() < 0 or conf.max() > 1:
        raise AssetError(f"{label}: key 'dense_confidence' has values outside [0, 1]; {_FIX}")
    n_faces = int(raw["n_faces"]) if "n_faces" in raw else None
    hash_ = str(raw["mesh_hash"]) if "mesh_hash" in raw else ""
    if faces.min() < 0 or (n_faces is not None and faces.max() >= n_faces):
        bad = int(faces.min() if faces.min() < 0 else faces.max())
        raise AssetError(f"{label}: key 'dense_faces' holds index {bad}, outside [0, {n_faces}); {_FIX}")
    emb = DenseEmbedding(faces.astype(np.int64), bary, valid, conf, hash_, n_faces or int(faces.max()) + 1)
    if model is not None:
        check_for_model(emb, model, label)
    return emb


def _from_tracker_layout(raw: dict, label: str) -> dict:
    """lmk_face_idx (K,), lmk_b_coords (K, 3), landmark_indices (K,) MediaPipe ids -> flamefit's arrays."""
    idx, fi, bc = raw["landmark_indices"], raw["lmk_face_idx"], raw.get("lmk_b_coords")
    if bc is None or idx.ndim != 1 or fi.shape != idx.shape or bc.shape != idx.shape + (3,):
        raise AssetError(f"{label}: lmk_face_idx / lmk_b_coords / landmark_indices do not match in shape; {_FIX}")
    if idx.dtype.kind not in "iu" or idx.min() < 0 or idx.max() >= N_POINTS:
        raise AssetError(f"{label}: key 'landmark_indices' must hold MediaPipe ids 0..{N_POINTS - 1}; {_FIX}")
    faces = np.zeros(N_POINTS, np.int64)
    bary = np.tile(np.array([1.0, 0.0, 0.0], np.float32), (N_POINTS, 1))
    valid = np.zeros(N_POINTS, bool)
    faces[idx], bary[idx], valid[idx] = fi, bc, True
    return {"dense_faces": faces, "dense_bary": bary, "dense_valid": valid,
            "dense_confidence": valid.astype(np.float32)}


def check_for_model(emb: DenseEmbedding, model, label: str) -> None:
    """AssetError (one line) unless emb fits the model: face indices in range, and the same mesh hash
    when the file records one."""
    v, f = model_mesh(model)
    if int(emb.faces.max()) >= len(f) or emb.n_faces != len(f) and emb.mesh_hash:
        raise AssetError(f"{label}: made for a mesh with {emb.n_faces} faces, the model has {len(f)}; {_FIX}")
    if emb.mesh_hash and emb.mesh_hash != mesh_hash(v, f):
        raise AssetError(f"{label}: made for mesh {emb.mesh_hash}, the model's mesh is {mesh_hash(v, f)}; {_FIX}")


def install_dense_embedding(src: str | Path, model, home: str | Path | None = None) -> Path:
    """Validate `src` against `model` and copy it into the cache under the model's mesh hash."""
    emb = load_dense_embedding(src, model)
    v, f = model_mesh(model)
    emb.mesh_hash, emb.n_faces = mesh_hash(v, f), len(f)
    return save_dense_embedding(embedding_path(emb.mesh_hash, home), emb)


# ----------------------------------------------------------------------------- evaluation
def dense_landmarks(vertices: Tensor, faces: Tensor, emb: DenseEmbedding) -> Tensor:
    """vertices B x V x 3, faces F x 3 -> the 478 points B x 478 x 3 (invalid rows are still some surface
    point: mask them with emb.valid / dense_weights)."""
    from priors.flame import vertices2landmarks

    B = vertices.shape[0]
    lf = torch.as_tensor(emb.faces, device=vertices.device).expand(B, -1)
    lb = torch.as_tensor(emb.bary, dtype=vertices.dtype, device=vertices.device).expand(B, -1, -1)
    return vertices2landmarks(vertices, faces, lf, lb)


def dense_weights(emb: DenseEmbedding) -> np.ndarray:
    """(478,) float32: confidence, 0 for invalid points; multiply with the detector's per-point weights."""
    return np.where(emb.valid, emb.confidence, 0.0).astype(np.float32)


def composed_landmarks(emb: DenseEmbedding, groups, template: np.ndarray, faces: np.ndarray,
                       allowed: np.ndarray | None = None, label: str = "MediaPipe embedding"
                       ) -> tuple[np.ndarray, np.ndarray]:
    """A landmark set that a detector defines on MediaPipe's points (landmark k = the mean of the points
    groups[k], e.g. fitter.detect.MEDIAPIPE_TO_IBUG68, the 68 iBUG points as the MediaPipe detector gives
    them) as surface points of the model: the mean of the embedding's points of each group on the neutral
    template V x 3 (faces F x 3), snapped to the nearest surface point of the allowed triangles (F bool,
    default all) -> (faces (K,) int64, bary (K, 3) float32), the layout of LandmarkEmbedding's full_*.

    So the model's landmarks follow the detector's convention as derived from the model's own renders
    (derive_dense_embedding), instead of the convention of the model's own 68-point file. AssetError (one
    line) when a group uses a point the embedding has no place for."""
    bad = sorted({i for ids in groups for i in ids if not emb.valid[i]})
    if bad:
        raise AssetError(f"{label}: MediaPipe point(s) {bad[:5]} have no place on this model, so the detector's "
                         "landmarks cannot be composed from them; fix: install an embedding that places them")
    template = np.asarray(template, np.float64)
    points = surface_points(template, faces, emb.faces, emb.bary)
    est = np.array([points[list(ids)].mean(0) for ids in groups])
    allowed = np.ones(len(faces), bool) if allowed is None else allowed
    face, bary, _ = snap_to_surface(est, template, faces, allowed)
    return face, bary.astype(np.float32)


def dense_embedding_for(model, home: str | Path | None = None, derive: bool = True) -> DenseEmbedding:
    """The model's embedding: the cached one, else (derive=True) derived now with MediaPipe and cached
    (a few seconds to a minute; see derive_dense_embedding). AssetError if neither works."""
    found = find_dense_embedding(model, home)
    if found is not None:
        return load_dense_embedding(found, model)
    path = embedding_path(model_mesh_hash(model), home)
    if not derive:
        raise AssetError(f"{path}: no MediaPipe embedding for this model yet; fix: run a fit with the dense "
                         "term once (it derives one) or `cli.py assets install` an embedding file")
    from fitter.detect import mediapipe_missing

    problem = mediapipe_missing()
    if problem:
        raise AssetError(f"{path}: deriving the MediaPipe embedding needs mediapipe: {problem}")
    emb = derive_dense_embedding(model)
    save_dense_embedding(path, emb)
    return emb


# ----------------------------------------------------------------------------- derivation: geometry
def eyeball_vertices(weights: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """(V,) bool: vertices bound to the eye joints (3, 4) of a FLAME-layout skinning weights (V, J)."""
    if weights.shape[1] < 5:
        return np.zeros(weights.shape[0], bool)
    return weights[:, 3:5].sum(1) > threshold


def closest_points_on_triangles(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Closest points to p on triangles (a, b, c), as barycentrics: all N x 3 (paired rows) -> N x 3.

    Ericson's Voronoi-region test (Real-Time Collision Detection, 5.1.5), vectorised: the regions are
    assigned from the last of his tests to the first, so that the first matching one wins."""
    ab, ac = b - a, c - a
    d1, d2 = (ab * (p - a)).sum(1), (ac * (p - a)).sum(1)
    d3, d4 = (ab * (p - b)).sum(1), (ac * (p - b)).sum(1)
    d5, d6 = (ab * (p - c)).sum(1), (ac * (p - c)).sum(1)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2

    def ratio(num, den):
        return num / np.where(np.abs(den) > 1e-30, den, 1e-30)

    total = va + vb + vc
    v, w = ratio(vb, total), ratio(vc, total)
    out = np.stack([1 - v - w, v, w], 1)  # inside
    zero, one = np.zeros_like(d1), np.ones_like(d1)
    t = ratio(d4 - d3, (d4 - d3) + (d5 - d6))
    regions = [
        ((va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0), np.stack([zero, 1 - t, t], 1)),  # edge bc
        ((vb <= 0) & (d2 >= 0) & (d6 <= 0), np.stack([1 - ratio(d2, d2 - d6), zero, ratio(d2, d2 - d6)], 1)),
        ((d6 >= 0) & (d5 <= d6), np.stack([zero, zero, one], 1)),  # vertex c
        ((vc <= 0) & (d1 >= 0) & (d3 <= 0), np.stack([1 - ratio(d1, d1 - d3), ratio(d1, d1 - d3), zero], 1)),
        ((d3 >= 0) & (d4 <= d3), np.stack([zero, one, zero], 1)),  # vertex b
        ((d1 <= 0) & (d2 <= 0), np.stack([one, zero, zero], 1)),  # vertex a
    ]
    for mask, bary in regions:
        out[mask] = bary[mask]
    out = np.clip(out, 0.0, 1.0)
    return out / out.sum(1, keepdims=True)


def snap_to_surface(points: np.ndarray, verts: np.ndarray, faces: np.ndarray, allowed: np.ndarray,
                    candidates: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest surface point of each of points N x 3 on the allowed triangles (allowed: F bool) of the mesh
    verts V x 3, faces F x 3 -> (face N int64, bary N x 3 float64, distance N metres). Searches the
    `candidates` allowed triangles with the nearest centroids (exact for the dense meshes used here)."""
    ids = np.nonzero(allowed)[0]
    tri = verts[faces[ids]]  # K x 3 x 3
    centroid = tri.mean(1)
    k = min(candidates, len(ids))
    out_f = np.zeros(len(points), np.int64)
    out_b = np.zeros((len(points), 3))
    out_d = np.zeros(len(points))
    for i, p in enumerate(np.asarray(points, np.float64)):
        near = np.argpartition(((centroid - p) ** 2).sum(1), k - 1)[:k]
        t = tri[near]
        bary = closest_points_on_triangles(np.tile(p, (k, 1)), t[:, 0], t[:, 1], t[:, 2])
        q = (bary[:, :, None] * t).sum(1)
        d = np.linalg.norm(q - p, axis=1)
        j = int(np.argmin(d))
        out_f[i], out_b[i], out_d[i] = ids[near[j]], bary[j], d[j]
    return out_f, out_b, out_d


def surface_points(verts: np.ndarray, faces: np.ndarray, face: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """verts V x 3, faces F x 3, face N, bary N x 3 -> N x 3."""
    return (verts[faces[face]] * np.asarray(bary)[:, :, None]).sum(1)


def _screen_bary(pts: np.ndarray, tri: np.ndarray) -> np.ndarray:
    """Barycentrics (unclipped) of points n x 2 in screen triangles n x 3 x 2."""
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    v0, v1, v2 = b - a, c - a, pts - a
    den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
    den = np.where(np.abs(den) < 1e-12, 1e-12, den)
    bv = (v2[:, 0] * v1[:, 1] - v1[:, 0] * v2[:, 1]) / den
    bw = (v0[:, 0] * v2[:, 1] - v2[:, 0] * v0[:, 1]) / den
    return np.stack([1 - bv - bw, bv, bw], 1)


def unproject(points2d: np.ndarray, screen: np.ndarray, faces: np.ndarray, pix_to_face: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Which surface point a 2D point sees: points2d N x 2 (screen pixels, corner origin), screen V x 3
    (the render's screen-space vertices), faces F x 3, pix_to_face H x W (-1 empty) -> face N int64 (-1
    where the pixel is empty or outside) and bary N x 3 (the point's screen barycentrics in that
    triangle). The triangle is the one at the point's pixel centre, or, when the point itself lies
    outside it, the neighbouring pixels' triangle that holds it (else the barycentrics are clipped)."""
    h, w = pix_to_face.shape
    pts = np.asarray(points2d, np.float64)
    finite = np.isfinite(pts).all(1)
    col = np.floor(np.where(finite, pts[:, 0], -1)).astype(int)
    row = np.floor(np.where(finite, pts[:, 1], -1)).astype(int)
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    face = np.full(len(pts), -1, np.int64)
    face[inside] = pix_to_face[row[inside], col[inside]]
    bary = np.zeros((len(pts), 3))
    hit = face >= 0
    if not hit.any():
        return face, bary
    xy = screen[:, :2].astype(np.float64)
    bary[hit] = _screen_bary(pts[hit], xy[faces[face[hit]]])
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            out = hit & (bary.min(1) < -1e-9)
            if not out.any():
                break
            r, c = np.clip(row + dr, 0, h - 1), np.clip(col + dc, 0, w - 1)
            other = np.where(out, pix_to_face[r, c], -1)
            cand = other >= 0
            if cand.any():
                b = _screen_bary(pts[cand], xy[faces[other[cand]]])
                better = b.min(1) > bary[cand].min(1)
                idx = np.nonzero(cand)[0][better]
                face[idx], bary[idx] = other[idx], b[better]
    bb = np.clip(bary[hit], 0, None)
    bary[hit] = bb / bb.sum(1, keepdims=True).clip(1e-12)
    return face, bary


@dataclass
class View:
    """One derivation render. image H x W x 3 uint8, screen V x 3 (screen-space vertices: x, y pixels,
    depth, smaller = nearer), pix_to_face H x W int64 (-1 empty), normals V x 3 (unit, screen axes
    x right, y down, z away from the camera), yaw/pitch degrees, eye_pix_to_face H x W: the eyeball
    triangles alone rasterized (indices into the full faces; None for a model without eyeballs), so that
    iris points hidden under the eyelids still find the eyeball behind them."""

    image: np.ndarray
    screen: np.ndarray
    pix_to_face: np.ndarray
    normals: np.ndarray
    yaw: float
    pitch: float
    eye_pix_to_face: np.ndarray | None = None


def _visible(view: View, faces: np.ndarray, face: np.ndarray, bary: np.ndarray, pix_to_face: np.ndarray
             ) -> np.ndarray:
    """(N,) bool: the surface points (face, bary) face the camera (VISIBLE_COS) and are not hidden in the
    rasterization pix_to_face."""
    pos = surface_points(view.screen, faces, face, bary)
    normal = surface_points(view.normals, faces, face, bary)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True).clip(1e-12)
    facing = -normal[:, 2] > VISIBLE_COS
    seen_face, seen_bary = unproject(pos[:, :2], view.screen, faces, pix_to_face)
    ok = seen_face >= 0
    depth = np.full(len(pos), np.inf)
    depth[ok] = surface_points(view.screen, faces, seen_face[ok], seen_bary[ok])[:, 2]
    return facing & ok & (pos[:, 2] <= depth + DEPTH_TOL)


def solve_dense_embedding(template: np.ndarray, faces: np.ndarray, eyeballs: np.ndarray, views: list[View],
                          detections: list[np.ndarray | None], outer: np.ndarray | None = None, rounds: int = 3
                          ) -> tuple[DenseEmbedding, np.ndarray]:
    """The surface point that best explains each point's detections.

    template V x 3 (the neutral mesh, where hits are compared), faces F x 3, eyeballs V bool, views and
    their detections (N x 2 screen pixels each, N = 478 or 468; None: nothing found), outer F bool (the
    triangles mesh points may sit on, default all: see outer_faces; the mouth's inside is not) ->
    (embedding, spread (478,) metres: the median distance of the kept hits to the result)."""
    n = N_POINTS
    eye_face = eyeballs[faces].all(1)
    skin = ~eye_face & (np.ones(len(faces), bool) if outer is None else outer)
    has_eyes = bool(eye_face.any())
    hits_pos = np.full((len(views), n, 3), np.nan)
    hits_eye = np.zeros((len(views), n), bool)
    hits_skin = np.zeros((len(views), n), bool)
    for k, (view, det) in enumerate(zip(views, detections, strict=True)):
        if det is None:
            continue
        m = min(len(det), n)
        face, bary = unproject(det[:m], view.screen, faces, view.pix_to_face)
        if view.eye_pix_to_face is not None and m > N_MESH:  # iris: the eyeball, even under the lids
            face[N_MESH:], bary[N_MESH:] = unproject(det[N_MESH:m], view.screen, faces, view.eye_pix_to_face)
        ok = face >= 0
        # a hit must face the camera: through an open mouth without a mouth cavity the renderer shows the
        # inside of the head (no back-face culling), whose outward normals point away
        normal = surface_points(view.normals, faces, np.where(ok, face, 0), bary)
        ok &= -normal[:, 2] > 0.05 * np.linalg.norm(normal, axis=1)
        hits_pos[k, :m][ok] = surface_points(template, faces, face[ok], bary[ok])
        hits_eye[k, :m][ok] = eye_face[face[ok]]
        hits_skin[k, :m][ok] = skin[face[ok]]
    iris = np.zeros(n, bool)
    iris[list(IRIS)] = True
    # mesh points use skin hits (others only where a point has nothing else); iris points eyeball hits
    usable = np.isfinite(hits_pos[..., 0]) & np.where(iris[None], hits_eye, hits_skin)
    only_eye = ~usable.any(0) & ~iris
    usable[:, only_eye] = np.isfinite(hits_pos[:, only_eye, 0])
    allowed = {False: skin, True: eye_face if has_eyes else skin}
    frontal = np.array([abs(v.yaw) <= 15 and abs(v.pitch) <= 15 for v in views])
    use = usable & frontal[:, None]
    use[:, ~use.any(0)] = usable[:, ~use.any(0)]
    face = np.zeros(n, np.int64)
    bary = np.tile([1.0, 0.0, 0.0], (n, 1))
    found = use.any(0)
    for r in range(rounds + 1):
        est = np.array([np.median(hits_pos[use[:, i], i], axis=0) if use[:, i].any() else np.zeros(3)
                        for i in range(n)])
        for group in (False, True):
            sel = found & (iris == group)
            if sel.any():
                face[sel], bary[sel], _ = snap_to_surface(est[sel], template, faces, allowed[group])
        if r == rounds:
            break
        at = surface_points(template, faces, face, bary)
        vis = np.stack([np.where(iris, _visible(v, faces, face, bary, v.pix_to_face if v.eye_pix_to_face is None
                                                else v.eye_pix_to_face), _visible(v, faces, face, bary, v.pix_to_face))
                        for v in views])
        close = np.linalg.norm(np.nan_to_num(hits_pos, nan=1e3) - at[None], axis=2) < OUTLIER_M
        new = usable & vis & close
        few = new.sum(0) < 2  # e.g. a crease (lip corners): take the close hits, seen or not
        new[:, few] = (usable & close)[:, few]
        keep = new.sum(0) >= 2  # else the point keeps its previous hits
        use[:, keep] = new[:, keep]
    at = surface_points(template, faces, face, bary)
    spread = np.array([np.median(np.linalg.norm(hits_pos[use[:, i], i] - at[i], axis=1)) if use[:, i].any()
                       else np.inf for i in range(n)])
    count = use.sum(0)
    valid = found & (count >= 2)
    if not has_eyes:
        valid &= ~iris
    conf = np.where(valid, np.minimum(1.0, count / 4.0) / (1.0 + (spread / SPREAD_HALF) ** 2), 0.0)
    face[~valid], bary[~valid] = 0, (1.0, 0.0, 0.0)
    emb = DenseEmbedding(face, bary.astype(np.float32), valid, conf.astype(np.float32), mesh_hash(template, faces),
                         len(faces))
    return emb, spread


# ----------------------------------------------------------------------------- derivation: renders
def derivation_albedo(template: np.ndarray, faces: np.ndarray, weights: np.ndarray, landmarks68: np.ndarray,
                      eye_centres: np.ndarray) -> np.ndarray:
    """Per-vertex colour (V, 3) in [0, 1] that MediaPipe reads as a face: skin, darker lips (inside the
    68-point outer lip contour), dark brows (a band along the brow points), white eyeballs with a brown iris
    of 5.9 mm radius (the human mean) and a black pupil. template V x 3, landmarks68 68 x 3 (frontal, on the
    template), eye_centres 2 x 3 (eye joints)."""
    import cv2

    colour = np.tile(np.array([0.72, 0.54, 0.45]), (len(template), 1))
    xy = template[:, :2]
    front = template[:, 2] > np.percentile(template[:, 2], 50)
    lips = landmarks68[48:60, :2].astype(np.float32)
    scale = 1e4  # cv2 polygons in 0.1 mm units
    inside = np.array([cv2.pointPolygonTest(lips * scale, (float(x * scale), float(y * scale)), False) >= 0
                       for x, y in xy]) & front
    colour[inside] = (0.62, 0.30, 0.30)
    for brow in (landmarks68[17:22], landmarks68[22:27]):
        d = np.full(len(template), np.inf)
        for a, b in zip(brow[:-1, :2], brow[1:, :2], strict=True):
            t = np.clip(((xy - a) @ (b - a)) / ((b - a) @ (b - a)), 0, 1)
            d = np.minimum(d, np.linalg.norm(xy - (a + t[:, None] * (b - a)), axis=1))
        colour[(d < 0.0035) & front] = (0.22, 0.15, 0.11)
    eyes = eyeball_vertices(weights)
    for c in eye_centres:
        mine = eyes & (np.linalg.norm(template - c, axis=1) < 0.03)
        lateral = np.linalg.norm(template[:, :2] - c[:2], axis=1)
        ahead = template[:, 2] > c[2]
        colour[mine] = (0.88, 0.86, 0.82)
        colour[mine & ahead & (lateral < 0.0059)] = (0.33, 0.22, 0.14)
        colour[mine & ahead & (lateral < 0.0022)] = (0.03, 0.03, 0.03)
    return colour


def render_views(model, views=DEFAULT_VIEWS, res: int = RENDER_RES, seed: int = 0,
                 expression_sigma: float = 0.3) -> list[View]:
    """The derivation's renders of a FlameModel: the painted albedo (derivation_albedo), a soft key light,
    a grey gradient background, poses (yaw, pitch) in degrees; every view but the first gets a small
    random expression (N(0, expression_sigma^2) coefficients) and jaw opening."""
    from fitter.outputs import preview_light
    from fitter.params import FitParams
    from fitter.render import rasterize
    from fitter.shading import vertex_normals
    from fitter.synth import synthesize
    from priors.flame import vertices2landmarks

    rng = np.random.default_rng(seed)
    template, faces = model_mesh(model)
    weights = model.weights.detach().cpu().numpy()
    J = (model.J_regressor @ model.v_template).detach().cpu().numpy()
    with torch.no_grad():
        lmk = vertices2landmarks(model.v_template[None], model.faces, model.full_faces[None],
                                 model.full_bary[None])[0].cpu().numpy()
    albedo = derivation_albedo(template, faces, weights, lmk, J[3:5])
    # frame any model alike: the 68 landmarks span FACE_FILL of the image's half-width, centred a little
    # below the middle (the stand-in: cam (7.0, 0, -0.01))
    lo, hi = lmk[:, :2].min(0), lmk[:, :2].max(0)
    extent = float((hi - lo).max())
    centre = (lo + hi) / 2
    cam = torch.tensor([[FACE_FILL / extent, -centre[0], -centre[1] - FACE_RAISE * extent]], dtype=torch.float32)
    eye_ids = np.nonzero(eyeball_vertices(weights)[faces].all(1))[0]
    yy, xx = np.mgrid[0:res, 0:res] / res
    bg = np.stack([0.30 + 0.10 * xx, 0.32 + 0.05 * yy, 0.36 - 0.08 * xx], 0)[None].astype(np.float32)
    out = []
    for k, (yaw, pitch) in enumerate(views):
        p = FitParams.initial(1, model.n_shape, model.n_exp, model.n_verts)
        if k:
            p.exp = torch.as_tensor(rng.normal(0, expression_sigma, (1, model.n_exp)), dtype=torch.float32)
            p.jaw_pose = torch.tensor([[float(rng.uniform(0.0, 0.08)), 0.0, 0.0]])
        p.global_pose = torch.tensor([[np.deg2rad(pitch), np.deg2rad(yaw), 0.0]], dtype=torch.float32)
        p.cam = cam
        p.light = preview_light(1)
        p.albedo = torch.as_tensor(albedo, dtype=torch.float32)[None]
        with torch.no_grad():
            pred = synthesize(model, p, res, background=torch.from_numpy(bg))
            screen = pred["screen"][0]
            normals = vertex_normals(pred["vertices"], model.faces)[0]
        n = normals.cpu().numpy() * np.array([1.0, -1.0, -1.0])  # model (y up, z to camera) -> screen axes
        image = (pred["image"][0].permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        eye_p2f = None
        if len(eye_ids):
            with torch.no_grad():
                local = rasterize(screen[None], model.faces[torch.as_tensor(eye_ids)], res, res).pix_to_face[0]
            local = local.cpu().numpy()
            eye_p2f = np.where(local >= 0, eye_ids[np.clip(local, 0, None)], -1)
        out.append(View(image, screen.cpu().numpy().astype(np.float64), pred["pix_to_face"][0].cpu().numpy(),
                        n, float(yaw), float(pitch), eye_p2f))
    return out


def outer_faces(template: np.ndarray, faces: np.ndarray, res: int = 512,
                angles=((0, 0), (-35, 0), (35, 0), (-70, 0), (70, 0), (0, -30), (0, 30), (-35, 20), (35, 20))
                ) -> np.ndarray:
    """F bool: the triangles of the neutral mesh (template V x 3, faces F x 3) that some orthographic view
    from the front half (yaw, pitch degrees) sees: the outer skin, not the inside of the mouth or the
    lips' hidden inner faces, where no detector's point can be. Triangles too small to cover a pixel centre
    count when they share a vertex with a seen one."""
    from fitter.render import rasterize

    seen = np.zeros(len(faces), bool)
    f = torch.as_tensor(faces)
    centre = (template.max(0) + template.min(0)) / 2
    half = 0.55 * float(np.ptp(template, axis=0).max())
    for yaw, pitch in angles:
        a, b = np.deg2rad(yaw), np.deg2rad(pitch)
        Ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
        Rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        v = (template - centre) @ (Rx @ Ry).T
        screen = np.stack([(v[:, 0] / half + 1) * res / 2, (1 - v[:, 1] / half) * res / 2, -v[:, 2]], 1)
        with torch.no_grad():
            p2f = rasterize(torch.as_tensor(screen, dtype=torch.float32)[None], f, res, res).pix_to_face[0]
        seen[np.unique(p2f[p2f >= 0].numpy())] = True
    touched = np.zeros(len(template), bool)
    touched[faces[seen].ravel()] = True
    area = np.linalg.norm(np.cross(template[faces[:, 1]] - template[faces[:, 0]],
                                   template[faces[:, 2]] - template[faces[:, 0]]), axis=1) / 2
    pixel_area = (2 * half / res) ** 2
    return seen | (touched[faces].any(1) & (area < pixel_area))


def mediapipe_detector(image: np.ndarray, view: View | None = None) -> np.ndarray | None:
    """The derivation's detector: MediaPipe's 478 points (x, y pixels) of the largest face, or None."""
    from fitter.detect import N_MESH as _N, mediapipe_meshes

    meshes = mediapipe_meshes(image, retry=False)
    if not meshes:
        return None
    return max(meshes, key=lambda m: float(np.prod(np.ptp(m[:_N, :2], axis=0))))[:, :2]


Detector = Callable[[np.ndarray, View], "np.ndarray | None"]


def derive_dense_embedding(model, detector: Detector | None = None, views=DEFAULT_VIEWS, res: int = RENDER_RES,
                           rendered: list[View] | None = None) -> DenseEmbedding:
    """Derive the 478-point embedding of a FlameModel by rendering it and detecting on the renders.

    detector(image H x W x 3 uint8, view) -> 478 x 2 screen points or None (default: MediaPipe; the view is
    passed so tests can inject a detector that projects known surface points). `rendered`: reuse renders.
    Stand-in model (12,788 vertices), 15 views at 512 px: see the report for the time."""
    detector = detector or mediapipe_detector
    rendered = rendered if rendered is not None else render_views(model, views, res)
    detections = [detector(v.image, v) for v in rendered]
    if sum(d is not None for d in detections) < 2:
        raise AssetError(f"model {getattr(model, 'tag', '?')}: the detector found the rendered head in fewer than "
                         "2 of its renders, so no MediaPipe embedding can be derived; fix: install one with "
                         "`cli.py assets install FILE`")
    template, faces = model_mesh(model)
    eyes = eyeball_vertices(model.weights.detach().cpu().numpy())
    outer = outer_faces(template, faces)
    emb, _ = solve_dense_embedding(template.astype(np.float64), faces, eyes, rendered, detections, outer)
    return emb



# ----------------------------------------------------------------------------- one person's embedding
REFIT_RADIUS = 0.012  # metres: how far on the template a point may move for one person
REFIT_SIGMA_MOVE = 0.005  # metres: the prior's scale on that move
REFIT_SIGMA_DET = 0.002  # metres at the face: the detector's own scatter per point and view
REFIT_ROBUST = 4.0  # sigma_det units: a view's error past this counts less and less (Cauchy), so that one
# bad keyframe (a blink, a hand, a wrong fit) cannot drag a point that the other views hold
REFIT_BARY_STEPS = 2  # barycentric grid per candidate triangle (corners and edge middles: ~1 mm apart on the
# stand-in's 2 mm triangles)


def _bary_grid(steps: int) -> np.ndarray:
    return np.array([(i, j, steps - i - j) for i in range(steps + 1) for j in range(steps + 1 - i)],
                    np.float64) / steps


def refit_embedding(face: np.ndarray, bary: np.ndarray, template: np.ndarray, faces: np.ndarray,
                    posed: np.ndarray, K: np.ndarray, detections: np.ndarray, weights: np.ndarray,
                    radius: float = REFIT_RADIUS, sigma_move: float = REFIT_SIGMA_MOVE,
                    sigma_det: float = REFIT_SIGMA_DET, steps: int = REFIT_BARY_STEPS,
                    labels: np.ndarray | None = None, robust: float = REFIT_ROBUST) -> tuple[np.ndarray, np.ndarray]:
    """Surface points (face N, bary N x 3) moved to where one person's detections put them.

    A detector places its points on a face by what it learnt of faces in general; on one person it
    misses some of them the same way in every view (MediaPipe's leans towards its mean face). Given fits
    of that person in several views (posed vertices K x V x 3 in camera space, OpenCV axes, with their
    intrinsics K x 3 x 3) and the detections there (K x N x 2 pixels, weights K x N), each point moves to
    the surface point within `radius` of it on the template (V x 3; faces F x 3; the candidates are
    triangles facing the same way as the point's own and with its label, labels F, when given, e.g. the
    joint that moves them, so that a point on the upper lip cannot become one on the lower lip; they are
    sampled on a barycentric grid) that minimises

        sum_k w_k rho(|detection_k - projection_k|^2 / (sigma_det * f_k / z_k)^2) + |move|^2 / sigma_move^2,

    the reprojection error in pixels scaled to metres at the point's depth z_k, through Cauchy's
    rho(e) = robust^2 log(1 + e / robust^2) (about e while small; one wild view cannot outweigh the
    others), plus a Gaussian prior on the move. A point with no weight in any view stays where it was
    (the prior's minimum)."""
    template = np.asarray(template, np.float64)
    tri = template[faces]
    centroid = tri.mean(1)
    normal = face_normals(template, faces)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True).clip(1e-18)
    size = np.linalg.norm(tri - centroid[:, None], axis=2).max(1)  # a triangle lies within this of its centroid
    grid = _bary_grid(steps)
    out_f, out_b = face.astype(np.int64).copy(), np.asarray(bary, np.float64).copy()
    here = surface_points(template, faces, out_f, out_b)
    posed = np.asarray(posed, np.float64)
    fx, fy, cx, cy = (np.asarray(K, np.float64)[:, i, j][:, None] for i, j in ((0, 0), (1, 1), (0, 2), (1, 2)))
    seen = np.nonzero(np.asarray(weights).sum(0) > 0)[0]
    for chunk in np.array_split(seen, max(1, len(seen) // 64)):
        d2 = (centroid ** 2).sum(1)[None] + (here[chunk] ** 2).sum(1)[:, None] - 2 * here[chunk] @ centroid.T
        reach = d2 < (radius + size[None]) ** 2
        reach &= (normal[out_f[chunk]] @ normal.T) > 0.5  # facing the point's own way (not the mouth's inside)
        if labels is not None:
            reach &= labels[out_f[chunk]][:, None] == labels[None]
        for n, row in zip(chunk, reach, strict=True):
            near = np.union1d(np.nonzero(row)[0], out_f[n:n + 1])
            cand_f = np.concatenate([np.repeat(near, len(grid)), out_f[n:n + 1]])  # and the point's own place
            cand_b = np.concatenate([np.tile(grid, (len(near), 1)), out_b[n:n + 1]])
            move = np.linalg.norm(surface_points(template, faces, cand_f, cand_b) - here[n], axis=1)
            keep = move <= radius
            cand_f, cand_b, move = cand_f[keep], cand_b[keep], move[keep]
            pts = np.einsum("kcij,ci->kcj", posed[:, faces[cand_f]], cand_b)  # K x C x 3
            z = pts[..., 2].clip(1e-6)
            u, v = fx * pts[..., 0] / z + cx, fy * pts[..., 1] / z + cy
            det = detections[:, n]
            err = ((u - det[:, :1]) ** 2 + (v - det[:, 1:]) ** 2) / (sigma_det * fx / z) ** 2  # in sigma_det units
            err = robust ** 2 * np.log1p(err / robust ** 2)
            cost = np.nan_to_num(weights[:, n:n + 1] * err, nan=0.0).sum(0) + (move / sigma_move) ** 2
            best = int(np.argmin(cost))
            out_f[n], out_b[n] = cand_f[best], cand_b[best]
    return out_f, out_b.astype(np.float32)
