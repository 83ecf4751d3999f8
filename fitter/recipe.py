"""Recipes: the TOML files that say which loss terms, weights, stages and learning rates a fit uses.

A recipe is validated once, here, into plain dataclasses; nothing downstream parses strings.
Layout (see recipes/default.toml):

    description = "..."
    resolution = 224            # crop size in pixels
    perceptual = "auto"         # off | auto (skip with a warning if VGG weights are absent) | required
    camera = "pinhole"          # pinhole (default) | ortho (weak perspective, as DECA)
    detector_trust = 0.1        # landmark terms of detected points weigh this much (given points: 1)
    render_faces = 12000        # stages moving the head render ~this many triangles (default 0: the whole mesh)
    [lr]                        # Adam learning rate per parameter group
    cam = 0.01 ...
    [stages.NAME]               # stages run in file order
    iterations = 100
    params = ["cam", "global_pose"]
    lr_scale = 1.0
    patience = 30               # early stop: iterations without relative improvement > tol
    tol = 1e-4
    solver = "adam"             # adam | lm (Levenberg-Marquardt, for least-squares terms: landmark stages)
    resolution = 112            # optional: this stage renders the crop smaller (coarse-to-fine)
    [stages.NAME.weights]
    landmark = 1.0 ...
"""

from __future__ import annotations

import copy
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from priors.errors import RecipeError

from .params import FitParams


def _recipe_dir() -> Path:
    """The built-in recipes: `fitter/recipes/` inside an installed wheel (pyproject maps the top-level
    `recipes/` there), else the repository's top-level `recipes/`."""
    here = Path(__file__).resolve().parent
    packaged = here / "recipes"
    return packaged if packaged.is_dir() else here.parent / "recipes"


RECIPE_DIR = _recipe_dir()
PERCEPTUAL_MODES = ("off", "auto", "required")
SHAPE_MODES = ("shared", "consistency")

TOP_KEYS = {
    "description": str, "resolution": int, "perceptual": str, "lr": dict, "stages": dict,
    "landmark_weights": dict, "shape_mode": str, "consistency_margin": float, "camera": str,
    "detector_trust": float, "render_faces": int,
    "track": dict,  # options of `track` (keyframes, focal, landmark filter), checked by fitter.track
}
CAMERAS = ("pinhole", "ortho")
STAGE_KEYS = {"iterations": int, "params": list, "weights": dict, "lr_scale": float,
              "patience": int, "tol": float, "solver": str, "resolution": int, "detector_trust": float}
SOLVERS = ("adam", "lm")
LANDMARK_REGIONS = ("contour", "brows", "nose", "eyes", "mouth")


@dataclass
class Stage:
    name: str
    iterations: int
    params: list[str]
    weights: dict[str, float]
    lr_scale: float = 1.0
    patience: int = 0  # 0: no early stop
    tol: float = 1e-4
    solver: str = "adam"  # adam | lm (Levenberg-Marquardt: every term needs a least-squares form)
    resolution: int | None = None  # render and compare at this crop size (<= the recipe's): coarse-to-fine
    detector_trust: float | None = None  # this stage's weight of detected landmarks (None: the recipe's)


@dataclass
class Recipe:
    name: str
    source: str
    description: str
    resolution: int
    perceptual: str
    lr: dict[str, float]
    stages: list[Stage]
    landmark_weights: dict[str, float] = field(default_factory=dict)
    shape_mode: str = "shared"
    consistency_margin: float = 0.5
    detector_trust: float = 1.0  # weight of detected landmarks' terms relative to given ones (priors count more)
    camera: str = "pinhole"  # pinhole (focal from EXIF or the default field of view) | ortho (weak perspective)
    render_faces: int = 0  # > 0: stages that move the geometry render the mesh decimated to about this many triangles
    raw: dict = field(default_factory=dict, repr=False)

    def uses(self, term: str) -> bool:
        """Whether a stage that runs weighs the term (a stage set to 0 iterations loads nothing for it)."""
        return any(s.iterations > 0 and s.weights.get(term, 0.0) > 0 for s in self.stages)

    @property
    def total_iterations(self) -> int:
        return sum(s.iterations for s in self.stages)


