"""Checkpoint files: atomic writes, RNG states that load with weights_only=True, the output-directory lock."""
import os
import random

import numpy as np
import pytest
import torch

from crate_kernels import checkpoint
from crate_kernels.checkpoint import OutputLock
from crate_kernels.errors import TrainError


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
    second.release(remove=True)
    assert not os.path.exists(second.path)


def test_output_lock_taken_on_a_file_its_holder_just_removed_is_taken_again_on_the_new_file(tmp_path, monkeypatch):
    """A run that ends removes .lock; one that opened it just before locks a file nobody else can see: acquire
    must notice and lock the file at the path instead, so two runs never hold the folder at once."""
    lock, opened = OutputLock(str(tmp_path)), []

    def open_then_holder_removes(path, mode):
        handle = open(path, mode)
        if not opened:
            os.remove(path)  # the previous holder's release(remove=True), between our open and our flock
        opened.append(handle)
        return handle

    monkeypatch.setattr(checkpoint, "open", open_then_holder_removes, raising=False)
    assert lock.acquire() and len(opened) == 2 and opened[0].closed
    assert os.fstat(lock.file.fileno()).st_ino == os.stat(lock.path).st_ino
    monkeypatch.undo()
    assert not OutputLock(str(tmp_path)).acquire()
    lock.release(remove=True)


def _flip_byte(path, position):
    data = bytearray(open(path, "rb").read())
    data[position] ^= 0x10
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("where", [0.05, 0.5, 0.98])
def test_a_corrupted_checkpoint_is_refused_naming_it(tmp_path, where):
    """torch.load itself reads flipped tensor bytes without complaint; the SHA-256 in the archive's comment
    catches them, wherever they are."""
    path = str(tmp_path / "checkpoint-last.pth")
    state = {"model": {"w": torch.randn(300, 300), "b": torch.randn(5)}, "step": 7}
    checkpoint.save(state, path)
    torch.testing.assert_close(checkpoint.load(path)["model"], state["model"], rtol=0, atol=0)
    size = os.path.getsize(path)
    _flip_byte(path, int(size * where))
    with pytest.raises(TrainError, match=f"checkpoint {path} is corrupted"):
        checkpoint.load(path)
    plain = str(tmp_path / "release.pth")  # files written elsewhere carry no digest and load as before
    torch.save(state, plain)
    assert checkpoint.load(plain)["step"] == 7


def test_a_corrupted_safetensors_file_is_refused(tmp_path):
    path = str(tmp_path / "model.safetensors")
    checkpoint.save_safetensors({"w": torch.randn(200, 200), "half": torch.randn(9).half()}, path)
    assert checkpoint.load(path)["model"]["half"].dtype == torch.float16
    _flip_byte(path, os.path.getsize(path) - 100)
    with pytest.raises(TrainError, match="is corrupted"):
        checkpoint.load(path)
