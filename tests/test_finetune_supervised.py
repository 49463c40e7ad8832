"""Supervised CRATE on the shared engine: training from random initialisation, the release's checkpoints fine-tuned,
its two recipes, Lion, and the probe and analysis commands on its checkpoints (crate_kernels.finetune, probe,
analyze with a supervised model)."""
import importlib.util
import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from crate_kernels import CRATE, checkpoint
from crate_kernels.finetune import RECIPES, complete, main, resolve
from crate_kernels.models.pretrained import load_pretrained, supervised_classifier
from crate_kernels.models.registry import build_supervised
from crate_kernels.pipeline.recipe import layer_decay_groups

QUICK = ["--batch_size", "4", "--num_workers", "0", "--threads", "0", "--no_tensorboard", "--log_every", "1"]


def _records(folder, kind):
    with open(os.path.join(folder, "log.txt")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def _cifar10(root, train_per_batch=4, test=6, seed=1):
    """A CIFAR-10 folder in the release format (pickled batches of 32 x 32 RGB rows), random pixels and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    gen = np.random.default_rng(seed)
    for name, count in [(f"data_batch_{i}", train_per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        labels = [int(v) for v in gen.integers(0, 10, count)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": gen.integers(0, 256, (count, 3072), dtype=np.uint8), b"labels": labels}, f)
    return root


def _release_checkpoint(path, num_classes=7, image_size=32, patch_size=4, seed=0):
    """A supervised CRATE checkpoint as the release's main.py writes it: {'state_dict': DataParallel's 'module.'
    keys, 'optimizer': ...}; returns the model."""
    torch.manual_seed(seed)
    model = build_supervised("crate_demo", num_classes, image_size, patch_size)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "arch": "CRATE_demo", "state_dict": state, "optimizer": {}}, path)
    return model


def test_the_release_checkpoint_format_is_recognised_with_its_architecture_and_geometry(tmp_path):
    model = _release_checkpoint(tmp_path / "release.pth.tar")
    found = load_pretrained(str(tmp_path / "release.pth.tar"))
    assert (found.model, found.family, found.img_size, found.patch_size) == ("crate_demo", "supervised", 32, 4)
    built = found.build()
    for key, value in model.state_dict().items():
        assert torch.equal(built.state_dict()[key], value), key
    with pytest.raises(Exception, match="contradicts|is a supervised CRATE|but demo is"):
        load_pretrained(str(tmp_path / "release.pth.tar"), "demo")


def test_a_fresh_head_for_other_classes_keeps_every_other_tensor_and_resizes_the_position_table(tmp_path):
    model = _release_checkpoint(tmp_path / "r.pth", num_classes=7)
    found = load_pretrained(str(tmp_path / "r.pth"))
    same = supervised_classifier(found, 10, log=None)
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith("mlp_head.")}
    for key, value in kept.items():
        assert torch.equal(same.state_dict()[key], value), key
    assert same.num_classes == 10 and same.mlp_head[1].weight.shape == (10, 128)
    lines = []
    larger = supervised_classifier(found, 10, img_size=48, log=lines.append)
    assert larger.pos_embedding.shape == (1, 1 + 12 * 12, 128) and "position table 8x8 -> 12x12" in lines[0]
    assert torch.equal(larger.pos_embedding[:, :1], model.pos_embedding[:, :1])  # [CLS] row kept
    own = supervised_classifier(found, None, log=None)  # keep the checkpoint's head
    assert torch.equal(own.mlp_head[1].weight, model.mlp_head[1].weight)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(own.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_layer_decay_groups_number_supervised_layers_and_decay_every_parameter_when_asked():
    model = build_supervised("crate_demo", 10, 32, 4)
    names = {n for n, _ in model.named_parameters()}
    for decay_all in (False, True):
        groups = layer_decay_groups(model, 0.05, 0.5, decay_all)
        listed = [n for g in groups for n in g["param_names"]]
        assert sorted(listed) == sorted(names)  # every parameter once
        scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
        decay = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
        assert scale["pos_embedding"] == scale["to_patch_embedding.2.weight"] == 0.5 ** 4
        assert scale["transformer.layers.0.0.fn.qkv.weight"] == 0.5 ** 3
        assert scale["transformer.layers.2.1.fn.weight"] == 0.5 ** 1
        assert scale["mlp_head.1.weight"] == 1.0
        assert decay["pos_embedding"] == decay["mlp_head.1.bias"] == (0.05 if decay_all else 0.0)
        assert decay["mlp_head.1.weight"] == 0.05


def _completed(argv):
    cfg = resolve(argv)
    pretrained = None if "checkpoint" not in cfg["given"] else load_pretrained(cfg["checkpoint"], cfg["model"])
    return complete(dict(cfg), pretrained)


def test_recipes_set_the_release_settings_unless_given(tmp_path):
    cifar = str(_cifar10(tmp_path / "c"))
    cfg, pretrained = _completed(["--model", "crate_tiny", "--data_path", cifar])
    assert cfg["recipe"] == "crate_cifar" and (cfg["input_size"], cfg["patch_size"]) == (32, 4)
    assert pretrained.state == {} and pretrained.describe().endswith("random initialisation")
    assert cfg["epochs"] == 400 and cfg["weight_decay"] == 0.01 and cfg["warmup_epochs"] == 0
    assert cfg["smoothing"] == 0.0 and cfg["layer_decay"] == 1.0 and cfg["min_lr"] == 0.0
    assert cfg["lr"] == pytest.approx(1e-4 * 64 / 50)  # the release's 1e-4 at its batch of 50, scaled to 64
    assert cfg["randaug_m"] == pytest.approx(14 / 3) and cfg["mixup"] == cfg["cutmix"] == cfg["reprob"] == 0
    folder = tmp_path / "imagenet"
    for split in ("train", "val"):
        (folder / split / "a").mkdir(parents=True)
    cfg, _ = _completed(["--model", "crate_base", "--data_path", str(folder), "--epochs", "3", "--batch_size", "512"])
    assert cfg["recipe"] == "crate_imagenet" and (cfg["input_size"], cfg["patch_size"]) == (224, 16)
    assert cfg["epochs"] == 3 and cfg["smoothing"] == 0.1 and cfg["weight_decay"] == 0.1
    assert cfg["lr"] == pytest.approx(4e-4 * 2) and cfg["warmup_epochs"] == 20
    cfg, _ = _completed(["--model", "crate_base", "--data_path", str(folder), "--opt", "lion", "--batch_size", "512"])
    assert cfg["lr"] == pytest.approx(2e-4) and cfg["weight_decay"] == 0.05  # the release README's Lion command
    assert RECIPES["crate_imagenet"]["crop_pct"] == 0.875 and RECIPES["crate_cifar"]["crop_pct"] == 1.0


def test_from_scratch_on_cifar_trains_reports_top1_and_evaluates_the_result(tmp_path, capsys, one_thread):
    cifar = str(_cifar10(tmp_path / "c", train_per_batch=8))
    out = tmp_path / "scratch"
    assert main(["--model", "crate_demo", "--data_path", cifar, "--max_steps", "4", "--output_dir", str(out),
                 *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "random initialisation" in printed and "crate_cifar recipe" in printed and "32px" in printed
    assert "on every parameter" in printed and "top-1" in printed
    evals = _records(out, "eval")
    assert evals[-1]["step"] == 4 and 0 <= evals[-1]["top1"] <= 100 and evals[-1]["test_images"] == 6
    model = build_supervised("crate_demo", 10, 32, 4)
    model.load_state_dict(load_file(out / "model.safetensors"))  # the release's layout, loadable as it is
    args = yaml.safe_load((out / "args.yaml").read_text())
    assert args["checkpoint"] is None and args["model"] == "crate_demo" and args["patch_size"] == 4
    assert main([str(out), "--eval", "--data_path", cifar, *QUICK]) == 0
    assert f"top-1 {evals[-1]['top1']:.2f}%" in capsys.readouterr().out  # the same model scores the same
    if importlib.util.find_spec("huggingface_hub") is None:  # without the extra hub: no folder, only a note
        assert not os.path.isdir(out / "hf")
    else:  # the Hugging Face folder loads back as the same model
        assert torch.equal(CRATE.from_pretrained(str(out / "hf")).pos_embedding, model.pos_embedding)


def test_a_release_checkpoint_fine_tunes_with_a_fresh_head(tmp_path, capsys, one_thread):
    release = tmp_path / "crate_demo_in7.pth"
    model = _release_checkpoint(release, num_classes=7)
    cifar = str(_cifar10(tmp_path / "c"))
    out = tmp_path / "ft"
    assert main([str(release), "--data_path", cifar, "--max_steps", "1", "--lr", "1e-30", "--output_dir", str(out),
                 *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "fresh head" in printed and "crate_demo (supervised CRATE, 32px, patch 4)" in printed
    tuned = load_file(out / "model.safetensors")
    assert tuned["mlp_head.1.weight"].shape == (10, 128)
    torch.testing.assert_close(tuned["transformer.layers.1.0.fn.qkv.weight"],
                               model.state_dict()["transformer.layers.1.0.fn.qkv.weight"])
    assert main([str(release), "--data_path", cifar, "--patch_size", "8", *QUICK]) == 2
    assert "--patch_size 8 contradicts" in capsys.readouterr().err


def test_lion_trains_and_resumes_its_own_state(tmp_path, capsys, one_thread):
    pytest.importorskip("lion_pytorch", reason="the extra lion (lion-pytorch) is installed by .ci/run")
    cifar = str(_cifar10(tmp_path / "c"))
    out = tmp_path / "lion"
    args = ["--model", "crate_demo", "--data_path", cifar, "--opt", "lion", "--output_dir", str(out), *QUICK]
    assert main([*args, "--max_steps", "2"]) == 0
    assert "Lion lr" in capsys.readouterr().out
    state = checkpoint.load(str(out / "checkpoint-last.pth"))["optimizer"]["state"]
    assert state and all("exp_avg" in s and "exp_avg_sq" not in s for s in state.values())  # Lion's one moment
    assert main([*args, "--max_steps", "2"]) == 0  # resumes Lion's state, to nothing left
    assert "resuming at step 2" in capsys.readouterr().out and len(_records(out, "train")) == 2


def test_lion_without_its_extra_is_one_message_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # as if the extra were not installed
    cifar = str(_cifar10(tmp_path / "c"))
    assert main(["--model", "crate_demo", "--data_path", cifar, "--opt", "lion", "--output_dir", str(tmp_path / "o"),
                 "--max_steps", "1", *QUICK]) == 2
    assert "pip install 'crate_kernels[lion]'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_probe_and_analyze_read_a_supervised_checkpoint(tmp_path, capsys, one_thread):
    from crate_kernels.analyze import main as analyze_main
    from crate_kernels.probe import main as probe_main

    release = tmp_path / "release.pth"
    _release_checkpoint(release, num_classes=7)
    assert probe_main([str(release), "--compare_random", "--random_inits", "2", "--num_workers", "0",
                       "--output_dir", str(tmp_path / "probe")]) == 0
    printed = capsys.readouterr().out
    assert "crate_demo (supervised CRATE, 32px, patch 4)" in printed and "random init (seed 1)" in printed
    assert analyze_main([str(release), "--output_dir", str(tmp_path / "an"), "--crops", "1"]) == 0
    numbers = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert len(numbers["layerwise"]["supervised CRATE (crate_demo)"]["coding_rate"]) == 3
    assert "reconstructions" not in numbers["figures"]
    assert "a supervised model has no decoder" in capsys.readouterr().out


def test_a_run_of_this_command_fine_tunes_and_evaluates_with_its_own_pooling(tmp_path, capsys, one_thread):
    cifar = str(_cifar10(tmp_path / "c"))
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["--model", "crate_demo", "--data_path", cifar, "--pool", "mean", "--grad_checkpointing",
                 "--max_steps", "2", "--output_dir", str(first), *QUICK]) == 0
    capsys.readouterr()
    assert main([str(first), "--data_path", cifar, "--max_steps", "1", "--output_dir", str(second), *QUICK]) == 0
    assert "mean pooling" in capsys.readouterr().out  # the run's pooling, --pool not given
    assert yaml.safe_load((second / "args.yaml").read_text())["recipe"] == "crate_cifar"  # fine-tuning: finetune.py's
    assert main([str(second), "--eval", "--data_path", cifar, *QUICK]) == 0
    assert main([str(second), "--eval", "--pool", "cls", "--data_path", cifar, *QUICK]) == 2
    assert "contradicts" in capsys.readouterr().err
    from crate_kernels.probe import main as probe_main

    assert probe_main([str(second), "--data_path", cifar, "--num_workers", "0",
                       "--output_dir", str(tmp_path / "probe")]) == 0
    assert "feature: mean token ([CLS] included)" in capsys.readouterr().out


def test_fine_tuning_a_checkpoint_takes_finetune_py_recipe_on_any_data(tmp_path):
    _release_checkpoint(tmp_path / "r.pth")
    folder = tmp_path / "imagenet"
    for split in ("train", "val"):
        (folder / split / "a").mkdir(parents=True)
    cfg, _ = _completed([str(tmp_path / "r.pth"), "--data_path", str(folder)])
    assert cfg["recipe"] == "crate_cifar" and cfg["epochs"] == 400 and cfg["input_size"] == 32
    cfg, _ = _completed([str(tmp_path / "r.pth"), "--data_path", str(folder), "--recipe", "crate_imagenet"])
    assert cfg["recipe"] == "crate_imagenet" and cfg["smoothing"] == 0.1


def test_a_checkpoint_with_a_tensor_of_no_layer_says_it_has_an_extra_one(tmp_path):
    model = _release_checkpoint(tmp_path / "r.pth")
    found = load_pretrained(str(tmp_path / "r.pth"))
    found.state["transformer.extra.weight"] = torch.zeros(2)
    with pytest.raises(Exception, match="has extra transformer.extra.weight"):
        supervised_classifier(found, 10, log=None)
    assert model is not None
