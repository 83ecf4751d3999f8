"""Reading images and landmark files; writing outputs atomically (PNG, OBJ, JSON, folders).

Pixel convention everywhere: x right, y down, origin at the top-left CORNER of the top-left
pixel (its centre is (0.5, 0.5)). Landmark files are read and written as-is in it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from priors.errors import ImageError, LandmarkError

MAX_SIDE = 2048
N_LANDMARKS = 68
Image.MAX_IMAGE_PIXELS = 250_000_000  # refuse decompression bombs beyond ~16k x 16k


# ----------------------------------------------------------------------------- images
def _to_rgb8(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> H x W x 3 uint8 RGB; alpha composited over white; 16-bit scaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 or img.mode.startswith("I;16") else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(arr / max(arr.max(), 1e-12) * 255.0, 0, 255).round().astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        a = rgba[..., 3:4]
        rgb = rgba[..., :3] * a + (1.0 - a)  # over white
        return (rgb * 255.0).round().astype(np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _png_bit_depth(path: Path) -> int | None:
    """Bits per sample from a PNG's IHDR chunk (byte 24 of the file), or None."""
    with open(path, "rb") as fh:
        head = fh.read(25)
    if len(head) < 25 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24]


def _read_16bit_png(path: Path) -> np.ndarray | None:
    """PIL drops 16-bit colour to 8 bits by truncation; read such files with OpenCV instead."""
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16:
        return None
    arr = (arr.astype(np.float64) / 65535.0 * 255.0).round().astype(np.uint8)
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 4:
        rgb, a = arr[..., 2::-1].astype(np.float32) / 255, arr[..., 3:4].astype(np.float32) / 255
        return ((rgb * a + (1 - a)) * 255).round().astype(np.uint8)
    return np.ascontiguousarray(arr[..., 2::-1])


