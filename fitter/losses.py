"""Loss terms: small named functions, each returning one value per image (shape B).

The pure functions take tensors; `TERMS` binds each recipe key to a function of the fit's
context, and says whether the term needs a rendered image (landmark-only stages skip the
renderer). Adding a term touches this file and one recipe key.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from priors.mesh import sparse_csr

# iBUG-68 regions (0-based)
REGIONS = {
    "contour": range(17),
    "brows": range(17, 27),
    "nose": range(27, 36),
    "eyes": range(36, 48),
    "mouth": range(48, 68),
}
EYE_UPPER, EYE_LOWER = [37, 38, 43, 44], [41, 40, 47, 46]
LIP_UPPER, LIP_LOWER = [61, 62, 63], [67, 66, 65]


def charbonnier(x: Tensor, eps: float) -> Tensor:
    """Robust penalty sqrt(x^2 + eps^2) - eps: quadratic near 0, linear (L1-like) far out."""
    return torch.sqrt(x * x + eps * eps) - eps


def landmark_weights(region_weights: dict[str, float] | None = None) -> Tensor:
    """Per-point weights (68,) from per-region weights (missing regions weigh 1)."""
    w = torch.ones(68)
    for region, value in (region_weights or {}).items():
        w[list(REGIONS[region])] = value
    return w


def landmark_loss(pred: Tensor, target: Tensor, weights: Tensor, res: int, eps: float = 0.01) -> Tensor:
    """Robust landmark distance: pred, target B x 68 x 2 (crop pixels), weights 68 -> B.

    Distances are measured in half-crop units (as normalised device coordinates), so a
    weight means the same at any resolution; Charbonnier on the point-to-point distance.
    """
    d = (pred - target) / (res / 2.0)
    r = charbonnier(d.norm(dim=-1), eps)  # B x 68
    return (r * weights).sum(1) / weights.sum()


def landmark_residual(pred: Tensor, target: Tensor, weights: Tensor, res: int, eps: float = 0.01) -> Tensor:
    """The landmark term as least-squares residuals (IRLS): B x 68 x 2 points -> B x 136.

    The Charbonnier weight 1 / sqrt(d^2 + eps^2) is taken at the current point and held fixed
    (detached), so that sum(residual^2) is the robust term's quadratic majoriser there up to a
    constant: Gauss-Newton on it is iteratively reweighted least squares on `landmark_loss`.
    """
    d = (pred - target) / (res / 2.0)
    irls = 1.0 / torch.sqrt((d.detach() ** 2).sum(-1, keepdim=True) + eps * eps)  # B x 68 x 1
    return (d * torch.sqrt(0.5 * irls * (weights / weights.sum())[:, None])).flatten(1)


def weighted_point_loss(pred: Tensor, target: Tensor, weights: Tensor, res: int, eps: float = 0.01) -> Tensor:
    """Robust distance of points with per-image weights: pred, target B x N x 2 (crop pixels), weights
    B x N (>= 0; an image whose weights are all 0 contributes 0) -> B. As landmark_loss otherwise."""
    r = charbonnier(((pred - target) / (res / 2.0)).norm(dim=-1), eps)
    return (r * weights).sum(1) / weights.sum(1).clamp_min(1e-6)


def weighted_point_residual(pred: Tensor, target: Tensor, weights: Tensor, res: int, eps: float = 0.01) -> Tensor:
    """weighted_point_loss as IRLS residuals (see landmark_residual): B x N x 2 -> B x 2N."""
    d = (pred - target) / (res / 2.0)
    irls = 1.0 / torch.sqrt((d.detach() ** 2).sum(-1) + eps * eps)  # B x N
    w = weights / weights.sum(1, keepdim=True).clamp_min(1e-6)
    return (d * torch.sqrt(0.5 * irls * w)[..., None]).flatten(1)


def _has_dense(c) -> bool:
    return c.target.dense is not None and "dense2d" in c.pred


def _dense_loss(c) -> Tensor:
    """The dense-landmark term; 0 per image when the photo or the model has no dense points."""
    if not _has_dense(c):
        return c.params.shape.new_zeros(c.params.batch)
    return weighted_point_loss(c.pred["dense2d"], c.target.dense, c.target.dense_weights, c.res)


def _dense_residual(c) -> Tensor:
    if not _has_dense(c):
        return c.params.shape.new_zeros(c.params.batch, 0)
    return weighted_point_residual(c.pred["dense2d"], c.target.dense, c.target.dense_weights, c.res)


def _pair_distance(points: Tensor, a: list[int], b: list[int]) -> Tensor:
    """|points[a_i] - points[b_i]| per pair: B x N x D -> B x pairs. The differences come from a
    +1/-1 matrix product, not tensor indexing, which the least-squares Jacobian would differentiate
    one column at a time (fitter.optimize.batched_jacobian)."""
    return (_pair_matrix(tuple(a), tuple(b), points.shape[1]).to(points) @ points).norm(dim=-1)


@functools.lru_cache(maxsize=16)
def _pair_matrix(a: tuple[int, ...], b: tuple[int, ...], n: int) -> Tensor:
    """pairs x n: +1 at a_i, -1 at b_i in row i (made once per pair list: each fit step asks again)."""
    diff = torch.zeros(len(a), n)
    diff[range(len(a)), a] += 1.0
    diff[range(len(b)), b] -= 1.0
    return diff


def relative_distance_loss(pred: Tensor, target: Tensor, a: list[int], b: list[int], res: int) -> Tensor:
    """Mean |d_pred - d_target| over point pairs (a_i, b_i) (eye closure, lip distance) -> B."""
    dp, dt = _pair_distance(pred, a, b), _pair_distance(target, a, b)
    return ((dp - dt).abs() / (res / 2.0)).mean(1)


def relative_distance_residual(pred: Tensor, target: Tensor, a: list[int], b: list[int], res: int,
                               eps: float = 0.01) -> Tensor:
    """relative_distance_loss as IRLS residuals (its L1 smoothed at eps, weights detached) -> B x pairs."""
    e = (_pair_distance(pred, a, b) - _pair_distance(target, a, b)) / (res / 2.0)
    irls = 1.0 / torch.sqrt(e.detach() ** 2 + eps * eps)
    return e * torch.sqrt(0.5 * irls / e.shape[1])


def photometric_loss(render: Tensor, image: Tensor, mask: Tensor, eps: float = 0.01) -> Tensor:
    """Robust L1 inside a mask: render, image B x 3 x H x W, mask B x 1 x H x W in [0,1] -> B."""
    r = charbonnier(render - image, eps).sum(1, keepdim=True)  # B x 1 x H x W
    return (r * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3)).clamp_min(1.0)


def photometric_l2(render: Tensor, image: Tensor, mask: Tensor) -> Tensor:
    """Plain (non-robust) squared error inside a mask, for comparison: B x 3 x H x W -> B."""
    r = ((render - image) ** 2).sum(1, keepdim=True)
    return (r * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3)).clamp_min(1.0)


def squared_norm(x: Tensor) -> Tensor:
    """Gaussian prior (negative log-likelihood up to a constant): B x K -> B."""
    return (x * x).flatten(1).sum(1)


def range_penalty(x: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Squared distance outside [low, high], elementwise bounds: B x K -> B."""
    return (range_residual(x, low, high) ** 2).sum(1)