# ----------------------------------------------------------------------------- helpers
def _suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{hint}; valid: {', '.join(sorted(choices))}"


def _check_type(value, expected, where: str, src: str):
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, expected):
        raise RecipeError(f"{src}: '{where}' must be {expected.__name__}, got {type(value).__name__} "
                          f"{value!r}")
    return value


def _check_keys(table: dict, allowed, where: str, src: str):
    for key in table:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise RecipeError(f"{src}: unknown key '{prefix}{key}'{_suggest(key, allowed)}")


def known_terms() -> set[str]:
    from .losses import TERMS  # late import: losses imports torch-heavy code

    return set(TERMS)


# ----------------------------------------------------------------------------- parsing
def parse_recipe(data: dict, name: str, source: str) -> Recipe:
    """Validate a recipe table (as read from TOML) into a Recipe; RecipeError names the key."""
    src = source
    _check_keys(data, TOP_KEYS, "", src)
    for key, typ in TOP_KEYS.items():
        if key in data:
            data[key] = _check_type(data[key], typ, key, src)
    for key in ("lr", "stages"):
        if key not in data:
            raise RecipeError(f"{src}: missing table '[{key}]'; fix: copy it from recipes/default.toml")
    perceptual = data.get("perceptual", "auto")
    if perceptual not in PERCEPTUAL_MODES:
        raise RecipeError(f"{src}: 'perceptual' = {perceptual!r}{_suggest(perceptual, PERCEPTUAL_MODES)}")
    detector_trust = data.get("detector_trust", 1.0)
    if not 0 < detector_trust <= 1:
        raise RecipeError(f"{src}: 'detector_trust' = {detector_trust} must be in (0, 1]")
    camera = data.get("camera", "pinhole")
    if camera not in CAMERAS:
        raise RecipeError(f"{src}: 'camera' = {camera!r}{_suggest(camera, CAMERAS)}")
    shape_mode = data.get("shape_mode", "shared")
    if shape_mode not in SHAPE_MODES:
        raise RecipeError(f"{src}: 'shape_mode' = {shape_mode!r}{_suggest(shape_mode, SHAPE_MODES)}")
    render_faces = data.get("render_faces", 0)
    if render_faces != 0 and render_faces < 1000:
        raise RecipeError(f"{src}: 'render_faces' = {render_faces} must be 0 (the model's own mesh) or >= 1000")
    resolution = data.get("resolution", 224)
    if not 32 <= resolution <= 1024:
        raise RecipeError(f"{src}: 'resolution' = {resolution} is outside 32..1024")
    names = FitParams.names()
    lr = {}
    _check_keys(data["lr"], names, "lr", src)
    for key, value in data["lr"].items():
        lr[key] = _check_type(value, float, f"lr.{key}", src)
        if lr[key] < 0:
            raise RecipeError(f"{src}: 'lr.{key}' = {value} must be >= 0")
    lmk_w = {}
    _check_keys(data.get("landmark_weights", {}), LANDMARK_REGIONS, "landmark_weights", src)
    for key, value in data.get("landmark_weights", {}).items():
        lmk_w[key] = _check_type(value, float, f"landmark_weights.{key}", src)
        if lmk_w[key] < 0:
            raise RecipeError(f"{src}: 'landmark_weights.{key}' = {value} must be >= 0")
    terms = known_terms()
    stages = []
    if not data["stages"]:
        raise RecipeError(f"{src}: '[stages]' is empty; fix: add at least one [stages.NAME] table")
    for sname, table in data["stages"].items():
        where = f"stages.{sname}"
        if not isinstance(table, dict):
            raise RecipeError(f"{src}: '{where}' must be a table")
        _check_keys(table, STAGE_KEYS, where, src)
        for key, typ in STAGE_KEYS.items():
            if key in table:
                table[key] = _check_type(table[key], typ, f"{where}.{key}", src)
        if "iterations" not in table or "params" not in table:
            raise RecipeError(f"{src}: '{where}' needs 'iterations' and 'params'")
        if table["iterations"] < 0:
            raise RecipeError(f"{src}: '{where}.iterations' must be >= 0")
        for p in table["params"]:
            if p not in names:
                raise RecipeError(f"{src}: '{where}.params' has unknown parameter {p!r}{_suggest(str(p), names)}")
            if p not in lr:
                raise RecipeError(f"{src}: '{where}.params' optimises {p!r} but '[lr]' has no '{p}'")
        weights = {}
        for term, w in table.get("weights", {}).items():
            if term not in terms:
                raise RecipeError(f"{src}: unknown loss term '{where}.weights.{term}'{_suggest(term, terms)}")
            weights[term] = _check_type(w, float, f"{where}.weights.{term}", src)
            if weights[term] < 0:
                raise RecipeError(f"{src}: '{where}.weights.{term}' = {w} must be >= 0")
        lr_scale = table.get("lr_scale", 1.0)
        if lr_scale <= 0:
            raise RecipeError(f"{src}: '{where}.lr_scale' must be > 0")
        solver = table.get("solver", "adam")
        if solver not in SOLVERS:
            raise RecipeError(f"{src}: '{where}.solver' = {solver!r}{_suggest(solver, SOLVERS)}")
        if solver == "lm":
            from .losses import TERMS

            smooth = [t for t in weights if weights[t] > 0 and TERMS[t].residual is None]
            if smooth:
                raise RecipeError(f"{src}: '{where}' uses solver 'lm' but term '{smooth[0]}' has no least-squares "
                                  "form; fix: set solver = \"adam\" for this stage or drop the term")
        stage_res = table.get("resolution")
        if stage_res is not None and not 32 <= stage_res <= resolution:
            raise RecipeError(f"{src}: '{where}.resolution' = {stage_res} must lie in 32..{resolution} (the "
                              "recipe's resolution: a stage renders the crop at that size or smaller)")
        stage_trust = table.get("detector_trust")
        if stage_trust is not None and not 0 < stage_trust <= 1:
            raise RecipeError(f"{src}: '{where}.detector_trust' = {stage_trust} must be in (0, 1]")
        stages.append(Stage(sname, table["iterations"], list(table["params"]), weights, lr_scale,
                            table.get("patience", 0), table.get("tol", 1e-4), solver, stage_res, stage_trust))
    return Recipe(name, source, data.get("description", ""), resolution, perceptual, lr, stages, lmk_w,
                  shape_mode, data.get("consistency_margin", 0.5), detector_trust=detector_trust, camera=camera,
                  render_faces=render_faces, raw=data)


