"""Landmark sources (FAN, MediaPipe) and the square face crop.

All coordinates are pixels with the origin at the top-left CORNER of the top-left pixel
(its centre is (0.5, 0.5)); crops map a square box [cx +- size/2, cy +- size/2] onto
[0, res] x [0, res].
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from pathlib import Path

import cv2
import numpy as np

from priors.errors import AssetError, NoFaceError

CROP_SCALE = 1.25  # DECA's box: 1.25 x the landmarks' extent
CROP_SHIFT = 0.05  # raise the centre by this share of the box, to keep some forehead
FAN_FILES = {"2DFAN4-11f355bf06.pth.tar": "https://www.adrianbulat.com/downloads/python-fan/2DFAN4-11f355bf06.pth.tar",
             "s3fd-619a316812.pth": "https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth"}

# MediaPipe face mesh (468 points) -> iBUG 68. Each entry averages its mesh points (pairs sit
# between two mesh points). Jaw: the face-oval points at the contour's heights (symmetric pairs);
# brows: the outer ends on the upper brow edge, the others halfway between the upper and lower
# edges (where iBUG annotators put them); eyes, nose and lips: the matching mesh points.
# The table is left-right symmetric (mirror mesh pairs map to mirror iBUG points) and was chosen
# among semantically matching candidates on the 300-W sample in shared/data/real-visible: NME 0.034
# (0.035 on the mirrored photo) with the silhouette step below, against 0.042 for the plain oval
# jaw and upper-and-lower brow means. One photo: a checked choice, not a trained one.
MEDIAPIPE_TO_IBUG68 = (
    # jaw 0..16, image-left (subject's right) to image-right through the chin (8 = 152)
    (127,), (234, 93), (132,), (58,), (172,), (136, 150), (149,), (148,), (152,),
    (377,), (378,), (379, 365), (397,), (288,), (361,), (323, 454), (356,),
    # brows 17..26
    (70,), (63, 53), (105, 52), (66, 65), (107, 55), (336, 285), (296, 295), (334, 282), (293, 283),
    (300,),
    # nose 27..35
    (168,), (197,), (195, 5), (4,), (75,), (97, 99), (2,), (326, 328), (305,),
    # eyes 36..47
    (33,), (160,), (158,), (133,), (153, 145), (144,), (362,), (385,), (387,), (263,), (373,),
    (380, 374),
    # outer lips 48..59, inner lips 60..67
    (61,), (39,), (37,), (0,), (267,), (269,), (291,), (405,), (314,), (17,), (84,), (181,),
    (78,), (82,), (13,), (312,), (308,), (317,), (14,), (87,),
)
# The 3D mesh's face oval is the silhouette only for a frontal face; on the far side of a turned
# face it is hidden and the visible contour (what iBUG annotators and FAN's 2D model mark) lies
# further in. SILHOUETTE_JAW points are therefore pushed outward, along the eye line, to the
# outermost mesh point in a thin horizontal band (see snap_jaw_to_silhouette). Mesh points of the
# nose (its contour plus two rings of neighbours in the tessellation) and lips are never taken as
# silhouette, so a nose seen in profile does not pull the contour out.
SILHOUETTE_JAW = (0, 1, 2, 3, 4, 5, 11, 12, 13, 14, 15, 16)
SILHOUETTE_BAND = 0.02  # half-height of the band, as a share of the mesh's larger extent
_NOT_SILHOUETTE = frozenset((
    0, 1, 2, 3, 4, 5, 6, 8, 9, 13, 14, 17, 19, 20, 36, 37, 39, 40, 44, 45, 48, 49, 51, 55, 59, 60,
    61, 64, 75, 78, 79, 80, 81, 82, 84, 87, 88, 91, 92, 94, 95, 97, 98, 99, 102, 115, 122, 125, 126,
    129, 131, 134, 141, 142, 146, 164, 165, 166, 167, 168, 174, 178, 181, 185, 188, 189, 191, 193,
    195, 196, 197, 198, 203, 206, 209, 218, 219, 220, 235, 236, 237, 238, 239, 240, 241, 242, 244,
    245, 248, 250, 266, 267, 269, 270, 274, 275, 278, 279, 281, 285, 289, 290, 291, 294, 305, 308,
    309, 310, 311, 312, 314, 317, 318, 321, 322, 324, 326, 327, 328, 331, 344, 351, 354, 355, 358,
    360, 363, 370, 371, 375, 391, 392, 393, 399, 402, 405, 409, 412, 413, 415, 417, 419, 420, 423,
    426, 429, 438, 439, 440, 455, 456, 457, 458, 459, 460, 461, 462, 464, 465,
))
_SILHOUETTE_CANDIDATES = np.array([i for i in range(468) if i not in _NOT_SILHOUETTE])
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

        # compile=False: face-alignment 1.5 otherwise runs torch.compile (a slow warm-up that needs
        # a C compiler) on first use; eager mode gives the same landmarks. 1.4 has no such option.
        extra = {"compile": False} if "compile" in inspect.signature(face_alignment.FaceAlignment).parameters \
            else {}
        _DETECTORS[key] = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, device=device,
                                                       flip_input=False, **extra)
    return _DETECTORS[key]


def _mediapipe():
    key = ("mediapipe", "cpu")
    if key not in _DETECTORS:
        problem = mediapipe_missing()
        if problem:
            raise AssetError(problem)
        os.environ.setdefault("GLOG_minloglevel", "2")
        import mediapipe as mp

        with native_stderr_silenced():
            _DETECTORS[key] = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=5,
                                                              refine_landmarks=False)
    return _DETECTORS[key]


@contextlib.contextmanager
def native_stderr_silenced():
    """Silence file descriptor 2 for a block: MediaPipe's C++ (absl, TFLite) logs there directly,
    bypassing Python's sys.stderr; the CLI owns the console."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _faces_fan(image: np.ndarray, device: str) -> list[np.ndarray]:
    found = _fan(device).get_landmarks_from_image(image) or []
    # face-alignment maps heatmap maxima back through its crop, whose pixel j is image pixel
    # ul + j, so the float result is already (to within ~size/500) corner-origin; it then truncates
    # it to an integer (astype(int32) in transform_np), i.e. floors it. + 0.5 puts each point at the
    # centre of the cell it was floored into (unbiased). Not checked on real output here (no weights).
    return [np.asarray(f, dtype=np.float64)[:, :2] + 0.5 for f in found]


