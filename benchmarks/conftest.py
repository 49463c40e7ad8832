"""Benchmark-suite hooks.

- With $CRATE_BENCH_ROWS set, each finished benchmark appends one JSON line there. pytest-benchmark writes its
  own JSON only when the whole session ends, so a suite stopped at its time limit (benchmarks/gpu_report.py
  runs each under one) would lose every figure it had measured. The row holds what the report tabulates:
  group, test name, median milliseconds (pytest-benchmark's wall time) and the test's extra_info.
- After the timings, a "memory beside time" section lists each benchmark that measured memory: its median time,
  the peak memory of one call (CUDA's allocator statistics; the CPU allocator keeps none) and the bytes autograd
  saved for backward (each storage once; every saved reference; under --grad_checkpointing), from extra_info.
- Without pytest-benchmark (not installed, or `-p no:benchmark`) the suites time themselves: a `benchmark`
  fixture with the same `pedantic`, `group`, `extra_info` and `stats` the suites use, and no-op
  `--benchmark-only` / `--benchmark-disable` options (the latter runs each benchmark once, untimed).
"""
import json
import os
import statistics
import time
from types import SimpleNamespace

import pytest

MEMORY_ROWS = pytest.StashKey[list]()
MEMORY_KEYS = ("peak_memory_bytes", "saved_bytes_unique", "saved_bytes_total", "saved_bytes_grad_checkpointing")


@pytest.fixture(autouse=True)
def _append_row(request):
    yield
    bench = request.node.funcargs.get("benchmark")
    if bench is None or not getattr(bench, "stats", None):
        return
    row = {"group": bench.group or "", "name": request.node.name, "median_ms": bench.stats.stats.median * 1e3,
           **bench.extra_info}
    if any(key in row for key in MEMORY_KEYS):
        request.config.stash.setdefault(MEMORY_ROWS, []).append(row)
    path = os.environ.get("CRATE_BENCH_ROWS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2 ** 20:.1f} MiB"


COLUMNS = (("peak_memory_bytes", "peak memory"), ("saved_bytes_unique", "saved for backward"),
           ("saved_bytes_total", "(every reference)"), ("saved_bytes_grad_checkpointing", "(grad checkpointing)"))


def memory_lines(rows: list[dict]) -> list[str]:
    """The "memory beside time" table: per group, each benchmark's median time and the memory columns that some
    benchmark of the group measured ('-' where one did not)."""
    lines = []
    for group in dict.fromkeys(row["group"] for row in rows):
        members = [r for r in rows if r["group"] == group]
        columns = [(key, title) for key, title in COLUMNS if any(r.get(key) is not None for r in members)]
        width = max(len(r["name"]) for r in members)
        lines.append(group)
        lines.append(f"  {'benchmark':<{width}} {'median':>11}" + "".join(f" {t:>{len(t) + 2}}" for _, t in columns))
        for r in members:
            lines.append(f"  {r['name']:<{width}} {r['median_ms']:>8.2f} ms"
                         + "".join(f" {_mib(r.get(k)):>{len(t) + 2}}" for k, t in columns))
    return lines


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's timing tables
def pytest_terminal_summary(terminalreporter, config):
    rows = config.stash.get(MEMORY_ROWS, [])
    if rows:
        terminalreporter.write_sep("-", "memory beside time (peak memory: CUDA only)")
        for line in memory_lines(rows):
            terminalreporter.write_line(line)


class SelfTimed:
    """The part of pytest-benchmark's fixture the suites use; wall times of ``pedantic`` rounds, median in stats."""

    def __init__(self, disabled: bool):
        self.disabled, self.group, self.extra_info, self.stats = disabled, None, {}, None

    def pedantic(self, target, rounds: int = 1, iterations: int = 1, warmup_rounds: int = 0):
        if self.disabled:
            return target()
        for _ in range(warmup_rounds):
            target()
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(iterations):
                result = target()
            times.append((time.perf_counter() - start) / iterations)
        self.stats = SimpleNamespace(stats=SimpleNamespace(median=statistics.median(times)))
        return result


class _SelfTimedPlugin:
    @pytest.fixture
    def benchmark(self, request):
        return SelfTimed(disabled=request.config.getoption("--benchmark-disable"))


def pytest_addoption(parser, pluginmanager):
    if not pluginmanager.hasplugin("benchmark"):
        group = parser.getgroup("benchmark", "pytest-benchmark is missing: the suites time themselves")
        group.addoption("--benchmark-only", action="store_true", help="no-op (every test here is a benchmark)")
        group.addoption("--benchmark-disable", action="store_true", help="run each benchmark once, untimed")


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("benchmark"):
        config.pluginmanager.register(_SelfTimedPlugin(), "crate-bench-self-timed")
