"""Landmark sources (FAN, MediaPipe) and the square face crop.

All coordinates are pixels with the origin at the top-left CORNER of the top-left pixel
(its centre is (0.5, 0.5)); crops map a square box [cx +- size/2, cy +- size/2] onto
[0, res] x [0, res].
"""

from __future__ import annotations

import contextlib
import io as _io
import os
from pathlib import Path

import cv2
import numpy as np

from priors.errors import AssetError, NoFaceError

CROP_SCALE = 1.25  # DECA's box: 1.25 x the landmarks' extent
CROP_SHIFT = 0.05  # raise the centre by this share of the box, to keep some forehead
FAN_FILES = {"2DFAN4-11f355bf06.pth.tar": "https://www.adrianbulat.com/downloads/python-fan/2DFAN4-11f355bf06.pth.tar",
             "s3fd-619a316812.pth": "https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth"}

# MediaPipe face mesh (468 points) -> iBUG 68. Each entry averages its mesh points. Jaw: the
# face-oval points at the contour's heights (symmetric pairs); brows: the mean of the upper and
# lower brow edges (iBUG annotators place brow points between them). Checked on the 300-W sample
# in shared/data/real-visible: NME 0.042 (inter-ocular normalised).
MEDIAPIPE_TO_IBUG68 = (
    [(i,) for i in (127, 93, 132, 58, 172, 150, 149, 148, 152, 377, 378, 379, 397, 288, 361, 323, 356)]
    + [(70, 46), (63, 53), (105, 52), (66, 65), (107, 55), (336, 285), (296, 295), (334, 282), (293, 283),
       (300, 276)]
    + [(i,) for i in (168, 197, 5, 4, 75, 97, 2, 326, 305,  # nose
                      33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,  # eyes
                      61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,  # outer lips
                      78, 82, 13, 312, 308, 317, 14, 87)]  # inner lips
)
_DETECTORS: dict = {}


# ----------------------------------------------------------------------------- crops
def square_box(landmarks: np.ndarray, scale: float = CROP_SCALE) -> np.ndarray:
    """[cx, cy, size]: a square CROP_SCALE x the landmarks' larger extent, centred on their box
    (raised by CROP_SHIFT x size)."""
    lo, hi = landmarks.min(0), landmarks.max(0)
    size = float((hi - lo).max() * scale)
    cx, cy = (lo + hi) / 2.0
    return np.array([cx, cy - CROP_SHIFT * size, size], dtype=np.float64)


def crop_matrix(box: np.ndarray, res: int) -> np.ndarray:
    """2 x 3 affine from image to crop pixels (both corner-origin)."""
    cx, cy, size = (float(v) for v in box)
    k = res / size
    return np.array([[k, 0.0, -(cx - size / 2) * k], [0.0, k, -(cy - size / 2) * k]])


def to_crop(points: np.ndarray, box: np.ndarray, res: int) -> np.ndarray:
    M = crop_matrix(box, res)
    return np.asarray(points, dtype=np.float64) @ M[:, :2].T + M[:, 2]


def from_crop(points: np.ndarray, box: np.ndarray, res: int) -> np.ndarray:
    M = crop_matrix(box, res)
    return (np.asarray(points, dtype=np.float64) - M[:, 2]) / M[0, 0]


def corner_to_cv2(matrix: np.ndarray) -> np.ndarray:
    """A 2 x 3 affine in corner-origin coordinates -> the same map in OpenCV's centre-origin ones."""
    A, b = matrix[:, :2], matrix[:, 2]
    return np.hstack([A, (A @ np.array([0.5, 0.5]) + b - 0.5)[:, None]])


def crop_image(image: np.ndarray, box: np.ndarray, res: int) -> np.ndarray:
    """res x res x 3 float32 crop in [0, 1] (edges replicated). Large reductions are warped at an
    integer multiple of res and area-averaged down, to avoid aliasing."""
    factor = int(np.clip(np.ceil(box[2] / res), 1, 4))
    M = corner_to_cv2(crop_matrix(box, res * factor))
    out = cv2.warpAffine(image, M, (res * factor, res * factor), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)
    if factor > 1:
        out = cv2.resize(out, (res, res), interpolation=cv2.INTER_AREA)
    return out.astype(np.float32) / 255.0


