"""``auto`` against every candidate pinned by hand, forward+backward through the public ops, side by side.

MSSA at B*H = 48 (B=4, H=12), p = 64, N in {17, 50, 197, 401}; ISTA on 4*197 rows at d in {384, 768}; fp32, one
CPU thread (on CUDA, the device's default). Per shape one test times, interleaved round-robin in one loop (median
of 15 to 200 rounds, as many as fit ``BUDGET_S``; each sample a burst of calls lasting ``SAMPLE_S``):

- ``auto`` (tuned in the warm-up, in a fresh cache folder),
- every supported (forward candidate, backward candidate) pair pinned by hand (only those candidates registered,
  through backend ``torch``),
- the launchers of ``auto``'s choice called directly (forward, then backward on its outputs; for ISTA with the
  op's d x d work, M = W - W^T W and dW, beside them): the public op's per-call overhead is auto's time minus this.

extra_info holds every median, ``auto_over_fastest`` (auto / the fastest pinned pair; the target is <= 1.05),
``auto_over_its_pair_pinned`` (auto / the pair it chose, pinned: the cost of choosing at each call) and
``overhead_us``; pytest-benchmark's own figure is ``auto``'s step. A summary line per shape is printed (-s).
"""
import contextlib
import itertools
import math
import statistics
import tempfile
import time

import pytest
import torch
from bench_utils import CUDA, synchronize

from crate_kernels import ops
from crate_kernels.ops import backend, tuning
from crate_kernels.ops.ista import dictionary_grad, dictionary_matrix

DEVICE = "cuda" if CUDA else "cpu"
BUDGET_S = 2.0  # per shape: rounds of every step, 15 to 200 of them


@pytest.fixture(autouse=True)
def _fresh_tuning(monkeypatch):
    monkeypatch.setenv("CRATE_KERNELS_CACHE", tempfile.mkdtemp(prefix="crate_kernels-bench-auto-"))
    monkeypatch.delenv("CRATE_KERNELS_TUNE", raising=False)
    threads = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    with tuning.fresh_memory():
        yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def pinned(op: str, forward: str, backward: str):
    """Only ``forward`` and ``backward`` registered for ``op`` (as library paths: backend ``torch`` runs them)."""
    saved = {kind: backend._candidates[kind] for kind in (f"{op}_forward", f"{op}_backward")}
    for kind, name in ((f"{op}_forward", forward), (f"{op}_backward", backward)):
        backend._candidates[kind] = {name: saved[kind][name]._replace(library=True)}
    try:
        yield
    finally:
        backend._candidates.update(saved)


def _supported(kind: str, args: tuple) -> list[str]:
    return [n for n, e in backend.candidates(kind).items() if backend.why_not(e, args) is None]


SAMPLE_S = 0.005  # a timed sample runs one step back to back for at least this long


def _median_ms(steps: dict) -> dict:
    """Median ms per call of each step: one warm-up each, then rounds interleaved round-robin, each round starting
    one step further on, each sample a burst of back-to-back calls of one step lasting about SAMPLE_S (one call for
    steps that long). Single calls of short steps measured the code path's warmth as much as the step: at N = 17
    (0.85 ms) auto read 2-7% slower than the very pair it runs, pinned, in this six-step rotation (four of the steps
    share the pinned path), against 0.5% in 3000 alternating calls of the two alone; a training step runs one path
    call after call, as a burst does. A fixed order gave auto the same neighbour every round (6-9% at N = 17)."""
    first = {}
    for name, step in steps.items():
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        first[name] = time.perf_counter() - start
    burst = {name: max(1, math.ceil(SAMPLE_S / seconds)) for name, seconds in first.items()}
    rounds = max(15, min(200, int(BUDGET_S / sum(burst[n] * first[n] for n in steps))))
    times = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            step = steps[name]
            synchronize()
            start = time.perf_counter()
            for _ in range(burst[name]):
                step()
            synchronize()
            times[name].append((time.perf_counter() - start) * 1e3 / burst[name])
    return {name: statistics.median(t) for name, t in times.items()}


