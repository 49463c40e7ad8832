"""Property-based tests of the public operators on every backend this machine runs (hypothesis).

`mssa_attention` and `ista_step` against float64 reference math over random shapes (batch, heads, N up to 300,
head dims and widths that are not powers of two), strided and transposed views, input scales over several
decades, and step sizes / thresholds over their ranges: outputs and every gradient. Triton runs through its
interpreter on CPU (float32). Each example draws a seed for its tensors, so a failure prints the seed with the
shape (hypothesis's falsifying example, plus the blob to replay it).
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crate_kernels import ops
from crate_kernels.ops.backend import launcher_backends

BACKENDS = ["reference", "torch"] + (["triton"] if "triton" in launcher_backends("mssa_forward") else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXAMPLES = settings(max_examples=12, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _tolerance(backend: str) -> float:
    # float32 kernels against float64: ~1e-6 typical; a tiny N x N softmax or a huge input scale costs a little
    return 2e-5 if backend != "reference" else 1e-6


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
    w = (torch.randn(shape, generator=gen, dtype=torch.float64) * amplitude).to(DEVICE)
    dout = torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE)
    w64 = w.clone().requires_grad_(True)
    ref = ops.mssa_reference(w64, case["p"] ** -0.5)
    (ref_dw,) = torch.autograd.grad(ref, w64, dout)
    x = _layout(w.float(), case["layout"]).requires_grad_(True)
    out = ops.mssa_attention(x, backend=backend)
    (dw,) = torch.autograd.grad(out, x, dout.float())
    assert out.shape == shape and torch.isfinite(out).all() and torch.isfinite(dw).all()
    tol = _tolerance(backend)
    assert rel_err(out, ref.detach()) < tol, (case, rel_err(out, ref.detach()))
    assert rel_err(dw, ref_dw) < tol * 5, (case, rel_err(dw, ref_dw))


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
    it chose."""
    gen = torch.Generator().manual_seed(case["seed"])
    rows = case["rows"] if backend != "triton" else min(case["rows"], 200)
    shape, d = (*case["lead"], rows, case["d"]), case["d"]
    amplitude = 10.0 ** case["scale_exp"]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * amplitude).to(DEVICE)
    weight = (torch.rand(d, d, generator=gen, dtype=torch.float64) * 2 - 1).mul_((6 / d) ** 0.5).to(DEVICE)
    dout = torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE)
    eta, lambd = case["eta"], case["lambd"]

    xk = _layout(x.float(), case["layout"]).requires_grad_(True)
    wk = weight.float().requires_grad_(True)
    out = ops.ista_step(xk, wk, eta, lambd, backend=backend)
    dx, dw = torch.autograd.grad(out, (xk, wk), dout.float()) if out.numel() else (torch.zeros_like(xk), None)
    assert out.shape == shape and torch.isfinite(out).all()
    if not out.numel():
        return

    m64 = weight - weight.t() @ weight
    pre = x + eta * x @ m64 - eta * lambd
    ambiguous = pre.abs() <= 1e-5 * pre.abs().max().clamp_min(1e-30) + 1e-6 * amplitude
    mask = out.double() > 0
    assert torch.equal(mask[~ambiguous], (pre > 0)[~ambiguous]), case
    ref_out = torch.relu(pre)
    g = dout * mask
    ref_dx = g + eta * g @ m64.t()
    dm = eta * x.reshape(-1, d).t() @ g.reshape(-1, d)
    ref_dw = dm - weight @ (dm + dm.t())
    tol = _tolerance(backend)
    # the output's error against the size of the terms it sums (x, eta x M, eta lambda): an output just above the
    # threshold is a small difference of larger float32 terms, and no float32 order of summation does better
    terms = (x.abs() + eta * (x @ m64).abs() + eta * lambd) * mask
    out_err = ((out.double() - ref_out).norm() / terms.norm().clamp_min(1e-300)).item()
    assert out_err < tol, (case, out_err)
    assert rel_err(dx, ref_dx) < tol * 5, (case, rel_err(dx, ref_dx))
    assert rel_err(dw, ref_dw) < tol * 5, (case, rel_err(dw, ref_dw))


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
