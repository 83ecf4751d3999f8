"""Recipe loading, validation messages and --set overrides."""

import pytest

from fitter.recipe import builtin_names, load_recipe
from priors.errors import RecipeError


def test_builtin_recipes_load():
    assert {"default", "fast", "quality", "identity-set"} <= set(builtin_names())
    for name in builtin_names():
        r = load_recipe(name)
        assert r.stages and r.description
    fast = load_recipe("fast")
    assert not fast.uses("photo") and not fast.uses("perceptual")  # landmarks only
    assert load_recipe("quality").perceptual == "required"


def test_override_sets_a_field():
    r = load_recipe("default", ["stages.photometric.weights.photo=4", "resolution=128"])
    photometric = next(s for s in r.stages if s.name == "photometric")
    assert photometric.weights["photo"] == 4.0 and r.resolution == 128


@pytest.mark.parametrize("override,needle", [
    ("stages.photometric.weights.phot=4", "did you mean 'photo'"),
    ("stages.photometric.weight.photo=4", "did you mean 'weights'"),
    ("stages.landmarks.iterations=many", "'stages.landmarks.iterations' must be int"),
    ("stages.landmarks.weights.landmark=-1", "must be >= 0"),
    ("resolutoin=128", "did you mean 'resolution'"),
    ("perceptual=sometimes", "valid: auto, off, required"),
    ("stages.rigid.params=[\"cam\", \"globl_pose\"]", "did you mean 'global_pose'"),
    ("photometric", "expected KEY=VALUE"),
    ("stages.photometric.resolution=448", "'stages.photometric.resolution' = 448 must lie in 32..128"),
    ("stages.photometric.resolution=16", "must lie in 32..128"),
    ("render_faces=500", "'render_faces' = 500 must be 0 (the model's own mesh) or >= 1000"),
    ("stages.photometric.detector_trust=1.5", "'stages.photometric.detector_trust' = 1.5 must be in (0, 1]"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(RecipeError) as err:
        load_recipe("default", [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_user_file_errors(tmp_path):
    bad = tmp_path / "mine.toml"
    bad.write_text("resolution = 224\n[lr\n")
    with pytest.raises(RecipeError, match="mine.toml: not valid TOML"):
        load_recipe(str(bad))
    bad.write_text('resolution = 224\n[lr]\ncam = 0.01\n[stages.a]\niterations = 3\nparams = ["cam"]\n'
                   '[stages.a.weights]\nlandmark = 1.0\nextra_key = 2\n')
    with pytest.raises(RecipeError, match="unknown loss term 'stages.a.weights.extra_key'"):
        load_recipe(str(bad))
    with pytest.raises(RecipeError, match="unknown recipe 'defualt'.*did you mean 'default'"):
        load_recipe("defualt")


def test_params_need_a_learning_rate(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('[lr]\ncam = 0.01\n[stages.a]\niterations = 3\nparams = ["cam", "shape"]\n')
    with pytest.raises(RecipeError, match="optimises 'shape' but '\\[lr\\]' has no 'shape'"):
        load_recipe(str(f))