def _compare(benchmark, op, public, fwd_args, bwd_args, label, around=lambda launch: launch()):
    """Time auto, each pinned pair and the chosen launchers (inside ``around``: the op's own work beside them);
    record and print the comparison."""
    fwd_kind, bwd_kind = f"{op}_forward", f"{op}_backward"
    public("auto")()  # tunes every key of the step
    chosen = {r["kind"]: r["candidate"] for r in ops.tuning_table() if r["chosen"]}
    steps = {"auto": public("auto")}
    example = bwd_args(backend.launcher(fwd_kind, "torch")(*fwd_args))
    for f, b in itertools.product(_supported(fwd_kind, fwd_args), _supported(bwd_kind, example)):
        def step(f=f, b=b):
            with pinned(op, f, b):
                public("torch")()

        steps[f"pinned {f}/{b}"] = step
    launch_f = backend._candidates[fwd_kind][chosen[fwd_kind]].fn
    launch_b = backend._candidates[bwd_kind][chosen[bwd_kind]].fn
    steps["launchers"] = lambda: around(lambda: launch_b(*bwd_args(launch_f(*fwd_args))))
    medians = _median_ms(steps)
    fastest = min(v for k, v in medians.items() if k.startswith("pinned"))
    ratio = medians["auto"] / fastest
    same = medians["auto"] / medians[f"pinned {chosen[fwd_kind]}/{chosen[bwd_kind]}"]  # auto's dispatch, alone
    overhead_us = (medians["auto"] - medians["launchers"]) * 1e3
    benchmark.extra_info.update({f"{k}_ms": round(v, 4) for k, v in medians.items()})
    benchmark.extra_info.update(auto_over_fastest=round(ratio, 3), auto_over_its_pair_pinned=round(same, 3),
                                overhead_us=round(overhead_us, 1),
                                chosen=f"{chosen[fwd_kind]}/{chosen[bwd_kind]}")
    print(f"\n{label}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in medians.items())
          + f"; auto/fastest pinned {ratio:.3f}; auto/its pair pinned {same:.3f}; overhead {overhead_us:.0f} us; "
            f"chosen {chosen[fwd_kind]}/{chosen[bwd_kind]}")
    benchmark.pedantic(public("auto"), rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("n", [17, 50, 197, 401])
def test_mssa_auto_vs_pinned(benchmark, n):
    benchmark.group = f"auto mssa fwd+bwd B*H=48 n={n} p=64 fp32"
    w = torch.randn(4, 12, n, 64, device=DEVICE, requires_grad=True)
    dout = torch.randn_like(w)
    scale = 64 ** -0.5

    def public(name):
        def step():
            w.grad = None
            ops.mssa_attention(w, backend=name).backward(dout)
        return step

    detached = w.detach()
    _compare(benchmark, "mssa", public, (detached, scale),
             lambda fwd: (dout, detached, *fwd, scale), f"mssa n={n}")


@pytest.mark.parametrize("d", [384, 768])
def test_ista_auto_vs_pinned(benchmark, d):
    benchmark.group = f"auto ista fwd+bwd rows=788 d={d} fp32"
    x = torch.randn(4 * 197, d, device=DEVICE, requires_grad=True)
    weight = torch.empty(d, d, device=DEVICE)
    torch.nn.init.kaiming_uniform_(weight)
    weight.requires_grad_(True)
    dout = torch.randn_like(x)

    def public(name):
        def step():
            x.grad = weight.grad = None
            ops.ista_step(x, weight, backend=name).backward(dout)
        return step

    xd, wd = x.detach(), weight.detach()
    m = dictionary_matrix(wd)

    def around(launch):  # the public op also forms M = W - W^T W and dW from dM: d x d work, not overhead
        dictionary_grad(wd, launch()[1] + dictionary_matrix(wd))

    _compare(benchmark, "ista", public, (xd, m, 0.1, 0.5),
             lambda fwd: (dout, xd, m, fwd[1], 0.1, True, True), f"ista d={d}", around)

