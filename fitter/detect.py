"""Landmark sources (FAN, MediaPipe) and the square face crop.

All coordinates are pixels with the origin at the top-left CORNER of the top-left pixel
(its centre is (0.5, 0.5)); crops map a square box [cx +- size/2, cy +- size/2] onto
[0, res] x [0, res].
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
import types
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


# `import mediapipe` also imports its drawing helpers (they import matplotlib.pyplot) and its audio
# tasks (they try sounddevice): modules we never use, most of a second of a fit command's first
# detection (BENCHMARKS.md, sixth round). They are put in sys.modules as stand-ins first; the first
# attribute anyone asks of one imports the real module.
_MEDIAPIPE_DEFERRED = ("mediapipe.python.solutions.drawing_utils", "mediapipe.python.solutions.drawing_styles",
                       "mediapipe.tasks.python.audio")


def _deferred_module(name: str) -> types.ModuleType:
    """A stand-in for module `name` that imports the real one on its first missing attribute."""
    stand_in = types.ModuleType(name)
    stand_in.__spec__ = None  # what the import system reads of a module already in sys.modules

    def real_attribute(attr: str):
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]
        module = importlib.import_module(name)
        parent, _, child = name.rpartition(".")
        if sys.modules.get(parent) is not None:
            setattr(sys.modules[parent], child, module)
        return getattr(module, attr)

    stand_in.__getattr__ = real_attribute
    return stand_in


def _import_mediapipe():
    """`import mediapipe`, with the modules of _MEDIAPIPE_DEFERRED imported only when used."""
    if "mediapipe" not in sys.modules:
        for name in _MEDIAPIPE_DEFERRED:
            sys.modules.setdefault(name, _deferred_module(name))
    import mediapipe

    for name in _MEDIAPIPE_DEFERRED:  # what `import a.b.c` sets on a.b, had it run
        parent, _, child = name.rpartition(".")
        if parent in sys.modules and not hasattr(sys.modules[parent], child):
            setattr(sys.modules[parent], child, sys.modules[name])
    return mediapipe


def mediapipe_missing() -> str | None:
    try:
        _import_mediapipe()
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
        mp = _import_mediapipe()

        with native_stderr_silenced():
            # refine_landmarks: the attention model, 478 points (468 mesh + 10 iris); its 68 points are
            # also closer to human labels (bench.detect: 300-W 0.034 -> 0.031, AFLW box 3.05 -> 2.94 %)
            mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=5, refine_landmarks=True)
            # the graph starts on background threads, which log (TFLite, absl) after the constructor
            # returns; one pass on a blank image waits for them inside this block
            mesh.process(np.zeros((64, 64, 3), np.uint8))
        _DETECTORS[key] = mesh
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
    """68 x 2 iBUG landmarks per face MediaPipe finds (with the retries of mediapipe_meshes)."""
    return [mesh_to_ibug68(mesh[:N_MESH, :2]) for mesh in mediapipe_meshes(image)]


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
        tried = f" ({MEDIAPIPE_RETRIES})" if name == "mediapipe" else ""
        raise NoFaceError(f"no face found by {name}{tried}; fix: use a clearer, larger face, or give --landmarks")
    faces.sort(key=lambda f: -float(np.prod(f.max(0) - f.min(0))))
    index = face_index or 0
    if not 0 <= index < len(faces):  # a negative index would silently pick the smallest face
        raise NoFaceError(f"--face-index {index}: only {len(faces)} face(s) found by {name}; fix: use 0.."
                          f"{len(faces) - 1}")
    return faces[index].astype(np.float32)


# ----------------------------------------------------------------------------- MediaPipe's dense points
# The 478 points of MediaPipe's face mesh with refine_landmarks (468 mesh + 10 iris: 468-472 one
# iris' centre and ring, 473-477 the other's), for dense landmark terms through an embedding
# (priors.dense_embedding). detect_landmarks_dense runs the detector once for both the 68 points
# and the 478.
N_MESH = 468
N_DENSE = 478
FAR_SIDE_NEIGHBOURS = 8  # mesh points used to estimate each point's surface normal
RETRY_MIN_SIDE = 640  # images smaller than this are also tried upscaled to it
ZOOM_RES = 512  # faces found by the full-range detector are cropped and zoomed to this size
ZOOM_MARGIN = 2.2  # crop side over the detector's box side
RETRY_ANGLES = (90.0, -90.0, 180.0, 30.0, -30.0)  # degrees, counter-clockwise in the image
# A face is taken only when FaceMesh finds it again in an upright crop around it (see confirmed_face):
# on turned-away heads and upside-down photos it otherwise returns a face-shaped mesh on the ear, the
# cheek or the wrong way up. Measured on the bundled photo turned over and stand-in renders at 60-90
# degrees of yaw (bench.detect --turned): most real faces re-detect within 0.007-0.099 of the face's
# extent, a few not at all (those are lost); the old code's false faces not at all or at 0.34.
CONFIRM_RES = 256  # side of the re-detection crop, pixels
CONFIRM_MARGIN = 1.6  # its side over the found mesh's extent
CONFIRM_TOL = 0.15  # mean distance of the two meshes over that extent, at most
MEDIAPIPE_RETRIES = "also tried: contrast-normalised, upscaled, full-range detector zoom, rotated copies"


def _mediapipe_once(image: np.ndarray) -> list[np.ndarray]:
    """One FaceMesh pass: 478 x 3 per face (x, y pixels, z MediaPipe's relative depth in pixels)."""
    detector = _mediapipe()
    with native_stderr_silenced():
        result = detector.process(np.ascontiguousarray(image))
    h, w = image.shape[:2]
    # normalised coordinates: 0 and 1 are the image's outer edges, i.e. corner-origin pixels / size.
    # Checked: x + x(mirrored photo) = W to within 0.2 px (a centre-origin output would miss by 1).
    # Its points also drift slightly with the face's pixel size (about +0.4 px per unit of
    # upsampling, from its internal resampling): a sub-pixel bias, not a convention; left as is.
    # z: depth relative to the head's centre, smaller = nearer, in units of the image width.
    return [np.array([[p.x * w, p.y * h, p.z * w] for p in face.landmark], dtype=np.float64)
            for face in result.multi_face_landmarks or []]


def _full_range_boxes(image: np.ndarray, tiles: bool = True) -> list[np.ndarray]:
    """Faces found by MediaPipe's full-range (small, distant faces) detector: [cx, cy, size] each, pixels.

    The detector sees the image at 192 x 192, so a face a sixth of a large frame is ~10 pixels there: if the
    whole image gives nothing (and `tiles`) it scans overlapping tiles of 1/2, then 1/4 of the shorter side
    (stride half a tile; none smaller than the detector's 192 px input) and keeps the boxes of the first
    level that finds any (one per face: overlaps merged)."""
    h, w = image.shape[:2]
    boxes = _full_range_pass(image, 0.0, 0.0)
    for tile in (min(h, w) / 2, min(h, w) / 4):
        if boxes or not tiles or tile < 192:
            break
        t, step = int(round(tile)), max(1, int(round(tile / 2)))
        for y0 in sorted({*range(0, max(1, h - t + 1), step), max(0, h - t)}):
            for x0 in sorted({*range(0, max(1, w - t + 1), step), max(0, w - t)}):
                boxes += _full_range_pass(image[y0:y0 + t, x0:x0 + t], x0, y0)
    merged: list[np.ndarray] = []
    for box in sorted(boxes, key=lambda b: -b[3]):  # best score first
        if all(np.abs(box[:2] - m[:2]).max() > 0.5 * max(box[2], m[2]) for m in merged):
            merged.append(box)
    return [m[:3] for m in merged]


def _full_range_pass(image: np.ndarray, x0: float, y0: float) -> list[np.ndarray]:
    """[cx, cy, size, score] of each full-range detection in `image`, offset by (x0, y0)."""
    key = ("mediapipe-full-range", "cpu")
    if key not in _DETECTORS:
        mp = _import_mediapipe()
        with native_stderr_silenced():
            _DETECTORS[key] = mp.solutions.face_detection.FaceDetection(model_selection=1,
                                                                        min_detection_confidence=0.5)
    with native_stderr_silenced():
        result = _DETECTORS[key].process(np.ascontiguousarray(image))
    h, w = image.shape[:2]
    boxes = []
    for det in result.detections or []:
        b = det.location_data.relative_bounding_box
        side = max(b.width * w, b.height * h)
        boxes.append(np.array([x0 + (b.xmin + b.width / 2) * w, y0 + (b.ymin + b.height / 2) * h, side,
                               float(det.score[0])]))
    return boxes


def normalise_contrast(image: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 -> the same with local contrast equalised (CLAHE on the lightness), for grey, dark
    or flat photos. A grey (or H x W) input comes back as a 3-channel grey image."""
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    if image.ndim == 2 or (np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1],
                                                                                            image[..., 2])):
        grey = clahe.apply(np.ascontiguousarray(image if image.ndim == 2 else image[..., 0]))
        return np.repeat(grey[..., None], 3, axis=2)
    lab = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2LAB)
    lab[..., 0] = clahe.apply(lab[..., 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def rotation_matrix(angle_deg: float, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """2 x 3 corner-origin affine rotating an image of size (H, W) by angle_deg counter-clockwise about
    its centre onto a canvas that holds all of it, and that canvas' (H, W)."""
    h, w = size
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    c, s = (round(c), round(s)) if abs(angle_deg) % 90 == 0 else (c, s)
    nw, nh = int(np.ceil(abs(w * c) + abs(h * s) - 1e-6)), int(np.ceil(abs(w * s) + abs(h * c) - 1e-6))
    A = np.array([[c, s], [-s, c]])  # counter-clockwise on screen (y down)
    b = np.array([nw / 2, nh / 2]) - A @ np.array([w / 2, h / 2])
    return np.hstack([A, b[:, None]]), (nh, nw)


def warp_points_back(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Points N x C from a warped image back to the original (x, y through the inverse of the 2 x 3
    corner-origin `matrix`; a third column, depth in pixels, is divided by the matrix' scale)."""
    A, b = matrix[:, :2], matrix[:, 2]
    out = np.array(points, dtype=np.float64)
    out[:, :2] = (out[:, :2] - b) @ np.linalg.inv(A).T
    if out.shape[1] > 2:
        out[:, 2:] /= np.sqrt(abs(np.linalg.det(A)))
    return out


def _warp(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    flags = cv2.INTER_AREA if abs(np.linalg.det(matrix[:, :2])) < 1 else cv2.INTER_LINEAR
    return cv2.warpAffine(image, corner_to_cv2(matrix), (w, h), flags=flags, borderMode=cv2.BORDER_REPLICATE)


def _attempts(image: np.ndarray):
    """The retries after a failed first pass, cheapest and likeliest first: (views, label) pairs, built
    lazily, where views is a list of (image, 2 x 3 matrix from the original) searched together.
    Contrast-normalised, upscaled (small images), the full-range detector's faces cropped and zoomed
    (one view per face it found, so that every face of a group photo comes back), then all of these
    on rotated copies."""
    h, w = image.shape[:2]
    eye = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])

    def variants(img: np.ndarray, M: np.ndarray, first: bool, turn: str):
        if not first:
            yield [(img, M)], turn.lstrip(", ")
        flat = normalise_contrast(img)
        yield [(flat, M)], "contrast-normalised" + turn
        side = max(img.shape[:2])
        if side < RETRY_MIN_SIDE:
            k = RETRY_MIN_SIDE / side
            up = np.array([[k, 0.0, 0.0], [0.0, k, 0.0]])
            size = (round(img.shape[0] * k), round(img.shape[1] * k))
            yield [(_warp(flat, up, size), _compose(up, M))], "upscaled" + turn
        for source in (img, flat):
            # the tile scan (dozens of detector passes) only on the upright contrast-normalised image:
            # the full-range detector and FaceMesh take small faces turned by 90 degrees too
            boxes = _full_range_boxes(source, tiles=first and source is flat)
            if boxes:
                crops = [crop_matrix(np.array([b[0], b[1], b[2] * ZOOM_MARGIN]), ZOOM_RES) for b in boxes]
                yield [(_warp(source, C, (ZOOM_RES, ZOOM_RES)), _compose(C, M)) for C in crops], \
                    "full-range detector zoom" + turn
                break

    yield from variants(image, eye, first=True, turn="")
    for angle in RETRY_ANGLES:
        R, size = rotation_matrix(angle, (h, w))
        yield from variants(_warp(image, R, size), R, first=False, turn=f", rotated {angle:+.0f} deg")


def _compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """2 x 3 affine of `outer` after `inner`."""
    return np.hstack([outer[:, :2] @ inner[:, :2], (outer[:, :2] @ inner[:, 2] + outer[:, 2])[:, None]])


def face_roll_deg(mesh: np.ndarray) -> float:
    """In-image roll of a MediaPipe mesh (N x 2+, pixels): the angle of its chin-to-forehead direction
    (mesh 152 -> 10) from image-up, clockwise positive (a face lying on its right cheek is +90)."""
    up = mesh[10, :2] - mesh[152, :2]
    return float(np.degrees(np.arctan2(up[0], -up[1])))


def _upright(mesh: np.ndarray) -> tuple[np.ndarray, float]:
    """The 2 x 2 rotation that stands a mesh's face upright (face_roll_deg undone) and the face mesh
    points' extent in that frame (the larger side of their box, pixels)."""
    a = np.deg2rad(face_roll_deg(mesh))
    turn = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    return turn, float(np.ptp(mesh[:N_MESH, :2] @ turn.T, axis=0).max())


def upright_crop_matrix(mesh: np.ndarray, res: int = CONFIRM_RES, margin: float = CONFIRM_MARGIN) -> np.ndarray:
    """2 x 3 corner-origin affine from the image to a res x res crop centred on the mesh's face mesh
    points, margin x their extent wide, turned so that the face stands upright."""
    return _crop_around(mesh, *_upright(mesh), res, margin)


def _crop_around(mesh: np.ndarray, turn: np.ndarray, extent: float, res: int, margin: float) -> np.ndarray:
    """upright_crop_matrix from the mesh's _upright rotation and extent, already computed."""
    A = res / (margin * extent) * turn
    return np.hstack([A, (res / 2 - A @ mesh[:N_MESH, :2].mean(0))[:, None]])


def confirmed_face(image: np.ndarray, mesh: np.ndarray) -> bool:
    """Whether FaceMesh finds the face `mesh` (478 x 3, image pixels) again in an upright crop around
    it (upright_crop_matrix), within CONFIRM_TOL of the face's extent (mean point distance). A real
    face, centred and upright, is found again where it was; a mesh laid on something else, or on a
    face the wrong way round, is not."""
    pts = mesh[:N_MESH, :2]
    turn, extent = _upright(mesh)
    if not np.isfinite(extent) or extent <= 0:
        return False
    M = _crop_around(mesh, turn, extent, CONFIRM_RES, CONFIRM_MARGIN)
    again = [warp_points_back(f, M)[:N_MESH, :2] for f in _mediapipe_once(_warp(image, M, (CONFIRM_RES,) * 2))]
    return any(np.linalg.norm(f - pts, axis=1).mean() <= CONFIRM_TOL * extent for f in again)


def _confirmed_once(image: np.ndarray) -> list[np.ndarray]:
    return [m for m in _mediapipe_once(image) if confirmed_face(image, m)]


# Dark faces: MediaPipe's points on a face whose median grey is under DARK_FACE of the range can improve a
# lot when the image is brightened first (a gamma curve taking that median to EXPOSURE_TARGET), or get
# worse (the shadows' noise and 8-bit steps are stretched too): on single images it did both, so they are
# not brightened. A video can tell which: the tracker keeps the brightened pass only when its points are
# steadier from frame to frame (fitter.track.read_detections; BENCHMARKS.md, eleventh round).
DARK_FACE = 0.3
EXPOSURE_TARGET = 0.4


def face_exposure(image: np.ndarray, points: np.ndarray) -> float:
    """Median grey level (0..1) of the image inside the convex hull of a face's MediaPipe mesh points
    (478 or 468 x 2+, image pixels)."""
    hull = cv2.convexHull(np.round(points[:N_MESH, :2]).astype(np.int32))
    inside = np.zeros(image.shape[:2], np.uint8)
    cv2.fillConvexPoly(inside, hull, 1)
    grey = image if image.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    values = grey[inside > 0]
    return float(np.median(values)) / 255.0 if values.size else 1.0


def brightened(image: np.ndarray, level: float, target: float = EXPOSURE_TARGET) -> np.ndarray:
    """uint8 image through the gamma curve (x -> x ** g on 0..1) that takes grey `level` to `target`."""
    g = np.log(target) / np.log(min(max(level, 1e-3), 0.999))
    return np.round(255.0 * (np.arange(256) / 255.0) ** g).astype(np.uint8)[image]


def mediapipe_meshes(image: np.ndarray, retry: bool = True) -> list[np.ndarray]:
    """MediaPipe's 478 points for every face found: a list of 478 x 3 float64 arrays (x, y in the image's
    corner-origin pixels, z MediaPipe's relative depth in pixels, smaller = nearer).

    The first pass is the plain detector (its cost is unchanged when it finds a face). Only if it finds
    none, and `retry`, it tries again (see _attempts: contrast normalisation for grey/dark photos, an
    upscaled copy of small images, the full-range detector's faces cropped and zoomed, rotated copies
    by RETRY_ANGLES) and returns the first attempt's faces, mapped back to the original image. [] if
    every attempt fails. Every pass keeps only the faces it finds again upright (confirmed_face).
    mediapipe_meshes_how also says which attempt found them."""
    return mediapipe_meshes_how(image, retry)[0]


def mediapipe_meshes_how(image: np.ndarray, retry: bool = True) -> tuple[list[np.ndarray], str | None]:
    """(mediapipe_meshes(image, retry), the attempt that found them: "first pass", e.g. "full-range
    detector zoom" or "contrast-normalised, rotated +90 deg"; None when nothing was found), so that
    callers can report a retry instead of changing results silently."""
    found = _confirmed_once(image)
    if found or not retry:
        return found, "first pass" if found else None
    for views, label in _attempts(image):
        found = distinct_faces([warp_points_back(f, M) for img, M in views for f in _confirmed_once(img)])
        if found:
            return found, label
    return [], None


def distinct_faces(meshes: list[np.ndarray]) -> list[np.ndarray]:
    """The meshes without repeats of one face (two zoomed crops that both hold it): a mesh whose face
    mesh points' centre lies within half the extent of an earlier kept one's is dropped."""
    kept: list[np.ndarray] = []
    for m in meshes:
        centre = m[:N_MESH, :2].mean(0)
        if all(np.linalg.norm(centre - k[:N_MESH, :2].mean(0)) > 0.5 * np.ptp(k[:N_MESH, :2], axis=0).max()
               for k in kept):
            kept.append(m)
    return kept


def dense_point_weights(points3d: np.ndarray, neighbours: int = FAR_SIDE_NEIGHBOURS, floor: float = 0.0) -> np.ndarray:
    """Per-point weights (478,) float32 in [floor, 1] for MediaPipe's 478 x 3 points (mediapipe_meshes).

    MediaPipe's presence/visibility are zero for the face mesh, so the weight is the surface's
    facing: the cosine between each mesh point's normal (the least-variance axis of its
    `neighbours` nearest mesh points, in MediaPipe's own 3D points) and the direction to the
    camera, clipped at 0. Points on the far side of a turned face (normals pointing away, where the
    detector guesses) get ~0, near-side points facing the camera ~1, and the share of down-weighted
    points grows with yaw. Each iris point takes the mean weight of the 4 mesh points nearest to it.
    """
    pts = np.asarray(points3d, dtype=np.float64)
    mesh = pts[:N_MESH]
    sq = (mesh**2).sum(1)
    d = sq[:, None] + sq[None] - 2.0 * mesh @ mesh.T  # squared distances, for ranking only
    near = np.argpartition(d, neighbours, axis=1)[:, :neighbours + 1]  # itself and its neighbours (any order)
    local = mesh[near] - mesh[near].mean(1, keepdims=True)  # 468 x k x 3
    _, vecs = np.linalg.eigh(np.einsum("nki,nkj->nij", local, local))
    normal = vecs[:, :, 0]  # least-variance axis
    # orient outward: away from the mesh's centroid (the face is convex enough at this scale)
    outward = mesh - mesh.mean(0)
    normal *= np.where((normal * outward).sum(1) < 0, -1.0, 1.0)[:, None]
    facing = np.clip(-normal[:, 2], 0.0, 1.0)  # camera towards -z (smaller z = nearer)
    weights = np.empty(len(pts))
    weights[:N_MESH] = facing
    if len(pts) > N_MESH:
        d2 = ((pts[N_MESH:, None, :2] - mesh[None, :, :2]) ** 2).sum(2)
        weights[N_MESH:] = facing[np.argpartition(d2, 3, axis=1)[:, :4]].mean(1)
    return np.clip(weights, floor, 1.0).astype(np.float32)


def detect_points(image: np.ndarray, detector: str = "auto", device: str = "cpu", face_index: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The 68 points and, when the detector is MediaPipe, its 478 points and their weights from the
    same run (detect_landmarks_dense): (68 x 2, 478 x 2 or None, 478 or None)."""
    if resolve_detector(detector) == "mediapipe":
        return detect_landmarks_dense(image, face_index=face_index)
    return detect_landmarks(image, detector=detector, device=device, face_index=face_index), None, None


def detect_landmarks_dense(image: np.ndarray, face_index: int | None = None
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One MediaPipe run for both landmark sets of the largest face (or the face_index-th by size).

    Returns lmk68 (68, 2) float32 (exactly what detect_landmarks(image, "mediapipe") gives),
    dense (478, 2) float32 (MediaPipe's 468 mesh + 10 iris points, same pixel convention) and
    weights (478,) float32 in [0, 1] (dense_point_weights: far side of a turned face ~0).
    Raises NoFaceError (one line) when no attempt finds a face.
    """
    meshes = mediapipe_meshes(image)
    if not meshes:
        raise NoFaceError(f"no face found by mediapipe ({MEDIAPIPE_RETRIES}); fix: use a clearer, larger face, or "
                          "give --landmarks")
    faces = sorted(((mesh_to_ibug68(m[:N_MESH, :2]), m) for m in meshes),
                   key=lambda f: -float(np.prod(f[0].max(0) - f[0].min(0))))  # as detect_landmarks
    index = face_index or 0
    if not 0 <= index < len(faces):
        raise NoFaceError(f"--face-index {index}: only {len(faces)} face(s) found by mediapipe; fix: use 0.."
                          f"{len(faces) - 1}")
    lmk68, mesh = faces[index]
    return lmk68.astype(np.float32), mesh[:, :2].astype(np.float32), dense_point_weights(mesh)
