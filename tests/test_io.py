"""fitter.io: image reading (formats, bit depths, alpha, EXIF, downscaling, bad files), landmark
files, OBJ/JSON writers, atomic output folders and drawing. Every file is made in tmp_path."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from fitter.io import (
    atomic_dir,
    draw_points,
    hstack_images,
    landmarks_for_image,
    read_image,
    read_image_with_scale,
    read_landmarks,
    read_obj,
    write_json,
    write_landmarks,
    write_obj,
    write_png,
)
from priors.errors import ImageError, LandmarkError

REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "real-visible"


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth(h: int, w: int) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs * 255 // max(w - 1, 1), ys * 255 // max(h - 1, 1), (xs + ys) * 127 // (h + w)],
                    axis=2).astype(np.uint8)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _with_exif_orientation(png: bytes, orientation: int) -> bytes:
    """Insert an eXIf chunk (orientation tag 0x0112) right after a PNG's IHDR."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()
    payload = payload[6:] if payload.startswith(b"Exif\x00\x00") else payload
    return png[:33] + _png_chunk(b"eXIf", payload) + png[33:]


def _one_line_naming(exc: BaseException, path: Path) -> None:
    msg = str(exc)
    assert str(path) in msg, msg
    assert "\n" not in msg, msg


# ----------------------------------------------------------------------------- read_image
@pytest.mark.parametrize("fmt,suffix,kwargs", [("PNG", ".png", {}), ("BMP", ".bmp", {}),
                                               ("WEBP", ".webp", {"lossless": True})])
def test_lossless_formats_round_trip_exactly(tmp_path, fmt, suffix, kwargs):
    img = _noise(37, 53)
    path = tmp_path / f"img{suffix}"
    Image.fromarray(img).save(path, fmt, **kwargs)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (37, 53, 3) and out.flags["C_CONTIGUOUS"]
    assert np.array_equal(out, img)


def test_jpeg_is_read_close_to_the_original(tmp_path):
    img = _smooth(64, 80)
    path = tmp_path / "img.jpg"
    Image.fromarray(img).save(path, "JPEG", quality=95)
    out = read_image(path)
    assert out.shape == (64, 80, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img).mean() < 3.0


def test_write_png_round_trips_rgb_order(tmp_path):
    img = _noise(20, 30, seed=3)
    write_png(tmp_path / "a.png", img)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png").convert("RGB")), img)
    assert np.array_equal(read_image(tmp_path / "a.png"), img)


def test_greyscale_becomes_three_equal_channels(tmp_path):
    grey = _noise(24, 24)[..., 0]
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (24, 24, 3)
    for c in range(3):
        assert np.array_equal(out[..., c], grey)


def test_palette_png_gives_its_colours(tmp_path):
    img = Image.new("P", (10, 10))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (0, 0, 5, 10))  # left half index 1 (blue), right half index 0 (red)
    img.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    assert tuple(out[5, 2]) == (0, 0, 255) and tuple(out[5, 8]) == (255, 0, 0)


def test_rgba_is_composited_over_white(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., :] = (255, 0, 0, 128)  # half-transparent red
    rgba[0, 0] = (0, 0, 255, 255)  # opaque blue
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent (black) -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png").astype(int)
    expected_g = 255 * (1 - 128 / 255)  # = 127: red * a + white * (1 - a)
    assert out[5, 5, 0] == 255
    assert abs(out[5, 5, 1] - expected_g) <= 1 and abs(out[5, 5, 2] - expected_g) <= 1
    assert tuple(out[0, 0]) == (0, 0, 255)
    assert tuple(out[0, 1]) == (255, 255, 255)


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    g = np.full((16, 16), 32768, np.uint16)
    g[0, 0], g[0, 1], g[0, 2] = 65535, 0, 448  # 448 / 257 = 1.74 -> 2 (truncation to >> 8 would give 1)
    assert cv2.imwrite(str(tmp_path / "g16.png"), g)
    out = read_image(tmp_path / "g16.png")
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    assert out[0, 0, 0] == 255 and out[0, 1, 0] == 0 and out[0, 2, 0] == 2
    assert out[8, 8, 0] == 128


