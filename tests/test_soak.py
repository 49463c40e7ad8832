"""Soak: 1,000 training steps of a tiny model on CPU (with a data-loading worker), twice with the same seed.
Resident memory stays flat after warm-up, and the two runs end on the same loss.

Slow (a few minutes), so not part of the default run: `pytest tests/test_soak.py --run-slow` (or CRATE_SLOW=1).
"""
import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

STEPS = 1000
ARGS = ["--input_size", "16", "--patch_size", "4", "--epoch_size", "256", "--batch_size", "8", "--eval_every", "0",
        "--no_tensorboard", "--num_workers", "1", "--threads", "1", "--log_every", "50", "--save_every", "250",
        "--seed", "11", "--max_steps", str(STEPS)]


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _run(out: str) -> tuple[list[dict], list[tuple[int, int]]]:
    """Train, sampling the main process's resident memory against the logged step."""
    proc = subprocess.Popen([sys.executable, "-m", "crate_kernels.train", *ARGS, "--output_dir", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples, log = [], os.path.join(out, "log.txt")
    while proc.poll() is None:
        try:
            step = max((json.loads(line).get("step", 0) for line in open(log) if line.endswith("\n")), default=0)
            samples.append((step, _rss_kib(proc.pid)))
        except (OSError, ValueError, StopIteration):
            pass
        time.sleep(0.2)
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
    return [json.loads(line) for line in open(log) if '"train"' in line], samples


def test_thousand_steps_keep_memory_flat_and_reproduce(tmp_path):
    first, rss = _run(str(tmp_path / "a"))
    second, _ = _run(str(tmp_path / "b"))
    assert [r["step"] for r in first][-1] == STEPS
    assert first[-1]["loss"] == second[-1]["loss"]  # bitwise: same seed, same steps
    warm = [kib for step, kib in rss if STEPS * 0.2 <= step < STEPS * 0.3]
    end = [kib for step, kib in rss if step >= STEPS * 0.9]
    assert warm and end, rss
    growth = max(end) / max(warm) - 1
    assert growth < 0.05, f"resident memory grew {growth:.1%} from steps 200-300 to 900-1000: {rss[::10]}"
