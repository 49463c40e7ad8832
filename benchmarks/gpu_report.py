"""One reproducible GPU report in one short run: install, ceilings, tests, build, benchmarks, results.

    python benchmarks/gpu_report.py                    # on a CUDA machine (no network needed)
    python benchmarks/gpu_report.py --dry-run          # on CPU: every step in order, CPU suites, results to a temp dir
    python benchmarks/gpu_report.py --plan             # print the steps and the budget split, run nothing

On a lent GPU machine (15 minutes of device time for all tries; files come back only from $OUT, copy them to
benchmarks/results/ afterwards), one call with a time limit that leaves room to rerun:

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_report.py --out $OUT          (device timeout_s 450)

Steps, most valuable first, each under its own time limit inside one --budget (default 360 s): each step may
use its share of the budget plus whatever earlier steps left unused, never the shares of the steps after it.
Every step runs in its own process group (killed whole at its limit: no ninja or nvcc left behind), and the
report (<gpu>-<date>.json, .md, .log) is rewritten after every step, so a run stopped from outside keeps what
it measured.

  install     pip install --no-deps --no-build-isolation -e .
  ceilings    one large bf16 matrix product, one large device-to-device copy
  tests       the Triton kernels' tests on the device: serial, one autotune config per kernel
              (CRATE_KERNELS_AUTOTUNE=first), no autotuning cache written
  build       the CUDA extension (csrc/), after removing a build lock a killed build left
  tests-csrc  the CUDA extension's device tests (skipped when the build failed)
  mssa, ista  the operator suites, `triton`'s kernel variants and baselines right after it (SDPA
              flash/cuDNN/efficient; cuBLAS floor, eager, torch.compile); `cuda` excluded when the build failed
  model       training step: `auto` and `reference` first, torch.compile last
  data        the input pipeline on the host's cores: training views per core, the DataLoader with 1..8 workers
              (the summary says how many cores each measured training step needs to be fed)
  ops         the small per-operator suite

Benchmark rows carry device time (CUDA events, bench_utils.record) and host time per call apart; each finished
benchmark is kept even when its suite is cut. The summary printed last (ms, host ms, img/s, TFLOP/s, fraction
of the measured ceilings, peak memory) says which steps were cut, and ranks each kernel variant against v1 in its
group: the AUTO_VARIANTS entry it prints (per GPU generation, the variants more than 3% faster than v1) is what
crate_kernels/ops/backend.py takes when the report is committed. README's performance section is regenerated
from committed reports by benchmarks/readme_perf.py.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET = 360.0
MIN_STEP_SECONDS = 5.0  # a step left less than this is not started
# Tests only a GPU can run: the Triton kernels on the device; the CUDA extension's device tests
TRITON_TESTS = ["tests/test_mssa_triton.py", "tests/test_ista_triton.py"]
CSRC_TESTS = ["tests/test_csrc.py::test_cuda_mssa_backward", "tests/test_csrc.py::test_cuda_ista_backward",
              "tests/test_csrc.py::test_cuda_ext_rejects_cpu_tensors_and_bad_dtypes"]


class Stopped(Exception):
    """The report itself got SIGTERM or SIGINT."""


@dataclass
class Step:
    """One command of the report, run in its own process group under a time limit."""
    name: str
    seconds: float  # share of the budget
    what: str
    command: list[str]
    env: Callable[["Report"], dict] = lambda report: {}  # decided when its turn comes, as is skip_if
    skip_if: Callable[["Report"], str | None] = lambda report: None  # a reason not to run
    collect: Callable[["Report", dict, str], None] = lambda report, result, output: None  # file its results


def run_in_group(command: list[str], limit: float, env: dict, log_path: Path) -> tuple[int | None, bool]:
    """Run ``command`` from the repository root in a new session (its own process group), output to ``log_path``;
    at ``limit`` seconds, or when the report is stopped, kill the whole group. (exit status, killed at limit)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
        try:
            rc, timed_out = proc.wait(timeout=limit), False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
        except BaseException:
            _kill_group(proc)
            raise
        _kill_group(proc)  # also what the command left running after it exited
    return rc, timed_out


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill ``proc``'s process group (SIGTERM, then SIGKILL for what is left after 5 s) and reap ``proc``."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # nothing of the group is left
        proc.wait()
        return
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # members that outlived the leader or ignored SIGTERM
    except ProcessLookupError:
        pass
    proc.wait()


