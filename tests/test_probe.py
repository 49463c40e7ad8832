"""python -m crate_kernels.probe: the classifiers on synthetic features, end to end on tiny models (a run directory,
a release-format checkpoint, ViT-MAE), the feature cache, unreadable images, and bad inputs."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from image_folders import colour_folder

from crate_kernels import CRATEMAE
from crate_kernels.models.vit_mae import MaskedAutoencoderViT
from crate_kernels.probe import fit_logistic, fit_torch_head, main, random_spread, resolve, topk_accuracy

QUIET = ["--num_workers", "0", "--threads", "0"]


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """An image-folder dataset of 3 classes told apart by colour (red, green, blue noise), 6 train / 3 val each."""
    return colour_folder(tmp_path_factory.mktemp("colours"), (("train", 6), ("val", 3)), suffix=".png")


def test_classifiers_reach_100_percent_on_linearly_separable_features(one_thread):
    k, d = 8, 24
    centres = 6 * torch.randn(k, d)
    y_train, y_test = torch.arange(k).repeat(40), torch.arange(k).repeat(10)
    x_train = centres[y_train] + torch.randn(len(y_train), d)
    x_test = centres[y_test] + torch.randn(len(y_test), d)
    sk = fit_logistic(x_train.numpy(), y_train.numpy(), x_test.numpy(), y_test.numpy(), blas_threads=1)
    assert sk["top1"] >= 99.0 and sk["top5"] == 100.0
    assert set(sk["selection"]) == {"0.001", "0.01", "0.1", "1", "10", "100"}
    cfg = dict(seed=0, head_batch_size=64, lr=None, blr=0.1, weight_decay=0.0, epochs=30, warmup_epochs=3)
    head = fit_torch_head(x_train, y_train, x_test, y_test, k, cfg, torch.device("cpu"))
    assert head["top1"] >= 99.0 and head["final_train_loss"] < 0.1
    shuffled = y_train[torch.randperm(len(y_train))]  # no signal: chance level, not 100%
    assert fit_logistic(x_train.numpy(), shuffled.numpy(), x_test.numpy(), y_test.numpy(), c=1.0)["top1"] < 60


def test_topk_accuracy_counts_labels_among_the_best_scores():
    scores = np.array([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    classes = np.array([4, 7, 9])  # column j scores class classes[j]
    labels = np.array([7, 9, 7])
    assert topk_accuracy(scores, labels, classes, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(scores, labels, classes, 2) == pytest.approx(2 / 3)


def test_probe_end_to_end_with_random_baseline_and_feature_cache(run_dir, colours, tmp_path, capsys):
    out = tmp_path / "probe"
    args = [str(run_dir), "--data_path", str(colours), "--compare_random", "--random_inits", "2",
            "--output_dir", str(out)] + QUIET
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "image folder" in text and "pretrained: top-1" in text
    assert "random init (seed 0): top-1" in text and "random init (seed 1): top-1" in text
    assert "random init, 2 seeds: top-1 mean" in text and "points from the random mean" in text
    jsons = sorted(f for f in os.listdir(out) if f.endswith(".json"))
    assert len(jsons) == 3 and len([f for f in os.listdir(out) if f.endswith(".pt")]) == 3
    results = {name: json.loads((out / name).read_text()) for name in jsons}
    for name, result in results.items():
        assert result["classes"] == 3 and result["train_images"] == 18 and result["test_images"] == 9
        assert "top5" not in result and result["feature_dim"] == 128 and os.path.isfile(result["features"])
        assert result["features"][:-3] == str(out / name)[:-5]  # the JSON lies beside its features
    summary = next(r["compare_random"] for r in results.values() if "compare_random" in r)
    randoms = [r["top1"] for r in results.values() if "compare_random" not in r]
    assert summary["seeds"] == [0, 1] and sorted(summary["random_top1"]) == sorted(randoms)
    assert summary["position"] in ("above", "within", "below") and summary["verdict"] in text
    assert main(args) == 0  # the same command again reuses every feature file
    assert capsys.readouterr().out.count("features: cached") == 3
    assert main(args[:-len(QUIET)] + ["--random_inits", "3"] + QUIET) == 0  # one more seed: one more extraction
    assert capsys.readouterr().out.count("features: cached") == 3 and len(os.listdir(out)) == 8
    assert main(args + ["--pool", "mean", "--layer", "1"]) == 0
    assert "layer1" in capsys.readouterr().out and len(os.listdir(out)) == 14


@pytest.mark.parametrize("trial", range(5))
def test_random_spread_places_the_pretrained_probe_against_the_seeds(trial, rng):
    gen = rng
    randoms = list(gen.uniform(20, 80, gen.integers(2, 7)))
    low, high = min(randoms), max(randoms)
    for pretrained, position in ((high + gen.uniform(0.01, 5), "above"), (low - gen.uniform(0.01, 5), "below"),
                                 (gen.uniform(low, high), "within"), (high, "within"), (low, "within")):
        s = random_spread(pretrained, randoms)
        assert s["position"] == position
        assert s["mean"] == pytest.approx(np.mean(randoms)) and s["std"] == pytest.approx(np.std(randoms, ddof=1))
        assert (s["min"], s["max"]) == (low, high) and s["random_top1"] == randoms
        assert s["difference_from_mean"] == pytest.approx(pretrained - np.mean(randoms))
        assert {"above": "above every", "below": "below every", "within": "within"}[position] in s["verdict"]
        assert f"{len(randoms)} seeds" in s["verdict"] and f"{low:.1f}-{high:.1f}%" in s["verdict"]
    with pytest.raises(ValueError, match="at least 2"):
        random_spread(50.0, randoms[:1])


def test_mae_flags_map_onto_ours():
    cfg = resolve(["--finetune", "a.pth", "--global_pool", "--nb_classes", "10"])
    assert cfg["checkpoint"] == "a.pth" and cfg["pool"] == "mean" and cfg["nb_classes"] == 10
    assert "finetune" not in cfg and "global_pool" not in cfg
    assert resolve(["a.pth", "--finetune", "a.pth", "--cls_token"])["pool"] == "cls"
    assert resolve(["--no_global_pool", "--pool", "cls"])["pool"] == "cls"
    assert resolve([])["pool"] is None  # decided with the checkpoint: [CLS] (the paper's protocol), or the pooling
    # a supervised CRATE run was trained with (tests/test_finetune_supervised.py)


def test_release_checkpoints_of_both_families_probe(colours, tmp_path, capsys):
    crate = CRATEMAE(img_size=16, patch_size=4, embed_dim=128, depth=3, num_heads=4)
    release = tmp_path / "crate_release.pth"
    torch.save({"model": {"module." + k: v for k, v in crate.state_dict().items()}}, release)
    vit = MaskedAutoencoderViT(img_size=16, patch_size=4, embed_dim=128, depth=3, num_heads=4, decoder_embed_dim=128,
                               decoder_depth=3, decoder_num_heads=4)
    encoder_only = tmp_path / "mae_pretrain.pth"
    torch.save({"model": {k: v for k, v in vit.state_dict().items() if not k.startswith(("decoder", "mask"))}},
               encoder_only)
    for path, name in ((release, "demo (CRATE-MAE, 16px, patch 4)"), (encoder_only, "mae_vit_demo (ViT-MAE")):
        assert main([str(path), "--data_path", str(colours), "--classifier", "torch", "--epochs", "20",
                     "--warmup_epochs", "2"] + QUIET) == 0
        text = capsys.readouterr().out
        assert name in text and "[torch linear-probe head]" in text
        assert os.path.isdir(tmp_path / "probe")  # default output: beside the checkpoint


def test_unreadable_images_are_skipped_and_counted(run_dir, colours, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(colours, data)
    (data / "val" / "red" / "1.png").write_bytes(b"broken")
    assert main([str(run_dir), "--data_path", str(data), "--output_dir", str(tmp_path / "o")] + QUIET) == 0
    captured = capsys.readouterr()
    assert f"skipped unreadable image {data / 'val' / 'red' / '1.png'} (" in captured.err
    assert "left out with its label" in captured.err
    result = json.loads(next((tmp_path / "o").glob("*.json")).read_text())
    assert result["test_images"] == 8 and result["unreadable_skipped"] == 1


def _exit_code(args):
    try:
        return main(args)
    except SystemExit as e:  # argparse's own errors (unknown flag, invalid choice)
        return e.code


@pytest.mark.parametrize("extra, code, message", [
    (["--pool", "max"], 2, "argument --pool: invalid choice: 'max'"),
    (["--logreg_c", "0"], 2, "--logreg_c must be positive, got 0.0"),
    (["--layer", "3"], 2, "--layer must lie in [-3, 3) for this 3-layer encoder, got 3"),
    (["--input_size", "18"], 2, "--input_size (18) must be a multiple of the checkpoint's patch size (4)"),
    (["--data_path", "NOWHERE"], 1, "--data_path NOWHERE does not exist"),
    (["--model", "crate_mae_base"], 1, "--model crate_mae_base contradicts"),
    (["--nb_classes", "1000"], 2, "--nb_classes 1000 disagrees with the data: "),
    (["--finetune", "other.pth"], 2, "--finetune other.pth and the positional checkpoint"),
    (["--global_pool", "--pool", "cls"], 2, "--global_pool and --pool cls ask for different pooling"),
    (["--cls_token", "--global_pool"], 2, "ask for different pooling"),
    (["--compare_random", "--random_inits", "1"], 2, "--random_inits must be at least 2"),
])
def test_bad_inputs_are_one_message_before_any_output(run_dir, tmp_path, extra, code, message, capfd):
    out = tmp_path / "never"
    nowhere = str(tmp_path / "x")
    args = [str(run_dir), "--output_dir", str(out)] + QUIET + [a.replace("NOWHERE", nowhere) for a in extra]
    assert _exit_code(args) == code
    err = capfd.readouterr().err
    assert message.replace("NOWHERE", nowhere) in err and "Traceback" not in err
    assert not out.exists()


def test_missing_checkpoint_is_named(tmp_path, capsys):
    assert main([str(tmp_path / "none.pth")] + QUIET) == 1
    assert f"checkpoint {tmp_path / 'none.pth'} does not exist" in capsys.readouterr().err


