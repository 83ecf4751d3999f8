"""Synthetic faces with known parameters, for recovery benchmarks (shared by bench.fit and bench.identity)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fitter import io
from fitter.camera import ortho_project
from fitter.params import FitParams
from fitter.synth import face_mask_polygon, synthesize
from priors.flame import FlameModel

PHOTO_SIZE = 512


def random_params(model: FlameModel, rng: np.random.Generator, shape: np.ndarray | None = None,
                  yaw_deg: float | None = None) -> FitParams:
    """One plausible random face: identity ~ N(0, 1), expression ~ N(0, 0.8^2) (redrawn while the lips
    cross), yaw in +-30 degrees,
    a little pitch/roll, jaw 0..0.25 rad, coloured SH light, smooth skin-tone albedo."""
    t = lambda a: torch.as_tensor(np.asarray(a, np.float32))[None]  # noqa: E731
    p = FitParams.initial(1, model.n_shape, model.n_exp, model.n_verts)
    p.shape = t(rng.normal(0, 1, model.n_shape) if shape is None else shape)
    p.exp = t(plausible_expression(model, rng, 0.8, p.shape[0].numpy()))
    yaw = np.deg2rad(rng.uniform(-30, 30) if yaw_deg is None else yaw_deg)
    p.global_pose = t([rng.uniform(-0.15, 0.15), yaw, rng.uniform(-0.08, 0.08)])
    p.jaw_pose = t([rng.uniform(0.0, 0.25), 0.0, 0.0])
    p.cam = t([rng.uniform(7.0, 8.5), rng.uniform(-0.01, 0.01), rng.uniform(-0.03, 0.0)])
    light = np.zeros((9, 3), np.float32)
    light[0] = rng.uniform(2.6, 3.4) * np.array([1.0, rng.uniform(0.9, 1.0), rng.uniform(0.8, 1.0)])
    light[1:4] = rng.normal(0, 0.5, (3, 1)) * np.ones((1, 3))
    p.light = t(light)
    v = model.v_template.numpy()
    tone = np.array([0.75, 0.55, 0.45]) * rng.uniform(0.7, 1.1)
    wave = 0.06 * np.sin(v[:, :1] * rng.uniform(20, 40) + rng.uniform(0, 6)) * np.cos(v[:, 1:2] * 30)
    p.albedo = t(np.clip(tone + wave, 0, 1))
    return p


def plausible_expression(model: FlameModel, rng: np.random.Generator, sd: float, shape: np.ndarray) -> np.ndarray:
    """An expression code ~ N(0, sd^2) per coefficient for a face of this shape, drawn again while the
    lips cross (`lips_plausible`): large Gaussian codes can push the lips through each other, a face no
    image shows. n_exp float64."""
    p = FitParams.initial(1, model.n_shape, model.n_exp, model.n_verts)
    p.shape = torch.as_tensor(np.asarray(shape, np.float32))[None]
    while True:
        exp = rng.normal(0, sd, model.n_exp)
        p.exp = torch.as_tensor(exp.astype(np.float32))[None]
        if lips_plausible(model, p):
            return exp


def lips_plausible(model: FlameModel, params: FitParams, tol: float = 1e-3) -> bool:
    """False when the inner upper lip (iBUG 61-63) sits below the inner lower lip (67-65):
    an expression no face makes, which the Gaussian expression prior can still draw."""
    with torch.no_grad():
        lmk = model(params.shape, params.exp, *(torch.zeros_like(x) for x in (params.global_pose,
                    params.neck_pose, params.jaw_pose, params.eye_pose))).landmarks3d[0]
    return bool((lmk[[61, 62, 63], 1] >= lmk[[67, 66, 65], 1] - tol).all())


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour gradient with mild noise, float32 (size, size, 3) in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    a, b = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
    img = a * xx[..., None] + b * (1 - yy[..., None])
    return np.clip(img / 1.5 + rng.normal(0, 0.02, img.shape), 0, 1).astype(np.float32)


def render_photo(model: FlameModel, params: FitParams, rng: np.random.Generator,
                 size: int = PHOTO_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Render a 'photo' of the face over a random background -> (uint8 image, 68 x 2 landmarks in pixels)."""
    bg = torch.from_numpy(background(rng, size)).permute(2, 0, 1)[None]
    with torch.no_grad():
        pred = synthesize(model, params, size, background=bg)
    img = (pred["image"][0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return img, pred["landmarks2d"][0].numpy()


def grid_mask(image: np.ndarray, rng: np.random.Generator, keep: float = 0.6, cells: int = 6) -> np.ndarray:
    """GridMask occlusion: a square grid of dropped (grey) patches; `keep` of the area stays visible."""
    h, w = image.shape[:2]
    period = max(h, w) / cells
    side = period * np.sqrt(1 - keep)  # dropped square per cell
    off = rng.uniform(0, period, 2)
    yy, xx = np.mgrid[0:h, 0:w]
    drop = (((xx + off[0]) % period) < side) & (((yy + off[1]) % period) < side)
    out = image.copy()
    out[drop] = 128
    return out


def face_region(model: FlameModel) -> np.ndarray:
    """Indices of face-area vertices on any mesh: front-facing template vertices inside the
    polygon of the frontal landmarks (jaw contour + brows raised over the forehead)."""
    zero = FitParams.initial(1, model.n_shape, model.n_exp, model.n_verts)
    zero.cam = torch.tensor([[1.0, 0.0, 0.0]])
    with torch.no_grad():
        out = model(zero.shape, zero.exp, zero.global_pose, zero.neck_pose, zero.jaw_pose, zero.eye_pose)
        lmk = ortho_project(out.landmarks3d_full, zero.cam, 2)[0, :, :2].numpy()
        verts = ortho_project(out.vertices, zero.cam, 2)[0].numpy()
    import cv2

    poly = face_mask_polygon(lmk, forehead=0.3).astype(np.float32)
    inside = np.array([cv2.pointPolygonTest(poly, (float(x), float(y)), False) >= 0 for x, y in verts[:, :2]])
    front = out.vertices[0, :, 2].numpy() > np.percentile(out.vertices[0, :, 2].numpy(), 40)
    eyes = model.weights[:, 3:].sum(1).numpy() > 0.5  # eyeballs are not face surface
    return np.nonzero(inside & front & ~eyes)[0]


def similarity_align(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Best similarity transform (Umeyama) of src N x 3 onto dst N x 3; returns transformed src."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    U, S, Vt = np.linalg.svd(d0.T @ s0)
    D = np.eye(3)
    D[2, 2] = np.sign(np.linalg.det(U @ Vt))
    R = U @ D @ Vt
    scale = (S * np.diag(D)).sum() / (s0 ** 2).sum()
    return scale * s0 @ R.T + mu_d


def face_error_mm(pred_vertices: np.ndarray, true_vertices: np.ndarray, region: np.ndarray) -> float:
    """Mean face-area vertex distance (mm) after similarity alignment."""
    aligned = similarity_align(pred_vertices[region], true_vertices[region])
    return float(np.linalg.norm(aligned - true_vertices[region], axis=1).mean() * 1000)


def write_case(folder: Path, name: str, image: np.ndarray, landmarks: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    io.write_png(path, image)
    io.write_landmarks(folder / f"{name}.npy", landmarks.astype(np.float32))
    return path


def true_vertices(model: FlameModel, params: FitParams) -> np.ndarray:
    """Posed vertices of known params (what a perfect fit.npz `vertices` would hold)."""
    with torch.no_grad():
        out = model(params.shape, params.exp, params.global_pose, params.neck_pose, params.jaw_pose,
                    params.eye_pose)
    return out.vertices[0].numpy()


# ----------------------------------------------------------------------------- whole-face region
def whole_face_region(model: FlameModel) -> np.ndarray:
    """Indices of the whole face region on any mesh, the region the benchmarks score.

    On the neutral template seen from the front: vertices whose normal faces the camera
    (normal z > 0), above the jaw contour (iBUG 0..16, fixed contour), between the two ends
    of that contour (the ears: 0 and 16 sit at the tragus) and below the forehead line, set at
    the brows + 0.45 x (chin-to-brow height) (about the hairline:
    the three facial thirds are about equal); eyeballs excluded. Forehead
    to chin, ear to ear front-facing; ears, neck and the back of the head are out.
    """
    import cv2

    from fitter.shading import vertex_normals

    zero = FitParams.initial(1, model.n_shape, model.n_exp, model.n_verts)
    with torch.no_grad():
        out = model(zero.shape, zero.exp, zero.global_pose, zero.neck_pose, zero.jaw_pose, zero.eye_pose)
        normals = vertex_normals(out.vertices, model.faces)[0].numpy()
    v = out.vertices[0].numpy()
    lmk = out.landmarks3d_full[0].numpy()
    brow_y = float(lmk[17:27, 1].mean())
    top = brow_y + 0.45 * (brow_y - float(lmk[8, 1]))
    jaw = lmk[0:17, :2]
    poly = np.concatenate([jaw, [[jaw[-1, 0], top], [jaw[0, 0], top]]]).astype(np.float32)
    inside = np.array([cv2.pointPolygonTest(poly, (float(x), float(y)), False) >= 0 for x, y in v[:, :2]])
    eyes = model.weights[:, 3:].sum(1).numpy() > 0.5
    return np.nonzero(inside & (normals[:, 2] > 0.0) & ~eyes)[0]


def region_height(model: FlameModel, region: np.ndarray) -> float:
    """Vertical extent (m) of a vertex region on the neutral template: the 'face height' that
    sets the pinhole focal length from the fill fraction."""
    v = model.v_template.numpy()[region]
    return float(np.ptp(v[:, 1]))


# ----------------------------------------------------------------------------- pinhole test camera
@dataclass
class Pinhole:
    """The test renders' camera, written here on purpose (not fitter.camera): a pinhole at the
    origin looking down -z (model axes: x right, y up, +z towards the viewer), no rotation (the
    head turns by its own pose). Camera space = model space + t; pixels: x right, y down, origin
    at the image's top-left corner (pixel centres at +0.5), principal point (cx, cy)."""

    focal: float  # pixels
    cx: float
    cy: float
    t: np.ndarray  # (3,) metres: camera-from-model translation, t[2] < 0 (the head in front)
    size: int  # square image side, pixels
    distance: float = float("nan")  # metres from the camera to the face region's centre (as drawn)

    def K(self) -> np.ndarray:
        """OpenCV intrinsics (3, 3) for these pixels (camera axes x right, y down, z forward)."""
        return np.array([[self.focal, 0, self.cx], [0, self.focal, self.cy], [0, 0, 1]], np.float64)


def pinhole_project(points: np.ndarray, cam: Pinhole) -> np.ndarray:
    """Model-space points N x 3 -> N x 3 (x px, y px, depth m > 0 in front of the camera)."""
    pc = np.asarray(points, np.float64) + cam.t
    depth = -pc[:, 2]
    x = cam.cx + cam.focal * pc[:, 0] / depth
    y = cam.cy - cam.focal * pc[:, 1] / depth
    return np.stack([x, y, depth], axis=1)


def random_pinhole(model: FlameModel, params: FitParams, rng: np.random.Generator, size: int = PHOTO_SIZE,
                   distance: tuple[float, float] = (0.4, 1.2), fill: tuple[float, float] = (0.4, 0.6),
                   region: np.ndarray | None = None) -> Pinhole:
    """A camera at a real distance: d ~ U(distance) metres, focal = fill * size * d / face_height
    with fill ~ U(fill) (the face region's height over the image height), the posed face region's
    centre within +-5 % of the frame from the image centre."""
    region = whole_face_region(model) if region is None else region
    d = float(rng.uniform(*distance))
    f = float(rng.uniform(*fill)) * size * d / region_height(model, region)
    centre = true_vertices(model, params)[region].mean(0)
    shift = rng.uniform(-0.05, 0.05, 2) * size  # pixels
    t = np.array([-centre[0] + shift[0] * d / f, -centre[1] - shift[1] * d / f, -centre[2] - d])
    return Pinhole(focal=f, cx=size / 2, cy=size / 2, t=t, size=size, distance=d)


# ----------------------------------------------------------------------------- an independent renderer
def feature_colours(model: FlameModel, albedo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-vertex albedo V x 3 with eyes (white sclera, coloured iris, black pupil), darker brows
    and redder lips painted over the skin, so the detectors see a face; regions found on the
    neutral template from its landmarks and eyeball joints (any mesh)."""
    import cv2

    out = np.array(albedo, np.float32).copy()
    v = model.v_template.numpy()
    zero = FitParams.initial(1, model.n_shape, model.n_exp, model.n_verts)
    with torch.no_grad():
        lmk = model(zero.shape, zero.exp, zero.global_pose, zero.neck_pose, zero.jaw_pose,
                    zero.eye_pose).landmarks3d_full[0].numpy()
    front = v[:, 2] > np.percentile(v[:, 2], 50)
    iris = rng.uniform([0.15, 0.08, 0.03], [0.45, 0.35, 0.25])
    for j in range(3, model.weights.shape[1]):  # eyeball joints
        eye = model.weights[:, j].numpy() > 0.5
        if not eye.any():
            continue
        pts = v[eye]
        r = float(np.ptp(pts[:, 0])) / 2
        centre = np.array([(pts[:, 0].max() + pts[:, 0].min()) / 2, (pts[:, 1].max() + pts[:, 1].min()) / 2,
                           pts[:, 2].min() + r])
        dz = (pts - centre)[:, 2] / np.linalg.norm(pts - centre, axis=1).clip(1e-9)
        col = np.tile(np.float32([0.82, 0.8, 0.78]), (len(pts), 1))
        col[dz > np.cos(np.deg2rad(24))] = iris
        col[dz > np.cos(np.deg2rad(10))] = 0.03
        out[eye] = col
    brow_col = rng.uniform(0.08, 0.3) * np.float32([1.0, 0.85, 0.7])
    seg = [(a, a + 1) for a in range(17, 21)] + [(a, a + 1) for a in range(22, 26)]
    for a, b in seg:  # vertices within 5 mm of a brow segment (frontal x, y)
        p, q = lmk[a, :2], lmk[b, :2]
        u = np.clip(((v[:, :2] - p) @ (q - p)) / float((q - p) @ (q - p)), 0, 1)
        near = np.linalg.norm(v[:, :2] - (p + u[:, None] * (q - p)), axis=1) < 0.005
        out[near & front] = 0.5 * out[near & front] + 0.5 * brow_col
    lips = lmk[48:60, :2].astype(np.float32)
    inside = np.array([cv2.pointPolygonTest(lips, (float(x), float(y)), False) >= 0 for x, y in v[:, :2]])
    out[inside & front] *= np.float32([1.0, 0.62, 0.62])
    return np.clip(out, 0, 1)


def clutter_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """background() plus a few blurred random ellipses and bars: float32 (size, size, 3) in [0, 1]."""
    import cv2

    img = background(rng, size)
    for _ in range(int(rng.integers(3, 9))):
        col = tuple(float(c) for c in rng.uniform(0.05, 0.95, 3))
        centre = tuple(int(c) for c in rng.uniform(0, size, 2))
        if rng.uniform() < 0.5:
            axes = tuple(int(a) for a in rng.uniform(0.03, 0.25, 2) * size)
            cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, col, -1)
        else:
            w, h = (int(a) for a in rng.uniform(0.02, 0.4, 2) * size)
            cv2.rectangle(img, centre, (centre[0] + w, centre[1] + h), col, -1)
    return cv2.GaussianBlur(img, (0, 0), 1.5)


def paint_mesh(screen: np.ndarray, faces: np.ndarray, colours: np.ndarray, size: int, camera_points: np.ndarray,
               supersample: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Painter's-algorithm rasterizer with OpenCV (independent of fitter.render).

    screen V x 3 (x, y pixels, depth), faces F x 3 (counter-clockwise seen from outside),
    colours V x 3 linear [0, 1], camera_points V x 3 (camera space: a triangle whose outward
    normal points away from the camera is the inside of the head, seen through the mouth and
    eye openings, and is drawn dark) -> (premultiplied
    colour size x size x 3, coverage size x size), flat colour per triangle (the corner mean),
    drawn far to near at `supersample` x the size and area-averaged down. OpenCV also fills a
    pixel whose centre lies within half a (supersampled) pixel outside an edge, so shapes grow by
    0.5 / supersample px on every side (0.125 px at the default 4), without a shift.
    """
    import cv2

    tri = camera_points[faces]  # F x 3 x 3
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    facing = (normal * -tri.mean(1)).sum(1) > 0
    order = np.argsort(-screen[faces, 2].mean(1))  # far first
    big = size * supersample
    canvas = np.zeros((big, big, 4), np.float32)
    shift = 4
    # pixel centres sit at +0.5 in our convention and at integers in OpenCV's
    pts = np.round((screen[:, :2] * supersample - 0.5) * (1 << shift)).astype(np.int32)
    col = np.concatenate([colours[faces].mean(1), np.ones((len(faces), 1))], axis=1)
    col[~facing, :3] *= 0.08  # inside of the head (seen through the mouth and eye openings): dark
    for f in order:
        cv2.fillConvexPoly(canvas, pts[faces[f]], tuple(float(c) for c in col[f]), cv2.LINE_8, shift)
    small = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    return small[..., :3], small[..., 3]


def render_pinhole(model: FlameModel, params: FitParams, cam: Pinhole, rng: np.random.Generator,
                   noise: float = 0.01, features: bool = True) -> dict:
    """A 'photo' through the pinhole camera, independent of the fit's camera and rasterizer:
    per-vertex albedo (features painted: see feature_colours) x the SH shading of the params'
    light, painted over a cluttered background, slight blur and sensor noise.

    Returns image (size, size, 3) uint8, landmarks2d 68 x 2 (dynamic contour, the 300-W
    silhouette convention, as the model's landmarks3d; past the model's contour table, +-39
    degrees of yaw for the stand-in, its last row), landmarks3d 68 x 2 (fixed contour,
    the 3D/AFLW2000-3D convention), vertices V x 3 (posed model space), camera (Pinhole).
    """
    import cv2

    from fitter.shading import sh_shading, vertex_normals

    with torch.no_grad():
        out = model(params.shape, params.exp, params.global_pose, params.neck_pose, params.jaw_pose, params.eye_pose)
        shade = sh_shading(vertex_normals(out.vertices, model.faces), params.light)[0].numpy()
    verts = out.vertices[0].numpy().astype(np.float64)
    albedo = params.albedo[0].numpy()
    if features:
        albedo = feature_colours(model, albedo, rng)
    colours = np.clip(albedo * shade, 0, 1)
    screen = pinhole_project(verts, cam)
    rgb, alpha = paint_mesh(screen, model.faces.numpy(), colours, cam.size, verts + cam.t)
    bg = clutter_background(rng, cam.size)
    img = rgb + (1 - alpha[..., None]) * bg
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    img = np.clip(img + rng.normal(0, noise, img.shape), 0, 1)
    return {"image": (img * 255).round().astype(np.uint8),
            "landmarks2d": pinhole_project(out.landmarks3d[0].numpy(), cam)[:, :2].astype(np.float32),
            "landmarks3d": pinhole_project(out.landmarks3d_full[0].numpy(), cam)[:, :2].astype(np.float32),
            "vertices": verts, "camera": cam}


def ortho_case(model: FlameModel, params: FitParams, rng: np.random.Generator, size: int = PHOTO_SIZE) -> dict:
    """The old generator (the fit's own orthographic camera and renderer), in render_pinhole's dict form;
    landmarks3d is the fixed contour through the same camera."""
    image, lmk = render_photo(model, params, rng, size)
    with torch.no_grad():
        out = model(params.shape, params.exp, params.global_pose, params.neck_pose, params.jaw_pose, params.eye_pose)
        full = ortho_project(out.landmarks3d_full, params.cam, size)[0, :, :2].numpy()
    return {"image": image, "landmarks2d": lmk, "landmarks3d": full.astype(np.float32),
            "vertices": out.vertices[0].numpy(), "camera": None}


# ----------------------------------------------------------------------------- landmark metrics
def box_size(truth: np.ndarray) -> float:
    """AFLW2000-3D's normaliser: sqrt(w * h) of the ground truth's bounding box."""
    return float(np.sqrt(np.ptp(truth[:, 0]) * np.ptp(truth[:, 1])))


def interocular(truth: np.ndarray) -> float:
    """300-W's normaliser: the distance of the outer eye corners (iBUG 36, 45)."""
    return float(np.linalg.norm(truth[36] - truth[45]))


def nme_box(pred: np.ndarray, truth: np.ndarray) -> float:
    """AFLW2000-3D NME: mean point distance / box_size of the ground truth."""
    return float(np.linalg.norm(pred - truth, axis=1).mean() / box_size(truth))


def nme_iod(pred: np.ndarray, truth: np.ndarray) -> float:
    """300-W inter-ocular NME: mean point distance / interocular distance of the ground truth."""
    return float(np.linalg.norm(pred - truth, axis=1).mean() / interocular(truth))


def yaw_bin(yaw_deg: float) -> str:
    """AFLW2000-3D's |yaw| bins: '0-30', '30-60', '60-90'."""
    a = abs(float(yaw_deg))
    return "0-30" if a < 30 else "30-60" if a < 60 else "60-90"


# ----------------------------------------------------------------------------- the landmark-only optimum
def landmark_oracle(model: FlameModel, params: FitParams, cam: Pinhole, target: np.ndarray, sigma_px: float = 1.0,
                    shape_sd: float = 1.0, exp_sd: float = 0.8) -> np.ndarray:
    """Posed vertices V x 3 of landmark_oracle_coeffs' solve (true pose)."""
    c = landmark_oracle_coeffs(model, params, cam, target, sigma_px, shape_sd, exp_sd)
    p = FitParams.initial(1, model.n_shape, model.n_exp, model.n_verts)
    p.shape, p.exp = (torch.as_tensor(x, dtype=torch.float32)[None] for x in (c[:model.n_shape], c[model.n_shape:]))
    p.global_pose, p.neck_pose, p.jaw_pose, p.eye_pose = (params.global_pose, params.neck_pose, params.jaw_pose,
                                                          params.eye_pose)
    return true_vertices(model, p)


def landmark_oracle_coeffs(model: FlameModel, params: FitParams, cam: Pinhole, target: np.ndarray,
                           sigma_px: float = 1.0, shape_sd: float = 1.0, exp_sd: float = 0.8,
                           rounds: int = 3) -> np.ndarray:
    """What 68 landmarks alone can give: shape and expression (n_shape + n_exp,) solved by linear
    least squares with the TRUE camera and the true pose (global, neck, jaw, eyes) held fixed.

    For a fixed pose the posed landmarks are exactly affine in (shape, exp) (blendshapes, joints and
    skinning are linear in them), so their Jacobian comes from one batched evaluation at the unit
    vectors. The pinhole residual of point k is linearised algebraically, (u - cx) * depth - f * X and
    (cy - v) * depth - f * Y, divided by the current depth of the point (px) and by sigma_px, and
    re-solved `rounds` times with the depths updated; the Gaussian priors shape ~ N(0, shape_sd^2),
    exp ~ N(0, exp_sd^2) (the test faces' own distributions) make it a MAP estimate.
    target: 68 x 2 pixels in the dynamic-contour convention (the fit's landmarks2d).
    """
    ns, ne = model.n_shape, model.n_exp
    n = ns + ne
    coeffs = torch.cat([torch.zeros(1, n), torch.eye(n)])
    rep = lambda x: x.expand(n + 1, *x.shape[1:])  # noqa: E731
    with torch.no_grad():
        lmk = model(coeffs[:, :ns], coeffs[:, ns:], rep(params.global_pose), rep(params.neck_pose),
                    rep(params.jaw_pose), rep(params.eye_pose), lean=True).landmarks3d.double().numpy()
    base = lmk[0] + cam.t  # 68 x 3, camera space at zero coefficients
    J = (lmk[1:] - lmk[0]).transpose(1, 2, 0)  # 68 x 3 x n
    du, dv = target[:, 0] - cam.cx, cam.cy - target[:, 1]
    prior = np.diag(np.concatenate([np.full(ns, 1 / shape_sd), np.full(ne, 1 / exp_sd)]))
    c = np.zeros(n)
    for _ in range(rounds):
        depth = -(base[:, 2] + J[:, 2] @ c)
        w = 1.0 / (depth * sigma_px)
        # (du * -(Z) - f X) and (dv * -(Z) - f Y), Z = base_z + J_z c, X = base_x + J_x c
        ax = (-du[:, None] * J[:, 2] - cam.focal * J[:, 0]) * w[:, None]
        bx = -(-du * base[:, 2] - cam.focal * base[:, 0]) * w
        ay = (-dv[:, None] * J[:, 2] - cam.focal * J[:, 1]) * w[:, None]
        by = -(-dv * base[:, 2] - cam.focal * base[:, 1]) * w
        A = np.concatenate([ax, ay, prior])
        b = np.concatenate([bx, by, np.zeros(n)])
        c = np.linalg.lstsq(A, b, rcond=None)[0]
    return c