def pytest_outcome(rc: int | None, out: str) -> dict:
    """Counts and failing test ids from pytest's output, also when it was stopped before its summary."""
    summary = re.findall(r"^=*\s*(\d+ (?:passed|failed|error|skipped|deselected).*?)\s*=*$", out, flags=re.M)
    outcome = {"rc": rc, "summary": summary[-1] if summary else None,
               "failed": sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)))[:50]}
    if outcome["summary"] is None:  # stopped early: count the per-test lines of -v output
        counts = {k: len(re.findall(rf"\b{k}\b", out)) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
        outcome["summary"] = f"stopped (rc={rc}) after " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items())
        outcome["failed"] = sorted(set(re.findall(r"(tests/\S+) (?:FAILED|ERROR)", out)))[:50]
    return outcome


def measure_ceilings(path: Path) -> None:
    """Measured dense-matmul rate and device-to-device copy bandwidth (medians), written to ``path`` as JSON."""
    import torch
    from bench_utils import CUDA, matmul_flops_per_second, median_seconds

    n, dtype = (8192, torch.bfloat16) if CUDA else (1024, torch.float32)
    flops = matmul_flops_per_second(n, dtype, 20 if CUDA else 3)
    numel = (1 << 30) // 2 if CUDA else (1 << 24)  # 1 GiB of bf16 on the GPU
    src = torch.randn(numel, device="cuda" if CUDA else "cpu", dtype=torch.bfloat16 if CUDA else torch.float32)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), 20 if CUDA else 3)
    nbytes = 2 * src.numel() * src.element_size()
    path.write_text(json.dumps({"matmul": f"{n}^3 {str(dtype).replace('torch.', '')}", "matmul_tflops": flops / 1e12,
                                "copy_bytes": nbytes, "copy_gbps": nbytes / seconds / 1e9}))


