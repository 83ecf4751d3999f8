"""Fitting photos: targets from images, the objective, batched optimisation, results.

Library entry point: `fit_images(paths, recipe=..., model=...)` returns one FitResult (or
the error) per image; the CLI only writes them to files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from priors.assets import load_model, resolve_model_path
from priors.errors import FlamefitError, LandmarkError, NoFaceError, UsageError
from priors.flame import FlameModel, FlameOutput
from priors.mesh import mesh_edges, mirror_index

from . import detect, io
from .albedo import AlbedoModel, installed_albedo_model
from .camera import (camera_init_from_landmarks, crop_intrinsics, default_focal_px, opencv_camera,
                     pinhole_from_ortho)
from .losses import TERMS, Context, landmark_weights, mesh_grams
from .optimize import (Progress, StageReport, batched_jacobian, chained_jacobian, flatten_params, run_recipe,
                       unflatten_params)
from .params import FitParams
from .perceptual import load_perceptual
from .recipe import Recipe, Stage, load_recipe
from .synth import (RenderMesh, coarse_render_mesh, face_mask_polygon, landmark_pred, model_output, synthesize,
                    visible_region)


# ----------------------------------------------------------------------------- targets
@dataclass
class Target:
    """One photo prepared for fitting (numpy, original image kept for outputs)."""

    path: Path
    image: np.ndarray  # H x W x 3 uint8, as read (possibly downscaled from the file)
    scale: float  # pixels of `image` per pixel of the original file
    box: np.ndarray  # [cx, cy, size] in `image` pixels
    crop: np.ndarray  # res x res x 3 float32 in [0, 1]
    landmarks: np.ndarray  # 68 x 2 in `image` pixels
    landmarks_crop: np.ndarray  # 68 x 2 in crop pixels
    mask: np.ndarray  # res x res float32 face region (landmark polygon)
    focal_px: float = 0.0  # focal length in `image` pixels (EXIF or the default field of view)
    focal_source: str = "default"  # "exif" or "default"
    warnings: list[str] = field(default_factory=list)
    dense_crop: np.ndarray | None = None  # 478 x 2 MediaPipe points in crop pixels (when MediaPipe found the face)
    dense_weights: np.ndarray | None = None  # 478 detector weights (far side of a turned face ~0)
    detected: bool = False  # landmarks from a detector (not a file)

    @property
    def stem(self) -> str:
        return self.path.stem

    @property
    def original_size(self) -> tuple[int, int]:
        h, w = self.image.shape[:2]
        return round(h / self.scale), round(w / self.scale)


@dataclass
class Targets:
    """A batch of targets as tensors: image B x 3 x R x R, landmarks B x 68 x 2, mask B x 1 x R x R,
    focal B and principal B x 2: the photo's focal length and centre in crop ndc units."""

    image: Tensor
    landmarks: Tensor
    mask: Tensor
    lmk_weights: Tensor
    focal: Tensor | None = None  # None: no photo intrinsics (weak perspective only)
    principal: Tensor | None = None
    dense: Tensor | None = None  # B x 478 x 2 crop pixels (MediaPipe), or None when no image has them
    dense_weights: Tensor | None = None  # B x 478, 0 for images without dense points
    trust: Tensor | None = None  # B: weight of the landmark terms (1 for given points, less for detected)
    detected: Tensor | None = None  # B bool: landmarks from a detector (they weigh `trust`)

    def trusting(self, detector_trust: float) -> Targets:
        """The same targets with detected landmarks weighing detector_trust (the recipe's, or a stage's
        own), given ones 1."""
        if self.detected is None:  # no detected points in the batch
            return self
        return replace(self, trust=torch.where(self.detected, detector_trust, 1.0).float())

    def at_resolution(self, res: int) -> Targets:
        """The same targets for a smaller crop of res x res pixels (recipes allow a stage no more than
        the recipe's resolution): image and mask area-averaged down, points scaled; focal and
        principal point are in ndc units and stay."""
        size = self.image.shape[-1]
        if res == size:
            return self
        f = res / size
        resize = lambda t: torch.nn.functional.interpolate(t, size=(res, res), mode="area")  # noqa: E731
        return replace(self, image=resize(self.image), mask=resize(self.mask), landmarks=self.landmarks * f,
                       dense=None if self.dense is None else self.dense * f)

    def select(self, rows: Tensor) -> Targets:
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return Targets(self.image[rows], self.landmarks[rows], self.mask[rows], self.lmk_weights,
                       pick(self.focal), pick(self.principal), pick(self.dense), pick(self.dense_weights),
                       pick(self.trust), pick(self.detected))


