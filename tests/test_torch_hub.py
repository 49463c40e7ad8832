"""torch.hub: the repository's hubconf.py, loaded with torch.hub.load(repo_root, name, source="local"), lists and
builds every factory and classifier, with the constructor's keyword arguments passed through."""
import importlib.util
import os

import pytest
import torch

from crate_kernels import CRATEMAE, CRATEClassifier, MaskedAutoencoderViT, ViTClassifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(img_size=16, patch_size=4)


def test_hubconf_lists_every_entry_point():
    spec = importlib.util.spec_from_file_location("hubconf", os.path.join(ROOT, "hubconf.py"))
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert entries == set(hubconf.__all__) == {
        "crate_mae_tiny", "crate_mae_small", "crate_mae_base", "crate_mae_large", "mae_vit_small", "mae_vit_base",
        "crate_classifier", "vit_classifier", "crate_tiny", "crate_small", "crate_base", "crate_large"}
    assert hubconf.dependencies[0] == "torch"


@pytest.mark.parametrize("name, cls, width, depth", [
    ("crate_mae_tiny", CRATEMAE, 384, 12), ("crate_mae_small", CRATEMAE, 576, 12),
    ("mae_vit_small", MaskedAutoencoderViT, 384, 12),
])
def test_torch_hub_load_builds_the_factory_with_its_arguments(name, cls, width, depth):
    model = torch.hub.load(ROOT, name, source="local", **SMALL)
    assert type(model) is cls and model.cls_token.shape[-1] == width and len(model.blocks) == depth
    assert model.patch_embed.img_size == 16 and model.patch_size == 4
    imgs = torch.randn(1, 3, 16, 16)
    loss, pred, mask = model(imgs)
    assert pred.shape == (1, 16, 48) and torch.isfinite(loss)


@pytest.mark.parametrize("name, cls", [("crate_classifier", CRATEClassifier), ("vit_classifier", ViTClassifier)])
def test_torch_hub_load_builds_the_classifiers(name, cls):
    clf = torch.hub.load(ROOT, name, 10, source="local", embed_dim=64, depth=2, num_heads=4, **SMALL)
    assert type(clf) is cls and clf(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_torch_hub_load_builds_supervised_crate():
    model = torch.hub.load(ROOT, "crate_small", 10, source="local", image_size=16, patch_size=4)
    assert type(model).__name__ == "CRATE" and model.cls_token.shape[-1] == 576 and len(model.blocks) == 12
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
