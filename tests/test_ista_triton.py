"""ISTA on backend `triton` against float64 reference math (kernels run under TRITON_INTERPRET=1 on CPU).

Entries whose float64 pre-activation lies within MARGIN of the threshold may fall either side in
fp32, so mask checks accept either value there (and inputs built to crowd the threshold keep clear of it).
"""
import copy

import pytest
import torch
from tolerance import assert_close, assert_ista_close, ista_math, rel_err
from triton_launches import triton_launches

import crate_kernels
from crate_kernels import ops
from crate_kernels.ops import ista
from crate_kernels.ops.backend import launcher
from crate_kernels.ops.ista import pack_mask, unpack_mask

triton_common = pytest.importorskip("crate_kernels.ops.ista.triton_common",
                                    reason="the triton package is not installed")
triton_v1 = pytest.importorskip("crate_kernels.ops.ista.triton_v1")
ista_variants = pytest.importorskip("crate_kernels.ops.ista.triton_variants")
pytestmark = [
    # Triton 3.6's interpreter turns 1-element arrays into loop bounds (numpy < 2.4 only warns about it).
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
MARGIN = 1e-5
BACKWARD_VARIANTS = ops.kernel_variants()["ista_backward"]


def _variant_param(name, on_cuda=False):
    skip = CUDA and not on_cuda and name != "v1"
    return pytest.param(name, marks=pytest.mark.skipif(
        skip, reason="on CUDA the variants run test_variants_*_cuda (GPU time is short)"))


@pytest.fixture(params=[_variant_param(name) for name in BACKWARD_VARIANTS])
def variant(request):
    """The ista_backward variant, chosen for the test's duration (the forward has v1 only)."""
    ops.set_variant("ista_backward", request.param)
    yield request.param
    ops.set_variant("ista_backward", None)


@pytest.fixture(params=[_variant_param(name, on_cuda=True) for name in BACKWARD_VARIANTS if name != "v1"])
def other_variant(request):
    ops.set_variant("ista_backward", request.param)
    yield request.param
    ops.set_variant("ista_backward", None)


def dictionary(d: int, dtype=torch.float32) -> torch.Tensor:
    weight = torch.empty(d, d, device=DEVICE)
    torch.nn.init.kaiming_uniform_(weight)
    return weight.to(dtype)


def preactivation64(x, weight, eta, lambd):
    """x + eta x M - eta lambda in float64, as (rows, d)."""
    x64, w64 = x.detach().double().reshape(-1, x.shape[-1]), weight.detach().double()
    return x64 + eta * x64 @ (w64 - w64.t() @ w64) - eta * lambd


def assert_mask_matches(packed: torch.Tensor, pre64: torch.Tensor):
    """packed == pack_mask(pre64 > 0), where entries within MARGIN of zero may take either value."""
    d = pre64.shape[1]
    assert packed.dtype == torch.uint8 and packed.shape == (pre64.shape[0], (d + 7) // 8)
    got = unpack_mask(packed, d)
    expected = torch.where(pre64.abs() <= MARGIN, got, pre64 > 0)
    assert torch.equal(packed, pack_mask(expected))


def run_triton(x, weight, eta, lambd, dout):
    """ista_step on backend 'triton': out, dx, dW and the packed mask the forward saved."""
    xt = x.detach().clone().requires_grad_(True)
    wt = weight.detach().clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ops.ista_step(xt, wt, eta, lambd, backend="triton")
    out.backward(dout)
    (packed,) = [t for t in saved if t.dtype == torch.uint8]
    return out.detach(), xt.grad, wt.grad, packed


def check_against_reference(x, weight, eta, lambd, dout):
    """out, dx, dW against float64 math (tolerance.assert_ista_close) and the saved mask against float64's."""
    out, dx, dw, packed = run_triton(x, weight, eta, lambd, dout)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_ista_close(x, weight, eta, lambd, dout, out, dx, dw)
    pre = preactivation64(x, weight, eta, lambd)
    assert_mask_matches(packed, pre)
    return pre


@pytest.mark.parametrize(
    "rows,d,lambd,eta",
    [(1, 32, 0.5, 0.1), (7, 48, 0.1, 1.0), (197, 64, 0.5, 0.1), (394, 96, 0.0, 0.1),
     (197, 96, 0.1, 1.0), (394, 32, 0.5, 1.0), (7, 64, 0.0, 1.0), (13, 20, 0.1, 0.1), (5, 8, 0.1, 1.0),
     (0, 32, 0.5, 0.1)],
)
def test_triton_matches_float64_reference(rows, d, lambd, eta, variant):
    x = torch.randn(rows, d, device=DEVICE)
    check_against_reference(x, dictionary(d), eta, lambd, torch.randn(rows, d, device=DEVICE))


@pytest.mark.parametrize("rows,d,lambd", [(197, 64, 0.5), (394, 48, 0.1)])
def test_triton_near_threshold(rows, d, lambd, variant):
    """x solves x (I + eta M) = p + eta lambda for targets p, two thirds of them +-[2e-4, 2e-3], the others N(0, 1)
    kept at least 2e-3 from zero."""
    eta = 0.1
    weight = dictionary(d)
    w64 = weight.double()
    m64 = w64 - w64.t() @ w64
    target = torch.randn(rows, d, device=DEVICE, dtype=torch.float64)
    target = torch.where(target < 0, -1.0, 1.0) * target.abs().clamp_min(2e-3)
    near = torch.rand(rows, d, device=DEVICE) < 2 / 3
    small = torch.empty_like(target).uniform_(2e-4, 2e-3) * torch.randn_like(target).sign()
    target = torch.where(near, small, target)
    eye = torch.eye(d, device=DEVICE, dtype=torch.float64)
    x = torch.linalg.solve(eye + eta * m64, target + eta * lambd, left=False).float()
    pre = check_against_reference(x, weight, eta, lambd, torch.randn(rows, d, device=DEVICE))
    assert (pre.abs() < 3e-3).float().mean() > 0.5  # the construction did crowd the threshold
    assert (pre.abs() <= MARGIN).sum() == 0  # ... without leaving entries the mask check would skip


def test_triton_3d_noncontiguous_and_partial_grads(variant):
    d = 48
    x = torch.randn(4, 9, d, device=DEVICE).transpose(0, 1)
    assert not x.is_contiguous()
    weight = dictionary(d)
    dout = torch.randn(9, 4, d, device=DEVICE)
    xt = x.clone().requires_grad_(True)
    out = ops.ista_step(xt, weight, backend="triton")  # weight needs no grad: dx only
    out.backward(dout)
    assert out.shape == x.shape
    assert_ista_close(x, weight, 0.1, 0.5, dout, out.detach(), xt.grad)
    wt = weight.clone().requires_grad_(True)
    ops.ista_step(x, wt, backend="triton").backward(dout)  # x needs no grad: dM only
    assert_ista_close(x, weight, 0.1, 0.5, dout, dw=wt.grad)


def test_triton_launchers_read_strides(variant):
    """The custom ops on strided x, dOut and M against float64 math, within tolerance.assert_close of the torch
    launchers on contiguous copies."""
    rows, d = 70, 64
    x = torch.randn(rows, 2 * d, device=DEVICE)[:, ::2]
    dout = torch.randn(d, rows, device=DEVICE).t()
    m = (0.1 * torch.randn(d, d, device=DEVICE)).t()
    assert not (x.is_contiguous() or dout.is_contiguous() or m.is_contiguous())
    out, packed = torch.ops.crate_kernels.ista_forward(x, m, 0.5, 0.1, "triton")
    ref_out, ref_packed = launcher("ista_forward", "torch")(x.contiguous(), m.contiguous(), 0.5, 0.1)
    pre64 = x.double() + 0.5 * x.double() @ m.double() - 0.05
    assert_close(out, pre64.relu(), ref_out, "out")
    assert_mask_matches(packed, pre64)
    dx, dm = torch.ops.crate_kernels.ista_backward(dout, x, m, packed, 0.5, True, True, "triton")
    ref_dx, ref_dm = launcher("ista_backward", "torch")(dout.contiguous(), x.contiguous(), m.contiguous(), packed,
                                                         0.5, True, True)
    g64 = dout.double() * unpack_mask(packed, d)
    assert_close(dx, g64 + 0.5 * g64 @ m.double().t(), ref_dx, "dx")
    assert_close(dm, 0.5 * x.double().t() @ g64, ref_dm, "dM")


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty / torch.empty_like return NaN (floats) or 0xA5 bytes: every output element must be written."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan") if t.is_floating_point() else 0xA5)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@pytest.mark.parametrize("rows,d", [(197, 48), (394, 20)])
def test_triton_writes_every_output(poisoned_empty, rows, d, variant):
    assert torch.empty(2).isnan().all()
    x, dout = torch.randn(rows, d, device=DEVICE), torch.randn(rows, d, device=DEVICE)
    check_against_reference(x, dictionary(d), 0.1, 0.5, dout)