def polygon_mask(points: np.ndarray, res: int) -> np.ndarray:
    """Filled polygon (crop pixels, corner convention) -> res x res float32 mask, lightly feathered."""
    mask = np.zeros((res, res), np.uint8)
    hull = cv2.convexHull((points * 16).round().astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 255, lineType=cv2.LINE_AA, shift=4)
    return cv2.GaussianBlur(mask, (0, 0), res / 224.0).astype(np.float32) / 255.0


def prepare_target(path: str | Path, res: int, landmarks_file: Path | None = None, detector: str = "auto",
                   device: str = "cpu", face_index: int | None = None, where: Path | None = None) -> Target:
    """Read an image, get its 68 landmarks (file, or a detector unless detector == "file"), crop
    around them. `where`: the --landmarks argument, for the message when a file is required."""
    path = Path(path)
    image, scale = io.read_image_with_scale(path)
    h, w = image.shape[:2]
    focal, warning = io.read_focal_px(path, (round(h / scale), round(w / scale)))
    focal_source = "exif" if focal is not None else "default"
    focal = focal * scale if focal is not None else default_focal_px(h, w)
    if landmarks_file is None and detector == "file":
        place = f"in {where}" if where is not None else "(no --landmarks given)"
        raise LandmarkError(f"{path}: no landmark file {path.stem}.pts/.npy/.json {place}; fix: add it or use "
                            "--detector auto")
    if landmarks_file is not None:
        lmk = io.read_landmarks(landmarks_file) * scale
        inside = (lmk[:, 0] > -0.5 * w) & (lmk[:, 0] < 1.5 * w) & (lmk[:, 1] > -0.5 * h) & (lmk[:, 1] < 1.5 * h)
        if not inside.all():
            raise LandmarkError(f"{landmarks_file}: landmarks lie far outside {path.name} ({w}x{h} px); "
                                "fix: give landmarks in that image's pixel coordinates")
    dense = dense_w = None
    if landmarks_file is None:
        try:
            lmk, dense, dense_w = detect.detect_points(image, detector, device, face_index)
        except NoFaceError as exc:
            raise NoFaceError(f"{path}: {exc}") from None
    lmk = io.validate_landmarks(lmk, landmarks_file or f"{path} (detected landmarks)")
    box = detect.square_box(lmk)
    crop = detect.crop_image(image, box, res)
    lmk_crop = detect.to_crop(lmk, box, res).astype(np.float32)
    mask = polygon_mask(face_mask_polygon(lmk_crop), res)
    dense_crop = detect.to_crop(dense, box, res).astype(np.float32) if dense is not None else None
    return Target(path, image, scale, box, crop, lmk.astype(np.float32), lmk_crop, mask, focal, focal_source,
                  [warning] if warning else [], dense_crop, dense_w, landmarks_file is None)


def prepare_from_args(path: Path, res: int, landmarks: Path | None, detector: str, device: str,
                      face_index: int | None) -> Target:
    """prepare_target with the CLI's landmark rules: --landmarks file or folder, --detector file."""
    lmk_file = io.landmarks_for_image(path, landmarks) if landmarks is not None else None
    return prepare_target(path, res, lmk_file, detector, device, face_index, where=landmarks)


