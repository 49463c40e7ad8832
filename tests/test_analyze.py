"""python -m crate_kernels.analyze: the four figures and their numbers for a tiny run beside a ViT-MAE, release and
encoder-only checkpoints, and bad inputs refused before anything is written."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from crate_kernels import CRATEMAE, whitebox
from crate_kernels.analyze import main
from crate_kernels.models.vit_mae import MaskedAutoencoderViT

QUIET = ["--threads", "0", "--crops", "2"]
FIGURES = {"whitebox.png", "attention.png", "pca.png", "reconstructions.png"}


def _vit(path, decoder=True):
    vit = MaskedAutoencoderViT(img_size=16, patch_size=4, embed_dim=128, depth=3, num_heads=4, decoder_embed_dim=128,
                               decoder_depth=3, decoder_num_heads=4)
    state = {k: v for k, v in vit.state_dict().items() if decoder or not k.startswith(("decoder", "mask"))}
    torch.save({"model": {"module." + k: v for k, v in state.items()}}, path)
    return path


def _photo(path, size=(30, 24)):
    pixels = np.random.default_rng(int(torch.randint(1000, ()))).integers(0, 255, (*size, 3), np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("family", ["crate", "vit"])
def test_reconstruct_gives_each_images_loss_and_keeps_visible_patches(family):
    cls = CRATEMAE if family == "crate" else MaskedAutoencoderViT
    model = cls(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, norm_pix_loss=family == "vit")
    imgs, noise = torch.randn(3, 3, 16, 16), torch.rand(3, 16)
    out = whitebox.reconstruct(model, imgs, 0.75, noise)
    with torch.no_grad():
        loss = model(imgs, 0.75, noise)[0]
    torch.testing.assert_close(out["loss"].mean(), loss)  # every image has 12 masked patches
    visible = (out["mask"] == 0).repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None].expand(-1, 3, -1, -1)
    assert torch.equal(out["pasted"][visible], out["original"][visible])
    assert torch.all(out["masked"][~visible] == 0.5) and out["mask"].sum().item() == 36


def test_four_figures_and_numbers_beside_a_vit(run_dir, tmp_path, capsys):
    images = [_photo(tmp_path / "a.png"), _photo(tmp_path / "b.jpg", (40, 50))]
    out = tmp_path / "figures"
    vit = _vit(tmp_path / "vit.pth")
    assert main([str(run_dir), *map(str, images), "--vit_checkpoint", str(vit), "--output_dir", str(out),
                 "--layer", "1"] + QUIET) == 0
    assert set(os.listdir(out)) == FIGURES | {"analysis.json"}
    for name in FIGURES:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    numbers = json.loads((out / "analysis.json").read_text())
    assert numbers["images"] == ["a.png", "b.jpg"] and numbers["views"] == 2 * 3 and numbers["attention_layer"] == 1
    assert set(numbers["layerwise"]) == {"CRATE-MAE (demo)", "ViT-MAE (mae_vit_demo)"}
    for stats in numbers["layerwise"].values():
        assert len(stats["coding_rate"]) == 3 and all(0 < s <= 1 for s in stats["sparsity"])
    assert numbers["layerwise"]["ViT-MAE (mae_vit_demo)"]["sparsity"] == [1.0, 1.0, 1.0]  # ViT outputs are dense
    assert sum(numbers["pca_explained_variance"]) <= 1 and len(numbers["pca_explained_variance"]) == 4
    losses = numbers["reconstruction_loss"]
    assert set(losses) == {"CRATE-MAE (demo)", "ViT-MAE (mae_vit_demo)"} and set(losses["CRATE-MAE (demo)"]) == {
        "a.png", "b.jpg"}
    assert "wrote whitebox.png, attention.png, pca.png, reconstructions.png" in capsys.readouterr().out


def test_release_checkpoint_and_bundled_photos(tmp_path, capsys):
    crate = CRATEMAE(img_size=16, patch_size=4, embed_dim=128, depth=3, num_heads=4)
    release = tmp_path / "crate_mae.pth"
    torch.save({"model": {"module." + k: v for k, v in crate.state_dict().items()}}, release)
    assert main([str(release)] + QUIET) == 0
    assert set(os.listdir(tmp_path / "analysis")) == FIGURES | {"analysis.json"}
    numbers = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert numbers["images"] == ["chelsea.png", "coffee.png"] and "CRATE-MAE (demo)" in numbers["layerwise"]
    encoder_only = _vit(tmp_path / "mae_pretrain.pth", decoder=False)
    assert main([str(encoder_only), "--output_dir", str(tmp_path / "vit")] + QUIET) == 0
    assert "no reconstructions for ViT-MAE (mae_vit_demo)" in capsys.readouterr().out
    assert set(os.listdir(tmp_path / "vit")) == FIGURES - {"reconstructions.png"} | {"analysis.json"}


@pytest.mark.parametrize("case, code, message", [
    ("unreadable", 1, "cannot read image BROKEN"),
    ("missing", 1, "image MISSING does not exist"),
    ("vit_is_crate", 1, "holds a CRATE-MAE checkpoint, not a ViT-MAE one"),
    ("layer", 2, "--layer must lie in [-3, 3) for this 3-layer encoder, got 5"),
    ("mask", 2, "--mask_ratio must lie in (0, 1), got 1.0"),
])
def test_bad_inputs_are_one_message_before_any_output(run_dir, tmp_path, case, code, message, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    out = tmp_path / "never"
    extra = {"unreadable": [str(broken)], "missing": [str(tmp_path / "missing.png")],
             "vit_is_crate": ["--vit_checkpoint", str(run_dir)], "layer": ["--layer", "5"],
             "mask": ["--mask_ratio", "1.0"]}[case]
    assert main([str(run_dir), *extra, "--output_dir", str(out)] + QUIET) == code
    err = capsys.readouterr().err
    expected = message.replace("BROKEN", str(broken)).replace("MISSING", str(tmp_path / "missing.png"))
    assert expected in err and err.count("\n") == 1
    assert not out.exists()




def test_maps_carry_colour_bars_and_each_reconstruction_its_own_mse(tmp_path):
    """Attention: one colour bar per image row (0 to the row's largest weight); PCA: one under each component's
    column (its symmetric limits); reconstructions: each model panel's MSE under it, titles only on the top row."""
    from crate_kernels.analyze import plot_attention, plot_pca, plot_reconstructions

    b, heads, k = 2, 3, 4
    imgs, maps = torch.randn(b, 3, 16, 16), torch.rand(b, heads, 4, 4)
    maps = maps / maps.sum(dim=(2, 3), keepdim=True)
    fig = plot_attention(imgs, maps, ["a", "b"], 0, 3, "m", str(tmp_path / "attention.png"))
    bars = fig.axes[b * (heads + 1):]
    assert len(bars) == b and all(ax.get_ylabel() == "[CLS] attention weight" for ax in bars)
    assert [bar.get_ylim()[1] for bar in bars] == pytest.approx([m.max().item() for m in maps], rel=0.05)
    pcs = torch.randn(b, k, 4, 4)
    fig = plot_pca(imgs, pcs, [0.4, 0.2, 0.1, 0.05], ["a", "b"], 0, 3, "m", str(tmp_path / "pca.png"))
    bars = fig.axes[b * (k + 2):]
    assert [ax.get_xlabel() for ax in bars] == [f"PC {c + 1} score" for c in range(k)]
    assert [ax.get_xlim()[1] for ax in bars] == pytest.approx(pcs.abs().amax(dim=(0, 2, 3)).tolist())
    pixels = torch.rand(b, 3, 16, 16)
    loss = torch.rand(b)
    recon = {"masked": pixels, "pasted": pixels, "original": pixels, "mask": torch.ones(b, 16), "loss": loss}
    fig = plot_reconstructions({"m": recon}, ["a", "b"], 0.75, str(tmp_path / "recon.png"))
    axes = np.array(fig.axes).reshape(b, 3)
    assert [ax.get_title() for ax in axes[0]] == ["masked 75%", "m prediction", "original"]
    assert all(ax.get_title() == "" for ax in axes[1])
    assert [ax.get_xlabel() for ax in axes[:, 1]] == [f"MSE on masked patches: {v:.3f}" for v in loss.tolist()]
    assert all("MSE" not in ax.get_title() + ax.get_xlabel() for ax in np.concatenate([axes[:, 0], axes[:, 2]]))
