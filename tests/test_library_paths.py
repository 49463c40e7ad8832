"""The library paths (ops/mssa/library.py, ops/ista/library.py): every candidate against float64 math.

CPU candidates run here; CUDA candidates run where a GPU is at hand, and on CPU they are checked for the aten ops
they call: run on meta tensors (the ops' shape functions), each call's arguments are bound against the installed
torch's schema, so a schema change shows without a GPU.
"""
import pytest
import torch
from tolerance import assert_close, mssa_cond
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from crate_kernels.ops.ista import library as ista_library
from crate_kernels.ops.ista.torch_impl import pack_mask, unpack_mask
from crate_kernels.ops.mssa import library as mssa_library
from crate_kernels.ops.mssa.torch_impl import mssa_reference

CUDA = torch.cuda.is_available()
MSSA_CPU = ("cpu-flash", "matmul")
MSSA_CUDA = ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient")
SDPA_OPS = {  # candidate: (forward op, backward op)
    "sdpa-flash": ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"),
    "sdpa-cudnn": ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward"),
    "sdpa-efficient": ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward"),
}


def assert_within(got, torch_same_dtype, exact, what: str, k: float = 2.0, cond: float = 1.0):
    """The repo's tolerance rule (tests/tolerance.py): err(got) <= k x err(PyTorch's own computation in the same
    dtype) + floor, both against float64."""
    assert_close(got, exact, torch_same_dtype, what, k, cond)


# ----------------------------------------------------------------------------------------------------------------
# MSSA
# ----------------------------------------------------------------------------------------------------------------
def mssa_exact(w: torch.Tensor, dout: torch.Tensor, scale: float):
    """out, lse and dw in float64 (the reference math), and out, lse, dw of the reference in w's dtype."""
    w64 = w.detach().double().requires_grad_()
    out64 = mssa_reference(w64, scale)
    (dw64,) = torch.autograd.grad(out64, w64, dout.double())
    lse64 = torch.logsumexp(w64.detach() @ w64.detach().transpose(-1, -2) * scale, dim=-1)
    wd = w.detach().clone().requires_grad_()
    out = mssa_reference(wd, scale)
    (dw,) = torch.autograd.grad(out, wd, dout)
    lse = torch.logsumexp(wd.detach() @ wd.detach().transpose(-1, -2) * scale, dim=-1)
    return (out64.detach(), lse64, dw64), (out.detach(), lse, dw)


def model_layout(b, h, n, p, dtype, device):
    """w (B, H, N, p) as the model makes it: a permuted view of (B, N, H, p), not contiguous."""
    return torch.randn(b, n, h, p, dtype=dtype, device=device).permute(0, 2, 1, 3)


def check_mssa(name: str, w: torch.Tensor, scale: float, k: float = 2.0):
    forward, backward = mssa_library.CANDIDATES["mssa_forward"][name], mssa_library.CANDIDATES["mssa_backward"][name]
    dout = torch.randn(w.shape, dtype=w.dtype, device=w.device)
    (out64, lse64, dw64), (out_t, lse_t, dw_t) = mssa_exact(w, dout, scale)
    assert forward.supports(w, scale) is None
    out, lse = forward.fn(w, scale)
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    assert out.dtype == w.dtype and lse.dtype == acc and lse.shape == w.shape[:3] and lse.is_contiguous()
    assert_within(out, out_t, out64, f"{name} out", k)
    assert_within(lse, lse_t, lse64, f"{name} lse", k)
    # The backward gets the state of another forward (the exact one, rounded to the saved dtypes): any forward's will do
    out_saved = torch.empty_like(w).copy_(out64)
    lse_saved = lse64.to(acc)
    assert backward.supports(dout, w, out_saved, lse_saved, scale) is None
    dw = backward.fn(dout, w, out_saved, lse_saved, scale)
    assert dw.dtype == w.dtype
    assert_within(dw, dw_t, dw64, f"{name} dw", k, mssa_cond(w, dout, scale))


