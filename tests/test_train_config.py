"""Configuration: presets, YAML + CLI precedence, flag spellings, validation messages, args.yaml round trip."""
import pytest

from crate_kernels.errors import ConfigError
from crate_kernels.train.config import DEFAULTS, PRESETS, load_yaml, resolve, save_yaml


def test_no_arguments_is_the_demo_preset():
    cfg = resolve([])
    assert cfg["model"] == "demo"
    for key, value in PRESETS["demo"].items():
        assert cfg[key] == value
    assert cfg["lr"] == pytest.approx(cfg["blr"] * cfg["batch_size"] / 256)


def test_model_preset_uses_the_mae_recipe():
    cfg = resolve(["--model", "crate_mae_base"])
    assert (cfg["input_size"], cfg["patch_size"], cfg["epochs"], cfg["warmup_epochs"]) == (224, 16, 800, 40.0)
    assert cfg["blr"] == 1.5e-4 and cfg["weight_decay"] == 0.05 and cfg["mask_ratio"] == 0.75


def test_lr_scales_with_the_effective_batch():
    cfg = resolve(["--batch_size", "32", "--accum_iter", "4", "--blr", "1e-3"], world_size=8)
    assert cfg["lr"] == pytest.approx(1e-3 * 32 * 4 * 8 / 256)
    assert resolve(["--lr", "0.5"], world_size=8)["lr"] == 0.5


def test_yaml_values_and_cli_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: crate_mae_small\nbatch_size: 16\nblr: 1e-4\nnorm-pix-loss: true\nepochs: 3\n")
    cfg = resolve(["--config", str(path), "--batch-size", "8", "--no_norm_pix_loss"])
    assert cfg["model"] == "crate_mae_small" and cfg["input_size"] == 224  # preset of the YAML's model
    assert cfg["batch_size"] == 8 and cfg["norm_pix_loss"] is False  # CLI wins
    assert cfg["blr"] == 1e-4 and isinstance(cfg["blr"], float)  # "1e-4" is a string to YAML
    assert cfg["epochs"] == 3


def test_cli_model_preset_under_yaml_values(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("input_size: 96\n")
    cfg = resolve(["--config", str(path), "--model", "demo"])
    assert cfg["input_size"] == 96 and cfg["patch_size"] == PRESETS["demo"]["patch_size"]


@pytest.mark.parametrize("text, message", [
    ("batch_sise: 4\n", "unknown key 'batch_sise'"),
    ("batch_size: 6.5\n", "--batch_size expects an integer, got 6.5"),
    ("norm_pix_loss: maybe\n", "--norm_pix_loss expects true or false"),
    ("model: huge\n", "--model must be one of"),
    ("- 1\n- 2\n", "expected a mapping"),
])
def test_bad_yaml_is_named(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_yaml(str(path))


@pytest.mark.parametrize("argv, message", [
    (["--mask_ratio", "1.0"], "--mask_ratio must lie in"),
    (["--input_size", "60"], "--input_size .60. must be a multiple of --patch_size"),
    (["--batch_size", "0"], "--batch_size must be positive"),
    (["--weight_decay", "-1"], "--weight_decay must be >= 0"),
])
def test_bad_values_are_named(argv, message):
    with pytest.raises(ConfigError, match=message):
        resolve(argv)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        resolve(["--config", str(tmp_path / "nope.yaml")])


def test_args_yaml_round_trips(tmp_path):
    cfg = resolve(["--batch_size", "8", "--clip_grad", "1.0"])
    save_yaml(cfg, str(tmp_path / "args.yaml"), header="# a comment\n")
    again = resolve(["--config", str(tmp_path / "args.yaml")])
    assert again == cfg
    assert set(cfg) == set(DEFAULTS) | {"lr_from_blr"}


def test_args_yaml_keeps_a_derived_lr_derived(tmp_path):
    """Reused as --config, args.yaml must not pin the old lr: --blr and the batch size beside it still set it."""
    cfg = resolve(["--batch_size", "8"])
    text = save_yaml(cfg, str(tmp_path / "args.yaml"))
    assert "lr: null" in text and f"# lr = blr x effective batch / 256 = {cfg['lr']:.6g}" in text
    again = resolve(["--config", str(tmp_path / "args.yaml"), "--blr", "1e-3", "--batch_size", "32"])
    assert again["lr"] == pytest.approx(1e-3 * 32 / 256)
    pinned = resolve(["--lr", "0.25"])
    save_yaml(pinned, str(tmp_path / "pinned.yaml"))
    assert resolve(["--config", str(tmp_path / "pinned.yaml"), "--blr", "1e-3"])["lr"] == 0.25

