"""benchmarks/gpu_report.py without a GPU: the order of its steps and suites, the budget split, a step killed at its
time limit (its whole process group with it) leaving the report complete up to it, the tuner steps' library-only
candidates and one-config-per-round autotuners, and the failure lines and choices the report shows."""
import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

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


@pytest.mark.parametrize("budget", [300.0, 200.0])
def test_plan_order_and_budget_split(gpu_report, tmp_path, budget):
    steps = gpu_report.plan(_args(budget), tmp_path)
    assert [s.name for s in steps] == ["install", "aot", "ceilings", "library", "build", "tune", "compile", "autotune",
                                       "tests", "tests-csrc", "model", "data"]
    assert sum(s.seconds for s in steps) == pytest.approx(budget)
    assert all(s.seconds > 0 for s in steps)
    by_name = {s.name: s for s in steps}
    report = gpu_report.Report(tmp_path, "x", budget, {"date": "now"}, "test")
    for name in ("tests", "tests-csrc"):  # serial, one autotune config, nothing cached
        env = by_name[name].env(report)
        assert env["CRATE_KERNELS_AUTOTUNE"] == "first" and env["TRITON_CACHE_AUTOTUNING"] == "0"
        assert "-n" not in by_name[name].command
    caches = set()
    for name in ("library", "tune", "autotune"):  # the driver, full autotuning, an empty cache of each step's own
        env = by_name[name].env(report)
        assert by_name[name].command[-3:-1] == ["--tune-driver", name] and env["CRATE_KERNELS_AUTOTUNE"] == "full"
        caches.add(env["CRATE_KERNELS_CACHE"])
    assert len(caches) == 3 and not any(Path(c).exists() for c in caches)
    aot = by_name["aot"].command
    assert aot[aot.index("--arch") + 1] == "90" and "--cache-dir" not in aot  # a dry run: sm_90, a temporary cache
    assert by_name["aot"].env(report)["TRITON_INTERPRET"] == "0"
    compile_k = by_name["compile"].command[by_name["compile"].command.index("-k") + 1]
    assert "compile-reference" in compile_k and "fwd+bwd" in compile_k
    assert by_name["tests-csrc"].skip_if(report)  # no build yet
    assert by_name["compile"].env(report)["CRATE_BENCH_SKIP"] == "cuda"
    report.data["build"] = "ok"
    assert by_name["tests-csrc"].skip_if(report) is None and by_name["compile"].env(report)["CRATE_BENCH_SKIP"] == ""
    on_gpu = {s.name: s for s in gpu_report.plan(_args(budget), tmp_path, arch=80)}["aot"].command
    assert on_gpu[on_gpu.index("--arch") + 1] == "80" and "--cache-dir" in on_gpu  # warms the runtime's cache


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


def test_json_lines_leave_out_a_last_line_cut_short(gpu_report, tmp_path):
    path = tmp_path / "rows.jsonl"
    assert gpu_report.json_lines(path) == []
    path.write_text('{"a": 1}\n{"b": 2}\n{"c": ')  # the step was killed while writing its third record
    assert gpu_report.json_lines(path) == [{"a": 1}, {"b": 2}]
    path.write_text('{"a": 1}\n{"b": \n{"c": 3}\n')
    with pytest.raises(ValueError):  # a broken line before the last is not a kill's doing
        gpu_report.json_lines(path)


def test_summary_says_how_many_cores_feed_each_training_step(gpu_report):
    rows = [{"name": "test_train_step[crate_mae_base-auto]", "img_per_s": 3000.0, "group": "g"},
            {"name": "test_transform_per_core[earlier]", "provider": "earlier", "img_per_s_per_core": 150.0},
            {"name": "test_transform_per_core[current-pil]", "provider": "current-pil", "img_per_s_per_core": 300.0},
            {"name": "test_transform_per_core[current-simplejpeg]", "provider": "current-simplejpeg",
             "img_per_s_per_core": 400.0}]
    (line,) = gpu_report.input_cores_text(rows)
    assert "train crate_mae_base-auto at 3000 img/s needs 7.5 cores" in line and "400 img/s per core" in line
    assert gpu_report.input_cores_text(rows[:1]) == []


def test_library_step_leaves_only_library_candidates(gpu_report, monkeypatch):
    from crate_kernels.ops import backend

    for kind in backend.KERNEL_KINDS:  # the registry as it was, after the test
        monkeypatch.setitem(backend._candidates, kind, dict(backend._candidates[kind]))
    backend.register_candidate("mssa_forward", "fake-fast", lambda w, scale: None)
    before = {kind: backend.candidates(kind) for kind in backend.KERNEL_KINDS}
    gpu_report._library_only()
    w = torch.randn(2, 3, 5, 4)
    for kind, entries in before.items():
        after = backend.candidates(kind)
        assert list(after) == list(entries)  # same names, same order
        for name, entry in entries.items():
            if entry.library:
                assert after[name] == entry
            else:
                assert "not a library path" in backend.why_not(after[name], (w, 0.5)) and after[name].fn is entry.fn
    assert "fake-fast" in before["mssa_forward"] and backend.library_choice("mssa_forward", (w, 0.5)) != "fake-fast"


