"""csrc/: the CUDA backward kernels and their torch binding.

(a) every csrc/*.cu compiles torch-free with nvcc for sm_80 and sm_90 under torch's extension flags, with no
    warning, no register spill and no stack frame;
(b) the binding builds against this torch as a CppExtension linking those objects and libcudart, and imports;
(c) the kernels run on the CPU through csrc/host_emulation.h (g++, one fiber per CUDA thread; ldmatrix,
    mma.sync and cp.async per lane as the PTX ISA defines them) and match float64 math: every launcher, every
    kernel (fma, wmma, mma, mma-tiled), odd shapes, strided inputs, guarded outputs;
(d) on CUDA, the extension built by crate_kernels.ops.cuda_ext matches float64 math.

Without nvcc (or g++, ninja) (a)-(c) skip, unless $CI is set: CI must have the toolchain.
"""
from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tolerance import assert_close, assert_mssa_close

from crate_kernels.ops import cuda_ext
from crate_kernels.ops.ista import pack_mask

pytestmark = pytest.mark.compile  # nvcc builds of csrc/, and g++ builds of the kernels for host emulation
CSRC = Path(__file__).resolve().parents[1] / "csrc"
KERNELS = sorted(CSRC.glob("*.cu"))
ARCHS = ("80", "90")
# torch.utils.cpp_extension passes these to nvcc for every .cu of an extension.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false")
GUARD = 64  # poisoned elements on each side of every buffer the kernels see


def _need(tool: str | None, what: str):
    if tool:
        return tool
    if IN_CI:
        pytest.fail(f"{what} is missing, and CI must have it")
    pytest.skip(f"{what} is not available")


@pytest.fixture(scope="module")
def cuda_root() -> Path:
    return Path(_need(cuda_ext.cuda_home(), "the CUDA toolkit (nvcc)"))


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("csrc")


@pytest.fixture(scope="module")
def objects(cuda_root, build_dir):
    """Compile every kernel file in parallel: {path: (object, returncode, compiler output)}."""
    procs = {}
    for cu in KERNELS:
        obj = build_dir / f"{cu.stem}.o"
        cmd = [str(cuda_root / "bin" / "nvcc"), "-c", str(cu), "-o", str(obj), "-O3", "-std=c++17",
               "--threads", "2", "--expt-relaxed-constexpr", *TORCH_NVCC_DEFINES, "-Werror", "all-warnings",
               "-Xcompiler", "-fPIC,-Wall,-Wextra", "-Xptxas", "-v,-warn-spills,-warn-lmem-usage"]
        for arch in ARCHS:
            cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        procs[cu] = (obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = {}
    for cu, (obj, proc) in procs.items():
        log = proc.communicate()[0]  # drains the pipe while waiting
        results[cu] = (obj, proc.returncode, log)
    return results


# --------------------------------------------------------------------------------------------------------
# (a) nvcc
# --------------------------------------------------------------------------------------------------------
def test_kernel_sources_exist():
    assert {p.name for p in KERNELS} >= {"mssa_backward.cu", "ista_backward.cu"}
    for cu in KERNELS:
        assert "torch" not in re.findall(r'#include\s*[<"]([^/>"]+)', cu.read_text()), f"{cu.name} includes torch"


@pytest.mark.parametrize("cu", KERNELS, ids=[p.name for p in KERNELS])
def test_nvcc_compiles(objects, cu):
    obj, returncode, log = objects[cu]
    assert returncode == 0 and obj.is_file(), f"nvcc failed on {cu.name}:\n{log}"
    assert "warning" not in log.lower(), f"nvcc warns on {cu.name}:\n{log}"
    # ptxas -v: every kernel of every arch keeps its arrays in registers.
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert frames, f"no ptxas report for {cu.name}:\n{log}"
    bad = [f for f in frames if f != ("0", "0", "0")]
    assert not bad, f"{cu.name}: kernels with a stack frame or spills (stack, spill stores, spill loads): {bad}\n{log}"


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")


def _ptxas_figures(log: str) -> dict:
    """{(mangled kernel, arch): 'R regs, S stack, st/ld spill, M smem'} from a ptxas -v log."""
    figures, key, frame = {}, None, ""
    for line in log.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            key = m.groups()
        elif key and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                                     line)):
            frame = f"{m.group(1)} stack, {m.group(2)}/{m.group(3)} spill"
        elif key and (m := re.search(r"Used (\d+) registers", line)):
            smem = re.search(r"(\d+) bytes smem", line)
            figures[key] = f"{m.group(1):>3} regs, {frame}, {smem.group(1) if smem else 0} B static smem"
            key, frame = None, ""
    return figures