def stack_targets(targets: list[Target], region_weights: dict, device, detector_trust: float = 1.0) -> Targets:
    """Tensors of a batch; detected landmarks weigh `detector_trust` (a recipe value), given ones 1."""
    img = torch.stack([torch.from_numpy(t.crop).permute(2, 0, 1) for t in targets]).to(device)
    lmk = torch.stack([torch.from_numpy(t.landmarks_crop) for t in targets]).to(device)
    mask = torch.stack([torch.from_numpy(t.mask)[None] for t in targets]).to(device)
    intr = torch.tensor([crop_intrinsics(t.focal_px, t.box, t.image.shape[:2]) for t in targets],
                        dtype=torch.float32, device=device)
    dense = dense_w = None
    if any(t.dense_crop is not None for t in targets):
        none = (np.zeros((478, 2), np.float32), np.zeros(478, np.float32))  # images without dense points weigh 0
        dense = torch.stack([torch.from_numpy(none[0] if t.dense_crop is None else t.dense_crop)
                             for t in targets]).to(device)
        dense_w = torch.stack([torch.from_numpy(none[1] if t.dense_weights is None else t.dense_weights)
                               for t in targets]).to(device)
    detected = torch.tensor([t.detected for t in targets], device=device)
    return Targets(img, lmk, mask, landmark_weights(region_weights).to(device), intr[:, 0], intr[:, 1:],
                   dense, dense_w, detected=detected).trusting(detector_trust)


def attach_dense_embedding(setup: FitSetup, targets: Targets) -> Targets:
    """When the targets have MediaPipe's 478 points and the recipe weighs them, make the model evaluate
    its MediaPipe embedding (priors.dense_embedding: cached, or derived once for this model) and fold
    the embedding's per-point confidence into the targets' weights."""
    if targets.dense is None or not setup.recipe.uses("dense_landmark"):
        return targets
    from priors.dense_embedding import dense_embedding_for

    if "dense_confidence" not in setup.extra:
        use_dense_embedding(setup, dense_embedding_for(setup.model))
    return replace(targets, dense_weights=targets.dense_weights * setup.extra["dense_confidence"])


def use_dense_embedding(setup: FitSetup, emb) -> None:
    """Make the setup's model evaluate this MediaPipe embedding (a DenseEmbedding) from now on, its
    per-point confidence folded into the targets' weights (attach_dense_embedding)."""
    from priors.dense_embedding import dense_weights

    setup.model.attach_dense(emb.faces, emb.bary)
    setup.extra["dense_confidence"] = torch.from_numpy(dense_weights(emb)).to(setup.device)


# ----------------------------------------------------------------------------- model
def load_flame(model: str | Path | FlameModel | None = None, device: str = "cpu",
               n_shape: int | None = None, n_exp: int | None = None) -> FlameModel:
    """A FlameModel from a path (or the resolved default), on `device`."""
    if isinstance(model, FlameModel):
        return model.to(device)
    assets = load_model(resolve_model_path(model), n_shape=n_shape, n_exp=n_exp)
    if assets.landmarks is None:
        raise UsageError(f"{assets.source}: the model has no landmark embedding; fix: put "
                         "landmark_embedding.npy next to it, then `cli.py assets install` it again")
    return FlameModel(assets).to(device)


@dataclass
class FitSetup:
    """Everything fixed for a fit of a batch: model, recipe, per-model helpers, perceptual module."""

    model: FlameModel
    recipe: Recipe
    device: str
    extra: dict
    warnings: list[str] = field(default_factory=list)
    albedo_model: AlbedoModel | None = None  # fitter.albedo: per-vertex or a texture space
    render_mesh: RenderMesh | None = None  # the decimated mesh that stages moving the head render (recipe.render_faces)


_MESH_CACHE: dict[str, tuple[Tensor, Tensor]] = {}
_RENDER_MESH_CACHE: dict[tuple, RenderMesh | None] = {}


