"""The LPIPS-VGG term loads VGG16 weights from disk only, and says what to do when they are absent."""

import pytest
import torch
import torchvision

from fitter.perceptual import Perceptual, load_perceptual
from priors.errors import AssetError


@pytest.fixture(scope="module")
def fake_vgg(tmp_path_factory):
    """A randomly initialised VGG16 feature stack saved in torchvision's key layout (features only)."""
    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features
    state = {f"features.{k}": v.half() for k, v in features.state_dict().items()}
    path = tmp_path_factory.mktemp("hub") / "vgg16-397923af.pth"
    torch.save(state, path)
    return path, features


def test_loads_weights_into_lpips(fake_vgg):
    path, features = fake_vgg
    module = Perceptual(path)
    loaded = getattr(module.lpips.net.slice3, "10").weight
    torch.testing.assert_close(loaded, features[10].weight.half().float())
    a = torch.rand(2, 3, 64, 64)
    b = a.clone()
    b[1] = torch.rand(3, 64, 64)
    d = module(a, b)
    assert d.shape == (2,) and d[0].abs() < 1e-6 and d[1] > 0
    x = a.clone().requires_grad_(True)
    module(x, b).sum().backward()
    assert x.grad is not None and x.grad[1].abs().sum() > 0


def test_missing_weights(tmp_path):
    missing = tmp_path / "vgg16-397923af.pth"
    with pytest.raises(AssetError, match="vgg16-397923af.pth: VGG16 weights .* missing; fix: download"):
        Perceptual(missing)
    module, warning = load_perceptual("auto", missing)
    assert module is None and "perceptual term skipped" in warning
    assert load_perceptual("off", missing) == (None, None)
    with pytest.raises(AssetError):
        load_perceptual("required", missing)


def test_wrong_file(tmp_path):
    bad = tmp_path / "vgg.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(AssetError, match="vgg.pth: cannot read VGG16 weights"):
        Perceptual(bad)
    torch.save({"other.weight": torch.zeros(3)}, bad)
    with pytest.raises(AssetError, match="not a torchvision VGG16 state dict"):
        Perceptual(bad)


def test_auto_without_weights_imports_no_lpips(tmp_path):
    """'auto' without VGG weights drops the term before importing lpips (which pulls in torchvision
    and torch._dynamo: seconds of start-up for a term that is then skipped)."""
    import subprocess
    import sys

    code = ("import sys; from fitter.perceptual import load_perceptual; "
            f"module, warning = load_perceptual('auto', {str(tmp_path / 'absent.pth')!r}); "
            "assert module is None and 'absent.pth' in warning; "
            "print(sorted(m for m in ('lpips', 'torchvision', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_perceptual_off_drops_the_term_without_a_warning():
    """A recipe whose stages weigh the perceptual term, run with perceptual = "off": the setup drops the
    term and records no warning (it used to put None in fit.json's warnings)."""
    from fitter.fit import make_setup
    from fitter.recipe import load_recipe
    from priors.flame import FlameModel
    from tests.synthetic import synthetic_assets

    recipe = load_recipe("quality", ["perceptual=off"])
    assert recipe.uses("perceptual")
    setup = make_setup(FlameModel(synthetic_assets()), recipe)
    assert setup.warnings == [] and not setup.recipe.uses("perceptual") and "perceptual" not in setup.extra


def test_a_term_only_in_stages_set_to_no_iterations_loads_nothing(tmp_path, monkeypatch):
    """quality requires VGG for its photometric stage; with that stage set to 0 iterations the term is
    never evaluated, so a setup without the weights must not fail (it used to raise AssetError)."""
    from fitter.fit import make_setup
    from fitter.recipe import load_recipe
    from priors.flame import FlameModel
    from tests.synthetic import synthetic_assets

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no VGG weights here
    model = FlameModel(synthetic_assets())
    with pytest.raises(AssetError):
        make_setup(model, load_recipe("quality"))
    recipe = load_recipe("quality", ["stages.photometric.iterations=0"])
    assert not recipe.uses("perceptual") and recipe.uses("landmark")
    setup = make_setup(model, recipe)
    assert "perceptual" not in setup.extra and setup.warnings == []