def _faces_mediapipe(image: np.ndarray) -> list[np.ndarray]:
    detector = _mediapipe()
    with native_stderr_silenced():
        result = detector.process(np.ascontiguousarray(image))
    h, w = image.shape[:2]
    faces = []
    for face in result.multi_face_landmarks or []:
        # normalised coordinates: 0 and 1 are the image's outer edges, i.e. corner-origin pixels / size.
        # Checked: x + x(mirrored photo) = W to within 0.2 px (a centre-origin output would miss by 1).
        # Its points also drift slightly with the face's pixel size (about +0.4 px per unit of
        # upsampling, from its internal resampling): a sub-pixel bias, not a convention; left as is.
        mesh = np.array([[p.x * w, p.y * h] for p in face.landmark], dtype=np.float64)
        faces.append(mesh_to_ibug68(mesh))
    return faces


def mesh_to_ibug68(mesh: np.ndarray) -> np.ndarray:
    """MediaPipe face-mesh points (468 x 2, image pixels) -> 68 x 2 iBUG landmarks."""
    table = np.array([mesh[list(ids)].mean(0) for ids in MEDIAPIPE_TO_IBUG68])
    return snap_jaw_to_silhouette(mesh, table)


def snap_jaw_to_silhouette(mesh: np.ndarray, pts: np.ndarray, band: float = SILHOUETTE_BAND) -> np.ndarray:
    """Move the SILHOUETTE_JAW points of pts (68 x 2) outward to the visible face contour.

    Outward is along the eye line (mesh 33 -> 263) for the image-right half, against it for the
    left. Each point moves to the outermost silhouette-candidate mesh point (468 x 2 mesh) within
    band x the mesh's extent of that line through it, and never inward. On a frontal face the oval
    points are already outermost and nothing moves; on the far side of a turned face the hidden
    oval point comes out to the cheek's contour (300-W sample: jaw NME 0.062 -> 0.048).
    """
    out = np.array(pts, dtype=np.float64)
    axis = mesh[263] - mesh[33]
    norm = float(np.linalg.norm(axis))
    if not np.isfinite(norm) or norm == 0.0:
        return out
    axis /= norm
    normal = np.array([-axis[1], axis[0]])
    width = band * float(np.ptp(mesh, axis=0).max())
    cand = mesh[_SILHOUETTE_CANDIDATES]
    for k in SILHOUETTE_JAW:
        outward = axis if k > 8 else -axis
        rel = cand - out[k]
        near = np.abs(rel @ normal) < width
        if near.any():
            out[k] += outward * max(0.0, float((rel[near] @ outward).max()))
    return out


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