def test_16bit_rgb_png_is_scaled_with_channels_in_rgb_order(tmp_path):
    bgr = np.zeros((16, 16, 3), np.uint16)
    bgr[...] = (257 * 200, 32768, 65535)  # B, G, R for OpenCV
    bgr[0, 0] = (448, 0, 65535)
    assert cv2.imwrite(str(tmp_path / "c16.png"), bgr)
    out = read_image(tmp_path / "c16.png")
    assert out.dtype == np.uint8
    assert tuple(out[8, 8]) == (255, 128, 200)
    assert tuple(out[0, 0]) == (255, 0, 2)


def test_16bit_rgba_png_is_composited_over_white(tmp_path):
    bgra = np.zeros((16, 16, 4), np.uint16)
    bgra[...] = (0, 0, 65535, 32768)  # half-transparent red
    assert cv2.imwrite(str(tmp_path / "a16.png"), bgra)
    out = read_image(tmp_path / "a16.png").astype(int)
    assert out[4, 4, 0] == 255
    assert abs(out[4, 4, 1] - 255 * (1 - 32768 / 65535)) <= 1


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    stored = np.full((32, 48, 3), 128, np.uint8)  # H 32, W 48 as stored
    stored[:16, :16] = (255, 0, 0)  # red block at the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "rot.jpg", "JPEG", quality=95, exif=exif.tobytes())
    out = read_image(tmp_path / "rot.jpg")
    expected = np.rot90(stored, k=-1)  # clockwise: stored top-left -> displayed top-right
    assert out.shape == (48, 32, 3)
    assert np.abs(out.astype(int) - expected).mean() < 4
    assert out[4:12, 20:28, 0].min() > 200 and out[4:12, 20:28, 1].max() < 60  # red at top-right
    assert abs(int(out[4:12, 4:12, 0].mean()) - 128) < 10  # grey at top-left


@pytest.mark.parametrize("orientation,expected_corner", [(3, (slice(18, 20), slice(28, 30))),
                                                         (6, (slice(0, 2), slice(18, 20)))])
@pytest.mark.parametrize("colour", [True, False])
def test_exif_rotated_16bit_png_is_turned_upright_and_scaled(tmp_path, orientation, expected_corner, colour):
    if colour:
        arr = np.zeros((20, 30, 3), np.uint16)
        arr[:2, :2] = (0, 0, 448)  # B, G, R: dim red at the stored top-left
    else:
        arr = np.zeros((20, 30), np.uint16)
        arr[:2, :2] = 448
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    path = tmp_path / "rot16.png"
    path.write_bytes(_with_exif_orientation(buf.tobytes(), orientation))
    out = read_image(path)
    assert out.shape == ((20, 30, 3) if orientation == 3 else (30, 20, 3))
    marked = np.argwhere(out[..., 0] > 0)
    rows, cols = expected_corner
    assert marked.min(0).tolist() == [rows.start, cols.start] and marked.max(0).tolist() == [rows.stop - 1,
                                                                                              cols.stop - 1]
    assert (out[rows, cols, 0] == 2).all()  # 448 / 65535 * 255 = 1.74, rounded, not truncated to 1


def test_large_image_is_downscaled_with_matching_scale(tmp_path):
    img = np.zeros((600, 1000, 3), np.uint8)
    img[200:280, 400:600] = 255  # a white block: x 400..600, y 200..280 (corner coordinates)
    Image.fromarray(img).save(tmp_path / "big.png")
    out, scale = read_image_with_scale(tmp_path / "big.png", max_side=250)
    assert out.shape == (150, 250, 3)
    assert scale == pytest.approx(250 / 1000)
    assert scale == pytest.approx(out.shape[0] / 600, abs=1 / 600)
    ys, xs = np.nonzero(out[..., 0] > 127)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (100, 150, 50, 70)  # the block, scaled by 1/4
    same, s1 = read_image_with_scale(tmp_path / "big.png", max_side=1000)
    assert s1 == 1.0 and np.array_equal(same, img)


