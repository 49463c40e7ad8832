"""White-box measurements against direct computations, and the visual probes."""
import numpy as np
import pytest
import torch
from PIL import Image

from crate_kernels import CRATEMAE, whitebox


@pytest.fixture
def model():
    m = CRATEMAE(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4)
    for block in m.blocks:  # a typical trained ISTA output is sparse: shift the dictionary away from init
        block.layers[0][1].fn.weight.data.mul_(3)
    return m.eval()


def _manual_layer(model, imgs, layer):
    """Re-run the encoder by hand (release math) up to ``layer``: its w = qkv(LN1(z)) and ISTA output."""
    z = model.patch_embed(imgs)
    z = torch.cat([model.cls_token.expand(len(imgs), -1, -1), z], dim=1) + model.decoder_pos_embed
    for block in model.blocks[: layer + 1]:
        attn, ista = block.layers[0]
        w = attn.fn.project(attn.norm(z))
        z = ista(z + attn(z))
    return w, z


def test_coding_rate_matches_a_direct_float64_logdet(model):
    imgs = torch.randn(3, 3, 16, 16)
    stats = whitebox.coding_rate_and_sparsity(model, imgs)
    assert len(stats["coding_rate"]) == 3 and set(stats) == {"coding_rate", "coding_rate_std", "sparsity",
                                                            "sparsity_std"}
    with torch.no_grad():
        w, z = _manual_layer(model, imgs, 1)
    b, h, n, p = w.shape
    per_sample = []
    for i in range(b):
        total = 0.0
        for k in range(h):
            x = w[i, k].double()
            x = x / x.norm(dim=1, keepdim=True)
            total += 0.5 * torch.logdet(torch.eye(n, dtype=torch.float64) + p / (n * 0.01) * x @ x.T).item()
        per_sample.append(total)
    assert stats["coding_rate"][1] == pytest.approx(np.mean(per_sample), rel=1e-6)
    assert stats["coding_rate_std"][1] == pytest.approx(np.std(per_sample), rel=1e-4, abs=1e-6)
    counted = [(z[i] != 0).sum().item() / z[i].numel() for i in range(b)]
    assert stats["sparsity"][1] == pytest.approx(np.mean(counted), rel=1e-12)
    assert stats["sparsity_std"][1] == pytest.approx(np.std(counted), rel=1e-9, abs=1e-12)
    assert 0 < stats["sparsity"][1] < 1


def test_masked_measurement_and_mode_restored(model):
    model.train()
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    a = whitebox.coding_rate_and_sparsity(model, imgs, mask_ratio=0.75, noise=noise)
    b = whitebox.coding_rate_and_sparsity(model, imgs, mask_ratio=0.75, noise=noise)
    assert a == b and a != whitebox.coding_rate_and_sparsity(model, imgs)
    assert model.training


def test_attention_maps_are_the_cls_softmax_row(model):
    imgs = torch.randn(2, 3, 16, 16)
    maps = whitebox.attention_maps(model, imgs, layer=-1)
    assert maps.shape == (2, 4, 4, 4)
    with torch.no_grad():
        w, _ = _manual_layer(model, imgs, 2)
        full = torch.softmax(w @ w.transpose(-1, -2) * model.blocks[2].layers[0][0].fn.scale, dim=-1)
    torch.testing.assert_close(maps.flatten(2), full[:, :, 0, 1:])
    with pytest.raises(ValueError, match="layer must lie in"):
        whitebox.attention_maps(model, imgs, layer=3)


def test_pca_maps(model):
    maps = whitebox.pca_maps(model, torch.randn(3, 3, 16, 16))
    assert maps.shape == (3, 4, 4, 4) and torch.isfinite(maps).all()
    flat = maps.permute(1, 0, 2, 3).reshape(4, -1)
    variances = flat.var(dim=1)
    assert torch.all(variances[:-1] >= variances[1:] - 1e-6)  # components ordered by explained variance
    assert flat.mean(dim=1).abs().max() < 1e-4  # centred


