"""benchmarks/gpu_report.py without a GPU: the order of its steps and suites, the budget split, and a step killed
at its time limit (its whole process group with it) leaving the report complete up to it."""
import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture
def gpu_report(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the suites import bench_utils from there
    spec = importlib.util.spec_from_file_location("gpu_report", BENCHMARKS / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_report", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _args(budget):
    return argparse.Namespace(budget=budget, k=None, skip_install=False, skip_tests=False)


@pytest.mark.parametrize("budget", [360.0, 200.0])
def test_plan_order_and_budget_split(gpu_report, tmp_path, budget):
    steps = gpu_report.plan(_args(budget), tmp_path)
    assert [s.name for s in steps] == ["install", "ceilings", "tests", "build", "tests-csrc", "mssa", "ista", "model",
                                       "data", "ops"]
    assert sum(s.seconds for s in steps) == pytest.approx(budget)
    assert all(s.seconds > 0 for s in steps)
    by_name = {s.name: s for s in steps}
    report = gpu_report.Report(tmp_path, "x", budget, {"date": "now"}, "test")
    for name in ("tests", "tests-csrc"):  # serial, one autotune config, nothing cached
        env = by_name[name].env(report)
        assert env["CRATE_KERNELS_AUTOTUNE"] == "first" and env["TRITON_CACHE_AUTOTUNING"] == "0"
        assert "-n" not in by_name[name].command
    assert by_name["tests-csrc"].skip_if(report)  # no build yet
    assert by_name["mssa"].env(report)["CRATE_BENCH_SKIP"] == "cuda"
    report.data["build"] = "ok"
    assert by_name["tests-csrc"].skip_if(report) is None and by_name["mssa"].env(report)["CRATE_BENCH_SKIP"] == ""


def test_suites_put_baselines_right_after_triton_and_compile_last(gpu_report):
    import test_bench_ista_gpu
    import test_bench_model
    import test_bench_mssa_gpu

    first_shape = [(p, m) for s, p, m in test_bench_mssa_gpu.CASES if s == next(iter(test_bench_mssa_gpu.SHAPES))]
    assert test_bench_mssa_gpu.CASES[:len(first_shape)] == [(next(iter(test_bench_mssa_gpu.SHAPES)), p, m)
                                                           for p, m in first_shape]  # shape by shape
    providers = list(dict.fromkeys(p for p, _ in first_shape))
    mssa_variants = ["triton-tail", "triton-stacked", "triton-symmetric"]  # every variant, right after triton
    assert list(test_bench_mssa_gpu.VARIANTS) == mssa_variants
    assert providers[:9] == ["triton", *mssa_variants, "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "reference",
                             "compile-reference"]
    assert [(p, m) for p, m in first_shape if p in mssa_variants] == [
        ("triton-tail", "fwd"), ("triton-stacked", "bwd"), ("triton-symmetric", "bwd")]  # the mode each one changes
    assert not any(p in mssa_variants for s, p, _ in test_bench_mssa_gpu.CASES if s != "base-n197")
    assert list(dict.fromkeys(p for p, _ in test_bench_ista_gpu.CASES))[:6] == [
        "triton", "triton-bytemask", "triton-gstore", "cublas-floor", "reference", "compile-reference"]
    assert [m for p, m in test_bench_ista_gpu.CASES if p.startswith("triton-")] == ["bwd", "bwd"]
    cases = test_bench_model.cases(["base", "small"], ["auto", "reference", "compile-reference"])
    assert cases == [("base", "auto"), ("base", "reference"), ("small", "auto"), ("small", "reference"),
                     ("base", "compile-reference"), ("small", "compile-reference")]


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="checks processes through /proc")
def test_step_killed_at_its_limit_leaves_the_report_complete(gpu_report, tmp_path, capsys):
    """The middle step starts a grandchild and outlives its limit: both die, the report written before it holds
    the first step's results, the step after it still runs, and the summary names the cut step."""
    py, pid_file, snapshot = sys.executable, tmp_path / "grandchild.pid", tmp_path / "snapshot.json"
    hang = (f"import shutil, subprocess, sys, time\n"
            f"shutil.copy({str(tmp_path / 'cpu-test.json')!r}, {str(snapshot)!r})\n"
            f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
            f"time.sleep(120)\n")
    row = {"group": "g", "name": "test_x[a]", "median_ms": 2.0, "img_per_s": 5.0, "peak_memory_bytes": 2**30}
    steps = [
        gpu_report.Step("first", 1.0, "quick", [py, "-c", "print('first')"],
                        collect=lambda report, result, output: report.data["benchmarks"].append(row)),
        gpu_report.Step("hang", 2.0, "outlives its limit", [py, "-c", hang]),
        gpu_report.Step("after", 3.0, "runs after the cut", [py, "-c", "print('after')"]),
    ]
    report = gpu_report.Report(tmp_path, "cpu-test", 6.0, {"date": "now", "gpu": None}, "test", min_step_seconds=0.5)
    start = time.time()
    report.run_all(steps)
    assert time.time() - start < 30

    status = {name: r["status"] for name, r in report.data["steps"].items()}
    assert status == {"first": "ok", "hang": "cut at its limit", "after": "ok"}
    grandchild = int(pid_file.read_text())
    deadline = time.time() + 5
    while _alive(grandchild) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the step's process group outlived its limit"

    before = json.loads(snapshot.read_text())  # the report as it stood while the killed step ran
    assert before["steps"]["first"]["status"] == "ok" and before["benchmarks"] == [row]
    assert before["steps"]["hang"]["status"] == "running"
    saved = json.loads((tmp_path / "cpu-test.json").read_text())
    assert saved["cut"] == ["hang"] and saved["benchmarks"] == [row]
    assert "cut at its limit" in (tmp_path / "cpu-test.md").read_text()
    summary = gpu_report.summary_text(saved)
    assert "cut: hang" in summary and "x a" in summary and "1.00" in summary  # the row, its peak GiB
    assert os.path.exists(tmp_path / "cpu-test.log")


def test_summary_says_how_many_cores_feed_each_training_step(gpu_report):
    rows = [{"name": "test_train_step[crate_mae_base-auto]", "img_per_s": 3000.0, "group": "g"},
            {"name": "test_transform_per_core[earlier]", "provider": "earlier", "img_per_s_per_core": 150.0},
            {"name": "test_transform_per_core[current-pil]", "provider": "current-pil", "img_per_s_per_core": 300.0},
            {"name": "test_transform_per_core[current-simplejpeg]", "provider": "current-simplejpeg",
             "img_per_s_per_core": 400.0}]
    (line,) = gpu_report.input_cores_text(rows)
    assert "train crate_mae_base-auto at 3000 img/s needs 7.5 cores" in line and "400 img/s per core" in line
    assert gpu_report.input_cores_text(rows[:1]) == []


def test_variant_table_and_the_auto_variants_entry(gpu_report):
    """Each variant against the `triton` (v1) row of its group; AUTO_VARIANTS takes per kind the fastest variant
    more than 3% ahead of v1."""
    def row(group, variant, ms):
        return {"group": group, "name": variant, "median_ms": 99.0, "device_ms": ms, "kernel_variant": variant}

    rows = [row("mssa bwd", "v1", 1.0), row("mssa bwd", "mssa_backward=stacked", 0.8),
            row("mssa bwd", "mssa_backward=symmetric", 0.9), row("mssa fwd", "v1", 1.0),
            row("mssa fwd", "mssa_forward=tail", 0.99), row("ista bwd", "ista_backward=gstore", 0.5),  # no v1 row
            {"group": "mssa bwd", "name": "sdpa", "median_ms": 0.1}]
    table = gpu_report.variant_table(rows)
    assert [(r["kind"], r["variant"], round(r["speedup"], 2)) for r in table] == [
        ("mssa_backward", "stacked", 1.25), ("mssa_backward", "symmetric", 1.11), ("mssa_forward", "tail", 1.01)]
    assert gpu_report.auto_variants(table, "9.0") == {9: {"mssa_backward": "stacked"}}
    assert gpu_report.auto_variants(table, None) == {} and gpu_report.auto_variants(table[2:], "9.0") == {}
    lines = gpu_report.variants_text({"benchmarks": rows, "environment": {"capability": "9.0"}})
    assert lines[-1].endswith("{9: {'mssa_backward': 'stacked'}}")

