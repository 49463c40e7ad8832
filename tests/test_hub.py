"""Hugging Face Hub support, offline: save_pretrained / from_pretrained round trips of every model class (bitwise
weights, same forward), config.json and the model card, the folder or a repo id wherever a checkpoint is taken
(load_pretrained, the classifiers), a mocked upload (push_to_hub and train --push_to_hub), a repo id read from a
prepared Hub cache under HF_HUB_OFFLINE=1, and the core without huggingface_hub."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("huggingface_hub")

from crate_kernels import CRATEMAE, CRATEClassifier, MaskedAutoencoderViT, ViTClassifier  # noqa: E402
from crate_kernels.errors import TrainError  # noqa: E402
from crate_kernels.models.pretrained import load_pretrained  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = dict(img_size=16, patch_size=4, embed_dim=128, depth=3, num_heads=4)  # the registry's "demo" encoder
VIT_DEMO = dict(DEMO, decoder_embed_dim=128, decoder_depth=3, decoder_num_heads=4)  # "mae_vit_demo"
BUILDERS = {
    "crate": lambda: CRATEMAE(**DEMO, norm_pix_loss=True, backend="reference"),
    "vit": lambda: MaskedAutoencoderViT(**VIT_DEMO),
    "crate_clf": lambda: CRATEClassifier(7, global_pool=True, backend="reference", **DEMO),
    "vit_clf": lambda: ViTClassifier(5, linear_probe=True, **DEMO),
}


def _perturbed(model):
    """Every parameter and buffer moved off its initialisation, so a load that left one out would show."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.add_(0.05 * torch.randn_like(t))
    return model.eval()


def _outputs(model, imgs):
    with torch.no_grad():
        if isinstance(model, (CRATEMAE, MaskedAutoencoderViT)):
            noise = torch.rand(imgs.shape[0], 16, generator=torch.Generator().manual_seed(1))
            return model(imgs, mask_ratio=0.75, noise=noise)[1]
        return model(imgs)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_save_then_from_pretrained_gives_the_same_weights_and_outputs(kind, tmp_path):
    model = _perturbed(BUILDERS[kind]())
    model.save_pretrained(tmp_path / "saved")
    assert sorted(os.listdir(tmp_path / "saved")) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architecture"] == type(model).__name__ and "backend" not in config  # backend: a runtime choice
    assert config["img_size"] == 16 and config["patch_size"] == 4 and config["embed_dim"] == 128
    card = (tmp_path / "saved" / "README.md").read_text()
    total = sum(p.numel() for p in model.parameters())
    assert f"{total:,}" in card and "2404.02446" in card and "Pai, Druv and Wu, Ziyang" in card
    runtime = {"backend": "reference"} if kind.startswith("crate") else {}  # not saved: chosen where it runs
    again = type(model).from_pretrained(str(tmp_path / "saved"), **runtime)
    assert not again.training
    _same_state(model, again)
    imgs = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(_outputs(again, imgs), _outputs(model, imgs), rtol=0, atol=0)


def test_from_pretrained_options_and_refusals(tmp_path):
    model = _perturbed(CRATEClassifier(3, **DEMO))
    model.save_pretrained(tmp_path / "clf")
    again = CRATEClassifier.from_pretrained(str(tmp_path / "clf"), backend="reference")
    assert again.backend == "reference" and again.num_classes == 3
    with pytest.raises(TrainError, match="holds a CRATEClassifier, not a ViTClassifier"):
        ViTClassifier.from_pretrained(str(tmp_path / "clf"))
    with pytest.raises(TypeError, match="needs num_classes"):
        from crate_kernels.models.classifier import EncoderClassifier
        EncoderClassifier.from_pretrained(str(tmp_path / "clf"))
    # a changed tensor shape in the folder is refused, not loaded partially
    wrong = _perturbed(CRATEClassifier(4, **DEMO))
    wrong.save_pretrained(tmp_path / "wrong")
    shutil.copy(tmp_path / "clf" / "config.json", tmp_path / "wrong" / "config.json")
    with pytest.raises(RuntimeError, match="size mismatch for head"):
        CRATEClassifier.from_pretrained(str(tmp_path / "wrong"))


