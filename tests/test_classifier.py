"""CRATEClassifier / ViTClassifier from every checkpoint form: the encoder kept exactly, the decoder dropped, MAE's
pooling and head conventions, and the wrong family refused."""
import os

import pytest
import torch
from safetensors.torch import save_file

from crate_kernels import CRATEMAE, CRATEClassifier, ViTClassifier, classifier_from_pretrained
from crate_kernels.errors import TrainError
from crate_kernels.models.vit_mae import MaskedAutoencoderViT

DEMO = dict(img_size=16, patch_size=4, embed_dim=128, depth=3, num_heads=4)


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def crate_forms(tmp_path):
    """The same CRATE-MAE weights as a release .pth ('module.' prefixes), a bare state_dict, a .safetensors, and a
    crate-train run directory's checkpoint-3.pth."""
    model = _perturbed(CRATEMAE(**DEMO))
    state = model.state_dict()
    forms = {"release": tmp_path / "release.pth", "bare": tmp_path / "bare.pth",
             "safetensors": tmp_path / "model.safetensors", "run": tmp_path / "run" / "checkpoint-3.pth"}
    torch.save({"model": {"module." + k: v for k, v in state.items()}, "epoch": 3}, forms["release"])
    torch.save(state, forms["bare"])
    save_file({k: v.contiguous() for k, v in state.items()}, forms["safetensors"], metadata={"model": "demo"})
    os.makedirs(forms["run"].parent)
    torch.save({"model": state, "args": {"model": "demo", "input_size": 16, "patch_size": 4}}, forms["run"])
    return model, forms


def test_every_checkpoint_form_gives_the_encoder_exactly(crate_forms, capsys):
    model, forms = crate_forms
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model.forward_features(imgs)
    for form, path in forms.items():
        clf = CRATEClassifier.from_pretrained(str(path), num_classes=7)
        line = capsys.readouterr().out
        assert "CRATEClassifier:" in line and "decoder" in line and "parameters" in line, form
        assert not any(k.startswith(("decoder", "mask_token")) for k in clf.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(clf.pooled(imgs), want[:, 0], rtol=1e-5, atol=1e-5)
            assert clf(imgs).shape == (2, 7)
    head_params = 128 * 7 + 7
    encoder_params = sum(v.numel() for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask")))
    assert f"{encoder_params + head_params:,} parameters ({encoder_params:,} encoder" in line


def test_mae_head_conventions():
    clf = CRATEClassifier(1000, **DEMO)
    assert isinstance(clf.head, torch.nn.Linear) and clf.head.weight.std().item() == pytest.approx(2e-5, rel=0.1)
    assert torch.all(clf.head.bias == 0) and hasattr(clf, "norm") and not hasattr(clf, "fc_norm")
    probe = CRATEClassifier(1000, **DEMO, global_pool=True, linear_probe=True)
    bn, linear = probe.head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.1) and not hasattr(probe, "norm")
    imgs = torch.randn(3, 3, 16, 16)
    tokens = probe.forward_features(imgs)
    torch.testing.assert_close(probe.pooled(imgs), probe.fc_norm(tokens[:, 1:].mean(1)))
    with pytest.raises(ValueError, match="layer must lie in"):
        probe.pooled(imgs, layer=3)


def test_vit_classifier_loads_fair_layout_and_refuses_the_other_family(crate_forms, tmp_path):
    vit = _perturbed(MaskedAutoencoderViT(**DEMO, decoder_embed_dim=128, decoder_depth=3, decoder_num_heads=4))
    path = tmp_path / "vit.pth"
    torch.save({"model": vit.state_dict()}, path)
    clf = classifier_from_pretrained(str(path), num_classes=5, log=None)
    assert isinstance(clf, ViTClassifier)
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(clf.pooled(imgs), vit.forward_features(imgs)[:, 0], rtol=1e-5, atol=1e-5)
    finetuned = tmp_path / "finetuned.pth"  # FAIR's fine-tuned layout: our own classifier's state_dict
    torch.save({"model": clf.state_dict()}, finetuned)
    again = ViTClassifier.from_pretrained(str(finetuned), num_classes=5, log=None)
    torch.testing.assert_close(again.state_dict(), clf.state_dict(), rtol=0, atol=0)  # the head came along
    with pytest.raises(TrainError, match="holds a ViT-MAE checkpoint; CRATEClassifier needs a CRATE-MAE one"):
        CRATEClassifier.from_pretrained(str(path), num_classes=5, log=None)
    _, forms = crate_forms
    with pytest.raises(TrainError, match="holds a CRATE-MAE checkpoint; ViTClassifier needs a ViT-MAE one"):
        ViTClassifier.from_pretrained(str(forms["release"]), num_classes=5, log=None)
    with pytest.raises(TrainError, match=r"(?s)does not fit this classifier: .* cls_token: checkpoint \(1, 1, 128\) vs "
                                         r"model \(1, 1, 384\)"):
        CRATEClassifier.from_pretrained(str(forms["release"]), num_classes=5, model="crate_mae_tiny", log=None)
    truncated = tmp_path / "truncated.pth"
    torch.save({"model": {k: v for k, v in vit.state_dict().items() if not k.startswith("blocks.2")}}, truncated)
    with pytest.raises(TrainError, match="cannot tell the architecture"):
        classifier_from_pretrained(str(truncated), num_classes=5, log=None)
    with pytest.raises(TrainError, match="lacks 12 encoder tensors: blocks.2"):
        classifier_from_pretrained(str(truncated), num_classes=5, model="mae_vit_demo", log=None)


@pytest.mark.parametrize("cls", [CRATEClassifier, ViTClassifier])
def test_gradient_checkpointing_gives_the_same_logits_and_gradients(cls):
    torch.manual_seed(0)
    clf = cls(7, img_size=24, patch_size=4, embed_dim=32, depth=3, num_heads=2, global_pool=cls is ViTClassifier)
    torch.nn.init.normal_(clf.head.weight, std=0.1)  # a head that passes gradients on to the blocks
    imgs = torch.randn(3, 3, 24, 24)
    calls = []
    clf.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))

    def run(recompute: bool):
        clf.zero_grad(set_to_none=True)
        calls.clear()
        logits = clf.set_grad_checkpointing(recompute)(imgs)
        logits.square().sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in clf.named_parameters() if p.grad is not None}, len(calls)

    plain, plain_grads, plain_calls = run(False)
    again, again_grads, again_calls = run(True)
    assert (plain_calls, again_calls) == (1, 2)  # the first block ran again in backward
    assert set(again_grads) == set(plain_grads) and any(n.startswith("blocks.0.") for n in plain_grads)
    torch.testing.assert_close(again, plain, rtol=0, atol=0)
    torch.testing.assert_close(again_grads, plain_grads, rtol=1e-6, atol=1e-7)
