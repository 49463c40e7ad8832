"""End-to-end training runs on CPU with a tiny configuration: outputs, exact resume after SIGKILL,
2-process DDP against 1 process, and the failure behaviours (NaN loss, incompatible checkpoint, busy output dir)."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from crate_kernels import CRATEMAE, checkpoint, load_checkpoint
from crate_kernels.checkpoint import OutputLock
from crate_kernels.train import load_run, main
from crate_kernels.train.config import resolve
from crate_kernels.train.trainer import build_model

pytestmark = pytest.mark.e2e  # whole training runs: python -m crate_kernels.train, torchrun, or main() in process
# 16x16 images, 16 patches, the demo architecture (3 + 3 layers); batches of 4 from 24 crops per epoch.
TINY = ["--input_size", "16", "--patch_size", "4", "--epoch_size", "24", "--batch_size", "4", "--eval_every", "0",
        "--no_tensorboard", "--num_workers", "0", "--log_every", "1", "--seed", "5", "--warmup_steps", "3",
        "--blr", "1e-2"]
IN_PROCESS = TINY + ["--threads", "0"]  # leave the test process's thread count alone


def _cli(args, **kwargs):
    return subprocess.run([sys.executable, "-m", "crate_kernels.train", *args], capture_output=True, text=True,
                          timeout=300, **kwargs)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _records(folder, kind="train"):
    """Complete JSON lines of a (possibly still growing) log.txt."""
    path = os.path.join(folder, "log.txt")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):
                record = json.loads(line)
                if record["type"] == kind:
                    out.append(record)
    return out


def test_run_writes_every_output_and_a_finished_run_resumes_to_nothing(tmp_path):
    out = str(tmp_path / "run")
    args = IN_PROCESS + ["--max_steps", "4", "--save_every", "2", "--eval_every", "2", "--eval_images", "2",
                         "--output_dir", out]
    assert main(args) == 0
    files = set(os.listdir(out))
    expected = {"args.yaml", "log.txt", "checkpoint-last.pth", "checkpoint-0.pth", "model.safetensors",
                "recon-latest.png", "recon-step0000000.png", "recon-step0000002.png", "recon-step0000004.png"}
    assert expected <= files and not [f for f in files if f.endswith(".tmp")] and ".lock" not in files
    if "curves.png" not in files:
        pytest.importorskip("matplotlib")
        raise AssertionError("curves.png missing although matplotlib is installed")
    assert [r["step"] for r in _records(out)] == [1, 2, 3, 4]
    evals = _records(out, "eval")
    assert [r["step"] for r in evals] == [0, 2, 4] and len(evals[0]["coding_rate"]) == 3
    ckpt = checkpoint.load(os.path.join(out, "checkpoint-last.pth"))
    assert ckpt["step"] == 4 and ckpt["args"]["max_steps"] == 4 and "optimizer" in ckpt and ckpt["rng"]
    cfg = resolve(args)
    model = build_model(cfg)
    load_checkpoint(model, os.path.join(out, "model.safetensors"))
    torch.testing.assert_close(model.state_dict(), ckpt["model"], rtol=0, atol=0)
    assert main(args) == 0  # auto-resume of a finished run: no step, same files
    assert [r["step"] for r in _records(out)] == [1, 2, 3, 4]
    trained = load_run(out)
    assert not trained.training and trained.patch_size == 4
    torch.testing.assert_close(trained.state_dict(), ckpt["model"], rtol=0, atol=0)
    os.remove(os.path.join(out, "model.safetensors"))  # a run still going: its last checkpoint
    torch.testing.assert_close(load_run(out).state_dict(), ckpt["model"], rtol=0, atol=0)
    with pytest.raises(checkpoint.TrainError, match="no args.yaml"):
        load_run(str(tmp_path))


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    args = TINY + ["--threads", "1", "--max_steps", "120", "--save_every", "10"]
    reference, victim = str(tmp_path / "reference"), str(tmp_path / "victim")
    _ok(_cli(args + ["--output_dir", reference]))

    proc = subprocess.Popen([sys.executable, "-m", "crate_kernels.train", *args, "--output_dir", victim],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not any(r["step"] >= 25 for r in _records(victim)):
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = checkpoint.load(os.path.join(victim, "checkpoint-last.pth"))["step"]
    assert 20 <= killed_at < 120

    resumed = _ok(_cli(args + ["--output_dir", victim]))
    assert f"resumed from {victim}/checkpoint-last.pth at step {killed_at}" in resumed.stdout
    expected = [(r["step"], r["loss"]) for r in _records(reference)]
    assert [(r["step"], r["loss"]) for r in _records(victim)] == expected  # bitwise, every step once
    final_a = load_file(os.path.join(reference, "model.safetensors"))
    final_b = load_file(os.path.join(victim, "model.safetensors"))
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    args = TINY + ["--max_steps", "6", "--save_every", "3", "--accum_iter", "2"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _ok(_cli(args + ["--batch_size", "4", "--output_dir", one, "--threads", "1"]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "crate_kernels.train", *args, "--batch_size", "2", "--output_dir", two],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    _ok(proc)
    a, b = _records(one), _records(two)
    assert [r["step"] for r in b] == list(range(1, 7))  # rank 0 alone logs
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in b]), torch.tensor([r["loss"] for r in a]),
                               rtol=1e-4, atol=1e-6)
    ckpt = checkpoint.load(os.path.join(two, "checkpoint-last.pth"))
    assert ckpt["args"]["world_size"] == 2 and len(ckpt["rng"]) == 2
    torch.testing.assert_close(load_file(os.path.join(two, "model.safetensors")),
                               load_file(os.path.join(one, "model.safetensors")), rtol=1e-3, atol=1e-4)


def _survivors(pgid: int) -> list[str]:
    """Live (not zombie) processes of a process group, as 'pid command' strings (Linux /proc)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(f"{entry} {stat[stat.index('(') + 1:stat.rindex(')')]}")
    return alive


