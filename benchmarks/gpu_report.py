"""One reproducible GPU report: install, build, test, measure ceilings, benchmark, write results.

    python benchmarks/gpu_report.py                 # on a CUDA machine (no network needed)
    python benchmarks/gpu_report.py --dry-run       # on CPU: same steps with the CPU suites, results to a temp dir

On a lent GPU machine, whose files come back only from $OUT (then copy them to benchmarks/results/):

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_report.py --out $OUT     (device timeout_s 480)

Steps: `pip install --no-deps --no-build-isolation -e .`; build csrc/ when it exists; the tests only a GPU
can run (the Triton kernels and the CUDA extension on the device, on pytest-xdist workers where installed);
the device's measured ceilings (one large bf16 matrix product, one large device-to-device copy); the
benchmark suites, most important first, each under its own time limit (rows kept per finished benchmark); then
benchmarks/results/<gpu>-<date>.json and .md with device, driver, versions, git commit and command
(rewritten after every step, so a run stopped from outside keeps what it measured), and a short summary
table printed last. The whole run keeps within --budget seconds. README's performance section is then
regenerated from the committed results by benchmarks/readme_perf.py.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Benchmark suites in order of importance, each in its own pytest process under its own time limit (cut
# to what is left of --budget); benchmarks/conftest.py appends each finished benchmark's row to a file,
# so a suite stopped at its limit keeps what it measured.
BENCH_SUITES = [
    ("benchmarks/test_bench_model.py", 150),
    ("benchmarks/test_bench_ista_gpu.py", 40),
    ("benchmarks/test_bench_mssa_gpu.py", 60),
    ("benchmarks/test_bench_ops.py", 15),
]
# What only a GPU can check: the Triton kernels on the device and the CUDA extension's device tests.
# Everything else (the operator layer on CPU, csrc's compile and host-emulation tests, training) is CI's job.
GPU_TESTS = [
    "tests/test_mssa_triton.py", "tests/test_ista_triton.py",
    "tests/test_csrc.py::test_cuda_mssa_backward", "tests/test_csrc.py::test_cuda_ista_backward",
    "tests/test_csrc.py::test_cuda_ext_rejects_cpu_tensors_and_bad_dtypes",
]
# Children reuse Triton's autotuning results across processes (the tests, then each suite).
CHILD_ENV = {"TRITON_CACHE_AUTOTUNING": "1"}


def _text(stream) -> str:
    """A subprocess stream as text (TimeoutExpired carries bytes even when run with text=True)."""
    if stream is None:
        return ""
    return stream.decode(errors="replace") if isinstance(stream, bytes) else stream


def sh(cmd: list[str], log: list[str], timeout: float | None = None, env: dict | None = None) -> tuple[int, str]:
    """Run a command from the repository root, echo the end of its output, keep all of it in ``log``;
    return (exit status, output). A command stopped at ``timeout`` returns status 124."""
    print(f"$ {' '.join(cmd)}  (limit {timeout:.0f}s)" if timeout else f"$ {' '.join(cmd)}", flush=True)
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = f"{_text(exc.stdout)}{_text(exc.stderr)}\nTIMEOUT after {timeout:.0f}s", 124
    except OSError as exc:
        out, rc = f"could not run: {exc}", 127
    log.append(f"$ {' '.join(cmd)}  (rc={rc}, {time.time() - start:.1f}s)\n{out}")
    print("\n".join(out.strip().splitlines()[-6:]) + f"\n[rc={rc}, {time.time() - start:.0f}s]", flush=True)
    return rc, out


def test_outcome(rc: int, out: str) -> dict:
    """Counts and failing test ids from pytest's output, also when it was stopped before its summary."""
    summary = re.findall(r"^=*\s*(\d+ (?:passed|failed|error).*?)\s*=*$", out, flags=re.M)
    outcome = {"rc": rc, "summary": summary[-1] if summary else None,
               "failed": sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)))[:50]}
    if outcome["summary"] is None:  # stopped early: count the per-test lines of -v output
        counts = {k: len(re.findall(rf"\b{k}\b tests/", out)) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
        outcome["summary"] = (f"stopped (rc={rc}) after " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items())
                              + "; " + ", ".join(sorted(set(re.findall(r"(?:FAILED|ERROR) (tests/\S+)", out)))[:20]))
    return outcome