def environment(cuda: bool) -> dict:
    import torch

    info = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
            "host": platform.node(), "load_average": os.getloadavg()[0]}  # other work on the host at the start
    for module in ("triton", "numpy", "pytest_benchmark"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None

    def output(cmd):
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit, dirty = output(["git", "rev-parse", "HEAD"]), output(["git", "status", "--porcelain"])
    info["git_commit"] = (commit or "unknown (no git metadata)") + ("+dirty" if dirty else "")
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
        info["driver"] = output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or None
    else:
        info.update(gpu=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


class Report:
    """The report's data and files; runs the steps under one budget."""

    def __init__(self, out_dir: Path, stem: str, budget: float, info: dict, command: str,
                 min_step_seconds: float = MIN_STEP_SECONDS):
        self.out_dir, self.stem, self.budget, self.min_step_seconds = out_dir, stem, budget, min_step_seconds
        self.start = time.time()
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu-report-"))
        self.log: list[str] = []
        self.data = {"environment": info, "command": command, "budget_seconds": budget, "plan": [], "steps": {},
                     "build": "not run", "tests": {"summary": "not run"}, "tests_csrc": {"summary": "not run"},
                     "ceilings": None, "benchmarks": [], "cut": [], "wall_seconds": 0.0}

    def write(self) -> None:
        """(Re)write the report files: after every step, so a run stopped from outside keeps its results."""
        self.data["wall_seconds"] = time.time() - self.start
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"{self.stem}.json").write_text(json.dumps(self.data, indent=1, default=str))
        (self.out_dir / f"{self.stem}.md").write_text(markdown(self.data))
        (self.out_dir / f"{self.stem}.log").write_text("\n".join(self.log))

    def run_all(self, steps: list[Step]) -> None:
        """Run the steps in order: step i may use what is left of the budget less the shares of the steps after it."""
        deadline = self.start + self.budget
        self.data["plan"] = [{"step": s.name, "seconds": round(s.seconds, 1), "what": s.what} for s in steps]
        print(plan_text(steps, self.budget), flush=True)
        self.write()

        def stop(signum, frame):
            raise Stopped(signal.Signals(signum).name)

        handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for i, step in enumerate(steps):
                limit = deadline - time.time() - sum(s.seconds for s in steps[i + 1:])
                reason = step.skip_if(self)
                if reason:
                    self._record(step, {"status": "skipped", "detail": reason})
                elif limit < self.min_step_seconds:
                    self._record(step, {"status": "cut", "detail": f"budget spent ({max(limit, 0):.0f}s left)"})
                else:
                    self._run(step, limit)
        except Stopped as exc:
            done = self.data["steps"]
            for step in steps:
                if step.name not in done or done[step.name]["status"] == "running":
                    self._record(step, {"status": "cut", "detail": f"the report was stopped ({exc})"})
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        self.write()

    def _run(self, step: Step, limit: float) -> None:
        print(f"\n== {step.name} (limit {limit:.0f}s): {' '.join(step.command)}", flush=True)
        log_path = self.scratch / f"{step.name}.log"
        self.data["steps"][step.name] = {"status": "running", "limit": round(limit, 1)}
        self.write()  # a report stopped from outside shows which step was running
        start = time.time()
        try:
            rc, timed_out = run_in_group(step.command, limit, step.env(self), log_path)
        finally:
            output = log_path.read_text(errors="replace") if log_path.exists() else ""
            self.log.append(f"$ {' '.join(step.command)}  ({time.time() - start:.1f}s of {limit:.0f}s)\n{output}")
        status = "ok" if rc == 0 else "cut at its limit" if timed_out else f"failed (rc={rc})"
        result = {"status": status, "rc": rc, "seconds": round(time.time() - start, 1), "limit": round(limit, 1)}
        print("\n".join(output.strip().splitlines()[-5:]) + f"\n[{step.name}: {status}, {result['seconds']:.0f}s]",
              flush=True)
        step.collect(self, result, output)
        self._record(step, result)

    def _record(self, step: Step, result: dict) -> None:
        self.data["steps"][step.name] = result
        if result["status"].startswith("cut"):  # stopped at its limit, or never started for want of time
            self.data["cut"].append(step.name)
        self.write()


def plan(args, scratch: Path, py: str = sys.executable) -> list[Step]:
    """The report's steps in order, with their shares of ``args.budget``; children's files go to ``scratch``."""
    shares = {"install": 15, "ceilings": 15, "tests": 75, "build": 60, "tests-csrc": 20, "mssa": 70, "ista": 35,
              "model": 60, "data": 15, "ops": 10}
    seconds = {name: share * args.budget / sum(shares.values()) for name, share in shares.items()}
    ceilings_file = scratch / "ceilings.json"

    def pytest(*targets):
        return [py, "-m", "pytest", *targets, "-p", "no:cacheprovider"]

    def test_env(report):  # one config per kernel, nothing timed or cached
        return {"CRATE_KERNELS_AUTOTUNE": "first", "TRITON_CACHE_AUTOTUNING": "0"}

    def skip_tests(report):
        return "--skip-tests given" if args.skip_tests else None

    def suite(name: str, path: str, what: str) -> Step:
        rows_file = scratch / f"rows-{name}.jsonl"

        def env(report):
            skip = "" if report.data["build"] == "ok" else "cuda"  # else every `cuda` case would wait on a build
            return {"CRATE_BENCH_ROWS": str(rows_file), "CRATE_BENCH_SKIP": skip, "CRATE_KERNELS_AUTOTUNE": "full",
                    "TRITON_CACHE_AUTOTUNING": "1"}

        def collect(report, result, output):
            rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
            report.data["benchmarks"] += rows
            result["rows"] = len(rows)

        command = pytest(path, "-q", "--benchmark-only", *(["-k", args.k] if args.k else []))
        return Step(name, seconds[name], what, command, env=env, collect=collect)

    def collect_ceilings(report, result, output):
        if ceilings_file.exists():
            report.data["ceilings"] = json.loads(ceilings_file.read_text())

    def collect_build(report, result, output):
        last = (output.strip().splitlines() or [""])[-1][:300]
        report.data["build"] = "ok" if result["rc"] == 0 else f"{result['status']}: {last}"

    def needs_build(report):
        built = report.data["build"] == "ok"
        return skip_tests(report) or (None if built else f"no CUDA extension (build {report.data['build'][:120]})")

    return [
        Step("install", seconds["install"], "pip install --no-deps --no-build-isolation -e .",
             [py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."],
             skip_if=lambda report: "--skip-install given" if args.skip_install else None),
        Step("ceilings", seconds["ceilings"], "the measured ceilings: one bf16 matrix product, one device copy",
             [py, str(Path(__file__).resolve()), "--measure-ceilings", str(ceilings_file)], collect=collect_ceilings),
        Step("tests", seconds["tests"], "Triton kernels on the device: serial, first autotune config, nothing cached",
             pytest(*TRITON_TESTS, "-v", "-rfE"), env=test_env, skip_if=skip_tests,
             collect=lambda report, result, output: report.data.update(tests=pytest_outcome(result["rc"], output))),
        Step("build", seconds["build"], "the CUDA extension (csrc/), a stale build lock removed first",
             [py, "-m", "crate_kernels.ops.cuda_ext", "--build", "--remove-stale-lock"], collect=collect_build),
        Step("tests-csrc", seconds["tests-csrc"], "the CUDA extension's device tests",
             pytest(*CSRC_TESTS, "-v", "-rfE"), env=test_env, skip_if=needs_build,
             collect=lambda report, result, output: report.data.update(
                 tests_csrc=pytest_outcome(result["rc"], output))),
        suite("mssa", "benchmarks/test_bench_mssa_gpu.py",
              "MSSA suite: triton, SDPA flash, cuDNN, efficient, eager, compile; then cuda, sdpa-math"),
        suite("ista", "benchmarks/test_bench_ista_gpu.py",
              "ISTA suite: triton, cuBLAS floor, eager, compile; then cuda, torch"),
        suite("model", "benchmarks/test_bench_model.py", "training step: auto and reference, then torch.compile"),
        suite("data", "benchmarks/test_bench_data.py", "input pipeline: training views per core, DataLoader workers"),
        suite("ops", "benchmarks/test_bench_ops.py", "the rest: per-operator fwd+bwd at a small shape"),
    ]


def plan_text(steps: list[Step], budget: float) -> str:
    lines = [f"plan: {len(steps)} steps in {budget:.0f}s; each may use its share plus what earlier steps left"]
    lines += [f"  {i + 1}. {s.name:<11} {s.seconds:>5.0f}s  {s.what}" for i, s in enumerate(steps)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# What the report shows: markdown file and the summary printed last
# ------------------------------------------------------------------------------------------------------------
def figures(row: dict, ceilings: dict | None) -> dict:
    """The summary's figures of a benchmark row: ms (device time where measured), host ms, img/s, TFLOP/s,
    fractions of the measured matmul and copy ceilings, peak memory GiB."""
    tflops = row.get("model_tflops", row.get("tflops"))
    out = {"ms": row.get("device_ms", row["median_ms"]), "host_ms": row.get("host_ms"),
           "img_s": row.get("img_per_s"), "tflops": tflops, "mm": None, "bw": None,
           "peak_gib": row["peak_memory_bytes"] / 2**30 if row.get("peak_memory_bytes") else None}
    if ceilings and tflops:
        out["mm"] = tflops / ceilings["matmul_tflops"]
    if ceilings and row.get("gbps"):
        out["bw"] = row["gbps"] / ceilings["copy_gbps"]
    return out


_COLUMNS = [("ms", "ms", "{:.3f}"), ("host_ms", "host ms", "{:.3f}"), ("img_s", "img/s", "{:.1f}"),
            ("tflops", "TFLOP/s", "{:.1f}"), ("mm", "% mm", "{:.0%}"), ("bw", "% copy", "{:.0%}"),
            ("peak_gib", "peak GiB", "{:.2f}")]


def _cell(value, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def _short(name: str) -> str:
    """test_mssa[base-n197-compile-reference-fwd] -> mssa base-n197-compile-fwd"""
    name = re.sub(r"^test_", "", name).replace("train_step[", "train[").replace("compile-reference", "compile")
    return name.replace("[", " ").rstrip("]")


AUTO_MARGIN = 1.03  # a variant goes into AUTO_VARIANTS only when it beats v1 by more than this (timing noise)


def variant_table(rows: list[dict]) -> list[dict]:
    """Each kernel variant the suites measured (rows with extra_info kernel_variant "kind=name") against v1, the
    `triton` row of the same benchmark group: device ms of both and v1's time over the variant's."""
    by_group: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("kernel_variant"):
            by_group.setdefault(row["group"], []).append(row)
    table = []
    for group, group_rows in by_group.items():
        base = next((r for r in group_rows if r["kernel_variant"] == "v1"), None)
        for row in group_rows:
            if base is None or row["kernel_variant"] == "v1":
                continue
            kind, name = row["kernel_variant"].split("=", 1)
            ms, v1_ms = figures(row, None)["ms"], figures(base, None)["ms"]
            table.append({"kind": kind, "variant": name, "group": group, "ms": ms, "v1_ms": v1_ms,
                          "speedup": v1_ms / ms})
    return table


def auto_variants(table: list[dict], capability: str | None) -> dict:
    """The AUTO_VARIANTS entry (crate_kernels/ops/backend.py) these measurements support: {major: {kind: variant}}
    with, per kind, the fastest variant that beats v1 by more than AUTO_MARGIN; {} without a GPU or a winner."""
    best: dict[str, dict] = {}
    for row in table:
        if row["speedup"] > AUTO_MARGIN and row["speedup"] > best.get(row["kind"], {}).get("speedup", 0):
            best[row["kind"]] = row
    if not capability or not best:
        return {}
    return {int(capability.split(".")[0]): {kind: row["variant"] for kind, row in sorted(best.items())}}


def variants_text(data: dict) -> list[str]:
    """The variant table as lines, and the AUTO_VARIANTS entry to commit with the report."""
    table = variant_table(data["benchmarks"])
    if not table:
        return []
    lines = [f"variant {r['kind']}={r['variant']}: {r['ms']:.3f} ms vs v1 {r['v1_ms']:.3f} ms ({r['speedup']:.2f}x) "
             f"[{r['group']}]" for r in table]
    entry = auto_variants(table, data["environment"].get("capability"))
    return lines + [f"AUTO_VARIANTS entry these support (margin {AUTO_MARGIN}): {entry or 'none (v1 stays)'}"]


def input_cores_text(rows: list[dict]) -> list[str]:
    """For each measured training step, the host cores its input needs: img/s over the fastest training view's
    img/s per core (benchmarks/test_bench_data.py)."""
    per_core = max((r["img_per_s_per_core"] for r in rows if r.get("provider", "").startswith("current")
                    and r.get("img_per_s_per_core")), default=None)
    if per_core is None:
        return []
    return [f"input: {_short(r['name'])} at {r['img_per_s']:.0f} img/s needs {r['img_per_s'] / per_core:.1f} cores "
            f"of data loading ({per_core:.0f} img/s per core)" for r in rows if r.get("img_per_s")
            and r["name"].startswith("test_train_step")]


def summary_text(data: dict) -> str:
    """Benchmark rows (short names, the figures above) and the steps' outcomes, cut steps named."""
    lines = [f"{'benchmark':<40}" + "".join(f"{title:>9}" for _, title, _ in _COLUMNS)]
    for row in data["benchmarks"]:
        f = figures(row, data["ceilings"])
        lines.append(f"{_short(row['name'])[:40]:<40}" + "".join(f"{_cell(f[k], fmt):>9}" for k, _, fmt in _COLUMNS))
    lines += input_cores_text(data["benchmarks"])
    lines += variants_text(data)
    ceil = data["ceilings"]
    lines.append("ceilings: " + (f"{ceil['matmul']} matmul {ceil['matmul_tflops']:.1f} TFLOP/s, device copy "
                                 f"{ceil['copy_gbps']:.0f} GB/s" if ceil else "not measured"))
    lines.append(f"tests: {data['tests'].get('summary')}; build: {data['build'][:100]}; "
                 f"tests-csrc: {data['tests_csrc'].get('summary')}")
    lines += [f"  FAILED {t}" for t in (data["tests"].get("failed", []) + data["tests_csrc"].get("failed", []))[:10]]
    lines.append("steps: " + ", ".join(f"{name} {r['status']}" + (f" ({r['rows']} rows)" if "rows" in r else "")
                                       for name, r in data["steps"].items()))
    lines.append(f"cut: {', '.join(data['cut'])}" if data["cut"] else "cut: none")
    return "\n".join(lines)


def markdown(data: dict) -> str:
    info, ceil = data["environment"], data["ceilings"]
    lines = [f"# GPU report: {info.get('gpu') or 'CPU dry run'} ({info['date']})", "",
             f"- command: `{data['command']}`", *(f"- {k}: {v}" for k, v in info.items() if k != "date"),
             f"- tests: {data['tests'].get('summary')}",
             *(f"  - failed: `{t}`" for t in data["tests"].get("failed", [])),
             f"- csrc build: {data['build']}", f"- tests-csrc: {data['tests_csrc'].get('summary')}",
             *(f"  - failed: `{t}`" for t in data["tests_csrc"].get("failed", [])),
             "- ceilings: " + (f"{ceil['matmul']} matmul {ceil['matmul_tflops']:.1f} TFLOP/s; device copy "
                              f"{ceil['copy_gbps']:.0f} GB/s (read+write)" if ceil else "not measured"),
             f"- wall: {data['wall_seconds']:.0f}s of a {data['budget_seconds']:.0f}s budget; cut: "
             + (", ".join(data["cut"]) or "none"), "",
             "| step | share s | limit s | took s | status |", "|---|---:|---:|---:|---|"]
    for item in data["plan"]:
        r = data["steps"].get(item["step"], {"status": "not reached"})
        status = r["status"] + (f", {r['rows']} benchmarks" if "rows" in r else "") + (
            f": {r['detail']}" if r.get("detail") else "")
        lines.append(f"| {item['step']} | {item['seconds']:.0f} | {r.get('limit', '')} | {r.get('seconds', '')} "
                     f"| {status} |")
    lines += ["", "Times: ms is device time (CUDA events, median) where measured, else pytest-benchmark's wall "
              "median; host ms is the host's time to issue one call.", ""]
    variants = variants_text(data)
    if variants:
        lines += ["## Kernel variants against v1", "", *(f"- {line}" for line in variants), ""]
    group = None
    for row in data["benchmarks"]:
        if row["group"] != group:
            group = row["group"]
            lines += ["", f"## {group}", "",
                      "| name | " + " | ".join(t for _, t, _ in _COLUMNS) + " | other figures |",
                      "|---|" + "---:|" * len(_COLUMNS) + "---|"]
        f = figures(row, ceil)
        shown = {"group", "name", "median_ms", "device_ms", "host_ms", "img_per_s", "tflops", "model_tflops",
                 "peak_memory_bytes"}
        extras = ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k not in shown)
        lines.append(f"| {row['name']} | " + " | ".join(_cell(f[k], fmt) for k, _, fmt in _COLUMNS) + f" | {extras} |")
    return "\n".join(lines) + "\n"


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and v > 10**6:
        return f"{v / 2**20:.1f}MiB"
    return str(v)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="run on CPU; write results to a temp dir")
    parser.add_argument("--plan", action="store_true", help="print the steps and the budget split, run nothing")
    parser.add_argument("--skip-install", action="store_true", help="do not pip install the checkout")
    parser.add_argument("--skip-tests", action="store_true", help="skip both test steps")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                        help=f"seconds for the whole report, split among the steps (default {DEFAULT_BUDGET:.0f})")
    parser.add_argument("-k", default=None, help="pytest -k filter for the benchmarks")
    parser.add_argument("--measure-ceilings", type=Path, default=None, metavar="FILE",
                        help="(the ceilings step) measure the ceilings into FILE and exit")
    args = parser.parse_args(argv)
    if args.measure_ceilings:
        measure_ceilings(args.measure_ceilings)
        return 0
    if args.plan:
        print(plan_text(plan(args, Path(tempfile.gettempdir())), args.budget))
        return 0

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        raise SystemExit("no CUDA GPU found: run with --dry-run to exercise the report on CPU")
    out_dir = args.out or (Path(tempfile.mkdtemp()) if args.dry_run else ROOT / "benchmarks" / "results")
    info = environment(cuda)
    stem = f"{re.sub(r'[^A-Za-z0-9]+', '-', info.get('gpu') or 'cpu').strip('-').lower()}-{info['date'][:10]}"
    command = "python " + " ".join(["benchmarks/gpu_report.py", *(argv if argv is not None else sys.argv[1:])])
    report = Report(out_dir, stem, args.budget, info, command)
    report.run_all(plan(args, report.scratch))
    shutil.rmtree(report.scratch, ignore_errors=True)  # the children's logs are in the report's .log
    print("\n" + summary_text(report.data))
    print(f"wrote {out_dir / stem}.json/.md/.log in {time.time() - report.start:.0f}s")
    failed = any(report.data[k].get("rc") not in (0, None) for k in ("tests", "tests_csrc"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
