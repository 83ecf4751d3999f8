"""Topology helpers on a model mesh (pure functions, computed once per model)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

T = TypeVar("T")


def per_faces(store: dict, faces: Tensor, build: Callable[[], T], *extra) -> T:
    """build(), memoised in `store` per faces tensor (and `extra` key parts), its content checked on
    every hit. Up to 32 entries, the oldest dropped first: a fit keeps a region mesh per stage and
    chunk of images."""
    key = (faces.device, tuple(faces.shape), faces.data_ptr(), *extra)
    hit = store.get(key)
    if hit is not None and torch.equal(hit[0], faces):
        return hit[1]
    value = build()
    if len(store) >= 32:
        store.pop(next(iter(store)))
    store[key] = (faces.clone(), value)
    return value


def sparse_csr(indices: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A sparse matrix in CSR form from COO entries (2 x N indices, N values; repeats are summed)."""
    with warnings.catch_warnings():  # torch calls its sparse CSR support beta; our products are plain and tested
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_coo_tensor(indices, values, shape).coalesce().to_sparse_csr()


def mesh_edges(faces: Tensor) -> Tensor:
    """Unique undirected edges of a triangle mesh: faces F x 3 -> E x 2 (i < j)."""
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = torch.sort(e, dim=1).values
    n = int(e.max()) + 1 if len(e) else 1
    keys = torch.unique(e[:, 0] * n + e[:, 1])  # one int64 key per edge: torch's unique(dim=0) is ~15x slower
    return torch.stack([keys // n, keys % n], dim=1)


def mirror_index(verts: Tensor) -> Tensor:
    """For each vertex, the vertex nearest to its mirror image across x = 0: V x 3 -> V (long)."""
    from scipy.spatial import cKDTree  # here: scipy.spatial takes 0.2 s to import

    v = verts.detach().cpu().numpy().astype(np.float64)
    mirrored = v * np.array([-1.0, 1.0, 1.0])
    _, idx = cKDTree(v).query(mirrored)
    return torch.as_tensor(idx, dtype=torch.long)


def decimate(vertices: np.ndarray, faces: np.ndarray, n_faces: int,
             uv_faces: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A coarser mesh over some of the same vertices, each left where it is: quadric edge collapses
    (the fast-simplification package) down to about `n_faces` triangles. Open borders (the mouth,
    the eyes, the neck's cut) are kept; so are UV seams when `uv_faces` (F x 3, the texture
    coordinate index at each corner) is given: the mesh is cut along them first.

    vertices V x 3, faces F x 3 -> faces F' x 3 into `vertices`, and with uv_faces the F' x 3 texture
    coordinate indices of their corners (else None). n_faces >= F returns the mesh as it is."""
    faces = np.asarray(faces, np.int64)
    if n_faces >= len(faces):
        return faces, None if uv_faces is None else np.asarray(uv_faces, np.int64)
    import fast_simplification

    if uv_faces is None:  # one node per vertex
        node_v, node_uv, node_faces = np.arange(len(vertices)), None, faces
    else:  # one node per (vertex, texture coordinate) pair: a seam becomes an open border
        pairs = np.stack([faces.reshape(-1), np.asarray(uv_faces, np.int64).reshape(-1)], axis=1)
        nodes, inverse = np.unique(pairs, axis=0, return_inverse=True)
        node_v, node_uv, node_faces = nodes[:, 0], nodes[:, 1], inverse.reshape(-1, 3)
    points = np.asarray(vertices, np.float64)[node_v]
    out, out_faces, collapses = fast_simplification.simplify(points, node_faces, target_count=n_faces,
                                                             return_collapses=True, preserve_border=True)
    # each collapse merges its second node into its first: the nodes never merged away survive, and
    # the output's points are those survivors (moved to quadric optima, which we do not use)
    _, _, out_of_node = fast_simplification.replay_simplification(points, node_faces, collapses)
    survivors = np.ones(len(points), bool)
    survivors[collapses[:, 1]] = False
    survivors = np.flatnonzero(survivors)
    node_of_out = np.empty(len(out), np.int64)
    node_of_out[out_of_node[survivors]] = survivors
    corners = node_of_out[np.asarray(out_faces, np.int64)]
    coarse = node_v[corners]
    # with its corners back where they were, a triangle may face the other way than the surface
    # it stands for (a fold the collapses made against the moved points): turn it round
    flipped = (face_normals(vertices, coarse) * _vertex_normals(vertices, faces)[coarse].sum(1)).sum(1) < 0
    corners[flipped] = corners[flipped][:, ::-1]
    return node_v[corners], None if node_uv is None else node_uv[corners]


def face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Each triangle's normal by its winding, length twice its area: F x 3."""
    p = np.asarray(vertices, np.float64)[faces]
    return np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])


def _vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals (not normalised) V x 3."""
    n = face_normals(vertices, faces)
    out = np.zeros((len(vertices), 3))
    for k in range(3):
        np.add.at(out, faces[:, k], n)
    return out
