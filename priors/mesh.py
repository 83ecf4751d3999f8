"""Topology helpers on a model mesh (pure functions, computed once per model)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor


def mesh_edges(faces: Tensor) -> Tensor:
    """Unique undirected edges of a triangle mesh: faces F x 3 -> E x 2 (i < j)."""
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = torch.sort(e, dim=1).values
    return torch.unique(e, dim=0)


def mirror_index(verts: Tensor) -> Tensor:
    """For each vertex, the vertex nearest to its mirror image across x = 0: V x 3 -> V (long)."""
    v = verts.detach().cpu().numpy().astype(np.float64)
    mirrored = v * np.array([-1.0, 1.0, 1.0])
    _, idx = cKDTree(v).query(mirrored)
    return torch.as_tensor(idx, dtype=torch.long)