def ceilings(cuda: bool) -> dict:
    """Measured dense-matmul rate and device-to-device copy bandwidth (median of several runs)."""
    import torch
    from bench_utils import matmul_flops_per_second, median_seconds

    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    flops = matmul_flops_per_second(n, dtype, 20 if cuda else 3)
    numel = (1 << 30) // 2 if cuda else (1 << 24)  # 1 GiB of bf16 on the GPU
    src = torch.randn(numel, device="cuda" if cuda else "cpu", dtype=torch.bfloat16 if cuda else torch.float32)
    dst = torch.empty_like(src)
    cp = median_seconds(lambda: dst.copy_(src), 20 if cuda else 3)
    return {
        "matmul": f"{n}^3 {str(dtype).replace('torch.', '')}",
        "matmul_tflops": flops / 1e12,
        "copy_bytes": 2 * src.numel() * src.element_size(),
        "copy_gbps": 2 * src.numel() * src.element_size() / cp / 1e9,
    }


def environment(cuda: bool) -> dict:
    import torch

    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "host": platform.node(),
    }
    for module in ("triton", "numpy"):
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
                    sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}")
        info["driver"] = output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or None
    else:
        info.update(gpu=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def summarize(bench_json: dict) -> list[dict]:
    """Flatten pytest-benchmark JSON to rows: group, name, median ms, and the extra_info figures."""
    rows = []
    for b in bench_json.get("benchmarks", []):
        rows.append({"group": b.get("group") or "", "name": b["name"], "median_ms": b["stats"]["median"] * 1e3,
                     **b.get("extra_info", {})})
    return rows


def markdown(report: dict) -> str:
    info, ceil, tests = report["environment"], report.get("ceilings"), report["tests"]
    lines = [f"# GPU report: {info.get('gpu') or 'CPU dry run'} ({info['date']})", "",
             f"- command: `{report['command']}`",
             *(f"- {k}: {v}" for k, v in info.items() if k != "date"),
             f"- tests: {tests.get('summary')}",
             *(f"  - failed: `{t}`" for t in tests.get("failed", [])),
             f"- csrc build: {report.get('build')}",
             "- ceilings: " + (f"{ceil['matmul']} matmul {ceil['matmul_tflops']:.1f} TFLOP/s; device copy "
                              f"{ceil['copy_gbps']:.0f} GB/s (read+write)" if ceil else "not measured"),
             *(f"- suite {k}: rc={v['rc']}, {v['seconds']:.0f}s, {v['rows']} benchmarks"
               for k, v in report["suites"].items()),
             f"- wall: {report['wall_seconds']:.0f}s"
             + (f" (stopped early: {report['stopped']})" if report.get("stopped") else ""),
             ""]
    group = None
    for r in report["benchmarks"]:
        if r["group"] != group:
            group = r["group"]
            lines += ["", f"## {group}", "", "| name | median ms | figures |", "|---|---:|---|"]
        extras = ", ".join(f"{k}={_fmt(v)}" for k, v in r.items() if k not in ("group", "name", "median_ms"))
        lines.append(f"| {r['name']} | {r['median_ms']:.3f} | {extras} |")
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
    parser.add_argument("--skip-install", action="store_true", help="do not pip install the checkout")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--budget", type=float, default=360.0,
                        help="seconds for the whole report; every step's limit is cut to what is left (default 360)")
    parser.add_argument("--test-timeout", type=float, default=90.0)
    parser.add_argument("--test-workers", type=int, default=8, help="pytest-xdist workers for the tests, if installed")
    parser.add_argument("--bench-time-scale", type=float, default=1.0, help="multiply every suite's time limit")
    parser.add_argument("-k", default=None, help="pytest -k filter for the benchmarks")
    args = parser.parse_args(argv)

    import torch

    t0 = time.time()
    deadline = t0 + args.budget
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        raise SystemExit("no CUDA GPU found: run with --dry-run to exercise the report on CPU")
    out_dir = args.out or (Path(tempfile.mkdtemp()) if args.dry_run else ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    py = sys.executable
    info = environment(cuda)
    stem = f"{re.sub(r'[^A-Za-z0-9]+', '-', info.get('gpu') or 'cpu').strip('-').lower()}-{info['date'][:10]}"
    report = {"environment": info, "command": "python " + " ".join(
                  ["benchmarks/gpu_report.py", *(argv if argv is not None else sys.argv[1:])]),
              "build": "not run", "tests": {"summary": "not run"}, "ceilings": None, "suites": {}, "benchmarks": [],
              "wall_seconds": 0.0}

    def write(stopped: str | None = None) -> None:
        """(Re)write the report files: called after every step, so a run stopped from outside keeps its results."""
        report["wall_seconds"] = time.time() - t0
        if stopped:
            report["stopped"] = stopped
        (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
        (out_dir / f"{stem}.md").write_text(markdown(report))
        (out_dir / f"{stem}.log").write_text("\n".join(log))

    def limit(seconds: float, reserve: float = 10.0) -> float:
        return min(seconds, deadline - time.time() - reserve)

    write()
    if not args.skip_install:  # not fatal: every step below runs from the repository root anyway
        sh([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."], log, timeout=limit(120))
    if (ROOT / "csrc").is_dir() and any((ROOT / "csrc").glob("*.cu")) and limit(120) > 20:
        rc, out = sh([py, "-c", "from crate_kernels.ops import cuda_ext; raise SystemExit(cuda_ext.main(['--build']))"],
                     log, timeout=limit(120))
        report["build"] = "ok" if rc == 0 else f"failed (rc={rc}): {(out.strip().splitlines() or [''])[-1][:300]}"
        write()

    if not args.skip_tests and limit(args.test_timeout) > 20:
        cmd = [py, "-m", "pytest", *GPU_TESTS, "-v", "-rfE", "-p", "no:cacheprovider"]
        try:
            import xdist  # noqa: F401  (present on the GPU machines' image)

            cmd += ["-n", str(args.test_workers)]
        except ImportError:
            pass
        rc, out = sh(cmd, log, timeout=limit(args.test_timeout), env=CHILD_ENV)
        report["tests"] = test_outcome(rc, out)
        write()

    report["ceilings"] = ceilings(cuda)
    if cuda:
        torch.cuda.empty_cache()  # the suites run in child processes: hand the ceilings' buffers back
    write()

    for suite, seconds in BENCH_SUITES:
        budget = limit(seconds * args.bench_time_scale)
        if budget < 15:
            report["suites"][suite] = {"rc": None, "seconds": 0.0, "rows": 0}
            write(stopped=f"budget spent before {suite}")
            continue
        rows_file = out_dir / f"rows-{Path(suite).stem}.jsonl"
        rows_file.unlink(missing_ok=True)
        cmd = [py, "-m", "pytest", suite, "-q", "-p", "no:cacheprovider", "--benchmark-only"]
        if args.k:
            cmd += ["-k", args.k]
        start = time.time()
        rc, _ = sh(cmd, log, timeout=budget, env={**CHILD_ENV, "CRATE_BENCH_ROWS": str(rows_file)})
        rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
        rows_file.unlink(missing_ok=True)
        report["benchmarks"] += rows
        report["suites"][suite] = {"rc": rc, "seconds": time.time() - start, "rows": len(rows)}
        write()

    write()
    ceil, tests = report["ceilings"], report["tests"]
    print(f"\nwrote {out_dir / stem}.json/.md/.log in {time.time() - t0:.0f}s")
    print(f"build: {report['build']}; tests: {tests['summary']}; matmul {ceil['matmul_tflops']:.1f} TFLOP/s; "
          f"copy {ceil['copy_gbps']:.0f} GB/s")
    for name in tests.get("failed", [])[:10]:
        print(f"  FAILED {name}")
    print(f"{'benchmark':<64} {'ms':>10}  key figures")
    for r in report["benchmarks"]:
        keys = [k for k in ("img_per_s", "mfu", "model_tflops", "tflops", "gbps", "peak_memory_bytes",
                            "saved_bytes_unique") if k in r]
        print(f"{r['name'][:64]:<64} {r['median_ms']:>10.3f}  " + " ".join(f"{k}={_fmt(r[k])}" for k in keys))
    return 0 if tests.get("rc", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
