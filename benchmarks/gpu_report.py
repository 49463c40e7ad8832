"""One reproducible GPU report in one short run: install, compile, the tuner's tables, tests, benchmarks, results.

    python benchmarks/gpu_report.py                    # on a CUDA machine (no network needed)
    python benchmarks/gpu_report.py --dry-run          # on CPU: every step in order, CPU suites, results to a temp dir
    python benchmarks/gpu_report.py --plan             # print the steps and the budget split, run nothing

On a lent GPU machine (15 minutes of device time for all tries; files come back only from $OUT, copy them to
benchmarks/results/ afterwards), one call with a time limit that leaves room to rerun:

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_report.py --out $OUT          (device timeout_s 360)

(the default --budget of 300 s, plus imports, the environment and the files written, fits in 360 s; two such runs
and a machine start, about 2 minutes, fit in the 15 minutes of device time, so a failed first try can be rerun.)

Steps, most valuable first, each under its own time limit inside one --budget (default 300 s): each step may
use its share of the budget plus whatever earlier steps left unused, never the shares of the steps after it.
Every step runs in its own process group (killed whole at its limit: no ninja or nvcc left behind), and the
report (<gpu>-<date>.json, .md, .log) is rewritten after every step, so a run stopped from outside keeps what
it measured.

  install     pip install --no-deps --no-build-isolation -e .
  aot         every Triton kernel compiled in parallel for this GPU's arch (crate_kernels.ops.aot, one process per
              core, torch.cuda.get_device_capability(); sm_90 in a dry run) into Triton's cache, so later steps
              find them compiled
  ceilings    one large bf16 matrix product, one large device-to-device copy
  library     the tuner's table (crate_kernels.ops.tuning) at CRATE-MAE-Small and -Base shapes (batch 256, bf16
              autocast, one forward and backward) over the library candidates only (SDPA flash/cuDNN/efficient,
              cuBLAS): the baselines, timed first so that a cut never loses them
  build       the CUDA extension (csrc/), after removing a build lock a killed build left
  tune        the tuner's table at the same shapes over every candidate (library, each Triton variant with its
              autotuned config, the CUDA backward where built): median ms, error against float32, chosen;
              what `auto` chose per operator, direction and shape
  compile     torch.compile of the reference (mssa_reference, ista_reference), forward and backward, at the
              operator suites' CRATE-MAE-Base shapes (B=256, n=197, p=64; 256*197 rows, d=768)
  autotune    CRATE_KERNELS_AUTOTUNE=full on two shapes per operator (CRATE-MAE-Base's and -Small's): the
              tuner's check run once per autotune config of every Triton kernel (round i takes each kernel's
              i-th kept config), so a config that computes wrong is a failure line, not a silent choice
  tests       the Triton kernels' tests on the device: serial, one autotune config per kernel
              (CRATE_KERNELS_AUTOTUNE=first), no autotuning cache written
  tests-csrc  the CUDA extension's device tests (skipped when the build failed)
  model       training step: `auto` and `reference` first, torch.compile last
  data        the input pipeline on the host's cores: training views per core, the DataLoader with 1..8 workers
              (the summary says how many cores each measured training step needs to be fed)

Each tuner step starts from an empty tuning cache of its own (nothing read from an earlier step or run). Benchmark
rows carry device time (CUDA events, bench_utils.record) and host time per call apart; each finished benchmark is
kept even when its suite is cut. The summary printed last gives `auto`'s choices, every dropped candidate or
autotune config as a FAILED line, the benchmark rows (ms, host ms, img/s, TFLOP/s, fraction of the measured
ceilings, peak memory) and which steps were cut. README's performance section is regenerated from committed
reports by benchmarks/readme_perf.py.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
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
DEFAULT_BUDGET = 300.0
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
                     "aot": None, "ceilings": None, "tuning": {}, "auto": [], "failures": [], "benchmarks": [],
                     "cut": [], "wall_seconds": 0.0}

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


def json_lines(path: Path) -> list[dict]:
    """The records of a JSON-lines file a step appended to; [] when it wrote none, and a last line cut short by the
    step's kill left out."""
    lines = path.read_text().splitlines() if path.exists() else []
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise
    return records


