"""Strict landmark files and degenerate landmarks (issue 13, point 4): a malformed or degenerate
landmark set is refused with one LandmarkError line naming the file (or the image), never fitted
as garbage and never a raw ZeroDivisionError."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from fitter import detect, io
from fitter.fit import prepare_target
from priors.errors import LandmarkError


def face_points(seed: int = 0) -> np.ndarray:
    """68 plausible 2-D points (a jittered ellipse-ish cloud), 68 x 2 float64."""
    rng = np.random.default_rng(seed)
    angle = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    return np.stack([100 + 40 * np.cos(angle), 110 + 50 * np.sin(angle)], 1) + rng.normal(0, 2, (68, 2))


def write_pts(path, rows: list[str], n_points: int | str = 68):
    path.write_text(f"version: 1\nn_points: {n_points}\n{{\n" + "\n".join(rows) + "\n}\n")
    return path


def one_line(exc: BaseException, *names) -> str:
    msg = str(exc)
    assert "\n" not in msg, msg
    for name in names:
        assert str(name) in msg, msg
    return msg


def test_pts_with_a_third_column_names_file_line_and_format(tmp_path):
    pts = face_points()
    path = write_pts(tmp_path / "three.pts", [f"{x:.3f} {y:.3f} 1" for x, y in pts])
    with pytest.raises(LandmarkError) as info:
        io.read_landmarks(path)
    msg = one_line(info.value, path)
    assert "line 4:" in msg  # version, n_points, { -> the first point is line 4
    assert "3 values" in msg and "'x y'" in msg and "n_points: 68" in msg


def test_pts_bad_line_number_is_the_files_own(tmp_path):
    rows = [f"{x:.3f} {y:.3f}" for x, y in face_points(1)]
    rows[10] = rows[10] + " 0.5"  # point 10 sits on line 4 + 10 = 14
    path = write_pts(tmp_path / "one_bad.pts", rows)
    with pytest.raises(LandmarkError) as info:
        io.read_landmarks(path)
    assert "line 14:" in one_line(info.value, path)
    crlf = tmp_path / "crlf.pts"  # CRLF line ends count as one line each
    crlf.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    with pytest.raises(LandmarkError) as info:
        io.read_landmarks(crlf)
    assert "line 14:" in one_line(info.value, crlf)


def test_pts_header_must_agree_with_the_block(tmp_path):
    rows = [f"{x:.3f} {y:.3f}" for x, y in face_points(2)]
    path = write_pts(tmp_path / "count.pts", rows, n_points=70)
    with pytest.raises(LandmarkError) as info:
        io.read_landmarks(path)
    assert "n_points: 70" in one_line(info.value, path)
    ok = write_pts(tmp_path / "ok.pts", rows)
    assert np.abs(io.read_landmarks(ok) - face_points(2)).max() < 1e-3


@pytest.mark.parametrize("payload", [
    {"landmarks": [[1.0, 2.0, 3.0]] * 68},  # x y z
    {"landmarks": [["1", "2"]] * 68},  # numbers as strings
    {"landmarks": [[True, 2.0]] * 68},  # a boolean is not a coordinate
    {"landmarks": [{"x": 1, "y": 2}] * 68},
    {"landmarks": "1 2 3"},
])
def test_json_must_hold_pairs_of_numbers(tmp_path, payload):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(LandmarkError) as info:
        io.read_landmarks(path)
    one_line(info.value, path)


def test_npy_must_be_68_by_2_finite_numbers(tmp_path):
    for name, arr in {"flat": face_points().reshape(-1), "batch": face_points()[None],
                      "xyz": np.hstack([face_points(), np.ones((68, 1))]),
                      "complex": face_points().astype(np.complex64)}.items():
        path = tmp_path / f"{name}.npy"
        np.save(path, arr)
        with pytest.raises(LandmarkError) as info:
            io.read_landmarks(path)
        one_line(info.value, path)


@pytest.mark.parametrize("kind, words", [
    ("same", "same point"),
    ("flat", "zero-size"),
    ("vertical", "zero-size"),
    ("line", "one line"),
])
def test_degenerate_landmark_files(tmp_path, kind, words):
    pts = face_points(3)
    t = np.linspace(0, 1, 68)
    pts = {"same": np.full((68, 2), 37.5), "flat": np.stack([pts[:, 0], np.full(68, 80.0)], 1),
           "vertical": np.stack([np.full(68, 80.0), pts[:, 1]], 1),
           "line": np.stack([10 + 100 * t, 20 + 50 * t], 1) + 1e-4 * np.sin(40 * t)[:, None]}[kind]
    for suffix in (".pts", ".npy", ".json"):
        path = tmp_path / f"{kind}{suffix}"
        io.write_landmarks(path, pts)
        with pytest.raises(LandmarkError) as info:
            io.read_landmarks(path)
        assert words in one_line(info.value, path)


def test_validate_landmarks_hand_checked_cases():
    good = face_points(4)
    out = io.validate_landmarks(good, "given")
    assert out.dtype == np.float32 and np.allclose(out, good, atol=1e-4)
    tilted = np.stack([np.arange(68.0), 2 * np.arange(68.0)], 1)  # y = 2x: a line, not axis-aligned
    with pytest.raises(LandmarkError, match="one line"):
        io.validate_landmarks(tilted, "tilted")
    narrow = np.stack([np.arange(68.0), 0.5 * np.sin(np.arange(68.0))], 1)  # 0.96 px tall
    with pytest.raises(LandmarkError, match="zero-size"):
        io.validate_landmarks(narrow, "narrow")
    with pytest.raises(LandmarkError, match="NaN"):
        io.validate_landmarks(np.where(np.arange(68)[:, None] == 3, np.nan, good), "nan")


def test_degenerate_detector_landmarks_name_the_image(tmp_path, monkeypatch):
    image = tmp_path / "photo.png"
    io.write_png(image, np.full((200, 200, 3), 128, np.uint8))
    monkeypatch.setattr(detect, "detect_landmarks", lambda *a, **k: np.full((68, 2), 50.0, np.float32))
    monkeypatch.setattr(detect, "detect_landmarks_dense", lambda *a, **k: (
        np.full((68, 2), 50.0, np.float32), np.full((478, 2), 50.0, np.float32), np.ones(478, np.float32)))
    with pytest.raises(LandmarkError) as info:
        prepare_target(image, 96, None, detector="mediapipe")
    assert "same point" in one_line(info.value, image)


def test_cli_refuses_three_column_pts_without_partial_output(tmp_path, standin_path):
    image = tmp_path / "photo.png"
    io.write_png(image, np.full((200, 200, 3), 128, np.uint8))
    bad = write_pts(tmp_path / "photo.pts", [f"{x:.3f} {y:.3f} 1" for x, y in face_points()])
    out = tmp_path / "out"
    r = CliRunner().invoke(cli.main, ["fit", str(image), "--landmarks", str(bad), "--out", str(out),
                                      "--model", str(standin_path), "--recipe", "fast", "--quiet"])
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if str(bad) in ln]
    assert len(lines) == 1 and "line 4:" in lines[0] and "'x y'" in lines[0], r.output
    assert not (out / "photo").exists()
    assert not out.exists() or not [p for p in out.iterdir() if p.name != "manifest.jsonl"]


def test_cli_same_point_pts_is_a_landmark_error_not_zero_division(tmp_path, standin_path):
    image = tmp_path / "photo.png"
    io.write_png(image, np.full((200, 200, 3), 128, np.uint8))
    bad = write_pts(tmp_path / "photo.pts", ["50.0 60.0"] * 68)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli.main, ["fit", str(image), "--landmarks", str(bad), "--out", str(out),
                                      "--model", str(standin_path), "--recipe", "fast", "--quiet"])
    assert r.exit_code != 0 and "ZeroDivision" not in r.output and "Traceback" not in r.output, r.output
    assert [ln for ln in r.output.splitlines() if str(bad) in ln and "same point" in ln], r.output
    assert not (out / "photo").exists()
