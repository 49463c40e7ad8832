"""Compile every Triton kernel of the package ahead of time for GPU targets, on a machine without a GPU.

    python -m crate_kernels.ops.aot [--arch 90 --arch 80] [--jobs 2] [--json FILE]

Each Triton kernel module in OPS lists its kernels (``TRITON_KERNELS``) and a function that runs its launchers
(``aot_launches(dtype, head_dim)``). Those launchers run here on small CPU tensors with every autotuned launch
intercepted, so the compiler gets exactly the arguments, constexprs and specialization the runtime would give
it. For every GPU arch, the kernel's own pruning (the function its autotuner calls) picks the configs, and
Triton's compiler with its bundled ptxas builds each one: bf16, fp16 and fp32 at head dims 48, 64 and 128;
fp32 with TF32 products in every kept config and with exact ("ieee") products in the first one only (the
slow case to compile). A module may name the (dtype, arch) pairs that compile every kept config
(``AOT_ALL_CONFIGS``, e.g. the kernel variants: bf16 on sm_90); its other pairs compile the first kept config.
Identical compiles (head dims with one tile size) are built once.

Prints registers, spills and shared memory per config, and per innermost loop of each kernel the products
(wgmma on sm_90, mma on sm_80) and product waits one iteration runs, then counts per kernel and arch. Exits 1 on any
compile error, on a launch whose first kept config (what CRATE_KERNELS_AUTOTUNE=first runs, and what an
autotuner that found no config able to launch falls back to) exceeds the arch's shared memory, or on a
registered kernel that no launch reached. Needs TRITON_INTERPRET unset, so that kernels are JIT functions.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

OPS = ("crate_kernels.ops.mssa.triton_v1", "crate_kernels.ops.mssa.triton_variants",
       "crate_kernels.ops.ista.triton_v1", "crate_kernels.ops.ista.triton_variants")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEAD_DIMS = (48, 64, 128)
# Shared memory one block may opt in to, bytes (CUDA's per-block limit by compute capability)
SHARED_MEMORY = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


def _jit_function(kernel):
    """The JITFunction under an autotuner (and any heuristics wrappers)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _with_heuristics(kernel, args: tuple, kwargs: dict) -> dict:
    """``kwargs`` plus the values of the @triton.heuristics between an autotuner and its JIT function (as
    Heuristics.run computes them at launch)."""
    from triton.runtime.autotuner import Heuristics

    kwargs = dict(kwargs)
    kernel = kernel.fn
    while not hasattr(kernel, "signature"):
        if isinstance(kernel, Heuristics):
            for name, heuristic in kernel.values.items():
                kwargs[name] = heuristic({**dict(zip(kernel.arg_names, args)), **kwargs})
        kernel = kernel.fn
    return kwargs


def _config_name(config) -> str:
    tiles = "x".join(str(v) for v in config.kwargs.values())
    return f"{tiles} w{config.num_warps} s{config.num_stages}"


def registry() -> dict:
    """{id(kernel): (module name, kernel name)} of every operator's TRITON_KERNELS."""
    return {id(kernel): (module_name, name) for module_name in OPS
            for name, kernel in importlib.import_module(module_name).TRITON_KERNELS.items()}