def test_a_saved_folder_is_a_checkpoint_for_load_pretrained_and_the_classifiers(tmp_path):
    mae = _perturbed(CRATEMAE(**DEMO))
    mae.save_pretrained(tmp_path / "hf", config={"model": "demo"})
    pretrained = load_pretrained(str(tmp_path / "hf"))
    assert (pretrained.model, pretrained.img_size, pretrained.patch_size) == ("demo", 16, 4)
    _same_state(mae, pretrained.build())
    clf = CRATEClassifier.from_pretrained(str(tmp_path / "hf"), num_classes=6, log=None)
    for key, value in clf.state_dict().items():
        if not key.startswith(("head.", "norm.", "pos_embed")):
            assert torch.equal(value, mae.state_dict()[key]), key
    with pytest.raises(TrainError, match="trained as demo"):
        load_pretrained(str(tmp_path / "hf"), model="crate_mae_tiny")


class _FakeApi:
    """huggingface_hub's HfApi, recording what push_to_hub sends instead of sending it."""

    pushed = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, repo_type="model", **kwargs):
        kept = os.path.join(self.root, repo_id.replace("/", "--"))
        shutil.copytree(folder_path, kept)
        self.pushed.append((repo_id, kept))
        return f"https://huggingface.co/{repo_id}/commit/0"


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    import huggingface_hub.hub_mixin

    _FakeApi.pushed, _FakeApi.root = [], str(tmp_path / "uploaded")
    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", _FakeApi)
    return _FakeApi


def test_push_to_hub_uploads_the_saved_folder(fake_hub, tmp_path):
    model = _perturbed(MaskedAutoencoderViT(**VIT_DEMO))
    assert model.push_to_hub("someone/vit-demo").endswith("/commit/0")
    [(repo, folder)] = fake_hub.pushed
    assert repo == "someone/vit-demo"
    _same_state(model, MaskedAutoencoderViT.from_pretrained(folder))
    assert 'MaskedAutoencoderViT.from_pretrained("someone/vit-demo")' in open(os.path.join(folder, "README.md")).read()


def test_training_writes_the_folder_and_pushes_it(fake_hub, tmp_path):
    from crate_kernels.train import main

    out = str(tmp_path / "run")
    args = ["--input_size", "16", "--patch_size", "4", "--epoch_size", "8", "--batch_size", "4", "--eval_every", "0",
            "--no_tensorboard", "--num_workers", "0", "--threads", "0", "--max_steps", "2", "--output_dir", out,
            "--push_to_hub", "someone/crate-demo"]
    assert main(args) == 0
    model = CRATEMAE.from_pretrained(os.path.join(out, "hf"))
    from crate_kernels.checkpoint import load

    final = load(os.path.join(out, "model.safetensors"))["model"]
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())
    card = open(os.path.join(out, "hf", "README.md")).read()
    assert "crate-train --input_size 16" in card and "--push_to_hub someone/crate-demo" in card
    assert "scikit-image" in card and 'from_pretrained("someone/crate-demo")' in card
    assert json.load(open(os.path.join(out, "hf", "config.json")))["model"] == "demo"
    [(repo, folder)] = fake_hub.pushed
    assert repo == "someone/crate-demo"
    _same_state(model, CRATEMAE.from_pretrained(folder))
    assert load_pretrained(os.path.join(out, "hf")).model == "demo"  # probe / finetune / analyze take it too


