"""Checkpoint files: atomic writes, RNG states that load with weights_only=True, the output-directory lock."""
import os
import random

import numpy as np
import pytest
import torch

from crate_kernels.pipeline import checkpoint
from crate_kernels.pipeline.checkpoint import OutputLock, TrainError


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint-last.pth")
    checkpoint.save({"model": {"w": torch.ones(3)}, "step": 1}, path)
    before = open(path, "rb").read()

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save({"model": {"w": torch.zeros(3)}, "step": 2}, path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["checkpoint-last.pth"]  # no temporary file left behind
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(TrainError, match="does not exist"):
        checkpoint.load(str(tmp_path / "missing.pth"))
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(TrainError, match="truncated.pth"):
        checkpoint.load(str(bad))
    foreign = tmp_path / "foreign.pth"
    torch.save({"epoch": 3, "note": "not weights"}, foreign)
    with pytest.raises(TrainError, match="foreign.pth holds neither a training checkpoint nor model weights"):
        checkpoint.load(str(foreign))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(TrainError, match="broken.safetensors"):
        checkpoint.load(str(broken))


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    path = str(tmp_path / "rng.pth")
    checkpoint.save({"model": {}, "rng": [checkpoint.rng_state()]}, path)
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], np.random.randn())
    checkpoint.set_rng_state(checkpoint.load(path)["rng"][0])
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], np.random.randn())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2] == got[2] and expected[3] == got[3]


def test_output_lock_is_exclusive_and_released(tmp_path):
    first, second = OutputLock(str(tmp_path)), OutputLock(str(tmp_path))
    assert first.acquire()
    assert not second.acquire()
    assert second.holder() == str(os.getpid())
    first.release()
    assert second.acquire()
    second.release()
