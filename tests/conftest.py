"""Test set-up: without a GPU, Triton kernels run under the interpreter (set before any kernel import)."""
import os
import random
import tempfile
import zlib

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU: one autotune config per kernel (the first the pruning keeps), nothing timed or cached
os.environ.setdefault("CRATE_KERNELS_AUTOTUNE", "first")
# auto's tuning cache (crate_kernels.ops.tuning) in a folder of this session, never the user's
os.environ.setdefault("CRATE_KERNELS_CACHE", tempfile.mkdtemp(prefix="crate_kernels-tuning-"))

import pytest  # noqa: E402

# pytest-xdist workers (scripts/test.sh runs two) share the cores: each computes on its share, as torch's default of
# one thread per core in every worker oversubscribes them (see one_thread below)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEED_SHIFT_VAR = "CRATE_TEST_SEED_SHIFT"


def _seed_shift() -> int:
    value = os.environ.get(SEED_SHIFT_VAR, "0")
    try:
        return int(value)
    except ValueError:
        raise pytest.UsageError(f"${SEED_SHIFT_VAR} must be an integer, got {value!r}") from None


def seed_of(nodeid: str) -> int:
    """crc32 of the test's id plus $CRATE_TEST_SEED_SHIFT (default 0)."""
    return zlib.crc32(nodeid.encode()) + _seed_shift()


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny crate-train run (the demo model at 16 px, 2 steps) for the commands that read one (probe, finetune,
    analyze); one per test module."""
    from crate_kernels.train import main as train_main

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    args = ["--input_size", "16", "--patch_size", "4", "--epoch_size", "8", "--batch_size", "4", "--max_steps", "2",
            "--eval_every", "0", "--num_workers", "0", "--no_tensorboard", "--threads", "0", "--output_dir", str(out)]
    assert train_main(args) == 0
    return out


@pytest.fixture
def one_thread():
    """Tiny problems: one thread (two, on a busy 2-core machine, made these steps 20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different seed per test (fresh random inputs), reproducible from the test's id and the shift; hypothesis
    tests draw their examples from the same seed (hypothesis.seed), so the shift changes those too."""
    seed = seed_of(request.node.nodeid)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # also numpy's and Python's global generators (a Generator: the rng fixture)
    random.seed(seed)
    if hasattr(request.function, "hypothesis"):
        import hypothesis

        hypothesis.seed(seed)(request.function)
    yield


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A numpy Generator seeded like the test (``np.random.default_rng()`` takes fresh OS entropy: its failure
    could not be rerun)."""
    return np.random.default_rng(seed_of(request.node.nodeid))


def pytest_report_header(config):
    return f"test seeds: crc32(test id) + ${SEED_SHIFT_VAR} = {_seed_shift()}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report names its seed and how to rerun it with the same one."""
    report = (yield).get_result()
    if report.failed:
        report.sections.append(("test seed", f"seed {seed_of(item.nodeid)} = crc32({item.nodeid!r}) + shift "
                                             f"{_seed_shift()}; rerun: {SEED_SHIFT_VAR}={_seed_shift()} "
                                             f"python -m pytest '{item.nodeid}'"))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (the soak test)")


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked slow unless asked (the markers: pyproject.toml's [tool.pytest.ini_options])."""
    if config.getoption("--run-slow") or os.environ.get("CRATE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or CRATE_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