def test_ptxas_figures(objects, capsys):
    """Registers, stack, spills and static shared memory of every kernel on every arch, in the test output
    (dynamic shared memory: the launchers; loop figures: scripts/csrc_figures.py)."""
    figures = {}
    for cu, (_, returncode, log) in objects.items():
        assert returncode == 0, f"nvcc failed on {cu.name}"
        figures.update(_ptxas_figures(log))
    assert {arch for _, arch in figures} == set(ARCHS)
    names = sorted({name for name, _ in figures})
    cxxfilt = shutil.which("c++filt")
    demangled = (subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
                 if cxxfilt else names)
    lines = ["ptxas -v of csrc/ (kernel: " + "; ".join(f"sm_{a}" for a in ARCHS) + ")"]
    for name, pretty in zip(names, demangled):
        pretty = re.sub(r"ck::\(anonymous namespace\)::|^void ", "", pretty.strip() or name)
        pretty = re.sub(r"\(.*\)$", "", pretty.replace("(Op)0", "dx").replace("(Op)1", "dM"))
        lines.append(f"  {pretty}: " + "; ".join(figures.get((name, a), "-") for a in ARCHS))
    with capsys.disabled():
        print("\n" + "\n".join(lines))


# --------------------------------------------------------------------------------------------------------
# (b) the binding links
# --------------------------------------------------------------------------------------------------------
def test_binding_builds_and_links(objects, cuda_root, build_dir):
    _need(shutil.which("ninja"), "ninja")
    failed = [cu.name for cu, (_, rc, _) in objects.items() if rc != 0]
    assert not failed, f"kernel objects did not compile: {failed}"
    from torch.utils import cpp_extension

    lib = cuda_root / "lib64" if (cuda_root / "lib64").is_dir() else cuda_root / "lib"
    out = build_dir / "binding"
    out.mkdir(exist_ok=True)
    module = cpp_extension.load(
        name="crate_kernels_link_check", sources=[str(CSRC / "bindings.cpp")], build_directory=str(out),
        extra_cflags=["-O0", "-Wall", "-Wextra", "-Werror", "-isystem", str(cuda_root / "include")],
        extra_include_paths=[str(CSRC)],
        extra_ldflags=[str(obj) for obj, _, _ in objects.values()] + [f"-L{lib}", "-lcudart", f"-Wl,-rpath,{lib}"],
        verbose=False,
    )
    # Every launcher resolved at import (RTLD_NOW); the argument checks run before any CUDA call.
    w = torch.randn(1, 2, 3, 8)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        module.mssa_backward(w, w, w, torch.zeros(1, 2, 3), 0.5, "auto")
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        module.ista_backward(x, x, torch.eye(8), torch.zeros(3, 1, dtype=torch.uint8), 0.1, True, True, "auto")


# --------------------------------------------------------------------------------------------------------
# Float64 truth and PyTorch's math in the kernel's dtype, shared by (c) and (d) (the rule: tests/tolerance.py)
# --------------------------------------------------------------------------------------------------------
def _guarded(shape, dtype, fill=float("nan"), device="cpu"):
    """(buffer, tensor): a contiguous tensor inside a buffer whose GUARD elements on each side hold `fill`."""
    buf = torch.full((math.prod(shape) + 2 * GUARD,), fill, dtype=dtype, device=device)
    return buf, buf[GUARD:GUARD + math.prod(shape)].view(shape)


def _assert_guards_intact(buf, fill, name):
    guards = torch.cat([buf[:GUARD], buf[-GUARD:]])
    intact = torch.isnan(guards.float()).all() if math.isnan(fill) else (guards == fill).all()
    assert bool(intact), f"{name}: a kernel wrote outside its output"


