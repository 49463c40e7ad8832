"""Test set-up: without a GPU, Triton kernels run under the interpreter (set before any kernel import)."""
import os
import tempfile
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU: one autotune config per kernel (the first the pruning keeps), nothing timed or cached
os.environ.setdefault("CRATE_KERNELS_AUTOTUNE", "first")
# auto's tuning cache (crate_kernels.ops.tuning) in a folder of this session, never the user's
os.environ.setdefault("CRATE_KERNELS_CACHE", tempfile.mkdtemp(prefix="crate_kernels-tuning-"))

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different seed per test (fresh random inputs), reproducible from the test's id."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    yield


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (the soak test)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long tests left out of the default run (--run-slow or CRATE_SLOW=1)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or os.environ.get("CRATE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or CRATE_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