def capture(run, case: str = "", fp32: bool = False) -> list[dict]:
    """The launches ``run()`` makes of registered kernels, intercepted (nothing is compiled or launched)."""
    kernels, calls = registry(), []
    from triton.runtime.autotuner import Autotuner

    original = Autotuner.run
    Autotuner.run = lambda self, *args, **kwargs: calls.append((self, args, kwargs))
    try:
        run()
    finally:
        Autotuner.run = original
    launches = []
    for autotuner, args, kwargs in calls:
        if id(autotuner) not in kernels:
            raise RuntimeError(f"{autotuner.base_fn.__name__} was launched but is in no operator's TRITON_KERNELS")
        launches.append({"kernel": kernels[id(autotuner)], "autotuner": autotuner, "args": args,
                         "kwargs": {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")},
                         "case": case, "fp32": fp32})
    return launches


def collect_launches(head_dims=HEAD_DIMS) -> list[dict]:
    """Every launch that each operator's aot_launches makes, for every dtype and head dim."""
    launches = []
    for module_name in OPS:
        module = importlib.import_module(module_name)
        for dtype_name, dtype in DTYPES.items():
            for head_dim in head_dims:
                for launch in capture(lambda: module.aot_launches(dtype, head_dim), f"{dtype_name} p={head_dim}",
                                      dtype == torch.float32):
                    launches.append({**launch, "dtype": dtype_name})
    return launches


def tuning_key(autotuner, args: tuple, kwargs: dict) -> tuple:
    """The key under which the autotuner keeps its choice for this launch (as Autotuner.run computes it)."""
    named = {k: v for k, v in {**dict(zip(autotuner.arg_names, args)), **kwargs}.items() if k in autotuner.arg_names}
    return tuple([named[k] for k in autotuner.keys if k in named]
                 + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")])


class _Binder:
    """JITFunction.run's steps before compiling (bind, specialize, pack) for a GPU arch, without a GPU."""

    def __init__(self):
        self._cache = {}

    def __call__(self, fn, arch: int, args: tuple, kwargs: dict):
        """(specialization key as the runtime's kernel cache uses it, signature, constexprs, attrs, options)."""
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        if (id(fn), arch) not in self._cache:
            backend = make_backend(GPUTarget("cuda", arch, 32))
            self._cache[id(fn), arch] = backend, create_function_from_signature(fn.signature, fn.params, backend)
        backend, binder = self._cache[id(fn), arch]
        kwargs = {**kwargs, "debug": kwargs.get("debug", fn.debug) or knobs.runtime.debug,
                  "instrumentation_mode": knobs.compilation.instrumentation_mode}
        bound, specialization, options = binder(*args, **kwargs)
        key = str(specialization) + str(options)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        return key, signature, constexprs, attrs, options


def launch_keys(launch: dict, arch: int = 90) -> dict:
    """The tuning key of a launch, how many configs its autotuner chooses among, and the runtime's compile key of its
    first kept config on ``arch``."""
    autotuner, args, kwargs = launch["autotuner"], launch["args"], launch["kwargs"]
    kept = _kept_configs(autotuner, args, kwargs)
    config = kept[0]
    compile_key = _Binder()(_jit_function(autotuner), arch, args,
                            _with_heuristics(autotuner, args, {**kwargs, **config.all_kwargs()}))[0]
    return {"kernel": launch["kernel"][1], "tuning": repr(tuning_key(autotuner, args, kwargs)), "configs": len(kept),
            "compile": compile_key}


def _kept_configs(autotuner, args: tuple, kwargs: dict) -> list:
    """Every config the kernel's pruning rule keeps for this launch (autotune mode 'first' runs the first of them;
    see ``backend.config_pruning``)."""
    prune = autotuner.early_config_prune
    if prune is None:
        return list(autotuner.configs)
    return prune.rule(autotuner.configs, dict(zip(autotuner.arg_names, args)), **kwargs)


def plan_jobs(launches: list[dict], archs: list[int]) -> tuple[dict, list[dict]]:
    """Compile jobs (deduplicated) and one check per distinct (kernel, arch, kept configs) naming its jobs."""
    jobs, checks, bind = {}, {}, _Binder()
    for launch in launches:
        autotuner, (module_name, name) = launch["autotuner"], launch["kernel"]
        fn = _jit_function(autotuner)
        variants = [("", launch["kwargs"], False)]
        if launch["fp32"] and "PRECISION" in launch["kwargs"]:  # fp32 operands: both dot precisions
            variants = [(" tf32", {**launch["kwargs"], "PRECISION": "tf32"}, False),
                        (" ieee", {**launch["kwargs"], "PRECISION": "ieee"}, True)]
        every = getattr(importlib.import_module(module_name), "AOT_ALL_CONFIGS", None)
        for suffix, kwargs, first_only in variants:
            kept = _kept_configs(autotuner, launch["args"], kwargs)
            for arch in archs:
                keys = []
                all_configs = not first_only and (every is None or (launch.get("dtype"), arch) in every)
                for config in kept if all_configs else kept[:1]:
                    key, signature, constexprs, attrs, options = bind(
                        fn, arch, launch["args"], _with_heuristics(autotuner, launch["args"],
                                                                   {**kwargs, **config.all_kwargs()}))
                    key = f"{module_name}.{name} sm_{arch} {key}"
                    jobs.setdefault(key, {"module": module_name, "kernel": name, "arch": arch,
                                          "case": launch["case"] + suffix, "config": _config_name(config),
                                          "signature": signature, "constexprs": constexprs, "attrs": attrs,
                                          "options": dict(options.__dict__)})
                    keys.append(key)
                checks.setdefault((name, arch, tuple(keys)), {"kernel": name, "arch": arch,
                                                              "case": launch["case"] + suffix, "jobs": keys})
    return jobs, list(checks.values())


def _ptxas_figures(log: str) -> dict:
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    out = {"regs": int(regs[-1]) if regs else None}
    if spills:
        out.update(stack=int(spills[-1][0]), spill_stores=int(spills[-1][1]), spill_loads=int(spills[-1][2]))
    return out


_LOOP_OPS = {  # TTGIR op -> figure: tensor-core products (wgmma on sm_90, mma otherwise), their waits, and loads
    "dots": ("ttng.warp_group_dot ", "tt.dot "), "waits": ("ttng.warp_group_dot_wait ",),
    "async_loads": ("ttg.async_copy_global_to_local ", "ttng.async_tma_copy_global_to_local "),
    "sync_loads": ("tt.load ",), "smem_stores": ("ttg.local_alloc ", "ttg.local_store "),
    "converts": ("ttg.convert_layout ",),
}


def loop_figures(ttgir: str) -> list[dict]:
    """Per innermost loop (scf.for without a loop inside) of a compiled kernel's TTGIR, the ops one iteration runs:
    products, product waits (with how many products each leaves in flight), async (pipelined) and synchronous global
    loads, register-to-shared stores and layout conversions."""
    lines, loops = ttgir.splitlines(), []
    for start, line in enumerate(lines):
        if " scf.for " not in line:
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for inner in lines[start + 1:]:
            if inner.strip().startswith("}") and len(inner) - len(inner.lstrip()) == indent:
                break
            body.append(inner)
        if any(" scf.for " in b for b in body):
            continue
        figures = {name: sum(any(op in b for op in ops) for b in body) for name, ops in _LOOP_OPS.items()}
        figures["pendings"] = [int(m) for b in body for m in re.findall(r"pendings = (\d+)", b)]
        loops.append(figures)
    return loops


_PTX_OPS = {  # PTX instruction -> figure, per thread and iteration of an innermost loop
    "wgmma": r"wgmma\.mma_async", "mma": r"\bmma\.sync", "wgmma_waits": r"wgmma\.wait_group",
    "cp_async": r"cp\.async\.c[ag]", "ld_global": r"ld\.global", "st_global": r"st\.global",
    "st_shared": r"st\.shared|stmatrix", "ld_shared": r"ld\.shared|ldmatrix", "barriers": r"bar\.sync|barrier\.sync",
    "shuffles": r"shfl\.", "exp2": r"ex2\.approx",
}


def ptx_loop_figures(ptx: str) -> list[dict]:
    """Per innermost loop of a compiled kernel's PTX (a label and the backward branch to it, with no other loop
    inside), the instructions one thread issues per iteration: tensor-core instructions and waits, global and shared
    memory accesses, barriers, shuffles, exponentials."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^\$(L__BB\d+_\d+):", line))}
    spans = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"\bbra(?:\.uni)?\s+\$(L__BB\d+_\d+);", line)) and labels.get(m.group(1), i) < i]
    innermost = [(a, b) for a, b in spans if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)]
    return [{name: sum(bool(re.search(pattern, line)) for line in lines[a:b]) for name, pattern in _PTX_OPS.items()}
            for a, b in innermost]


def compile_job(job: dict) -> dict:
    """Compile one job with Triton's compiler for its arch; registers and spills from ptxas' report."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed by Triton after each ptxas run
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
    fn = _jit_function(importlib.import_module(job["module"]).TRITON_KERNELS[job["kernel"]])
    start, log = time.time(), io.StringIO()
    result = {k: job[k] for k in ("kernel", "arch", "case", "config")}
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, job["signature"], job["constexprs"], job["attrs"]),
                                      target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
        result.update(shared=compiled.metadata.shared, **_ptxas_figures(log.getvalue()),
                      loops=loop_figures(compiled.asm["ttgir"]), ptx_loops=ptx_loop_figures(compiled.asm["ptx"]))
        result["fits"] = result["shared"] <= SHARED_MEMORY[job["arch"]]
    except Exception as exc:  # noqa: BLE001  (any compiler failure is this job's result)
        result["error"] = f"{type(exc).__name__}: {str(exc).strip()[:2000]}"
    result["seconds"] = round(time.time() - start, 2)
    return result


def kernel_ttir(job: dict) -> str:
    """A job's kernel as Triton IR (the first compile stage: helpers inlined, no GPU layouts), in under a second."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", job["arch"], 32)
    backend = make_backend(target)
    options = backend.parse_options(job["options"])
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    fn = _jit_function(importlib.import_module(job["module"]).TRITON_KERNELS[job["kernel"]])
    src = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
    module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         context)
    stages = {}
    backend.add_stages(stages, options, src.language)
    return str(stages["ttir"](module, {}))


def first_offset_types(ttir: str) -> dict[str, set[str]]:
    """{pointer argument: element types of the offsets added to the argument itself} in a kernel's TTIR: the offsets
    that locate a head or a row, which must be 64-bit once a tensor passes 2^31 elements (the offsets added after
    them, within a head or a row, may stay 32-bit)."""
    args = re.findall(r"%(\w+): !tt\.ptr<", ttir.split("tt.func public", 1)[1].split("\n", 1)[0])
    root = {name: name for name in args}  # pointer values that are an argument, splatted or broadcast
    found: dict[str, set[str]] = {name: set() for name in args}
    for line in ttir.splitlines():
        view = re.match(r"\s*%(\S+) = tt\.(?:splat|broadcast|expand_dims) %(\S+)", line)
        if view and view.group(2) in root:
            root[view.group(1)] = root[view.group(2)]
        add = re.match(r"\s*%\S+ = tt\.addptr %(\S+), %\S+ : [^,]+, (?:tensor<[^>]*x)?(i\d+)", line)
        if add and add.group(1) in root:
            found[root[add.group(1)]].add(add.group(2))
    return found


def main_loop(loops: list[dict]) -> dict | None:
    """The innermost loop that runs the most products (wgmma before mma on a tie: the kernel's main loop), or None."""
    return max(loops, key=lambda loop: (loop["dots"], loop["waits"]), default=None)


def table(results: list[dict]) -> str:
    """One line per compiled config: registers, spill bytes (stores/loads), shared memory, fit, seconds, and the main
    loop's products and product waits per iteration."""
    lines = [f"{'kernel':<10} {'sm':>3} {'case':<15} {'config':<18} {'regs':>4} {'spill st/ld':>11} "
             f"{'smem KiB':>8} {'fits':>4} {'s':>5} {'dots/waits':>10}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['kernel']:<10} {r['arch']:>3} {r['case']:<15} {r['config']:<18} ERROR "
                         + r["error"].splitlines()[0][:120])
            continue
        spills = f"{r.get('spill_stores', '?')}/{r.get('spill_loads', '?')}"
        loop = main_loop(r["loops"])
        per_iteration = f"{loop['dots']}/{loop['waits']}" if loop else "-"
        lines.append(f"{r['kernel']:<10} {r['arch']:>3} {r['case']:<15} {r['config']:<18} {r['regs'] or '?':>4} "
                     f"{spills:>11} {r['shared'] / 1024:>8.1f} {'yes' if r['fits'] else 'NO':>4} {r['seconds']:>5.1f} "
                     f"{per_iteration:>10}")
    return "\n".join(lines)


def summary(results: list[dict]) -> dict:
    """{kernel: {arch: {configs, regs (max), spilling, not_fitting, errors}}}."""
    out = {}
    for r in results:
        s = out.setdefault(r["kernel"], {}).setdefault(str(r["arch"]), {
            "configs": 0, "max_regs": 0, "spilling": 0, "not_fitting": 0, "errors": 0})
        s["configs"] += 1
        if "error" in r:
            s["errors"] += 1
            continue
        s["max_regs"] = max(s["max_regs"], r["regs"] or 0)
        s["spilling"] += bool(r.get("spill_stores") or r.get("spill_loads"))
        s["not_fitting"] += not r["fits"]
    return out


def problems(results_by_job: dict, checks: list[dict], launches: list[dict]) -> list[str]:
    """Compile errors, launches whose first kept config exceeds shared memory, registered kernels never launched."""
    found = [f"{r['kernel']} sm_{r['arch']} {r['case']} {r['config']}: {r['error'].splitlines()[0]}"
             for r in results_by_job.values() if "error" in r]
    for check in checks:
        kept = [results_by_job[k] for k in check["jobs"]]
        if kept and "error" not in kept[0] and not kept[0]["fits"]:
            found.append(f"{check['kernel']} sm_{check['arch']} {check['case']}: the first kept config "
                         f"{kept[0]['config']} needs {kept[0]['shared']} bytes of shared memory "
                         f"(limit {SHARED_MEMORY[check['arch']]})")
        if not kept:
            found.append(f"{check['kernel']} sm_{check['arch']} {check['case']}: the pruning kept no config")
    launched = {launch["kernel"] for launch in launches}
    found += [f"{module}.TRITON_KERNELS[{name!r}]: no launch in aot_launches reaches it"
              for module, name in registry().values() if (module, name) not in launched]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crate_kernels.ops.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_MEMORY),
                        help="compute capability as 80, 90 (repeatable; default 90 and 80)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: CPUs)")
    parser.add_argument("--json", default=None, help="write every result and the summary to this file")
    parser.add_argument("--cache-dir", default=None,
                        help="compile into this Triton cache folder (the runtime's warms it); default a temporary one")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("TRITON_INTERPRET is set: kernels are interpreted functions, which cannot be compiled; unset it",
              file=sys.stderr)
        return 2
    archs = args.arch or [90, 80]
    start = time.time()
    launches = collect_launches()
    jobs, checks = plan_jobs(launches, archs)
    keys = list(jobs)
    cache_dir = os.environ.get("TRITON_CACHE_DIR")
    with contextlib.nullcontext(args.cache_dir) if args.cache_dir else tempfile.TemporaryDirectory() as scratch:
        os.environ["TRITON_CACHE_DIR"] = scratch  # the compiler processes write their kernels here, not to ~/.triton
        try:
            if args.jobs > 1:
                context = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
                    results = list(pool.map(compile_job, [jobs[k] for k in keys]))
            else:
                results = [compile_job(jobs[k]) for k in keys]
        finally:
            os.environ.pop("TRITON_CACHE_DIR")
            if cache_dir is not None:
                os.environ["TRITON_CACHE_DIR"] = cache_dir
    results_by_job = dict(zip(keys, results))
    found = problems(results_by_job, checks, launches)
    counts = summary(results)
    print(table(results))
    print(f"\n{len(results)} compiles for sm_{', sm_'.join(map(str, archs))} in {time.time() - start:.0f}s "
          f"({args.jobs} processes); per kernel and arch:")
    for kernel, per_arch in counts.items():
        print(f"  {kernel:<10} " + "; ".join(
            f"sm_{arch}: {s['configs']} configs, max {s['max_regs']} regs, {s['spilling']} spilling, "
            f"{s['not_fitting']} over shared memory, {s['errors']} errors" for arch, s in per_arch.items()))
    for line in found:
        print(f"PROBLEM {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"archs": archs, "results": results, "summary": counts, "problems": found,
                       "seconds": time.time() - start}, f, indent=1, default=str)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
