"""Pure-PyTorch differentiable triangle rasterizer (CPU and CUDA, no compiled extension).

Two passes, as in most analysis-by-synthesis renderers:

1. **Index pass** (no gradient): for every triangle, enumerate the pixel centres inside its
   integer bounding box, test them with exactly evaluated edge functions and a consistent
   fill rule, and keep the nearest triangle per pixel with one ``scatter_reduce("amin")`` on a
   packed int64 key (depth bits high, triangle index low). Result: ``pix_to_face``.
2. **Differentiable pass**: for the covered pixels only, gather the hit triangle's three
   screen-space vertices and compute barycentrics and depth in closed form, so gradients flow
   from anything built on ``bary``/``zbuf`` back to the vertex positions.

Vertices are given in screen space, already projected, so barycentrics are affine (screen
space) ones: no perspective correction is applied. With a perspective camera this differs
slightly from the 3D barycentrics of the surface point; for face fitting at typical focal
lengths the difference is far below a pixel. Silhouette gradients come from
:func:`soft_silhouette`, an analytic edge antialiasing of the mask (see there).

Coordinates: ``verts[..., 0]`` = x in pixels to the right, ``verts[..., 1]`` = y in pixels
down, origin at the top-left *corner* of the top-left pixel, so pixel ``(i, j)`` (row i,
column j) has its centre at ``(j + 0.5, i + 0.5)``; ``verts[..., 2]`` = depth, smaller is
nearer. Triangles of both windings are drawn (no back-face culling); degenerate (zero-area)
triangles are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from priors.mesh import per_faces

# Candidate (triangle, pixel) pairs tested at once in the index pass; bounds peak memory
# (about 250 bytes per candidate) when triangles are large.
_MAX_CANDIDATES = 1 << 20
_KEY_EMPTY = torch.iinfo(torch.int64).max
_AREA_EPS = 1e-10  # triangles with |twice the screen area| below this (pixels^2) are skipped


@dataclass
class Fragments:
    """What the rasterizer saw at each pixel centre.

    pix_to_face: B x H x W int64, index into ``faces`` of the nearest triangle, -1 where empty.
    bary: B x H x W x 3 barycentric coordinates of the pixel centre in that triangle
        (differentiable w.r.t. the vertices), 0 where empty.
    zbuf: B x H x W interpolated depth (differentiable), ``+inf`` where empty.
    pix_idx: N int64, flat indices into ``B * H * W`` of the covered pixels (packed form,
        used by :func:`interpolate` to work on covered pixels only).
    bary_hit: 3 x N barycentrics of those pixels (the same values as in ``bary``,
        channels first).
    """

    pix_to_face: Tensor
    bary: Tensor
    zbuf: Tensor
    pix_idx: Tensor | None = None
    bary_hit: Tensor | None = None


# --------------------------------------------------------------------------------------
# index pass (no gradient)
# --------------------------------------------------------------------------------------


def _corners(verts: Tensor, faces: Tensor) -> Tensor:
    """Triangle corners. verts B x V x 3, faces F x 3 -> T x 3 x 3 (triangle t = b * F + f,
    coordinate x/y/z, corner 0/1/2)."""
    bsz, nv, _ = verts.shape
    offset = (torch.arange(bsz, device=verts.device) * nv)[:, None, None]
    ids = (faces[None] + offset).reshape(-1)
    return verts.reshape(-1, 3).index_select(0, ids).view(-1, 3, 3).transpose(1, 2).contiguous()


def _bboxes(pts: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inclusive pixel ranges whose centres may lie in each triangle.

    pts: T x 3 x 3 (see :func:`_corners`). Returns x0, y0 (first column/row) and w, h (number
    of columns/rows, >= 0), all T float (integer valued).
    """
    x, y = pts[:, 0], pts[:, 1]
    xmin = torch.minimum(torch.minimum(x[:, 0], x[:, 1]), x[:, 2])
    xmax = torch.maximum(torch.maximum(x[:, 0], x[:, 1]), x[:, 2])
    ymin = torch.minimum(torch.minimum(y[:, 0], y[:, 1]), y[:, 2])
    ymax = torch.maximum(torch.maximum(y[:, 0], y[:, 1]), y[:, 2])
    x0 = torch.ceil(xmin - 0.5).clamp_(0, width)
    x1 = torch.floor(xmax - 0.5).clamp_(-1, width - 1)
    y0 = torch.ceil(ymin - 0.5).clamp_(0, height)
    y1 = torch.floor(ymax - 0.5).clamp_(-1, height - 1)
    return x0, y0, (x1 - x0 + 1).clamp_(min=0), (y1 - y0 + 1).clamp_(min=0)