def range_residual(x: Tensor, low, high) -> Tensor:
    """Distance outside [low, high] (0 inside), B x K -> B x K: range_penalty = sum of its squares."""
    return (torch.relu(low - x) + torch.relu(x - high)).flatten(1)


def focal_residual(cam: Tensor, focal0: Tensor) -> Tensor:
    """log(f / f0) of a pinhole camera B x 6 against the photo's focal length B (EXIF or default) -> B x 1;
    zero for weak perspective. A log prior: a lens twice as long costs what one half as long does."""
    if cam.shape[1] != 6 or focal0 is None:
        return cam.new_zeros(cam.shape[0], 1)
    f = cam[:, 3:4]
    focal = f + torch.relu(1e-6 - f)  # ~ f.clamp_min(1e-6), exactly f above it, with relu: see _pair_distance
    return torch.log(focal / focal0[:, None])


# jaw: pitch (x) opens the mouth; a little yaw/roll only
JAW_LOW, JAW_HIGH = (-0.05, -0.1, -0.1), (0.6, 0.1, 0.1)
EYE_LIMIT = 0.6
NECK_LIMIT = 0.8


def pair_gram(pairs: Tensor, n: int) -> Tensor:
    """The mean squared difference over index pairs as a quadratic form: sparse symmetric Q (n x n,
    CSR) with x^T Q x = mean over pairs (i, j) of (x_i - x_j)^2. pairs P x 2."""
    i, j = pairs[:, 0], pairs[:, 1]
    w = torch.full((pairs.shape[0],), 1.0 / max(pairs.shape[0], 1), device=pairs.device)
    idx = torch.stack([torch.cat([i, j, i, j]), torch.cat([i, j, j, i])])
    return sparse_csr(idx, torch.cat([w, w, -w, -w]), (n, n))