def _hub_cache(cache: str, repo_id: str, folder: str) -> None:
    """The Hub cache's layout for one download of ``folder`` as ``repo_id`` at revision main (what
    hf_hub_download leaves behind): models--owner--name/{refs/main, snapshots/<commit>/<files>}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    shutil.copytree(folder, os.path.join(repo, "snapshots", commit))


def test_a_repo_id_loads_offline_from_the_hub_cache(tmp_path):
    model = _perturbed(CRATEMAE(**DEMO))
    model.save_pretrained(tmp_path / "hf", config={"model": "demo"})
    _hub_cache(str(tmp_path / "cache"), "someone/crate-demo", str(tmp_path / "hf"))
    torch.save(model.state_dict(), tmp_path / "expected.pth")
    script = (
        "import torch\n"
        "from crate_kernels import CRATEMAE\n"
        "from crate_kernels.models.pretrained import load_pretrained\n"
        f"expected = torch.load({str(tmp_path / 'expected.pth')!r})\n"
        "for model in (CRATEMAE.from_pretrained('someone/crate-demo'),\n"
        "              load_pretrained('someone/crate-demo').build()):\n"
        "    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())\n"
        "try:\n"
        "    load_pretrained('someone/not-cached')\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache"), "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TrainError checkpoint someone/not-cached does not exist as a local file or folder, and cannot be read " \
        "as a Hugging Face Hub repo id (" in proc.stdout


def test_the_core_works_without_huggingface_hub(tmp_path):
    script = (
        "import sys\n"
        "sys.modules['huggingface_hub'] = None  # as if not installed\n"
        "from crate_kernels import CRATEMAE\n"
        "from crate_kernels.models.pretrained import load_pretrained\n"
        "model = CRATEMAE(img_size=16, patch_size=4, embed_dim=128, depth=3, num_heads=4)\n"
        "for call in (lambda: model.save_pretrained('x'), lambda: CRATEMAE.from_pretrained('x'),\n"
        "             lambda: load_pretrained('someone/crate-demo')):\n"
        "    try:\n"
        "        call()\n"
        "    except Exception as e:\n"
        "        print(type(e).__name__, e)\n"
        "from crate_kernels.train import main\n"
        "print('exit', main(['--push_to_hub', 'someone/x', '--output_dir', 'out']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    extra = "the optional extra 'hub': pip install 'crate_kernels[hub]'"
    assert lines[0] == f"ImportError save_pretrained needs huggingface_hub, {extra}"
    assert lines[1] == f"ImportError from_pretrained needs huggingface_hub, {extra}"
    assert lines[2].startswith("TrainError checkpoint someone/crate-demo does not exist as a local file or folder")
    assert extra in lines[2]
    assert lines[3] == "exit 2" and f"--push_to_hub needs huggingface_hub, {extra}" in proc.stderr
    assert not os.path.exists(tmp_path / "out")


def test_finetune_and_probe_take_a_repo_id_and_finetuning_pushes_its_classifier(fake_hub, monkeypatch, tmp_path):
    import huggingface_hub.constants
    import numpy as np
    from PIL import Image

    from crate_kernels import finetune, probe

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    mae = _perturbed(CRATEMAE(**DEMO))
    mae.save_pretrained(tmp_path / "hf", config={"model": "demo"})
    _hub_cache(str(tmp_path / "cache"), "someone/crate-demo", str(tmp_path / "hf"))
    data = tmp_path / "colours"  # 3 classes told apart by colour, 4 train and 2 val images each
    gen = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for c, name in enumerate(("red", "green", "blue")):
            (data / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = gen.integers(0, 90, (16, 16, 3))
                pixels[..., c] += 160
                Image.fromarray(pixels.astype(np.uint8)).save(data / split / name / f"{i}.png")
    quiet = ["--data_path", str(data), "--num_workers", "0", "--threads", "0"]
    out = tmp_path / "ft"
    assert finetune.main(["someone/crate-demo", *quiet, "--max_steps", "2", "--batch_size", "4", "--no_tensorboard",
                          "--output_dir", str(out), "--push_to_hub", "someone/crate-demo-colours"]) == 0
    clf = CRATEClassifier.from_pretrained(str(out / "hf"))
    from crate_kernels.checkpoint import load

    final = load(str(out / "model.safetensors"))["model"]
    assert clf.num_classes == 3 and all(torch.equal(final[k], v) for k, v in clf.state_dict().items())
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["classes"] == ["blue", "green", "red"] and config["model"] == "demo"
    assert "crate-finetune someone/crate-demo" in (out / "hf" / "README.md").read_text()
    [(repo, folder)] = fake_hub.pushed
    assert repo == "someone/crate-demo-colours"
    _same_state(clf, CRATEClassifier.from_pretrained(folder))
    monkeypatch.chdir(tmp_path)
    assert probe.main(["someone/crate-demo", *quiet, "--epochs", "2", "--warmup_epochs", "1"]) == 0
    assert os.listdir(tmp_path / "probe" / "someone--crate-demo")  # a repo id's outputs: ./probe/owner--name
