"""ViT-MAE baselines: the paper's parameter counts, FAIR's state_dict keys, FAIR's forward (checked against an
independent re-computation from the state_dict), visible-only encoder, FAIR checkpoints, --model in train."""
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import crate_kernels
import crate_kernels.models.pretrained
import crate_kernels.models.registry
from crate_kernels import MaskedAutoencoderViT, load_checkpoint, whitebox
from crate_kernels.errors import TrainError
from crate_kernels.models.pretrained import load_pretrained
from crate_kernels.train import load_run
from crate_kernels.train import main as train_main

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, decoder_embed_dim=24, decoder_depth=2,
            decoder_num_heads=3)


@pytest.mark.parametrize("name, with_bias, without_bias", [
    ("mae_vit_small", 47_578_240, 47_552_128),
    ("mae_vit_base", 143_836_416, 143_790_336),
])
def test_parameter_counts_are_the_papers(name, with_bias, without_bias):
    """47.6M and 143.8M (the paper's ViT-MAE-S and -B), counted on the meta device without initialising."""
    for qkv_bias, count in ((True, with_bias), (False, without_bias)):
        with torch.device("meta"), mock.patch.object(MaskedAutoencoderViT, "_init_weights"):
            model = getattr(crate_kernels, name)(qkv_bias=qkv_bias)
        assert sum(p.numel() for p in model.parameters()) == count


def fair_keys(depth, decoder_depth):
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
            "decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed", "decoder_norm.weight",
            "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"]
    for prefix, count in (("blocks", depth), ("decoder_blocks", decoder_depth)):
        for i in range(count):
            keys += [f"{prefix}.{i}.{name}.{p}" for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1",
                                                             "mlp.fc2") for p in ("weight", "bias")]
    return sorted(keys)


def test_state_dict_keys_are_fairs():
    model = MaskedAutoencoderViT(**TINY)
    assert sorted(model.state_dict()) == fair_keys(2, 2)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))


def _block(x, s, prefix, heads):
    """timm's pre-norm block from the state_dict, attention by an explicit softmax."""
    d = x.shape[-1]
    h = F.layer_norm(x, (d,), s[f"{prefix}.norm1.weight"], s[f"{prefix}.norm1.bias"], eps=1e-6)
    qkv = h @ s[f"{prefix}.attn.qkv.weight"].T + s[f"{prefix}.attn.qkv.bias"]
    b, n, _ = x.shape
    q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, n, d)
    x = x + out @ s[f"{prefix}.attn.proj.weight"].T + s[f"{prefix}.attn.proj.bias"]
    h = F.layer_norm(x, (d,), s[f"{prefix}.norm2.weight"], s[f"{prefix}.norm2.bias"], eps=1e-6)
    h = F.gelu(h @ s[f"{prefix}.mlp.fc1.weight"].T + s[f"{prefix}.mlp.fc1.bias"])
    return x + h @ s[f"{prefix}.mlp.fc2.weight"].T + s[f"{prefix}.mlp.fc2.bias"]


def fair_forward(s, imgs, mask_ratio, noise, cfg):
    """FAIR's models_mae forward, re-computed from the state_dict alone."""
    p, d, dd = cfg["patch_size"], cfg["embed_dim"], cfg["decoder_embed_dim"]
    b = imgs.shape[0]
    x = F.conv2d(imgs, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    x = x + s["pos_embed"][:, 1:]
    n = x.shape[1]
    keep = int(n * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].repeat(1, 1, d))
    mask = torch.ones(b, n, dtype=imgs.dtype)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    x = torch.cat([(s["cls_token"] + s["pos_embed"][:, :1]).expand(b, -1, -1), x], dim=1)
    for i in range(cfg["depth"]):
        x = _block(x, s, f"blocks.{i}", cfg["num_heads"])
    x = F.layer_norm(x, (d,), s["norm.weight"], s["norm.bias"], eps=1e-6)
    latent_len = x.shape[1]
    x = x @ s["decoder_embed.weight"].T + s["decoder_embed.bias"]
    tokens = torch.cat([x[:, 1:], s["mask_token"].repeat(b, n + 1 - x.shape[1], 1)], dim=1)
    tokens = torch.gather(tokens, 1, ids_restore[..., None].repeat(1, 1, dd))
    x = torch.cat([x[:, :1], tokens], dim=1) + s["decoder_pos_embed"]
    for i in range(cfg["decoder_depth"]):
        x = _block(x, s, f"decoder_blocks.{i}", cfg["decoder_num_heads"])
    x = F.layer_norm(x, (dd,), s["decoder_norm.weight"], s["decoder_norm.bias"], eps=1e-6)
    pred = (x @ s["decoder_pred.weight"].T + s["decoder_pred.bias"])[:, 1:]
    g = imgs.shape[-1] // p
    target = torch.einsum("nchpwq->nhwpqc", imgs.reshape(b, 3, g, p, g, p)).reshape(b, g * g, p * p * 3)
    loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    return loss, pred, mask, latent_len


def test_forward_is_fairs_with_visible_patches_only_in_the_encoder():
    model = MaskedAutoencoderViT(**TINY).double()
    with torch.no_grad():
        for p in model.parameters():  # away from the init's zero biases and unit norms
            p.add_(0.1 * torch.randn_like(p))
    imgs = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    noise = torch.rand(3, 16, dtype=torch.float64)
    loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
    want_loss, want_pred, want_mask, latent_len = fair_forward(model.state_dict(), imgs, 0.75, noise, TINY)
    torch.testing.assert_close(pred, want_pred)
    torch.testing.assert_close(loss, want_loss)
    assert torch.equal(mask.double(), want_mask) and mask.sum().item() == 3 * 12
    latent, _, _ = model.forward_encoder(imgs, 0.75, noise)
    assert latent.shape == (3, 1 + 4, 32) == (3, latent_len, 32)
    hidden = imgs.clone()  # the encoder never sees masked patches: changing their pixels changes nothing
    pixels = model.unpatchify(mask[..., None].expand(-1, -1, 48).to(imgs.dtype)).bool()
    hidden[pixels] = torch.randn(int(pixels.sum()), dtype=torch.float64)
    torch.testing.assert_close(model.forward_encoder(hidden, 0.75, noise)[0], latent, rtol=0, atol=0)


