"""Static figures of the csrc/ kernels from their compiled code: ptxas -v (registers, stack, spills, static
shared memory, barriers) and, per loop of the SASS (a backward branch and its target), the tensor-core
products and the memory operations and waits in one iteration.

    python scripts/csrc_figures.py [--arch 90 --arch 80] [--kernels mma] > figures.md

Needs nvcc (crate_kernels.ops.cuda_ext.cuda_home()) and cuobjdump (the toolkit's, or the copy Triton ships).
SASS names: HMMA.16816 = mma.sync m16n8k16; LDSM.16.M88.4 / .MT88.4 = ldmatrix.x4 / .x4.trans; LDGSTS =
cp.async; LDGDEPBAR = cp.async.commit_group; DEPBAR.LE SB0, n = cp.async.wait_group n; BAR.SYNC =
__syncthreads; MUFU.EX2 = exp2. Counts inside a loop include its inner loops' bodies once.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from crate_kernels.ops import cuda_ext  # noqa: E402

DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-D__CUDA_NO_HALF2_OPERATORS__"]
# column -> SASS opcode prefix
OPS = {"mma": "HMMA.16816", "ldsm": "LDSM.16.M88", "ldsm.t": "LDSM.16.MT88", "cp.async": "LDGSTS",
       "commit": "LDGDEPBAR", "wait": "DEPBAR.LE", "bar": "BAR.SYNC", "ex2": "MUFU.EX2", "lds": "LDS",
       "sts": "STS", "ldg": "LDG", "stg": "STG"}


def short_name(mangled: str) -> str:
    name = subprocess.run(["c++filt"], input=mangled, capture_output=True, text=True).stdout.strip() or mangled
    name = re.sub(r"ck::\(anonymous namespace\)::", "", name).replace("(Op)0", "dx").replace("(Op)1", "dM")
    name = re.sub(r"^void |\(.*\)$", "", name)
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")


def ptxas_figures(log: str) -> dict:
    """{kernel: {regs, stack, spill_st, spill_ld, smem, bars}} from a ptxas -v log of one arch."""
    out, name = {}, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            name = short_name(m.group(1))
            out[name] = {"smem": 0, "bars": 0}
        elif name and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                                      line)):
            out[name].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        elif name and (m := re.search(r"Used (\d+) registers", line)):
            out[name]["regs"] = int(m.group(1))
            if b := re.search(r"used (\d+) barriers", line):
                out[name]["bars"] = int(b.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                out[name]["smem"] = int(s.group(1))
    return out


def sass_loops(sass: str) -> dict:
    """{kernel: [(start, end, Counter of OPS)]}: every loop of every function, outermost first."""
    out = {}
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name = short_name(block.split()[0])
        insts = [(int(m.group(1), 16), m.group(2).strip())
                 for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", block)]
        loops = []
        for addr, text in insts:
            if (m := re.search(r"\bBRA\s+(?:`\(\S+\)\s*)?0x([0-9a-f]+)", text)) and int(m.group(1), 16) < addr:
                start = int(m.group(1), 16)
                counts = Counter()
                for a, t in insts:
                    if start <= a <= addr:
                        opcode = re.sub(r"^@!?U?P\w+\s+", "", t).split()[0]
                        for col, prefix in OPS.items():
                            if opcode.startswith(prefix) and not (col in ("lds", "ldg") and opcode.startswith(
                                    ("LDSM", "LDGSTS", "LDGDEPBAR"))):
                                counts[col] += 1
                loops.append((start, addr, counts))
        out[name] = sorted(loops, key=lambda loop: (loop[0], -loop[1]))
    return out


def cuobjdump() -> str:
    home = cuda_ext.cuda_home()
    for cand in ([str(Path(home) / "bin" / "cuobjdump")] if home else []) + [shutil.which("cuobjdump") or ""]:
        if cand and Path(cand).is_file():
            return cand
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.is_file():
        return str(bundled)
    raise SystemExit("cuobjdump not found (CUDA toolkit or Triton)")


def compile_arch(cu: Path, arch: str, out_dir: Path) -> tuple[str, str]:
    """(ptxas -v log, SASS) of `cu` for sm_`arch`, with the flags tests/test_csrc.py compiles it with."""
    home = cuda_ext.cuda_home()
    if home is None:
        raise SystemExit("nvcc not found")
    obj = out_dir / f"{cu.stem}_{arch}.o"
    cmd = [str(Path(home) / "bin" / "nvcc"), "-c", str(cu), "-o", str(obj), "-O3", "-std=c++17",
           "--expt-relaxed-constexpr", *DEFINES, "-Xptxas", "-v", "-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    sass = subprocess.run([cuobjdump(), "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    return log, sass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", action="append", help="SM architecture (default: 90 and 80)")
    parser.add_argument("--kernels", default="", help="only kernels whose name contains this")
    args = parser.parse_args(argv)
    cols = list(OPS)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch or ["90", "80"]:
            print(f"\n## sm_{arch}\n")
            print("| kernel | regs | stack | spill st/ld | static smem | loop (SASS) | " + " | ".join(cols) + " |")
            print("|---" * (6 + len(cols)) + "|")
            for cu in sorted((ROOT / "csrc").glob("*.cu")):
                log, sass = compile_arch(cu, arch, Path(tmp))
                figures, loops = ptxas_figures(log), sass_loops(sass)
                for name, f in figures.items():
                    if args.kernels not in name:
                        continue
                    head = (f"| {name} | {f['regs']} | {f['stack']} | {f['spill_st']}/{f['spill_ld']} | "
                            f"{f['smem']} |")
                    rows = loops.get(name) or [(0, 0, Counter())]
                    for i, (start, end, counts) in enumerate(rows):
                        prefix = head if i == 0 else "| | | | | |"
                        span = f"{start:#x}-{end:#x}" if end else "none"
                        print(f"{prefix} {span} | " + " | ".join(str(counts[c]) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
