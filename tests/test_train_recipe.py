"""Training recipe: lr schedule, AdamW parameter groups, the release's unused parameters, AMP choice."""
import math

import pytest
import torch

from crate_kernels import CRATEMAE
from crate_kernels.pipeline.run import amp_dtype, lr_at
from crate_kernels.train.trainer import freeze_unused, param_groups


def test_lr_schedule_warmup_then_half_cosine():
    base, low, warm, total = 1e-3, 1e-5, 10, 110
    assert lr_at(0, base, low, warm, total) == 0.0
    assert lr_at(5, base, low, warm, total) == pytest.approx(base / 2)
    assert lr_at(10, base, low, warm, total) == pytest.approx(base)
    assert lr_at(60, base, low, warm, total) == pytest.approx(low + (base - low) * 0.5)
    assert lr_at(85, base, low, warm, total) == pytest.approx(low + (base - low) * 0.5 * (1 + math.cos(0.75 * math.pi)))
    assert lr_at(110, base, low, warm, total) == pytest.approx(low)
    values = [lr_at(s, base, low, warm, total) for s in range(total)]
    assert all(a < b for a, b in zip(values[:warm], values[1:warm + 1]))
    assert all(a >= b for a, b in zip(values[warm:], values[warm + 1:]))
    assert lr_at(0, base, low, 0, total) == pytest.approx(base)  # no warmup


def test_weight_decay_groups():
    model = CRATEMAE(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    freeze_unused(model)
    no_decay, decay = param_groups(model, 0.05)
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.05)
    names_nd, names_d = set(no_decay["param_names"]), set(decay["param_names"])
    assert {"cls_token", "mask_token", "norm.weight", "norm.bias", "decoder_pred.bias",
            "patch_embed.proj.bias", "blocks.0.layers.0.0.norm.weight"} <= names_nd
    assert {"patch_embed.proj.weight", "decoder_pred.weight", "blocks.0.layers.0.0.fn.qkv.weight",
            "blocks.0.layers.0.1.fn.weight", "decoder_blocks.1.layers.0.0.fn.weight"} <= names_d
    assert all(p.ndim >= 2 for p in decay["params"])
    frozen = {"pos_embed", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias"}
    assert not (names_nd | names_d) & frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names_nd | names_d == trainable
    assert frozen <= set(model.state_dict())  # kept in checkpoints


def test_frozen_parameters_are_exactly_the_ones_without_gradient():
    model = CRATEMAE(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    freeze_unused(model)
    model(torch.randn(2, 3, 16, 16))[0].backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


def test_amp_choice():
    assert amp_dtype("auto", torch.device("cpu")) is None
    assert amp_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert amp_dtype("off", torch.device("cpu")) is None
    if torch.cuda.is_available():
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert amp_dtype("auto", torch.device("cuda")) is expected