@pytest.mark.parametrize("name", MSSA_CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [32, 48, 64])
@pytest.mark.parametrize("n", [1, 17, 50, 197])
def test_mssa_cpu_candidates(name, dtype, p, n):
    check_mssa(name, model_layout(2, 3, n, p, dtype, "cpu"), p ** -0.5)


@pytest.mark.parametrize("name", MSSA_CPU)
def test_mssa_cpu_candidates_strided_head_dim_and_fp64(name):
    w = torch.randn(2, 3, 48, 50).transpose(-1, -2)  # p's stride is not 1
    check_mssa(name, w, 0.3)
    check_mssa(name, model_layout(1, 2, 17, 32, torch.float64, "cpu"), 0.2)


@pytest.mark.parametrize("name", MSSA_CUDA)
def test_mssa_cuda_candidates_refuse_cpu_tensors(name):
    w = torch.randn(2, 3, 17, 64, dtype=torch.bfloat16)
    out, lse = torch.empty_like(w), torch.empty(2, 3, 17)
    for reason in (mssa_library.CANDIDATES["mssa_forward"][name].supports(w, 0.125),
                   mssa_library.CANDIDATES["mssa_backward"][name].supports(w, w, out, lse, 0.125)):
        assert isinstance(reason, str) and "CUDA" in reason and "cpu" in reason


def test_mssa_cpu_flash_refuses_other_devices_and_matmul_other_dtypes():
    with FakeTensorMode():
        w = torch.empty(2, 3, 17, 64, device="cuda", dtype=torch.bfloat16)
        assert "CPU" in mssa_library.CANDIDATES["mssa_forward"]["cpu-flash"].supports(w, 0.1)
    w = torch.zeros(1, 1, 3, 8, dtype=torch.int32)
    assert "int32" in mssa_library.CANDIDATES["mssa_forward"]["matmul"].supports(w, 0.1)


def test_mssa_cuda_candidates_name_dtype_and_head_dim_limits():
    """The reasons given before torch's own checks (which need a GPU), on fake CUDA tensors."""
    fwd = mssa_library.CANDIDATES["mssa_forward"]
    with FakeTensorMode():
        w64 = torch.empty(2, 3, 17, 64, device="cuda", dtype=torch.float64)
        w20 = torch.empty(2, 3, 17, 20, device="cuda", dtype=torch.bfloat16)
        one = torch.empty(2, 3, 1, 64, device="cuda", dtype=torch.bfloat16)
        wide = torch.empty(1, 1, 17, 512, device="cuda", dtype=torch.float16)
        for name in MSSA_CUDA:
            assert "float64" in fwd[name].supports(w64, 0.1)
            assert "multiple of 8" in fwd[name].supports(w20, 0.1)
        assert "float32" in fwd["sdpa-flash"].supports(w20.float(), 0.1)
        assert "multiple of 4" in fwd["sdpa-efficient"].supports(
            torch.empty(2, 3, 17, 18, device="cuda", dtype=torch.float32), 0.1)
        assert "length 1" in fwd["sdpa-cudnn"].supports(one, 0.1)
        assert "up to 256" in fwd["sdpa-flash"].supports(wide, 0.1)


class RecordCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def _fits(argument, value) -> bool:
    """Does ``value`` fit the schema argument's type? (None fits a Tensor: it passes an undefined tensor.)"""
    kind = str(argument.type)
    if kind.startswith("Optional["):
        return value is None or _fits_kind(kind[len("Optional["):-1], argument.N, value)
    return _fits_kind(kind, argument.N, value)


def _fits_kind(kind: str, size, value) -> bool:
    if kind == "Tensor":
        return value is None or isinstance(value, torch.Tensor)
    if kind == "List[bool]":  # bool[4]: size 4
        return isinstance(value, list) and all(type(v) is bool for v in value) and size in (None, len(value))
    return type(value) is {"float": float, "bool": bool, "int": int}[kind]


