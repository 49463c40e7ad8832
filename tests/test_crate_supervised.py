"""Supervised CRATE (crate_kernels.CRATE): the release's keys and sizes, its numbers in float64 (logits and every
gradient) through each backend, its checkpoint format.

The release's own model/crate.py is compared against when $CRATE_RELEASE_DIR names a checkout of
github.com/Ma-Lab-Berkeley/CRATE (and einops is installed); the release's math, written out here, always is."""
import importlib.util
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import crate_kernels
from crate_kernels import CRATE, load_checkpoint

BACKENDS = ["reference", "torch"] + (["triton", "cuda"] if torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(image_size=(12, 8), patch_size=4, num_classes=5, dim=24, depth=2, heads=3, dim_head=8)


def release_forward(model: CRATE, img: torch.Tensor) -> torch.Tensor:
    """The release's forward written out from its model/crate.py: patches (p1 p2 c), LN, Linear, LN, [CLS] +
    positions, per layer z + softmax(w w^T / sqrt(p)) w then to_out (w = LN(z) U), then
    relu(x + eta (x D - x D^T D) - eta lambda) of LN(.), [CLS] or mean, LN, Linear."""
    p = model.to_patch_embedding
    b, c, h, w = img.shape
    ph, pw = p[0].patch_height, p[0].patch_width
    x = img.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, ph * pw * c)
    x = F.layer_norm(x, x.shape[-1:], p[1].weight, p[1].bias)
    x = F.layer_norm(x @ p[2].weight.T + p[2].bias, (p[2].out_features,), p[3].weight, p[3].bias)
    x = torch.cat((model.cls_token.expand(b, -1, -1), x), dim=1) + model.pos_embedding[:, :x.shape[1] + 1]
    for attn, ista in model.transformer.layers:
        a = attn.fn
        z = F.layer_norm(x, x.shape[-1:], attn.norm.weight, attn.norm.bias)
        wh = (z @ a.qkv.weight.T).reshape(b, -1, a.heads, a.dim_head).transpose(1, 2)
        out = torch.softmax(wh @ wh.transpose(-1, -2) * a.dim_head ** -0.5, dim=-1) @ wh
        out = out.transpose(1, 2).reshape(b, -1, a.heads * a.dim_head)
        x = out @ a.to_out[0].weight.T + a.to_out[0].bias + x
        z = F.layer_norm(x, x.shape[-1:], ista.norm.weight, ista.norm.bias)
        d, eta, lam = ista.fn.weight, ista.fn.step_size, ista.fn.lambd
        x = torch.relu(z + eta * (z @ d - z @ d.T @ d) - eta * lam)
    feature = x.mean(dim=1) if model.pool == "mean" else x[:, 0]
    head = model.mlp_head
    return F.layer_norm(feature, feature.shape[-1:], head[0].weight, head[0].bias) @ head[1].weight.T + head[1].bias