@pytest.mark.parametrize("norm_pix", [False, True])
def test_reconstruction_grid_layout(model, norm_pix):
    model.norm_pix_loss = norm_pix
    imgs = torch.randn(3, 3, 16, 16) * 0.2
    noise = torch.rand(3, 16)
    grid = whitebox.reconstruction_grid(model, imgs, mask_ratio=0.75, noise=noise, pad=2, labels=False)
    assert grid.shape == (3, 4 * 18 + 2, 3 * 18 + 2) and 0 <= grid.min() and grid.max() <= 1

    def cell(r, c):
        return grid[:, 2 + r * 18: 2 + r * 18 + 16, 2 + c * 18: 2 + c * 18 + 16]

    mask = model.unpatchify(model.random_masking(3, 16, 0.75, noise, "cpu").unsqueeze(-1).expand(-1, -1, 48), (4, 4))
    for c in range(3):
        visible = mask[c] == 0
        torch.testing.assert_close(cell(3, c)[visible], cell(0, c)[visible])  # visible patches pasted back
        torch.testing.assert_close(cell(3, c)[~visible], cell(2, c)[~visible])  # prediction where masked
        assert torch.all(cell(1, c)[~visible] == 0.5)


def test_reconstruction_grid_names_its_rows(model):
    imgs, noise = torch.randn(2, 3, 16, 16) * 0.2, torch.rand(2, 16)
    plain = whitebox.reconstruction_grid(model, imgs, noise=noise, labels=False)
    labelled = whitebox.reconstruction_grid(model, imgs, noise=noise)
    margin = labelled.shape[2] - plain.shape[2]
    assert labelled.shape[:2] == plain.shape[:2] and margin > 20
    torch.testing.assert_close(labelled[:, :, margin:], plain, rtol=0, atol=0)
    for row in range(4):  # dark text in every row's band of the label column, white between the bands
        band = labelled[:, 2 + row * 18: 2 + row * 18 + 16, :margin]
        assert band.min() < 0.3
    assert labelled[:, :2, :margin].min() == 1.0


def test_save_image_grid_and_curves(tmp_path):
    whitebox.save_image_grid(torch.rand(3, 10, 20), str(tmp_path / "one.png"))
    whitebox.save_image_grid(torch.rand(5, 1, 8, 8), str(tmp_path / "batch.png"), nrow=2, pad=1)
    assert Image.open(tmp_path / "one.png").size == (20, 10)
    assert Image.open(tmp_path / "batch.png").size == (2 * 9 + 1, 3 * 9 + 1)
    with pytest.raises(ValueError, match="C in"):
        whitebox.save_image_grid(torch.rand(2, 8, 8), str(tmp_path / "bad.png"))
    pytest.importorskip("matplotlib")
    evals = [{"step": s, "coding_rate": [3.0 - s, 2.0], "coding_rate_std": [0.1, 0.1], "sparsity": [0.5, 0.4],
              "sparsity_std": [0.01, 0.02]} for s in (0, 1)]
    whitebox.plot_whitebox_curves(evals, str(tmp_path / "curves.png"), losses=[(1, 1.0), (2, 0.5)])
    assert Image.open(tmp_path / "curves.png").size[0] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch.png", "curves.png", "one.png"]


def test_linear_probe_separates_an_easy_problem(model):
    pytest.importorskip("sklearn")
    torch.manual_seed(0)

    def batches(n):
        labels = torch.arange(n) % 2
        imgs = torch.randn(n, 3, 16, 16) * 0.1 + (labels.view(-1, 1, 1, 1) * 2.0 - 1.0)
        return [(imgs[i:i + 8], labels[i:i + 8]) for i in range(0, n, 8)]

    feats, labels = whitebox.extract_features(model, batches(16))
    assert feats.shape == (16, 32) and labels.tolist() == [0, 1] * 8
    assert whitebox.linear_probe(model, batches(48), batches(16)) == 1.0


def test_the_earlier_name_analysis_gives_every_public_name_of_whitebox():
    from crate_kernels import analysis

    assert whitebox.__all__ and all(getattr(analysis, name) is getattr(whitebox, name) for name in whitebox.__all__)
