"""Operator layer: the fused `torch` backend against float64 reference math, gradcheck, bad inputs."""
import pytest
import torch
from tolerance import assert_close, assert_ista_close, assert_mssa_close

from crate_kernels import ops
from crate_kernels.ops.ista import ISTAFunction, pack_mask, unpack_mask
from crate_kernels.ops.mssa import MSSAFunction


# ------------------------------------------------------------------ MSSA
@pytest.mark.parametrize("n", [1, 17, 50, 197])
@pytest.mark.parametrize("p", [48, 64])
def test_mssa_torch_matches_float64_reference(n, p):
    w = torch.randn(2, 3, n, p) * 1.5
    dout = torch.randn(2, 3, n, p)
    scale = p ** -0.5
    for backend in ("torch", "reference"):
        wt = w.clone().requires_grad_(True)
        out = ops.mssa_attention(wt, backend=backend)
        out.backward(dout)
        assert out.dtype == torch.float32 and out.shape == w.shape
        assert_mssa_close(w, dout, scale, out.detach(), wt.grad, name=backend)


@pytest.mark.parametrize("n,p", [(1, 48), (17, 64), (197, 64)])
def test_mssa_matmul_launchers_match_float64_reference(n, p):
    """The device-independent library path of the torch backend (CPU runs PyTorch's flash kernels first)."""
    from crate_kernels.ops.mssa.library import CANDIDATES

    forward, backward = CANDIDATES["mssa_forward"]["matmul"].fn, CANDIDATES["mssa_backward"]["matmul"].fn
    w, dout, scale = torch.randn(2, 3, n, p), torch.randn(2, 3, n, p), p ** -0.5
    out, lse = forward(w, scale)
    assert_mssa_close(w, dout, scale, out, backward(dout, w, out, lse, scale), lse)


def test_ops_follow_autocast_like_the_reference():
    w = torch.randn(2, 2, 9, 16, requires_grad=True)
    x, weight = torch.randn(9, 16, requires_grad=True), (0.2 * torch.randn(16, 16)).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = ops.mssa_attention(w, backend="torch")
        b = ops.ista_step(x, weight, backend="torch")
    assert a.dtype == b.dtype == torch.bfloat16
    # autocast hands the op bf16 x and W: float64 and bf16 math on those
    assert_ista_close(x.bfloat16(), weight.bfloat16(), 0.1, 0.5, torch.ones_like(x), out=b.detach())
    (a.float().sum() + b.float().sum()).backward()
    assert w.grad.dtype == x.grad.dtype == weight.grad.dtype == torch.float32


def test_mssa_noncontiguous_and_custom_scale():
    base = torch.randn(2, 19, 3, 32)  # (B, N, H, p) viewed as (B, H, N, p), as the model does
    w = base.transpose(1, 2).requires_grad_(True)
    assert not w.is_contiguous()
    dout = torch.randn(2, 3, 19, 32)
    out = ops.mssa_attention(w, scale=0.3, backend="torch")
    out.backward(dout)
    assert_mssa_close(w, dout, 0.3, out.detach(), w.grad)
    assert out.stride() == w.stride()  # output in the input's layout: the model's reshape is then a view


def test_mssa_gradcheck_float64():
    w = torch.randn(1, 2, 7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: MSSAFunction.apply(t, 0.4, "torch"), (w,))


def test_mssa_saves_no_square_matrix():
    n, p = 50, 16
    w = torch.randn(2, 2, n, p, requires_grad=True)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        ops.mssa_attention(w, backend="torch")
    assert shapes and all(s[-2:] != (n, n) for s in shapes), shapes


# ------------------------------------------------------------------ ISTA
@pytest.mark.parametrize("rows,d,lambd,eta",
                         [(1, 32, 0.5, 0.1), (17, 48, 0.1, 1.0), (197, 64, 0.0, 0.1), (50, 96, 0.5, 1.0)])
def test_ista_torch_matches_float64_reference(rows, d, lambd, eta):
    x = torch.randn(rows, d)
    weight = torch.empty(d, d)
    torch.nn.init.kaiming_uniform_(weight)
    dout = torch.randn(rows, d)
    xt, wt = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = ops.ista_step(xt, wt, eta, lambd, backend="torch")
    out.backward(dout)
    assert_ista_close(x, weight, eta, lambd, dout, out.detach(), xt.grad, wt.grad)