def mesh_grams(edges: Tensor, mirror: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """pair_gram of the mesh edges E x 2 (smoothness) and of each vertex with its mirror image (symmetry)."""
    return pair_gram(edges, n), pair_gram(torch.stack([torch.arange(n, device=mirror.device), mirror], 1), n)


class _QuadraticForm(torch.autograd.Function):
    """sum over channels of x_c^T Q x_c for a symmetric sparse Q: one sparse product forward, and
    the backward (2 Q x) reuses it, where gathering pairs and scattering them back costs 7x more."""

    @staticmethod
    def forward(ctx, values: Tensor, gram: Tensor) -> Tensor:
        bsz, n, nch = values.shape
        qx = (gram @ values.permute(1, 0, 2).reshape(n, bsz * nch)).view(n, bsz, nch).permute(1, 0, 2)
        ctx.save_for_backward(qx)
        return (values * qx).sum((1, 2))

    @staticmethod
    def backward(ctx, grad: Tensor):
        (qx,) = ctx.saved_tensors
        return 2 * grad[:, None, None] * qx, None


def quadratic_form(values: Tensor, gram: Tensor) -> Tensor:
    """values B x V x C, gram V x V (pair_gram) -> B: e.g. the mean squared difference across mesh
    edges (smoothness) or to each vertex's mirror image (symmetry), summed over the channels."""
    return _QuadraticForm.apply(values, gram.to(values.dtype))


def sh_light_regulariser(light: Tensor) -> Tensor:
    """Penalise directional SH energy and colour casts: light B x 9 x 3 -> B."""
    directional = (light[:, 1:] ** 2).sum((1, 2))
    grey = light.mean(2, keepdim=True)
    cast = ((light - grey) ** 2).sum((1, 2))
    return directional + cast


def shape_consistency(shapes: Tensor, margin: float, negatives: Tensor | None = None) -> Tensor:
    """RingNet-style identity consistency for shapes of one person, B x K -> B.

    For each image j: mean over k != j of max(0, |b_j - b_k|^2 + margin - |b_j - b_n|^2) over
    negatives n (other identities, N x K), plus a pull |b_j - mean|^2 towards the set mean.
    """
    mean = shapes.mean(0, keepdim=True)
    pull = ((shapes - mean) ** 2).sum(1)
    if negatives is None or negatives.numel() == 0 or shapes.shape[0] < 2:
        return pull
    pos = torch.cdist(shapes, shapes) ** 2  # B x B
    neg = torch.cdist(shapes, negatives) ** 2  # B x N
    hinge = torch.relu(pos[:, :, None] + margin - neg[:, None, :])  # B x B x N
    off_diag = 1.0 - torch.eye(shapes.shape[0], device=shapes.device)
    hinge = (hinge.mean(2) * off_diag).sum(1) / off_diag.sum(1)
    return hinge + pull


# ----------------------------------------------------------------------------- registry
@dataclass
class Context:
    """What a term may look at during one step."""

    params: object  # FitParams
    pred: dict  # synthesis outputs: landmarks2d B x 68 x 2, image, alpha, vertices ...
    target: object  # Targets: image, landmarks, mask, lmk_weights
    res: int
    extra: dict = field(default_factory=dict)  # mirror, edges, perceptual module, negatives, margin


@dataclass
class Term:
    """fn: the term's value per image (B). residual, when given: B x M residuals whose sum of squares
    is fn (or, for robust terms, its reweighted quadratic model at the current point), which lets
    the least-squares solver take the term."""

    fn: Callable[[Context], Tensor]
    needs_render: bool = False
    residual: Callable[[Context], Tensor] | None = None


def _from_residual(residual: Callable[[Context], Tensor]) -> Term:
    """A smooth term defined by its residuals: value = sum of squares."""
    return Term(lambda c: (residual(c) ** 2).sum(1), residual=residual)


def _jaw_residual(c: Context) -> Tensor:
    jaw = c.params.jaw_pose
    return range_residual(jaw, jaw.new_tensor(JAW_LOW), jaw.new_tensor(JAW_HIGH))


def _neck_residual(c: Context) -> Tensor:
    neck = c.params.neck_pose
    return torch.cat([neck, range_residual(neck, -NECK_LIMIT, NECK_LIMIT)], dim=1)


def _perceptual(c: Context) -> Tensor:
    module = c.extra.get("perceptual")
    if module is None:
        return c.params.shape.new_zeros(c.params.batch)
    comp = c.pred["image"] * c.target.mask + c.target.image * (1 - c.target.mask)
    return module(comp, c.target.image)


def _albedo_field(c: Context, fn) -> Tensor:
    a = c.params.albedo
    if a.dim() != 3:  # texture-space coefficients: the Gaussian prior applies instead
        return a.new_zeros(a.shape[0])
    return fn(a)


def _consistency(c: Context) -> Tensor:
    """Over the whole set's shapes (extra['set_shapes']), returned for this chunk's rows."""
    shapes = c.extra.get("set_shapes", c.params.shape)
    rows = c.extra.get("rows", torch.arange(shapes.shape[0], device=shapes.device))
    return shape_consistency(shapes, c.extra.get("margin", 0.5), c.extra.get("negatives"))[rows]


def _trusted(fn: Callable[[Context], Tensor], residual: Callable[[Context], Tensor]) -> Term:
    """A landmark-type term scaled per image by how far its points are trusted (Targets.trust: 1 for
    landmark files, the recipe's detector_trust for detected points, so that the priors count more
    against a detector's noise)."""
    def value(c: Context) -> Tensor:
        trust = getattr(c.target, "trust", None)
        return fn(c) if trust is None else fn(c) * trust

    def scaled_residual(c: Context) -> Tensor:
        trust = getattr(c.target, "trust", None)
        return residual(c) if trust is None else residual(c) * trust.sqrt()[:, None]

    return Term(value, residual=scaled_residual)


TERMS: dict[str, Term] = {
    "landmark": _trusted(lambda c: landmark_loss(c.pred["landmarks2d"], c.target.landmarks, c.target.lmk_weights,
                                                 c.res),
                         lambda c: landmark_residual(c.pred["landmarks2d"], c.target.landmarks, c.target.lmk_weights,
                                                     c.res)),
    "eye_closure": _trusted(lambda c: relative_distance_loss(c.pred["landmarks2d"], c.target.landmarks,
                                                             EYE_UPPER, EYE_LOWER, c.res),
                            lambda c: relative_distance_residual(c.pred["landmarks2d"], c.target.landmarks,
                                                                 EYE_UPPER, EYE_LOWER, c.res)),
    "lip_distance": _trusted(lambda c: relative_distance_loss(c.pred["landmarks2d"], c.target.landmarks,
                                                              LIP_UPPER, LIP_LOWER, c.res),
                             lambda c: relative_distance_residual(c.pred["landmarks2d"], c.target.landmarks,
                                                                  LIP_UPPER, LIP_LOWER, c.res)),
    # MediaPipe's 478 points (468 mesh + 10 iris) through the model's own derived embedding; the
    # iris points move the eyeballs, so this term also fits the gaze (eye_pose)
    "dense_landmark": _trusted(_dense_loss, _dense_residual),
    "photo": Term(lambda c: photometric_loss(c.pred["image"], c.target.image,
                                             c.target.mask * c.pred["alpha"]), needs_render=True),
    "photo_l2": Term(lambda c: photometric_l2(c.pred["image"], c.target.image,
                                              c.target.mask * c.pred["alpha"]), needs_render=True),
    "perceptual": Term(_perceptual, needs_render=True),
    "shape_prior": _from_residual(lambda c: c.params.shape),
    "exp_prior": _from_residual(lambda c: c.params.exp),
    "jaw_limit": _from_residual(_jaw_residual),
    "neck_prior": _from_residual(_neck_residual),
    "eye_limit": _from_residual(lambda c: range_residual(c.params.eye_pose, -EYE_LIMIT, EYE_LIMIT)),
    "focal_prior": _from_residual(lambda c: focal_residual(c.params.cam, c.target.focal)),
    "light_reg": Term(lambda c: sh_light_regulariser(c.params.light)),
    "albedo_prior": Term(lambda c: squared_norm(c.params.albedo) if c.params.albedo.dim() == 2
                         else c.params.albedo.new_zeros(c.params.batch)),
    "albedo_smooth": Term(lambda c: _albedo_field(c, lambda a: quadratic_form(a, c.extra["smooth_gram"]))),
    "albedo_symmetry": Term(lambda c: _albedo_field(c, lambda a: quadratic_form(a, c.extra["mirror_gram"]))),
    "shape_consistency": Term(_consistency),
}


# ----------------------------------------------------------------------------- temporal terms (video tracking)
# The context's extra["history"] holds the previous frames' values, most recent first:
# name -> H x N x K for the track's rows N (H = 0, 1 or 2 frames so far), names as in temporal_values.
def head_rotation(params) -> Tensor:
    """The head's rotation relative to the camera, global + neck (to first order the two composed) -> B x 3.
    Its own term keeps a turn from being spread over global and neck just to halve its squared change,
    and a moving (handheld) camera can leave it out while the face's own motion stays smoothed."""
    return params.global_pose + params.neck_pose


def pose_vector(params) -> Tensor:
    """The articulation a frame fits, one vector B x 12 (axis-angle): the neck's, the jaw's (B x 3 each)
    and the eyes' (B x 6)."""
    return torch.cat([params.neck_pose, params.jaw_pose, params.eye_pose], dim=1)


def camera_translation(cam: Tensor) -> Tensor:
    """Where the model origin sits, independent of the crop: pinhole B x 6 -> (tx, ty, f / s) B x 3 in metres
    (x, y and distance); weak perspective B x 3 -> (tx, ty, 1 / s)."""
    depth = cam[:, 3] / cam[:, 0] if cam.shape[1] == 6 else 1.0 / cam[:, 0]
    return torch.stack([cam[:, 1], cam[:, 2], depth], dim=1)


def temporal_values(params) -> dict[str, Tensor]:
    """What the temporal terms compare across frames: head B x 3, pose B x 12, exp B x n_exp, trans B x 3."""
    return {"head": head_rotation(params), "pose": pose_vector(params), "exp": params.exp,
            "trans": camera_translation(params.cam)}


def temporal_residual(x: Tensor, history: Tensor | None, order: int) -> Tensor:
    """Finite difference of x B x K against earlier frames history H x B x K (most recent first):
    order 1 (velocity) x - h0, order 2 (acceleration) x - 2 h0 + h1 -> B x K; zeros while fewer
    than `order` earlier frames exist (start of the track)."""
    if history is None or history.shape[0] < order:
        return torch.zeros_like(x)
    if order == 1:
        return x - history[0]
    if order == 2:
        return x - 2.0 * history[0] + history[1]
    raise ValueError(f"temporal_residual: order {order} (use 1 or 2)")


def _temporal(name: str, order: int) -> Term:
    def residual(c: Context) -> Tensor:
        x = temporal_values(c.params)[name]
        hist = c.extra.get("history", {}).get(name)
        if hist is not None:
            rows = c.extra.get("rows")
            hist = hist[:, rows] if rows is not None else hist
        return temporal_residual(x, hist, order)

    return _from_residual(residual)


TERMS.update({
    "head_velocity": _temporal("head", 1),
    "head_accel": _temporal("head", 2),
    "pose_velocity": _temporal("pose", 1),
    "pose_accel": _temporal("pose", 2),
    "exp_velocity": _temporal("exp", 1),
    "exp_accel": _temporal("exp", 2),
    "trans_velocity": _temporal("trans", 1),
    "trans_accel": _temporal("trans", 2),
})
