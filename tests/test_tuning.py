"""``auto``'s measured choice (crate_kernels.ops.tuning) with injected fake candidates, on CPU."""
import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

from crate_kernels import ops
from crate_kernels.ops import backend, tuning

pytestmark = pytest.mark.filterwarnings("ignore:crate_kernels. auto dropped candidate:RuntimeWarning")
KIND = "mssa_forward"
SHAPE = (2, 3, 17, 32)
calls: dict[str, int] = {}
LIBRARY_FORWARD = backend._candidates[KIND]["matmul"].fn  # a library launcher that runs any device and dtype


def _counted(name, fn):
    def run(*args):
        calls[name] = calls.get(name, 0) + 1
        return fn(*args)

    return run


def _sleeping(seconds, fn):
    def run(*args):
        time.sleep(seconds)
        return fn(*args)

    return run


def install_fakes(sleeps=None):
    """Replace mssa_forward's candidates: the library path (slow enough that a fast correct one beats the margin),
    a fast correct one, a slow correct one, a fast wrong one and a raising one; every call counted."""
    torch_fwd = LIBRARY_FORWARD
    sleeps = sleeps or {"library": 0.03, "fast": 0.0, "slow": 0.08}  # gaps far above a loaded machine's noise

    def wrong(w, scale):
        out, lse = torch_fwd(w, scale)
        return out * 1.01, lse

    def raising(w, scale):
        raise RuntimeError("out of resources: shared memory, required 300000")

    fakes = {
        "library": backend.Entry(_sleeping(sleeps["library"], torch_fwd), None, True),
        "fast": backend.Entry(_sleeping(sleeps["fast"], torch_fwd), None, False),
        "slow": backend.Entry(_sleeping(sleeps["slow"], torch_fwd), None, False),
        "wrong": backend.Entry(wrong, None, False),
        "raising": backend.Entry(raising, None, False),
    }
    backend._candidates[KIND] = {name: backend.Entry(_counted(name, e.fn), e.supports, e.library)
                                 for name, e in fakes.items()}


@pytest.fixture
def fakes(monkeypatch, tmp_path):
    monkeypatch.setenv("CRATE_KERNELS_CACHE", str(tmp_path))
    monkeypatch.delenv("CRATE_KERNELS_TUNE", raising=False)
    monkeypatch.setitem(backend._candidates, KIND, dict(backend._candidates[KIND]))
    calls.clear()
    install_fakes()
    with tuning.fresh_memory():
        yield tmp_path