def test_forward_features_and_norm_pix_loss():
    model = MaskedAutoencoderViT(**TINY, norm_pix_loss=True).eval()
    imgs = torch.randn(2, 3, 16, 16)
    feats = model.forward_features(imgs)
    assert feats.shape == (2, 17, 32)
    assert model.forward_features(torch.randn(2, 3, 24, 16)).shape == (2, 1 + 6 * 4, 32)  # table interpolated
    noise = torch.rand(2, 16)
    loss, pred, mask = model(imgs, 0.5, noise)
    target = model.patchify(imgs)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    torch.testing.assert_close(loss, (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum())


def test_fair_release_checkpoints_load(tmp_path):
    """FAIR's {'model': ...} layout with DDP's 'module.' prefix, full or encoder only (mae_pretrain_vit_*.pth)."""
    model = MaskedAutoencoderViT(**{**TINY, "embed_dim": 128, "num_heads": 4, "depth": 3, "decoder_embed_dim": 128,
                                    "decoder_depth": 3, "decoder_num_heads": 4})
    state = model.state_dict()
    full = tmp_path / "mae_visualize.pth"
    torch.save({"model": {"module." + k: v for k, v in state.items()}, "epoch": 799}, full)
    pretrained = load_pretrained(str(full))
    assert pretrained.model == "mae_vit_demo" and (pretrained.img_size, pretrained.patch_size) == (16, 4)
    rebuilt = pretrained.build()
    torch.testing.assert_close(rebuilt.state_dict(), state, rtol=0, atol=0)
    encoder_only = tmp_path / "mae_pretrain.pth"
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}},
               encoder_only)
    partial = load_pretrained(str(encoder_only))
    assert not partial.has_decoder and "encoder only" in partial.describe()
    torch.testing.assert_close(partial.build().forward_features(torch.ones(1, 3, 16, 16)),
                               rebuilt.forward_features(torch.ones(1, 3, 16, 16)))
    with pytest.raises(TrainError, match="holds a ViT-MAE checkpoint, but demo is a CRATE-MAE"):
        load_pretrained(str(full), model="demo")
    crate = crate_kernels.CRATEMAE(img_size=16, patch_size=4, embed_dim=128, depth=3, num_heads=4)
    with pytest.raises(ValueError, match="mismatched tensors"):
        load_checkpoint(crate_kernels.CRATEMAE(img_size=16, patch_size=4, embed_dim=64, depth=3, num_heads=4),
                        crate.state_dict())


def test_fair_releases_are_recognised_by_shape():
    """mae_visualize_vit_base.pth (decoder 512 x 8) is FAIR's mae_vit_base_patch16; the encoder-only
    mae_pretrain_vit_base.pth fits both B encoders, which are the same, and so needs no --model."""
    with torch.device("meta"), mock.patch.object(MaskedAutoencoderViT, "_init_weights"):
        state = crate_kernels.models.registry.build_mae("mae_vit_base_patch16").state_dict()
    assert crate_kernels.models.pretrained._infer_model(state, "visualize.pth") == "mae_vit_base_patch16"
    encoder = {k: v for k, v in state.items() if not k.startswith(("decoder", "mask"))}
    inferred = crate_kernels.models.pretrained._infer_model(encoder, "pretrain.pth")
    assert inferred in ("mae_vit_base", "mae_vit_base_patch16")


def test_train_accepts_the_vit_models(tmp_path, capsys):
    out = tmp_path / "vit"
    args = ["--model", "mae_vit_demo", "--input_size", "16", "--patch_size", "4", "--epoch_size", "8",
            "--batch_size", "4", "--max_steps", "2", "--eval_every", "0", "--num_workers", "0", "--no_tensorboard",
            "--threads", "0", "--output_dir", str(out)]
    assert train_main(args) == 0
    assert "model mae_vit_demo (1.22M parameters, 3+3 layers" in capsys.readouterr().out
    model = load_run(str(out))
    assert isinstance(model, MaskedAutoencoderViT) and model.decoder_embed.weight.requires_grad


def test_white_box_measurements_of_a_vit():
    """[CLS] attention from the block's own query and key; w is the value projection; the block output is dense."""
    model = MaskedAutoencoderViT(**TINY).eval()
    imgs = torch.randn(2, 3, 16, 16)
    maps = whitebox.attention_maps(model, imgs, layer=0)
    with torch.no_grad():
        x = model.patch_embed(imgs)
        x = torch.cat([model.cls_token.expand(2, -1, -1), x], dim=1) + model.pos_embed
        attn = model.blocks[0].attn
        q, k, v = attn.split_heads(attn.qkv(model.blocks[0].norm1(x)))
        want = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)[:, :, 0, 1:]
    torch.testing.assert_close(maps, want.reshape(2, 4, 4, 4))
    (w, z), *_ = whitebox.encoder_activations(model, imgs)
    torch.testing.assert_close(w, v)
    torch.testing.assert_close(z, model.blocks[0](x))
    stats = whitebox.coding_rate_and_sparsity(model, imgs)
    assert len(stats["coding_rate"]) == 2 and stats["sparsity"] == [1.0, 1.0]
