"""Benchmark-suite hooks: with $CRATE_BENCH_ROWS set, each finished benchmark appends one JSON line there.

pytest-benchmark writes its own JSON only when the whole session ends, so a suite stopped at its time
limit (benchmarks/gpu_report.py runs each under one) would lose every figure it had measured. The row
holds what the report tabulates: group, test name, median milliseconds and the test's extra_info.
"""
import json
import os

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
