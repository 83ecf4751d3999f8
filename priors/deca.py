"""DECA's coarse encoder as a warm start for a fit (`--init deca`).

DECA (Feng et al. 2021, https://github.com/yfeng95/DECA) regresses FLAME parameters from a
224 x 224 face crop with a ResNet-50 and a two-layer MLP. Its weights (`deca_model.tar`)
are not bundled: users download them from DECA's README and run
`python cli.py assets install deca_model.tar`, which copies them to
`<FLAMEFIT_HOME>/deca/deca_model.tar`.

The encoder's 236 outputs are, in order: shape 100, tex 50, exp 50, pose 6 (global 3 + jaw 3,
axis-angle), cam 3 (s, tx, ty), light 27 (9 SH coefficients x RGB).

Conventions, checked against DECA's renderer and ours:
- cam: DECA projects with ndc = s * (xy + t), y up, ndc in [-1, 1] spanning the crop; this is
  exactly `fitter.camera.ortho_project`, so cam is copied as-is (it is relative to the crop
  given to the encoder, so that crop must be the fit's crop, only resized).
- light: DECA shades with the SH basis [1, x, y, z, xy, xz, yz, x^2 - y^2, 3z^2 - 1] times the
  same nine constant factors as `fitter.shading.SH_CONSTANTS`, evaluated at the normals of the
  posed FLAME vertices in model space (y up, +z towards the camera, outward normals from
  FLAME's face winding), before its camera flips y and z for the rasterizer. Ours shades the
  same normals in the same space, so the 9 x 3 light is copied as-is (channels RGB, as DECA's
  input images are RGB).
- images: RGB in [0, 1], not ImageNet-normalised (DECA feeds them to the ResNet directly).
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from priors.assets import flamefit_home, load_model, resolve_model_path
from priors.errors import AssetError, UsageError

if TYPE_CHECKING:  # priors does not depend on fitter at run time
    from fitter.params import FitParams

#: the encoder's output blocks, in order, with their sizes
DECA_SPLIT: tuple[tuple[str, int], ...] = (
    ("shape", 100), ("tex", 50), ("exp", 50), ("pose", 6), ("cam", 3), ("light", 27),
)
DECA_CODE_SIZE = sum(n for _, n in DECA_SPLIT)  # 236
DECA_INPUT_SIZE = 224
FLAME_N_VERTS = 5023
DECA_URL = "https://github.com/yfeng95/DECA"
FLAME_URL = "https://flame.is.tue.mpg.de"
_FEATURES = 2048  # ResNet-50 after global average pooling

_FIX_REDOWNLOAD = (f"fix: download deca_model.tar again via DECA's README ({DECA_URL}) and run "
                   "`python cli.py assets install deca_model.tar`")


def default_deca_path() -> Path:
    """Where `cli.py assets install deca_model.tar` puts the weights:
    `<FLAMEFIT_HOME>/deca/deca_model.tar`."""
    return flamefit_home() / "deca" / "deca_model.tar"


# ------------------------------------------------------------------------------ network
class DecaEncoder(nn.Module):
    """ResNet-50 (torchvision layout, no fc, global average pool -> 2048) -> Linear(2048, 1024)
    -> ReLU -> Linear(1024, 236). State-dict keys: `encoder.<resnet keys>`, `layers.0.*`,
    `layers.2.*`, as DECA's E_flame."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torchvision.models.resnet50(weights=None)  # random init, no download
        self.encoder.fc = nn.Identity()
        self.layers = nn.Sequential(
            nn.Linear(_FEATURES, 1024), nn.ReLU(), nn.Linear(1024, DECA_CODE_SIZE)
        )

    def code(self, images: Tensor) -> Tensor:
        """images B x 3 x 224 x 224 (RGB in [0, 1]) -> raw code B x 236."""
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, DECA_INPUT_SIZE, DECA_INPUT_SIZE):
            raise ValueError(f"DecaEncoder takes B x 3 x {DECA_INPUT_SIZE} x {DECA_INPUT_SIZE} "
                             f"images, got {tuple(images.shape)}; use prepare_crops first")
        return self.layers(self.encoder(images))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """images B x 3 x 224 x 224 -> dict shape B x 100, tex B x 50, exp B x 50, pose B x 6,
        cam B x 3, light B x 9 x 3."""
        return split_code(self.code(images))


