"""Property-based tests of the public operators on every backend this machine runs (hypothesis).

`mssa_attention` and `ista_step` against float64 reference math over random shapes (batch, heads, N up to 300,
head dims and widths that are not powers of two), strided and transposed views, input scales over several
decades, and step sizes / thresholds over their ranges: outputs and every gradient. Triton runs through its
interpreter on CPU (float32). Errors follow tests/tolerance.py: float64 truth, PyTorch's float32 computation of the
release's math as the baseline. Each example draws a seed for its tensors, so a failure prints the seed with the
shape (hypothesis's falsifying example, plus the blob to replay it); hypothesis itself draws from the test's seed
(tests/conftest.py, $CRATE_TEST_SEED_SHIFT), with no example database, so a run is a function of that seed.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerance import assert_close, assert_mssa_close, ista_math

from crate_kernels import ops
from crate_kernels.ops.backend import launcher_backends

BACKENDS = ["reference", "torch"] + (["triton"] if "triton" in launcher_backends("mssa_forward") else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXAMPLES = settings(max_examples=12, deadline=None, print_blob=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``x`` in another memory layout: contiguous, a permuted view, or a strided slice."""
    if kind == "contiguous":
        return x.contiguous()
    if kind == "permuted":  # stored with the last two axes swapped, seen through a transpose
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    padded = torch.zeros(*x.shape[:-1], 2 * x.shape[-1] + 1, dtype=x.dtype, device=x.device)  # every other column
    padded[..., 1::2] = x
    return padded[..., 1::2]


@st.composite
def mssa_cases(draw):
    return dict(
        b=draw(st.integers(1, 3)), h=draw(st.integers(1, 3)), n=draw(st.integers(1, 300)),
        p=draw(st.sampled_from([1, 5, 12, 20, 24, 33, 48, 64, 80, 96, 128])),
        scale_exp=draw(st.floats(-2.0, 0.7)), layout=draw(st.sampled_from(["contiguous", "permuted", "strided"])),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@EXAMPLES
@given(case=mssa_cases())
def test_mssa_matches_float64_reference(backend, case):
    if backend == "triton" and case["b"] * case["h"] * case["n"] > 600:
        case["n"] = max(1, 600 // (case["b"] * case["h"]))  # keep the interpreter to about a second an example
    gen = torch.Generator().manual_seed(case["seed"])
    shape = (case["b"], case["h"], case["n"], case["p"])
    amplitude = 10.0 ** case["scale_exp"]
    w = (torch.randn(shape, generator=gen, dtype=torch.float64) * amplitude).float().to(DEVICE)
    dout = torch.randn(shape, generator=gen, dtype=torch.float64).float().to(DEVICE)
    x = _layout(w, case["layout"]).requires_grad_(True)
    out = ops.mssa_attention(x, backend=backend)
    (dw,) = torch.autograd.grad(out, x, dout)
    assert out.shape == shape and torch.isfinite(out).all() and torch.isfinite(dw).all()
    assert_mssa_close(w, dout, case["p"] ** -0.5, out.detach(), dw, name=str(case))


@st.composite
def ista_cases(draw):
    return dict(
        lead=draw(st.sampled_from([(), (1,), (3,), (2, 5)])), rows=draw(st.integers(0, 300)),
        d=draw(st.sampled_from([3, 8, 20, 33, 48, 72, 100, 130])), scale_exp=draw(st.floats(-2.0, 1.0)),
        eta=draw(st.floats(0.01, 1.0)), lambd=draw(st.floats(0.0, 1.0)),
        layout=draw(st.sampled_from(["contiguous", "permuted", "strided"])), seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@EXAMPLES
@given(case=ista_cases())
def test_ista_matches_float64_reference_with_its_own_mask(backend, case):
    """Entries whose float64 pre-activation is within rounding of the threshold may fall either side in float32:
    the backend's mask must match float64 elsewhere, and its gradients must be the float64 gradients of the mask
    it chose (the baseline's error too is measured against the float64 gradients of its own mask)."""
    gen = torch.Generator().manual_seed(case["seed"])
    rows = case["rows"] if backend != "triton" else min(case["rows"], 200)
    shape, d = (*case["lead"], rows, case["d"]), case["d"]
    amplitude = 10.0 ** case["scale_exp"]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * amplitude).float().to(DEVICE)
    weight = (torch.rand(d, d, generator=gen, dtype=torch.float64) * 2 - 1).mul_((6 / d) ** 0.5).float().to(DEVICE)
    dout = torch.randn(shape, generator=gen, dtype=torch.float64).float().to(DEVICE)
    eta, lambd = case["eta"], case["lambd"]

    xk = _layout(x, case["layout"]).requires_grad_(True)
    wk = weight.clone().requires_grad_(True)
    out = ops.ista_step(xk, wk, eta, lambd, backend=backend)
    dx, dw = torch.autograd.grad(out, (xk, wk), dout) if out.numel() else (torch.zeros_like(xk), None)
    assert out.shape == shape and torch.isfinite(out).all()
    if not out.numel():
        return

    x64, w64, dout64 = x.double(), weight.double(), dout.double()
    m64 = w64 - w64.t() @ w64
    pre = x64 + eta * x64 @ m64 - eta * lambd
    ambiguous = pre.abs() <= 1e-5 * pre.abs().max().clamp_min(1e-30) + 1e-6 * amplitude
    mask = out > 0
    assert torch.equal(mask[~ambiguous], (pre > 0)[~ambiguous]), case

    def grads64(mask):
        """float64 dx, dW of the step whose activation mask is ``mask``."""
        g = dout64 * mask
        dm = eta * x64.reshape(-1, d).t() @ g.reshape(-1, d)
        return g + eta * g @ m64.t(), dm - w64 @ (dm + dm.t())

    base_out, base_dx, base_dw = ista_math(x, weight, eta, lambd, dout, torch.float32)
    truth, base_truth = grads64(mask), grads64(base_out > 0)
    assert_close(out.detach(), torch.relu(pre), base_out, f"{case} out")
    for name, got, t, b, bt in zip(("dx", "dW"), (dx, dw), truth, (base_dx, base_dw), base_truth):
        assert_close(got, t, b.double() - bt + t, f"{case} {name}")  # the baseline's error against its own mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_are_bitwise_reproducible_under_deterministic_algorithms(backend):
    """With torch.use_deterministic_algorithms(True), two runs of forward and backward give the same bits."""
    torch.use_deterministic_algorithms(True)
    try:
        w = torch.randn(2, 3, 197, 48, device=DEVICE)
        x, weight = torch.randn(2, 197, 96, device=DEVICE), torch.randn(96, 96, device=DEVICE) * 0.1
        dout_w, dout_x = torch.randn_like(w), torch.randn_like(x)

        def run():
            wr = w.clone().requires_grad_(True)
            xr, weightr = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
            a = ops.mssa_attention(wr, backend=backend)
            b = ops.ista_step(xr, weightr, 0.1, 0.5, backend=backend)
            grads = torch.autograd.grad((a, b), (wr, xr, weightr), (dout_w, dout_x))
            return (a, b, *grads)

        for first, second in zip(run(), run()):
            assert torch.equal(first, second)
    finally:
        torch.use_deterministic_algorithms(False)