def test_default_max_side_and_odd_ratio(tmp_path):
    Image.fromarray(_smooth(101, 2500)).save(tmp_path / "wide.png")
    out, scale = read_image_with_scale(tmp_path / "wide.png")
    assert out.shape[1] == 2048 and out.shape[0] == round(101 * 2048 / 2500)
    assert scale == pytest.approx(out.shape[1] / 2500)
    assert read_image(tmp_path / "wide.png").shape == out.shape


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.png"
    Image.fromarray(_noise(64, 64)).save(good)
    files = {"missing": tmp_path / "missing.png", "empty": tmp_path / "empty.jpg", "text": tmp_path / "text.jpg",
             "truncated": tmp_path / "truncated.png", "directory": tmp_path / "folder.png",
             "tiny": tmp_path / "tiny.png", "bomb": tmp_path / "bomb.png"}
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not a JPEG\n")
    files["truncated"].write_bytes(good.read_bytes()[:100])
    files["directory"].mkdir()
    Image.fromarray(_noise(4, 4)).save(files["tiny"])
    # a header claiming 30000 x 30000 pixels (a decompression bomb) must be refused, not decoded
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    files["bomb"].write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                              + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + _png_chunk(b"IEND", b""))
    return files


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "truncated", "directory", "tiny", "bomb"])
def test_bad_image_inputs_raise_one_line_image_error(tmp_path, kind):
    path = _bad_inputs(tmp_path)[kind]
    with pytest.raises(ImageError) as info:
        read_image(path)
    _one_line_naming(info.value, path)
    assert info.value.exit_code == 4