def _start_readme_job(args, out):
    """``python -m crate_kernels.train`` with the README's defaults (demo preset, its data-loading worker,
    evaluation and plots) plus ``args``, in a session of its own, as a user's terminal would run it."""
    return subprocess.Popen([sys.executable, "-m", "crate_kernels.train", *args, "--output_dir", out],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc, limit):
    """Wait at most ``limit`` seconds for the run to end on its own; fail (and clean up) if it does not, or if
    any process of its session is left behind."""
    try:
        stdout, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        left = _survivors(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"the run did not exit within {limit} s; processes: {left}") from None
    left = _survivors(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"processes left behind after exit: {left}"
    return stdout, stderr


def test_readme_main_job_exits_on_its_own_and_leaves_no_process(tmp_path):
    """The README's main job as a user runs it (default workers, evaluation, curves.png when matplotlib is
    installed), cut to a few steps: status 0 within a limit, every output written, nothing left running."""
    out = str(tmp_path / "run")
    started = time.time()
    stdout, stderr = _finish(_start_readme_job(["--max_steps", "3"], out), limit=150)
    assert f"done: 3 steps; outputs in {out}" in stdout, stderr[-2000:]
    assert "1 loading worker" in stdout and "Traceback" not in stderr, stderr[-2000:]
    files = set(os.listdir(out))
    assert {"checkpoint-last.pth", "model.safetensors", "recon-latest.png", "log.txt", "args.yaml"} <= files
    if importlib.util.find_spec("matplotlib") is not None:
        assert "curves.png" in files
    assert time.time() - started < 150


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_to_the_whole_job_saves_the_step_and_resumes_from_it(tmp_path, signum):
    """A scheduler's SIGTERM or a Ctrl-C reaches every process of the job (data-loading workers too): the run of
    the README's main job finishes its step, saves checkpoint-last.pth, exits 128 + signal within seconds, leaves
    no process behind, and the same command continues from there."""
    out = str(tmp_path / "run")
    args = ["--max_steps", "400", "--save_every", "1000"]
    proc = _start_readme_job(args, out)
    deadline = time.time() + 240
    while not any(r["step"] >= 10 for r in _records(out)):
        assert proc.poll() is None, "the run finished before it could be stopped"
        assert time.time() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signum)  # the process group: main process and its workers, as a scheduler or terminal does
    signalled = time.time()
    stdout, stderr = _finish(proc, limit=60)
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert time.time() - signalled < 30
    stopped_at = checkpoint.load(os.path.join(out, "checkpoint-last.pth"))["step"]
    assert 10 <= stopped_at < 400  # periodic saves come every 1000 steps and at epoch ends (every 64 steps)
    assert f"stopped by {signal.Signals(signum).name} at step {stopped_at}" in stdout
    assert max(r["step"] for r in _records(out)) <= stopped_at  # no step logged after the one it saved
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-2000:]
    resumed = _ok(_cli(["--max_steps", str(stopped_at + 2), "--save_every", "1000", "--output_dir", out]))
    assert f"resumed from {out}/checkpoint-last.pth at step {stopped_at}" in resumed.stdout


