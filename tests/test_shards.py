"""WebDataset shards: the writer (python -m crate_kernels.pipeline.shards), the training stream's split over
processes and loading workers, its decode path (the image folders'), and exact resume."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile

import pytest
import torch
from image_folders import colour_folder
from safetensors.torch import load_file

pytest.importorskip("webdataset")

from crate_kernels.pipeline.data import ImageFolder, MaskedViews, ShardStream, TrainTransform  # noqa: E402
from crate_kernels.pipeline.data.shards import EncodedImages, shard_samples  # noqa: E402
from crate_kernels.pipeline.shards import main as shards_main  # noqa: E402
from crate_kernels.train import main as train_main  # noqa: E402
from crate_kernels.train.trainer import Trainer  # noqa: E402

TINY = ["--input_size", "16", "--patch_size", "4", "--batch_size", "4", "--log_every", "1", "--no_tensorboard",
        "--eval_every", "0", "--threads", "1", "--warmup_steps", "2", "--blr", "1e-2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """60 JPEGs in three class folders, written as 9 shards of up to 7 samples."""
    root = tmp_path_factory.mktemp("shards")
    colour_folder(root / "images", splits=(("train", 20),), suffix=".jpg")
    assert shards_main([str(root / "images" / "train"), str(root / "out"), "--shard_size", "7", "--seed", "3"]) == 0
    return root


def _pattern(root) -> str:
    return str(root / "out" / "train-{000000..000008}.tar")


def test_the_writer_stores_each_file_unchanged_with_its_class_in_a_mixed_order_and_counts_the_shards(shards, capsys):
    summary = json.loads((shards / "out" / "shards.json").read_text())
    folder = ImageFolder(str(shards / "images" / "train"), None)
    assert summary["images"] == 60 and summary["classes"] == ["blue", "green", "red"]
    assert [s["samples"] for s in summary["shards"]] == [7] * 8 + [4]
    assert sorted(os.listdir(shards / "out")) == ["shards.json"] + [f"train-{i:06d}.tar" for i in range(9)]
    seen = []
    for shard in summary["shards"]:
        with tarfile.open(shards / "out" / shard["name"]) as tar:
            names = tar.getnames()
            assert len(names) == 2 * shard["samples"]
            for name in names:
                key, ext = name.split(".", 1)
                data = tar.extractfile(name).read()
                path, label = folder.samples[int(key)]
                if ext == "cls":
                    assert int(data) == label
                else:
                    assert ext == "jpg" and data == open(path, "rb").read()
                    seen.append(int(key))
    assert sorted(seen) == list(range(60)) and seen != sorted(seen)  # every image once, shuffled across shards
    assert shards_main([str(shards / "images" / "train"), str(shards / "out")]) == 1  # never over existing shards
    assert "already holds shards" in capsys.readouterr().err


def test_processes_and_workers_read_disjoint_shards_and_every_process_makes_the_same_number_of_batches(shards):
    urls = ShardStream(_pattern(shards), None, 0, 4).urls
    for epoch in (0, 1):
        read = []
        for rank in (0, 1):
            stream = ShardStream(_pattern(shards), None, 0, 4, world_size=2, rank=rank, seed=5)
            assert stream.num_batches == 60 // 8 and stream.set_workers(10) == 4  # 9 shards: 4 per process
            for worker in range(4):
                read += stream.worker_shards(epoch, worker)
        assert len(read) == 9 and set(read) == set(urls)  # each shard read by one worker of one process
    orders = [ShardStream(_pattern(shards), None, 0, 4, seed=5).worker_shards(e, 0) for e in (0, 1)]
    assert orders[0] != orders[1]  # each epoch its own order


def test_a_sample_decodes_through_the_image_folders_path(shards):
    """The same file under the same seed gives the same uint8 view and noise from a shard as from the folder."""
    folder = ImageFolder(str(shards / "images" / "train"), TrainTransform(16))
    items = list(shard_samples(str(shards / "out" / "train-000002.tar")))
    for source, ext, data, label in items[:3]:
        index = int(source.rsplit(":", 1)[1])
        a = MaskedViews(folder, 16)[(index, 1234)]
        b = MaskedViews(EncodedImages(TrainTransform(16), items[:1], first=(source, ext, data, label)), 16)[(0, 1234)]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and label == folder.samples[index][1]


def test_an_unreadable_sample_is_replaced_from_the_shuffle_buffer_and_named(tmp_path):
    out = tmp_path / "bad"
    out.mkdir()
    good = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (20, 20), (200, 10, 10)).save(good, format="PNG")
    with tarfile.open(out / "s-0.tar", "w") as tar:
        for i in range(6):
            data = b"not an image" if i == 2 else good.getvalue()
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stream = ShardStream(str(out / "s-0.tar"), TrainTransform(16), 16, 2, epoch_size=40)  # the shard cycled
    samples = list(stream)
    assert len(samples) == 40 and all(s[0] is not None and s[0].shape == (3, 16, 16) for s in samples)
    failures = [f for s in samples for f in s[2]]
    assert failures and all(path.endswith("s-0.tar:0002") for path, _ in failures)


def test_bad_patterns_get_one_clear_line(tmp_path, capsys):
    args = TINY + ["--max_steps", "1", "--output_dir", str(tmp_path / "run"), "--num_workers", "0"]
    assert train_main(args + ["--data_path", str(tmp_path / "none-{000000..000003}.tar")]) == 1
    err = capsys.readouterr().err
    assert "4 shards not found" in err and "none-000000.tar" in err and "Traceback" not in err


def _train(args):
    assert train_main(args) == 0


def test_a_stopped_run_resumes_with_the_uninterrupted_runs_samples_across_an_epoch_end(shards, tmp_path, monkeypatch):
    """Two loading workers (so the round robin and each worker's skip are exercised); 15 batches per epoch: the
    stop at step 7 resumes mid-epoch, and the run goes on into epoch 1. Losses and final weights are bitwise the
    uninterrupted run's."""
    args = TINY + ["--data_path", _pattern(shards), "--max_steps", "20", "--save_every", "100", "--num_workers", "2"]
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    _train(args + ["--output_dir", str(reference)])

    evaluate = Trainer.evaluate

    def stop_at_step_7(self, epoch_end, final):
        if self.step == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # the run's handler: finish the step, save it, stop
        return evaluate(self, epoch_end, final)

    monkeypatch.setattr(Trainer, "evaluate", stop_at_step_7)
    assert train_main(args + ["--output_dir", str(victim)]) == 128 + signal.SIGTERM
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    _train(args + ["--output_dir", str(victim)])

    def records(folder):
        with open(folder / "log.txt") as f:
            return [(r["step"], r["epoch"], r["loss"]) for r in map(json.loads, f) if r["type"] == "train"]

    expected = records(reference)
    assert [s for s, _, _ in expected] == list(range(1, 21)) and expected[-1][1] == 1
    assert records(victim) == expected  # bitwise, every step once
    final_a, final_b = load_file(reference / "model.safetensors"), load_file(victim / "model.safetensors")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


@pytest.mark.e2e
def test_two_processes_train_on_their_own_shards_under_torchrun(shards, tmp_path):
    """Under torchrun each process reads its share of the shards with its own loading workers; both make the same
    number of steps (none waits at an epoch's end), rank 0 evaluates on the first samples."""
    out = tmp_path / "two"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "crate_kernels.train", *TINY, "--data_path", _pattern(shards), "--max_steps", "9", "--eval_every", "9",
         "--num_workers", "2", "--output_dir", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "log.txt") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, 10))  # 7 per epoch: into epoch 1
    assert any(r["type"] == "eval" for r in records)
    assert "2 processes" in proc.stdout and "2 loading workers" in proc.stdout