def test_auto_picks_the_fast_correct_candidate_drops_wrong_and_raising_once_and_writes_the_cache(fakes):
    w = torch.randn(*SHAPE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ops.mssa_attention(w, backend="auto")
        ops.mssa_attention(w, backend="auto")
    messages = [str(c.message) for c in caught if "auto dropped" in str(c.message)]
    assert len(messages) == 2, messages
    assert any("'wrong'" in m and "mssa_forward" in m and "(2, 3, 17, 32) float32" in m and "error" in m
               for m in messages)
    assert any("'raising'" in m and "RuntimeError: out of resources" in m for m in messages)
    torch.testing.assert_close(out, ops.mssa_reference(w, 32 ** -0.5))
    rows = {r["candidate"]: r for r in ops.tuning_table() if r["kind"] == KIND}
    assert [n for n, r in rows.items() if r["chosen"]] == ["fast"]
    assert rows["wrong"]["status"] == "wrong" and rows["raising"]["status"] == "raised RuntimeError"
    assert rows["slow"]["ms"] > rows["fast"]["ms"] and rows["library"]["ms"] > rows["fast"]["ms"]
    assert rows["fast"]["error"] < 1e-5 < rows["wrong"]["error"]
    assert tuning.tuning_stats()["measured"] == 1
    calls.clear()
    ops.mssa_attention(w, backend="auto")  # remembered: only the choice runs
    assert calls == {"fast": 1}
    (path,) = fakes.glob("tuning-*.json")
    entries = json.loads(path.read_text())["entries"]
    assert [e["choice"] for e in entries.values() if e["kind"] == KIND] == ["fast"]


SECOND_PROCESS = """
import json, sys
sys.path.insert(0, {tests!r})
import torch
from crate_kernels import ops
from crate_kernels.ops import backend, tuning
import test_tuning
test_tuning.install_fakes()
torch.set_num_threads({threads})  # the CPU tuning key holds the thread count: the same as the first process
torch.manual_seed(0)
ops.mssa_attention(torch.randn(*test_tuning.SHAPE), backend="auto")
print(json.dumps({{"stats": tuning.tuning_stats(), "calls": test_tuning.calls}}))
"""


def test_a_second_process_reads_the_cache_and_times_nothing(fakes):
    """Also when this process changed its thread count after the cache file was first named (in-process command
    tests do): the threads are part of a CPU tuning key, not of the file's name."""
    threads = torch.get_num_threads()
    tuning.cache_path()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        ops.mssa_attention(torch.randn(*SHAPE), backend="auto")
        assert tuning.tuning_stats()["measured"] == 1
        code = SECOND_PROCESS.format(tests=os.path.dirname(__file__), threads=torch.get_num_threads())
    finally:
        torch.set_num_threads(threads)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["stats"]["measured"] == 0 and report["stats"]["from_cache"] == 1
    assert report["calls"] == {"fast": 1}  # nothing else ran: no check, no timing


def test_out_of_memory_propagates(fakes):
    def oom(w, scale):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    backend._candidates[KIND]["oom"] = backend.Entry(oom, None, False)
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
        ops.mssa_attention(torch.randn(*SHAPE), backend="auto")
    assert not list(fakes.glob("tuning-*.json"))  # no choice recorded


def _fixed_order_candidates():
    """Library candidates in registration order: one that declines, one that runs, one after it; and a faster
    non-library one."""
    library_fwd = LIBRARY_FORWARD
    backend._candidates[KIND] = {
        "declines": backend.Entry(_counted("declines", library_fwd), lambda w, scale: "not this shape", True),
        "second": backend.Entry(_counted("second", library_fwd), None, True),
        "fast": backend.Entry(_counted("fast", library_fwd), None, False),
        "last": backend.Entry(_counted("last", library_fwd), None, True),
    }


@pytest.mark.parametrize("mode", ["deterministic", "tune-off"])
def test_deterministic_mode_and_tune_off_take_the_fixed_order(fakes, monkeypatch, mode):
    _fixed_order_candidates()
    assert backend.library_order(KIND) == ["declines", "second", "last"]
    w = torch.randn(*SHAPE)
    if mode == "tune-off":
        monkeypatch.setenv("CRATE_KERNELS_TUNE", "off")
        ops.mssa_attention(w, backend="auto")
    else:
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            ops.mssa_attention(w, backend="auto")
        finally:
            torch.use_deterministic_algorithms(before)
    assert calls == {"second": 1}
    assert tuning.tuning_stats()["measured"] == 0 and not list(fakes.glob("tuning-*.json"))
    calls.clear()
    ops.mssa_attention(w, backend="torch")  # backend torch: the same fixed order
    assert calls == {"second": 1}
    monkeypatch.setenv("CRATE_KERNELS_TUNE", "sometimes")
    with pytest.raises(ValueError, match=r"\$CRATE_KERNELS_TUNE must be 'on' or 'off', got 'sometimes'"):
        ops.mssa_attention(w, backend="auto")


def test_nothing_is_measured_while_torch_compile_traces(fakes, monkeypatch):
    _fixed_order_candidates()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    ops.mssa_attention(torch.randn(*SHAPE), backend="auto")
    assert calls == {"second": 1} and tuning.tuning_stats()["measured"] == 0


def test_register_candidates_takes_a_table_of_candidates(monkeypatch):
    monkeypatch.setitem(backend._candidates, "ista_forward", dict(backend._candidates["ista_forward"]))
    fn = backend._candidates["ista_forward"]["matmul"].fn
    backend.register_candidates({"ista_forward": {"mm": backend.Candidate(fn, lambda *a: None)}})
    assert backend.candidates("ista_forward")["mm"].library
    assert backend.library_order("ista_forward")[-1] == "mm"  # registration order
    with pytest.raises(ValueError, match="kind must be one of"):
        backend.register_candidate("mssa", "x", fn)


def _rank(rank: int, world: int, init: str, out: str) -> None:
    """One of two gloo ranks: timings that disagree (what is fast on rank 0 is slow on rank 1)."""
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        os.environ["CRATE_KERNELS_CACHE"] = f"{out}.cache{rank}"
        install_fakes({"library": 0.1, "fast": 0.0 if rank == 0 else 0.05, "slow": 0.05 if rank == 0 else 0.0})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with tuning.agreeing():
                for shape in (SHAPE, (1, 2, 50, 32)):
                    ops.mssa_attention(torch.randn(*shape), backend="auto")
            calls.clear()
            ops.mssa_attention(torch.randn(1, 1, 9, 32), backend="auto")  # outside: the fixed order, no collective
        assert calls == {"library": 1}, calls
        choices = {r["key"]: (r["candidate"], r["source"]) for r in ops.tuning_table() if r["chosen"]}
        with open(f"{out}.{rank}", "w") as f:
            json.dump(choices, f)
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_take_rank_0s_choices_inside_agreeing_blocks(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    torch.multiprocessing.spawn(_rank, args=(2, init, str(tmp_path / "choices")), nprocs=2)
    zero = json.loads((tmp_path / "choices.0").read_text())
    one = json.loads((tmp_path / "choices.1").read_text())
    assert len(zero) == 2 and set(zero) == set(one)
    for key in zero:
        assert zero[key][0] == one[key][0] == "fast"  # rank 1 alone would have taken "slow"
        assert zero[key][1] == "measured" and one[key][1] == "rank 0"


def test_the_tune_command_prints_tables_and_a_second_run_reads_the_cache(tmp_path):
    env = dict(os.environ, CRATE_KERNELS_CACHE=str(tmp_path), PYTHONPATH=os.pathsep.join(sys.path))
    command = [sys.executable, "-m", "crate_kernels.ops.tune", "--model", "crate_mae_tiny", "--batch_size", "8",
               "--input_size", "32", "--dtype", "fp32", "--device", "cpu"]
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    for kind in backend.KERNEL_KINDS:
        assert f"\n{kind}\n" in f"\n{first.stdout}"
    assert "4 operator shapes measured" in first.stdout and "0 read from the cache" in first.stdout
    assert "candidate" in first.stdout and "median ms" in first.stdout and "error" in first.stdout
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "0 operator shapes measured" in second.stdout and "4 read from the cache" in second.stdout
    assert "(cache)" in second.stdout


def test_each_csrc_kernel_is_a_candidate_of_the_backward_and_declines_cpu_tensors():
    pytest.importorskip("triton", reason="the Triton modules register the CUDA backends")
    from crate_kernels.ops import cuda_ext

    for op, kernels in (("mssa", cuda_ext.MSSA_KERNELS), ("ista", cuda_ext.ISTA_KERNELS)):
        names = list(backend.candidates(f"{op}_backward"))
        expected = [f"cuda-{k}" for k in kernels if k != "auto"]
        assert names[-len(expected):] == expected and "cuda" not in names  # after the Triton variants
        assert not any(n.startswith("cuda") for n in backend.candidates(f"{op}_forward"))
    w = torch.randn(1, 2, 9, 16)
    args = (torch.randn_like(w), w, w, torch.zeros(1, 2, 9), 0.25)
    for name in ("cuda-mma", "cuda-fma"):
        assert "needs CUDA tensors" in backend.why_not(backend.candidates("mssa_backward")[name], args)


def test_the_first_library_path_wins_a_near_tie_and_others_need_the_margin():
    library = {"flash", "matmul"}
    assert tuning._pick({"flash": 1.02, "matmul": 1.0}, library) == "flash"  # within 3%: registration order
    assert tuning._pick({"flash": 1.05, "matmul": 1.0}, library) == "matmul"  # more than 3% faster
    assert tuning._pick({"flash": 1.02, "matmul": 1.0, "triton-v1": 0.995}, library) == "flash"
    assert tuning._pick({"flash": 1.02, "matmul": 1.0, "triton-v1": 0.98}, library) == "triton-v1"
    assert tuning._pick({"triton-v1": 1.0, "triton-x": 0.9}, set()) == "triton-x"