@pytest.mark.parametrize("name", MSSA_CUDA)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mssa_cuda_candidates_call_the_installed_schemas(name, dtype):
    """Run on meta tensors: the launchers call exactly the ops they name, with arguments that bind to the installed
    torch's schemas by name, count and type, and return the contract's shapes, dtypes and layout."""
    if dtype == torch.float32 and name != "sdpa-efficient":
        pytest.skip(f"{name} takes 16-bit dtypes only")
    for op in SDPA_OPS[name]:
        schema = getattr(torch.ops.aten, op).default._schema
        assert [a.name for a in schema.arguments] == list(mssa_library.ATEN_ARGUMENTS[op]), op
    w = torch.empty(2, 17, 3, 48, device="meta", dtype=dtype).permute(0, 2, 1, 3)
    with RecordCalls() as recorded:
        out, lse = mssa_library.CANDIDATES["mssa_forward"][name].fn(w, 0.125)
        dw = mssa_library.CANDIDATES["mssa_backward"][name].fn(torch.empty_like(out), w, out, lse, 0.125)
    assert out.shape == w.shape and out.dtype == dtype and dw.shape == w.shape and dw.dtype == dtype
    assert lse.shape == (2, 3, 17) and lse.dtype == torch.float32 and lse.is_contiguous()
    called = {}
    for func, args, kwargs in recorded.calls:
        if func._schema.name.removeprefix("aten::") in SDPA_OPS[name]:
            called[func._schema.name.removeprefix("aten::")] = (func._schema, args, kwargs)
    assert set(called) == set(SDPA_OPS[name])
    for op, (schema, args, kwargs) in called.items():
        arguments = schema.arguments
        positional = [a for a in arguments if not a.kwarg_only]
        assert len(args) <= len(positional), op
        assert set(kwargs) <= {a.name for a in arguments}, op
        given = dict(zip((a.name for a in positional), args)) | kwargs
        for argument in arguments:
            if argument.name in given:
                assert _fits(argument, given[argument.name]), (op, argument.name, type(given[argument.name]))
            else:
                assert argument.has_default_value(), (op, argument.name)
        # Neither dropout nor a causal mask, and the scale as given
        assert given.get("dropout_p", 0.0) == 0.0 and not given.get("is_causal", False)
        assert given["scale"] == 0.125
        # Dense inputs: no cumulative sequence lengths (defined ones select the variable-length kernels)
        assert given.get("cum_seq_q") is None and given.get("cum_seq_k") is None


def test_mssa_schema_check_names_a_missing_op_or_changed_arguments(monkeypatch):
    """What ``supports`` says on a torch without an op, or whose op takes other arguments than the launcher passes."""
    check = mssa_library._schema_problem.__wrapped__
    monkeypatch.setitem(mssa_library.ATEN_ARGUMENTS, "_no_such_attention", ("query",))
    assert f"torch {torch.__version__} has no aten::_no_such_attention" == check("_no_such_attention")
    op = "_scaled_dot_product_flash_attention"
    monkeypatch.setitem(mssa_library.ATEN_ARGUMENTS, op, (*mssa_library.ATEN_ARGUMENTS[op], "window_size"))
    assert "window_size" in check(op)
    assert all(check(name) is None for name in mssa_library.ATEN_ARGUMENTS if name != op and "no_such" not in name)


def test_mssa_efficient_lse_padding_round_trip():
    lse = torch.randn(2, 3, 50)
    padded = mssa_library._efficient_lse(lse)
    assert padded.shape == (2, 3, 64) and torch.equal(padded[..., :50], lse)
    assert torch.isinf(padded[..., 50:]).all() and (padded[..., 50:] > 0).all()
    exact = torch.randn(2, 3, 64)
    assert mssa_library._efficient_lse(exact).data_ptr() == exact.data_ptr()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name", (*MSSA_CUDA, "matmul"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n, p", [(1, 64), (17, 48), (197, 64), (50, 32)])
def test_mssa_cuda_candidates(name, dtype, n, p):
    w = model_layout(2, 3, n, p, dtype, "cuda")
    reason = mssa_library.CANDIDATES["mssa_forward"][name].supports(w, p ** -0.5)
    capability = torch.cuda.get_device_capability()
    must_run = name in ("sdpa-efficient", "matmul") or (name == "sdpa-flash" and dtype != torch.float32)
    if reason is not None and not (must_run and capability >= (8, 0)):
        pytest.skip(reason)
    assert reason is None, reason
    check_mssa(name, w, p ** -0.5, k=3.0)


