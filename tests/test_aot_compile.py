"""Every Triton kernel compiled ahead of time for sm_90 and sm_80 (no GPU needed), and the keys that decide
when the runtime retunes or recompiles.

Both run in a child process without TRITON_INTERPRET (tests/conftest.py sets it on CPU, which turns kernels into
interpreted functions that cannot be compiled). The compile's table of registers, spills and shared memory per
config goes to the test output.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crate_kernels.ops import ista, mssa

pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (its compiler and ptxas)")

ROOT = Path(__file__).resolve().parent.parent


def _python(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_kernel_compiles_for_sm90_and_sm80(tmp_path, capsys):
    report = tmp_path / "aot.json"
    proc = _python(["-m", "crate_kernels.ops.aot", "--arch", "90", "--arch", "80", "--jobs", "2",
                    "--json", str(report)], timeout=900)
    with capsys.disabled():  # the per-config table belongs in the test log
        print(f"\n{proc.stdout}{proc.stderr[-3000:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["problems"] == []
    for name in (*mssa.TRITON_KERNELS, *ista.TRITON_KERNELS):
        for arch in ("90", "80"):
            counts = data["summary"][name][arch]
            assert counts["configs"] >= 2 and counts["errors"] == 0, (name, arch, counts)
    assert all(r["regs"] for r in data["results"]), "ptxas reported no register count"


_KEYS = """
import json, sys, torch
from crate_kernels.ops import aot, ista, mssa

def keys(run):
    return [aot.launch_keys(launch) for launch in aot.capture(run)]

def mssa_keys(batch):
    w = torch.randn(batch, 197, 12, 64, dtype=torch.bfloat16).transpose(1, 2)  # the model's layout

    def run():
        out, lse = mssa._forward_triton(w, 0.125)
        mssa._backward_triton(w, w, out, lse, 0.125)
    return keys(run)

def ista_keys(batch):
    x, m = torch.randn(batch * 197, 576, dtype=torch.bfloat16), torch.randn(576, 576)

    def run():
        _, packed = ista._forward_triton(x, m, 0.1, 0.5)
        ista._backward_triton(x, x, m, packed, 0.1, True, True)
    return keys(run)

json.dump({op: {b: fn(b) for b in map(int, sys.argv[1:])} for op, fn in
           (("mssa", mssa_keys), ("ista", ista_keys))}, sys.stdout)
"""


def test_partial_batches_share_tuning_and_compiled_kernels():
    """A last partial batch (100 of 128 images) keeps the tuned config; any batch size keeps the compiled kernel;
    a batch in another power-of-two bucket (37) is tuned anew."""
    proc = _python(["-c", _KEYS, "128", "100", "37"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for op, by_batch in json.loads(proc.stdout).items():
        full, partial, small = by_batch["128"], by_batch["100"], by_batch["37"]
        assert len(full) == (2 if op == "mssa" else 3) and [k["kernel"] for k in full] == [k["kernel"] for k in small]
        for f, p, s in zip(full, partial, small):
            assert f["tuning"] == p["tuning"] != s["tuning"], (op, f["kernel"])
            assert f["compile"] == p["compile"] == s["compile"], (op, f["kernel"])
