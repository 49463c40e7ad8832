"""One reproducible GPU report: install, build, test, measure ceilings, benchmark, write results.

    python benchmarks/gpu_report.py                 # on a CUDA machine (no network needed)
    python benchmarks/gpu_report.py --dry-run       # on CPU: same steps with the CPU suites, results to a temp dir

Steps: `pip install --no-deps --no-build-isolation -e .`; build csrc/ when it exists; the test suite
(CUDA tests included); the device's measured ceilings (one large bf16 matrix product, one large
device-to-device copy); the benchmark suites (pytest-benchmark JSON); then
benchmarks/results/<gpu>-<date>.json and .md with device, driver, versions, git commit and command,
and a short summary table printed last. `--readme` regenerates README's performance section from the
newest committed results (see benchmarks/readme_perf.py).
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
# Each suite runs in its own pytest process and time limit, so one slow suite cannot sink the report.
BENCH_SUITES = [
    ("benchmarks/test_bench_model.py", 150),
    ("benchmarks/test_bench_mssa_gpu.py", 75),
    ("benchmarks/test_bench_ista_gpu.py", 45),
    ("benchmarks/test_bench_ops.py", 20),
]
# The kernel and model tests (the training pipeline's CPU tests are CI's job).
GPU_TESTS = ["tests/test_ops.py", "tests/test_model.py", "tests/test_mssa_triton.py", "tests/test_ista_triton.py",
             "tests/test_csrc.py"]


def sh(cmd: list[str], log: list[str], timeout: float | None = None, check: bool = False) -> int:
    """Run a command from the repository root, echo and keep its output; return its exit status."""
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = f"{exc.stdout or ''}{exc.stderr or ''}\nTIMEOUT after {timeout}s", 124
    log.append(f"$ {' '.join(cmd)}  (rc={rc}, {time.time() - start:.1f}s)\n{out}")
    tail = "\n".join(out.strip().splitlines()[-6:])
    print(tail, flush=True)
    if check and rc:
        raise SystemExit(f"command failed with status {rc}: {' '.join(cmd)}")
    return rc


def ceilings(cuda: bool) -> dict:
    """Measured dense-matmul rate and device-to-device copy bandwidth (median of several runs)."""
    import torch

    device = "cuda" if cuda else "cpu"

    def median_seconds(fn, reps):
        fn()
        times = []
        for _ in range(reps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm = median_seconds(lambda: a @ b, 20 if cuda else 3)
    numel = (1 << 30) // 2 if cuda else (1 << 24)  # 1 GiB of bf16 on the GPU
    src = torch.randn(numel, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    dst = torch.empty_like(src)
    cp = median_seconds(lambda: dst.copy_(src), 20 if cuda else 3)
    return {
        "matmul": f"{n}^3 {str(dtype).replace('torch.', '')}",
        "matmul_tflops": 2 * n ** 3 / mm / 1e12,
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
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import numpy

        info["numpy"] = numpy.__version__
    except ImportError:
        pass
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    info["git_commit"] = commit + ("+dirty" if dirty else "")
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}")
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["driver"] = smi.stdout.strip() or None
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


def markdown(info: dict, ceil: dict, tests: dict, rows: list[dict], command: str) -> str:
    lines = [f"# GPU report: {info.get('gpu') or 'CPU dry run'} ({info['date']})", "",
             f"- command: `{command}`",
             *(f"- {k}: {v}" for k, v in info.items() if k != "date"),
             f"- tests: {tests['summary']}",
             f"- ceilings: {ceil['matmul']} matmul {ceil['matmul_tflops']:.1f} TFLOP/s; "
             f"device copy {ceil['copy_gbps']:.0f} GB/s (read+write)", ""]
    group = None
    for r in rows:
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
    parser.add_argument("--test-timeout", type=float, default=90.0)
    parser.add_argument("--bench-time-scale", type=float, default=1.0, help="multiply every suite's time limit")
    parser.add_argument("-k", default=None, help="pytest -k filter for the benchmarks")
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        raise SystemExit("no CUDA GPU found: run with --dry-run to exercise the report on CPU")
    out_dir = args.out or (Path(tempfile.mkdtemp()) if args.dry_run else ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    py = sys.executable
    t0 = time.time()

    if not args.skip_install:
        sh([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."], log, check=True)
    if (ROOT / "csrc").is_dir() and any((ROOT / "csrc").glob("*.cu")):
        sh([py, "-m", "crate_kernels.ops.cuda_ext", "--build"], log, timeout=300)

    tests = {"summary": "skipped"}
    if not args.skip_tests:
        rc = sh([py, "-m", "pytest", *GPU_TESTS, "-q", "-p", "no:cacheprovider"], log, timeout=args.test_timeout)
        found = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?)\s*=*$", log[-1], flags=re.M)
        tests = {"rc": rc, "summary": found[-1] if found else f"rc={rc}"}

    ceil = ceilings(cuda)
    rows = []
    for suite, timeout in BENCH_SUITES:
        bench_json = out_dir / f"{Path(suite).stem}.json"
        cmd = [py, "-m", "pytest", suite, "-q", "-p", "no:cacheprovider", "--benchmark-only",
               f"--benchmark-json={bench_json}"]
        if args.k:
            cmd += ["-k", args.k]
        sh(cmd, log, timeout=timeout * args.bench_time_scale)
        if bench_json.exists():
            rows += summarize(json.loads(bench_json.read_text()))
            bench_json.unlink()

    info = environment(cuda)
    stem = f"{re.sub(r'[^A-Za-z0-9]+', '-', info.get('gpu') or 'cpu').strip('-').lower()}-{info['date'][:10]}"
    command = "python " + " ".join(["benchmarks/gpu_report.py", *(argv if argv is not None else sys.argv[1:])])
    report = {"environment": info, "ceilings": ceil, "tests": tests, "benchmarks": rows, "command": command,
              "wall_seconds": time.time() - t0}
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    (out_dir / f"{stem}.md").write_text(markdown(info, ceil, tests, rows, command))
    (out_dir / f"{stem}.log").write_text("\n".join(log))

    print(f"\nwrote {out_dir / stem}.json/.md/.log in {time.time() - t0:.0f}s")
    print(f"tests: {tests['summary']}; matmul {ceil['matmul_tflops']:.1f} TFLOP/s; copy {ceil['copy_gbps']:.0f} GB/s")
    print(f"{'benchmark':<64} {'ms':>10}  key figures")
    for r in rows:
        keys = [k for k in ("img_per_s", "mfu", "tflops", "peak_memory_bytes", "saved_bytes_unique") if k in r]
        print(f"{r['name'][:64]:<64} {r['median_ms']:>10.3f}  " + " ".join(f"{k}={_fmt(r[k])}" for k in keys))
    return 0 if tests.get("rc", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