def make_setup(model: FlameModel, recipe: Recipe, device: str = "cpu") -> FitSetup:
    extra = {"margin": recipe.consistency_margin}
    if recipe.uses("albedo_smooth") or recipe.uses("albedo_symmetry"):  # (the mirror index imports scipy.spatial)
        if model.tag not in _MESH_CACHE:
            _MESH_CACHE[model.tag] = mesh_grams(mesh_edges(model.faces.cpu()), mirror_index(model.v_template.cpu()),
                                                model.n_verts)
        smooth, mirror = _MESH_CACHE[model.tag]
        extra.update(smooth_gram=smooth.to(device), mirror_gram=mirror.to(device))
    warnings = []
    if recipe.uses("perceptual"):
        module, warning = load_perceptual(recipe.perceptual)
        if module is not None:
            extra["perceptual"] = module.to(device)
        else:  # 'off', or 'auto' without VGG weights: the term is dropped (and for the latter fit.json says so)
            recipe = without_term(recipe, "perceptual")
            if warning:
                warnings.append(warning)
    albedo_model, warning = installed_albedo_model(model, device)  # texture space if installed and usable
    if warning:
        warnings.append(warning)
    mesh = None
    if recipe.render_faces:
        key = (model.tag, tuple(model.dirs.shape), str(model.faces.device), recipe.render_faces,
               getattr(albedo_model, "source", None))
        if key not in _RENDER_MESH_CACHE:
            _RENDER_MESH_CACHE[key] = coarse_render_mesh(model, recipe.render_faces, albedo_model)
        mesh = _RENDER_MESH_CACHE[key]
    return FitSetup(model, recipe, device, extra, warnings, albedo_model, mesh)


def without_term(recipe: Recipe, term: str) -> Recipe:
    stages = [replace(s, weights={k: w for k, w in s.weights.items() if k != term}) for s in recipe.stages]
    return replace(recipe, stages=stages)


