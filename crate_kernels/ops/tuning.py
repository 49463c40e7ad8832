"""``auto``: a measured choice between whole implementations, per operator direction and tuning key.

Each kind (mssa_forward, mssa_backward, ista_forward, ista_backward) has candidates (``backend.candidates``):
PyTorch's library paths, every Triton variant (each with its own autotuned config) and the CUDA backward. The first
call of a kind under ``auto`` for a tuning key (device name and capability, dtype, float32 matmul precision, shape
with batch*heads or rows bucketed by ``tuning_bucket``, the layout of every tensor argument):

1. runs every candidate that supports the arguments (Triton only on CUDA tensors: the interpreter is a test tool,
   not a device, so ``auto`` never measures interpreted kernels);
2. checks each result against the library path run on the same inputs in float64 (float32 for 16-bit inputs): a
   candidate passes when its error is at most ``TOLERANCE_K`` times the library path's own error in the input dtype
   plus ``TOLERANCE_FLOOR`` eps of that dtype (times the longest axis for float64 inputs, whose truth is a library
   path itself; errors are max |a - b| / max |truth| per output; packed masks may
   differ in at most ``MASK_TOLERANCE`` of their bits); one that disagrees or raises is dropped with one warning
   naming operator, candidate, shape and error;
3. times the survivors (CUDA events around each call with the L2 flushed before it, or time.perf_counter on CPU;
   two warm-up calls, then repetitions interleaved round-robin; the median) and keeps the first library path in
   registration order unless another library path is faster by ``MARGIN`` (3%; then the fastest of them), and that
   one unless another candidate is faster by ``MARGIN``;
4. remembers the choice in memory and on disk: ``tuning-<hash>.json`` in ``$CRATE_KERNELS_CACHE`` (a folder;
   default ``$XDG_CACHE_HOME/crate_kernels`` or ``~/.cache/crate_kernels``), one file per device and versions
   (device name and capability, CUDA driver, torch, triton, this package's version and a hash of its ops sources),
   written atomically, so a later process measures nothing.

Out-of-memory (torch.OutOfMemoryError) propagates; a candidate chosen that later raises propagates too (nothing
falls back silently). Under torch.distributed every rank takes rank 0's choice: inside ``agreeing()`` (a block that
every rank runs alike, e.g. a training step; ``tune_step`` and the training's first step use it) rank 0 decides each new
key and broadcasts it (broadcast_object_list on a gloo group of its own, once per key); outside it a key no such
block decided takes the fixed order, with no collective that a rank-0-only evaluation could wait in forever.

The fixed order, where nothing is timed: the library candidates in ``backend.library_order``, the first that
supports the arguments (what backend ``torch`` runs). ``auto`` takes it under
``torch.use_deterministic_algorithms(True)`` and ``CRATE_KERNELS_TUNE=off``; while a CUDA graph is captured or
torch.compile traces (the custom ops are opaque, so normally the choice happens at run time) it takes a choice
already made for the key, else the fixed order, without measuring. A variant pinned with ``set_variant`` or
``$CRATE_KERNELS_VARIANTS`` is what ``auto`` runs for that kind wherever it supports the arguments.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from . import backend
from .backend import KERNEL_KINDS, candidates, library_choice, library_order, pinned_variant, tuning_bucket, why_not

__all__ = ["tune_step", "agreeing", "tuning_table", "format_tables", "tuning_stats", "cache_path", "auto_launcher",
           "MARGIN"]

MARGIN = 1.03  # how much faster a candidate must be to displace the first library path, or the chosen one
TOLERANCE_K = 4.0
TOLERANCE_FLOOR = 4.0  # in eps of the input dtype
MASK_TOLERANCE = 0.01  # fraction of packed-mask bits that may differ (values at the ReLU's threshold)
CPU_BUDGET_S = 0.1  # timing budget per key and CPU; on CUDA, GPU time
CUDA_BUDGET_S = 0.05
_TUNE_ENV = "CRATE_KERNELS_TUNE"
_CACHE_ENV = "CRATE_KERNELS_CACHE"

_memo: dict[tuple, str] = {}  # per-call key -> chosen candidate
_records: dict[str, dict] = {}  # tuning key -> {"kind", "key", "shape", "choice", "rows", "source"}
_stats = {"measured": 0, "from_cache": 0, "seconds": 0.0}
_touched: list[set] = []  # the keys each enclosing ``tune_step`` call has seen


# ------------------------------------------------------------------------------------------------ keys
def _call_key(kind: str, args: tuple) -> tuple:
    """What one call is remembered by (exact shapes and strides; cheap to build)."""
    return (kind, *((a.shape, a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else a
                    for a in args if not isinstance(a, float)))


def _device_model(device: torch.device) -> str:
    """The device's model: the cache file's name holds it."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"
    return f"{device.type} {platform.machine()}"


