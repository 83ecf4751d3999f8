"""Albedo models: what `FitParams.albedo` means and how it becomes a colour on the surface.

Two kinds:

* **per-vertex** (:class:`VertexAlbedo`, the default): ``albedo`` B x V x 3 is a free linear
  RGB colour per vertex, interpolated across each triangle like the shading.
* **texture space** (:class:`TextureAlbedo`): ``albedo`` B x K holds the coefficients of a
  linear UV texture space (FLAME_texture.npz or FLAME_albedo_from_BFM.npz, FLAME topology
  only): ``texture = mean + basis @ coeffs``, an RGB image B x 3 x Ht x Wt (Ht = Wt = 256 by
  default, box-downsampled from the stored 512). The albedo of a pixel is sampled from that
  image (bilinear, ``torch.nn.functional.grid_sample``) at the pixel's UV coordinate: the
  barycentric interpolation of the hit triangle's corner UVs ``vt[ft[face]]``.

UV convention: ``vt`` are OBJ/FLAME texture coordinates, u to the right and v **up**, (0, 0)
the bottom-left corner of the image, (1, 1) the top-right corner; image arrays are stored top
row first. A UV point therefore lies at image column ``u * Wt`` and row ``(1 - v) * Ht``
(continuous pixel coordinates, origin at the top-left corner of the top-left texel, texel
centres at +0.5). grid_sample with ``align_corners=False`` puts -1 and +1 on the outer edges
of the border texels, so the sampling grid is ``(x, y) = (2u - 1, 1 - 2v)``: v is flipped
because grid y grows downwards with the image rows. UVs outside [0, 1] take the border texel.
This is also how DECA samples these spaces (``uv * 2 - 1`` with the v axis negated).

`albedo_model_for(model, space)` picks the kind: the texture space only when it is a UV
space, has a UV layout whose ``ft`` has one row per model triangle and the mesh is FLAME's
(5023 vertices); otherwise per-vertex, with a one-line warning saying why (the caller puts it
into fit.json: never a silent change).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from priors.errors import AssetError, UsageError
from priors.textures import (
    FLAME_N_VERTS, UV_LAYOUT_FILE, TextureSpace, align_uv_layout, check_texture_space, find_texture_space,
    find_uv_layout, load_texture_space, read_uv_layout,
)

from .params import MEAN_SKIN
from .render import Fragments, interpolate

__all__ = ["FLAME_N_VERTS", "N_TEX", "TEX_SIZE", "AlbedoModel", "TextureAlbedo", "VertexAlbedo",
           "albedo_model_for", "installed_albedo_model", "load_albedo_space", "texture_model_for"]

N_TEX = 50  # texture components fitted (DECA's n_tex; its tex codes fill exactly these)
TEX_SIZE = 256  # working texture size (the stored 512 x 512 box-downsampled)
#: OBJ files with FLAME's UV layout looked for next to a texture space that has none (BFM's), before the
#: installed one (`assets install head_template.obj` -> <home>/uv/head_template.obj)
UV_TEMPLATE_NAMES = (UV_LAYOUT_FILE, "FLAME_uv_template.obj", "uv_template.obj")


class AlbedoModel:
    """What `FitParams.albedo` is. kind: 'vertex' (B x V x 3 colours) or 'texture' (B x K
    coefficients of a UV texture space)."""

    kind: ClassVar[str] = ""

    def initial_albedo(self, batch: int, device="cpu") -> Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def to(self, device) -> AlbedoModel:
        return self


@dataclass
class VertexAlbedo(AlbedoModel):
    """The free per-vertex albedo: B x n_verts x 3 linear RGB, starting at mean skin."""

    n_verts: int
    kind: ClassVar[str] = "vertex"

    def initial_albedo(self, batch: int, device="cpu") -> Tensor:
        """B x V x 3, MEAN_SKIN everywhere (as FitParams.initial)."""
        return torch.tensor(MEAN_SKIN, device=device).expand(batch, self.n_verts, 3).clone()

    def describe(self) -> str:
        return "per-vertex"


@dataclass
class TextureAlbedo(AlbedoModel):
    """A linear UV texture space on the fit's device.

    mean: 3 x Ht x Wt RGB in [0, 1] (row 0 = top of the image = v 1); basis: K x (3 * Ht * Wt)
    (channel-first flattening of mean); vt: T x 2 float32 (OBJ convention, see the module
    docstring); ft: F x 3 int64 (one row per model triangle); name 'FLAME' | 'BFM'; source:
    the file it came from.
    """

    name: str
    source: str
    mean: Tensor
    basis: Tensor
    vt: Tensor
    ft: Tensor
    kind: ClassVar[str] = "texture"

    @classmethod
    def from_space(cls, space: TextureSpace) -> TextureAlbedo:
        if space.kind != "uv" or space.vt is None or space.ft is None:
            raise ValueError(f"{space.source}: not a UV texture space with a UV layout")
        mean = torch.from_numpy(np.ascontiguousarray(space.mean.transpose(2, 0, 1)))
        k = space.basis.shape[-1]
        basis = torch.from_numpy(np.ascontiguousarray(space.basis.transpose(3, 2, 0, 1)).reshape(k, -1))
        return cls(space.name, space.source, mean, basis, torch.from_numpy(space.vt).float(),
                   torch.from_numpy(space.ft).long())

    @property
    def n_tex(self) -> int:
        return int(self.basis.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.mean.shape[1]), int(self.mean.shape[2])

    @property
    def deca_tex(self) -> bool:
        """Whether DECA's tex codes are coefficients of this space (BFM-derived albedo only)."""
        return self.name == "BFM"

    def initial_albedo(self, batch: int, device="cpu") -> Tensor:
        """B x K zeros: the mean texture."""
        return torch.zeros(batch, self.n_tex, device=device)

    def describe(self) -> str:
        h, w = self.image_size
        return f"texture {self.name} ({Path(self.source).name}, {self.n_tex} components, {h}x{w})"

    def to(self, device) -> TextureAlbedo:
        want = torch.device(device)
        have = self.mean.device
        if have.type == want.type and (want.index is None or want.index == have.index):
            return self
        return TextureAlbedo(self.name, self.source, *(t.to(device) for t in
                                                       (self.mean, self.basis, self.vt, self.ft)))

    def _check(self, coeffs: Tensor) -> None:
        if coeffs.dim() != 2 or coeffs.shape[1] != self.n_tex:
            raise UsageError(f"albedo of shape {tuple(coeffs.shape)} given to the texture space "
                             f"{Path(self.source).name} with {self.n_tex} components; fix: use the "
                             "texture space the fit was made with")

    def texture(self, coeffs: Tensor) -> Tensor:
        """coeffs B x K -> texture images B x 3 x Ht x Wt (mean + basis @ coeffs, not clamped)."""
        self._check(coeffs)
        flat = torch.addmm(self.mean.reshape(1, -1), coeffs.to(self.basis.dtype), self.basis)
        return flat.view(coeffs.shape[0], 3, *self.image_size)

    def uv(self, frags: Fragments) -> Tensor:
        """UV coordinates at the pixel centres: B x H x W x 2 (u, v), 0 where empty;
        differentiable w.r.t. the vertex positions through the barycentrics."""
        bsz = frags.pix_to_face.shape[0]
        return interpolate(self.vt.expand(bsz, -1, -1), self.ft, frags)

    def sample(self, coeffs: Tensor, frags: Fragments) -> Tensor:
        """Per-pixel albedo B x 3 x H x W (0 where no triangle is hit) for coefficients B x K."""
        tex = self.texture(coeffs)
        uv = self.uv(frags)
        grid = torch.stack([2 * uv[..., 0] - 1, 1 - 2 * uv[..., 1]], dim=-1)  # v up -> rows down
        out = F.grid_sample(tex, grid.to(tex.dtype), mode="bilinear", padding_mode="border",
                            align_corners=False)
        return out * (frags.pix_to_face >= 0)[:, None].to(out.dtype)

    def texture_image(self, coeffs: Tensor) -> np.ndarray:
        """The texture of one fit (coeffs 1 x K or K) as an Ht x Wt x 3 uint8 RGB image, top row
        first (ready for a PNG referenced by an OBJ with this space's vt/ft)."""
        with torch.no_grad():
            tex = self.texture(coeffs.reshape(1, -1).to(self.mean.device))[0]
        return (tex.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------- choosing one
def albedo_model_for(model, space: TextureSpace | None, require_flame: bool = True
                     ) -> tuple[AlbedoModel, str | None]:
    """The albedo model for `model` (anything with `n_verts` and `faces` F x 3) given a texture
    space or None. Returns (model, warning): the texture space when usable, else per-vertex
    with a one-line warning naming the file and the reason (None when no space was given).
    require_flame=False lifts the 5023-vertex requirement (tests with tiny meshes)."""
    n_verts, n_faces = int(model.n_verts), int(model.faces.shape[0])
    per_vertex = VertexAlbedo(n_verts)
    if space is None:
        return per_vertex, None

    def fallback(reason: str) -> tuple[AlbedoModel, str]:
        return per_vertex, (f"albedo: texture space {Path(space.source).name} not used ({reason}); "
                            "the free per-vertex albedo is fitted instead")

    if space.kind != "uv":
        return fallback("a per-vertex texture space; only UV texture spaces are supported")
    if require_flame and n_verts != FLAME_N_VERTS:
        return fallback(f"it is made for FLAME's {FLAME_N_VERTS}-vertex mesh and this model has "
                        f"{n_verts} vertices")
    if space.vt is None or space.ft is None:
        return fallback(f"it has no UV layout (vt/ft); fix: `python cli.py assets install {UV_TEMPLATE_NAMES[0]}` "
                        "(DECA's data/head_template.obj), or install FLAME_texture.npz")
    layout = space.uv_layout  # vt/ft from an OBJ: its vertices must be the model's, its triangles matched to ours
    if layout is not None and layout.n_verts != n_verts:
        return fallback(f"its UV layout {Path(layout.source).name} has {layout.n_verts} vertices and the "
                        f"model {n_verts}")
    if space.ft.shape[0] != n_faces:
        return fallback(f"its UV layout has {space.ft.shape[0]} triangles and the model {n_faces}")
    if layout is not None:
        faces = model.faces.detach().cpu().numpy() if isinstance(model.faces, Tensor) else np.asarray(model.faces)
        try:
            space = replace(space, ft=align_uv_layout(layout, faces), uv_layout=None)
        except AssetError as exc:
            return fallback(f"its UV layout does not fit this mesh: {exc}")
    return TextureAlbedo.from_space(space), None


_SPACES: dict[tuple, TextureSpace] = {}
_SPACES_MAX = 2


def _uv_layout_path(space_file: Path, home: str | Path | None) -> Path | None:
    """The OBJ a UV space without vt/ft takes its layout from: one next to the file, else the installed one."""
    for name in UV_TEMPLATE_NAMES:
        if (space_file.parent / name).is_file():
            return space_file.parent / name
    return find_uv_layout(home)


def load_albedo_space(path: str | Path, n_tex: int = N_TEX, size: int | None = TEX_SIZE,
                      home: str | Path | None = None) -> TextureSpace:
    """A texture space file, loaded once per process (cached by path, mtime, n_tex, size and UV layout file):
    the first min(n_tex, available) components, box-downsampled to size x size where the stored
    size is a multiple of it (else as stored). A UV space without vt/ft (BFM's) takes FLAME's UV
    layout from an OBJ next to it (UV_TEMPLATE_NAMES), else from the installed `<home>/uv/head_template.obj`
    (space.uv_layout keeps it, so albedo_model_for can match its triangles to the model's)."""
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise AssetError(f"{p}: texture space file does not exist; fix: check the path or re-install it")
    _, kind, available = check_texture_space(p)
    n = min(int(n_tex), available)
    layout_file = _uv_layout_path(p, home) if kind == "uv" else None
    layout_stamp = (str(layout_file), layout_file.stat().st_mtime_ns) if layout_file is not None else None
    key = (str(p), p.stat().st_mtime_ns, n, size if kind == "uv" else None, layout_stamp)
    if key in _SPACES:
        return _SPACES[key]
    try:
        space = load_texture_space(p, n_tex=n, size=size if kind == "uv" else None)
    except AssetError as exc:
        if size is None or "cannot resize" not in str(exc):
            raise
        space = load_texture_space(p, n_tex=n)
    if space.kind == "uv" and space.vt is None and layout_file is not None:
        layout = read_uv_layout(layout_file)
        space.vt, space.ft, space.uv_layout = layout.vt, layout.ft, layout
    while len(_SPACES) >= _SPACES_MAX:
        _SPACES.pop(next(iter(_SPACES)))
    _SPACES[key] = space
    return space


def installed_albedo_model(model, device="cpu", n_tex: int = N_TEX, home: str | Path | None = None,
                           require_flame: bool = True) -> tuple[AlbedoModel, str | None]:
    """The albedo model a fit of `model` uses: the installed texture space (`<home>/albedo/`,
    see priors.textures.find_texture_space) when usable, else per-vertex. Returns (model on
    `device`, warning or None) as :func:`albedo_model_for`."""
    path = find_texture_space(home)
    space = load_albedo_space(path, n_tex=n_tex, home=home) if path is not None else None
    albedo_model, warning = albedo_model_for(model, space, require_flame=require_flame)
    return albedo_model.to(device), warning


def texture_model_for(model, albedo: Tensor, given: AlbedoModel | None = None) -> TextureAlbedo | None:
    """What renders `albedo`: None for per-vertex colours (B x V x 3); for texture coefficients
    (B x K) `given` when it is a texture space, else the installed one. Raises UsageError when
    no usable texture space is installed."""
    if albedo.dim() != 2:
        return None
    if isinstance(given, TextureAlbedo):
        return given.to(albedo.device)
    found, warning = installed_albedo_model(model, albedo.device, n_tex=int(albedo.shape[1]))
    if not isinstance(found, TextureAlbedo):
        why = warning or "no texture space is installed"
        raise UsageError(f"the fit's albedo holds {albedo.shape[1]} texture-space coefficients but {why}; "
                         "fix: install the texture space the fit was made with (`cli.py assets install`)")
    return found