def split_code(code: Tensor) -> dict[str, Tensor]:
    """Raw code B x 236 -> the named blocks of DECA_SPLIT (light reshaped to B x 9 x 3)."""
    if code.dim() != 2 or code.shape[1] != DECA_CODE_SIZE:
        raise ValueError(f"a DECA code is B x {DECA_CODE_SIZE}, got {tuple(code.shape)}")
    sizes = [n for _, n in DECA_SPLIT]
    out = dict(zip((name for name, _ in DECA_SPLIT), torch.split(code, sizes, dim=1), strict=True))
    out["light"] = out["light"].reshape(-1, 9, 3)
    return out


def prepare_crops(crops: Tensor) -> Tensor:
    """Square crops B x 3 x S x S (RGB in [0, 1]) -> B x 3 x 224 x 224 (antialiased resize)."""
    if crops.dim() != 4 or crops.shape[1] != 3 or crops.shape[2] != crops.shape[3]:
        raise ValueError(f"crops must be B x 3 x S x S, got {tuple(crops.shape)}")
    crops = crops.float()
    if crops.shape[2] == DECA_INPUT_SIZE:
        return crops
    return F.interpolate(crops, size=(DECA_INPUT_SIZE, DECA_INPUT_SIZE), mode="bilinear",
                         align_corners=False, antialias=True)


# ------------------------------------------------------------------------------ loading
def _missing_weights(path: Path) -> AssetError:
    return AssetError(
        f"{path}: DECA weights not found (deca_model.tar is not bundled with flamefit); fix: "
        f"download deca_model.tar via the link in DECA's README ({DECA_URL}; it asks you to "
        f"register for FLAME at {FLAME_URL} first), then run "
        f"`python cli.py assets install deca_model.tar` (copies it to {default_deca_path()}), "
        "or use --init zero"
    )


def _read_checkpoint(path: Path) -> object:
    """torch.load with weights_only (tensors and plain containers only); AssetError otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True,
                              mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise AssetError(f"{path}: refused to load: the file holds pickled objects other than "
                             "tensors and plain containers (loading them could run code); "
                             f"{_FIX_REDOWNLOAD}") from None
        raise _unreadable(path, exc) from None
    except Exception as exc:  # torch raises many types for a corrupt file
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: BaseException) -> AssetError:
    detail = str(exc).splitlines()[0][:120] if str(exc) else ""
    return AssetError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {detail}); "
                      f"{_FIX_REDOWNLOAD}")


def _encoder_state(obj: object, path: Path) -> dict[str, Tensor]:
    """E_flame's state dict from a DECA checkpoint (or a bare E_flame state dict), with any
    DataParallel `module.` prefix removed."""
    if not isinstance(obj, dict):
        raise AssetError(f"{path}: holds a {type(obj).__name__}, expected a dict with key "
                         f"'E_flame'; {_FIX_REDOWNLOAD}")
    state = obj.get("E_flame", obj)
    if not isinstance(state, dict):
        raise AssetError(f"{path}: key 'E_flame' holds a {type(state).__name__}, expected a "
                         f"state dict; {_FIX_REDOWNLOAD}")
    state = {(k[len("module."):] if isinstance(k, str) and k.startswith("module.") else k): v
             for k, v in state.items()}
    if "E_flame" not in obj and "layers.0.weight" not in state:
        have = ", ".join(sorted(map(str, obj)))[:160]
        raise AssetError(f"{path}: key 'E_flame' is missing (the file has: {have}); "
                         f"{_FIX_REDOWNLOAD}")
    return state


def _check_state(state: dict, reference: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Every reference key present with the right shape and finite values (a missing BatchNorm
    `num_batches_tracked` counter, absent from old checkpoints, is taken from the reference)."""
    extra = sorted(str(k) for k in state if k not in reference)
    if extra:
        raise AssetError(f"{path}: key 'E_flame.{extra[0]}' is not part of DECA's encoder "
                         f"({len(extra)} unexpected keys); {_FIX_REDOWNLOAD}")
    out = {}
    for key, ref in reference.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):
                out[key] = ref
                continue
            raise AssetError(f"{path}: key 'E_flame.{key}' is missing; {_FIX_REDOWNLOAD}")
        value = state[key]
        if not isinstance(value, Tensor) or tuple(value.shape) != tuple(ref.shape):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise AssetError(f"{path}: key 'E_flame.{key}' has shape {got}, expected "
                             f"{tuple(ref.shape)}; {_FIX_REDOWNLOAD}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise AssetError(f"{path}: key 'E_flame.{key}' holds NaN or infinite values; "
                             f"{_FIX_REDOWNLOAD}")
        out[key] = value
    return out