def _device_name(device: torch.device) -> str:
    """The device as a tuning key holds it: its model and, on CPU, the threads this process computes with (read at
    every call: a process may change them, so they stay out of the cache file's name)."""
    name = _device_model(device)
    return name if device.type == "cuda" else f"{name} {torch.get_num_threads()} threads"


def _layout(t: torch.Tensor) -> str:
    """'c' for a contiguous tensor, else its dimensions from the largest stride down (e.g. '0213')."""
    if t.is_contiguous():
        return "c"
    return "".join(str(i) for i in sorted(range(t.dim()), key=lambda i: -t.stride(i)))


def tuning_key(kind: str, args: tuple) -> str:
    """``kind``, device, dtype, float32 matmul precision, bucketed shape, layouts and flag arguments."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    first = tensors[0]
    shape = first.shape
    if first.dim() == 4:  # (B, H, N, p): B*H bucketed
        dims = (tuning_bucket(shape[0] * shape[1]), *shape[2:])
    else:  # (rows, d)
        dims = (tuning_bucket(shape[0]), *shape[1:])
    flags = [str(a) for a in args if isinstance(a, bool)]
    return "|".join([kind, _device_name(first.device), str(first.dtype).replace("torch.", ""),
                     torch.get_float32_matmul_precision(), "x".join(map(str, dims)),
                     ",".join(_layout(t) for t in tensors), *flags])


def _shape_text(args: tuple) -> str:
    return ", ".join(f"{tuple(a.shape)} {str(a.dtype).replace('torch.', '')}" for a in args
                     if isinstance(a, torch.Tensor))


# ------------------------------------------------------------------------------------------------ cache
def cache_dir() -> Path:
    """``$CRATE_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/crate_kernels``, else ``~/.cache/crate_kernels``."""
    if os.environ.get(_CACHE_ENV):
        return Path(os.environ[_CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "crate_kernels"


@functools.lru_cache(maxsize=None)
def _sources_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _fingerprint(device: torch.device) -> dict:
    try:  # installed: the distribution's version (the sources hash below covers a checkout too)
        version = importlib.metadata.version("crate_kernels")
    except importlib.metadata.PackageNotFoundError:
        version = None
    triton = None
    if backend.triton_available():
        import triton as triton_package

        triton = triton_package.__version__
    driver = None
    if device.type == "cuda":
        driver = getattr(torch._C, "_cuda_getDriverVersion", lambda: None)()
    return {"device": _device_model(device), "driver": driver, "cuda": torch.version.cuda, "torch": torch.__version__,
            "triton": triton, "crate_kernels": version, "sources": _sources_hash()}


def cache_path(device: torch.device | str = "cpu") -> Path:
    """The cache file of ``device`` with this process's versions: ``tuning-<hash>.json`` in ``cache_dir()``."""
    print_ = json.dumps(_fingerprint(torch.device(device)), sort_keys=True)
    return cache_dir() / f"tuning-{hashlib.sha256(print_.encode()).hexdigest()[:16]}.json"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, unreadable or half-written by an older version: measure again
        return {}
    return data.get("entries", {}) if isinstance(data, dict) else {}