# EXIF orientation -> the transposition that displays the image upright (as ImageOps.exif_transpose)
_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                   6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def read_image_with_scale(path, max_side: int = MAX_SIDE) -> tuple[np.ndarray, float]:
    """Read an image as H x W x 3 uint8 RGB (EXIF rotation applied), downscaled so its longer side
    is at most max_side. Returns (image, scale) with scale = returned pixels per original pixel."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file; fix: check the path")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image; fix: pass image files (or use fit-set)")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes); fix: re-export or re-copy the image")
    try:
        with Image.open(path) as img:
            img.load()
            bits16 = img.mode in ("I;16", "I;16B", "I;16L") or (img.format == "PNG" and img.info.get("bitdepth") == 16)
            rotated = ImageOps.exif_transpose(img)
            rgb = _to_rgb8(rotated)
            if img.format == "PNG" and not bits16 and _png_bit_depth(path) == 16:
                alt = _read_16bit_png(path)  # 16-bit RGB(A) PNGs
                method = _EXIF_TRANSPOSE.get(img.getexif().get(0x0112, 1))
                if alt is not None and method is not None:  # OpenCV ignores the PNG's EXIF orientation
                    alt = np.asarray(Image.fromarray(alt).transpose(method))
                if alt is not None and alt.shape == rgb.shape:
                    rgb = alt
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = "not a recognised image format" if isinstance(exc, UnidentifiedImageError) else \
            f"cannot decode ({str(exc).splitlines()[0][:80]})"
        raise ImageError(f"{path}: {reason}; fix: pass a JPEG/PNG/BMP/WebP photo") from None
    if rgb.shape[0] < 8 or rgb.shape[1] < 8:
        raise ImageError(f"{path}: image is only {rgb.shape[1]}x{rgb.shape[0]} pixels; fix: use a larger photo")
    h, w = rgb.shape[:2]
    scale = 1.0
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        scale = rgb.shape[1] / w  # the exact horizontal factor after rounding
    return np.ascontiguousarray(rgb), scale


def read_image(path, max_side: int = MAX_SIDE) -> np.ndarray:
    """H x W x 3 uint8 RGB, see read_image_with_scale."""
    return read_image_with_scale(path, max_side)[0]


def write_png(path, rgb: np.ndarray) -> None:
    """Write H x W x 3 (or H x W x 4) uint8 RGB(A) as PNG."""
    arr = np.ascontiguousarray(rgb)
    code = cv2.COLOR_RGBA2BGRA if arr.ndim == 3 and arr.shape[2] == 4 else cv2.COLOR_RGB2BGR
    if not cv2.imwrite(str(path), cv2.cvtColor(arr, code)):
        raise ImageError(f"{path}: cannot write PNG; fix: check the folder exists and is writable")


# ----------------------------------------------------------------------------- landmarks
def _check_points(pts: np.ndarray, path: Path) -> np.ndarray:
    if pts.shape != (N_LANDMARKS, 2):
        raise LandmarkError(f"{path}: expected 68 (x, y) points, found shape {tuple(pts.shape)}; fix: give the "
                            "68 iBUG landmarks")
    if not np.isfinite(pts).all():
        raise LandmarkError(f"{path}: landmarks contain NaN or infinity; fix: give 68 finite points")
    return pts.astype(np.float32)


def _read_pts(path: Path) -> np.ndarray:
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = [ln.strip() for ln in text.replace("\r", "\n").split("\n") if ln.strip()]
    try:
        start, end = lines.index("{"), lines.index("}")
        pts = np.array([[float(v) for v in ln.split()[:2]] for ln in lines[start + 1:end]], dtype=np.float64)
    except (ValueError, IndexError):
        raise LandmarkError(f"{path}: not an iBUG .pts file (version/n_points header, then 68 'x y' lines "
                            "between {{ and }}); fix the file") from None
    return pts.reshape(-1, 2) if pts.size else pts.reshape(0, 2)


def read_landmarks(path) -> np.ndarray:
    """68 x 2 float32 landmarks from .pts (iBUG), .npy ((68, 2) array) or .json ({"landmarks": [[x, y], ...]})."""
    path = Path(path)
    if not path.is_file():
        raise LandmarkError(f"{path}: landmark file not found; fix: check the --landmarks path")
    suffix = path.suffix.lower()
    try:
        if suffix == ".pts":
            pts = _read_pts(path)
        elif suffix == ".npy":
            pts = np.load(path, allow_pickle=False)
            if pts.dtype.kind not in "fiu":
                raise ValueError("not numeric")
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            pts = np.asarray(data["landmarks"] if isinstance(data, dict) else data, dtype=np.float64)
        else:
            raise LandmarkError(f"{path}: unknown landmark format '{suffix}'; fix: use .pts, .npy or .json")
    except LandmarkError:
        raise
    except (ValueError, KeyError, TypeError, OSError, EOFError) as exc:  # EOFError: empty/truncated .npy
        raise LandmarkError(f"{path}: cannot read landmarks ({str(exc).splitlines()[0][:60]}); fix: .npy (68, 2) "
                            'float array, .json {"landmarks": [[x, y], ...]} or iBUG .pts') from None
    return _check_points(np.asarray(pts, dtype=np.float64), path)


def write_landmarks(path, pts: np.ndarray) -> None:
    """Write 68 x 2 landmarks as .pts, .npy or .json (chosen by the suffix)."""
    path = Path(path)
    pts = np.asarray(pts, dtype=np.float32)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        np.save(path, pts)
    elif suffix == ".json":
        path.write_text(json.dumps({"landmarks": pts.tolist()}))
    elif suffix == ".pts":
        body = "\n".join(f"{x:.4f} {y:.4f}" for x, y in pts)
        path.write_text(f"version: 1\nn_points: {len(pts)}\n{{\n{body}\n}}\n")
    else:
        raise LandmarkError(f"{path}: unknown landmark format '{suffix}'; fix: use .pts, .npy or .json")


def landmarks_for_image(image_path, landmarks_arg) -> Path | None:
    """The landmark file for an image: --landmarks itself if a file, else <dir>/<stem>.pts|.npy|.json."""
    arg = Path(landmarks_arg)
    if arg.is_file():
        return arg
    stem = Path(image_path).stem
    for suffix in (".pts", ".npy", ".json"):
        candidate = arg / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


# ----------------------------------------------------------------------------- outputs
def write_obj(path, verts: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None,
              vt: np.ndarray | None = None, ft: np.ndarray | None = None, texture_name: str | None = None) -> None:
    """Wavefront OBJ: verts V x 3, faces F x 3 (0-based); optional per-vertex colours V x 3 in [0, 1]
    (the common 'v x y z r g b' extension) or a UV texture (vt T x 2, ft F x 3, texture_name: a PNG
    next to the OBJ, referenced through an .mtl)."""
    path = Path(path)
    lines = []
    if texture_name:
        mtl = path.with_suffix(".mtl")
        mtl.write_text(f"newmtl material0\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nmap_Kd {texture_name}\n")
        lines += [f"mtllib {mtl.name}", "usemtl material0"]
    v = np.asarray(verts, dtype=np.float64)
    if colors is not None:
        c = np.clip(np.asarray(colors, dtype=np.float64), 0, 1)
        lines += [f"v {a:.6f} {b:.6f} {d:.6f} {r:.4f} {g:.4f} {bl:.4f}"
                  for (a, b, d), (r, g, bl) in zip(v, c, strict=True)]
    else:
        lines += [f"v {a:.6f} {b:.6f} {d:.6f}" for a, b, d in v]
    f = np.asarray(faces, dtype=np.int64) + 1
    if vt is not None and ft is not None:
        lines += [f"vt {a:.6f} {b:.6f}" for a, b in np.asarray(vt, dtype=np.float64)]
        t = np.asarray(ft, dtype=np.int64) + 1
        lines += [f"f {a}/{x} {b}/{y} {c}/{z}" for (a, b, c), (x, y, z) in zip(f, t, strict=True)]
    else:
        lines += [f"f {a} {b} {c}" for a, b, c in f]
    path.write_text("\n".join(lines) + "\n")


def read_obj(path) -> tuple[np.ndarray, np.ndarray]:
    """Minimal OBJ reader: (verts V x 3 float64, faces F x 3 int64 0-based); ignores colours and UVs."""
    verts, faces = [], []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "v":
            verts.append([float(x) for x in parts[1:4]])
        elif parts[0] == "f":
            faces.append([int(p.split("/")[0]) - 1 for p in parts[1:4]])
    return np.array(verts, dtype=np.float64), np.array(faces, dtype=np.int64)


def _jsonable(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite(obj):
    """Non-finite floats (NaN, inf) -> None, recursively, so the file stays strict JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (np.ndarray, np.generic)):
        return _finite(obj.tolist())
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_json(path, obj) -> None:
    """Pretty JSON; numpy scalars/arrays and Paths converted, NaN/inf written as null."""
    Path(path).write_text(json.dumps(_finite(obj), indent=2, default=_jsonable, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_dir(final_dir):
    """Yield a fresh temporary folder next to final_dir; on success it replaces final_dir, on error
    it is removed, so a failed job never leaves a partial output folder."""
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():  # moved aside under a fresh unique name, then removed
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- drawing
def draw_points(img: np.ndarray, pts: np.ndarray, color=(0, 255, 0), radius: int = 2) -> np.ndarray:
    """Anti-aliased dots at sub-pixel positions (corner-origin convention) on a copy of img."""
    out = np.ascontiguousarray(img.copy())
    shift = 4
    for x, y in np.asarray(pts, dtype=np.float64):
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        centre = (int(round((x - 0.5) * (1 << shift))), int(round((y - 0.5) * (1 << shift))))
        cv2.circle(out, centre, int(radius * (1 << shift)), tuple(int(c) for c in color), -1, cv2.LINE_AA, shift)
    return out


def hstack_images(images: list[np.ndarray]) -> np.ndarray:
    """Side by side, each resized to the tallest one's height."""
    h = max(i.shape[0] for i in images)
    out = []
    for img in images:
        if img.shape[0] != h:
            w = max(1, round(img.shape[1] * h / img.shape[0]))
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
        out.append(img)
    return np.concatenate(out, axis=1)


# ----------------------------------------------------------------------------- logs
def append_line(path, line: str) -> None:
    """Append one text line to a log file atomically: one O_APPEND write under an exclusive lock,
    so concurrent writers never interleave or tear a line."""
    import fcntl

    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)  # closing releases the lock
