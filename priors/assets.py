"""Loading, validating and caching FLAME-format assets (model, landmark embedding, textures).

The dataclasses below are the contract between asset loading and the rest of flamefit:
everything downstream sees plain numpy arrays with documented shapes and dtypes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from priors.errors import AssetError
from priors.safe_pickle import load_npy, load_pickle, to_array


@dataclass
class LandmarkEmbedding:
    """68 iBUG landmarks as barycentric points on mesh triangles (DECA's layout).

    static_faces (51,) int64, static_bary (51, 3) float32: points 17-67.
    dynamic_faces (79, 17) int64, dynamic_bary (79, 17, 3) float32: jaw contour points 0-16,
        row r for yaw a = r degrees (r <= 39) and a = 39 - r (r >= 40).
    full_faces (68,) int64, full_bary (68, 3) float32: all 68 points, frontal contour.
    """

    static_faces: np.ndarray
    static_bary: np.ndarray
    dynamic_faces: np.ndarray
    dynamic_bary: np.ndarray
    full_faces: np.ndarray
    full_bary: np.ndarray


@dataclass
class FlameAssets:
    """A FLAME-format head model as plain arrays.

    v_template (V, 3) float32, metres; faces (F, 3) int64;
    shapedirs (V, 3, n_shape) float32 identity basis; expdirs (V, 3, n_exp) float32;
    posedirs (V, 3, P) float32 pose correctives (P = 9 * (J - 1));
    J_regressor (J, V) float32 dense; weights (V, J) float32; parents (J,) int64, parents[0] = -1.
    name: short model name; sha256: hex digest of the source file; source: where it came from.
    """

    name: str
    sha256: str
    source: str
    v_template: np.ndarray
    faces: np.ndarray
    shapedirs: np.ndarray
    expdirs: np.ndarray
    posedirs: np.ndarray
    J_regressor: np.ndarray
    weights: np.ndarray
    parents: np.ndarray
    landmarks: LandmarkEmbedding | None = None

    @property
    def n_verts(self) -> int:
        return int(self.v_template.shape[0])

    @property
    def n_shape(self) -> int:
        return int(self.shapedirs.shape[2])

    @property
    def n_exp(self) -> int:
        return int(self.expdirs.shape[2])

    @property
    def tag(self) -> str:
        """'name + sha256' as written into fit.npz's `model` field."""
        return f"{self.name} sha256:{self.sha256}"


# =============================================================================== loading
# Everything below turns files into the dataclasses above. Errors are one-line AssetErrors
# naming the file (and key) and the fix.


FLAME_URL = "https://flame.is.tue.mpg.de"
CACHE_VERSION = 1
#: model files looked for inside a folder, in this order
MODEL_FILE_NAMES = ("model.npz", "generic_model.pkl", "flame2023.pkl", "flame2023_Open.pkl",
                    "flame2023_no_jaw.pkl", "female_model.pkl", "male_model.pkl")
DECA_EMBEDDING = "landmark_embedding.npy"
RINGNET_STATIC = "flame_static_embedding.pkl"
RINGNET_DYNAMIC = "flame_dynamic_embedding.npy"
#: names that are FLAME-side files but not models
_NOT_MODELS = {DECA_EMBEDDING, RINGNET_STATIC, RINGNET_DYNAMIC, "FLAME_masks.pkl",
               "FLAME_texture.npz", "FLAME_albedo_from_BFM.npz"}
_GENERIC_STEMS = {"generic_model", "model"}
_N_IDENTITY = 300  # FLAME's shapedirs: columns 0..299 identity, 300.. expression
_FIX_MODEL = f"fix: use an original FLAME model file ({FLAME_URL}) or re-install it"
_FIX_EMB = (f"fix: use DECA's data/{DECA_EMBEDDING} (or RingNet's {RINGNET_STATIC} + "
            f"{RINGNET_DYNAMIC}) made for this model")
_REPO_ROOT = Path(__file__).resolve().parent.parent

_MEMO: dict[tuple, FlameAssets] = {}
_MEMO_MAX = 8


# ------------------------------------------------------------------------------ locations

def flamefit_home() -> Path:
    """Where installed assets live: `$FLAMEFIT_HOME`, default `~/.cache/flamefit`."""
    env = os.environ.get("FLAMEFIT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flamefit"


def standin_dir() -> Path:
    """The ICT-FLAME stand-in folder: `<repo root>/../shared/models/ict-flame` (may not exist)."""
    return _REPO_ROOT.parent / "shared" / "models" / "ict-flame"


def installed_models(home: Path | None = None) -> list[Path]:
    """`<home>/models/*/model.npz`, most recently installed first."""
    root = Path(home) if home is not None else flamefit_home()
    found = [p for p in (root / "models").glob("*/model.npz") if p.is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def resolve_model_path(explicit: str | Path | None = None) -> Path:
    """Which model to use: explicit `--model PATH` > `$FLAMEFIT_MODEL` > the newest installed
    cache > the ICT-FLAME stand-in next to the repository. Raises AssetError if none exists."""
    if explicit is not None and str(explicit) != "":
        p = Path(explicit).expanduser()
        if not p.exists():
            raise AssetError(f"{p}: model path does not exist; fix: pass an existing FLAME .pkl, "
                             "an installed model.npz or a folder holding one")
        return p
    env = os.environ.get("FLAMEFIT_MODEL")
    if env:
        p = Path(env).expanduser()
        if not p.exists():
            raise AssetError(f"{p} (from $FLAMEFIT_MODEL): model path does not exist; "
                             "fix: point FLAMEFIT_MODEL at an existing model or unset it")
        return p
    cached = installed_models()
    if cached:
        return cached[0]
    if standin_dir().is_dir():
        return standin_dir()
    raise AssetError(
        f"no FLAME model found (no --model, no $FLAMEFIT_MODEL, nothing installed in "
        f"{flamefit_home() / 'models'}); fix: download FLAME from {FLAME_URL} (FLAME 2023 Open "
        "is CC-BY-4.0), then run `python cli.py assets install PATH`"
    )


def find_model_file(path: str | Path) -> Path:
    """The model file for `path`: the file itself, or the first of MODEL_FILE_NAMES (then the
    only other model-like .pkl/.npz) inside a folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise AssetError(f"{p}: model path does not exist; fix: check the path")
    if p.is_file():
        return p
    for name in MODEL_FILE_NAMES:
        if (p / name).is_file():
            return p / name
    others = sorted(q for q in p.iterdir() if q.suffix in (".pkl", ".npz")
                    and q.name not in _NOT_MODELS and q.is_file())
    if len(others) == 1:
        return others[0]
    what = ", ".join(q.name for q in others) if others else "none"
    raise AssetError(f"{p}: cannot tell which file is the model (model-like files: {what}); "
                     f"fix: pass the model file itself, e.g. {p / 'generic_model.pkl'}")


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _model_name(model_file: Path, container: Path | None = None) -> str:
    """Short name: the folder (or zip) name for generic file names, the file stem otherwise."""
    stem = model_file.stem
    if stem in _GENERIC_STEMS:
        holder = container if container is not None else model_file.parent
        stem = holder.stem if holder.is_file() else holder.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "model"


# --------------------------------------------------------------------------- validation

def _err(label: str, key: str, problem: str, fix: str = _FIX_MODEL) -> AssetError:
    return AssetError(f"{label}: key '{key}' {problem}; {fix}")


def _get(raw: dict, key: str, label: str, fix: str = _FIX_MODEL) -> np.ndarray:
    """raw[key] as an ndarray (chumpy/sparse unwrapped); AssetError if missing or not an array."""
    if key not in raw:
        have = ", ".join(sorted(map(str, raw)))[:200]
        raise _err(label, key, f"is missing (the file has: {have})", fix)
    try:
        return np.asarray(to_array(raw[key]))
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise _err(label, key, f"cannot be read as an array ({exc})", fix) from exc


def _shape_ok(arr: np.ndarray, shape: tuple) -> bool:
    if arr.ndim != len(shape):
        return False
    return all(s is None or s == a for s, a in zip(shape, arr.shape, strict=True))


def _fmt_shape(shape: tuple) -> str:
    return "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"


def _floats(arr: np.ndarray, key: str, label: str, shape: tuple,
            fix: str = _FIX_MODEL) -> np.ndarray:
    """Check a float array's shape and finiteness; return it as float32."""
    if not _shape_ok(arr, shape):
        raise _err(label, key, f"has shape {arr.shape}, expected {_fmt_shape(shape)}", fix)
    if arr.dtype.kind not in "fiu":
        raise _err(label, key, f"has dtype {arr.dtype}, expected floats", fix)
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise _err(label, key, "holds NaN or infinite values", fix)
    return out


def _indices(arr: np.ndarray, key: str, label: str, shape: tuple, upper: int | None,
             fix: str = _FIX_MODEL) -> np.ndarray:
    """Check an integer index array's shape and range [0, upper); return it as int64."""
    if not _shape_ok(arr, shape):
        raise _err(label, key, f"has shape {arr.shape}, expected {_fmt_shape(shape)}", fix)
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and arr.size and np.all(np.mod(arr, 1) == 0):
            arr = arr.astype(np.int64)
        else:
            raise _err(label, key, f"has dtype {arr.dtype}, expected integers", fix)
    out = np.ascontiguousarray(arr, dtype=np.int64)
    if out.size and (out.min() < 0 or (upper is not None and out.max() >= upper)):
        bad = int(out.min()) if out.min() < 0 else int(out.max())
        limit = f"[0, {upper})" if upper is not None else ">= 0"
        raise _err(label, key, f"holds index {bad}, outside {limit}", fix)
    return out


def _used_columns(block: np.ndarray) -> int:
    """Number of columns up to the last one that is not all zero. block: (V, 3, K)."""
    if block.shape[2] == 0:
        return 0
    nonzero = np.flatnonzero(np.any(block != 0, axis=(0, 1)))
    return int(nonzero[-1]) + 1 if nonzero.size else 0


def _parents(kintree: np.ndarray, n_joints: int, label: str) -> np.ndarray:
    """kintree_table (2, J) -> parents (J,) int64 with parents[0] = -1."""
    if not _shape_ok(kintree, (2, n_joints)) or kintree.dtype.kind not in "iuf":
        raise _err(label, "kintree_table", f"has shape {kintree.shape} / dtype {kintree.dtype}, "
                   f"expected (2, {n_joints}) integers")
    table = kintree.astype(np.int64)
    if not np.array_equal(table[1], np.arange(n_joints)):
        raise _err(label, "kintree_table", f"row 1 is {table[1].tolist()}, expected joint ids "
                   f"0..{n_joints - 1} in order")
    parents = table[0].copy()
    if parents[0] not in (-1, 4294967295):
        raise _err(label, "kintree_table", f"root parent is {parents[0]}, expected 4294967295")
    parents[0] = -1
    for j in range(1, n_joints):
        if not 0 <= parents[j] < j:
            raise _err(label, "kintree_table", f"joint {j} has parent {parents[j]}; each parent "
                       "must be an earlier joint")
    return parents


def _split_dirs(raw: dict, label: str, n_verts: int) -> tuple[np.ndarray, np.ndarray]:
    """Identity and expression blocks (full width) from FLAME's shapedirs (or an 'expdirs' key)."""
    shapedirs = _get(raw, "shapedirs", label)
    if "expdirs" in raw:
        exp = _floats(_get(raw, "expdirs", label), "expdirs", label, (n_verts, 3, None))
        return _floats(shapedirs, "shapedirs", label, (n_verts, 3, None)), exp
    dirs = _floats(shapedirs, "shapedirs", label, (n_verts, 3, None))
    if dirs.shape[2] <= _N_IDENTITY:
        raise _err(label, "shapedirs", f"has {dirs.shape[2]} columns, expected FLAME's 400 "
                   "(0-299 identity, 300-399 expression)")
    return dirs[:, :, :_N_IDENTITY], dirs[:, :, _N_IDENTITY:]


def _canonical_from_flame(raw: dict, label: str) -> dict[str, Any]:
    """Validate a FLAME-layout dict (pkl or plain npz) into canonical arrays (full blocks)."""
    v = _floats(_get(raw, "v_template", label), "v_template", label, (None, 3))
    n_verts = v.shape[0]
    faces = _indices(_get(raw, "f", label), "f", label, (None, 3), n_verts)
    shape_block, exp_block = _split_dirs(raw, label, n_verts)
    weights_raw = _get(raw, "weights", label)
    n_joints = weights_raw.shape[1] if weights_raw.ndim == 2 else -1
    if n_joints < 1:
        raise _err(label, "weights", f"has shape {weights_raw.shape}, expected ({n_verts}, J)")
    weights = _floats(weights_raw, "weights", label, (n_verts, n_joints))
    return {
        "v_template": v, "faces": faces, "shapedirs": shape_block, "expdirs": exp_block,
        "posedirs": _get(raw, "posedirs", label), "J_regressor": _get(raw, "J_regressor", label),
        "weights": weights, "parents": _parents(_get(raw, "kintree_table", label), n_joints, label),
    }


def _canonical_from_cache(raw: dict, label: str) -> dict[str, Any]:
    """Our own model.npz: arrays stored under their FlameAssets names."""
    v = _floats(_get(raw, "v_template", label), "v_template", label, (None, 3))
    n_verts = v.shape[0]
    weights = _get(raw, "weights", label)
    n_joints = weights.shape[1] if weights.ndim == 2 else 0
    parents = _get(raw, "parents", label)
    if not _shape_ok(parents, (n_joints,)) or parents.dtype.kind not in "iu":
        raise _err(label, "parents", f"has shape {parents.shape}, expected ({n_joints},) ints")
    kintree = np.stack([np.where(parents < 0, 4294967295, parents), np.arange(n_joints)])
    return {
        "v_template": v,
        "faces": _indices(_get(raw, "faces", label), "faces", label, (None, 3), n_verts),
        "shapedirs": _floats(_get(raw, "shapedirs", label), "shapedirs", label, (n_verts, 3, None)),
        "expdirs": _floats(_get(raw, "expdirs", label), "expdirs", label, (n_verts, 3, None)),
        "posedirs": _get(raw, "posedirs", label), "J_regressor": _get(raw, "J_regressor", label),
        "weights": _floats(weights, "weights", label, (n_verts, n_joints)),
        "parents": _parents(kintree, len(parents), label),
    }


def _finish_canonical(c: dict[str, Any], label: str) -> dict[str, Any]:
    """Checks shared by both layouts: posedirs, J_regressor, weights, units; trims zero columns."""
    n_verts, n_joints = c["weights"].shape
    n_pose = 9 * (n_joints - 1)
    c["posedirs"] = _floats(c["posedirs"], "posedirs", label, (n_verts, 3, n_pose))
    c["J_regressor"] = _floats(c["J_regressor"], "J_regressor", label, (n_joints, n_verts))
    w = c["weights"]
    if w.min() < -1e-4 or not np.allclose(w.sum(axis=1), 1.0, atol=1e-3):
        worst = int(np.argmax(np.abs(w.sum(axis=1) - 1.0)))
        raise _err(label, "weights", f"row {worst} sums to {w[worst].sum():.4f} (or has negative "
                   "entries); LBS weights must be >= 0 and sum to 1 per vertex")
    extent = float(np.abs(c["v_template"]).max()) if n_verts else 0.0
    if extent > 5.0:
        raise _err(label, "v_template", f"reaches {extent:.1f} units from the origin; FLAME models "
                   "are in metres (is this model in millimetres?)")
    if c["faces"].shape[0] == 0:
        raise _err(label, "f", "has no triangles")
    for key in ("shapedirs", "expdirs"):  # drop trailing all-zero columns; own the memory
        c[key] = np.ascontiguousarray(c[key][:, :, :_used_columns(c[key])])
    return c


def _read_model_file(model_file: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(canonical arrays, meta) for a .pkl or .npz model file; meta holds cache fields if any."""
    label = str(model_file)
    if model_file.suffix == ".npz":
        raw = _read_npz(model_file)
        meta = {k: str(raw[k]) for k in ("name", "sha256", "source") if k in raw}
        if "flamefit_cache" in raw:
            if int(raw["flamefit_cache"]) > CACHE_VERSION:
                raise AssetError(f"{label}: made by a newer flamefit (cache format "
                                 f"{int(raw['flamefit_cache'])}); fix: re-install the model")
            canon = _canonical_from_cache(raw, label)
            meta["landmarks"] = {k[4:]: raw[k] for k in raw if k.startswith("lmk_")}
        else:
            canon = _canonical_from_flame(raw, label)
    else:
        raw = load_pickle(model_file)
        if not isinstance(raw, dict):
            raise AssetError(f"{label}: holds a {type(raw).__name__}, not a FLAME model dict; "
                             f"{_FIX_MODEL}")
        canon, meta = _canonical_from_flame(raw, label), {}
    return _finish_canonical(canon, label), meta


def _read_npz(path: Path) -> dict[str, Any]:
    """All arrays of an .npz (no pickled objects allowed)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise AssetError(f"{path}: holds pickled objects, which flamefit does not load from "
                             ".npz files; fix: re-save it with plain arrays") from exc
        raise AssetError(f"{path}: corrupt .npz ({exc}); fix: re-download or re-copy the file "
                         "(or re-install it)") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise AssetError(f"{path}: truncated or corrupt .npz ({type(exc).__name__}); fix: "
                         "re-download or re-copy the file (or re-install it)") from exc


# ------------------------------------------------------------------- landmark embeddings

def _embedding_from_deca(d: dict, label: str, n_faces: int | None) -> LandmarkEmbedding:
    """DECA's dict: static_lmk_* (51), dynamic_lmk_* (79, 17), full_lmk_* ((1,) 68)."""
    static_f = _indices(_get(d, "static_lmk_faces_idx", label, _FIX_EMB),
                        "static_lmk_faces_idx", label, (51,), n_faces, _FIX_EMB)
    static_b = _floats(_get(d, "static_lmk_bary_coords", label, _FIX_EMB),
                       "static_lmk_bary_coords", label, (51, 3), _FIX_EMB)
    dyn_f = _indices(_get(d, "dynamic_lmk_faces_idx", label, _FIX_EMB),
                     "dynamic_lmk_faces_idx", label, (79, 17), n_faces, _FIX_EMB)
    dyn_b = _floats(_get(d, "dynamic_lmk_bary_coords", label, _FIX_EMB),
                    "dynamic_lmk_bary_coords", label, (79, 17, 3), _FIX_EMB)
    if "full_lmk_faces_idx" in d:
        full_f = _get(d, "full_lmk_faces_idx", label, _FIX_EMB).reshape(-1)
        full_b = _get(d, "full_lmk_bary_coords", label, _FIX_EMB).reshape(-1, 3)
        full_f = _indices(full_f, "full_lmk_faces_idx", label, (68,), n_faces, _FIX_EMB)
        full_b = _floats(full_b, "full_lmk_bary_coords", label, (68, 3), _FIX_EMB)
    else:
        full_f = np.concatenate([dyn_f[0], static_f])
        full_b = np.concatenate([dyn_b[0], static_b])
    return _check_bary(LandmarkEmbedding(static_f, static_b, dyn_f, dyn_b, full_f, full_b), label)


def _embedding_from_ringnet(static: dict, dynamic: dict, labels: tuple[str, str],
                            n_faces: int | None) -> LandmarkEmbedding:
    """RingNet's static (51) + dynamic (79, 17) dicts; full = dynamic row 0 + static."""
    ls, ld = labels
    static_f = _indices(_get(static, "lmk_face_idx", ls, _FIX_EMB), "lmk_face_idx", ls, (51,),
                        n_faces, _FIX_EMB)
    static_b = _floats(_get(static, "lmk_b_coords", ls, _FIX_EMB), "lmk_b_coords", ls, (51, 3),
                       _FIX_EMB)
    dyn_f = _indices(_get(dynamic, "lmk_face_idx", ld, _FIX_EMB), "lmk_face_idx", ld, (79, 17),
                     n_faces, _FIX_EMB)
    dyn_b = _floats(_get(dynamic, "lmk_b_coords", ld, _FIX_EMB), "lmk_b_coords", ld,
                    (79, 17, 3), _FIX_EMB)
    full_f = np.concatenate([dyn_f[0], static_f])
    full_b = np.concatenate([dyn_b[0], static_b])
    return _check_bary(LandmarkEmbedding(static_f, static_b, dyn_f, dyn_b, full_f, full_b),
                       f"{ls} + {ld}")


def _check_bary(emb: LandmarkEmbedding, label: str) -> LandmarkEmbedding:
    for key, b in (("static", emb.static_bary), ("dynamic", emb.dynamic_bary),
                   ("full", emb.full_bary)):
        if not np.allclose(b.sum(axis=-1), 1.0, atol=1e-2):
            raise AssetError(f"{label}: {key} barycentric coordinates do not sum to 1; {_FIX_EMB}")
    return emb


def load_landmark_embedding(path: str | Path, n_faces: int | None = None) -> LandmarkEmbedding:
    """Read DECA's `landmark_embedding.npy`, or RingNet's pair (pass either file or their
    folder). `n_faces`, when given, bounds the triangle indices."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / DECA_EMBEDDING).is_file():
            p = p / DECA_EMBEDDING
        elif (p / RINGNET_STATIC).is_file():
            p = p / RINGNET_STATIC
        else:
            raise AssetError(f"{p}: no {DECA_EMBEDDING} or {RINGNET_STATIC} in this folder; "
                             f"{_FIX_EMB}")
    if not p.is_file():
        raise AssetError(f"{p}: landmark embedding file does not exist; {_FIX_EMB}")
    if p.name in (RINGNET_STATIC, RINGNET_DYNAMIC):
        return _load_ringnet(p.parent / RINGNET_STATIC, p.parent / RINGNET_DYNAMIC, n_faces)
    data = load_npy(p) if p.suffix == ".npy" else load_pickle(p)
    if not isinstance(data, dict):
        raise AssetError(f"{p}: holds a {type(data).__name__}, not a landmark-embedding dict; "
                         f"{_FIX_EMB}")
    if "lmk_face_idx" in data:  # a RingNet file under another name
        raise AssetError(f"{p}: looks like a RingNet embedding; fix: name the pair "
                         f"{RINGNET_STATIC} and {RINGNET_DYNAMIC}")
    return _embedding_from_deca(data, str(p), n_faces)


def _load_ringnet(static_path: Path, dynamic_path: Path, n_faces: int | None
                  ) -> LandmarkEmbedding:
    for q in (static_path, dynamic_path):
        if not q.is_file():
            raise AssetError(f"{q}: missing (RingNet's embedding comes as {RINGNET_STATIC} + "
                             f"{RINGNET_DYNAMIC} in one folder); {_FIX_EMB}")
    static = load_pickle(static_path)
    dynamic = load_npy(dynamic_path)
    for q, d in ((static_path, static), (dynamic_path, dynamic)):
        if not isinstance(d, dict):
            raise AssetError(f"{q}: holds a {type(d).__name__}, not an embedding dict; {_FIX_EMB}")
    return _embedding_from_ringnet(static, dynamic, (str(static_path), str(dynamic_path)),
                                   n_faces)


def _embedding_candidates(model_file: Path) -> list[Path]:
    """Where a model's landmark embedding may lie: next to it, then `<home>/embeddings/`."""
    out = []
    for folder in (model_file.parent, flamefit_home() / "embeddings"):
        out += [folder / DECA_EMBEDDING, folder / RINGNET_STATIC]
    return out


def _find_embedding(model_file: Path) -> Path | None:
    return next((p for p in _embedding_candidates(model_file) if p.is_file()), None)


def _embedding_from_arrays(d: dict[str, np.ndarray], label: str, n_faces: int
                           ) -> LandmarkEmbedding:
    """The lmk_* arrays stored in a model.npz."""
    names = ("static_faces", "static_bary", "dynamic_faces", "dynamic_bary", "full_faces",
             "full_bary")
    missing = [n for n in names if n not in d]
    if missing:
        raise AssetError(f"{label}: landmark arrays lmk_{missing[0]} missing; fix: re-install "
                         "the model")
    deca = {"static_lmk_faces_idx": d["static_faces"], "static_lmk_bary_coords": d["static_bary"],
            "dynamic_lmk_faces_idx": d["dynamic_faces"],
            "dynamic_lmk_bary_coords": d["dynamic_bary"],
            "full_lmk_faces_idx": d["full_faces"], "full_lmk_bary_coords": d["full_bary"]}
    return _embedding_from_deca(deca, label, n_faces)


# -------------------------------------------------------------------------------- models

def _select(c: dict[str, Any], label: str, n_shape: int | None, n_exp: int | None
            ) -> tuple[np.ndarray, np.ndarray]:
    """The first n_shape identity / n_exp expression columns (default: all non-zero ones)."""
    out = []
    for key, n, block in (("n_shape", n_shape, c["shapedirs"]), ("n_exp", n_exp, c["expdirs"])):
        have = block.shape[2]
        if n is None:
            n = have
        if not 0 <= int(n) <= have:
            what = "identity" if key == "n_shape" else "expression"
            raise AssetError(f"{label}: {key}={n} asked, but the model has {have} non-zero "
                             f"{what} components; fix: use {key} <= {have}")
        out.append(block if int(n) == have else np.ascontiguousarray(block[:, :, :int(n)]))
    return out[0], out[1]


def load_model(path: str | Path, n_shape: int | None = None, n_exp: int | None = None, *,
               require_landmarks: bool = True) -> FlameAssets:
    """Load and validate a FLAME-format model.

    path: a FLAME .pkl (2020 generic_model.pkl, 2023 flame2023*.pkl), a .npz (our cache
    `model.npz`, or a plain npz with FLAME's keys) or a folder holding one.
    n_shape / n_exp: how many identity / expression components to keep; default all columns up
    to the last non-zero one (FLAME: 300 / 100; the ICT-FLAME stand-in: 100 / 53).
    The landmark embedding comes from the cache, or next to the model file (DECA's
    landmark_embedding.npy, or RingNet's pair), or `<home>/embeddings/`; with
    require_landmarks=False a missing one gives landmarks=None instead of an AssetError.
    Results are memoised per (file, mtime, n_shape, n_exp): treat the arrays as read-only.
    """
    model_file = find_model_file(path).resolve()
    emb_file = _find_embedding(model_file)
    key = (str(model_file), _stamp(model_file), n_shape, n_exp, require_landmarks,
           str(emb_file), _stamp(emb_file))
    if key in _MEMO:
        return _MEMO[key]
    assets = _load_model_uncached(model_file, n_shape, n_exp, require_landmarks)
    if len(_MEMO) >= _MEMO_MAX:
        _MEMO.pop(next(iter(_MEMO)))
    _MEMO[key] = assets
    return assets


def _stamp(p: Path | None) -> tuple[int, int] | None:
    if p is None or not p.exists():
        return None
    st = p.stat()
    return (st.st_mtime_ns, st.st_size)


def _load_model_uncached(model_file: Path, n_shape: int | None, n_exp: int | None,
                         require_landmarks: bool) -> FlameAssets:
    canon, meta = _read_model_file(model_file)
    label = str(model_file)
    shapedirs, expdirs = _select(canon, label, n_shape, n_exp)
    landmarks = _model_landmarks(model_file, meta, canon["faces"].shape[0], require_landmarks)
    return FlameAssets(
        name=meta.get("name") or _model_name(model_file),
        sha256=meta.get("sha256") or sha256_file(model_file),
        source=meta.get("source") or label,
        v_template=canon["v_template"], faces=canon["faces"], shapedirs=shapedirs,
        expdirs=expdirs, posedirs=canon["posedirs"], J_regressor=canon["J_regressor"],
        weights=canon["weights"], parents=canon["parents"], landmarks=landmarks,
    )


def _model_landmarks(model_file: Path, meta: dict, n_faces: int, required: bool
                     ) -> LandmarkEmbedding | None:
    if meta.get("landmarks"):
        return _embedding_from_arrays(meta["landmarks"], str(model_file), n_faces)
    emb_file = _find_embedding(model_file)
    if emb_file is not None:
        return load_landmark_embedding(emb_file, n_faces)
    if not required:
        return None
    raise AssetError(
        f"{model_file}: no landmark embedding for this model ({DECA_EMBEDDING}, or "
        f"{RINGNET_STATIC} + {RINGNET_DYNAMIC}, next to it or in {flamefit_home() / 'embeddings'}); "
        f"fix: copy DECA's data/{DECA_EMBEDDING} next to the model, or run "
        f"`python cli.py assets install {DECA_EMBEDDING}`"
    )


# ------------------------------------------------------------------------------- install

def atomic_write(dest: Path, write) -> Path:
    """Call write(file handle) on a temp file beside dest, then move it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; installed assets are ordinary files
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def _copy_into(src: Path, dest: Path) -> Path:
    def write(fh):
        with open(src, "rb") as sfh:
            shutil.copyfileobj(sfh, fh, 1 << 22)
    return atomic_write(dest, write)


def _safe_extract(zf: zipfile.ZipFile, names: list[str], folder: Path) -> dict[str, Path]:
    """Extract the given members flat into folder (basename only: no path traversal)."""
    out = {}
    for name in names:
        dest = folder / Path(name).name
        with zf.open(name) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        out[Path(name).name] = dest
    return out


def _zip_members(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return [n for n in zf.namelist() if not n.endswith("/") and "__MACOSX" not in n]
    except (zipfile.BadZipFile, OSError) as exc:
        raise AssetError(f"{path}: not a readable zip archive ({exc}); fix: re-download it") from exc


def _pick_model_member(names: list[str], label: str) -> str:
    models = [n for n in names if Path(n).suffix in (".pkl", ".npz")
              and Path(n).name not in _NOT_MODELS]
    for preferred in MODEL_FILE_NAMES:
        hits = [n for n in models if Path(n).name == preferred]
        if hits:
            return hits[0]
    if len(models) == 1:
        return models[0]
    raise AssetError(f"{label}: cannot tell which file in the archive is the model "
                     f"(candidates: {', '.join(models) or 'none'}); fix: extract it and install "
                     "the model file itself")


def install_model(path: str | Path, home: str | Path | None = None) -> Path:
    """Validate a model (.pkl, .npz, .zip holding a .pkl, or a folder) and convert it once into
    `<home>/models/<name>/model.npz` (arrays + landmark embedding + name/sha256/source).
    Returns the installed path."""
    src = Path(path).expanduser()
    if not src.exists():
        raise AssetError(f"{src}: does not exist; fix: check the path")
    root = Path(home) if home is not None else flamefit_home()
    if src.suffix.lower() == ".zip":
        names = _zip_members(src)
        member = _pick_model_member(names, str(src))
        wanted = [member] + [n for n in names if Path(n).name in
                             (DECA_EMBEDDING, RINGNET_STATIC, RINGNET_DYNAMIC)]
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(src) as zf:
            files = _safe_extract(zf, wanted, Path(tmp))
            return _install_model_file(files[Path(member).name], root, container=src,
                                       source=f"{src}!{member}")
    model_file = find_model_file(src)
    container = src if src.is_dir() else None
    return _install_model_file(model_file, root, container=container, source=str(model_file))


def _install_model_file(model_file: Path, root: Path, container: Path | None, source: str
                        ) -> Path:
    canon, meta = _read_model_file(model_file)
    n_faces = canon["faces"].shape[0]
    lmk = _model_landmarks(model_file, meta, n_faces, required=False)
    name = meta.get("name") or _model_name(model_file, container)
    arrays: dict[str, Any] = {
        "flamefit_cache": np.int64(CACHE_VERSION),
        "name": np.str_(name),
        "sha256": np.str_(meta.get("sha256") or sha256_file(model_file)),
        "source": np.str_(meta.get("source") or source),
        **{k: canon[k] for k in ("v_template", "faces", "shapedirs", "expdirs", "posedirs",
                                 "J_regressor", "weights", "parents")},
    }
    if lmk is not None:
        for field in ("static_faces", "static_bary", "dynamic_faces", "dynamic_bary",
                      "full_faces", "full_bary"):
            arrays["lmk_" + field] = getattr(lmk, field)
    dest = root / "models" / name / "model.npz"
    return atomic_write(dest, lambda fh: np.savez(fh, **arrays))


# ------------------------------------------------------------------------- install_asset

ACCEPTED = (
    "a FLAME model (generic_model.pkl, flame2023*.pkl, a .zip holding one, a model .npz, or a "
    "folder with one), a texture space (FLAME_texture.npz, FLAME_albedo_from_BFM.npz), "
    "FLAME_masks.pkl, DECA's landmark_embedding.npy (or RingNet's flame_static_embedding.pkl / "
    "flame_dynamic_embedding.npy), DECA's deca_model.tar, DECA's head_template.obj (FLAME's UV layout), "
    "DECA's uv_face_eye_mask.png / uv_face_mask.png, a MediaPipe landmark embedding .npz (flamefit's "
    "dense_faces/dense_bary, or lmk_face_idx/lmk_b_coords/landmark_indices) for the resolved model"
)


def install_asset(path: str | Path, home: str | Path | None = None) -> tuple[str, Path]:
    """Install whatever `path` is into `<home>`; returns (kind, installed path).

    kinds: 'model' -> models/<name>/model.npz; 'albedo' -> albedo/<file>.npz;
    'masks' -> masks/FLAME_masks.pkl; 'embedding' -> embeddings/<file>;
    'deca' -> deca/deca_model.tar; 'uv layout' -> uv/head_template.obj; 'uv mask' -> uv/<file>.png;
    'dense-embedding' -> embeddings/mediapipe478/<mesh hash>.npz (checked against the model
    resolve_model_path() picks).
    """
    src = Path(path).expanduser()
    if not src.exists():
        raise AssetError(f"{src}: does not exist; fix: check the path")
    root = Path(home) if home is not None else flamefit_home()
    kind = classify_asset(src)
    if kind == "model":
        return kind, install_model(src, root)
    if src.suffix.lower() == ".zip":
        return kind, _install_from_zip(src, kind, root)
    return kind, _install_file(src, kind, root)


def classify_asset(src: Path) -> str:
    """What a file is: 'model', 'albedo', 'masks', 'embedding', 'deca', 'uv layout' or 'uv mask'
    (AssetError if unknown)."""
    from priors.textures import UV_MASK_NAMES

    name, suffix = src.name, src.suffix.lower()
    if src.is_dir():
        find_model_file(src)
        return "model"
    if suffix == ".obj":
        return "uv layout"
    if name in UV_MASK_NAMES:
        return "uv mask"
    if name in (DECA_EMBEDDING, RINGNET_STATIC, RINGNET_DYNAMIC):
        return "embedding"
    if name == "FLAME_masks.pkl":
        return "masks"
    if suffix in (".tar", ".pth", ".pt") or _is_torch_archive(src):
        if _is_torch_archive(src):
            return "deca"
        raise AssetError(f"{src}: not a torch checkpoint (zip or legacy torch.save format); "
                         "fix: re-download deca_model.tar")
    if suffix == ".zip":
        return _classify_zip(src)
    if suffix == ".npz":
        return _classify_npz_keys(src, {Path(n).stem for n in _zip_members(src)})
    if suffix == ".pkl":
        return "model" if name in MODEL_FILE_NAMES else _classify_pickle(src)
    if suffix == ".npy":
        return "embedding"
    raise _unknown(src)


def _unknown(src: Path) -> AssetError:
    return AssetError(f"{src}: not a file flamefit knows how to install; fix: install one of: "
                      f"{ACCEPTED}")


def _classify_npz_keys(src: Path, keys: set[str]) -> str:
    if "v_template" in keys:
        return "model"
    if "dense_faces" in keys or {"lmk_face_idx", "landmark_indices"} <= keys:
        return "dense-embedding"
    if {"MU", "PC"} <= keys or {"mean", "tex_dir"} <= keys:
        return "albedo"
    raise _unknown(src)


def _classify_zip(src: Path) -> str:
    names = _zip_members(src)
    base = {Path(n).name for n in names}
    if any(Path(n).suffix == ".pkl" and Path(n).name not in _NOT_MODELS for n in names):
        return "model"
    if "FLAME_masks.pkl" in base:
        return "masks"
    if any(Path(n).suffix == ".npz" for n in names):
        return "albedo"
    raise _unknown(src)


def _classify_pickle(src: Path) -> str:
    data = load_pickle(src)
    if isinstance(data, dict) and "v_template" in data:
        return "model"
    if isinstance(data, dict) and "lmk_face_idx" in data:
        return "embedding"
    if isinstance(data, dict) and data and all(
            isinstance(v, np.ndarray) and v.ndim == 1 for v in data.values()):
        return "masks"
    raise _unknown(src)


_TORCH_LEGACY_MAGIC = bytes.fromhex("80028a0a6cfc9c46f9206aa85019")


def _is_torch_archive(src: Path) -> bool:
    """A torch.save file: zip with a data.pkl record, legacy pickle with torch's magic, or tar."""
    if not src.is_file():
        return False
    if zipfile.is_zipfile(src):
        try:
            with zipfile.ZipFile(src) as zf:
                return any(n.endswith("/data.pkl") or n == "data.pkl" for n in zf.namelist())
        except zipfile.BadZipFile:
            return False
    with open(src, "rb") as fh:
        head = fh.read(len(_TORCH_LEGACY_MAGIC))
    if head == _TORCH_LEGACY_MAGIC:
        return True
    try:
        return tarfile.is_tarfile(src)
    except OSError:
        return False


def _install_uv_layout(src: Path, root: Path) -> Path:
    """Validate an OBJ UV layout (FLAME's head_template.obj: 5023 vertices, vt, f v/vt) against FLAME's
    vertex count, or an installed model's (whose triangles it must then hold), and copy it to
    uv/head_template.obj."""
    from priors.textures import FLAME_N_VERTS, UV_LAYOUT_FILE, check_uv_layout, read_uv_layout

    layout = read_uv_layout(src)
    models = []
    for path in installed_models(root):
        try:
            models.append(load_model(path, require_landmarks=False))
        except AssetError:
            continue
    same = [m for m in models if m.n_verts == layout.n_verts]
    for m in same:
        if check_uv_layout(layout, m.n_verts, m.faces):
            raise AssetError(f"{src}: its triangles are not those of the installed model {m.name} (which has the "
                             f"same {m.n_verts} vertices); fix: use the UV template made for that model (DECA's "
                             "data/head_template.obj for FLAME)")
    if layout.n_verts != FLAME_N_VERTS and not same:
        have = ", ".join(f"{m.name} {m.n_verts}" for m in models) or "none"
        raise AssetError(f"{src}: {layout.n_verts} vertices, but FLAME's UV template has {FLAME_N_VERTS} "
                         f"(installed models: {have}); fix: use DECA's data/{UV_LAYOUT_FILE} (FLAME's UV layout)")
    return _copy_into(src, root / "uv" / UV_LAYOUT_FILE)


def _install_file(src: Path, kind: str, root: Path) -> Path:
    if kind == "dense-embedding":
        from priors.dense_embedding import install_dense_embedding
        return install_dense_embedding(src, load_model(resolve_model_path(), require_landmarks=False), root)
    if kind == "deca":
        return _copy_into(src, root / "deca" / "deca_model.tar")
    if kind == "uv layout":
        return _install_uv_layout(src, root)
    if kind == "uv mask":
        from priors.textures import read_uv_mask
        read_uv_mask(src)
        return _copy_into(src, root / "uv" / src.name)
    if kind == "albedo":
        from priors.textures import check_texture_space
        check_texture_space(src)
        return _copy_into(src, root / "albedo" / src.name)
    if kind == "masks":
        from priors.textures import load_masks
        load_masks(src)
        return _copy_into(src, root / "masks" / "FLAME_masks.pkl")
    return _install_embedding(src, root)


def _install_embedding(src: Path, root: Path) -> Path:
    """Validate (shapes only; the faces are checked against the model at load) and copy."""
    dest_dir = root / "embeddings"
    if src.name in (RINGNET_STATIC, RINGNET_DYNAMIC):
        load_landmark_embedding(src)
        for name in (RINGNET_STATIC, RINGNET_DYNAMIC):
            _copy_into(src.parent / name, dest_dir / name)
        return dest_dir / src.name
    data = load_npy(src)
    if not isinstance(data, dict) or "static_lmk_faces_idx" not in data:
        raise _unknown(src)
    _embedding_from_deca(data, str(src), None)
    return _copy_into(src, dest_dir / DECA_EMBEDDING)


def _install_from_zip(src: Path, kind: str, root: Path) -> Path:
    names = _zip_members(src)
    if kind == "masks":
        wanted = [n for n in names if Path(n).name == "FLAME_masks.pkl"][:1]
    else:
        wanted = [n for n in names if Path(n).suffix == ".npz"]
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(src) as zf:
        files = _safe_extract(zf, wanted, Path(tmp))
        out = [_install_file(f, kind, root) for f in files.values()]
    return out[0]
