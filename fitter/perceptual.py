"""LPIPS (VGG16 backbone) perceptual distance, loaded without any download.

The LPIPS linear heads ship inside the `lpips` package; the VGG16 ImageNet backbone is
torchvision's `vgg16-397923af.pth`, normally downloaded on first use. Here we only read it
from disk (torch hub's checkpoints folder, or an explicit path) and say how to get it when
it is absent.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from priors.errors import AssetError

VGG_FILE = "vgg16-397923af.pth"
VGG_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
# lpips' VGG wrapper splits torchvision's vgg16.features into five slices by layer index
SLICES = ((1, range(4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)), (5, range(23, 30)))


def default_vgg_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG_FILE


def missing_weights_message(path: Path) -> str:
    return (f"{path}: VGG16 weights for the perceptual loss are missing; fix: download {VGG_URL} "
            f"into {path.parent}/ (or set the recipe's perceptual = \"off\")")


def vgg_features_to_lpips(state: dict) -> dict:
    """Map torchvision vgg16 keys 'features.I.weight' to lpips' 'sliceK.I.weight'."""
    out = {}
    for k, idx in SLICES:
        for i in idx:
            for name in ("weight", "bias"):
                key = f"features.{i}.{name}"
                if key in state:
                    out[f"slice{k}.{i}.{name}"] = state[key].float()
    return out


class Perceptual(nn.Module):
    """LPIPS-VGG distance per image: forward(a, b) with a, b B x 3 x H x W in [0, 1] -> B."""

    def __init__(self, vgg_path: str | Path | None = None):
        super().__init__()
        path = Path(vgg_path) if vgg_path else default_vgg_path()
        if not path.is_file():  # before importing lpips: it pulls in torchvision (seconds) only to be dropped
            raise AssetError(missing_weights_message(path))
        import lpips

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad archive
            raise AssetError(f"{path}: cannot read VGG16 weights ({type(exc).__name__}); fix: download "
                             f"{VGG_URL} again") from None
        mapped = vgg_features_to_lpips(state)
        if len(mapped) != 26:
            raise AssetError(f"{path}: not a torchvision VGG16 state dict (found {len(mapped)} of 26 "
                             f"feature tensors); fix: download {VGG_URL}")
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lpips prints progress; torchvision warns on its old arguments
            self.lpips = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        try:
            self.lpips.net.load_state_dict(mapped, strict=True)
        except RuntimeError:
            raise AssetError(f"{path}: VGG16 tensor shapes do not match; fix: download {VGG_URL}") from None
        self.lpips.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.lpips(a, b, normalize=True).flatten(1).mean(1)


def load_perceptual(mode: str, vgg_path=None) -> tuple[Perceptual | None, str | None]:
    """Build the perceptual term for a recipe mode (off/auto/required).

    Returns (module or None, warning or None); 'required' raises AssetError when it cannot load.
    """
    if mode == "off":
        return None, None
    try:
        return Perceptual(vgg_path), None
    except AssetError as exc:
        if mode == "required":
            raise
        return None, f"perceptual term skipped: {exc}"