def test_triton_custom_ops_pass_opcheck(variant):
    x, m = torch.randn(10, 32, device=DEVICE), 0.2 * torch.randn(32, 32, device=DEVICE)
    torch.library.opcheck(torch.ops.crate_kernels.ista_forward.default, (x, m, 0.1, 0.5, "triton"))
    _, bits = torch.ops.crate_kernels.ista_forward(x, m, 0.1, 0.5, "triton")
    dout = torch.randn_like(x)
    for need_dx, need_dm in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(
            torch.ops.crate_kernels.ista_backward.default, (dout, x, m, bits, 0.1, need_dx, need_dm, "triton")
        )


def test_triton_rejects_unsupported_dtype():
    x = torch.randn(4, 16, device=DEVICE, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        ops.ista_step(x, torch.randn(16, 16, device=DEVICE, dtype=torch.float64), backend="triton")


def test_crate_mae_with_triton_ista_matches_reference():
    """A CRATE-MAE with ISTA on 'triton' against the same model in float64 on 'reference': loss, prediction and
    every gradient within tolerance.assert_close of the fp32 model on 'reference'."""
    model = crate_kernels.CRATEMAE(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2).to(DEVICE)
    fused, model64 = copy.deepcopy(model), copy.deepcopy(model).double()
    for net, backend in ((fused, "triton"), (model, "reference"), (model64, "reference")):
        for m in net.modules():
            if isinstance(m, crate_kernels.models.crate.ISTA):
                m.set_backend(backend)
    imgs = torch.randn(3, 3, 32, 32, device=DEVICE)
    noise = torch.rand(3, 16, device=DEVICE)
    ref_loss, ref_pred, ref_mask = model(imgs, noise=noise)
    loss, pred, mask = fused(imgs, noise=noise)
    loss64, pred64, _ = model64(imgs.double(), noise=noise)
    for t in (ref_loss, loss, loss64):
        t.backward()
    assert torch.equal(mask, ref_mask)
    assert_close(loss.detach(), loss64.detach(), ref_loss.detach(), "loss")
    assert_close(pred.detach(), pred64.detach(), ref_pred.detach(), "pred")
    ref_grads, grads64 = dict(model.named_parameters()), dict(model64.named_parameters())
    for name, p in fused.named_parameters():
        ref = ref_grads[name].grad
        assert (p.grad is None) == (ref is None), name
        if ref is not None:
            assert_close(p.grad, grads64[name].grad, ref, name)


@pytest.mark.skipif(not CUDA, reason="bf16/fp16 kernels run on a GPU only (the interpreter does not do bf16)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,d", [(394, 384), (197, 576), (1000, 768)])
def test_triton_low_precision_error_within_twice_reference(dtype, rows, d):
    """Errors against float64 math on the same (rounded) inputs: tolerance.assert_close of the reference math's in
    dtype."""
    x = torch.randn(rows, d, device=DEVICE, dtype=dtype)
    weight = dictionary(d, dtype)
    dout = torch.randn(rows, d, device=DEVICE, dtype=dtype)
    got = run_triton(x, weight, 0.1, 0.5, dout)[:3]
    assert all(g.dtype == dtype for g in got)
    assert_ista_close(x, weight, 0.1, 0.5, dout, *got)


@pytest.mark.skipif(not CUDA, reason="bf16 kernels run on a GPU only")
@pytest.mark.parametrize("rows,d", [(394, 576), (1000, 768)])
def test_variants_low_precision_cuda(rows, d, other_variant):
    """Each backward variant in bf16: errors at most twice the reference math's in bf16."""
    test_triton_low_precision_error_within_twice_reference(torch.bfloat16, rows, d)


@pytest.mark.skipif(CUDA, reason="interpreter: every tile of the variants in fp32 (a GPU tunes among them)")
@pytest.mark.parametrize("name", ["ista_dx_bytemask", "ista_dm_bytemask"])
@pytest.mark.parametrize("tile", ista_variants._TILES + ista_variants._EXACT_FP32_TILES, ids=lambda v: str(v))
def test_variant_tiles(monkeypatch, name, tile):
    """Each variant kernel with each of its tiles forced (130 rows x d = 72: partial tiles on every side)."""
    import triton

    block_m, block_n, block_k, warps, stages = tile
    monkeypatch.setattr(ista_variants.TRITON_KERNELS[name], "configs", [triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)])
    ops.set_variant("ista_backward", "bytemask")
    try:
        x = torch.randn(130, 72)
        check_against_reference(x, dictionary(72), 0.1, 0.5, torch.randn_like(x))
    finally:
        ops.set_variant("ista_backward", None)


