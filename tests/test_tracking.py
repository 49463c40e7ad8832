"""--log_wandb: a training run under WANDB_MODE=offline (files in a temporary WANDB_DIR) sends W&B what log.txt and
TensorBoard get (train scalars every step, eval loss, per-layer coding rate and sparsity, the reconstruction grid)
and the white-box curves; a second run on the same output directory continues the same W&B run."""
import json
import os

import pytest

wandb = pytest.importorskip("wandb")

from crate_kernels.train import main  # noqa: E402

pytestmark = pytest.mark.e2e
TINY = ["--input_size", "16", "--patch_size", "4", "--epoch_size", "8", "--batch_size", "4", "--no_tensorboard",
        "--num_workers", "0", "--threads", "0", "--log_every", "1", "--eval_every", "2", "--eval_images", "2",
        "--log_wandb"]


@pytest.fixture
def logged(monkeypatch, tmp_path):
    """Every wandb.init and run.log call of the test, the real offline run beneath."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    os.makedirs(tmp_path / "wandb")
    calls = {"init": [], "log": []}
    real_init = wandb.init

    def init(**kwargs):
        calls["init"].append(kwargs)
        run = real_init(**kwargs)
        real_log = run.log

        def log(data, step=None, **rest):
            calls["log"].append((step, dict(data)))
            return real_log(data, step=step, **rest)

        monkeypatch.setattr(run, "log", log)
        return run

    monkeypatch.setattr(wandb, "init", init)
    return calls


def test_log_wandb_sends_what_the_log_gets(logged, tmp_path):
    out = str(tmp_path / "run")
    assert main(TINY + ["--max_steps", "4", "--output_dir", out]) == 0
    [init] = logged["init"]
    assert init["config"]["max_steps"] == 4 and init["name"] == "run" and init["resume"] == "allow"
    run_id = open(os.path.join(out, "wandb-run-id")).read()
    assert init["id"] == run_id
    records = [json.loads(line) for line in open(os.path.join(out, "log.txt"))]
    sent = {}
    for step, data in logged["log"]:
        for key, value in data.items():
            sent.setdefault(key, {})[step] = value
    train = [r for r in records if r["type"] == "train"]
    assert sent["train/loss"] == {r["step"]: r["loss"] for r in train}
    assert sent["train/lr"] == {r["step"]: r["lr"] for r in train}
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert sent["eval/loss"] == {r["step"]: r["eval_loss"] for r in evals}
    for key in ("coding_rate", "sparsity"):
        for layer in range(3):
            assert sent[f"eval/{key}/layer{layer + 1:02d}"] == {r["step"]: r[key][layer] for r in evals}
    assert set(sent["eval/reconstruction"]) == {0, 2, 4}
    image = sent["eval/reconstruction"][4]
    assert isinstance(image, wandb.Image) and image.image.size[0] > 16  # the grid, several images wide
    if "curves.png" in os.listdir(out):  # drawn when matplotlib is installed
        assert set(sent["eval/whitebox_curves"]) == {0, 2, 4}
    [folder] = [f for f in os.listdir(tmp_path / "wandb" / "wandb") if f.startswith("offline-run-")]
    assert folder.endswith(run_id)  # the offline run's files, in WANDB_DIR

    before = len(logged["log"])
    assert main(TINY + ["--max_steps", "6", "--output_dir", out]) == 0  # resumed: the same W&B run goes on
    assert logged["init"][1]["id"] == run_id
    assert sorted(step for step, data in logged["log"][before:] if "train/loss" in data) == [5, 6]


def test_log_wandb_without_wandb_names_the_extra(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(TINY + ["--output_dir", str(tmp_path / "run")]) == 2
    assert "--log_wandb needs wandb, the optional extra 'wandb': pip install 'crate_kernels[wandb]'" \
        in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")


def test_finetuning_sends_its_scores(logged, tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from crate_kernels import CRATEMAE, finetune

    torch.save({"model": CRATEMAE(img_size=16, patch_size=4, embed_dim=128, depth=3, num_heads=4).state_dict()},
               tmp_path / "release.pth")
    data, gen = tmp_path / "colours", np.random.default_rng(0)  # 2 classes told apart by colour
    for split, count in (("train", 4), ("val", 2)):
        for c, name in enumerate(("red", "green")):
            (data / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = gen.integers(0, 90, (16, 16, 3))
                pixels[..., c] += 160
                Image.fromarray(pixels.astype(np.uint8)).save(data / split / name / f"{i}.png")
    out = str(tmp_path / "ft")
    assert finetune.main([str(tmp_path / "release.pth"), "--data_path", str(data), "--num_workers", "0", "--threads",
                          "0", "--max_steps", "2", "--batch_size", "4", "--no_tensorboard", "--log_every", "1",
                          "--log_wandb", "--output_dir", out]) == 0
    with open(os.path.join(out, "log.txt")) as f:
        records = [json.loads(line) for line in f]
    sent = {(step, key): value for step, data in logged["log"] for key, value in data.items()}
    evals = [r for r in records if r["type"] == "eval"]
    assert evals and all(sent[(r["step"], f"eval/{k}")] == r[k] for r in evals for k in ("top1", "eval_loss"))
    assert all(sent[(r["step"], "train/loss")] == r["loss"] for r in records if r["type"] == "train")