def test_too_many_unreadable_images_stop_the_run_with_one_message(tmp_path):
    data = tmp_path / "data"
    for i in range(16):
        (data / "x").mkdir(parents=True, exist_ok=True)
        if i % 4 == 0:  # a quarter of the files
            (data / "x" / f"{i}.jpg").write_bytes(b"not a jpeg")
        else:
            Image.fromarray(torch.randint(0, 256, (20, 20, 3), dtype=torch.uint8).numpy()).save(data / "x" / f"{i}.png")
    out = str(tmp_path / "run")
    args = TINY + ["--threads", "1", "--num_workers", "2", "--max_steps", "20", "--data_path", str(data)]
    stdout, stderr = _finish(_start_readme_job(args, out), limit=120)
    lines = [line for line in stderr.splitlines() if line.startswith("crate-train: error")]
    assert len(lines) == 1 and "more than --max_unreadable 0.01" in lines[0] and "Traceback" not in stderr, stderr
    assert stderr.count("warning: skipped unreadable image") == len(set(
        line.split(" (")[0] for line in stderr.splitlines() if "warning: skipped" in line))


def test_one_process_stopping_on_unreadable_images_stops_the_whole_ddp_job(tmp_path):
    """The one unreadable file is read by one rank only: every rank stops at that step, and the job's one error line
    (printed by rank 0) names the file another rank found."""
    data = tmp_path / "data" / "x"
    data.mkdir(parents=True)
    for i in range(15):
        Image.fromarray(torch.randint(0, 256, (20, 20, 3), dtype=torch.uint8).numpy()).save(data / f"{i}.png")
    (data / "bad.jpg").write_bytes(b"not a jpeg")
    args = TINY + ["--max_steps", "12", "--batch_size", "2", "--max_unreadable", "0", "--data_path",
                   str(tmp_path / "data"), "--output_dir", str(tmp_path / "run")]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "crate_kernels.train", *args],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("crate-train: error")]
    assert len(errors) == 1 and "more than --max_unreadable 0" in errors[0] and "bad.jpg" in errors[0], proc.stderr


def test_a_failed_start_leaves_no_output_directory_and_no_lock(tmp_path, capsys):
    out = tmp_path / "new"
    assert main(IN_PROCESS + ["--max_steps", "1", "--dataset", "imagefolder", "--output_dir", str(out)]) == 1
    assert "needs --data_path" in capsys.readouterr().err and not out.exists()
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert main(IN_PROCESS + ["--max_steps", "1", "--resume", str(bad), "--output_dir", str(out)]) == 1
    assert f"cannot read checkpoint {bad}" in capsys.readouterr().err and not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    assert main(IN_PROCESS + ["--max_steps", "1", "--resume", str(bad), "--output_dir", str(existing)]) == 1
    assert existing.is_dir() and os.listdir(existing) == []


