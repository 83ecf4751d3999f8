"""Albedo (texture) spaces and FLAME vertex masks.

Texture spaces are read from FLAME's `FLAME_texture.npz` (keys mean, tex_dir: 0-255 values)
or `FLAME_albedo_from_BFM.npz` (keys MU, PC: 0-1 values), both UV images stored
flattened in BGR order, as DECA's FLAMETex reads them (`reshape(-1, n_pc)`, then
`[:, [2, 1, 0]]` on the channels). They are returned as RGB in [0, 1].
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from priors.errors import AssetError
from priors.safe_pickle import load_pickle, to_array

__all__ = ["UV_LAYOUT_FILE", "UV_MASK_NAMES", "TextureSpace", "UVLayout", "align_uv_layout", "check_texture_space",
           "check_uv_layout", "find_masks", "find_texture_space", "find_uv_layout", "find_uv_masks", "load_masks",
           "load_texture_space", "read_uv_layout", "read_uv_mask"]

_FIX_TEX = ("fix: use FLAME_texture.npz from https://flame.is.tue.mpg.de or "
            "FLAME_albedo_from_BFM.npz, unmodified")
_FIX_MASKS = "fix: use FLAME_masks.pkl from https://flame.is.tue.mpg.de, unmodified"
TEXTURE_FILE_NAMES = ("FLAME_texture.npz", "FLAME_albedo_from_BFM.npz")


@dataclass
class TextureSpace:
    """A linear albedo model: albedo = mean + basis @ coefficients.

    kind 'uv': mean (H, W, 3) float32 RGB in [0, 1]; basis (H, W, 3, K) float32, same units;
        vt (T, 2) float32 UV coordinates (OBJ convention: v up, image row = (1 - v) * H) and
        ft (F, 3) int64 indices into vt per mesh triangle, or None when the file has none;
        image_size (H, W).
    kind 'vertex': mean (V, 3), basis (V, 3, K); vt, ft None; image_size None.
    name: 'FLAME' or 'BFM'; source: the file it came from.
    """

    name: str
    source: str
    kind: str
    mean: np.ndarray
    basis: np.ndarray
    vt: np.ndarray | None
    ft: np.ndarray | None
    image_size: tuple[int, int] | None
    uv_layout: UVLayout | None = None  # where vt/ft came from when the file has none (an OBJ, e.g. FLAME's
    # head_template.obj); its triangle order may differ from the model's (see align_uv_layout)

    @property
    def n_tex(self) -> int:
        return int(self.basis.shape[-1])


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except ValueError as exc:
        raise AssetError(f"{path}: holds pickled objects or is corrupt ({exc}); {_FIX_TEX}") from exc
    except Exception as exc:
        raise AssetError(f"{path}: not a readable .npz ({type(exc).__name__}); fix: re-download or "
                         "re-copy the file") from exc


def _uv_side(n_values: int) -> int | None:
    """Side S of a square S x S x 3 image with n_values entries, or None."""
    if n_values % 3:
        return None
    side = math.isqrt(n_values // 3)
    return side if side * side * 3 == n_values else None


def _layout(label: str, key_mean: str, mean_shape: tuple[int, ...],
            basis_shape: tuple[int, ...]) -> tuple[str, tuple[int, ...], int]:
    """('uv' | 'vertex', mean shape, K) from the arrays' shapes."""
    n_mean, n_basis = math.prod(mean_shape), math.prod(basis_shape)
    if len(basis_shape) < 2 or n_mean * basis_shape[-1] != n_basis:
        raise AssetError(f"{label}: key '{key_mean}' has {n_mean} values but the basis has "
                         f"shape {basis_shape}; they must match; {_FIX_TEX}")
    k = int(basis_shape[-1])
    if len(mean_shape) == 2 and mean_shape[1] == 3:
        return "vertex", (mean_shape[0], 3), k
    if len(mean_shape) == 3 and mean_shape[2] == 3:
        return "uv", tuple(mean_shape), k
    side = _uv_side(n_mean)
    if side is not None:
        return "uv", (side, side, 3), k
    if n_mean % 3:
        raise AssetError(f"{label}: key '{key_mean}' has {n_mean} values, not 3 per texel or "
                         f"vertex; {_FIX_TEX}")
    return "vertex", (n_mean // 3, 3), k


def _downsample(img: np.ndarray, size: int, label: str) -> np.ndarray:
    """Box-filter a square (H, H, ...) image to (size, size, ...); H must be a multiple of size."""
    h, w = img.shape[:2]
    if size == h == w:
        return img
    if size <= 0 or h != w or h % size:
        raise AssetError(f"{label}: cannot resize the {h}x{w} texture to {size}; fix: use a size "
                         f"that divides {h}")
    f = h // size
    return img.reshape(size, f, size, f, *img.shape[2:]).mean(axis=(1, 3))


def _uv_coords(raw: dict, label: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    if "vt" not in raw or "ft" not in raw:
        return None, None
    vt, ft = np.asarray(raw["vt"]), np.asarray(raw["ft"])
    if vt.ndim != 2 or vt.shape[1] != 2 or not np.isfinite(vt).all():
        raise AssetError(f"{label}: key 'vt' has shape {vt.shape}, expected (T, 2) finite; {_FIX_TEX}")
    if ft.ndim != 2 or ft.shape[1] != 3 or ft.dtype.kind not in "iu":
        raise AssetError(f"{label}: key 'ft' has shape {ft.shape} / dtype {ft.dtype}, expected "
                         f"(F, 3) integers; {_FIX_TEX}")
    if ft.size and (ft.min() < 0 or ft.max() >= vt.shape[0]):
        raise AssetError(f"{label}: key 'ft' indexes outside 'vt' (0..{vt.shape[0] - 1}); {_FIX_TEX}")
    return vt.astype(np.float32), ft.astype(np.int64)


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of an .npz's arrays, from the .npy headers only (no data read)."""
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as fh:
                    version = np.lib.format.read_magic(fh)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _fortran, dtype = read(fh)
                out[name[:-4]] = (tuple(shape), dtype)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise AssetError(f"{path}: not a readable .npz ({type(exc).__name__}); fix: re-download "
                         "or re-copy the file") from exc
    return out


def check_texture_space(path: str | Path) -> tuple[str, str, int]:
    """Check a texture space file's keys and array shapes from its headers (fast, no data
    read; for installing 1 GB files). Returns (name 'FLAME'|'BFM', kind, n components)."""
    p = Path(path).expanduser()
    heads = _npz_headers(p)
    if "MU" in heads and "PC" in heads:
        name, km, kb = "BFM", "MU", "PC"
    elif "mean" in heads and "tex_dir" in heads:
        name, km, kb = "FLAME", "mean", "tex_dir"
    else:
        raise AssetError(f"{p}: no texture space keys (expected mean + tex_dir, or MU + PC; the "
                         f"file has: {', '.join(sorted(heads))}); {_FIX_TEX}")
    for key in (km, kb):
        if heads[key][1].kind not in "fiu":
            raise AssetError(f"{p}: key '{key}' has dtype {heads[key][1]}, expected numbers; "
                             f"{_FIX_TEX}")
    kind, _, k = _layout(str(p), km, heads[km][0], heads[kb][0])
    return name, kind, k


def _scaled_f32(arr: np.ndarray, scale: float) -> np.ndarray:
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if out is arr or np.shares_memory(out, arr):
        out = out.copy()
    out *= np.float32(scale)
    return out


def load_texture_space(path: str | Path, n_tex: int | None = None,
                       size: int | None = None) -> TextureSpace:
    """Load FLAME_texture.npz or FLAME_albedo_from_BFM.npz as an RGB [0, 1] TextureSpace.

    n_tex: keep the first n_tex components (default all: 200 FLAME, 199 BFM).
    size: box-downsample UV images to size x size (default: as stored, 512).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise AssetError(f"{p}: texture space file does not exist; {_FIX_TEX}")
    label = str(p)
    raw = _npz_arrays(p)
    if "MU" in raw and "PC" in raw:
        name, km, kb, scale = "BFM", "MU", "PC", 1.0
    elif "mean" in raw and "tex_dir" in raw:
        name, km, kb, scale = "FLAME", "mean", "tex_dir", 1.0 / 255.0
    else:
        have = ", ".join(sorted(raw))
        raise AssetError(f"{label}: no texture space keys (expected mean + tex_dir, or MU + PC; "
                         f"the file has: {have}); {_FIX_TEX}")
    mean, basis = np.asarray(raw[km]), np.asarray(raw[kb])
    kind, mean_shape, k = _layout(label, km, mean.shape, basis.shape)
    n = k if n_tex is None else int(n_tex)
    if not 0 < n <= k:
        raise AssetError(f"{label}: n_tex={n_tex} asked, the file has {k} components; "
                         f"fix: use 1..{k}")
    mean = mean.reshape(mean_shape)
    basis = basis.reshape(*mean_shape, k)[..., :n]
    if kind == "uv":  # BGR as stored -> RGB
        mean, basis = mean[:, :, ::-1], basis[:, :, ::-1, :]
        if size is not None:
            mean, basis = _downsample(mean, size, label), _downsample(basis, size, label)
    mean, basis = _scaled_f32(mean, scale), _scaled_f32(basis, scale)  # one copy each
    if not (np.isfinite(mean).all() and np.isfinite(basis).all()):
        raise AssetError(f"{label}: the texture space holds NaN or infinite values; {_FIX_TEX}")
    vt, ft = _uv_coords(raw, label) if kind == "uv" else (None, None)
    image = (int(mean.shape[0]), int(mean.shape[1])) if kind == "uv" else None
    return TextureSpace(name=name, source=label, kind=kind,
                        mean=mean, basis=basis, vt=vt, ft=ft, image_size=image)


def load_masks(path: str | Path, n_verts: int | None = None) -> dict[str, np.ndarray]:
    """FLAME_masks.pkl -> {region name: (N,) int64 vertex indices} (safe unpickler, latin1).

    n_verts, when given, bounds the indices (FLAME: 5023).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise AssetError(f"{p}: masks file does not exist; {_FIX_MASKS}")
    data = load_pickle(p)
    if not isinstance(data, dict) or not data:
        raise AssetError(f"{p}: holds a {type(data).__name__}, not a dict of vertex masks; "
                         f"{_FIX_MASKS}")
    out: dict[str, np.ndarray] = {}
    for key, value in data.items():
        name = key.decode("latin1") if isinstance(key, bytes) else str(key)
        try:
            arr = np.asarray(to_array(value))
        except ValueError as exc:
            raise AssetError(f"{p}: mask '{name}' is not an array ({exc}); {_FIX_MASKS}") from exc
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise AssetError(f"{p}: mask '{name}' has shape {arr.shape} / dtype {arr.dtype}, "
                             f"expected (N,) vertex indices; {_FIX_MASKS}")
        if arr.size and (arr.min() < 0 or (n_verts is not None and arr.max() >= n_verts)):
            raise AssetError(f"{p}: mask '{name}' holds vertex indices outside "
                             f"[0, {n_verts}); {_FIX_MASKS} (made for this model's topology)")
        out[name] = arr.astype(np.int64)
    return out


def _home(home: str | Path | None) -> Path:
    from priors.assets import flamefit_home

    return Path(home) if home is not None else flamefit_home()


def find_texture_space(home: str | Path | None = None) -> Path | None:
    """The installed texture space file (`<home>/albedo/*.npz`): FLAME_texture.npz first,
    then FLAME_albedo_from_BFM.npz, then the newest other .npz; None if nothing installed."""
    folder = _home(home) / "albedo"
    for name in TEXTURE_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    others = sorted(folder.glob("*.npz"), key=lambda q: q.stat().st_mtime_ns, reverse=True)
    return others[0] if others else None


def find_masks(home: str | Path | None = None) -> Path | None:
    """The installed `<home>/masks/FLAME_masks.pkl`, or None."""
    p = _home(home) / "masks" / "FLAME_masks.pkl"
    return p if p.is_file() else None


# ------------------------------------------------------------------------------ UV layout and UV masks
# FLAME's UV layout as DECA ships it: data/head_template.obj (FLAME's 5023 template vertices, their `vt`
# texture coordinates and `f v/vt` triangles). FLAME_texture.npz carries its own vt/ft; a space without
# them (FLAME_albedo_from_BFM.npz) takes them from this file. DECA's UV masks (uv_face_eye_mask.png,
# uv_face_mask.png) mark the face region in the same UV image.

FLAME_N_VERTS = 5023  # FLAME's topology (2019-2023 models), the one head_template.obj is made for
UV_LAYOUT_FILE = "head_template.obj"
UV_MASK_NAMES = ("uv_face_eye_mask.png", "uv_face_mask.png")
_FIX_UV = "fix: use DECA's data/head_template.obj (FLAME's UV template, https://github.com/yfeng95/DECA), unmodified"
_FIX_UV_MASK = "fix: use DECA's data/uv_face_eye_mask.png or uv_face_mask.png, unmodified"


@dataclass
class UVLayout:
    """A mesh's UV layout read from an OBJ.

    vt (T, 2) float32 texture coordinates (v up); ft (F, 3) int64 indices into vt per triangle;
    faces (F, 3) int64 vertex indices of the same triangles (0-based); n_verts: the OBJ's `v` count.
    """

    source: str
    n_verts: int
    vt: np.ndarray
    ft: np.ndarray
    faces: np.ndarray


def read_uv_layout(path: str | Path) -> UVLayout:
    """Read an OBJ's vertices count, `vt` lines and `f v/vt v/vt v/vt` triangles, strictly: AssetError
    naming the file (and line) for anything else (no UVs, polygons, indices out of range)."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise AssetError(f"{p}: cannot read ({exc.strerror or exc}); {_FIX_UV}") from None
    n_verts, vt, faces, ft = 0, [], [], []
    for n, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            if parts[0] == "v":
                if len(parts) < 4 or not all(math.isfinite(float(x)) for x in parts[1:4]):
                    raise ValueError
                n_verts += 1
            elif parts[0] == "vt":
                vt.append([float(parts[1]), float(parts[2])])
            elif parts[0] == "f":
                corners = [c.split("/") for c in parts[1:]]
                if len(corners) != 3 or any(len(c) < 2 or not c[1] for c in corners):
                    raise AssetError(f"{p}: line {n}: '{line.strip()[:50]}' is not a triangle with texture "
                                     f"indices (f v/vt v/vt v/vt); {_FIX_UV}")
                faces.append([int(c[0]) - 1 for c in corners])
                ft.append([int(c[1]) - 1 for c in corners])
        except (ValueError, IndexError):
            raise AssetError(f"{p}: line {n}: '{line.strip()[:50]}' is not a valid OBJ '{parts[0]}' line; "
                             f"{_FIX_UV}") from None
    vt_a = np.array(vt, np.float32).reshape(-1, 2)
    faces_a, ft_a = np.array(faces, np.int64).reshape(-1, 3), np.array(ft, np.int64).reshape(-1, 3)
    if not len(ft_a) or not len(vt_a):
        raise AssetError(f"{p}: no UV layout (needs 'vt' lines and 'f v/vt' triangles); {_FIX_UV}")
    if not np.isfinite(vt_a).all():
        raise AssetError(f"{p}: texture coordinates hold NaN or infinity; {_FIX_UV}")
    if ft_a.min() < 0 or ft_a.max() >= len(vt_a):
        raise AssetError(f"{p}: a face's texture index lies outside the {len(vt_a)} 'vt' lines; {_FIX_UV}")
    if faces_a.min() < 0 or faces_a.max() >= n_verts:
        raise AssetError(f"{p}: a face's vertex index lies outside the {n_verts} 'v' lines; {_FIX_UV}")
    return UVLayout(str(p), n_verts, vt_a, ft_a, faces_a)


def align_uv_layout(layout: UVLayout, faces: np.ndarray) -> np.ndarray:
    """ft for a model's own triangles: (F, 3) int64 with row i giving the vt index of each corner of
    faces[i] (faces F x 3 vertex indices), matched by vertex set whatever the OBJ's triangle order or
    corner rotation. AssetError when the model has a triangle the layout lacks."""
    faces = np.asarray(faces, dtype=np.int64)
    if np.array_equal(faces, layout.faces):
        return layout.ft
    if len(faces) != len(layout.faces):
        raise AssetError(f"{layout.source}: {len(layout.faces)} triangles, the model has {len(faces)}; the UV "
                         f"layout is for another mesh; {_FIX_UV}")
    corner_uv = {}
    for tri, tex in zip(layout.faces.tolist(), layout.ft.tolist(), strict=True):
        key = frozenset(tri)
        corner_uv[key] = dict(zip(tri, tex, strict=True))
    out = np.empty_like(faces)
    for i, tri in enumerate(faces.tolist()):
        uv = corner_uv.get(frozenset(tri))
        if uv is None:
            raise AssetError(f"{layout.source}: the model's triangle {i} (vertices {tri}) is not in the UV layout; "
                             f"it is for another mesh; {_FIX_UV}")
        out[i] = [uv[v] for v in tri]
    return out


def check_uv_layout(layout: UVLayout, n_verts: int, faces: np.ndarray | None = None) -> str | None:
    """Why `layout` does not fit a model with n_verts vertices (and faces F x 3, when given), or None."""
    if layout.n_verts != n_verts:
        return f"the UV layout has {layout.n_verts} vertices and the model {n_verts}"
    if faces is not None:
        try:
            align_uv_layout(layout, faces)
        except AssetError:
            return "the UV layout's triangles are not the model's"
    return None


def read_uv_mask(path: str | Path) -> np.ndarray:
    """A UV mask PNG (DECA's uv_face_eye_mask.png / uv_face_mask.png) as (H, W) float32 in [0, 1];
    AssetError unless it is a readable image of at least 8 x 8 with both masked and unmasked texels."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    try:
        with Image.open(p) as img:
            arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise AssetError(f"{p}: not a readable image ({type(exc).__name__}); {_FIX_UV_MASK}") from None
    if min(arr.shape) < 8:
        raise AssetError(f"{p}: only {arr.shape[1]}x{arr.shape[0]} pixels; {_FIX_UV_MASK}")
    if arr.max() < 0.5 or arr.min() >= 0.5:
        raise AssetError(f"{p}: every pixel is {'black' if arr.max() < 0.5 else 'white'}, not a mask; {_FIX_UV_MASK}")
    return arr


def find_uv_layout(home: str | Path | None = None) -> Path | None:
    """The installed `<home>/uv/head_template.obj`, or None."""
    p = _home(home) / "uv" / UV_LAYOUT_FILE
    return p if p.is_file() else None


def find_uv_masks(home: str | Path | None = None) -> dict[str, Path]:
    """The installed UV masks, {file name: path} (`<home>/uv/uv_face_eye_mask.png`, `uv_face_mask.png`)."""
    folder = _home(home) / "uv"
    return {name: folder / name for name in UV_MASK_NAMES if (folder / name).is_file()}
