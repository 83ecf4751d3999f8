"""Expression transfer between fits: swap, layer mixing, regional and optimised mixing, animation frames.

The parameters of a fit are seen as named *layers* (StyleGAN-like mixing):

| layer | field | what it holds |
|---|---|---|
| `shape` | shape B x n_shape | identity |
| `exp.coarse` / `exp.mid` / `exp.fine` | exp B x n_exp, split at `edges` | expression bands |
| `jaw`, `eyes`, `neck`, `global` | jaw_pose / eye_pose / neck_pose / global_pose | rotations |
| `albedo`, `light` | albedo, light | appearance |

The camera (`cam`) is not a layer: it always stays the target's, since it frames the
target's photo. The expression bases are ordered by decreasing variance, so the default band
edges (10, 30) put the dominant modes (jaw opening, smile, blink: most of the variance) in
`exp.coarse`, secondary modes in `exp.mid` and the long tail in `exp.fine`, for FLAME's 100
components and for the stand-in's 53 alike.

Everything here is pure parameter editing plus FLAME evaluation; nothing renders or writes.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from priors.errors import UsageError
from priors.flame import FlameModel, blend_shapes, lbs

from .params import FitParams

LAYERS: tuple[str, ...] = ("shape", "exp.coarse", "exp.mid", "exp.fine", "jaw", "eyes", "neck", "global",
                           "albedo", "light")
EXP_BANDS: tuple[str, ...] = ("exp.coarse", "exp.mid", "exp.fine")
ALIASES: dict[str, tuple[str, ...]] = {"exp": EXP_BANDS}  # accepted in mix specs as shorthand
DEFAULT_EDGES: tuple[int, int] = (10, 30)
# the FitParams field behind each non-expression layer
LAYER_FIELDS: dict[str, str] = {"shape": "shape", "jaw": "jaw_pose", "eyes": "eye_pose", "neck": "neck_pose",
                                "global": "global_pose", "albedo": "albedo", "light": "light"}
# layers that change identity or expression geometry (what optimize_mix can weigh)
GEOMETRIC_LAYERS: tuple[str, ...] = ("shape", "exp.coarse", "exp.mid", "exp.fine", "jaw", "eyes", "neck")
DEFAULT_OPT_LAYERS: tuple[str, ...] = GEOMETRIC_LAYERS

Alpha = float | Tensor


# ----------------------------------------------------------------------------- layers
def _check_edges(edges: Sequence[int]) -> tuple[int, int]:
    try:
        e0, e1 = (int(e) for e in edges)
    except (TypeError, ValueError):
        raise UsageError(f"expression band edges {edges!r} are not two integers; fix: pass two increasing "
                         "indices such as (10, 30)") from None
    if not 0 < e0 < e1:
        raise UsageError(f"expression band edges ({e0}, {e1}) must satisfy 0 < coarse/mid < mid/fine; fix: pass "
                         "two increasing indices such as (10, 30)")
    return e0, e1


def layer_slices(n_exp: int, edges: Sequence[int] = DEFAULT_EDGES) -> dict[str, slice]:
    """The expression bands as slices of the n_exp coefficients: {'exp.coarse': 0:e0, 'exp.mid': e0:e1,
    'exp.fine': e1:n_exp}, edges clamped to n_exp (so a small basis may leave a band empty).

    The three slices cover every coefficient exactly once.
    """
    e0, e1 = _check_edges(edges)
    a, b = min(e0, n_exp), min(e1, n_exp)
    return {"exp.coarse": slice(0, a), "exp.mid": slice(a, b), "exp.fine": slice(b, n_exp)}


def _layer_names() -> str:
    return ", ".join(LAYERS)


# ----------------------------------------------------------------------------- compatibility
def _sizes_error(what: str, t_size, s_size) -> UsageError:
    return UsageError(f"target and source fits differ in {what} (target {t_size}, source {s_size}); fix: use fits "
                      "made with the same model and settings")


def _check_pair(target: FitParams, source: FitParams, fields: Iterable[str]) -> None:
    """Raise UsageError unless `fields` have equal trailing sizes and the batches fit (equal, or source 1)."""
    if source.batch not in (1, target.batch):
        raise _sizes_error("batch size", target.batch, source.batch)
    for name in fields:
        t, s = getattr(target, name), getattr(source, name)
        if t.shape[1:] != s.shape[1:]:
            raise _sizes_error(f"{name} size", tuple(t.shape[1:]), tuple(s.shape[1:]))


def check_compatible(target: FitParams, source: FitParams, target_model_tag: str, source_model_tag: str) -> None:
    """Raise UsageError if the two fits cannot be combined.

    Checks the model tags (name + checksum, as FlameModel.tag), the batch (equal, or a source of 1
    broadcast to the target's), and the sizes of shape, exp and the poses. Albedo is checked only
    where it is mixed (`mix` with an albedo alpha): a texture-space and a per-vertex albedo can be
    swapped around freely.
    """
    if target_model_tag != source_model_tag:
        raise UsageError(f"target fit was made with model '{target_model_tag}' but source fit with "
                         f"'{source_model_tag}'; fix: fit both with the same --model")
    _check_pair(target, source, ("shape", "exp", "global_pose", "neck_pose", "jaw_pose", "eye_pose"))


def _check_model(model: FlameModel, params: FitParams, label: str) -> None:
    if params.shape.shape[1] != model.n_shape or params.exp.shape[1] != model.n_exp:
        raise UsageError(f"{label} fit has {params.shape.shape[1]} shape / {params.exp.shape[1]} expression "
                         f"coefficients but the model has {model.n_shape} / {model.n_exp}; fix: use the model "
                         "the fit was made with")


def _src(source_field: Tensor, batch: int) -> Tensor:
    """A source field broadcast to the target's batch (source batch 1 or equal)."""
    return source_field.expand(batch, *source_field.shape[1:])


# ----------------------------------------------------------------------------- swap and mix
def swap(target: FitParams, source: FitParams, eyes: bool = False) -> FitParams:
    """DECA's expression transfer: T with S's exp and jaw_pose (and eye_pose with `eyes`).

    Identity, neck, global pose, camera, albedo and light stay T's. Every field is an exact
    copy (new tensors) of T's or S's. A source batch of 1 is broadcast to the target's batch.
    """
    fields = ("exp", "jaw_pose", "eye_pose") if eyes else ("exp", "jaw_pose")
    _check_pair(target, source, fields)
    out = {n: v.clone() for n, v in target.items()}
    for name in fields:
        out[name] = _src(getattr(source, name), target.batch).clone()
    return FitParams(**out)


def _lerp(t: Tensor, s: Tensor, a: Alpha) -> Tensor:
    """(1 - a) t + a s; for a Python float, a = 0 gives an exact copy of t and a = 1 of s."""
    if not isinstance(a, Tensor):
        if a == 0:
            return t.clone()
        if a == 1:
            return s.expand_as(t).clone()
    return (1 - a) * t + a * s


def _mix(target: FitParams, source: FitParams, alphas: dict[str, Alpha], edges: Sequence[int]) -> FitParams:
    """mix without validating the names; alphas may be tensors (0-dim, differentiable)."""
    out = {n: v.clone() for n, v in target.items()}
    for layer, field in LAYER_FIELDS.items():
        a = alphas.get(layer, 0.0)
        if isinstance(a, Tensor) or a != 0:
            out[field] = _lerp(getattr(target, field), _src(getattr(source, field), target.batch), a)
    bands = layer_slices(target.exp.shape[1], edges)
    if any(isinstance(alphas.get(b, 0.0), Tensor) or alphas.get(b, 0.0) != 0 for b in EXP_BANDS):
        s_exp = _src(source.exp, target.batch)
        out["exp"] = torch.cat([_lerp(target.exp[:, sl], s_exp[:, sl], alphas.get(b, 0.0))
                                for b, sl in bands.items()], dim=1)
    return FitParams(**out)


def mix(target: FitParams, source: FitParams, alphas: dict[str, float],
        edges: Sequence[int] = DEFAULT_EDGES) -> FitParams:
    """Layer mixing: on each named layer result = (1 - alpha) T + alpha S; other layers (and cam) keep T's.

    alphas: {layer: alpha in [0, 1]} with layer names from LAYERS (e.g. from parse_mix_spec).
    edges: where the expression coefficients split into exp.coarse / exp.mid / exp.fine.
    Alpha 0 gives T's values and alpha 1 S's, exactly (copies). Rotations (jaw, eyes, neck,
    global) are blended linearly in axis-angle: for the angles of faces (well under 90 degrees, and
    T and S rotating about similar axes) this is within a small fraction of a degree of slerp and
    keeps the blend a simple, differentiable function of alpha.
    """
    for layer, a in alphas.items():
        if layer not in LAYERS:
            raise UsageError(f"unknown layer '{layer}' in the mix; fix: use one of {_layer_names()}")
        if not 0.0 <= float(a) <= 1.0:
            raise UsageError(f"mix alpha {a} for layer '{layer}' is outside [0, 1]; fix: use a value from 0 "
                             "(target) to 1 (source)")
    fields = ["shape", "exp", "global_pose", "neck_pose", "jaw_pose", "eye_pose"]
    if alphas.get("light", 0):
        fields.append("light")
    if alphas.get("albedo", 0):
        fields.append("albedo")
    _check_pair(target, source, fields)
    return _mix(target, source, {k: float(v) for k, v in alphas.items()}, edges)


def parse_mix_spec(spec: str) -> dict[str, float]:
    """Parse "layer=alpha,..." (e.g. "exp.coarse=1,exp.mid=0.5,jaw=1") into {layer: alpha}.

    Layer names are those of LAYERS; "exp" is shorthand for all three expression bands. Alphas
    are numbers in [0, 1]. Raises UsageError (one line naming the piece at fault and the valid
    layers) for a malformed pair, an unknown layer (with a did-you-mean), an alpha out of range or
    not a number, a layer named twice, or an empty spec.
    """
    valid = list(LAYERS) + list(ALIASES)
    fix = f"fix: write layer=alpha pairs separated by commas, alpha in [0, 1], layers: {', '.join(valid)}"
    out: dict[str, float] = {}
    pieces = [p.strip() for p in spec.split(",")]
    if not any(pieces):
        raise UsageError(f"mix spec '{spec}' is empty; {fix}")
    for piece in pieces:
        name, eq, value = (x.strip() for x in piece.partition("="))
        if not eq or not name or not value:
            raise UsageError(f"mix spec piece '{piece}' is not layer=alpha; {fix}")
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(f"mix spec piece '{piece}': unknown layer '{name}'{hint}; {fix}")
        try:
            alpha = float(value)
        except ValueError:
            raise UsageError(f"mix spec piece '{piece}': alpha '{value}' is not a number; {fix}") from None
        if not 0.0 <= alpha <= 1.0:  # also rejects nan
            raise UsageError(f"mix spec piece '{piece}': alpha {value} is outside [0, 1]; {fix}")
        for layer in ALIASES.get(name, (name,)):
            if layer in out:
                raise UsageError(f"mix spec piece '{piece}': layer '{layer}' is given twice; {fix}")
            out[layer] = alpha
    return out


# ----------------------------------------------------------------------------- geometry helpers
def _forward(model: FlameModel, p: FitParams):
    return model(p.shape, p.exp, p.global_pose, p.neck_pose, p.jaw_pose, p.eye_pose)


def _neutral_landmarks(model: FlameModel) -> Tensor:
    """The 68 landmarks (fixed contour) of the neutral template: 68 x 3."""
    if not model.has_landmarks:
        raise UsageError(f"model '{model.name}' has no landmark embedding, needed for landmark-derived regions; "
                         "fix: install DECA's landmark_embedding.npy next to the model or pass FLAME masks")
    z = lambda n: model.v_template.new_zeros(1, n)  # noqa: E731
    with torch.no_grad():
        out = model(z(model.n_shape), z(model.n_exp), z(3), z(3), z(3), z(6))
    return out.landmarks3d_full[0]


def _interocular(lmk: Tensor) -> Tensor:
    """Distance between the outer eye corners (iBUG 36 and 45): lmk ... x 68 x 3 -> ...."""
    return (lmk[..., 36, :] - lmk[..., 45, :]).norm(dim=-1)


# ----------------------------------------------------------------------------- regions
def _loop(a: int, b: int) -> list[int]:
    return [*range(a, b + 1), a]


# iBUG-68 polylines that outline each region (closed loops repeat their first point)
REGION_LANDMARKS: dict[str, list[list[int]]] = {
    "mouth": [_loop(48, 59), _loop(60, 67)],
    "eyes": [_loop(36, 41), _loop(42, 47)],
    "brows": [list(range(17, 22)), list(range(22, 27))],
    "nose": [list(range(27, 31)), list(range(31, 36)), [31, 30, 35], [30, 33]],
    "jaw": [list(range(2, 15))],
}
# our region names -> FLAME_masks.pkl region names (FLAME has no brow or jaw mask: the forehead
# mask stands for the brows; the jaw is always landmark-derived)
FLAME_MASK_REGIONS: dict[str, tuple[str, ...]] = {
    "mouth": ("lips",),
    "eyes": ("left_eye_region", "right_eye_region"),
    "brows": ("forehead",),
    "nose": ("nose",),
}
REGIONS: tuple[str, ...] = tuple(REGION_LANDMARKS)


def _segment_distance(points: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Distance from each point to the nearest of the segments a-b: points N x 3, a/b S x 3 -> N."""
    ab = b - a  # S x 3
    ap = points[:, None] - a[None]  # N x S x 3
    t = ((ap * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-20)).clamp(0, 1)
    return (ap - t[..., None] * ab).norm(dim=-1).min(dim=1).values


def _point_set_distance(points: Tensor, core: Tensor, chunk: int = 4096) -> Tensor:
    """Distance from each point to the nearest core point: points N x 3, core M x 3 -> N."""
    return torch.cat([torch.cdist(points[i:i + chunk], core).min(dim=1).values
                      for i in range(0, points.shape[0], chunk)])


def _smooth_falloff(d: Tensor, inner: float, width: float) -> Tensor:
    """1 for d <= inner, 0 for d >= inner + width, smoothstep in between."""
    x = ((d - inner) / width).clamp(0, 1)
    return 1 - x * x * (3 - 2 * x)


def _mask_indices(masks: dict, region: str, n_verts: int) -> np.ndarray:
    names = FLAME_MASK_REGIONS[region]
    missing = [n for n in names if n not in masks]
    if missing:
        raise UsageError(f"masks lack region {', '.join(missing)} (needed for '{region}'); fix: pass FLAME's "
                         "FLAME_masks.pkl or leave masks out to use landmark-derived regions")
    idx = np.unique(np.concatenate([np.asarray(masks[n], dtype=np.int64).reshape(-1) for n in names]))
    if idx.size == 0 or idx.min() < 0 or idx.max() >= n_verts:
        raise UsageError(f"mask '{names[0]}' does not index this model's {n_verts} vertices; fix: use masks made "
                         "for this model's topology (FLAME masks fit FLAME only) or leave masks out")
    return idx


def _region_list(regions: str | Sequence[str]) -> list[str]:
    """Region names from a list or a comma-separated string ("mouth,eyes")."""
    if isinstance(regions, str):
        return [r.strip() for r in regions.split(",") if r.strip()]
    return list(regions)


def region_weights(model: FlameModel, regions: str | Sequence[str], masks: dict[str, np.ndarray] | None = None,
                   falloff: float = 0.25, core: float = 0.08) -> Tensor:
    """Per-vertex weights in [0, 1] of the union of facial regions, on the neutral template: (V,).

    regions: names from REGIONS ('mouth', 'eyes', 'brows', 'nose', 'jaw'), a list or "mouth,eyes".
    masks: FLAME_masks.pkl content ({region name: vertex indices}); when given, 'mouth' uses
      'lips', 'eyes' the two eye regions, 'brows' 'forehead', 'nose' 'nose' (the mask vertices
      get weight 1); 'jaw', which FLAME does not mask, stays landmark-derived.
    Without masks (any mesh with a landmark embedding) a region's core is its iBUG landmark
    polylines (mouth: outer and inner lip loops; eyes: eye loops; brows; nose bridge and base;
    jaw: contour points 2-14) on the neutral template: weight 1 within `core` x inter-ocular
    distance of them. Either way the weight then falls smoothly (smoothstep) to 0 at a further
    `falloff` x inter-ocular distance (outer eye corners; about 9 cm on an adult, so 0.25 is
    about 2 cm). Several regions combine by the maximum.
    """
    regions = _region_list(regions)
    if not regions:
        raise UsageError(f"no region given; fix: name one or more of {', '.join(REGIONS)}")
    for r in regions:
        if r not in REGION_LANDMARKS:
            close = difflib.get_close_matches(r, REGIONS, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(f"unknown region '{r}'{hint}; fix: use one or more of {', '.join(REGIONS)}")
    if not falloff > 0 or not core >= 0:
        raise UsageError(f"region falloff {falloff} / core {core} must be > 0 / >= 0; fix: pass e.g. 0.25 / 0.08")
    verts = model.v_template
    needs_lmk = masks is None or any(r not in FLAME_MASK_REGIONS for r in regions)
    lmk = _neutral_landmarks(model) if (needs_lmk or model.has_landmarks) else None
    if lmk is not None:
        scale = float(_interocular(lmk))
    else:  # masks only, no landmarks: inter-ocular distance taken as 0.45 x the template's width
        scale = 0.45 * float(verts[:, 0].max() - verts[:, 0].min())
    weight = verts.new_zeros(verts.shape[0])
    for r in regions:
        if masks is not None and r in FLAME_MASK_REGIONS:
            idx = torch.as_tensor(_mask_indices(masks, r, verts.shape[0]), device=verts.device)
            d, inner = _point_set_distance(verts, verts[idx]), 0.0
            d[idx] = 0.0  # exactly (cdist's matrix-product form leaves ~1e-7 m on the core itself)
        else:
            segs = [(line[i], line[i + 1]) for line in REGION_LANDMARKS[r] for i in range(len(line) - 1)]
            ia, ib = (torch.tensor(x, device=verts.device) for x in zip(*segs, strict=True))
            d, inner = _segment_distance(verts, lmk[ia], lmk[ib]), core * scale
        weight = torch.maximum(weight, _smooth_falloff(d, inner, falloff * scale))
    return weight


def regional_transfer(model: FlameModel, target: FitParams, source: FitParams, regions: str | Sequence[str],
                      masks: dict[str, np.ndarray] | None = None, **weight_kw) -> tuple[FitParams, Tensor]:
    """Transfer S's expression to T only inside facial regions -> (params, vertices B x V x 3).

    With J the jaw pose (S's when 'mouth' or 'jaw' is among the regions, else T's):
      base = FLAME(T's shape, T's exp, T's global/neck/eye pose, jaw J)
      full = FLAME(T's shape, S's exp, the same pose)   (= the full swap, with eyes kept T's)
      vertices = base + w * (full - base),  w = region_weights(model, regions, masks) per vertex.
    So vertices of weight 1 move exactly as in the full swap; vertices of weight 0 keep T's
    expression. The jaw is a rigid rotation that FLAME's skinning already localises to the
    lower face, so it is transferred whole (not weighted per vertex): weighting it would open the
    lips while leaving the chin behind. Consequently vertices of weight 0 equal T's geometry
    exactly where the jaw's skinning weight is 0 too (or with neither 'mouth' nor 'jaw' chosen).
    The returned params are T with jaw J and exp = T.exp + the least-squares projection of the
    weighted expression offsets w * E (S.exp - T.exp) onto the expression basis E (rest pose), so
    re-synthesising them approximates the vertices (a fit.npz stays meaningful); the returned
    vertices are the exact blend. weight_kw go to region_weights (falloff, core).
    """
    _check_model(model, target, "target")
    _check_model(model, source, "source")
    _check_pair(target, source, ("shape", "exp", "jaw_pose"))
    regions = _region_list(regions)
    w = region_weights(model, regions, masks, **weight_kw)  # V
    jaw_alpha = 1.0 if ("mouth" in regions or "jaw" in regions) else 0.0
    base_p = _mix(target, source, {"jaw": jaw_alpha}, DEFAULT_EDGES)
    full_p = base_p.detach()
    full_p.exp = _src(source.exp, target.batch).clone()
    with torch.no_grad():
        base = _forward(model, base_p).vertices
        full = _forward(model, full_p).vertices
        vertices = base + w[None, :, None] * (full - base)
        E = model.dirs[:, :, model.n_shape:].reshape(-1, model.n_exp).double()  # 3V x K
        delta = blend_shapes(_src(source.exp, target.batch) - target.exp, model.dirs[:, :, model.n_shape:])
        rhs = (w[None, :, None] * delta).reshape(target.batch, -1).double()  # B x 3V
        coef = torch.linalg.lstsq(E, rhs.T).solution.T  # B x K
    out = base_p.detach()
    out.exp = (target.exp + coef.to(target.exp.dtype)).detach()
    return out, vertices


# ----------------------------------------------------------------------------- optimised mixing
class _SubsetFlame:
    """FLAME evaluated exactly on a subset of vertices (for optimize_mix's many evaluations).

    The subset is an evenly strided sample of at most `n_sample` vertices plus every vertex the
    joint regressor and the 68 full landmarks read, so joints, landmarks and the sampled vertices
    are exactly FLAME's. Buffers: v_template N x 3, dirs N x 3 x K, posedirs P x 3N, J_regressor J x N,
    weights N x J; lmk_idx 68 x 3 (positions in the subset) and lmk_bary 68 x 3, or None.
    """

    def __init__(self, model: FlameModel, n_sample: int = 3000):
        V = model.n_verts
        keep = torch.zeros(V, dtype=torch.bool, device=model.v_template.device)
        keep[::max(1, V // n_sample)] = True
        keep |= (model.J_regressor != 0).any(dim=0)
        if model.has_landmarks:
            keep[model.faces[model.full_faces].reshape(-1)] = True
        idx = keep.nonzero()[:, 0]
        self.n_shape, self.n_exp = model.n_shape, model.n_exp
        self.v_template, self.dirs, self.weights = model.v_template[idx], model.dirs[idx], model.weights[idx]
        P = model.posedirs.shape[0]
        self.posedirs = model.posedirs.view(P, V, 3)[:, idx].reshape(P, -1)
        self.J_regressor, self.parents = model.J_regressor[:, idx], model.parents
        self.lmk_idx = self.lmk_bary = None
        if model.has_landmarks:
            pos = torch.full((V,), -1, dtype=torch.long, device=idx.device)
            pos[idx] = torch.arange(idx.shape[0], device=idx.device)
            self.lmk_idx, self.lmk_bary = pos[model.faces[model.full_faces]], model.full_bary

    def identity(self, shape: Tensor) -> Tensor:
        """Neutral-expression, neutral-pose vertices: shape B x n_shape -> B x N x 3."""
        return self.v_template[None] + blend_shapes(shape, self.dirs[:, :, :self.n_shape])

    def posed(self, shape: Tensor, exp: Tensor, pose: Tensor) -> tuple[Tensor, Tensor | None]:
        """shape B x n_shape, exp B x n_exp, pose B x 15 -> vertices B x N x 3, landmarks B x 68 x 3 or None."""
        verts, _ = lbs(torch.cat([shape, exp], dim=1), pose, self.v_template, self.dirs, self.posedirs,
                       self.J_regressor, self.parents, self.weights)
        if self.lmk_idx is None:
            return verts, None
        return verts, (verts[:, self.lmk_idx] * self.lmk_bary[..., None]).sum(dim=2)

    def expression(self, p: FitParams, shape: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """What an expression does to a head, global pose zeroed.

        p: the expression (exp, neck, jaw and eye poses); shape B x n_shape: the identity it is
        applied to (default p's own). -> vertex offsets B x N x 3 (posed with the expression minus
        the neutral head) and, with landmarks, landmark offsets B x 68 x 3 divided by the neutral
        head's inter-ocular distance (so they compare across identities), else None.
        """
        B = p.batch
        shape = p.shape if shape is None else shape.expand(B, -1)
        z = lambda n: p.shape.new_zeros(B, n)  # noqa: E731
        pose = torch.cat([torch.cat([z(3), p.neck_pose, p.jaw_pose, p.eye_pose], dim=1), z(15)])
        verts, lmk = self.posed(torch.cat([shape, shape]), torch.cat([p.exp, z(self.n_exp)]), pose)
        offsets = verts[:B] - verts[B:]
        if lmk is None:
            return offsets, None
        return offsets, (lmk[:B] - lmk[B:]) / _interocular(lmk[B:])[:, None, None]


def _msd(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared point distance: B x N x 3, B x N x 3 -> scalar (mean over batch and points)."""
    return ((a - b) ** 2).sum(-1).mean()


def optimize_mix(model: FlameModel, target: FitParams, source: FitParams, goal: FitParams | None = None,
                 layers: Sequence[str] = DEFAULT_OPT_LAYERS, w_id: float = 1.0, w_exp: float = 1.0,
                 steps: int = 200, edges: Sequence[int] = DEFAULT_EDGES, lr: float = 0.2,
                 decimals: int = 2, own_identity: bool = False) -> tuple[dict[str, float], FitParams]:
    """Choose one alpha in [0, 1] per layer so that mix(T, S, alphas) keeps T's identity and takes S's expression.

    Minimises w_id * D_identity(result, T) + w_exp * D_expression(result, S) (with `goal`: both to
    the goal instead) over alpha = sigmoid(logit) per layer, by Adam (betas 0.9/0.9, learning rate
    `lr` cosine-decayed to 2%), shared by the whole batch.
      D_identity: mean squared distance of the neutral-expression, neutral-pose vertices.
      D_expression: mean squared distance of the expression-induced vertex offsets (exp, neck,
        jaw and eyes applied, global pose zeroed, minus the neutral head), plus that of the 68
        landmark offsets divided by the neutral inter-ocular distance (the landmarks weigh the
        mouth, eyes and brows, which the vertex mean spreads over the whole head).
    Both expressions are applied to one common identity, T's (the goal's with a goal): offsets
    measured on each one's own identity (own_identity=True) make rigid neck/jaw/eye rotations
    move a bigger head further, which the other layers then try to compensate (on random fits
    the optimum drifted to e.g. exp.fine 0.75, jaw 0.86 with nothing but identity to blame).
    Each distance is divided by its value between T and S, so both terms are about 1 at the worst
    and w_id / w_exp are pure relative weights (unit-free). The distances are evaluated exactly
    on a strided subset of about 3,000 vertices (plus those the joints and landmarks use). Layers
    whose T and S values are equal (or an empty band) do not change the result and are reported as 0.
    layers: from GEOMETRIC_LAYERS (global, albedo and light do not affect either distance).
    Returns ({layer: alpha rounded to `decimals`}, mix(T, S, those alphas)).
    """
    layers = list(layers)
    for layer in layers:
        if layer not in GEOMETRIC_LAYERS:
            raise UsageError(f"layer '{layer}' cannot be optimised (it affects neither identity nor expression); "
                             f"fix: choose from {', '.join(GEOMETRIC_LAYERS)} and set others with --mix")
    if len(set(layers)) != len(layers) or not layers:
        raise UsageError(f"optimised layers {layers} are empty or repeat a name; fix: list each layer once")
    if steps < 1:
        raise UsageError(f"steps {steps} must be at least 1; fix: pass e.g. 200")
    if not (w_id >= 0 and w_exp >= 0 and math.isfinite(w_id + w_exp)):
        raise UsageError(f"weights w_id={w_id}, w_exp={w_exp} must be finite and >= 0; fix: pass e.g. 1.0")
    for label, p in (("target", target), ("source", source)) + ((("goal", goal),) if goal is not None else ()):
        _check_model(model, p, label)
    fields = ("shape", "exp", "global_pose", "neck_pose", "jaw_pose", "eye_pose")
    _check_pair(target, source, fields)
    if goal is not None:
        _check_pair(target, goal, fields)
    target, source = target.detach(), source.detach()
    bands = layer_slices(model.n_exp, edges)

    def differs(layer: str) -> bool:
        if layer in bands:
            sl = bands[layer]
            return sl.stop > sl.start and not torch.equal(target.exp[:, sl], _src(source.exp, target.batch)[:, sl])
        f = LAYER_FIELDS[layer]
        return not torch.equal(getattr(target, f), _src(getattr(source, f), target.batch))

    free = [x for x in layers if differs(x)]
    alphas = {x: 0.0 for x in layers}
    if free:
        ref_id = target if goal is None else goal.detach()
        ref_exp = source if goal is None else goal.detach()
        ident = None if own_identity else ref_id.shape  # the identity expressions are compared on
        flame = _SubsetFlame(model)
        with torch.no_grad():
            id_ref = flame.identity(ref_id.shape)
            off_ref, lmk_ref = flame.expression(ref_exp, ident)
            id_scale = _msd(flame.identity(target.shape), flame.identity(_src(source.shape, target.batch)))
            off_t, lmk_t = flame.expression(target, ident)
            off_s, lmk_s = flame.expression(source, ident)
            off_scale = _msd(off_t, off_s.expand_as(off_t))
            lmk_scale = _msd(lmk_t, lmk_s.expand_as(lmk_t)) if lmk_t is not None else None
        tiny = 1e-20
        logits = torch.zeros(len(free), device=target.shape.device, requires_grad=True)
        opt = torch.optim.Adam([logits], lr=lr, betas=(0.9, 0.9))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(i / steps, 1.0))))
        for _ in range(steps):
            a = torch.sigmoid(logits)
            res = _mix(target, source, dict(zip(free, a, strict=True)), edges)
            loss = w_id * _msd(flame.identity(res.shape), id_ref) / id_scale.clamp_min(tiny)
            off, lmk = flame.expression(res, ident)
            d_exp = _msd(off, off_ref) / off_scale.clamp_min(tiny)
            if lmk is not None:
                d_exp = d_exp + _msd(lmk, lmk_ref) / lmk_scale.clamp_min(tiny)
            loss = loss + w_exp * d_exp
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        final = torch.sigmoid(logits.detach())
        alphas.update({x: round(float(v), decimals) for x, v in zip(free, final, strict=True)})
    return alphas, mix(target, source, alphas, edges)


# ----------------------------------------------------------------------------- animation
def expression_sequence(target: FitParams, expressions: Sequence[FitParams], eyes: bool = False) -> list[FitParams]:
    """One frame per expression: T with that fit's exp and jaw (and eyes with `eyes`) swapped in."""
    return [swap(target, e, eyes=eyes) for e in expressions]


def _check_frames(n: int, max_deg: float) -> None:
    if n < 1:
        raise UsageError(f"a sweep needs at least 1 frame (got {n}); fix: pass n >= 1")
    if not math.isfinite(max_deg):
        raise UsageError(f"sweep angle {max_deg} is not finite; fix: pass degrees such as 30")


def yaw_sweep(target: FitParams, n: int = 13, max_deg: float = 30.0) -> list[FitParams]:
    """n frames turning the head from -max_deg to +max_deg degrees about +y (positive turns the face to
    +x, the subject's left): global_pose = (0, yaw, 0) radians, a turntable from the frontal pose (T's own
    global rotation is replaced, so every frame is level). Everything else stays T's.
    """
    _check_frames(n, max_deg)
    frames = []
    for deg in np.linspace(-max_deg, max_deg, n):
        p = target.detach()
        p.global_pose = torch.zeros_like(p.global_pose)
        p.global_pose[:, 1] = math.radians(float(deg))
        frames.append(p)
    return frames


def jaw_sweep(target: FitParams, n: int = 10, max_deg: float = 30.0) -> list[FitParams]:
    """n frames opening the jaw from 0 to max_deg degrees: jaw_pose = (pitch, 0, 0) radians (a positive
    rotation about +x opens the mouth: the chin moves down). T's own jaw pose is replaced.
    """
    _check_frames(n, max_deg)
    frames = []
    for deg in np.linspace(0.0, max_deg, n):
        p = target.detach()
        p.jaw_pose = torch.zeros_like(p.jaw_pose)
        p.jaw_pose[:, 0] = math.radians(float(deg))
        frames.append(p)
    return frames