# ----------------------------------------------------------------------------- objective
def make_objective(setup: FitSetup, targets: Targets, tie_shape: bool = False):
    """objective(params, stage, rows) -> (per-image total, per-term weighted values) for those rows."""
    base = setup.recipe.resolution
    kept: dict = {}  # (stage, rows) -> (params, geometry) of a stage that fits appearance alone
    regions: dict = {}  # (stage, rows) -> the part of the mesh a stage moving the head renders
    scaled: dict = {base: targets}  # crop size (and a stage's own detector_trust) -> the targets at that size

    def at(stage: Stage) -> tuple[int, Targets]:
        res = stage.resolution or base
        if res not in scaled:
            scaled[res] = targets.at_resolution(res)
        if stage.detector_trust is None:
            return res, scaled[res]
        key = (res, stage.detector_trust)
        if key not in scaled:
            scaled[key] = scaled[res].trusting(stage.detector_trust)
        return res, scaled[key]

    def fixed_geometry(stage: Stage, rows: Tensor, chunk: FitParams, tgt: Targets, res: int) -> dict:
        """The model, normals and rasterization of a stage that moves no geometry: made once, reused."""
        key = (stage.name, tuple(rows.tolist()))
        hit = kept.get(key)
        if hit is None or not _same_geometry(hit[0], chunk):
            with torch.no_grad():
                pred = synthesize(setup.model, chunk, res, background=tgt.image, albedo_model=setup.albedo_model,
                                  maps=False, cull_back=True)
            hit = kept[key] = (chunk, pred["fixed"])
        return hit[1]

    def region(stage: Stage, rows: Tensor, chunk: FitParams, tgt: Targets, res: int) -> RenderMesh:
        """What can show inside these images' masks, chosen at the stage's first step (visible_region)."""
        key = (stage.name, tuple(rows.tolist()))
        if key not in regions:
            regions[key] = visible_region(setup.model, chunk, res, tgt.mask, setup.render_mesh, setup.albedo_model)
        return regions[key]

    n_set = targets.landmarks.shape[0]
    given = ~targets.detected if targets.detected is not None else torch.ones(n_set, dtype=torch.bool)
    shape_share = torch.where(given, 1.0 / n_set, 1.0).to(targets.landmarks) if tie_shape else None  # n_set

    def share(name: str, rows: Tensor) -> Tensor | float:
        """What part of the shape prior each image carries when the set shares one shape (tie_shape). A photo
        with given landmarks carries 1 / (images): the set then counts the prior once, as one photo does,
        while the photos' evidence adds up. A photo with detected points carries all of it: the detector
        misses one person's face the same way in every photo, so more photos are not more evidence against
        that miss, and the prior must not loosen. The albedo's priors stay whole per image: counted once,
        they made fit-set's identity worse (BENCHMARKS.md, tenth round)."""
        return shape_share.index_select(0, rows) if shape_share is not None and name == "shape_prior" else 1.0

    def objective(params: FitParams, stage: Stage, rows: Tensor):
        if tie_shape:  # one identity for the whole set (fit-set, shared mode)
            params = _with_shared_shape(params)
        res, stage_targets = at(stage)
        chunk, tgt = params.select(rows), stage_targets.select(rows)
        needs_render = any(TERMS[t].needs_render for t, w in stage.weights.items() if w > 0)
        moves = bool(GEOMETRY & set(stage.params))
        fixed = fixed_geometry(stage, rows, chunk, tgt, res) if needs_render and not moves else None
        # faces turned away are hidden behind the head: the fit's renders skip them (cull_back); a stage
        # that moves the head renders the part of its mesh (recipe.render_faces: decimated) that can show in
        # the masks, one that fits appearance on a fixed head the whole mesh once
        mesh = region(stage, rows, chunk, tgt, res) if needs_render and moves else None
        pred = synthesize(setup.model, chunk, res, render=needs_render, background=tgt.image if needs_render else None,
                          lean=True, albedo_model=setup.albedo_model, maps=False, cull_back=True, fixed=fixed,
                          mesh=mesh)
        extra = {**setup.extra, "set_shapes": params.shape, "rows": rows}
        ctx = Context(chunk, pred, tgt, res, extra)
        terms = {name: w * share(name, rows) * TERMS[name].fn(ctx) for name, w in stage.weights.items() if w > 0}
        total = torch.stack(list(terms.values())).sum(0) if terms else chunk.shape.new_zeros(chunk.batch)
        return total, terms

    def residuals(chunk: FitParams, stage: Stage, rows: Tensor) -> Tensor:
        """The stage's terms as one residual vector per row, each scaled by sqrt(weight) (least squares):
        chunk holds the parameters of the target rows `rows` only (len(rows) rows) -> len(rows) x M."""
        res, stage_targets = at(stage)
        tgt = stage_targets.select(rows)
        pred = synthesize(setup.model, chunk, res, render=False, lean=True)
        ctx = Context(chunk, pred, tgt, res, {**setup.extra, "rows": rows})
        return torch.cat(residual_parts(ctx, stage), dim=1)

    def residual_parts(ctx: Context, stage: Stage) -> list[Tensor]:
        return [w ** 0.5 * TERMS[name].residual(ctx) for name, w in stage.weights.items() if w > 0]

    def residual_jacobian(chunk: FitParams, names: list[str], stage: Stage, rows: Tensor
                          ) -> tuple[Tensor, Tensor] | None:
        """residuals(chunk, stage, rows) and their Jacobian in the groups `names` (flattened in that order:
        len(rows) x M x P), through the model's points: the chain rule (optimize.chained_jacobian) with
        the points' derivative in the blendshape coefficients in closed form and in the poses by autodiff
        (few columns). None where that does not apply or would not pay: a group that is not geometry, no
        landmarks, or no coefficients (autodiff through the model is as fast for a few pose columns)."""
        model = setup.model
        if not set(names) <= GEOMETRY or not model.has_landmarks or not {"shape", "exp"} & set(names):
            return None
        res, stage_targets = at(stage)
        tgt = stage_targets.select(rows)
        poses = [n for n in names if n.endswith("_pose")]

        def points(p: FitParams) -> Tensor:  # B x 3N: landmarks3d, landmarks3d_full, dense
            out = model_output(model, p, lean=True)
            return torch.cat([out.landmarks3d, out.landmarks3d_full] + ([out.dense] if out.dense is not None else []),
                             dim=1).flatten(1)

        with torch.no_grad():
            q = points(chunk)
            dq_coeffs = model.lean_coeff_jacobian(torch.cat([chunk.shape, chunk.exp], dim=1),
                                                  model.full_pose(chunk.global_pose, chunk.neck_pose,
                                                                  chunk.jaw_pose, chunk.eye_pose))
        dq_coeffs = dq_coeffs.flatten(1, 2)  # B x 3N x K
        dq_pose = batched_jacobian(lambda v: points(unflatten_params(chunk, poses, v)),
                                   flatten_params(chunk, poses))[1] if poses else None
        cols, at_pose = [], 0
        for n in names:  # dq/dx, column block by column block in the order of `names`
            width = getattr(chunk, n)[0].numel()
            if n == "shape":
                cols.append(dq_coeffs[..., :model.n_shape])
            elif n == "exp":
                cols.append(dq_coeffs[..., model.n_shape:])
            elif n in poses:
                cols.append(dq_pose[..., at_pose:at_pose + width])
                at_pose += width
            else:  # the camera moves no model point
                cols.append(q.new_zeros(*q.shape, width))

        def from_points(qv: Tensor, xv: Tensor) -> list[Tensor]:  # what residuals() computes, from the points
            p = unflatten_params(chunk, names, xv)
            pts = qv.view(qv.shape[0], -1, 3)
            n = model.full_faces.shape[0]  # the landmarks, then the same with the fixed contour, then dense
            out = FlameOutput(pts.new_zeros(pts.shape[0], 0, 3), None, pts[:, :n], pts[:, n:2 * n],
                              pts[:, 2 * n:] if pts.shape[1] > 2 * n else None)
            return residual_parts(Context(p, landmark_pred(out, p.cam, res), tgt, res, {**setup.extra, "rows": rows}),
                                  stage)

        return chained_jacobian(from_points, q, torch.cat(cols, dim=2), flatten_params(chunk, names))

    if not tie_shape:  # least squares needs images with their own parameters
        objective.residuals = residuals
        objective.residual_jacobian = residual_jacobian
    return objective


