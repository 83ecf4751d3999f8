"""The parameter set of a fit (one dataclass of batched tensors) and fit.npz save/load."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from priors.assets import atomic_write
from priors.errors import UsageError

from .shading import ambient_light

MEAN_SKIN = (0.70, 0.52, 0.44)  # initial albedo (linear RGB in [0, 1]) without a texture space


@dataclass
class FitParams:
    """Everything a fit optimises, batch-first (B images).

    shape B x n_shape, exp B x n_exp, global_pose / neck_pose / jaw_pose B x 3 (axis-angle),
    eye_pose B x 6 (left, right), cam B x 3 (scale, tx, ty: weak perspective),
    light B x 9 x 3 (SH), albedo B x V x 3 (per-vertex) or B x n_tex (texture-space coefficients).
    """

    shape: Tensor
    exp: Tensor
    global_pose: Tensor
    neck_pose: Tensor
    jaw_pose: Tensor
    eye_pose: Tensor
    cam: Tensor
    light: Tensor
    albedo: Tensor

    @staticmethod
    def names() -> list[str]:
        return [f.name for f in fields(FitParams)]

    @classmethod
    def initial(cls, batch: int, n_shape: int, n_exp: int, n_verts: int, device="cpu") -> FitParams:
        """Neutral head, frontal, unit-scale camera, ambient light, mean-skin per-vertex albedo."""
        z = lambda *s: torch.zeros(batch, *s, device=device)
        cam = z(3)
        cam[:, 0] = 1.0
        albedo = torch.tensor(MEAN_SKIN, device=device).expand(batch, n_verts, 3).clone()
        return cls(z(n_shape), z(n_exp), z(3), z(3), z(3), z(6), cam, ambient_light(batch, device=device),
                   albedo)

    def items(self):
        return [(n, getattr(self, n)) for n in self.names()]

    def map(self, fn) -> FitParams:
        return FitParams(**{n: fn(v) for n, v in self.items()})

    def detach(self) -> FitParams:
        return self.map(lambda t: t.detach().clone())

    def to(self, device) -> FitParams:
        return self.map(lambda t: t.to(device))

    def select(self, idx) -> FitParams:
        """Rows `idx` (int, slice or index list) of every field, keeping the batch dimension."""
        if isinstance(idx, int):
            idx = [idx]
        return self.map(lambda t: t[idx])

    @staticmethod
    def cat(parts: list[FitParams]) -> FitParams:
        return FitParams(**{n: torch.cat([getattr(p, n) for p in parts]) for n in FitParams.names()})

    @property
    def batch(self) -> int:
        return int(self.shape.shape[0])


# ----------------------------------------------------------------------------- fit.npz
def save_fit(path: str | Path, params: FitParams, extras: dict) -> None:
    """Write one fit (params batch of 1) plus extra arrays/strings to fit.npz, atomically.

    extras: vertices (V,3), landmarks2d (68,2), landmarks2d_target (68,2), image_size (2,),
    model (str), recipe (str), and anything else the caller records.
    """
    if params.batch != 1:
        raise ValueError("save_fit writes one image's parameters (batch of 1)")
    arrays = {n: v.detach().cpu().numpy()[0].astype(np.float32) for n, v in params.items()}
    for key, value in extras.items():
        if isinstance(value, str):
            arrays[key] = np.array(value)
        elif isinstance(value, Tensor):
            arrays[key] = value.detach().cpu().numpy()
        else:
            arrays[key] = np.asarray(value)
        if arrays[key].dtype == np.float64:
            arrays[key] = arrays[key].astype(np.float32)
    atomic_write(Path(path), lambda fh: np.savez(fh, **arrays))


def load_fit(path: str | Path, device="cpu") -> tuple[FitParams, dict]:
    """Read a fit.npz -> (FitParams with batch 1, dict of the other entries as numpy/str)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            content = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UsageError(f"{path}: not a readable fit.npz ({exc}); fix: pass a fit.npz written by "
                         "`cli.py fit`") from None
    missing = [n for n in FitParams.names() if n not in content]
    if missing:
        raise UsageError(f"{path}: fit.npz lacks {', '.join(missing)}; fix: re-run `cli.py fit` "
                         "to produce a complete fit")
    params = FitParams(**{n: torch.as_tensor(content.pop(n), dtype=torch.float32, device=device)[None]
                          for n in FitParams.names()})
    extras = {k: (str(v) if v.dtype.kind == "U" and v.ndim == 0 else v) for k, v in content.items()}
    return params, extras
