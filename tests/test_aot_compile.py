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

from crate_kernels.ops import aot

pytestmark = pytest.mark.compile  # Triton compiles every kernel for sm_90 and sm_80 in child processes
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
    for _, name in aot.registry().values():
        for arch in ("90", "80"):
            counts = data["summary"][name][arch]
            assert counts["configs"] >= 2 and counts["errors"] == 0, (name, arch, counts)
    assert all(r["regs"] for r in data["results"]), "ptxas reported no register count"


_KEYS = """
import json, sys, torch
from crate_kernels.ops import aot, kernel_variants, set_variant
from crate_kernels.ops.backend import launcher

def keys(run):
    return [aot.launch_keys(launch) for launch in aot.capture(run)]

def every_variant(kind_fwd, kind_bwd, run):
    \"\"\"run() once per variant of each kind (the other kind on v1).\"\"\"
    for kind in (kind_fwd, kind_bwd):
        for name in kernel_variants()[kind]:
            set_variant(kind, name)
            run()
            set_variant(kind, None)

def mssa_keys(batch):
    w = torch.randn(batch, 197, 12, 64, dtype=torch.bfloat16).transpose(1, 2)  # the model's layout

    def run():
        out, lse = launcher("mssa_forward", "triton")(w, 0.125)
        launcher("mssa_backward", "triton")(w, w, out, lse, 0.125)
    return keys(lambda: every_variant("mssa_forward", "mssa_backward", run))

def ista_keys(batch):
    x, m = torch.randn(batch * 197, 576, dtype=torch.bfloat16), torch.randn(576, 576)

    def run():
        _, packed = launcher("ista_forward", "triton")(x, m, 0.1, 0.5)
        launcher("ista_backward", "triton")(x, x, m, packed, 0.1, True, True)
    return keys(lambda: every_variant("ista_forward", "ista_backward", run))

json.dump({op: {b: fn(b) for b in map(int, sys.argv[1:])} for op, fn in
           (("mssa", mssa_keys), ("ista", ista_keys))}, sys.stdout)
"""


def test_partial_batches_share_tuning_and_compiled_kernels():
    """A last partial batch (100 of 128 images) keeps the tuned config; any batch size keeps the compiled kernel;
    a batch in another power-of-two bucket (37) is tuned anew. Every kernel of every variant."""
    proc = _python(["-c", _KEYS, "128", "100", "37"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for op, by_batch in json.loads(proc.stdout).items():
        full, partial, small = by_batch["128"], by_batch["100"], by_batch["37"]
        assert {k["kernel"] for k in full} == {name for module, name in aot.registry().values() if op in module}
        assert [k["kernel"] for k in full] == [k["kernel"] for k in small]
        for f, p, s in zip(full, partial, small):
            assert f["tuning"] == p["tuning"], (op, f["kernel"])
            assert f["tuning"] != s["tuning"] or f["configs"] == 1, (op, f["kernel"])  # one config: nothing to tune
            assert f["compile"] == p["compile"] == s["compile"], (op, f["kernel"])


_OFFSETS = """
import importlib, json, sys
from crate_kernels.ops import aot

jobs, _ = aot.plan_jobs([launch for launch in aot.collect_launches(head_dims=(64,)) if launch["dtype"] == "bf16"], [90])
found = {}
for job in jobs.values():
    for arg, types in aot.first_offset_types(aot.kernel_ttir(job)).items():
        found.setdefault(job["module"] + ":" + job["kernel"], {}).setdefault(arg, set()).update(types)
json.dump({kernel: {arg: sorted(types) for arg, types in args.items()} for kernel, args in found.items()}, sys.stdout)
"""


def test_heads_and_rows_are_located_with_64_bit_offsets():
    """Tensors past 2^31 elements: in every kernel's Triton IR (bf16, sm_90, every variant), the offset first added
    to each pointer argument (the head's or the row's) is 64-bit. The exceptions are the pointers a module lists in
    INT32_INDEXED (ISTA's d x d matrix), whose launchers check that their offsets fit in int32."""
    proc = _python(["-c", _OFFSETS], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    assert {kernel.split(":")[1] for kernel in found} == {name for _, name in aot.registry().values()}
    for kernel, args in found.items():
        module = __import__(kernel.split(":")[0], fromlist=["_"])
        for arg, types in args.items():
            expected = ["i32"] if arg in getattr(module, "INT32_INDEXED", ()) else ["i64"]
            assert types == expected, (kernel, arg, types)

