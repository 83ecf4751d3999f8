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

__all__ = ["TextureSpace", "check_texture_space", "find_masks", "find_texture_space", "load_masks",
           "load_texture_space"]

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