def test_ista_3d_noncontiguous_and_partial_grads():
    d = 40  # not a multiple of 8: exercises the padded bit mask
    x = torch.randn(4, 9, d).transpose(0, 1)
    weight = torch.randn(d, d) * 0.2
    dout = torch.randn(9, 4, d)
    xt = x.clone().requires_grad_(True)
    out = ops.ista_step(xt, weight, backend="torch")  # weight needs no grad
    out.backward(dout)
    assert out.shape == x.shape
    assert_ista_close(x, weight, 0.1, 0.5, dout, out.detach(), xt.grad)
    wt = weight.clone().requires_grad_(True)
    ops.ista_step(x, wt, backend="torch").backward(dout)  # x needs no grad
    assert_ista_close(x, weight, 0.1, 0.5, dout, dw=wt.grad)


def test_ista_gradcheck_float64():
    x = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    w = (0.3 * torch.randn(12, 12, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ISTAFunction.apply(a, b, 0.5, 0.1, "torch"), (x, w))


def test_pack_mask_round_trip():
    mask = torch.rand(13, 37) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (13, 5)
    assert torch.equal(unpack_mask(packed, 37), mask)
    assert packed[0, 0].item() == sum(int(mask[0, j]) << j for j in range(8))


def test_ista_saves_bits_not_a_full_mask():
    rows, d = 64, 32
    x = torch.randn(rows, d, requires_grad=True)
    w = torch.randn(d, d, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.ista_step(x, w, backend="torch")
    sizes = sorted(t.numel() * t.element_size() for t in saved)
    # x (rows*d*4), W and M (d*d*4 each), bits (rows*d/8)
    assert sizes == sorted([rows * d * 4, d * d * 4, d * d * 4, rows * d // 8])


# ------------------------------------------------------------------ torch.library and backends
def test_custom_ops_pass_opcheck():
    w = torch.randn(1, 2, 9, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.crate_kernels.mssa_forward.default, (w.detach(), 0.25, "torch"))
    out, lse = torch.ops.crate_kernels.mssa_forward(w.detach(), 0.25, "torch")
    torch.library.opcheck(
        torch.ops.crate_kernels.mssa_backward.default, (torch.randn_like(out), w.detach(), out, lse, 0.25, "torch")
    )
    x, m = torch.randn(10, 16), torch.randn(16, 16)
    torch.library.opcheck(torch.ops.crate_kernels.ista_forward.default, (x, m, 0.1, 0.5, "torch"))
    _, bits = torch.ops.crate_kernels.ista_forward(x, m, 0.1, 0.5, "torch")
    torch.library.opcheck(
        torch.ops.crate_kernels.ista_backward.default, (torch.randn_like(x), x, m, bits, 0.1, True, True, "torch")
    )


def test_compiled_call_matches_eager():
    w = torch.randn(2, 2, 11, 16)
    x, weight = torch.randn(5, 7, 16), torch.randn(16, 16) * 0.3

    def f(w, x, weight):
        return ops.mssa_attention(w, backend="torch").sum() + ops.ista_step(x, weight, backend="torch").sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(w, x, weight), f(w, x, weight))


def test_backend_selection(monkeypatch):
    w = torch.randn(1, 1, 4, 8)
    monkeypatch.delenv("CRATE_KERNELS_BACKEND", raising=False)
    assert ops.get_backend() == "auto"
    monkeypatch.setenv("CRATE_KERNELS_BACKEND", "reference")
    assert ops.get_backend() == "reference"
    ops.set_backend("torch")
    try:
        assert ops.get_backend() == "torch"
    finally:
        ops.set_backend(None)
    monkeypatch.setenv("CRATE_KERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="CRATE_KERNELS_BACKEND"):
        ops.mssa_attention(w)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.mssa_attention(w, backend="cudnn")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cuda' .* needs CUDA tensors") as info:
            ops.ista_step(torch.randn(3, 8), torch.randn(8, 8), backend="cuda")
        assert "TRITON_INTERPRET" not in str(info.value)  # the interpreter cannot run the CUDA backward either


# ------------------------------------------------------------------ bad inputs
def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"w must have shape \(B, H, N, p\)"):
        ops.mssa_attention(torch.randn(3, 5, 8))
    with pytest.raises(TypeError, match="floating-point"):
        ops.mssa_attention(torch.ones(1, 1, 3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="scale must be a positive"):
        ops.mssa_attention(torch.randn(1, 1, 3, 4), scale=-1.0)
    with pytest.raises(ValueError, match=r"weight must be a square \(d, d\) dictionary"):
        ops.ista_step(torch.randn(4, 8), torch.randn(8, 6))
    with pytest.raises(ValueError, match="d = 8"):
        ops.ista_step(torch.randn(4, 6), torch.randn(8, 8))
    with pytest.raises(ValueError, match="step_size must be positive"):
        ops.ista_step(torch.randn(4, 8), torch.randn(8, 8), step_size=0.0)


# ------------------------------------------------------------------ LayerNorm fused into the next product
def _layer_norm(d, dtype=torch.float32):
    norm = torch.nn.LayerNorm(d, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.3, 0.3)
    return norm


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_linear_matches_float64_and_saves_its_input(bias):
    from crate_kernels.ops.layer_norm_linear import layer_norm_linear

    d, out_features = 48, 40
    norm, linear = _layer_norm(d), torch.nn.Linear(d, out_features, bias=bias)
    x = (torch.randn(3, 17, d) * 2 + 1).requires_grad_(True)
    dout = torch.randn(3, 17, out_features)
    params = [x, norm.weight, norm.bias, linear.weight] + ([linear.bias] if bias else [])
    truth, base = ([p.detach().to(dtype).requires_grad_(True) for p in params] for dtype in (torch.float64,
                                                                                             torch.float32))
    ys = [torch.nn.functional.linear(torch.nn.functional.layer_norm(r[0], (d,), r[1], r[2], 1e-5), r[3],
                                     r[4] if bias else None) for r in (truth, base)]
    for y_ref in ys:
        y_ref.backward(dout.to(y_ref.dtype))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer_norm_linear(x, norm, linear.weight, linear.bias if bias else None)
    y.backward(dout)
    assert y.shape == (3, 17, out_features)
    assert_close(y.detach(), ys[0].detach(), ys[1].detach(), "y")
    for i, (p, t, b) in enumerate(zip(params, truth, base)):
        assert_close(p.grad, t.grad, b.grad, f"grad {i}")
    assert any(t.data_ptr() == x.data_ptr() for t in saved)  # LN's input is kept ...
    assert not any(t.shape[-1] == d and t.numel() == x.numel() and t.data_ptr() != x.data_ptr() for t in saved)


def test_layer_norm_linear_gradcheck_float64():
    from crate_kernels.ops.layer_norm_linear import LayerNormLinearFunction

    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    g = (1 + 0.1 * torch.randn(6, dtype=torch.float64)).requires_grad_(True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, dtype=torch.float64, requires_grad=True)
    fn = lambda x, g, b, a, c: LayerNormLinearFunction.apply(x, g, b, 1e-5, a, c, torch.float64)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, g, b, a, c))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_ista_with_fused_norm_matches_float64(backend):
    d = 64
    norm = _layer_norm(d)
    x = (torch.randn(2, 33, d) * 3).requires_grad_(True)
    weight = (0.15 * torch.randn(d, d)).requires_grad_(True)
    dout = torch.randn(2, 33, d)
    params = [x, weight, norm.weight, norm.bias]
    truth, base = ([p.detach().to(dtype).requires_grad_(True) for p in params] for dtype in (torch.float64,
                                                                                             torch.float32))
    refs = [ops.ista_reference(torch.nn.functional.layer_norm(r[0], (d,), r[2], r[3], 1e-5), r[1], 0.1, 0.5)
            for r in (truth, base)]
    for ref in refs:
        ref.backward(dout.to(ref.dtype))
    out = ops.ista_step(x, weight, backend=backend, norm=norm)
    out.backward(dout)
    assert_close(out.detach(), refs[0].detach(), refs[1].detach(), "out")
    for i, (p, t, b) in enumerate(zip(params, truth, base)):
        assert_close(p.grad, t.grad, b.grad, f"grad {i}")


def test_ista_with_fused_norm_under_autocast():
    d = 32
    norm = _layer_norm(d)
    x = torch.randn(20, d, requires_grad=True)
    weight = (0.2 * torch.randn(d, d)).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.ista_step(x, weight, backend="torch", norm=norm)
    assert out.dtype == torch.bfloat16
    # the op runs on bf16 W and the normalised x in bf16: float64 and bf16 math on those
    z = norm(x).detach().bfloat16()
    assert_ista_close(z, weight.bfloat16(), 0.1, 0.5, torch.ones_like(z), out=out.detach())
    out.float().sum().backward()
    assert x.grad.dtype == norm.weight.grad.dtype == weight.grad.dtype == torch.float32


def test_fp32_dot_precision_follows_torch_matmul_settings(monkeypatch):
    """Triton products of fp32 CUDA tensors use TF32 exactly where PyTorch's own matmuls may."""
    from types import SimpleNamespace

    from crate_kernels.ops.backend import fp32_dot_precision

    cuda_fp32 = SimpleNamespace(dtype=torch.float32, is_cuda=True)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert fp32_dot_precision(cuda_fp32) == "ieee"
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert fp32_dot_precision(cuda_fp32) == "tf32"
    assert fp32_dot_precision(SimpleNamespace(dtype=torch.bfloat16, is_cuda=True)) == "ieee"
    assert fp32_dot_precision(torch.ones(2)) == "ieee"  # CPU (the interpreter) is always exact

    def mixed_apis():
        raise RuntimeError("you have used mix of the legacy and new APIs to set the matmul precision")

    monkeypatch.setattr(torch, "get_float32_matmul_precision", mixed_apis)
    matmul = torch.backends.cuda.matmul  # a flag module: monkeypatch cannot restore its attributes
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert fp32_dot_precision(cuda_fp32) == "tf32"
        matmul.fp32_precision = "ieee"
        assert fp32_dot_precision(cuda_fp32) == "ieee"
    finally:
        matmul.fp32_precision = before



# ------------------------------------------------------------------ FLOP counting
def _counted_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_flop_counter_sees_mssa_model_work(backend):
    """FlopCounterMode (MFU tools) counts the fused ops as the reference's products: 4 B H N^2 p forward,
    twice that backward."""
    b, h, n, p = 2, 3, 17, 48
    w = torch.randn(b, h, n, p, requires_grad=True)
    assert _counted_flops(lambda: ops.mssa_attention(w, backend=backend).sum().backward()) == 12 * b * h * n * n * p


def test_flop_counter_sees_fused_ista_work():
    """Fused: x M forward, G M^T and x^T G backward (only where needed), plus M = W - W^T W and dW (2 d^3 each)."""
    rows, d = 11, 24
    x = torch.randn(rows, d, requires_grad=True)
    weight = torch.randn(d, d, requires_grad=True)
    token, cube = 2 * rows * d * d, 2 * d ** 3
    assert _counted_flops(lambda: ops.ista_step(x, weight, backend="torch").sum().backward()) == 3 * token + 2 * cube
    assert _counted_flops(lambda: ops.ista_step(x, weight, backend="reference").sum().backward()) == 9 * token
    frozen_x = x.detach()  # no dx: the backward runs x^T G alone
    counted = _counted_flops(lambda: ops.ista_step(frozen_x, weight, backend="torch").sum().backward())
    assert counted == 2 * token + 2 * cube


def test_without_triton_the_package_works_and_a_triton_backend_says_what_is_missing():
    """triton is optional (CUDA builds of torch bring it): without it the model runs on `auto`/`torch`, and an
    explicit Triton backend names the package."""
    import subprocess
    import sys

    code = """
import sys
sys.modules["triton"] = None  # as if it were not installed
import torch, crate_kernels
from crate_kernels import ops
model = crate_kernels.CRATEMAE(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
loss = model(torch.randn(2, 3, 16, 16))[0]
loss.backward()
assert torch.isfinite(loss)
try:
    ops.mssa_attention(torch.randn(1, 1, 4, 8), backend="triton")
except RuntimeError as e:
    print(e)
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "needs the 'triton' package, which is not installed" in result.stdout
    assert "pip install triton" in result.stdout


# ------------------------------------------------------------------ kernel variants, and no fallback
needs_triton = pytest.mark.skipif(not ops.kernel_variants()["mssa_forward"],
                                  reason="the triton package is not installed")
interpreter_warning = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@needs_triton
@interpreter_warning
def test_kernel_variants_are_listed_and_chosen_by_call_environment_or_default(monkeypatch):
    from crate_kernels.ops import backend

    variants = ops.kernel_variants()
    assert set(variants) == {"mssa_forward", "mssa_backward", "ista_forward", "ista_backward"}
    assert variants == {"mssa_forward": ["v1", "tail"], "mssa_backward": ["v1", "stacked", "symmetric"],
                        "ista_forward": ["v1"], "ista_backward": ["v1", "bytemask", "gstore"]}
    calls = []
    v1 = backend._variants["mssa_backward"]["v1"]
    monkeypatch.setitem(backend._variants["mssa_backward"], "probe", lambda *args: calls.append(1) or v1(*args))
    w = torch.randn(1, 2, 17, 32, requires_grad=True)
    ops.mssa_attention(w, backend="triton").sum().backward()
    assert calls == [] and ops.get_variant("mssa_backward") == "v1"
    monkeypatch.setenv("CRATE_KERNELS_VARIANTS", "mssa_backward=probe, ista_forward=v1")
    assert ops.get_variant("mssa_backward") == "probe"
    expected = w.grad.clone()
    w.grad = None
    ops.mssa_attention(w, backend="triton").sum().backward()
    assert calls == [1]
    torch.testing.assert_close(w.grad, expected)
    ops.set_variant("mssa_backward", "v1")  # a call beats the environment
    try:
        assert ops.get_variant("mssa_backward") == "v1"
    finally:
        ops.set_variant("mssa_backward", None)
    with pytest.raises(ValueError, match=r"mssa_backward variant must be one of \['v1', .*'probe'\], got 'nope'"):
        ops.set_variant("mssa_backward", "nope")
    with pytest.raises(ValueError, match="kind must be one of"):
        ops.set_variant("mssa", "v1")
    monkeypatch.setenv("CRATE_KERNELS_VARIANTS", "mssa_backward")
    with pytest.raises(ValueError, match=r"\$CRATE_KERNELS_VARIANTS must be kind=name pairs"):
        ops.get_variant("mssa_backward")


@needs_triton
@interpreter_warning
def test_a_failing_kernel_is_no_fallback_explicit_triton_raises_and_auto_never_runs_interpreted_kernels(monkeypatch):
    """Nothing falls back silently: an explicit ``triton`` whose kernel fails raises; ``auto`` on CPU measures only
    PyTorch's paths (the interpreter is a test tool, not a device), so a broken interpreted kernel never runs."""
    from crate_kernels.ops import backend, tuning

    ran = []

    def broken(*args):
        ran.append(1)
        raise RuntimeError("out of resources: shared memory, required 300000")

    monkeypatch.setitem(backend._variants["mssa_forward"], "v1", broken)
    monkeypatch.setitem(backend._candidates["mssa_forward"], "triton-v1",
                        backend.Entry(broken, backend._triton_supports, False))
    w = torch.randn(2, 3, 17, 32)
    with pytest.raises(RuntimeError, match="out of resources"):
        ops.mssa_attention(w, backend="triton")
    ran.clear()
    with tuning.fresh_memory():
        out = ops.mssa_attention(w, backend="auto")
        rows = {r["candidate"]: r for r in ops.tuning_table() if r["kind"] == "mssa_forward"}
    assert ran == []
    assert rows["triton-v1"]["status"] == "unsupported: Triton kernels need CUDA tensors, got device cpu"
    chosen = [name for name, row in rows.items() if row["chosen"]]  # the fastest of PyTorch's paths: timing decides
    assert len(chosen) == 1 and not chosen[0].startswith("triton") and rows[chosen[0]]["status"] == "ok", rows
    torch.testing.assert_close(out, ops.mssa_reference(w, 32 ** -0.5))


def test_deterministic_algorithms_take_the_first_autotune_config(monkeypatch):
    """A timed autotuning choice can differ between runs, and with it the order of the sums: under
    torch.use_deterministic_algorithms(True) the kernels take the first config the pruning kept."""
    from crate_kernels.ops import backend

    monkeypatch.setenv("CRATE_KERNELS_AUTOTUNE", "full")
    assert backend.autotune_space(["a", "b", "c"]) == ["a", "b", "c"]
    torch.use_deterministic_algorithms(True)
    try:
        assert backend.autotune_space(["a", "b", "c"]) == ["a"]
    finally:
        torch.use_deterministic_algorithms(False)