GEOMETRY = frozenset({"cam", "global_pose", "neck_pose", "jaw_pose", "eye_pose", "shape", "exp"})


def _same_geometry(a: FitParams, b: FitParams) -> bool:
    return all(torch.equal(getattr(a, n), getattr(b, n)) for n in GEOMETRY)


def _with_shared_shape(params: FitParams) -> FitParams:
    """Every image uses row 0's shape and albedo (the identity); gradients gather there."""
    B = params.batch
    return FitParams(**{**dict(params.items()),
                        "shape": params.shape[:1].expand(B, -1),
                        "albedo": params.albedo[:1].expand(B, *params.albedo.shape[1:])})


def initial_params(setup: FitSetup, targets: Targets) -> FitParams:
    """Neutral head with the camera solved in closed form from the landmarks."""
    m = setup.model
    B = targets.landmarks.shape[0]
    params = FitParams.initial(B, m.n_shape, m.n_exp, m.n_verts, device=setup.device)
    if setup.albedo_model is not None:
        params.albedo = setup.albedo_model.initial_albedo(B, setup.device)
    with torch.no_grad():
        out = model_output(m, params)
        pinhole = setup.recipe.camera == "pinhole" and targets.focal is not None
        params.cam = camera_init_from_landmarks(out.landmarks3d_full, targets.landmarks, setup.recipe.resolution,
                                                targets.focal if pinhole else None,
                                                targets.principal if pinhole else None)
    return params