def _twice_area(pts: Tensor) -> Tensor:
    """Twice the signed screen area (positive = clockwise on screen). pts: T x 3 x 3 -> T."""
    x, y = pts[:, 0], pts[:, 1]
    return (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (y[:, 1] - y[:, 0]) * (x[:, 2] - x[:, 0])


def _edge_table(pts: Tensor, area2: Tensor) -> Tensor:
    """Per-triangle data for exact, fill-rule consistent inside tests and depth.

    pts: K x 3 x 3 (see :func:`_corners`), area2: K twice the signed area (non-zero).
    Edge k runs from corner k+1 to corner k+2 (opposite corner k); its edge function is
    evaluated from the lexicographically smaller end point ``lo`` as
    ``E(p) = sdx * (py - ly) - sdy * (px - lx)``, ``(sdx, sdy) = +-(hi - lo)`` with the sign
    chosen so that the inside is ``E > 0``. Both triangles that share an edge thus compute
    bit-identical values up to sign, and the fill rule below gives every pixel centre on the
    edge to exactly one of them: no gaps, no double hits.

    Fill rule: a point with ``E == 0`` is inside when ``sdx, sdy`` is the ``hi - lo`` direction
    (the triangle lies on the positive side of its canonical edge). That is the same as
    moving every pixel centre by one infinitesimal offset (-eps^2, eps), so it also holds at
    shared vertices. It is coded as ``E >= b`` with ``b`` = 0 or the smallest positive float
    (if denormals are flushed to zero, ties go to both sides: double hits, still no gaps).

    Returns 18 x K (one contiguous row per quantity, so that per-candidate gathers stay
    contiguous): rows 6k..6k+5 = (lx, ly, sdx, sdy, b, c) of edge k, with depth
    ``z = sum_k E_k * c_k``.
    """
    x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
    ax, ay, bx, by = x.roll(-1, 1), y.roll(-1, 1), x.roll(-2, 1), y.roll(-2, 1)
    swap = (ax > bx) | ((ax == bx) & (ay > by))
    sign = torch.sign(area2)[:, None]
    flip = torch.where(swap, -sign, sign)  # +1: the inside is the positive side of lo -> hi
    tiny = torch.finfo(pts.dtype).tiny * torch.finfo(pts.dtype).eps  # smallest subnormal
    cols = [
        torch.where(swap, bx, ax),
        torch.where(swap, by, ay),
        (bx - ax).abs() * flip,
        (by - ay) * sign,  # = flip * (hi.y - lo.y)
        (flip < 0).to(pts.dtype) * tiny,
        z / area2.abs()[:, None],
    ]
    return torch.stack(cols, dim=0).permute(2, 0, 1).reshape(18, -1)


def _candidates(counts: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Row id and running index inside the row for rows with the given counts.

    counts: K int64. Returns tid (N int64) and local (N, 0..counts[tid]-1, in dtype).
    """
    total = int(counts.sum())
    tid = torch.repeat_interleave(
        torch.arange(counts.numel(), device=counts.device), counts, output_size=total
    )
    start = (torch.cumsum(counts, 0) - counts).to(dtype)
    local = torch.arange(total, device=counts.device, dtype=dtype)
    return tid, local - start.index_select(0, tid)


def _chunks(counts: Tensor, limit: int) -> list[tuple[int, int]]:
    """Consecutive row ranges with at most `limit` candidates each (or a single row)."""
    cum = torch.cumsum(counts, 0)
    if int(cum[-1]) <= limit:
        return [(0, counts.numel())]
    cum = cum.cpu()
    out, start = [], 0
    while start < counts.numel():
        base = int(cum[start - 1]) if start > 0 else 0
        stop = max(int(torch.searchsorted(cum, base + limit, right=True)), start + 1)
        out.append((start, stop))
        start = stop
    return out


def _scan(table: Tensor, base: Tensor, counts: Tensor, row0: int, width: int, image_size: int,
          kbits: int, best: Tensor) -> None:
    """Test all candidate pixels of some triangles; keep the nearest per pixel in `best`.

    table: 21 x K (rows of :func:`_edge_table`, then box width, x0 + 0.5, y0 + 0.5); base: K
    int64 flat index of each box's first pixel; counts: K int64 box sizes; row0: index of
    column 0 in the full table (stored in the keys' low kbits); image_size: H * W; best: P
    int64 keys (depth >= 0 bits high, table column low), updated in place.
    """
    # integer arithmetic in floats: exact in float32 while the chunk and the image stay well
    # below 2**24 entries (floor(local / w) is then never rounded up), else in float64
    total = int(counts.sum())
    small = total < (1 << 22) and image_size < (1 << 24)
    dtype = torch.float32 if small else torch.float64
    tid, local = _candidates(counts, dtype)
    t = table.index_select(1, tid)  # 21 x N, contiguous rows: elementwise ops stay fast
    w = t[18].to(dtype)
    dy = torch.floor(local / w)
    dx = local - dy * w
    pix = base.index_select(0, tid) + (dy * width + dx).long()
    cx = t[19] + dx.to(table.dtype)
    cy = t[20] + dy.to(table.dtype)
    outside = None
    depth = None
    for k in range(3):
        lx, ly, sdx, sdy, bias, c = t[6 * k : 6 * k + 6]
        ev = sdx * (cy - ly) - sdy * (cx - lx)
        out = ev < bias
        outside = out if outside is None else outside.logical_or_(out)
        depth = ev * c if depth is None else depth.add_(ev * c)
    bits = depth.float().view(torch.int32).long()  # monotone for depth >= 0
    key = (bits << kbits) | (tid + row0)
    best.scatter_reduce_(0, pix, key.masked_fill_(outside, _KEY_EMPTY), reduce="amin")


@torch.no_grad()
def _visible_faces(verts: Tensor, faces: Tensor, height: int, width: int, cull_back: bool = False) -> Tensor:
    """Index pass. verts: B x V x 3 (detached), faces: F x 3 int64 -> B x H x W face ids.
    cull_back: skip the triangles drawn clockwise on the screen (see :func:`rasterize`)."""
    bsz = verts.shape[0]
    nf = faces.shape[0]
    # shift depth so that every depth inside a triangle is >= 1: its float bits then sort
    # like the values (ties only where float32 rounding makes two depths equal)
    zs = verts[..., 2]
    finite_z = torch.isfinite(zs)
    zmin = torch.where(finite_z, zs, torch.full_like(zs, float("inf"))).amin()
    shift = torch.where(torch.isfinite(zmin), zmin - 1, torch.zeros_like(zmin))
    pts = _corners(verts - torch.stack([torch.zeros_like(shift)] * 2 + [shift]), faces)
    x0, y0, w, h = _bboxes(pts, height, width)
    area2 = _twice_area(pts)
    finite = torch.isfinite(pts.sum(dim=(1, 2)) + area2)
    drawn = (area2 < -_AREA_EPS) if cull_back else (area2.abs() > _AREA_EPS)
    keep = torch.nonzero(finite & drawn & (w > 0) & (h > 0)).squeeze(1)
    best = torch.full((bsz * height * width,), _KEY_EMPTY, dtype=torch.int64, device=verts.device)
    if keep.numel() == 0:
        return torch.full_like(best, -1).view(bsz, height, width)

    kx0, ky0, kw, kh = (t.index_select(0, keep) for t in (x0, y0, w, h))
    table = torch.cat(
        [
            _edge_table(pts.index_select(0, keep), area2.index_select(0, keep)),
            torch.stack([kw, kx0 + 0.5, ky0 + 0.5], dim=0).to(pts.dtype),
        ],
        dim=0,
    )
    batch = torch.div(keep, nf, rounding_mode="floor")
    base = (batch * height + ky0.long()) * width + kx0.long()
    counts = (kw.double() * kh.double()).long()
    kbits = max(1, int(keep.numel()).bit_length())
    for lo, hi in _chunks(counts, _MAX_CANDIDATES):
        _scan(table[:, lo:hi], base[lo:hi], counts[lo:hi], lo, width, height * width, kbits, best)
    row = (best & ((1 << kbits) - 1)).clamp_(max=keep.numel() - 1)
    p2f = (keep.index_select(0, row) - batch.index_select(0, row) * nf)
    return p2f.masked_fill_(best == _KEY_EMPTY, -1).view(bsz, height, width)


# --------------------------------------------------------------------------------------
# differentiable pass
# --------------------------------------------------------------------------------------


def _hit_corners(values: Tensor, faces: Tensor, pix_idx: Tensor, face: Tensor, hw: int) -> Tensor:
    """Per-vertex values at the corners of the triangles hit by some pixels, channels first.

    values: B x V x C, faces: F x 3, pix_idx: N flat indices into B * H * W (hw = H * W),
    face: N face ids. Returns C x 3 x N (contiguous rows; differentiable w.r.t. values).
    """
    _, nv, nch = values.shape
    b = torch.div(pix_idx, hw, rounding_mode="floor")
    vid = faces.t().index_select(1, face) + (b * nv)[None]  # 3 x N
    rows = values.reshape(-1, nch).t()  # C x (B*V)
    return rows.index_select(1, vid.reshape(-1)).view(nch, 3, -1)


def _pixel_centres(pix_idx: Tensor, height: int, width: int, dtype: torch.dtype) -> Tensor:
    """Centres of flat pixel indices into B * H * W (N) -> 2 x N (x row, y row)."""
    rows = torch.div(pix_idx, width, rounding_mode="floor")
    col = pix_idx - rows * width
    row = rows - torch.div(rows, height, rounding_mode="floor") * height
    return torch.stack([col, row], dim=0).to(dtype) + 0.5


def _edge_values(x: Tensor, y: Tensor, p: Tensor) -> Tensor:
    """Edge functions w_k(p), k opposite corner k, so that w_k(corner k) = twice the signed
    area and w / w.sum(0) are the barycentrics of p.

    x, y: 3 x N corner coordinates, p: 2 x N points. Returns 3 x N, differentiable.
    """
    px, py = p.unbind(0)  # unbind, not indexing: one backward op, not a zero-filled copy per row
    xs, ys = x.unbind(0), y.unbind(0)

    def cross(i: int, j: int) -> Tensor:  # edge from corner i to corner j
        return (xs[j] - xs[i]) * (py - ys[i]) - (ys[j] - ys[i]) * (px - xs[i])

    return torch.stack([cross(1, 2), cross(2, 0), cross(0, 1)], dim=0)


def _scatter(values: Tensor, pix_idx: Tensor, size: int, fill: float) -> Tensor:
    """Place C x N values at flat pixel indices of a new C x size tensor filled with fill."""
    out = values.new_full((values.shape[0], size), fill)
    return out.index_copy(1, pix_idx, values)


def rasterize(verts: Tensor, faces: Tensor, height: int, width: int, cull_back: bool = False) -> Fragments:
    """Rasterize triangles given in screen space.

    verts: B x V x 3 (x right, y down in pixels from the top-left corner; z depth, smaller is
    nearer). faces: F x 3 int64, shared by the batch. Returns :class:`Fragments` sampled at
    the pixel centres; ``bary`` and ``zbuf`` are differentiable w.r.t. ``verts`` (screen-space
    barycentrics: the vertices are already projected, no perspective correction).

    cull_back: draw only the triangles whose corners run counter-clockwise on the screen as
    seen (x right, y down): for a mesh wound counter-clockwise seen from outside, as FLAME's,
    those facing the camera. On a closed surface the others are hidden anyway, so the picture
    is the same at about half the index pass's work; through holes (an open mouth) the
    background shows instead of the inside of the head.
    """
    if verts.dim() != 3 or verts.shape[-1] != 3:
        raise ValueError(f"verts must be B x V x 3, got {tuple(verts.shape)}")
    faces = faces.to(device=verts.device, dtype=torch.int64)
    bsz = verts.shape[0]
    n = bsz * height * width
    p2f = _visible_faces(verts.detach(), faces, height, width, cull_back)
    pix_idx = torch.nonzero(p2f.view(-1) >= 0).squeeze(1)
    face = p2f.view(-1).index_select(0, pix_idx)
    x, y, z = _hit_corners(verts, faces, pix_idx, face, height * width)
    w = _edge_values(x, y, _pixel_centres(pix_idx, height, width, verts.dtype))
    w0, w1, w2 = w.unbind(0)
    bary_hit = w / (w0 + w1 + w2)
    (b0, b1, b2), (z0, z1, z2) = bary_hit.unbind(0), z.unbind(0)
    z_hit = b0 * z0 + b1 * z1 + b2 * z2
    return Fragments(
        pix_to_face=p2f,
        bary=_scatter(bary_hit, pix_idx, n, 0.0).t().view(bsz, height, width, 3),
        zbuf=_scatter(z_hit[None], pix_idx, n, float("inf")).view(bsz, height, width),
        pix_idx=pix_idx,
        bary_hit=bary_hit,
    )


def _packed(frags: Fragments) -> tuple[Tensor, Tensor]:
    """(pix_idx N, bary_hit 3 x N) of the covered pixels, rebuilt if the fragments lack them."""
    if frags.pix_idx is not None and frags.bary_hit is not None:
        return frags.pix_idx, frags.bary_hit
    pix_idx = torch.nonzero(frags.pix_to_face.reshape(-1) >= 0).squeeze(1)
    return pix_idx, frags.bary.reshape(-1, 3).index_select(0, pix_idx).t()


def _interpolate_cf(attrs: Tensor, faces: Tensor, frags: Fragments) -> Tensor:
    """:func:`interpolate`, channels first: C x (B * H * W), zero where empty."""
    bsz, height, width = frags.pix_to_face.shape
    faces = faces.to(device=attrs.device, dtype=torch.int64)
    pix_idx, bary_hit = _packed(frags)
    face = frags.pix_to_face.reshape(-1).index_select(0, pix_idx)
    corner = _hit_corners(attrs, faces, pix_idx, face, height * width)  # C x 3 x N
    bary = bary_hit.to(attrs.dtype)
    c0, c1, c2 = corner.unbind(1)
    b0, b1, b2 = bary.unbind(0)
    vals = c0 * b0 + c1 * b1 + c2 * b2
    return _scatter(vals, pix_idx, bsz * height * width, 0.0)


def interpolate(attrs: Tensor, faces: Tensor, frags: Fragments) -> Tensor:
    """Interpolate per-vertex attributes at the pixel centres.

    attrs: B x V x C, faces: F x 3, frags from :func:`rasterize` with the same B.
    Returns B x H x W x C (a view of channels-first storage), zero where empty;
    differentiable w.r.t. attrs and (through the barycentrics) the vertex positions.
    """
    bsz, height, width = frags.pix_to_face.shape
    out = _interpolate_cf(attrs, faces, frags)
    return out.view(-1, bsz, height, width).permute(1, 2, 3, 0)


# --------------------------------------------------------------------------------------
# silhouette antialiasing
# --------------------------------------------------------------------------------------


def _coverage(d: Tensor, radius: float) -> Tensor:
    """Share of a pixel covered by a half-plane at signed distance d (pixels, positive inside),
    under a tent filter of the given radius (<= 1): a C1 piecewise quadratic from 0 to 1."""
    t = (d / radius).clamp(-1.0, 1.0)
    return torch.where(t <= 0, 0.5 * (1 + t) ** 2, 1 - 0.5 * (1 - t) ** 2)


def _boundary_pairs(covered: Tensor) -> tuple[Tensor, Tensor]:
    """4-neighbour pairs (covered pixel, empty pixel). covered: B x H x W bool.

    Returns flat indices c, e (M int64) into B * H * W.
    """
    width = covered.shape[2]
    cov, emp = covered, ~covered
    masks = torch.zeros((4, *covered.shape), dtype=torch.bool, device=covered.device)
    masks[0, :, :, :-1] = cov[:, :, :-1] & emp[:, :, 1:]  # empty neighbour to the right
    masks[1, :, :, 1:] = cov[:, :, 1:] & emp[:, :, :-1]  # ... to the left
    masks[2, :, :-1, :] = cov[:, :-1, :] & emp[:, 1:, :]  # ... below
    masks[3, :, 1:, :] = cov[:, 1:, :] & emp[:, :-1, :]  # ... above
    direction, c_idx = torch.nonzero(masks.view(4, -1), as_tuple=True)
    step = torch.tensor([1, -1, width, -width], device=covered.device)
    return c_idx, c_idx + step.index_select(0, direction)


def _edge_adjacency(faces: Tensor) -> Tensor:
    """Mesh topology for walking across edges. faces: F x 3 -> F x 6 int64: columns 0-2 the
    face sharing the edge opposite corner k (-1 on open borders; non-manifold edges are
    paired arbitrarily), columns 3-5 that face's corner off the shared edge (0 if none)."""
    a, b = faces.roll(-1, dims=1), faces.roll(-2, dims=1)  # edge k: corner k+1 -> k+2
    nv = int(faces.max()) + 1 if faces.numel() else 1
    key = (torch.minimum(a, b) * nv + torch.maximum(a, b)).reshape(-1)
    ks, order = torch.sort(key)
    pos = torch.nonzero(ks[1:] == ks[:-1]).squeeze(1)
    first, second = order.index_select(0, pos), order.index_select(0, pos + 1)
    adj = torch.full_like(key, -1)  # over (face, edge) slots
    adj[first] = second
    adj[second] = first
    flat = faces.reshape(-1)
    has = adj >= 0
    # the corner opposite edge slot j = 3 * f + k is corner k of face f, i.e. flat[j]
    off = torch.where(has, flat.index_select(0, adj.clamp(min=0)), torch.zeros_like(adj))
    nbr = torch.where(has, torch.div(adj, 3, rounding_mode="floor"), adj)
    return torch.cat([nbr.view(-1, 3), off.view(-1, 3)], dim=1)


_TOPOLOGY: dict[tuple, tuple[Tensor, np.ndarray]] = {}


def _cached_topology(faces: Tensor) -> np.ndarray:
    """faces F x 3 beside their :func:`_edge_adjacency` -> F x 9 int64 numpy (corners, neighbours,
    their far corners), cached per faces tensor."""
    return per_faces(_TOPOLOGY, faces, lambda: torch.cat([faces, _edge_adjacency(faces)], dim=1).cpu().numpy())


_CONTOUR_STEPS = 8


@torch.no_grad()
def _find_contour_edges(
    verts: Tensor, faces: Tensor, face: Tensor, batch: Tensor, pc: Tensor, pe: Tensor
) -> tuple[Tensor, Tensor]:
    """For each covered/empty pixel pair, the mesh edge where the surface seen at pc ends on
    the way to pe: walk along the segment pc -> pe from the hit triangle across shared edges
    until an open border or a fold (the neighbour lies on the same side of the edge in the
    image, i.e. the surface turns away: a contour edge). Gives up after a few triangles and
    keeps the last edge crossed.

    verts: B x V x 3, faces: F x 3, face, batch: M (hit face, batch item), pc, pe: M x 2.
    Returns face M and local edge index M (edge opposite that corner).

    The walk runs in numpy on the CPU: a few hundred pairs per image, stepped up to eight times,
    where each torch call costs more than its arithmetic (a tenth of a photometric iteration).
    """
    topo = _cached_topology(faces)  # F x 9: corners, neighbours, their far corners
    nv = verts.shape[1]
    flat = verts[..., :2].reshape(-1, 2).cpu().numpy()
    ends = torch.stack([pc, pe], dim=1).cpu().numpy()  # M x 2 x 2
    offset = (batch * nv).cpu().numpy()
    face_np = face.cpu().numpy().copy()
    edge = np.zeros_like(face_np)
    active = np.arange(face_np.size)
    with np.errstate(all="ignore"):  # non-finite corners (a failed step) compare false, as in torch
        for step in range(_CONTOUR_STEPS):
            t = topo[face_np[active]]  # M x 9
            ids = t[:, [0, 1, 2, 6, 7, 8]] + offset[active, None]
            pts = flat[ids]  # M x 6 x 2
            start = pts[:, [1, 2, 0]]  # edge k from corner k+1 to k+2
            d = pts[:, [2, 0, 1]] - start
            r = ends[active][:, :, None, :] - start[:, None]  # M x 2 x 3 x 2
            u = d[:, None, :, 0] * r[..., 1] - d[:, None, :, 1] * r[..., 0]  # M x 2 x 3
            sign = np.sign(u[:, 0].sum(axis=1, keepdims=True))
            u_c, u_e = u[:, 0] * sign, u[:, 1] * sign
            tau = u_c / np.maximum(u_c - u_e, np.float32(1e-30))
            tau[u_e >= u_c] = np.inf
            k = tau.argmin(axis=1)
            rows = np.arange(k.size)
            edge[active] = k
            if step == _CONTOUR_STEPS - 1:
                break
            # continue into the neighbour when it lies beyond the edge (no fold, no border)
            r_off = pts[rows, 3 + k] - start[rows, k]
            u_off = (d[rows, k, 0] * r_off[:, 1] - d[rows, k, 1] * r_off[:, 0]) * sign[:, 0]
            nxt = t[rows, 3 + k]
            go_on = (nxt >= 0) & (u_off < 0) & (tau[rows, k] < 1)
            active = active[go_on]
            if active.size == 0:
                break
            face_np[active] = nxt[go_on]
    return torch.from_numpy(face_np).to(face.device), torch.from_numpy(edge).to(face.device)


def _contour_distances(
    corners: Tensor, k: Tensor, pc: Tensor, pe: Tensor
) -> tuple[Tensor, Tensor]:
    """Signed distances of two pixel centres to edge k of each triangle (positive on the
    triangle's side), measured along the pixel axis that crosses that edge most steeply (so
    neighbouring pixel centres across the edge are exactly 1 apart on that scale).

    corners: 3 (x, y, z) x 3 (corner) x M, k: M, pc, pe: 2 x M. Returns d_c, d_e (M),
    differentiable w.r.t. corners.
    """
    x, y = corners[0], corners[1]
    w_c = _edge_values(x, y, pc)
    w_e = _edge_values(x, y, pe)
    sign = torch.sign(w_c.detach().sum(dim=0))
    kk = k[None]
    ex = (x.roll(-2, dims=0) - x.roll(-1, dims=0)).gather(0, kk)[0]  # edge k: k+1 -> k+2
    ey = (y.roll(-2, dims=0) - y.roll(-1, dims=0)).gather(0, kk)[0]
    scale = sign / torch.maximum(ex.abs(), ey.abs()).clamp(min=1e-12)
    return w_c.gather(0, kk)[0] * scale, w_e.gather(0, kk)[0] * scale


def _silhouette(
    verts: Tensor, faces: Tensor, frags: Fragments, sigma: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Soft alpha, plus for the empty pixels of the band the covered neighbour their coverage
    comes from. Returns alpha B x H x W, dst K and src K (flat pixel indices)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    radius = min(2.0 * sigma, 1.0)
    bsz, height, width = frags.pix_to_face.shape
    hw = height * width
    n = bsz * hw
    faces = faces.to(device=verts.device, dtype=torch.int64)
    covered = frags.pix_to_face >= 0
    alpha = covered.reshape(-1).to(verts.dtype)
    c_idx, e_idx = _boundary_pairs(covered)
    if c_idx.numel() == 0:
        return alpha.view(bsz, height, width), c_idx, c_idx

    pc = _pixel_centres(c_idx, height, width, verts.dtype)
    pe = _pixel_centres(e_idx, height, width, verts.dtype)
    batch = torch.div(c_idx, hw, rounding_mode="floor")
    face, edge = _find_contour_edges(
        verts.detach(), faces, frags.pix_to_face.reshape(-1).index_select(0, c_idx), batch,
        pc.t(), pe.t(),
    )
    d_c, d_e = _contour_distances(_hit_corners(verts, faces, c_idx, face, hw), edge, pc, pe)
    big = torch.finfo(verts.dtype).max
    dmin = verts.new_full((n,), big).scatter_reduce(0, c_idx, d_c, reduce="amin")
    dmax = verts.new_full((n,), -big).scatter_reduce(0, e_idx, d_e, reduce="amax")
    with torch.no_grad():
        c_band = torch.nonzero(dmin < big).squeeze(1)
        e_band = torch.nonzero(dmax > -big).squeeze(1)
        winner = torch.nonzero(d_e == dmax.index_select(0, e_idx)).squeeze(1)
        src = torch.full_like(alpha, n, dtype=torch.int64)  # lowest index among ties
        src.scatter_reduce_(
            0, e_idx.index_select(0, winner), c_idx.index_select(0, winner), reduce="amin"
        )
    alpha = alpha.index_copy(0, c_band, _coverage(dmin.index_select(0, c_band), radius))
    alpha = alpha.index_copy(0, e_band, _coverage(dmax.index_select(0, e_band), radius))
    return alpha.view(bsz, height, width), e_band, src.index_select(0, e_band)


def soft_silhouette(verts: Tensor, faces: Tensor, frags: Fragments, sigma: float = 0.5) -> Tensor:
    """Antialiased coverage of the mesh, differentiable w.r.t. the silhouette's vertices.

    verts: B x V x 3 screen space (as given to :func:`rasterize`), faces: F x 3, frags from
    :func:`rasterize`. Returns B x H x W alpha in [0, 1]: exactly 1 inside and 0 away from the
    mesh. On the one-pixel band either side of the silhouette (covered pixels with an empty
    4-neighbour, and those empty neighbours) alpha is the share of the pixel covered by the
    half-plane of the silhouette edge crossed between the two pixel centres:

    * the edge is found by walking from the covered pixel's triangle towards the empty pixel
      across shared mesh edges until an open border or a fold (where the surface turns away
      from the camera), so on smooth meshes it is the true contour edge even when the thin,
      foreshortened triangles next to it cover no pixel centre (up to 8 triangles are
      crossed; beyond that the last edge crossed stands in);
    * the signed distance to it is measured along the pixel axis that crosses it most
      steeply (neighbouring centres across it are exactly 1 apart on that scale);
    * coverage uses a tent filter of radius ``2 * sigma`` pixels (capped at 1): a C1
      piecewise quadratic of the distance.

    At the default ``sigma = 0.5`` the alpha sum equals the area inside straight silhouette
    edges (for a 60 px disc drawn as a 128-gon it is within 0.01% of the polygon's area) and
    its derivative w.r.t. a vertex equals the derivative of that area, so gradients through
    alpha move silhouette vertices the right way by the right amount. Smaller sigma is
    sharper (the sum stays right only on average); larger values act as 0.5.

    Limits: only mesh-vs-background edges get coverage (occlusion edges inside the mesh get
    no position gradient); silhouette details thinner than a pixel that cover no pixel
    centre are invisible, as in the hard mask.
    """
    return _silhouette(verts, faces, frags, sigma)[0]


# --------------------------------------------------------------------------------------
# conveniences
# --------------------------------------------------------------------------------------


def render_mesh(
    verts: Tensor,
    faces: Tensor,
    colors: Tensor,
    height: int,
    width: int,
    background: Tensor | None = None,
    sigma: float = 0.5,
    cull_back: bool = False,
    frags: Fragments | None = None,
    cover: tuple[Tensor, Tensor, Tensor] | None = None,
) -> dict:
    """Rasterize, interpolate per-vertex colours and composite with antialiased alpha.

    verts: B x V x 3 screen space; faces: F x 3; colors: B x V x C; background: B x C x H x W
    (or broadcastable to it, e.g. 1 x C x H x W) or None (zeros); sigma: edge softness as in
    :func:`soft_silhouette`; cull_back as in :func:`rasterize`. Empty pixels of the silhouette
    band take the colour of the covered neighbour they get their coverage from. Returns a dict with
    ``image`` B x C x H x W, ``alpha`` B x 1 x H x W, ``depth`` B x 1 x H x W (``zbuf`` with 0
    where empty, so it can be multiplied by a mask without NaNs), ``pix_to_face`` B x H x W and
    ``frags`` (:class:`Fragments`) and ``cover`` (the antialiasing's coverage).

    frags, cover: those of an earlier call with the same ``verts`` (e.g. colours fitted on a
    fixed geometry): the rasterization and antialiasing are reused, only the colours change.
    """
    frags = rasterize(verts, faces, height, width, cull_back) if frags is None else frags
    rgb = _interpolate_cf(colors, faces, frags)  # C x (B*H*W)
    return _composite_cf(verts, faces, frags, rgb, background, sigma, cover)


def composite_pixels(
    verts: Tensor,
    faces: Tensor,
    frags: Fragments,
    pixels: Tensor,
    background: Tensor | None = None,
    sigma: float = 0.5,
    cover: tuple[Tensor, Tensor, Tensor] | None = None,
) -> dict:
    """:func:`render_mesh` for colours computed per pixel (e.g. sampled from a texture) instead
    of interpolated from the vertices.

    verts: B x V x 3 screen space and faces: F x 3 as given to :func:`rasterize`; frags: its
    result; pixels: B x C x H x W colours at the covered pixels (empty pixels must hold finite
    values, e.g. zeros: their alpha is 0, and those of the silhouette band take their covered
    neighbour's colour). Antialiasing and compositing are exactly those of :func:`render_mesh`;
    returns the same dict (cover as there).
    """
    nch = pixels.shape[1]
    rgb = pixels.permute(1, 0, 2, 3).reshape(nch, -1)  # C x (B*H*W)
    return _composite_cf(verts, faces, frags, rgb, background, sigma, cover)


def _composite_cf(verts: Tensor, faces: Tensor, frags: Fragments, rgb: Tensor,
                  background: Tensor | None, sigma: float, cover: tuple | None = None) -> dict:
    """The antialiasing and compositing of :func:`render_mesh`; rgb: C x (B*H*W) colours;
    cover: the result of :func:`_silhouette` for these verts and frags, if known."""
    bsz, height, width = frags.pix_to_face.shape
    cover = _silhouette(verts, faces, frags, sigma) if cover is None else cover
    alpha, dst, src = cover
    rgb = rgb.index_copy(1, dst, rgb.index_select(1, src))  # band pixels: neighbour's colour
    a = alpha.reshape(1, -1).to(rgb.dtype)
    image = rgb * a
    if background is not None:
        bg = background.expand(bsz, -1, height, width).permute(1, 0, 2, 3)
        bg = bg.reshape(rgb.shape[0], -1)
        image = image + bg * (1 - a)
    image = image.view(-1, bsz, height, width).permute(1, 0, 2, 3)
    a = a.view(bsz, 1, height, width)
    depth = torch.where(frags.pix_to_face >= 0, frags.zbuf, torch.zeros_like(frags.zbuf))
    return {
        "image": image,
        "alpha": a,
        "depth": depth[:, None],
        "pix_to_face": frags.pix_to_face,
        "frags": frags,
        "cover": cover,
    }


def vertex_visibility(verts: Tensor, faces: Tensor, frags: Fragments) -> Tensor:
    """Vertices of triangles seen in at least one pixel.

    verts: B x V x 3 (only its shape is used), faces: F x 3. Returns B x V bool.
    """
    bsz, nv = verts.shape[:2]
    faces = faces.to(device=verts.device, dtype=torch.int64)
    p2f = frags.pix_to_face.reshape(bsz, -1)
    seen = torch.zeros(bsz, faces.shape[0] + 1, dtype=torch.bool, device=verts.device)
    seen.scatter_(1, p2f + 1, True)  # column 0 collects the empty pixels
    b, f = torch.nonzero(seen[:, 1:], as_tuple=True)
    vis = torch.zeros(bsz, nv, dtype=torch.bool, device=verts.device)
    vis[b[:, None].expand(-1, 3), faces.index_select(0, f)] = True
    return vis