def test_truncated_and_corrupted_files_never_raise_other_errors(tmp_path):
    rng = np.random.default_rng(0)
    img = _noise(24, 30)
    for fmt, suffix in (("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"), ("BMP", ".bmp")):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, fmt)
        data = buf.getvalue()
        path = tmp_path / f"x{suffix}"
        for n in range(1, len(data), max(1, len(data) // 25)):
            path.write_bytes(data[:n])
            try:
                read_image(path)
            except ImageError as exc:
                _one_line_naming(exc, path)
        for _ in range(10):
            corrupt = bytearray(data)
            for i in rng.integers(0, len(data), 4):
                corrupt[i] = int(rng.integers(0, 256))
            path.write_bytes(bytes(corrupt))
            try:
                out = read_image(path)
                assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
            except ImageError as exc:
                _one_line_naming(exc, path)


# ----------------------------------------------------------------------------- landmarks
def _points(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1000, (68, 2)).astype(np.float32)


@pytest.mark.parametrize("suffix", [".npy", ".json", ".pts"])
def test_landmark_round_trip(tmp_path, suffix):
    pts = _points()
    path = tmp_path / f"lm{suffix}"
    write_landmarks(path, pts)
    back = read_landmarks(path)
    assert back.dtype == np.float32 and back.shape == (68, 2)
    if suffix == ".pts":
        assert np.abs(back - pts).max() < 1e-3
    else:
        assert np.array_equal(back, pts)


def test_pts_file_text_layout(tmp_path):
    pts = _points(1)
    write_landmarks(tmp_path / "a.pts", pts)
    lines = (tmp_path / "a.pts").read_text().splitlines()
    assert lines[:3] == ["version: 1", "n_points: 68", "{"] and lines[-1] == "}" and len(lines) == 72
    x, y = (float(v) for v in lines[3].split())
    assert abs(x - pts[0, 0]) < 1e-3 and abs(y - pts[0, 1]) < 1e-3  # as-is: no 1-based shift


def test_landmark_readers_accept_other_spellings(tmp_path):
    pts = _points(2)
    (tmp_path / "list.json").write_text(json.dumps(pts.tolist()))  # a bare list of pairs
    assert np.allclose(read_landmarks(tmp_path / "list.json"), pts)
    body = "\r\n".join(f"  {x:.5f}\t{y:.5f}  " for x, y in pts)
    (tmp_path / "crlf.PTS").write_text(f"version: 1\r\nn_points:  68\r\n{{\r\n{body}\r\n}}\r\n")
    assert np.abs(read_landmarks(tmp_path / "crlf.PTS") - pts).max() < 1e-4
    ints = np.random.default_rng(5).integers(0, 1000, (68, 2))  # (an arange would be collinear: refused)
    np.save(tmp_path / "int.npy", ints)
    assert np.array_equal(read_landmarks(tmp_path / "int.npy"), ints)


def test_real_300w_pts_parses():
    path = REAL / "image_0010.pts"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    first = [float(v) for v in lines[lines.index("{") + 1].split()]
    last = [float(v) for v in lines[lines.index("}") - 1].split()]
    pts = read_landmarks(path)
    assert pts.shape == (68, 2) and pts.dtype == np.float32
    assert pts[0].tolist() == pytest.approx(first, abs=1e-4)
    assert pts[67].tolist() == pytest.approx(last, abs=1e-4)


def _bad_landmark_files(tmp_path: Path) -> dict[str, Path]:
    pts = _points(3)
    f = {}
    f["missing"] = tmp_path / "missing.pts"
    f["npy_67"] = tmp_path / "short.npy"
    np.save(f["npy_67"], pts[:67])
    f["npy_3d"] = tmp_path / "three.npy"
    np.save(f["npy_3d"], np.zeros((68, 3), np.float32))
    f["pts_69"] = tmp_path / "long.pts"
    body = "\n".join(f"{x} {y}" for x, y in np.vstack([pts, pts[:1]]))
    f["pts_69"].write_text(f"version: 1\nn_points: 69\n{{\n{body}\n}}\n")
    f["json_67"] = tmp_path / "short.json"
    f["json_67"].write_text(json.dumps({"landmarks": pts[:67].tolist()}))
    f["npy_nan"] = tmp_path / "nan.npy"
    bad = pts.copy()
    bad[5, 1] = np.nan
    np.save(f["npy_nan"], bad)
    f["pts_inf"] = tmp_path / "inf.pts"
    body = "\n".join("inf 3.0" if i == 7 else f"{x} {y}" for i, (x, y) in enumerate(pts))
    f["pts_inf"].write_text(f"version: 1\nn_points: 68\n{{\n{body}\n}}\n")
    f["pts_no_braces"] = tmp_path / "nobraces.pts"
    f["pts_no_braces"].write_text("\n".join(f"{x} {y}" for x, y in pts))
    f["pts_words"] = tmp_path / "words.pts"
    f["pts_words"].write_text("version: 1\nn_points: 68\n{\n" + "a b\n" * 68 + "}\n")
    f["pts_one_column"] = tmp_path / "onecol.pts"
    f["pts_one_column"].write_text("{\n" + "\n".join(f"{x}" for x, _ in pts) + "\n}\n")
    f["json_syntax"] = tmp_path / "syntax.json"
    f["json_syntax"].write_text('{"landmarks": [[1, 2], ')
    f["json_key"] = tmp_path / "key.json"
    f["json_key"].write_text(json.dumps({"points": pts.tolist()}))
    f["json_strings"] = tmp_path / "strings.json"
    f["json_strings"].write_text(json.dumps({"landmarks": [["a", "b"]] * 68}))
    f["suffix"] = tmp_path / "points.txt"
    f["suffix"].write_text("1 2\n")
    f["npy_object"] = tmp_path / "object.npy"
    np.save(f["npy_object"], np.array([{"x": 1}] * 68, dtype=object), allow_pickle=True)
    f["npy_bool"] = tmp_path / "bool.npy"
    np.save(f["npy_bool"], np.zeros((68, 2), bool))
    f["npy_empty"] = tmp_path / "empty.npy"
    f["npy_empty"].write_bytes(b"")
    f["npy_text"] = tmp_path / "text.npy"
    f["npy_text"].write_text("not numpy")
    f["directory"] = tmp_path / "dir.json"
    f["directory"].mkdir()
    return f


BAD_LANDMARKS = ["missing", "npy_67", "npy_3d", "pts_69", "json_67", "npy_nan", "pts_inf", "pts_no_braces",
                 "pts_words", "pts_one_column", "json_syntax", "json_key", "json_strings", "suffix", "npy_object",
                 "npy_bool", "npy_empty", "npy_text", "directory"]


@pytest.mark.parametrize("kind", BAD_LANDMARKS)
def test_bad_landmark_files_raise_landmark_error(tmp_path, kind):
    path = _bad_landmark_files(tmp_path)[kind]
    with pytest.raises(LandmarkError) as info:
        read_landmarks(path)
    _one_line_naming(info.value, path)
    assert info.value.exit_code == 6


def test_truncated_npy_files_raise_landmark_error(tmp_path):
    write_landmarks(tmp_path / "a.npy", _points(4))
    data = (tmp_path / "a.npy").read_bytes()
    path = tmp_path / "cut.npy"
    for n in range(0, len(data), 9):
        path.write_bytes(data[:n])
        with pytest.raises(LandmarkError) as info:
            read_landmarks(path)
        _one_line_naming(info.value, path)


def test_write_landmarks_unknown_suffix(tmp_path):
    with pytest.raises(LandmarkError) as info:
        write_landmarks(tmp_path / "a.csv", _points())
    _one_line_naming(info.value, tmp_path / "a.csv")
    assert not (tmp_path / "a.csv").exists()


def test_landmarks_for_image(tmp_path):
    folder = tmp_path / "lms"
    folder.mkdir()
    pts = _points(5)
    write_landmarks(folder / "a.pts", pts)
    write_landmarks(folder / "b.npy", pts)
    write_landmarks(folder / "c.json", pts)
    write_landmarks(folder / "d.json", pts)
    write_landmarks(folder / "d.pts", pts)
    images = tmp_path / "images"
    assert landmarks_for_image(images / "a.png", folder) == folder / "a.pts"
    assert landmarks_for_image(images / "b.jpg", str(folder)) == folder / "b.npy"
    assert landmarks_for_image(images / "c.webp", folder) == folder / "c.json"
    assert landmarks_for_image(images / "d.png", folder) == folder / "d.pts"  # .pts first
    assert landmarks_for_image(images / "e.png", folder) is None
    # a file argument is used whatever the image is called
    assert landmarks_for_image(images / "zzz.png", folder / "c.json") == folder / "c.json"
    assert landmarks_for_image(images / "a.png", tmp_path / "nowhere") is None


# ----------------------------------------------------------------------------- OBJ / JSON
def _mesh():
    verts = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0.5, 0.5, 1.25]], dtype=np.float64)
    verts = verts + np.array([0.1234567, -0.25, 3.0])
    faces = np.array([[0, 1, 2], [0, 2, 3], [3, 4, 0]], dtype=np.int64)
    return verts, faces