def _write(device: torch.device, key: str, record: dict) -> None:
    """Merge ``record`` into the device's cache file: a temporary file in the same folder, then os.replace."""
    path = cache_path(device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read(path)
        entries[key] = {k: record[k] for k in ("kind", "key", "shape", "choice", "rows")}
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(handle, "w") as f:
            json.dump({"fingerprint": _fingerprint(device), "entries": entries}, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"crate_kernels: could not write the tuning cache {path} ({e}); the choice holds for this "
                      "process only", RuntimeWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------------ checking
def _tensors(result) -> list:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _upcast(args: tuple, dtype: torch.dtype) -> tuple:
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _compare(result, truth) -> tuple[float, float]:
    """(max relative error over the float outputs, fraction of differing bits over the packed masks)."""
    error, bits = 0.0, 0.0
    got, want = _tensors(result), _tensors(truth)
    if len(got) != len(want):
        return float("inf"), 1.0
    for a, b in zip(got, want):
        if a is None or b is None:
            if (a is None) != (b is None):
                return float("inf"), 1.0
            continue
        if a.shape != b.shape:
            return float("inf"), 1.0
        if not b.is_floating_point():  # packed masks: the fraction of differing bits
            if a.numel():
                diff = torch.bitwise_xor(a, b.to(a.dtype)).to(torch.int32).unsqueeze(-1)
                shifts = torch.arange(8, dtype=torch.int32, device=a.device)
                bits = max(bits, float(((diff >> shifts) & 1).sum()) / (8 * a.numel()))
            continue
        if not a.numel():
            continue
        diff = (a.double() - b).abs().max()
        if not torch.isfinite(a).all():
            return float("inf"), bits
        error = max(error, float(diff / b.abs().max().clamp_min(torch.finfo(torch.float64).tiny)))
    return error, bits


# ------------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.lru_cache(maxsize=None)
def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.empty(64 * 2 ** 20, dtype=torch.int32, device=device)  # 256 MiB, above any L2


def _time(fns: dict[str, Callable], device: torch.device) -> dict[str, float]:
    """Median milliseconds per call of each of ``fns``: two warm-up calls each, then repetitions interleaved
    round-robin (enough to fill the budget, 3 to 100), each round starting one candidate further on (in a fixed order
    a candidate always follows the same neighbour, which on CPU shifted small shapes' medians by several percent);
    on CUDA events around each call after an L2 flush. The first call of a candidate allocates and pages in, so the
    second sizes the repetitions; short calls get up to 100 repetitions within the same budget."""
    names = list(fns)
    first = {}
    for name in names:  # warm-up
        for _ in range(2):
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
        first[name] = time.perf_counter() - start
    budget = CUDA_BUDGET_S if device.type == "cuda" else CPU_BUDGET_S
    reps = max(3, min(100, int(budget / max(sum(first.values()), 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in names}
    calls = [name for r in range(reps) for name in names[r % len(names):] + names[:r % len(names)]]  # rotated rounds
    if device.type == "cuda":
        flush = _l2_flush_buffer(device)
        events = []
        for name in calls:
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[name]()
            end.record()
            events.append((name, start, end))
        torch.cuda.synchronize(device)
        for name, start, end in events:
            times[name].append(start.elapsed_time(end))
    else:
        for name in calls:
            start = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


# ------------------------------------------------------------------------------------------------ measuring
def _warn(kind: str, name: str, args: tuple, what: str) -> None:
    warnings.warn(f"crate_kernels: auto dropped candidate {name!r} of {kind} on {_shape_text(args)}: {what}",
                  RuntimeWarning, stacklevel=4)


def measure(kind: str, args: tuple) -> dict:
    """Check and time every candidate of ``kind`` on ``args``; the record of the choice (see the module text)."""
    started = time.perf_counter()
    device = next(a for a in args if isinstance(a, torch.Tensor)).device
    entries = candidates(kind)
    dtype = next(a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()).dtype
    wide = _upcast(args, torch.float32 if dtype.itemsize < 4 else torch.float64)
    truth = entries[library_choice(kind, wide)].fn(*wide)
    rows, errors = [], {}
    for name, entry in entries.items():  # each result compared, then freed
        reason = why_not(entry, args)
        if reason is not None:
            rows.append({"candidate": name, "ms": None, "error": None, "status": f"unsupported: {reason}"})
            continue
        try:
            result = entry.fn(*args)
            _sync(device)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # a compile or launch failure, or a bug: never the choice
            _warn(kind, name, args, f"raised {type(e).__name__}: {str(e)[:300]}")
            rows.append({"candidate": name, "ms": None, "error": None, "status": f"raised {type(e).__name__}"})
            continue
        errors[name] = _compare(result, truth)
        del result
    del truth, wide
    library = [n for n in library_order(kind) if n in errors]
    if not library:
        raise RuntimeError(f"auto: no library path of {kind} ran on {_shape_text(args)} (see the warnings)")
    floor = TOLERANCE_FLOOR * torch.finfo(dtype).eps
    if dtype == torch.float64:  # the truth is a library path itself (error 0): another order of summation over the
        floor *= max(next(a for a in args if isinstance(a, torch.Tensor)).shape)  # longest axis rounds differently
    limit = TOLERANCE_K * errors[library[0]][0] + floor
    passed = {}
    for name, (error, bits) in errors.items():
        passed[name] = error <= limit and bits <= MASK_TOLERANCE
        if not passed[name]:
            _warn(kind, name, args, f"error {error:.3g} against {'float32' if dtype.itemsize < 4 else 'float64'} "
                                    f"(limit {limit:.3g}; library path {library[0]}: {errors[library[0]][0]:.3g})"
                  + (f", {bits:.1%} of mask bits differ" if bits else ""))
    survivors = [n for n in errors if passed[n]]
    if not survivors:
        raise RuntimeError(f"auto: no candidate of {kind} computed {_shape_text(args)} correctly (see the warnings)")
    times = _time({n: functools.partial(entries[n].fn, *args) for n in survivors}, device) if len(survivors) > 1 \
        else {survivors[0]: None}
    choice = _pick(times, {n for n in survivors if entries[n].library})
    for name in errors:
        rows.append({"candidate": name, "ms": times.get(name), "error": errors[name][0],
                     "status": "ok" if passed[name] else "wrong"})
    order = list(entries)
    rows.sort(key=lambda r: order.index(r["candidate"]))
    _stats["measured"] += 1
    _stats["seconds"] += time.perf_counter() - started
    return {"kind": kind, "key": tuning_key(kind, args), "shape": _shape_text(args[:1]), "choice": choice,
            "rows": rows}


def _pick(times: dict[str, float | None], library: set[str]) -> str:
    """The first library path in registration order (``times`` keeps it: the fused kernels, which hold no N x N
    matrix, before the matmul form), unless another library path is faster than it by MARGIN (then the fastest of
    them); that one unless any other candidate is faster than it by MARGIN. Timed alone, CPU flash and the matmul
    form of MSSA's forward at N = 50 read within 1-3% of each other either way, while in a forward and backward the
    matmul form's pair is 5% slower: a near tie goes to the path that keeps less in cache."""
    if len(times) == 1:
        return next(iter(times))
    fastest = min(times, key=times.get)
    if not library:
        return fastest
    ordered = [n for n in times if n in library]
    choice = min(ordered, key=times.get)
    if times[ordered[0]] <= times[choice] * MARGIN:
        choice = ordered[0]
    return fastest if times[fastest] * MARGIN < times[choice] else choice


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


_agreement: list = []  # the process groups of the enclosing ``agreeing`` blocks
_group = None


@contextlib.contextmanager
def agreeing():
    """A block every rank of torch.distributed runs alike (the same operator calls in the same order): new keys are
    decided by rank 0 and broadcast to the others. A no-op without torch.distributed."""
    global _group
    if not _distributed():
        yield
        return
    if _group is None:
        _group = torch.distributed.new_group(backend="gloo")  # apart from DDP's gradient collectives
    _agreement.append(_group)
    try:
        yield
    finally:
        _agreement.pop()


def _decide(kind: str, args: tuple) -> dict:
    """The record for ``args``' tuning key: this process's, the disk cache's, or measured; rank 0's under DDP."""
    key = tuning_key(kind, args)
    for seen in _touched:
        seen.add(key)
    if key in _records:
        return _records[key]
    device = next(a for a in args if isinstance(a, torch.Tensor)).device
    record = None
    if not _distributed() or torch.distributed.get_rank() == 0:
        cached = _read(cache_path(device)).get(key)
        if cached is not None and cached.get("choice") in candidates(kind):
            record = dict(cached, source="cache")
            _stats["from_cache"] += 1
        else:
            record = dict(measure(kind, args), source="measured")
            _write(device, key, record)
    if _distributed():
        box = [record]
        torch.distributed.broadcast_object_list(box, src=0, group=_agreement[-1])
        record = box[0]
        if torch.distributed.get_rank() != 0:
            record = dict(record, source="rank 0")
    _records[key] = record
    return record


def _not_now() -> bool:
    """While a CUDA graph is captured or torch.compile traces, nothing is measured."""
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()
    return compiling or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def tune_mode() -> str:
    """``$CRATE_KERNELS_TUNE``: ``on`` (default: measure) or ``off`` (the fixed order)."""
    mode = os.environ.get(_TUNE_ENV, "on") or "on"
    if mode not in ("on", "off"):
        raise ValueError(f"${_TUNE_ENV} must be 'on' or 'off', got {mode!r}")
    return mode


def choose(kind: str, args: tuple) -> str:
    """The candidate ``auto`` runs for ``kind`` on ``args``."""
    pinned = pinned_variant(kind)
    if pinned is not None:
        entry = backend._candidates[kind].get(f"triton-{pinned}")
        if entry is not None and why_not(entry, args) is None:
            return f"triton-{pinned}"
    if torch.are_deterministic_algorithms_enabled() or tune_mode() == "off":
        return library_choice(kind, args)
    call = _call_key(kind, args)
    name = _memo.get(call)
    if name is None:
        if _not_now() or (_distributed() and not _agreement):
            record = _records.get(tuning_key(kind, args))
            return record["choice"] if record else library_choice(kind, args)
        with torch.no_grad(), torch.autocast(args[0].device.type, enabled=False):
            name = _memo[call] = _decide(kind, args)["choice"]
    return name


def auto_launcher(kind: str) -> Callable:
    """Backend ``auto``'s launcher of ``kind``: the candidate ``choose`` picks, run on the arguments."""
    def launch(*args):
        return backend._candidates[kind][choose(kind, args)].fn(*args)

    return launch


for _kind in KERNEL_KINDS:
    backend.register_launcher(_kind, "auto", auto_launcher(_kind))


# ------------------------------------------------------------------------------------------------ reporting
def tune_step(step: Callable[[], object]) -> list[dict]:
    """Run ``step()`` (e.g. a model's forward and backward on a batch, with its operators under ``auto``) so that
    every operator shape it reaches is decided (from this process, the disk cache, or measured); the rows of
    ``tuning_table()`` for those shapes."""
    seen: set = set()
    _touched.append(seen)
    _memo.clear()  # every call decides again through its record, so each key is seen
    try:
        with agreeing():
            step()
    finally:
        _touched.remove(seen)
    return [row for row in tuning_table() if row["key"] in seen]


def tuning_stats() -> dict:
    """{"measured": keys measured in this process, "from_cache": keys read from the disk cache, "seconds": time
    spent measuring}."""
    return dict(_stats)


def cache_note() -> str:
    """Where the tuning cache lives, for a progress line."""
    return f"tuning cache in {cache_dir()}" if tune_mode() == "on" else f"${_TUNE_ENV}=off: the fixed order"


def stats_note() -> str:
    """``tuning_stats()`` as words, for a progress line."""
    stats = tuning_stats()
    return (f"auto: {stats['measured']} operator shapes measured in {stats['seconds']:.1f} s, "
            f"{stats['from_cache']} read from the tuning cache")


def tuning_table() -> list[dict]:
    """One row per (kind, tuning key, candidate) decided in this process: kind, key, shape, candidate, ms (median,
    None where not timed), error (max relative error against the library path in float64, or float32 for 16-bit
    inputs), status, chosen, source
    (measured, cache or rank 0)."""
    return [{"kind": r["kind"], "key": r["key"], "shape": r["shape"], **row, "chosen": row["candidate"] == r["choice"],
             "source": r["source"]} for r in _records.values() for row in r["rows"]]


def format_tables(rows: list[dict] | None = None) -> str:
    """``tuning_table()`` as text: one table per operator and direction (candidates that do not support a shape
    are left out)."""
    rows = [r for r in (tuning_table() if rows is None else rows) if not r["status"].startswith("unsupported")]
    lines = []
    for kind in KERNEL_KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        lines += ["", f"{kind}", f"  {'shape':<28} {'candidate':<18} {'median ms':>10} {'error':>9}  chosen  status"]
        for r in mine:
            ms = "-" if r["ms"] is None else f"{r['ms']:.4f}"
            error = "-" if r["error"] is None else f"{r['error']:.2e}"
            lines.append(f"  {r['shape'][:28]:<28} {r['candidate']:<18} {ms:>10} {error:>9}  "
                         f"{'*' if r['chosen'] else ' ':^6}  {r['status']} ({r['source']})")
    return "\n".join(lines[1:])


@contextlib.contextmanager
def fresh_memory():
    """Forget this process's choices inside the block (the disk cache stays): tests and the tune command."""
    saved = dict(_memo), dict(_records), dict(_stats)
    _memo.clear()
    _records.clear()
    _stats.update(measured=0, from_cache=0, seconds=0.0)
    try:
        yield
    finally:
        _memo.clear()
        _memo.update(saved[0])
        _records.clear()
        _records.update(saved[1])
        _stats.update(saved[2])