# ----------------------------------------------------------------------------- results
@dataclass
class FitResult:
    target: Target
    params: FitParams  # batch of 1
    vertices: np.ndarray  # V x 3, model space
    landmarks2d: np.ndarray  # 68 x 2, original image pixels
    landmarks2d_target: np.ndarray  # 68 x 2, original image pixels
    report: dict  # fit.json content
    model_tag: str
    recipe_name: str
    albedo_model: AlbedoModel | None = None  # what params.albedo means (outputs render with it)
    landmarks3d: np.ndarray | None = None  # 68 x 2, static 3D jawline (AFLW2000-3D convention), original pixels
    K: np.ndarray | None = None  # 3 x 3 intrinsics, original pixels (OpenCV axes)
    R: np.ndarray | None = None  # 3 x 3 world-to-camera rotation
    t: np.ndarray | None = None  # 3 world-to-camera translation (metres)


def crop_to_original(points: np.ndarray, target: Target, res: int) -> np.ndarray:
    return (detect.from_crop(points, target.box, res) / target.scale).astype(np.float32)


def landmark_rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).sum(1).mean()))


def collect_results(setup: FitSetup, targets: list[Target], params: FitParams, reports: list[StageReport],
                    seconds: float, warnings: list[str]) -> list[FitResult]:
    res = setup.recipe.resolution
    with torch.no_grad():
        pred = synthesize(setup.model, params, res, render=False)
    results = []
    for i, t in enumerate(targets):
        lmk = crop_to_original(pred["landmarks2d"][i].cpu().numpy(), t, res)
        lmk3d = crop_to_original(pred["landmarks2d_static"][i].cpu().numpy(), t, res)
        K, R, tr = opencv_camera(params.cam[i], t.box, res, t.scale)
        lmk_t = (t.landmarks / t.scale).astype(np.float32)
        stages = [{"name": r.name, "iterations": r.iterations, "seconds": round(r.seconds, 3),
                   "losses": {k: v[i] for k, v in r.losses.items()}, **({"events": r.events} if r.events else {})}
                  for r in reports]
        report = {
            "image": str(t.path), "model": setup.model.tag, "recipe": setup.recipe.name,
            "device": setup.device, "seconds": round(seconds, 3),
            "iterations": sum(r.iterations for r in reports), "stages": stages,
            "landmark_rmse_px": round(landmark_rmse(lmk, lmk_t), 3),
            "albedo": setup.albedo_model.describe() if setup.albedo_model is not None else "per-vertex",
        }
        report["camera"] = {"model": setup.recipe.camera, "focal_px": round(float(K[0, 0]), 2),
                            "focal_source": t.focal_source if setup.recipe.camera == "pinhole" else "none",
                            "distance_m": round(float(tr[2]), 4)}
        notes = list(warnings) + list(t.warnings)
        if notes:
            report["warnings"] = notes
        results.append(FitResult(t, params.select(i), pred["vertices"][i].cpu().numpy(), lmk, lmk_t, report,
                                 setup.model.tag, setup.recipe.name, setup.albedo_model, lmk3d,
                                 K.astype(np.float32), R.astype(np.float32), tr.astype(np.float32)))
    return results