def test_obj_round_trip_without_colours(tmp_path):
    verts, faces = _mesh()
    write_obj(tmp_path / "m.obj", verts, faces)
    lines = (tmp_path / "m.obj").read_text().splitlines()
    v_lines = [ln for ln in lines if ln.startswith("v ")]
    f_lines = [ln for ln in lines if ln.startswith("f ")]
    assert len(v_lines) == 5 and all(len(ln.split()) == 4 for ln in v_lines)
    assert f_lines == ["f 1 2 3", "f 1 3 4", "f 4 5 1"]  # 1-based in the file
    v, f = read_obj(tmp_path / "m.obj")
    assert np.abs(v - verts).max() < 1e-6
    assert f.dtype == np.int64 and np.array_equal(f, faces)


def test_obj_round_trip_with_colours(tmp_path):
    verts, faces = _mesh()
    colours = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.25, 0.125], [1.5, -0.5, 0.5]])
    write_obj(tmp_path / "m.obj", verts, faces, colors=colours)
    v_lines = [ln.split() for ln in (tmp_path / "m.obj").read_text().splitlines() if ln.startswith("v ")]
    assert all(len(p) == 7 for p in v_lines)
    assert [float(x) for x in v_lines[3][4:]] == [0.5, 0.25, 0.125]
    assert [float(x) for x in v_lines[4][4:]] == [1.0, 0.0, 0.5]  # clipped to [0, 1]
    v, f = read_obj(tmp_path / "m.obj")
    assert np.abs(v - verts).max() < 1e-6 and np.array_equal(f, faces)


def test_obj_with_texture_writes_mtl_and_uv_faces(tmp_path):
    verts, faces = _mesh()
    vt = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float64)
    ft = np.array([[0, 1, 2], [0, 2, 3], [3, 2, 0]])
    write_obj(tmp_path / "m.obj", verts, faces, vt=vt, ft=ft, texture_name="m.png")
    text = (tmp_path / "m.obj").read_text()
    assert "mtllib m.mtl" in text and "f 4/4 5/3 1/1" in text and text.count("\nvt ") == 4
    assert "map_Kd m.png" in (tmp_path / "m.mtl").read_text()
    v, f = read_obj(tmp_path / "m.obj")
    assert np.abs(v - verts).max() < 1e-6 and np.array_equal(f, faces)


