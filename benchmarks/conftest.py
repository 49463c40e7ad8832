"""Benchmark-suite hooks.

- With $CRATE_BENCH_ROWS set, each finished benchmark appends one JSON line there. pytest-benchmark writes its
  own JSON only when the whole session ends, so a suite stopped at its time limit (benchmarks/gpu_report.py
  runs each under one) would lose every figure it had measured. The row holds what the report tabulates:
  group, test name, median milliseconds (pytest-benchmark's wall time) and the test's extra_info.
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


@pytest.fixture(autouse=True)
def _append_row(request):
    yield
    path = os.environ.get("CRATE_BENCH_ROWS")
    bench = request.node.funcargs.get("benchmark")
    if not path or bench is None or not getattr(bench, "stats", None):
        return
    row = {"group": bench.group or "", "name": request.node.name, "median_ms": bench.stats.stats.median * 1e3,
           **bench.extra_info}
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


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