def _mssa_inputs(b, h, n, p, dtype, device):
    """w as the (B, H, N, p) view of a (B, N, H, p) buffer (the model's layout), dout, and out, lse from
    float64 math (what a forward hands the backward)."""
    scale = p ** -0.5
    _, wfull = _guarded((b, n, h, p), dtype, device=device)
    wfull.copy_(torch.randn(b, n, h, p) * 0.8)
    w = wfull.permute(0, 2, 1, 3)
    _, dout = _guarded((b, h, n, p), dtype, device=device)
    dout.copy_(torch.randn(b, h, n, p))
    w64 = w.double()
    s = w64 @ w64.transpose(-1, -2) * scale
    _, out = _guarded((b, h, n, p), dtype, device=device)
    out.copy_(torch.softmax(s, -1) @ w64)
    _, lse = _guarded((b, h, n), torch.float32, device=device)
    lse.copy_(torch.logsumexp(s, -1))
    return w, dout, out, lse, scale


def _mssa_check(dw, w, dout, scale, dtype, name):
    assert dw.dtype == w.dtype == dtype, name
    assert_mssa_close(w, dout, scale, dw=dw, name=name)


def _ista_inputs(rows, d, dtype, device):
    _, x = _guarded((rows, d), dtype, device=device)
    x.copy_(torch.randn(rows, d))
    _, dout = _guarded((rows, d), dtype, device=device)
    dout.copy_(torch.randn(rows, d))
    _, m = _guarded((d, d), torch.float32, device=device)
    m.copy_(torch.randn(d, d) * d ** -0.5)
    mask = torch.rand(rows, d, device=device) > 0.5
    _, packed = _guarded((rows, (d + 7) // 8), torch.uint8, fill=255, device=device)
    packed.copy_(pack_mask(mask))
    return x, dout, m, mask, packed


def _ista_check(dx, dm, x, dout, m, mask, eta, dtype, name):
    g64 = dout.double() * mask
    g = (dout * mask).float()  # the torch backend's math: M rounded to dtype, fp32 accumulation
    if dx is not None and dx.numel():
        assert dx.dtype == dtype, name
        ref = torch.addmm(g, g, m.to(dtype).float().t(), alpha=eta).to(dtype)
        assert_close(dx, g64 + eta * g64 @ m.double().t(), ref, f"{name} dx")
    if dm is not None:
        if x.shape[0] == 0:
            assert bool((dm == 0).all()), f"{name} dM: not zero without rows"
        else:
            assert_close(dm, eta * x.double().t() @ g64, eta * x.float().t() @ g, f"{name} dM")


# --------------------------------------------------------------------------------------------------------
# (c) the kernels on the CPU (csrc/host_emulation.h)
# --------------------------------------------------------------------------------------------------------
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>()]*>)?)<<<(.+?)>>>\(", re.S)


class _Strides3(ctypes.Structure):
    _fields_ = [("b", ctypes.c_int64), ("h", ctypes.c_int64), ("n", ctypes.c_int64)]


@pytest.fixture(scope="module")
def emulated(cuda_root, build_dir):
    """The launchers of csrc/*.cu compiled by g++ against host_emulation.h, loaded with ctypes."""
    gxx = _need(shutil.which("g++"), "g++")
    sources = []
    for cu in KERNELS:
        src, launches = _LAUNCH.subn(lambda m: f"ck_emu::Launch({m.group(1)}, {m.group(2)})(", cu.read_text())
        assert launches, f"no kernel launch found in {cu.name}"
        sources.append(build_dir / f"{cu.stem}.emu.cpp")
        sources[-1].write_text(src)
    lib_path = build_dir / "libck_emu.so"
    cmd = [gxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror",
           "-Wno-unknown-pragmas", f"-I{CSRC}", "-isystem", str(cuda_root / "include"), "-include",
           str(CSRC / "host_emulation.h"), *map(str, sources), "-o", str(lib_path)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"g++ failed on the emulated kernels:\n{result.stderr}"
    lib = ctypes.CDLL(str(lib_path))
    i64, f32, vp, c_int, s3 = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int, _Strides3
    lib.ck_mssa_backward.argtypes = [vp, s3, vp, s3, vp, s3, vp, vp, s3, vp, i64, i64, i64, i64, f32, c_int,
                                     c_int, vp]
    lib.ck_ista_backward_dx.argtypes = [vp, i64, vp, i64, vp, i64, vp, i64, vp, i64, i64, i64, f32, c_int, c_int,
                                        vp]
    lib.ck_ista_dm_plan.argtypes = [i64, i64, c_int, ctypes.POINTER(i64), ctypes.POINTER(i64)]
    lib.ck_ista_backward_dm.argtypes = [vp, i64, vp, i64, vp, i64, vp, vp, i64, i64, i64, i64, f32, c_int, c_int,
                                        vp]
    for fn in (lib.ck_mssa_backward, lib.ck_ista_backward_dx, lib.ck_ista_dm_plan, lib.ck_ista_backward_dm):
        fn.restype = c_int
    return lib


_CK_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CK_KERNEL = {"auto": 0, "fma": 1, "wmma": 2, "mma": 3, "mma-tiled": 4}  # crate_kernels.h: ck_kernel
# (dtype, kernel): fp32 has only the FMA tiles.
_VARIANTS = [(torch.float32, "fma"), (torch.bfloat16, "wmma"), (torch.float16, "wmma"), (torch.bfloat16, "fma"),
             (torch.float16, "fma")]
_VARIANT_IDS = [f"{str(dt).split('.')[1]}-{kernel}" for dt, kernel in _VARIANTS]


def _s3(t):
    return _Strides3(*t.stride()[:3])


def _emulated_mssa(emulated, shape, dtype, kernel):
    """ck_mssa_backward on the model's layout: (cudaError, dw, w, dout, scale), the guards of dw checked."""
    b, h, n, p = shape
    w, dout, out, lse, scale = _mssa_inputs(b, h, n, p, dtype, "cpu")
    dwbuf, dw = _guarded((b, h, n, p), dtype)
    _, delta = _guarded((b, h, n), torch.float32)
    err = emulated.ck_mssa_backward(dout.data_ptr(), _s3(dout), w.data_ptr(), _s3(w), out.data_ptr(), _s3(out),
                                    lse.data_ptr(), dw.data_ptr(), _s3(dw), delta.data_ptr(), b, h, n, p, scale,
                                    _CK_DTYPE[dtype], _CK_KERNEL[kernel], None)
    _assert_guards_intact(dwbuf, float("nan"), "dw")
    return err, dw, w, dout, scale


@pytest.mark.parametrize("dtype,kernel", _VARIANTS, ids=_VARIANT_IDS)
@pytest.mark.parametrize("shape", [(1, 2, 1, 32), (2, 1, 17, 48), (1, 1, 197, 64), (1, 1, 40, 128), (1, 2, 23, 20)],
                         ids=lambda s: "x".join(map(str, s)))
def test_emulated_mssa_backward(emulated, shape, dtype, kernel):
    err, dw, w, dout, scale = _emulated_mssa(emulated, shape, dtype, kernel)
    assert err == 0, f"ck_mssa_backward returned cudaError {err}"
    _mssa_check(dw, w, dout, scale, dtype, f"emulated mssa {kernel} {shape}")


# The mma kernels: N across 1, 2, 3, 4 tiles of 64 and past the head kernel's 256; head dims of the models (48,
# 64) and the largest (128). "mma" runs the one-block-per-head kernel up to N = 256, the tiled one above.
_MMA_SHAPES = [(2, 1, 1, 64), (1, 2, 17, 48), (1, 1, 50, 128), (1, 1, 150, 128), (1, 1, 197, 64), (1, 1, 197, 48),
               (1, 1, 257, 64)]
_MMA_CASES = [(shape, dtype, kernel) for shape in _MMA_SHAPES for dtype in (torch.bfloat16, torch.float16)
              for kernel in ("mma", "mma-tiled") if not (shape[2] > 256 and kernel == "mma")]


@pytest.mark.parametrize("shape,dtype,kernel", _MMA_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{str(dt).split('.')[1]}-{k}" for s, dt, k in _MMA_CASES])
def test_emulated_mssa_backward_mma(emulated, shape, dtype, kernel):
    err, dw, w, dout, scale = _emulated_mssa(emulated, shape, dtype, kernel)
    assert err == 0, f"ck_mssa_backward returned cudaError {err}"
    _mssa_check(dw, w, dout, scale, dtype, f"emulated mssa {kernel} {shape}")


def _emulated_ista(emulated, rows, d, dtype, kernel, eta=0.1):
    """ck_ista_backward_dx and _dm as the binding calls them: (errors, splits, dx, dm, inputs), guards checked."""
    x, dout, m, mask, packed = _ista_inputs(rows, d, dtype, "cpu")
    _, m_lowp = _guarded((d, d), dtype)
    m_lowp.copy_(m.to(dtype))
    dxbuf, dx = _guarded((rows, d), dtype)
    dmbuf, dm = _guarded((d, d), torch.float32)
    splits, chunk = ctypes.c_int64(), ctypes.c_int64()
    assert emulated.ck_ista_dm_plan(rows, d, _CK_KERNEL[kernel], ctypes.byref(splits), ctypes.byref(chunk)) == 0
    partials = torch.full((splits.value, d, d), float("nan"))
    dtype_id = _CK_DTYPE[dtype]
    err_dx = emulated.ck_ista_backward_dx(dout.data_ptr(), d, packed.data_ptr(), packed.stride(0), m.data_ptr(), d,
                                          m_lowp.data_ptr(), d, dx.data_ptr(), d, rows, d, eta, dtype_id,
                                          _CK_KERNEL[kernel], None)
    err_dm = emulated.ck_ista_backward_dm(x.data_ptr(), d, dout.data_ptr(), d, packed.data_ptr(), packed.stride(0),
                                          dm.data_ptr(), partials.data_ptr() if splits.value > 1 else None,
                                          splits.value, chunk.value, rows, d, eta, dtype_id, _CK_KERNEL[kernel], None)
    _assert_guards_intact(dxbuf, float("nan"), "dx")
    _assert_guards_intact(dmbuf, float("nan"), "dM")
    return (err_dx, err_dm), splits.value, dx, dm, (x, dout, m, mask)


@pytest.mark.parametrize("dtype,kernel", _VARIANTS, ids=_VARIANT_IDS)
@pytest.mark.parametrize("rows,d", [(1, 64), (7, 96), (45, 136), (300, 40), (0, 16), (5, 13)],
                         ids=lambda v: str(v))
def test_emulated_ista_backward(emulated, rows, d, dtype, kernel):
    errors, splits, dx, dm, (x, dout, m, mask) = _emulated_ista(emulated, rows, d, dtype, kernel)
    assert errors == (0, 0), f"ck_ista_backward_dx, _dm returned cudaErrors {errors}"
    if (rows, d) == (300, 40):
        assert splits > 1, "this shape should exercise the split reduction"
    _ista_check(dx, dm, x, dout, m, mask, 0.1, dtype, f"emulated ista {kernel} {(rows, d)}")


# The mma kernels take d % 8 == 0 with 4-byte mask rows (d % 32 == 0 for a dense mask): partial tiles along
# rows and d, a d of several 128-tiles (384), the split reduction (300 rows), no rows.
_ISTA_MMA_SHAPES = [(1, 64), (7, 96), (45, 160), (300, 96), (197, 384), (0, 32)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("rows,d", _ISTA_MMA_SHAPES, ids=lambda v: str(v))
def test_emulated_ista_backward_mma(emulated, rows, d, dtype):
    errors, splits, dx, dm, (x, dout, m, mask) = _emulated_ista(emulated, rows, d, dtype, "mma")
    assert errors == (0, 0), f"ck_ista_backward_dx, _dm returned cudaErrors {errors}"
    if rows == 300:
        assert splits > 1, "this shape should exercise the split reduction"
    _ista_check(dx, dm, x, dout, m, mask, 0.1, dtype, f"emulated ista mma {(rows, d)}")


def test_emulated_mssa_mma_head_too_large_runs_tiled(emulated):
    """p = 128, N = 197: the head kernel would need 252 KB of shared memory (227 KB here), so "mma" runs the
    tiled kernel (bitwise the same dw as "mma-tiled")."""
    torch.manual_seed(0)
    err, dw, w, dout, scale = _emulated_mssa(emulated, (1, 1, 197, 128), torch.bfloat16, "mma")
    torch.manual_seed(0)
    err_tiled, dw_tiled, *_ = _emulated_mssa(emulated, (1, 1, 197, 128), torch.bfloat16, "mma-tiled")
    assert err == err_tiled == 0 and torch.equal(dw, dw_tiled)
    _mssa_check(dw, w, dout, scale, torch.bfloat16, "emulated mssa mma (1, 1, 197, 128)")


def test_emulated_auto_picks_mma_where_aligned(emulated):
    """CK_KERNEL_AUTO runs the mma kernels on aligned operands, wmma on the others, fma for fp32 (bitwise)."""
    for shape, dtype, expected in [((1, 1, 17, 64), torch.bfloat16, "mma"), ((1, 2, 9, 20), torch.float16, "wmma"),
                                   ((1, 1, 9, 32), torch.float32, "fma")]:
        torch.manual_seed(0)
        err, auto, *_ = _emulated_mssa(emulated, shape, dtype, "auto")
        torch.manual_seed(0)
        err_expected, dw, *_ = _emulated_mssa(emulated, shape, dtype, expected)
        assert err == err_expected == 0 and torch.equal(auto, dw), f"mssa {shape} {dtype}: auto is not {expected}"
    for rows, d, dtype, expected in [(9, 32, torch.bfloat16, "mma"), (9, 40, torch.float16, "wmma")]:
        torch.manual_seed(0)
        errors, _, dx, dm, _ = _emulated_ista(emulated, rows, d, dtype, "auto")
        torch.manual_seed(0)
        errors_expected, _, dx_e, dm_e, _ = _emulated_ista(emulated, rows, d, dtype, expected)
        assert errors == errors_expected == (0, 0) and torch.equal(dx, dx_e) and torch.equal(dm, dm_e), \
            f"ista {(rows, d)} {dtype}: auto is not {expected}"


def test_emulated_launchers_reject_bad_arguments(emulated):
    s = _Strides3(0, 0, 0)
    buf = torch.zeros(4096)
    ptr = buf.data_ptr()
    fp32, bf16 = _CK_DTYPE[torch.float32], _CK_DTYPE[torch.bfloat16]
    # cudaErrorInvalidValue (1): p above 128; a tensor-core kernel with fp32; no such kernel
    assert emulated.ck_mssa_backward(ptr, s, ptr, s, ptr, s, ptr, ptr, s, ptr, 1, 1, 4, 129, 0.1, fp32,
                                     _CK_KERNEL["fma"], None) == 1
    for kernel in ("wmma", "mma", "mma-tiled"):
        assert emulated.ck_mssa_backward(ptr, s, ptr, s, ptr, s, ptr, ptr, s, ptr, 1, 1, 4, 64, 0.1, fp32,
                                         _CK_KERNEL[kernel], None) == 1
    assert emulated.ck_mssa_backward(ptr, s, ptr, s, ptr, s, ptr, ptr, s, ptr, 1, 1, 4, 64, 0.1, bf16, 5, None) == 1
    # mma on rows that are not 16-byte aligned (stride along N of 20 elements)
    s20 = _Strides3(80, 80, 20)
    assert emulated.ck_mssa_backward(ptr, s20, ptr, s20, ptr, s20, ptr, ptr, s20, ptr, 1, 1, 4, 20, 0.1, bf16,
                                     _CK_KERNEL["mma"], None) == 1
    # chunks that do not tile the rows
    assert emulated.ck_ista_backward_dm(ptr, 8, ptr, 8, ptr, 1, ptr, ptr, 2, 64, 200, 8, 0.1, fp32,
                                        _CK_KERNEL["fma"], None) == 1
    # ista mma: mask rows of 5 bytes (d = 40); no M in the input dtype; mma-tiled is MSSA's only
    assert emulated.ck_ista_backward_dm(ptr, 40, ptr, 40, ptr, 5, ptr, None, 1, 64, 4, 40, 0.1, bf16,
                                        _CK_KERNEL["mma"], None) == 1
    assert emulated.ck_ista_backward_dx(ptr, 32, ptr, 4, ptr, 32, None, 32, ptr, 32, 4, 32, 0.1, bf16,
                                        _CK_KERNEL["mma"], None) == 1
    assert emulated.ck_ista_backward_dx(ptr, 32, ptr, 4, ptr, 32, ptr, 32, ptr, 32, 4, 32, 0.1, bf16,
                                        _CK_KERNEL["mma-tiled"], None) == 1


# --------------------------------------------------------------------------------------------------------
# (d) the extension on CUDA
# --------------------------------------------------------------------------------------------------------
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# (dtype, kernel): "auto" is fma for fp32 and mma for fp16/bf16 on these aligned inputs.
_CUDA_VARIANTS = [(torch.float32, "auto")] + [(dt, k) for k in ("auto", "mma-tiled", "wmma", "fma")
                                               for dt in (torch.bfloat16, torch.float16)]
_CUDA_IDS = [f"{str(dt).split('.')[1]}-{k}" for dt, k in _CUDA_VARIANTS]
_CUDA_ISTA = [(dt, k) for dt, k in _CUDA_VARIANTS if k != "mma-tiled"]


@pytest.fixture(scope="module")
def cuda_extension():
    return cuda_ext.load()  # a build failure fails the test


def _poison_cuda_cache():
    """Fill freed blocks of the caching allocator with NaN, so outputs the extension allocates next start as
    NaN wherever a kernel fails to write (small pool: blocks up to 1 MB; large pool)."""
    blocks = [torch.full((1 << 18,), float("nan"), device="cuda") for _ in range(8)]
    blocks.append(torch.full((1 << 24,), float("nan"), device="cuda"))
    del blocks


@cuda_only
@pytest.mark.parametrize("dtype,kernel", _CUDA_VARIANTS, ids=_CUDA_IDS)
@pytest.mark.parametrize("n", [1, 17, 50, 197, 257])
@pytest.mark.parametrize("p", [32, 48, 64, 128])
def test_cuda_mssa_backward(cuda_extension, n, p, dtype, kernel):
    b, h = 2, 3
    w, dout, out, lse, scale = _mssa_inputs(b, h, n, p, dtype, "cuda")
    _poison_cuda_cache()
    dw = cuda_ext.mssa_backward(dout, w, out, lse, scale, kernel=kernel)
    torch.cuda.synchronize()
    assert dw.dtype == dtype and dw.shape == w.shape and dw.stride() == w.stride()
    _mssa_check(dw, w, dout, scale, dtype, f"cuda mssa {kernel} {(b, h, n, p)}")


@cuda_only
@pytest.mark.parametrize("dtype,kernel", _CUDA_ISTA, ids=[f"{str(dt).split('.')[1]}-{k}" for dt, k in _CUDA_ISTA])
@pytest.mark.parametrize("rows", [1, 7, 197, 2000])
@pytest.mark.parametrize("d", [64, 96, 384])
def test_cuda_ista_backward(cuda_extension, rows, d, dtype, kernel):
    eta = 0.1
    x, dout, m, mask, packed = _ista_inputs(rows, d, dtype, "cuda")
    _poison_cuda_cache()
    dx, dm = cuda_ext.ista_backward(dout, x, m, packed, eta, True, True, kernel=kernel)
    dx_only, none = cuda_ext.ista_backward(dout, x, m, packed, eta, True, False, kernel=kernel)
    none2, dm_again = cuda_ext.ista_backward(dout, x, m, packed, eta, False, True, kernel=kernel)
    torch.cuda.synchronize()
    assert none is None and none2 is None
    assert torch.equal(dx, dx_only) and torch.equal(dm, dm_again), "not deterministic"
    assert dx.dtype == dtype and dm.dtype == torch.float32
    _ista_check(dx, dm, x, dout, m, mask, eta, dtype, f"cuda ista {kernel} {(rows, d)}")


@cuda_only
def test_cuda_ext_rejects_cpu_tensors_and_bad_dtypes(cuda_extension):
    w = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        cuda_ext.mssa_backward(w, w, w, torch.zeros(1, 1, 4), 0.5)
    wd = w.double().cuda()
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        cuda_ext.mssa_backward(wd, wd, wd, torch.zeros(1, 1, 4, device="cuda"), 0.5)
    wf = w.cuda()
    with pytest.raises(RuntimeError, match="kernel 'wmma' takes float16 or bfloat16"):
        cuda_ext.mssa_backward(wf, wf, wf, torch.zeros(1, 1, 4, device="cuda"), 0.5, kernel="wmma")
    # p = 20: rows of 40 bytes, not 16-byte aligned; auto falls back to wmma.
    w, dout, out, lse, scale = _mssa_inputs(1, 2, 9, 20, torch.bfloat16, "cuda")
    with pytest.raises(RuntimeError, match="kernel 'mma' needs 16-byte aligned rows"):
        cuda_ext.mssa_backward(dout, w, out, lse, scale, kernel="mma")
    auto = cuda_ext.mssa_backward(dout, w, out, lse, scale)
    assert torch.equal(auto, cuda_ext.mssa_backward(dout, w, out, lse, scale, kernel="wmma"))
    x, dout, m, mask, packed = _ista_inputs(5, 40, torch.bfloat16, "cuda")  # mask rows of 5 bytes
    with pytest.raises(RuntimeError, match="kernel 'mma' needs d % 8 == 0"):
        cuda_ext.ista_backward(dout, x, m, packed, 0.1, True, True, kernel="mma")


def test_kernel_choice_and_pinning():
    """kernel= names are checked before any CUDA work; pinned_kernels sets the default and restores it."""
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="kernel: the csrc/ kernel must be one of"):
        cuda_ext.ista_backward(x, x, torch.eye(8), torch.zeros(4, 1, dtype=torch.uint8), 0.1, True, True,
                               kernel="mma-tiled")
    with pytest.raises(ValueError, match="mssa: the csrc/ kernel must be one of"):
        with cuda_ext.pinned_kernels(mssa="tensor"):
            pass
    assert cuda_ext._kernel("mssa", None, cuda_ext.MSSA_KERNELS) == "auto"
    with cuda_ext.pinned_kernels(mssa="wmma"):
        assert cuda_ext._kernel("mssa", None, cuda_ext.MSSA_KERNELS) == "wmma"
        assert cuda_ext._kernel("ista", None, cuda_ext.ISTA_KERNELS) == "auto"
        assert cuda_ext._kernel("mssa", "fma", cuda_ext.MSSA_KERNELS) == "fma"  # an explicit kernel wins
        with cuda_ext.pinned_kernels(ista="mma"):
            assert cuda_ext._kernel("ista", None, cuda_ext.ISTA_KERNELS) == "mma"
        assert cuda_ext._kernel("ista", None, cuda_ext.ISTA_KERNELS) == "auto"
    assert cuda_ext._kernel("mssa", None, cuda_ext.MSSA_KERNELS) == "auto"


def test_cli_without_arguments_prints_help():
    result = subprocess.run([sys.executable, "-m", "crate_kernels.ops.cuda_ext"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0 and "--build" in result.stdout, result.stderr


def test_remove_stale_lock(monkeypatch, tmp_path):
    """The lock a killed build leaves in torch's extension folder goes; without one nothing happens."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    lock = Path(cpp_extension._get_build_directory("crate_kernels_cuda", verbose=False)) / "lock"
    lock.write_text("")
    assert cuda_ext.remove_stale_lock() == lock and not lock.exists()
    assert cuda_ext.remove_stale_lock() is None


def test_cuda_ext_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(cuda_ext, "_module", None)
    assert not cuda_ext.available() and "CPU-only build" in cuda_ext.why_unavailable()
    with pytest.raises(RuntimeError, match="CPU-only build"):
        cuda_ext.load()


def test_build_without_a_visible_gpu_asks_for_the_architectures(monkeypatch, capsys):
    """A CUDA build of torch on a machine without a GPU: --build names TORCH_CUDA_ARCH_LIST instead of failing
    inside torch's architecture detection."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cuda_ext, "_module", None)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert cuda_ext.main(["--build"]) == 1
    assert "set TORCH_CUDA_ARCH_LIST" in capsys.readouterr().err