def test_dictionary_matrix_fp32_under_autocast():
    """M = W - W^T W (and dW) in fp32 under autocast, which would otherwise run W^T W in bf16."""
    weight = dictionary(64)
    grad_m = torch.randn(64, 64, device=DEVICE)
    exact = ista.dictionary_matrix(weight), ista.dictionary_grad(weight, grad_m)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        under = ista.dictionary_matrix(weight), ista.dictionary_grad(weight, grad_m)
    for a, b in zip(under, exact):
        assert a.dtype == torch.float32 and torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------------
# limits: grids, 32-bit offsets, empty inputs (each works or raises before launching)
# ------------------------------------------------------------------------------------------------------------
def _run_every_variant(x, m):
    _, packed = launcher("ista_forward", "triton")(x, m, 0.1, 0.5)
    for name in BACKWARD_VARIANTS:
        ops.set_variant("ista_backward", name)
        try:
            launcher("ista_backward", "triton")(x, x, m, packed, 0.1, True, True)
        finally:
            ops.set_variant("ista_backward", None)


def test_grids_and_past_2_31_elements_launch():
    """x of 2.8M rows x 768 (past 2^31 elements; meta tensors, nothing allocated): every kernel of every variant
    launches a 1-D grid of row x column tiles (dM: tiles x row chunks, the chunks few); row offsets are 64-bit
    (tests/test_aot_compile.py checks the kernels' IR)."""
    x, m = torch.empty(2_800_000, 768, device="meta", dtype=torch.bfloat16), torch.empty(768, 768, device="meta")
    assert x.numel() > 2 ** 31
    launches = triton_launches(lambda: _run_every_variant(x, m))
    assert {name for name, _ in launches} == set(triton_v1.TRITON_KERNELS) | set(ista_variants.TRITON_KERNELS)
    for name, grid in launches:
        assert 0 < grid[0] < 2 ** 31 and all(0 < g < 65536 for g in grid[1:]), (name, grid)