def _coerce(text: str):
    """A --set value: TOML syntax (numbers, true/false, "strings", [lists]); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict, assignment: str, src: str) -> None:
    """Apply one 'a.b.c=value' override in place; the key path must already exist up to its parent."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected KEY=VALUE, e.g. stages.photometric.weights.photo=4")
    path, text = assignment.split("=", 1)
    keys = path.strip().split(".")
    table = data
    for i, key in enumerate(keys[:-1]):
        if key not in table or not isinstance(table[key], dict):
            choices = [k for k, v in table.items() if isinstance(v, dict)]
            where = ".".join(keys[: i + 1])
            raise RecipeError(f"--set {path}: no table '{where}' in {src}{_suggest(key, choices)}")
        table = table[key]
    table[keys[-1]] = _coerce(text.strip())


def recipe_path(name_or_path: str) -> Path:
    """A built-in recipe name or a path to a .toml file."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise RecipeError(f"{p}: recipe file not found; fix: give an existing .toml or a built-in name "
                              f"({', '.join(builtin_names())})")
        return p
    builtin = RECIPE_DIR / f"{name_or_path}.toml"
    if not builtin.is_file():
        raise RecipeError(f"unknown recipe '{name_or_path}'{_suggest(name_or_path, builtin_names())}")
    return builtin


def builtin_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def load_recipe(name_or_path: str = "default", overrides: list[str] | tuple = ()) -> Recipe:
    """Read, override and validate a recipe."""
    path = recipe_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc}); fix the syntax") from None
    data = copy.deepcopy(data)
    for assignment in overrides:
        apply_override(data, assignment, str(path))
    return parse_recipe(data, path.stem, str(path))