# ----------------------------------------------------------------------------- detectors
def fan_weights_dir() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def fan_missing() -> str | None:
    folder = fan_weights_dir()
    missing = [name for name in FAN_FILES if not (folder / name).is_file()]
    if not missing:
        return None
    urls = " and ".join(FAN_FILES[n] for n in missing)
    return (f"{folder}: FAN detector weights {', '.join(missing)} are missing; fix: download {urls} into that "
            "folder, or use --detector mediapipe / --landmarks")


def mediapipe_missing() -> str | None:
    try:
        import mediapipe  # noqa: F401
    except ImportError:
        return "mediapipe is not installed; fix: pip install 'flamefit[mediapipe]' (mediapipe 0.10.21, numpy<2)"
    return None


def available_detectors() -> dict[str, str | None]:
    """name -> None when usable, else the reason and fix."""
    return {"fan": fan_missing(), "mediapipe": mediapipe_missing()}


def _fan(device: str):
    key = ("fan", device)
    if key not in _DETECTORS:
        problem = fan_missing()
        if problem:
            raise AssetError(problem)
        import face_alignment

        _DETECTORS[key] = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, device=device,
                                                       flip_input=False)
    return _DETECTORS[key]


def _mediapipe():
    key = ("mediapipe", "cpu")
    if key not in _DETECTORS:
        problem = mediapipe_missing()
        if problem:
            raise AssetError(problem)
        os.environ.setdefault("GLOG_minloglevel", "2")
        import mediapipe as mp

        with contextlib.redirect_stderr(_io.StringIO()):
            _DETECTORS[key] = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=5,
                                                              refine_landmarks=False)
    return _DETECTORS[key]


def _faces_fan(image: np.ndarray, device: str) -> list[np.ndarray]:
    found = _fan(device).get_landmarks_from_image(image) or []
    # face-alignment reports pixel-index coordinates (pixel centres at integers): shift to corners
    return [np.asarray(f, dtype=np.float64)[:, :2] + 0.5 for f in found]


def _faces_mediapipe(image: np.ndarray) -> list[np.ndarray]:
    result = _mediapipe().process(np.ascontiguousarray(image))
    h, w = image.shape[:2]
    faces = []
    for face in result.multi_face_landmarks or []:
        # normalised coordinates: 0 and 1 are the image's outer edges, i.e. corner-origin pixels / size
        mesh = np.array([[p.x * w, p.y * h] for p in face.landmark], dtype=np.float64)
        faces.append(np.array([mesh[list(ids)].mean(0) for ids in MEDIAPIPE_TO_IBUG68]))
    return faces


def resolve_detector(detector: str) -> str:
    if detector != "auto":
        return detector
    status = available_detectors()
    for name in ("fan", "mediapipe"):
        if status[name] is None:
            return name
    raise AssetError(f"no landmark detector is usable: {status['fan']}; {status['mediapipe']}")


def detect_landmarks(image: np.ndarray, detector: str = "auto", device: str = "cpu",
                     face_index: int | None = None) -> np.ndarray:
    """68 x 2 float32 iBUG landmarks of the largest face (or the face_index-th by size)."""
    name = resolve_detector(detector)
    if name == "fan":
        faces = _faces_fan(image, device)
    elif name == "mediapipe":
        faces = _faces_mediapipe(image)
    else:
        raise AssetError(f"unknown detector '{detector}'; fix: use auto, fan, mediapipe or file")
    if not faces:
        raise NoFaceError(f"no face found by {name}; fix: use a clearer, larger face, or give --landmarks")
    faces.sort(key=lambda f: -float(np.prod(f.max(0) - f.min(0))))
    index = face_index or 0
    if not 0 <= index < len(faces):  # a negative index would silently pick the smallest face
        raise NoFaceError(f"--face-index {index}: only {len(faces)} face(s) found by {name}; fix: use 0.."
                          f"{len(faces) - 1}")
    return faces[index].astype(np.float32)