@pytest.mark.parametrize("name", BACKWARD_VARIANTS)
def test_limits_raise_before_launching(name):
    """d past 46,340 (M's offsets are int32) raises a ValueError naming the limit before any launch."""
    x, m = torch.empty(4, 46341, device="meta"), torch.empty(46341, 46341, device="meta")
    with pytest.raises(ValueError, match="d must be at most 46340"):
        triton_launches(lambda: launcher("ista_forward", "triton")(x, m, 0.1, 0.5))
    ops.set_variant("ista_backward", name)
    try:
        with pytest.raises(ValueError, match="d must be at most 46340"):
            triton_launches(lambda: launcher("ista_backward", "triton")(x, x, m, torch.empty(4, 5793, dtype=torch.uint8,
                                                                                   device="meta"), 0.1, True, True))
    finally:
        ops.set_variant("ista_backward", None)


@pytest.mark.parametrize("rows, d", [(0, 32), (5, 0), (0, 0)])
def test_empty_inputs(rows, d, variant):
    """No rows, or d = 0: empty outputs, dW of zeros where it has elements; nothing launched on nothing."""
    x = torch.randn(rows, d, device=DEVICE, requires_grad=True)
    weight = dictionary(d).requires_grad_(True) if d else torch.empty(0, 0, device=DEVICE, requires_grad=True)
    out = ops.ista_step(x, weight, backend="triton")
    out.sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape and weight.grad.shape == (d, d)
    assert not weight.grad.any()


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name", BACKWARD_VARIANTS)
def test_past_2_31_elements_cuda(name):
    """bf16 x of 2.8M rows x 768 (past 2^31 elements, ~4.3 GB per tensor): the last rows of out and dx against
    float64 math on them (rows are independent), dW against the same products in fp32."""
    rows, d = 2_800_000, 768
    x = torch.randn(rows, d, device=DEVICE, dtype=torch.bfloat16)
    weight = dictionary(d, torch.bfloat16)
    dout = torch.randn_like(x)
    ops.set_variant("ista_backward", name)
    try:
        out, dx, dw, packed = run_triton(x, weight, 0.1, 0.5, dout)
    finally:
        ops.set_variant("ista_backward", None)
    tail = slice(rows - 1000, rows)
    assert_ista_close(x[tail], weight, 0.1, 0.5, dout[tail], out[tail], dx[tail])
    g = dout * unpack_mask(packed, d)
    dm = 0.1 * torch.mm(x.t().float(), g.float())  # PyTorch's products (fp32 accumulation), as bf16 dW
    dm64 = sum(0.1 * x[i:i + 100_000].t().double() @ g[i:i + 100_000].double() for i in range(0, rows, 100_000))
    w64 = weight.double()
    assert_close(dw, dm64 - w64 @ (dm64 + dm64.t()), ista.dictionary_grad(weight, dm).to(dw.dtype), "dW")


