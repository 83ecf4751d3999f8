"""Vertex normals and spherical-harmonics (order 2, 9 coefficients x RGB) Lambertian shading."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Irradiance constants for the 9 real SH basis functions (Ramamoorthi & Hanrahan 2001):
# the clamped-cosine convolution folded into the basis normalisation.
SH_CONSTANTS = (
    1.0 / math.sqrt(4 * math.pi),
    (2 * math.pi / 3) * math.sqrt(3 / (4 * math.pi)),
    (2 * math.pi / 3) * math.sqrt(3 / (4 * math.pi)),
    (2 * math.pi / 3) * math.sqrt(3 / (4 * math.pi)),
    (math.pi / 4) * 3 * math.sqrt(5 / (12 * math.pi)),
    (math.pi / 4) * 3 * math.sqrt(5 / (12 * math.pi)),
    (math.pi / 4) * 3 * math.sqrt(5 / (12 * math.pi)),
    (math.pi / 4) * (3 / 2) * math.sqrt(5 / (12 * math.pi)),
    (math.pi / 4) * 0.5 * math.sqrt(5 / (4 * math.pi)),
)


def vertex_normals(verts: Tensor, faces: Tensor) -> Tensor:
    """Area-weighted unit vertex normals: verts B x V x 3, faces F x 3 -> B x V x 3."""
    bsz, nf = verts.shape[0], faces.shape[0]
    corners = faces.reshape(-1)  # one gather and one scatter for all three corners
    c = verts.index_select(1, corners).view(bsz, nf, 3, 3)
    fn = torch.linalg.cross(c[:, :, 1] - c[:, :, 0], c[:, :, 2] - c[:, :, 0])  # B x F x 3, length = 2 x area
    normals = torch.zeros_like(verts).index_add(1, corners, fn[:, :, None].expand(-1, -1, 3, -1).reshape(bsz, -1, 3))
    return torch.nn.functional.normalize(normals, dim=-1, eps=1e-12)


def sh_basis(normals: Tensor) -> Tensor:
    """SH irradiance basis at unit normals ... x 3 -> ... x 9 (constants included)."""
    x, y, z = normals.unbind(-1)
    c = SH_CONSTANTS
    return torch.stack([
        torch.full_like(x, c[0]),
        c[1] * x, c[2] * y, c[3] * z,
        c[4] * x * y, c[5] * x * z, c[6] * y * z,
        c[7] * (x * x - y * y),
        c[8] * (3 * z * z - 1),
    ], dim=-1)


def sh_shading(normals: Tensor, light: Tensor) -> Tensor:
    """Irradiance for normals B x N x 3 under SH light B x 9 x 3 -> B x N x 3 (RGB)."""
    return torch.einsum("bnk,bkc->bnc", sh_basis(normals), light)


def ambient_light(batch: int, level: float = 1.0, device=None) -> Tensor:
    """SH light B x 9 x 3 giving a uniform irradiance `level` for every normal."""
    light = torch.zeros(batch, 9, 3, device=device)
    light[:, 0, :] = level / SH_CONSTANTS[0]
    return light