def load_deca_encoder(path: str | Path | None = None, device: str | torch.device = "cpu"
                      ) -> DecaEncoder:
    """DECA's coarse encoder from `deca_model.tar` (default: `default_deca_path()`), in eval mode.

    Accepts DECA's checkpoint (a dict whose 'E_flame' is the encoder's state dict) or a bare
    E_flame state dict, with or without a `module.` key prefix. Raises AssetError for a missing,
    unreadable, unsafe (non-tensor pickle) or mismatched file, naming the file and key.
    """
    path = Path(path).expanduser() if path is not None else default_deca_path()
    if not path.is_file():
        raise _missing_weights(path)
    state = _encoder_state(_read_checkpoint(path), path)
    encoder = DecaEncoder()
    encoder.load_state_dict(_check_state(state, encoder.state_dict(), path), strict=True)
    return encoder.to(device).eval()


# ------------------------------------------------------------------------ compatibility
def require_flame_topology(model) -> None:
    """UsageError unless `model` (anything with n_verts and a name) has FLAME's 5023 vertices:
    DECA's codes only mean something for FLAME's own mesh and shape space."""
    n_verts = int(model.n_verts)
    if n_verts != FLAME_N_VERTS:
        name = getattr(model, "name", "?")
        raise UsageError(
            f"--init deca needs the FLAME model ({FLAME_N_VERTS} vertices, FLAME's shape space); "
            f"the model in use '{name}' has {n_verts} vertices; fix: install FLAME with "
            "`cli.py assets install` or use --init zero"
        )


def require_deca_compatible(model_path: str | Path | None = None,
                            deca_path: str | Path | None = None) -> Path:
    """For the CLI, before any image is read: resolve and load the model (`--model` or the
    default), check it is FLAME (UsageError) and that the DECA weights file exists (AssetError).
    Returns the weights' path (contents are validated by `load_deca_encoder`)."""
    assets = load_model(resolve_model_path(model_path), require_landmarks=False)
    require_flame_topology(assets)
    path = Path(deca_path).expanduser() if deca_path is not None else default_deca_path()
    if not path.is_file():
        raise _missing_weights(path)
    return path


# ------------------------------------------------------------------------------ warm start
def _fit_width(x: Tensor, n: int) -> Tensor:
    """B x K -> B x n: truncated, or zero-padded on the right."""
    if x.shape[1] >= n:
        return x[:, :n]
    return F.pad(x, (0, n - x.shape[1]))


def _albedo_from_tex(base_albedo: Tensor, tex: Tensor) -> Tensor:
    """Texture-space coefficients B x n_tex: the first min(50, n_tex) replaced by DECA's tex;
    per-vertex albedo B x V x 3 is returned unchanged (a copy)."""
    albedo = base_albedo.clone()
    if albedo.dim() == 2:
        k = min(tex.shape[1], albedo.shape[1])
        albedo[:, :k] = tex[:, :k]
    return albedo


def deca_initial_params(encoder: DecaEncoder, crops: Tensor, model, base: FitParams, *,
                        use_tex: bool = True) -> FitParams:
    """Initial FitParams from DECA's encoder.

    encoder: a DecaEncoder (any device); crops B x 3 x S x S, RGB in [0, 1], the fit's square
    crops (S = 224, or resized to it); model: n_verts, n_shape, n_exp (FLAME topology
    required); base: FitParams batch B (the fit's usual start) giving every field not set here.
    Returns a copy of `base` with shape / exp (zero-padded or truncated to n_shape / n_exp),
    global_pose = pose[:, :3], jaw_pose = pose[:, 3:], cam and light (both already in our
    convention), and, when base.albedo is B x n_tex texture coefficients and `use_tex`, its
    first min(50, n_tex) set to DECA's tex. DECA's tex codes belong to the BFM-derived albedo
    space (FLAME_albedo_from_BFM.npz): pass use_tex=False for any other texture space.
    neck_pose and eye_pose stay as in `base` (DECA assumes zeros).
    """
    require_flame_topology(model)
    if crops.shape[0] != base.batch:
        raise ValueError(f"{crops.shape[0]} crops for a batch of {base.batch} parameters")
    device = next(encoder.parameters()).device
    with torch.no_grad():
        code = encoder(prepare_crops(crops.to(device)))
    ref = base.shape
    code = {k: v.detach().to(device=ref.device, dtype=ref.dtype) for k, v in code.items()}
    params = base.detach()
    params.shape = _fit_width(code["shape"], int(model.n_shape)).clone()
    params.exp = _fit_width(code["exp"], int(model.n_exp)).clone()
    params.global_pose = code["pose"][:, :3].clone()
    params.jaw_pose = code["pose"][:, 3:].clone()
    params.cam = code["cam"].clone()
    params.light = code["light"].clone()  # same SH basis, constants and normals: no conversion
    if use_tex:
        params.albedo = _albedo_from_tex(params.albedo, code["tex"])
    return params