def fit_targets(setup: FitSetup, targets: list[Target], progress: Progress | None = None, seed: int = 0,
                init: FitParams | None = None, tie_shape: bool = False, optimizer: str = "adam",
                ) -> list[FitResult]:
    """Fit a batch of prepared targets jointly (own parameters each unless tie_shape)."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    batch = stack_targets(targets, setup.recipe.landmark_weights, setup.device, setup.recipe.detector_trust)
    batch = attach_dense_embedding(setup, batch)
    params = init if init is not None else initial_params(setup, batch)
    objective = make_objective(setup, batch, tie_shape=tie_shape)
    params, reports = run_recipe(params, setup.recipe, objective, progress, optimizer)
    if tie_shape:
        params = _with_shared_shape(params).map(lambda t: t.contiguous())
    return collect_results(setup, targets, params, reports, time.perf_counter() - start, setup.warnings)


def deca_initializer(setup: FitSetup):
    """A function targets -> initial FitParams from DECA's encoder (FLAME only; weights from the cache)."""
    from priors.deca import deca_initial_params, default_deca_path, load_deca_encoder, require_flame_topology

    require_flame_topology(setup.model)
    encoder = load_deca_encoder(default_deca_path()).to(setup.device).eval()

    def initialize(targets: list[Target]) -> FitParams:
        batch = stack_targets(targets, setup.recipe.landmark_weights, setup.device, setup.recipe.detector_trust)
        crops = torch.nn.functional.interpolate(batch.image, size=(224, 224), mode="bilinear", align_corners=False)
        params = deca_initial_params(encoder, crops, setup.model, initial_params(setup, batch),
                                     use_tex=getattr(setup.albedo_model, "deca_tex", False))
        if setup.recipe.camera == "pinhole":  # DECA's camera is weak perspective about the crop centre
            params.cam = pinhole_from_ortho(params.cam, batch.focal, batch.principal)
        return params

    return initialize


# images per batched optimisation when the caller does not say: each image keeps its own parameters,
# and the per-operation overhead that dominates small CPU problems is paid once per batch (bench.fit
# --batch 1 against the default 8: BENCHMARKS.md, "Speed, second round")
FIT_BATCH = 8


def fit_images(paths, recipe: str | Recipe = "default", model=None, detector: str = "auto",
               landmarks: str | Path | None = None, device: str = "cpu", batch_size: int = FIT_BATCH, seed: int = 0,
               overrides=(), face_index: int | None = None, progress: Progress | None = None,
               on_target=None, init: str = "zero") -> list[FitResult | FlamefitError]:
    """Fit each image on its own (batched `batch_size` at a time). Returns, per image, its
    FitResult or the FlamefitError that stopped it; one bad image never stops the others.
    `on_target(i, result_or_error)` is called as soon as an image's outcome is known.
    init: "zero" (neutral head, camera from the landmarks) or "deca" (DECA encoder warm start)."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    flame = load_flame(model, device)
    setup = make_setup(flame, recipe, device)
    initializer = deca_initializer(setup) if init == "deca" else None
    paths = [Path(p) for p in paths]
    lmk_arg = Path(landmarks) if landmarks is not None else None
    if lmk_arg is not None and lmk_arg.is_file() and len(paths) > 1:
        raise UsageError(f"--landmarks {lmk_arg}: a single file serves one image; fix: for several images "
                         "give a directory holding <stem>.pts/.npy/.json")
    outcomes: list = [None] * len(paths)
    ready: list[tuple[int, Target]] = []

    def fit_batch(batch: list[Target]) -> list[FitResult]:
        start = initializer(batch) if initializer else None
        return fit_targets(setup, batch, progress, seed, init=start)

    def fit_alone(target: Target) -> FitResult | FlamefitError:
        try:
            return fit_batch([target])[0]
        except FlamefitError as exc:
            return exc

    def flush():
        if not ready:
            return
        idx = [i for i, _ in ready]
        batch = [t for _, t in ready]
        try:
            fitted = fit_batch(batch)
        except FlamefitError as exc:
            # one image whose fit fails (e.g. a non-finite objective) must not take its batch with it:
            # the others are fitted again on their own (a usage error would fail each of them alike)
            alone = len(batch) > 1 and not isinstance(exc, UsageError)
            fitted = [fit_alone(t) for t in batch] if alone else [exc] * len(batch)
        for i, r in zip(idx, fitted, strict=True):
            outcomes[i] = r
            if on_target:
                on_target(i, r)
        ready.clear()

    for i, p in enumerate(paths):
        try:
            ready.append((i, prepare_from_args(p, recipe.resolution, lmk_arg, detector, device, face_index)))
        except FlamefitError as exc:
            outcomes[i] = exc
            if on_target:
                on_target(i, exc)
            continue
        if len(ready) >= batch_size:
            flush()
    flush()
    return outcomes
