"""Test set-up: without a GPU, Triton kernels run under the interpreter (set before any kernel import)."""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU: one autotune config per kernel (the first the pruning keeps), nothing timed or cached
os.environ.setdefault("CRATE_KERNELS_AUTOTUNE", "first")

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