@pytest.mark.skipif(not CUDA, reason="TF32 exists on CUDA only")
def test_triton_fp32_follows_tf32_setting():
    """With TF32 allowed for PyTorch's matmuls the kernels use it too: errors at most ~2x those of the reference
    math under the same setting (TF32 also flips activations that sit within its rounding of the threshold),
    and dW's clearly above exact fp32's (~1e-7)."""
    x = torch.randn(1000, 384, device=DEVICE)
    weight = dictionary(384)
    dout = torch.randn_like(x)
    ref = ista_math(x, weight, 0.1, 0.5, dout, torch.float64)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        got = run_triton(x, weight, 0.1, 0.5, dout)[:3]
        ref_tf32 = ista_math(x, weight, 0.1, 0.5, dout, torch.float32)
    finally:
        torch.set_float32_matmul_precision(before)
    for name, g, t, r in zip(("out", "dx", "dW"), got, ref, ref_tf32):
        assert_close(g, t, r, name)
    assert rel_err(got[2], ref[2]) > 1e-5, "dW as exact as fp32: TF32 was not used"


@pytest.mark.parametrize("mode", ["full", "first"])
def test_autotune_pruning(monkeypatch, mode):
    """bf16/fp16: every tensor-core tile; TF32: those whose pipelined tiles fit Hopper's shared memory; exact fp32:
    the FMA tiles; in autotune mode 'first' only the first (crate_kernels.ops.aot checks it fits sm_90 and sm_80)."""
    import triton

    monkeypatch.setenv("CRATE_KERNELS_AUTOTUNE", mode)
    space = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
             for m, n, k, w, s in triton_v1._TILES + triton_v1._EXACT_FP32_TILES]

    def pruned(dtype, precision):
        prune = triton_v1._AUTOTUNE["prune_configs_by"]["early_config_prune"]
        kept = prune(space, {"x_ptr": torch.empty(1, dtype=dtype)}, PRECISION=precision)
        return [triton_common.tile_of(c) for c in kept]

    def expect(tiles):
        return list(tiles)[:1] if mode == "first" else list(tiles)

    assert pruned(torch.bfloat16, "ieee") == pruned(torch.float16, "ieee") == expect(triton_v1._TILES)
    assert pruned(torch.float32, "ieee") == expect(triton_v1._EXACT_FP32_TILES)
    tf32 = pruned(torch.float32, "tf32")
    assert tf32 == expect(t for t in triton_v1._TILES if t not in ((128, 256, 64, 8, 3), (128, 128, 64, 4, 4)))
    assert tf32[0] == (128, 128, 64, 8, 3)