def device_arch() -> int | None:
    """This GPU's compute capability as crate_kernels.ops.aot takes it (90 for sm_90); None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def plan(args, scratch: Path, py: str = sys.executable, arch: int | None = None) -> list[Step]:
    """The report's steps in order, with their shares of ``args.budget``; children's files go to ``scratch``;
    ``arch``: the GPU's compute capability (aot's --arch), None in a dry run (sm_90, the lent machines')."""
    shares = {"install": 10, "aot": 35, "ceilings": 10, "library": 35, "build": 40, "tune": 70, "compile": 30,
              "autotune": 50, "tests": 25, "tests-csrc": 10, "model": 35, "data": 10}
    seconds = {name: share * args.budget / sum(shares.values()) for name, share in shares.items()}
    ceilings_file = scratch / "ceilings.json"
    triton_cache = os.environ.get("TRITON_CACHE_DIR") or str(Path.home() / ".triton" / "cache")

    def pytest(*targets):
        return [py, "-m", "pytest", *targets, "-p", "no:cacheprovider"]

    def test_env(report):  # one config per kernel, nothing timed or cached
        return {"CRATE_KERNELS_AUTOTUNE": "first", "TRITON_CACHE_AUTOTUNING": "0"}

    def skip_tests(report):
        return "--skip-tests given" if args.skip_tests else None

    def suite(name: str, paths: list[str], what: str, k: str | None = None) -> Step:
        rows_file = scratch / f"rows-{name}.jsonl"

        def env(report):
            skip = "" if report.data["build"] == "ok" else "cuda"  # else every `cuda` case would wait on a build
            return {"CRATE_BENCH_ROWS": str(rows_file), "CRATE_BENCH_SKIP": skip, "CRATE_KERNELS_AUTOTUNE": "full",
                    "TRITON_CACHE_AUTOTUNING": "1"}

        def collect(report, result, output):
            rows = json_lines(rows_file)
            report.data["benchmarks"] += rows
            result["rows"] = len(rows)

        ks = [f"({x})" for x in (k, args.k) if x]
        command = pytest(*paths, "-q", "--benchmark-only", *(["-k", " and ".join(ks)] if ks else []))
        return Step(name, seconds[name], what, command, env=env, collect=collect)

    def tuner(name: str, what: str) -> Step:
        """A step of the tuner's driver (``--tune-driver``): its rows, one JSON record per line, to the report."""
        rows_file = scratch / f"tune-{name}.jsonl"

        def env(report):
            return {"CRATE_KERNELS_CACHE": str(scratch / f"cache-{name}"), "CRATE_KERNELS_AUTOTUNE": "full",
                    "TRITON_CACHE_AUTOTUNING": "0"}

        def collect(report, result, output):
            records = json_lines(rows_file)
            report.data["tuning"][name] = records
            if name == "tune":
                report.data["auto"] = auto_choices(records)
            result["tuner_rows"] = sum(len(r["rows"]) for r in records)
            report.data["failures"] += [line for r in records for line in tuning_failures(name, r)]

        command = [py, str(Path(__file__).resolve()), "--tune-driver", name, str(rows_file)]
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

    def collect_aot(report, result, output):
        report.data["aot"] = {"summary": (re.findall(r"^\d+ compiles for .*$", output, flags=re.M) or [None])[-1],
                              "problems": re.findall(r"^PROBLEM (.*)$", output, flags=re.M)[:50]}
        report.data["failures"] += [f"aot: {line}" for line in report.data["aot"]["problems"]]

    aot_arch = arch or 90
    jobs = str(max(1, (os.cpu_count() or 2) - 1))
    warm = ["--cache-dir", triton_cache] if arch else []  # a dry run compiles into aot's temporary folder
    return [
        Step("install", seconds["install"], "pip install --no-deps --no-build-isolation -e .",
             [py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."],
             skip_if=lambda report: "--skip-install given" if args.skip_install else None),
        Step("aot", seconds["aot"], f"every Triton kernel compiled for sm_{aot_arch}, {jobs} processes"
             + (", into Triton's cache" if arch else ""),
             [py, "-m", "crate_kernels.ops.aot", "--arch", str(aot_arch), "--jobs", jobs, *warm],
             env=lambda report: {"TRITON_INTERPRET": "0"}, collect=collect_aot),
        Step("ceilings", seconds["ceilings"], "the measured ceilings: one bf16 matrix product, one device copy",
             [py, str(Path(__file__).resolve()), "--measure-ceilings", str(ceilings_file)], collect=collect_ceilings),
        tuner("library", "the tuner's table over the library candidates (the baselines), Small and Base"),
        Step("build", seconds["build"], "the CUDA extension (csrc/), a stale build lock removed first",
             [py, "-m", "crate_kernels.ops.cuda_ext", "--build", "--remove-stale-lock"], collect=collect_build),
        tuner("tune", "the tuner's table over every candidate, Small and Base: auto's choices"),
        suite("compile", ["benchmarks/test_bench_mssa_gpu.py", "benchmarks/test_bench_ista_gpu.py"],
              "torch.compile of the reference, fwd+bwd: MSSA at Base's n=197, ISTA at Base's width",
              k="compile-reference and fwd+bwd and not long"),
        tuner("autotune", "full autotuning, Base's and Small's shapes: the tuner's check once per config"),
        Step("tests", seconds["tests"], "Triton kernels on the device: serial, first autotune config, nothing cached",
             pytest(*TRITON_TESTS, "-v", "-rfE"), env=test_env, skip_if=skip_tests,
             collect=lambda report, result, output: report.data.update(tests=pytest_outcome(result["rc"], output))),
        Step("tests-csrc", seconds["tests-csrc"], "the CUDA extension's device tests",
             pytest(*CSRC_TESTS, "-v", "-rfE"), env=test_env, skip_if=needs_build,
             collect=lambda report, result, output: report.data.update(
                 tests_csrc=pytest_outcome(result["rc"], output))),
        suite("model", ["benchmarks/test_bench_model.py"], "training step: auto and reference, then torch.compile"),
        suite("data", ["benchmarks/test_bench_data.py"],
              "input pipeline: training views per core, DataLoader workers"),
    ]


# ------------------------------------------------------------------------------------------------------------
# The tuner's driver: one process per tuner step (``--tune-driver NAME FILE``)
# ------------------------------------------------------------------------------------------------------------
TUNE_MODELS = ("crate_mae_base", "crate_mae_small")  # Base first: the shapes the estimates are for
TUNE_BATCH = {"cuda": 256, "cpu": 1}  # the operator suites' batch on the GPU; a dry run's on CPU


def _train_step(name: str, device: str):
    """One bf16-autocast forward and backward of masked autoencoder ``name`` (backend auto) on a random batch."""
    import torch

    from crate_kernels.models.registry import build_mae

    model = build_mae(name, backend="auto").to(device)
    imgs = torch.randn(TUNE_BATCH[device], 3, 224, 224, device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(imgs)[0]
        loss.backward()

    return step


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:  # one line per record, so that a step cut at its limit keeps what it finished
        f.write(json.dumps(record, default=str) + "\n")


def _library_only() -> None:
    """Every candidate that is not a library path reports itself unsupported (this process only)."""
    from crate_kernels.ops import backend

    for kind in backend.KERNEL_KINDS:
        for name, entry in backend.candidates(kind).items():
            if not entry.library:
                backend.register_candidate(kind, name, entry.fn, lambda *args: "not a library path (library step)")


def _autotuners() -> dict:
    """{kernel name: triton Autotuner} of every Triton kernel crate_kernels.ops.aot knows."""
    from triton.runtime.autotuner import Autotuner

    from crate_kernels.ops import aot

    found = {}
    for module_name, name in aot.registry().values():
        kernel = importlib.import_module(module_name).TRITON_KERNELS[name]
        while not isinstance(kernel, Autotuner) and hasattr(kernel, "fn"):
            kernel = kernel.fn
        if isinstance(kernel, Autotuner):
            found[f"{module_name.rsplit('.', 2)[-2]}.{name}"] = kernel
    return found


def tune_driver(name: str, path: Path) -> None:
    """Tuner step ``name``: library (library candidates only) or tune (all), CRATE-MAE-Base and -Small; autotune:
    both once per round, round i running each Triton kernel's i-th kept autotune config (its last where it has
    fewer), until no kernel has one left. Appends to ``path`` one record per model and round: {"model", "batch",
    "round", "configs" (kernel: config run), "rows": tuning_table() rows, "table": format_tables(rows)}."""
    import torch

    from crate_kernels.ops import tuning

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "library":
        _library_only()
    if name != "autotune":
        for model in TUNE_MODELS:
            with tuning.fresh_memory():
                rows = tuning.tune_step(_train_step(model, device))
            _append(path, {"model": model, "batch": TUNE_BATCH[device], "rows": rows,
                           "table": tuning.format_tables(rows)})
        return
    rounds = ConfigRounds(_autotuners() if device == "cuda" else {})
    steps = {model: _train_step(model, device) for model in TUNE_MODELS}
    while True:
        for model, step in steps.items():
            rounds.reset()
            for old in Path(os.environ["CRATE_KERNELS_CACHE"]).glob("tuning-*.json"):
                old.unlink()  # every round measures and checks again
            with tuning.fresh_memory():
                rows = tuning.tune_step(step)
            _append(path, {"model": model, "batch": TUNE_BATCH[device], "round": rounds.round,
                           "configs": dict(rounds.used), "rows": rows, "table": tuning.format_tables(rows)})
        if not rounds.next():
            return


class ConfigRounds:
    """Triton autotuners made to run one config: in round i each kernel's i-th config of those its own pruning
    keeps (its last where it keeps fewer). ``used``: kernel -> the config it ran since ``reset``."""

    def __init__(self, tuners: dict):
        self.tuners, self.round, self.used, self.kept = tuners, 0, {}, {}  # kept: kernel -> most configs kept
        for kernel, tuner in tuners.items():
            tuner.early_config_prune = self._one_config(kernel, tuner.early_config_prune)

    def _one_config(self, kernel: str, prune):
        def pick(configs, named_args, **kwargs):
            kept = prune(configs, named_args, **kwargs) if prune else configs
            self.kept[kernel] = max(self.kept.get(kernel, 0), len(kept))
            config = kept[min(self.round, len(kept) - 1)]
            self.used[kernel] = str(config)
            return [config]
        return pick

    def reset(self) -> None:
        """Forget the autotuners' choices (each launch picks again) and the configs used."""
        self.used.clear()
        for tuner in self.tuners.values():
            tuner.cache.clear()

    def next(self) -> bool:
        """Go to the next round; False when every kernel has run each config it kept."""
        more = any(n > self.round + 1 for n in self.kept.values())
        self.round += more
        return more


def tuning_failures(step: str, record: dict) -> list[str]:
    """A line per candidate the tuner dropped (wrong result or raised) in a record of tuner step ``step``."""
    where = f"{step} {record['model']}" + (f" round {record['round']}" if "round" in record else "")
    configs = "; configs " + ", ".join(f"{k}: {v}" for k, v in record["configs"].items()) \
        if record.get("configs") else ""
    return [f"{where}: {r['kind']} {r['candidate']} on {r['shape']}: {r['status']}" + configs
            for r in record["rows"] if r["status"] != "ok" and not r["status"].startswith("unsupported")]


def auto_choices(records: list[dict]) -> list[dict]:
    """What auto chose: {"model", "kind", "shape", "candidate", "ms"} per chosen row."""
    return [{"model": r["model"], "kind": row["kind"], "shape": row["shape"], "candidate": row["candidate"],
             "ms": row["ms"]} for r in records for row in r["rows"] if row["chosen"]]


def tables_text(records: list[dict]) -> list[str]:
    """The tuner's tables (crate_kernels.ops.tuning.format_tables) of each record, headed by model and batch."""
    lines = []
    for r in records:
        head = f"{r['model']}, batch {r['batch']}" + (f", round {r['round']}" if "round" in r else "")
        lines += [head, *r["table"].splitlines(), ""]
    return lines


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


def _counts(result: dict, benchmarks: str) -> str:
    """A step's benchmark rows or tuner rows, as words after its status."""
    if "tuner_rows" in result:
        return f"{result['tuner_rows']} tuner rows"
    return f"{result['rows']} {benchmarks}" if "rows" in result else ""


def summary_text(data: dict) -> str:
    """Benchmark rows (short names, the figures above) and the steps' outcomes, cut steps named."""
    lines = [f"{'benchmark':<40}" + "".join(f"{title:>9}" for _, title, _ in _COLUMNS)]
    for row in data["benchmarks"]:
        f = figures(row, data["ceilings"])
        lines.append(f"{_short(row['name'])[:40]:<40}" + "".join(f"{_cell(f[k], fmt):>9}" for k, _, fmt in _COLUMNS))
    lines += input_cores_text(data["benchmarks"])
    lines += choices_text(data)
    ceil = data["ceilings"]
    lines.append("ceilings: " + (f"{ceil['matmul']} matmul {ceil['matmul_tflops']:.1f} TFLOP/s, device copy "
                                 f"{ceil['copy_gbps']:.0f} GB/s" if ceil else "not measured"))
    lines.append(f"tests: {data['tests'].get('summary')}; build: {data['build'][:100]}; "
                 f"tests-csrc: {data['tests_csrc'].get('summary')}")
    lines += [f"  FAILED {t}" for t in (data["tests"].get("failed", []) + data["tests_csrc"].get("failed", []))[:10]]
    lines += [f"FAILED {line}" for line in data["failures"][:20]]
    counts = {name: _counts(r, "rows") for name, r in data["steps"].items()}
    lines.append("steps: " + ", ".join(f"{name} {r['status']}" + (f" ({counts[name]})" if counts[name] else "")
                                       for name, r in data["steps"].items()))
    lines.append(f"cut: {', '.join(data['cut'])}" if data["cut"] else "cut: none")
    return "\n".join(lines)


def choices_text(data: dict) -> list[str]:
    """One line per operator direction and shape: the candidate auto chose in the tune step and its median ms."""
    return [f"auto {c['model']} {c['kind']} {c['shape']}: {c['candidate']}"
            + ("" if c["ms"] is None else f" ({c['ms']:.4f} ms)") for c in data["auto"]]


def markdown(data: dict) -> str:
    info, ceil = data["environment"], data["ceilings"]
    lines = [f"# GPU report: {info.get('gpu') or 'CPU dry run'} ({info['date']})", "",
             f"- command: `{data['command']}`", *(f"- {k}: {v}" for k, v in info.items() if k != "date"),
             f"- tests: {data['tests'].get('summary')}",
             *(f"  - failed: `{t}`" for t in data["tests"].get("failed", [])),
             f"- aot: {(data['aot'] or {}).get('summary') or 'not finished'}; problems: "
             f"{len((data['aot'] or {}).get('problems', []))}",
             f"- csrc build: {data['build']}", f"- tests-csrc: {data['tests_csrc'].get('summary')}",
             *(f"  - failed: `{t}`" for t in data["tests_csrc"].get("failed", [])),
             "- ceilings: " + (f"{ceil['matmul']} matmul {ceil['matmul_tflops']:.1f} TFLOP/s; device copy "
                              f"{ceil['copy_gbps']:.0f} GB/s (read+write)" if ceil else "not measured"),
             f"- wall: {data['wall_seconds']:.0f}s of a {data['budget_seconds']:.0f}s budget; cut: "
             + (", ".join(data["cut"]) or "none"), "",
             "| step | share s | limit s | took s | status |", "|---|---:|---:|---:|---|"]
    for item in data["plan"]:
        r = data["steps"].get(item["step"], {"status": "not reached"})
        status = r["status"] + (f", {_counts(r, 'benchmarks')}" if _counts(r, "benchmarks") else "") + (
            f": {r['detail']}" if r.get("detail") else "")
        lines.append(f"| {item['step']} | {item['seconds']:.0f} | {r.get('limit', '')} | {r.get('seconds', '')} "
                     f"| {status} |")
    lines += ["", "Times: ms is device time (CUDA events, median) where measured, else pytest-benchmark's wall "
              "median; host ms is the host's time to issue one call.", ""]
    if data["failures"]:
        lines += ["## Failures: dropped candidates and autotune configs, compile problems", "",
                  *(f"- FAILED {line}" for line in data["failures"]), ""]
    choices = choices_text(data)
    if choices:
        lines += ["## What `auto` chose (tune step)", "", *(f"- {line}" for line in choices), ""]
    for step, title in (("library", "library candidates only (the baselines)"), ("tune", "every candidate"),
                        ("autotune", "full autotuning, one config per kernel per round")):
        if data["tuning"].get(step):
            lines += [f"## Tuner's tables, {step} step: {title}", "", "```", *tables_text(data["tuning"][step]),
                      "```", ""]
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
    parser.add_argument("--tune-driver", nargs=2, default=None, metavar=("STEP", "FILE"),
                        help="(a tuner step: library, tune or autotune) append its records to FILE and exit")
    args = parser.parse_args(argv)
    if args.measure_ceilings:
        measure_ceilings(args.measure_ceilings)
        return 0
    if args.tune_driver:
        step, path = args.tune_driver
        if step not in ("library", "tune", "autotune"):
            parser.error(f"--tune-driver STEP must be library, tune or autotune, got {step!r}")
        tune_driver(step, Path(path))
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
    report.run_all(plan(args, report.scratch, arch=device_arch()))
    shutil.rmtree(report.scratch, ignore_errors=True)  # the children's logs are in the report's .log
    print("\n" + summary_text(report.data))
    print(f"wrote {out_dir / stem}.json/.md/.log in {time.time() - report.start:.0f}s")
    failed = any(report.data[k].get("rc") not in (0, None) for k in ("tests", "tests_csrc"))
    return 1 if failed or report.data["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