def test_write_json_with_numpy_values(tmp_path):
    obj = {"f32": np.float32(1.5), "i64": np.int64(7), "arr": np.arange(6, dtype=np.float32).reshape(2, 3),
           "flag": np.bool_(True), "path": Path("a") / "b.png", "nested": [{"x": np.uint8(200)}], "plain": "s"}
    write_json(tmp_path / "o.json", obj)
    back = json.loads((tmp_path / "o.json").read_text())
    assert back == {"f32": 1.5, "i64": 7, "arr": [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], "flag": True,
                    "path": str(Path("a") / "b.png"), "nested": [{"x": 200}], "plain": "s"}
    with pytest.raises(TypeError):
        write_json(tmp_path / "bad.json", {"x": object()})


def test_write_json_writes_non_finite_as_null(tmp_path):
    write_json(tmp_path / "n.json", {"loss": float("nan"), "a": np.array([1.0, np.inf]), "s": np.float32("-inf")})
    text = (tmp_path / "n.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "a": [1.0, None], "s": None}


# ----------------------------------------------------------------------------- atomic_dir
def test_atomic_dir_success_creates_folder(tmp_path):
    final = tmp_path / "out" / "job"
    with atomic_dir(final) as tmp:
        assert tmp.parent == final.parent and tmp.is_dir() and not final.exists()
        (tmp / "a.txt").write_text("hello")
    assert (final / "a.txt").read_text() == "hello"
    assert sorted(p.name for p in final.parent.iterdir()) == ["job"]


def test_atomic_dir_replaces_existing_folder(tmp_path):
    final = tmp_path / "job"
    final.mkdir()
    (final / "old.txt").write_text("old")
    (final / "sub").mkdir()
    with atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job"]


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    final = tmp_path / "job"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(final) as tmp:
            (tmp / "partial.txt").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_failure_keeps_previous_output(tmp_path):
    final = tmp_path / "job"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as tmp:
            (tmp / "partial.txt").write_text("half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job"]
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]


# ----------------------------------------------------------------------------- drawing
def _centroid(img: np.ndarray) -> np.ndarray:
    """Intensity centroid in corner-origin pixel coordinates (pixel (i, j)'s centre is (j + .5, i + .5))."""
    w = img.astype(np.float64).mean(axis=2)
    ys, xs = np.mgrid[0:w.shape[0], 0:w.shape[1]]
    return np.array([(w * (xs + 0.5)).sum() / w.sum(), (w * (ys + 0.5)).sum() / w.sum()])


@pytest.mark.parametrize("point", [(20.0, 20.0), (20.5, 20.5), (21.3, 19.8), (18.75, 22.1), (30.9, 12.45)])
@pytest.mark.parametrize("radius", [3, 4])
def test_draw_points_centroid_at_subpixel_position(point, radius):
    img = np.zeros((40, 48, 3), np.uint8)
    out = draw_points(img, np.array([point]), color=(255, 255, 255), radius=radius)
    assert not img.any()  # the input is untouched
    assert np.abs(_centroid(out) - point).max() < 0.1


def test_draw_points_default_radius_and_colour():
    img = np.full((40, 40, 3), 10, np.uint8)
    pts = np.array([[10.25, 30.6], [np.nan, 3.0], [29.5, 9.5]])
    out = draw_points(img, pts)  # default: green, radius 2; a NaN point is skipped
    changed = (out != img).any(axis=2)
    assert (out[changed][:, 0] <= 10).all() and (out[changed][:, 2] <= 10).all()  # only green grew
    for x, y in pts[[0, 2]]:
        win = out[int(y) - 4:int(y) + 5, int(x) - 4:int(x) + 5, 1:2].astype(float) - 10  # green above background
        c = _centroid(win) + [int(x) - 4, int(y) - 4]
        assert np.abs(c - (x, y)).max() < 0.2  # cv2's anti-aliasing is a little lopsided for tiny dots
    assert not changed[:, 15:25].any()


def test_hstack_images_matches_heights():
    a = _noise(10, 15)
    b = _noise(20, 30, seed=1)
    c = np.zeros((40, 8, 3), np.uint8)
    out = hstack_images([a, b, c])
    assert out.shape == (40, 60 + 60 + 8, 3)  # 10 x 15 and 20 x 30 both grow to 40 x 60
    assert np.array_equal(out[:, 120:], c)
    assert np.abs(out[:, 60:120].astype(int) - cv2.resize(b, (60, 40), interpolation=cv2.INTER_AREA)).max() == 0
    same = hstack_images([b, b])
    assert np.array_equal(same, np.concatenate([b, b], axis=1))