def test_config_rounds_run_every_kept_config_once(gpu_report):
    """Round i runs each kernel's i-th config of those its pruning keeps (its last where it keeps fewer); the
    rounds end once every kernel ran each of its configs."""
    def keep_even(configs, named_args, **kwargs):
        return configs[::2]

    a = SimpleNamespace(early_config_prune=keep_even, cache={"key": "old"})
    b = SimpleNamespace(early_config_prune=None, cache={})
    rounds = gpu_report.ConfigRounds({"a": a, "b": b})
    ran = []
    while True:
        rounds.reset()
        assert a.cache == {}
        ran.append((a.early_config_prune(list("abcdef"), {}), b.early_config_prune(list("xy"), {})))
        assert rounds.used == {"a": ran[-1][0][0], "b": ran[-1][1][0]}
        if not rounds.next():
            break
    assert ran == [(["a"], ["x"]), (["c"], ["y"]), (["e"], ["y"])]
    assert gpu_report.ConfigRounds({}).next() is False  # no Triton kernel (CPU): one round


def _row(kind, candidate, status, chosen=False, ms=1.0):
    return {"kind": kind, "key": "k", "shape": "(256, 12, 197, 64) bfloat16", "candidate": candidate, "ms": ms,
            "error": 1e-3, "status": status, "chosen": chosen, "source": "measured"}


def test_failures_and_choices_in_the_report(gpu_report, tmp_path):
    """A dropped candidate or autotune config is a FAILED line (naming the config); auto's choice per operator
    direction and shape is listed; the tuner's tables go into the markdown."""
    rows = [_row("mssa_forward", "sdpa-flash", "ok"), _row("mssa_forward", "triton-v1", "ok", chosen=True, ms=0.5),
            _row("mssa_forward", "triton-tail", "wrong"), _row("mssa_forward", "cpu-flash", "unsupported: cpu only"),
            _row("mssa_backward", "cuda", "raised RuntimeError"), _row("mssa_backward", "sdpa-flash", "ok", True)]
    tune = {"model": "crate_mae_base", "batch": 256, "rows": rows, "table": "mssa_forward\n  the table"}
    autotune = dict(tune, round=3, configs={"mssa.mssa_fwd": "BLOCK_N: 64, num_warps: 4"})
    lines = gpu_report.tuning_failures("tune", tune)
    assert lines == ["tune crate_mae_base: mssa_forward triton-tail on (256, 12, 197, 64) bfloat16: wrong",
                     "tune crate_mae_base: mssa_backward cuda on (256, 12, 197, 64) bfloat16: raised RuntimeError"]
    (first, _) = gpu_report.tuning_failures("autotune", autotune)
    assert first.startswith("autotune crate_mae_base round 3: mssa_forward triton-tail") and "BLOCK_N: 64" in first
    assert gpu_report.auto_choices([tune]) == [
        {"model": "crate_mae_base", "kind": "mssa_forward", "shape": rows[0]["shape"], "candidate": "triton-v1",
         "ms": 0.5},
        {"model": "crate_mae_base", "kind": "mssa_backward", "shape": rows[0]["shape"], "candidate": "sdpa-flash",
         "ms": 1.0}]
    report = gpu_report.Report(tmp_path, "r", 10.0, {"date": "now", "gpu": None}, "test")
    steps = {s.name: s for s in gpu_report.plan(_args(10.0), tmp_path)}
    for name, record in (("tune", tune), ("autotune", autotune)):  # what the driver wrote, as the step files it
        (tmp_path / f"tune-{name}.jsonl").write_text(json.dumps(record) + "\n")
        result = {}
        steps[name].collect(report, result, "")
        assert result["tuner_rows"] == len(rows)
    assert report.data["auto"] == gpu_report.auto_choices([tune]) and len(report.data["failures"]) == 4
    report.write()
    text = (tmp_path / "r.md").read_text()
    assert "- FAILED tune crate_mae_base: mssa_forward triton-tail" in text
    assert "auto crate_mae_base mssa_forward (256, 12, 197, 64) bfloat16: triton-v1 (0.5000 ms)" in text
    assert "crate_mae_base, batch 256, round 3" in text and "the table" in text and "AUTO_VARIANTS" not in text
    summary = gpu_report.summary_text(report.data)
    assert "FAILED tune crate_mae_base: mssa_backward cuda" in summary and "auto crate_mae_base" in summary
    report.data["steps"]["tune"] = {"status": "ok", "tuner_rows": 6}
    assert "tune ok (6 tuner rows)" in gpu_report.summary_text(report.data)
