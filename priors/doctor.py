"""`cli.py doctor`: what is installed, what is missing, and how to fix it.

`doctor_items()` only inspects; it prints nothing (the CLI renders the table).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from priors.errors import FlamefitError

__all__ = ["FAN_FILES", "VGG16_FILE", "DoctorItem", "doctor_items", "hub_checkpoints_dir"]

#: face-alignment 1.5.0 downloads these into torch hub's checkpoints folder
FAN_FILES = ("2DFAN4-11f355bf06.pth.tar", "s3fd-619a316812.pth")
FAN_URL = "https://www.adrianbulat.com/downloads/python-fan/"
#: torchvision's VGG16 weights (LPIPS' backbone), same folder
VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/" + VGG16_FILE
FLAME_URL = "https://flame.is.tue.mpg.de"
DECA_URL = "https://github.com/yfeng95/DECA"
INSTALL = "python cli.py assets install"


@dataclass
class DoctorItem:
    """One row of the doctor table. required=False marks optional extras."""

    name: str
    ok: bool
    detail: str
    fix: str
    required: bool = True
    status: str = ""  # a word for the status column instead of ok / missing (e.g. "no match")


def hub_checkpoints_dir() -> Path:
    """torch.hub.get_dir()/checkpoints (honours $TORCH_HOME), where FAN and VGG16 weights go."""
    try:
        import torch

        return Path(torch.hub.get_dir()) / "checkpoints"
    except ImportError:
        base = os.environ.get("TORCH_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
        return Path(base) / "hub" / "checkpoints"


def _load_model(model: str | Path | None):
    """(path, assets) of the model doctor checks, or (None, the AssetError)."""
    from priors.assets import load_model, resolve_model_path

    try:
        path = resolve_model_path(model)
        return path, load_model(path, require_landmarks=False)
    except FlamefitError as exc:
        return None, exc


def _model_items(path, assets) -> list[DoctorItem]:
    from priors.assets import standin_dir

    if isinstance(assets, FlamefitError):
        fix = (f"download FLAME from {FLAME_URL} (FLAME 2023 Open is CC-BY-4.0), then "
               f"`{INSTALL} PATH`")
        return [DoctorItem("model", False, str(assets), fix),
                DoctorItem("landmark embedding", False, "no model loaded", "fix the model first")]
    standin = ""
    try:
        if Path(path).resolve() == standin_dir().resolve():
            standin = " [ICT-FLAME stand-in, not FLAME]"
    except OSError:
        pass
    detail = (f"{path}{standin}: {assets.name}, {assets.n_verts} vertices, {len(assets.faces)} "
              f"faces, n_shape {assets.n_shape}, n_exp {assets.n_exp}, "
              f"sha256 {assets.sha256[:12]}")
    items = [DoctorItem("model", True, detail, "")]
    if assets.landmarks is None:
        items.append(DoctorItem(
            "landmark embedding", False, f"none found for {assets.source}",
            f"copy DECA's data/landmark_embedding.npy next to the model, or "
            f"`{INSTALL} landmark_embedding.npy`"))
    else:
        items.append(DoctorItem("landmark embedding", True,
                                "68 points (51 static + 17 dynamic contour, 79 yaw rows)", ""))
    items.append(_dense_embedding_item(assets))
    return items


def _dense_embedding_item(assets) -> DoctorItem:
    from priors.dense_embedding import find_dense_embedding, load_dense_embedding, model_mesh_hash

    name = "MediaPipe embedding"
    path = find_dense_embedding(assets)
    if path is None:
        return DoctorItem(name, False, f"none cached for mesh {model_mesh_hash(assets)}",
                          "derived automatically (about 15 s) the first time a fit uses MediaPipe's 478 points, "
                          f"or `{INSTALL} EMBEDDING.npz`", required=False)
    try:
        emb = load_dense_embedding(path, assets)
    except FlamefitError as exc:
        return DoctorItem(name, False, str(exc), f"delete {path}; it is derived again on first use", required=False)
    return DoctorItem(name, True, f"{path}: {int(emb.valid.sum())} of 478 points valid", "", required=False)


def _albedo_item(home: Path | None) -> DoctorItem:
    from priors.textures import find_texture_space

    found = find_texture_space(home)
    if found is None:
        return DoctorItem("albedo texture space", False, "not installed",
                          f"get FLAME_texture.npz ({FLAME_URL}) or FLAME_albedo_from_BFM.npz, "
                          f"then `{INSTALL} PATH` (optional: a learned albedo model for fits)",
                          required=False)
    return DoctorItem("albedo texture space", True, str(found), "", required=False)


def _masks_item(home: Path | None) -> DoctorItem:
    from priors.textures import find_masks

    found = find_masks(home)
    if found is None:
        return DoctorItem("FLAME masks", False, "not installed",
                          f"get FLAME_masks.pkl ({FLAME_URL}), then `{INSTALL} FLAME_masks.pkl`",
                          required=False)
    return DoctorItem("FLAME masks", True, str(found), "", required=False)


def _uv_layout_item(home: Path, assets) -> DoctorItem:
    from priors.textures import FLAME_N_VERTS, UV_LAYOUT_FILE, check_uv_layout, find_uv_layout, read_uv_layout

    name = "UV layout"
    found = find_uv_layout(home)
    if found is None:
        return DoctorItem(name, False, f"no {UV_LAYOUT_FILE} installed",
                          f"get DECA's data/{UV_LAYOUT_FILE} (FLAME's UV template, {DECA_URL}), then "
                          f"`{INSTALL} {UV_LAYOUT_FILE}` (textured meshes with FLAME_albedo_from_BFM.npz)",
                          required=False)
    try:
        layout = read_uv_layout(found)
    except FlamefitError as exc:
        return DoctorItem(name, False, str(exc), f"`{INSTALL} {UV_LAYOUT_FILE}` again", required=False)
    detail = f"{found}: {layout.n_verts} vertices, {len(layout.vt)} UVs, {len(layout.ft)} triangles"
    if isinstance(assets, FlamefitError):
        return DoctorItem(name, True, detail + " (no model loaded to compare)", "", required=False)
    why = check_uv_layout(layout, assets.n_verts, assets.faces)
    if why is None:
        return DoctorItem(name, True, f"{detail}; matches the model {assets.name}", "", required=False)
    return DoctorItem(name, False, f"{detail}; does not match the model {assets.name}: {why}",
                      f"it is used with FLAME-topology models ({FLAME_N_VERTS} vertices) only: pick one with "
                      "--model or $FLAMEFIT_MODEL (or install the UV template made for this model)",
                      required=False, status="no match")


def _uv_masks_item(home: Path) -> DoctorItem:
    from priors.textures import UV_MASK_NAMES, find_uv_masks, read_uv_mask

    name = "UV face masks"
    found = find_uv_masks(home)
    if not found:
        return DoctorItem(name, False, f"none of {', '.join(UV_MASK_NAMES)} installed",
                          f"get DECA's data/{UV_MASK_NAMES[0]} or {UV_MASK_NAMES[1]} ({DECA_URL}), then "
                          f"`{INSTALL} {UV_MASK_NAMES[0]}` (checked and kept; the photometric mask does not use "
                          "them yet)", required=False)
    parts = []
    for mask_name, path in found.items():
        try:
            mask = read_uv_mask(path)
        except FlamefitError as exc:
            return DoctorItem(name, False, str(exc), f"`{INSTALL} {mask_name}` again", required=False)
        parts.append(f"{path} ({mask.shape[1]}x{mask.shape[0]}, {mask.mean():.0%} face)")
    return DoctorItem(name, True, "; ".join(parts) + " (checked and kept; the photometric mask uses the "
                      "landmark face polygon)", "", required=False)


def _files_item(name: str, folder: Path, files: tuple[str, ...], fix: str,
                required: bool) -> DoctorItem:
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        return DoctorItem(name, False, f"missing in {folder}: {', '.join(missing)}", fix,
                          required=required)
    return DoctorItem(name, True, f"{folder}: {', '.join(files)}", "", required=required)


def _fan_item() -> DoctorItem:
    folder = hub_checkpoints_dir()
    try:
        importlib.import_module("face_alignment")
    except Exception as exc:
        return DoctorItem("FAN detector", False, f"face_alignment does not import ({exc})",
                          "run `make setup`", required=False)
    fix = (f"run once online (it downloads them), or copy {', '.join(FAN_FILES)} from "
           f"{FAN_URL} into {folder}; else use --detector mediapipe or --landmarks")
    return _files_item("FAN detector weights", folder, FAN_FILES, fix, required=False)


def _mediapipe_item() -> DoctorItem:
    try:
        mp = importlib.import_module("mediapipe")
    except Exception as exc:
        return DoctorItem("mediapipe", False, f"does not import ({type(exc).__name__}: {exc})",
                          "pip install 'mediapipe==0.10.21' (see pyproject's mediapipe extra)",
                          required=False)
    return DoctorItem("mediapipe", True, f"version {getattr(mp, '__version__', '?')}", "",
                      required=False)


def _lpips_item() -> DoctorItem:
    try:
        lp = importlib.import_module("lpips")
    except Exception as exc:
        return DoctorItem("LPIPS", False, f"lpips does not import ({exc})", "run `make setup`",
                          required=False)
    linear = Path(lp.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    if not linear.is_file():
        return DoctorItem("LPIPS", False, f"missing {linear}", "reinstall lpips", required=False)
    folder = hub_checkpoints_dir()
    fix = (f"run once online, or copy {VGG16_URL} into {folder} (needed by recipes with a "
           "perceptual/LPIPS term)")
    item = _files_item("LPIPS / VGG16 weights", folder, (VGG16_FILE,), fix, required=False)
    if item.ok:
        item.detail += f"; linear layers {linear}"
    return item


def _deca_item(home: Path) -> DoctorItem:
    path = home / "deca" / "deca_model.tar"
    if path.is_file():
        return DoctorItem("DECA weights", True, str(path), "", required=False)
    return DoctorItem("DECA weights", False, f"not installed ({path})",
                      f"get deca_model.tar (DECA's release), then `{INSTALL} deca_model.tar`; "
                      "only needed for --init deca", required=False)


def _device_item() -> DoctorItem:
    try:
        import torch
    except ImportError as exc:
        return DoctorItem("device", False, f"torch does not import ({exc})", "run `make setup`")
    if torch.cuda.is_available():
        return DoctorItem("device", True, f"cuda: {torch.cuda.get_device_name(0)} "
                          f"(torch {torch.__version__})", "")
    return DoctorItem("device", True, f"cpu only (torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads)", "")


def doctor_items(model: str | Path | None = None) -> list[DoctorItem]:
    """Check the model (as `resolve_model_path(model)` picks it), landmark embedding, albedo,
    UV layout (and whether it fits the model), UV masks, masks, FAN/mediapipe/LPIPS/DECA weights
    and the compute device."""
    from priors.assets import flamefit_home

    home = flamefit_home()
    path, assets = _load_model(model)
    items = _model_items(path, assets)
    items += [_albedo_item(home), _uv_layout_item(home, assets), _uv_masks_item(home), _masks_item(home),
              _fan_item(), _mediapipe_item(), _lpips_item(), _deca_item(home), _device_item()]
    return items