def _release_module():
    root = os.environ.get("CRATE_RELEASE_DIR")
    path = os.path.join(root, "model", "crate.py") if root else None
    if not path or not os.path.isfile(path):
        pytest.skip("set CRATE_RELEASE_DIR to a checkout of github.com/Ma-Lab-Berkeley/CRATE to compare with its file")
    pytest.importorskip("einops", reason="the release's model/crate.py imports einops")
    spec = importlib.util.spec_from_file_location("release_crate", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["release_crate"] = module
    spec.loader.exec_module(module)
    return module


def _grads(model, img, logits_fn):
    model.zero_grad()
    img = img.clone().requires_grad_(True)
    logits = logits_fn(img)
    (logits * torch.randn_like(logits)).sum().backward()
    return logits.detach(), {**{n: p.grad.clone() for n, p in model.named_parameters()}, "img": img.grad}


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_every_gradient_equal_the_release_math_in_float64(backend, pool):
    model = CRATE(**SMALL, pool=pool, backend=backend).double().to(DEVICE)
    img = torch.randn(3, 3, 12, 8, dtype=torch.float64, device=DEVICE)
    seed = int(torch.randint(1 << 30, ()))
    torch.manual_seed(seed)
    got, got_grads = _grads(model, img, model)
    torch.manual_seed(seed)
    want, want_grads = _grads(model, img, lambda x: release_forward(model, x))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == len(list(model.parameters())) + 1
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_keys_and_sizes_are_the_releases():
    model = CRATE(**SMALL)
    layer = ["0.norm.weight", "0.norm.bias", "0.fn.qkv.weight", "0.fn.to_out.0.weight", "0.fn.to_out.0.bias",
             "1.norm.weight", "1.norm.bias", "1.fn.weight"]
    expected = (["pos_embedding", "cls_token"] + [f"to_patch_embedding.{i}.{t}" for i in (1, 2, 3)
                                                 for t in ("weight", "bias")]
                + [f"transformer.layers.{i}.{k}" for i in range(2) for k in layer]
                + ["mlp_head.0.weight", "mlp_head.0.bias", "mlp_head.1.weight", "mlp_head.1.bias"])
    assert list(model.state_dict()) == expected
    ista = model.transformer.layers[1][1].fn
    assert (ista.step_size, ista.lambd) == (0.1, 0.1)  # the release's FeedForward: eta = ista (0.1), lambda = 0.1
    assert "to_out" not in str(CRATE(**{**SMALL, "heads": 1, "dim_head": 24}).transformer.layers[0][0].fn.to_out)
    for name, (dim, depth, heads) in {"crate_tiny": (384, 12, 6), "crate_small": (576, 12, 12),
                                      "crate_base": (768, 12, 12), "crate_large": (1024, 24, 16)}.items():
        with torch.device("meta"):
            model = getattr(crate_kernels, name)(num_classes=1000)
        patch_dim, tokens = 3 * 16 * 16, (224 // 16) ** 2 + 1
        per_layer = 2 * dim + dim * dim + dim * dim + dim + 2 * dim + dim * dim  # LN, qkv, to_out, LN, dictionary
        count = (tokens * dim + dim + 2 * patch_dim + patch_dim * dim + dim + 2 * dim + depth * per_layer
                 + 2 * dim + dim * 1000 + 1000)
        assert sum(p.numel() for p in model.parameters()) == count, name
        assert model.transformer.layers[0][0].fn.heads == heads and len(model.transformer.layers) == depth


def test_the_release_checkpoint_format_loads(tmp_path):
    """main.py's checkpoint: {'state_dict': DDP's 'module.'-prefixed keys, 'optimizer': ..., ...}."""
    source = CRATE(**SMALL)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()},
                "optimizer": torch.optim.AdamW(source.parameters()).state_dict()}, tmp_path / "crate.pth")
    model = CRATE(**SMALL)
    load_checkpoint(model, str(tmp_path / "crate.pth"))
    img = torch.randn(2, 3, 12, 8)
    torch.testing.assert_close(model.eval()(img), source.eval()(img), rtol=0, atol=0)
    with pytest.raises(ValueError, match="img must be"):
        model(torch.randn(2, 3, 8, 12))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_equals_the_releases_model_file_in_float64(pool):
    release = _release_module()
    config = {k: v for k, v in SMALL.items()}
    theirs = release.CRATE(**config, pool=pool).double()
    ours = CRATE(**config, pool=pool).double()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    img = torch.randn(3, 3, 12, 8, dtype=torch.float64)
    seed = int(torch.randint(1 << 30, ()))
    torch.manual_seed(seed)
    got, got_grads = _grads(ours, img, ours)
    torch.manual_seed(seed)
    want, want_grads = _grads(theirs, img, theirs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    for name in ("CRATE_tiny", "CRATE_small", "CRATE_base", "CRATE_large"):
        with torch.device("meta"):
            a, b = getattr(release, name)(num_classes=10), getattr(crate_kernels, name.lower())(num_classes=10)
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert math.isclose(ours.transformer.layers[0][1].fn.lambd, 0.1)


def test_the_white_box_analysis_reads_supervised_crate():
    """Per-layer coding rate and sparsity, and the [CLS] attention maps of the release's segmentation figures."""
    from crate_kernels import analysis

    model = CRATE(**SMALL)
    img = torch.randn(2, 3, 12, 8)
    stats = analysis.coding_rate_and_sparsity(model, img)
    layers = analysis.encoder_activations(model, img)
    assert len(layers) == 2 and layers[0][0].shape == (2, 3, 7, 8) and layers[1][1].shape == (2, 7, 24)
    z = layers[1][1]
    assert torch.equal(z, model.forward_features(img).detach())  # the last layer's output is the features
    assert len(stats["coding_rate"]) == len(stats["sparsity"]) == 2
    assert stats["sparsity"][1] == pytest.approx((z != 0).double().mean().item())  # the non-zero fraction of ISTA
    w = layers[1][0]  # the last layer's MSSA projection: [CLS] row of softmax(w w^T / sqrt(p)), patches on the grid
    cls_row = torch.softmax(w[:, :, :1] @ w.transpose(-1, -2) * 8 ** -0.5, dim=-1)[:, :, 0, 1:]
    torch.testing.assert_close(analysis.attention_maps(model, img), cls_row.reshape(2, 3, 3, 2))