# ----------------------------------------------------------------------------------------------------------------
# ISTA
# ----------------------------------------------------------------------------------------------------------------
def ista_inputs(rows, d, dtype, device, transposed=False):
    x = torch.randn(d, rows, dtype=dtype, device=device).t() if transposed else torch.randn(
        rows, d, dtype=dtype, device=device)
    weight = torch.randn(d, d, dtype=torch.float64, device=device) / d ** 0.5
    m = weight - weight.t() @ weight
    return x, m.to(torch.float64 if dtype == torch.float64 else torch.float32)


def check_ista(name, x, m, step_size=0.1, lambd=0.1, k=2.0):
    forward, backward = ista_library.CANDIDATES["ista_forward"][name], ista_library.CANDIDATES["ista_backward"][name]
    rows, d = x.shape
    x64, m64 = x.double(), m.double()
    pre64 = x64 + step_size * (x64 @ m64) - step_size * lambd
    mask64 = pre64 > 0
    pre_t = (x + step_size * (x @ m.to(x.dtype)) - step_size * lambd)
    assert forward.supports(x, m, step_size, lambd) is None
    out, packed = forward.fn(x, m, step_size, lambd)
    assert out.dtype == x.dtype and packed.dtype == torch.uint8 and packed.shape == (rows, (d + 7) // 8)
    assert torch.equal(unpack_mask(packed, d), out > 0)
    assert_within(out, pre_t.clamp(min=0), pre64.clamp(min=0), f"{name} out", k)
    # backward from the exact mask
    dout = torch.randn(rows, d, dtype=x.dtype, device=x.device)
    packed64 = pack_mask(mask64)
    g64 = dout.double() * mask64
    g_t = dout * mask64
    assert backward.supports(dout, x, m, packed64, step_size, True, True) is None
    dx, dm = backward.fn(dout, x, m, packed64, step_size, True, True)
    assert dx.dtype == x.dtype and dm.dtype == m.dtype
    assert_within(dx, g_t + step_size * (g_t @ m.to(x.dtype).t()), g64 + step_size * (g64 @ m64.t()), f"{name} dx", k)
    assert_within(dm, step_size * (x.t() @ g_t), step_size * (x64.t() @ g64), f"{name} dM", k)
    assert backward.fn(dout, x, m, packed64, step_size, False, True)[0] is None
    assert backward.fn(dout, x, m, packed64, step_size, True, False)[1] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, d", [(1, 32), (37, 48), (394, 64), (50, 20)])
def test_ista_matmul_cpu(dtype, rows, d):
    check_ista("matmul", *ista_inputs(rows, d, dtype, "cpu"))


def test_ista_matmul_cpu_transposed_rows_and_fp64():
    check_ista("matmul", *ista_inputs(33, 24, torch.float32, "cpu", transposed=True))
    check_ista("matmul", *ista_inputs(17, 16, torch.float64, "cpu"))


def test_ista_candidates_refuse_the_other_device():
    x, m = ista_inputs(4, 8, torch.float32, "cpu")
    reason = ista_library.CANDIDATES["ista_forward"]["cublas"].supports(x, m, 0.1, 0.1)
    assert "CUDA" in reason and "cpu" in reason
    reason = ista_library.CANDIDATES["ista_backward"]["cublas"].supports(x, x, m, pack_mask(x > 0), 0.1, True, True)
    assert "CUDA" in reason and "cpu" in reason
    with FakeTensorMode():
        xc = torch.empty(4, 8, device="cuda")
        assert "cuda" in ista_library.CANDIDATES["ista_forward"]["matmul"].supports(xc, xc, 0.1, 0.1)
    xi = torch.zeros(4, 8, dtype=torch.int64)
    assert "int64" in ista_library.CANDIDATES["ista_forward"]["matmul"].supports(xi, m, 0.1, 0.1)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows, d", [(1, 32), (394, 64), (50, 20), (4096, 384)])
def test_ista_cublas_cuda(dtype, rows, d):
    check_ista("cublas", *ista_inputs(rows, d, dtype, "cuda"), k=3.0)