def test_resume_flag_then_own_checkpoint_takes_precedence(tmp_path, capsys):
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    assert main(IN_PROCESS + ["--max_steps", "4", "--output_dir", first]) == 0
    again = IN_PROCESS + ["--max_steps", "6", "--resume", f"{first}/checkpoint-last.pth", "--output_dir", second]
    assert main(again) == 0
    assert f"resumed from {first}/checkpoint-last.pth at step 4" in capsys.readouterr().out
    assert [r["step"] for r in _records(second)] == [5, 6]
    assert main(again) == 0  # the same command again continues the second run, not the first
    captured = capsys.readouterr()
    assert f"resumed from {second}/checkpoint-last.pth at step 6" in captured.out
    assert f"--resume {first}/checkpoint-last.pth is not used: {second}/checkpoint-last.pth continues" in captured.err


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    calls = []
    original = CRATEMAE.forward_loss

    def poisoned(self, imgs, pred, mask):
        calls.append(1)
        loss = original(self, imgs, pred, mask)
        return loss * float("nan") if len(calls) == 11 else loss

    monkeypatch.setattr(CRATEMAE, "forward_loss", poisoned)
    out = tmp_path / "run"
    # the loss is read only at log steps (every 10) and before checkpoints (steps 4, 6 (epoch end), 8, 12):
    # step 11 is poisoned, found at step 12's save, which is not written
    args = IN_PROCESS + ["--max_steps", "20", "--save_every", "4", "--log_every", "10", "--output_dir", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "the loss is not finite at step 11 (epoch 1)" in err
    assert f"{out}/checkpoint-last.pth (step 8), was kept" in err
    ckpt = checkpoint.load(str(out / "checkpoint-last.pth"))
    assert ckpt["step"] == 8 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (out / "model.safetensors").exists()


def test_incompatible_checkpoint_is_refused_naming_the_tensors(tmp_path, capsys):
    other = CRATEMAE(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4)
    path = tmp_path / "other.pth"
    torch.save({"model": other.state_dict()}, path)
    out = str(tmp_path / "run")
    assert main(IN_PROCESS + ["--max_steps", "2", "--resume", str(path), "--output_dir", out]) == 1
    err = capsys.readouterr().err
    assert f"cannot resume from {path}" in err
    assert "61 mismatched tensors" in err and "cls_token: checkpoint (1, 1, 64) vs model (1, 1, 128)" in err
    assert "... and 58 more" in err  # the first 3 are named, not all 61


@pytest.mark.parametrize("form", ["bare-state-dict.pth", "model.safetensors"])
def test_resume_from_weights_alone_initialises_the_model(tmp_path, capsys, form):
    """--resume takes weights without training state: a bare state_dict (.pth) or a .safetensors file."""
    first = tmp_path / "first"
    assert main(IN_PROCESS + ["--max_steps", "2", "--output_dir", str(first)]) == 0
    weights = load_file(str(first / "model.safetensors"))
    path = first / "model.safetensors" if form.endswith(".safetensors") else tmp_path / form
    if form.endswith(".pth"):
        torch.save(weights, path)
    second = tmp_path / "second"
    assert main(IN_PROCESS + ["--max_steps", "1", "--resume", str(path), "--output_dir", str(second)]) == 0
    assert f"initialised the model from {path} (no training state in it): starting at step 0" in capsys.readouterr().out


def test_backend_the_device_cannot_run_is_refused_before_any_output(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # conftest sets it for the kernel tests
    out = tmp_path / "run"
    args = IN_PROCESS + ["--max_steps", "1", "--backend", "cuda", "--device", "cpu", "--output_dir", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "--backend cuda cannot run on cpu" in err and "needs CUDA tensors" in err and "backend 'torch'" in err
    assert not out.exists()


def test_misspelt_backend_variable_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CRATE_KERNELS_BACKEND", "Torch")
    assert main(IN_PROCESS + ["--max_steps", "1", "--output_dir", str(tmp_path / "run")]) == 1
    assert "CRATE_KERNELS_BACKEND" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_backend_defaults_to_the_process_wide_setting(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CRATE_KERNELS_BACKEND", "reference")
    assert resolve([])["backend"] is None
    assert main(IN_PROCESS + ["--max_steps", "1", "--output_dir", str(tmp_path / "run")]) == 0
    assert "backend reference)" in capsys.readouterr().out


def test_optimizer_state_of_another_model_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(IN_PROCESS + ["--max_steps", "1", "--output_dir", str(out)]) == 0
    ckpt = checkpoint.load(str(out / "checkpoint-last.pth"))
    group = ckpt["optimizer"]["param_groups"][1]
    dropped = group["param_names"].pop()
    group["params"].pop()
    bad = tmp_path / "bad.pth"
    torch.save(ckpt, bad)
    assert main(IN_PROCESS + ["--max_steps", "2", "--resume", str(bad), "--output_dir", str(tmp_path / "new")]) == 1
    err = capsys.readouterr().err
    assert "optimizer state does not fit" in err and dropped in err


def test_second_run_on_the_same_output_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    holder = OutputLock(str(out))
    assert holder.acquire()
    try:
        assert main(IN_PROCESS + ["--max_steps", "1", "--output_dir", str(out)]) == 1
    finally:
        holder.release()
    err = capsys.readouterr().err
    assert f"output directory {out} is in use by another run (process {os.getpid()}" in err
    assert not (out / "checkpoint-last.pth").exists()


def test_bad_flag_values_exit_2_naming_the_flag(capsys):
    assert main(["--mask_ratio", "1.5"]) == 2
    assert "--mask_ratio must lie in [0, 1), got 1.5" in capsys.readouterr().err


def test_the_step_loop_reads_the_loss_only_at_reports(tmp_path, monkeypatch):
    """The loss stays on the device: 40 steps with one report and one checkpoint read it a handful of times,
    not once per step (each read makes the host wait for the GPU)."""
    reads = []
    item = torch.Tensor.item

    def counted_item(self):  # reads made by this package (torch's CPU AdamW reads its CPU step counts)
        caller = sys._getframe(1).f_code.co_filename
        if os.sep + "crate_kernels" + os.sep in caller:
            reads.append(caller)
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    args = IN_PROCESS + ["--epoch_size", "200", "--max_steps", "40", "--log_every", "100", "--save_every", "1000",
                         "--output_dir", str(tmp_path / "run")]
    assert main(args) == 0
    assert [r["step"] for r in _records(str(tmp_path / "run"))] == [40]
    assert 1 <= len(reads) <= 6, f"{len(reads)} reads of device values in 40 steps"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA synchronisation exists only on a GPU")
def test_cuda_train_steps_never_synchronise(tmp_path, monkeypatch):
    from crate_kernels.train.trainer import Trainer

    step = Trainer.train_step
    calls = []

    def strict_step(self, batches):
        calls.append(1)
        if len(calls) == 1:  # the first step allocates and autotunes
            return step(self, batches)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(self, batches)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(Trainer, "train_step", strict_step)
    args = IN_PROCESS + ["--device", "cuda", "--max_steps", "5", "--log_every", "100", "--output_dir", str(tmp_path)]
    assert main(args) == 0 and len(calls) == 5


def _losses(out):
    return torch.tensor([r["loss"] for r in _records(out)])


def test_grad_checkpointing_and_compile_train_the_same_steps(tmp_path, monkeypatch, capsys):
    """--grad_checkpointing recomputes layers with the same losses; --compile runs the step's model under
    torch.compile (here through the aot_eager backend, to keep the test short: Inductor is tested on the model)
    with losses equal to eager within float32 tolerance and its compilation time said once."""
    base = IN_PROCESS + ["--max_steps", "6"]
    assert main(base + ["--output_dir", str(tmp_path / "plain")]) == 0
    assert main(base + ["--grad_checkpointing", "--output_dir", str(tmp_path / "ckpt")]) == 0
    torch.testing.assert_close(_losses(str(tmp_path / "ckpt")), _losses(str(tmp_path / "plain")), rtol=1e-6, atol=0)
    compile_ = torch.compile
    compiled = []

    def eager_compile(model, **kw):
        compiled.append(model)
        return compile_(model, backend="aot_eager", fullgraph=True)

    monkeypatch.setattr(torch, "compile", eager_compile)
    torch._dynamo.reset()
    capsys.readouterr()
    assert main(base + ["--compile", "--output_dir", str(tmp_path / "compiled")]) == 0
    out = capsys.readouterr().out
    assert len(compiled) == 1 and out.count("torch.compile: the first step (compiling the model) took") == 1
    assert "first step: operators under backend auto are tuned on it" in out and out.count("first step took ") == 1
    records = _records(str(tmp_path / "compiled"))
    assert "first_step_s" in records[0] and all("first_step_s" not in r for r in records[1:])
    torch.testing.assert_close(_losses(str(tmp_path / "compiled")), _losses(str(tmp_path / "plain")), rtol=1e-5, atol=0)


def test_a_corrupted_last_checkpoint_offers_the_previous_numbered_one(tmp_path, capsys):
    out = tmp_path / "run"
    args = IN_PROCESS + ["--save_every_epochs", "1", "--output_dir", str(out)]
    assert main(args + ["--max_steps", "13"]) == 0  # epochs of 6 steps: checkpoint-0.pth, -1.pth, -2.pth (final)
    last = out / "checkpoint-last.pth"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x01
    last.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(args + ["--max_steps", "14"]) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {last} is corrupted" in err
    assert f"the newest readable earlier checkpoint is {out}/checkpoint-2.pth" in err
    assert main(args + ["--max_steps", "14", "--resume", str(out / "checkpoint-1.pth")]) == 0
    captured = capsys.readouterr()
    assert "written with it; continuing from --resume" in captured.err
    assert f"resumed from {out}/checkpoint-1.pth at step 12" in captured.out
    assert checkpoint.load(str(last))["step"] == 14  # the corrupted file was replaced


def test_a_full_disk_stops_the_run_with_one_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    import errno

    save = checkpoint.save
    calls = []

    def disk_fills(obj, path):
        calls.append(path)
        if len(calls) == 3:  # saves at steps 2, 4, then the disk is full at step 6
            with open(path + ".partial", "wb") as f:
                f.write(b"x")
            os.remove(path + ".partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        save(obj, path)

    monkeypatch.setattr(checkpoint, "save", disk_fills)
    out = tmp_path / "run"
    assert main(IN_PROCESS + ["--max_steps", "10", "--save_every", "2", "--output_dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "checkpoint-last.pth (step 4) is intact" in err
    assert err.count("crate-train: error") == 1 and "Traceback" not in err
    monkeypatch.undo()
    assert checkpoint.load(str(out / "checkpoint-last.pth"))["step"] == 4
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert main(IN_PROCESS + ["--max_steps", "10", "--save_every", "2", "--output_dir", str(out)]) == 0
