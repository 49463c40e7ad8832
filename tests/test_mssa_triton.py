"""MSSA backend 'triton' against float64 reference math (TRITON_INTERPRET=1 on CPU, fp32; bf16/fp16 on CUDA).

Every kernel variant runs the equivalence tests: VARIANT_PAIRS pairs each forward variant with a backward variant
(v1 filling in), so each pair checks one of each. On CUDA the variants other than v1 run the focused CUDA tests
(test_variants_*_cuda) instead of the whole interpreter-sized list, to keep the GPU report's test step short.
"""
import itertools
import math

import pytest
import torch
from tolerance import assert_close, assert_mssa_close, mssa_cond, mssa_math, rel_err
from triton_launches import triton_launches

import crate_kernels
from crate_kernels import ops
from crate_kernels.models.crate import MSSA
from crate_kernels.ops import mssa as mssa_ops
from crate_kernels.ops import mssa_attention
from crate_kernels.ops.backend import launcher, launcher_backends, resolve_backend
from crate_kernels.ops.mssa import triton_common, triton_v1
from crate_kernels.ops.mssa import triton_variants as mssa_variants

CUDA = torch.cuda.is_available()
# Triton 3.6's interpreter turns 1-element arrays into loop bounds (numpy < 2.4 only warns about it).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

_NAMES = ops.kernel_variants()
VARIANT_PAIRS = [(fwd or "v1", bwd or "v1")
                 for fwd, bwd in itertools.zip_longest(_NAMES["mssa_forward"], _NAMES["mssa_backward"])]
OTHER_PAIRS = [pair for pair in VARIANT_PAIRS if pair != ("v1", "v1")]


def _pair_param(pair, on_cuda=False):
    skip = CUDA and not on_cuda and pair != ("v1", "v1")
    return pytest.param(pair, id="-".join(pair), marks=pytest.mark.skipif(
        skip, reason="on CUDA the variants run test_variants_*_cuda (GPU time is short)"))


@pytest.fixture(params=[_pair_param(pair) for pair in VARIANT_PAIRS])
def variants(request):
    """(forward, backward) variant names, chosen for the test's duration."""
    yield from _choose(request.param)


@pytest.fixture(params=[_pair_param(pair, on_cuda=True) for pair in OTHER_PAIRS])
def other_variants(request):
    """The pairs other than (v1, v1), on CUDA too."""
    yield from _choose(request.param)


def _choose(pair):
    ops.set_variant("mssa_forward", pair[0])
    ops.set_variant("mssa_backward", pair[1])
    yield pair
    ops.set_variant("mssa_forward", None)
    ops.set_variant("mssa_backward", None)

# (B, H, N, p, amplitude): tails of every kind for 64-row blocks, head dims 32/48/64/128 (and a small odd one),
# batch*heads 1..24; amplitude > 1 makes softmax rows nearly one-hot (tests the log-sum-exp bookkeeping).
SHAPES = [
    (1, 1, 1, 32, 1.0), (1, 1, 17, 48, 1.0), (2, 3, 17, 64, 3.0), (1, 2, 50, 48, 1.0),
    (4, 6, 50, 32, 1.0), (3, 1, 65, 128, 1.0), (2, 1, 197, 64, 1.0), (1, 2, 197, 48, 4.0),
    (1, 1, 257, 32, 1.0), (1, 1, 257, 48, 2.0), (1, 1, 257, 64, 1.0), (2, 1, 33, 20, 1.0),
]


def run(w: torch.Tensor, dout: torch.Tensor, scale=None, backend="triton"):
    x = w.detach().clone().requires_grad_()
    out = mssa_attention(x, scale, backend=backend)
    (dw,) = torch.autograd.grad(out, x, dout)
    return out.detach(), dw


@pytest.mark.parametrize("b, h, n, p, amp", SHAPES, ids=lambda v: str(v))
def test_matches_float64_reference(b, h, n, p, amp, device, variants):
    w = amp * torch.randn(b, h, n, p, device=device)
    dout = torch.randn_like(w)
    out, dw = run(w, dout)
    assert out.dtype == dw.dtype == torch.float32
    assert_mssa_close(w, dout, p ** -0.5, out, dw)


def test_custom_scale_and_lse(device, variants):
    w = torch.randn(2, 2, 70, 64, device=device)
    dout = torch.randn_like(w)
    out, dw = run(w, dout, scale=0.3)
    _, lse = launcher("mssa_forward", "triton")(w, 0.3)
    assert lse.shape == (2, 2, 70) and lse.dtype == torch.float32
    assert_mssa_close(w, dout, 0.3, out, dw, lse)


def test_non_contiguous_input_no_copy(device, variants):
    """The model's (B, N, H, p) -> (B, H, N, p) view goes in as is; out keeps its layout, grads reach the base."""
    b, n, h, p = 2, 50, 3, 48
    base = torch.randn(b, n, h, p, device=device, requires_grad=True)
    w = base.transpose(1, 2)
    assert not w.is_contiguous()
    out = mssa_attention(w, backend="triton")
    assert out.stride() == w.stride()
    assert out.transpose(1, 2).reshape(b, n, h * p).data_ptr() == out.data_ptr()  # a view, as the layer uses it
    dout = torch.randn(b, n, h, p, device=device).transpose(1, 2)
    out.backward(dout)
    assert_mssa_close(w, dout, p ** -0.5, out.detach(), base.grad.transpose(1, 2))


def test_broadcast_dout(device, variants):
    """out.sum().backward() hands the backward a stride-0 (expanded) dout."""
    w = torch.randn(2, 2, 40, 32, device=device, requires_grad=True)
    mssa_attention(w, backend="triton").sum().backward()
    assert_mssa_close(w, torch.ones_like(w), 32 ** -0.5, dw=w.grad)


def test_strided_head_slice(device, variants):
    """A view with gaps (every other head-dim column) is read through its strides."""
    big = torch.randn(2, 2, 33, 128, device=device, requires_grad=True)
    w = big[..., ::2]
    dout = torch.randn(2, 2, 33, 64, device=device)
    out = mssa_attention(w, backend="triton")
    out.backward(dout)
    assert_mssa_close(w, dout, 64 ** -0.5, out.detach(), big.grad[..., ::2])
    assert not big.grad[..., 1::2].any()


def test_poisoned_outputs_are_fully_written(monkeypatch, device, variants):
    """Every output buffer starts NaN; the launchers must write every element (masked tails included)."""
    b, h, n, p = 1, 3, 197, 48
    w = torch.randn(b, h, n, p, device=device)
    dout = torch.randn_like(w)
    run(w, dout)  # on a GPU: autotune before poisoning (its benchmark allocates buffers too)

    def poison(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
    out, lse = launcher("mssa_forward", "triton")(w, p ** -0.5)
    dw = launcher("mssa_backward", "triton")(dout, w, out, lse, p ** -0.5)
    monkeypatch.undo()  # the float64 math allocates too
    assert_mssa_close(w, dout, p ** -0.5, out, dw, lse)


@pytest.mark.parametrize("block_m, block_n", [(32, 64), (64, 32), (16, 32)])
def test_other_block_shapes(monkeypatch, block_m, block_n, device):
    """The autotuner may pick any config on a GPU: run both kernels with one forced config each."""
    import triton

    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4, num_stages=2)
    for kernel in (triton_v1._mssa_fwd_kernel, triton_v1._mssa_bwd_kernel):
        monkeypatch.setattr(kernel, "configs", [config])
    w = torch.randn(2, 1, 97, 48, device=device)
    dout = torch.randn_like(w)
    out, dw = run(w, dout)
    assert_mssa_close(w, dout, 48 ** -0.5, out, dw)


def _variant_tiles():
    """(kernel name, tile) for every tile of every variant kernel: what the autotuner may pick on a GPU."""
    mv = mssa_variants
    spaces = {"mssa_fwd_tail": mv._TAIL_TILES + mv._FWD_EXACT_FP32_TILES,
              "mssa_bwd_stacked": mv._STACKED_TILES + mv._STACKED_EXACT_FP32_TILES,
              "mssa_bwd_symmetric": mv._SYMMETRIC_TILES + mv._SYMMETRIC_EXACT_FP32_TILES}
    assert set(spaces) | {"mssa_delta"} == set(mv.TRITON_KERNELS)
    return [(name, tile) for name, tiles in spaces.items() for tile in tiles]


@pytest.mark.skipif(CUDA, reason="interpreter: every tile of the variants in fp32 (a GPU tunes among them)")
@pytest.mark.parametrize("name, tile", _variant_tiles(), ids=lambda v: str(v))
def test_variant_tiles(monkeypatch, name, tile):
    """Each variant kernel with each of its tiles forced, at N = 150 (tails of 22 for 64- and 128-row blocks)."""
    import triton

    kernel = mssa_variants.TRITON_KERNELS[name]
    block_m, block_n, warps, stages = tile
    monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n},
                                                          num_warps=warps, num_stages=stages)])
    variant = name.split("_")[-1]
    ops.set_variant("mssa_forward" if "fwd" in name else "mssa_backward", variant)
    try:
        w = torch.randn(1, 2, 150, 48)
        dout = torch.randn_like(w)
        out, dw = run(w, dout)
    finally:
        ops.set_variant("mssa_forward" if "fwd" in name else "mssa_backward", None)
    assert_mssa_close(w, dout, 48 ** -0.5, out, dw)


def test_opcheck(device, variants):
    w = torch.randn(1, 2, 17, 32, device=device)
    out, lse = mssa_ops.mssa_forward(w, 0.2, "triton")
    torch.library.opcheck(mssa_ops.mssa_forward, (w, 0.2, "triton"))
    torch.library.opcheck(mssa_ops.mssa_backward, (torch.randn_like(w), w, out, lse, 0.2, "triton"))
    wt = torch.randn(1, 17, 2, 32, device=device).transpose(1, 2)
    torch.library.opcheck(mssa_ops.mssa_forward, (wt, 0.2, "triton"))


def test_gradcheck_float64(device, variants):
    w = torch.randn(1, 2, 17, 32, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mssa_attention(x, 0.3, backend="triton"), (w,), fast_mode=True)


def test_small_model_matches_reference(device):
    """A CRATE-MAE with MSSA on 'triton' (ISTA on its default) against the same model in float64 on 'reference':
    loss, prediction and every gradient within tolerance.assert_close of the fp32 model on 'reference'."""
    model = crate_kernels.CRATEMAE(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2).to(device)
    imgs = torch.randn(2, 3, 32, 32, device=device)
    noise = torch.rand(2, 16, device=device)
    results = {}
    for backend, dtype in (("reference", torch.float64), ("reference", torch.float32), ("triton", torch.float32)):
        for m in model.modules():
            if isinstance(m, MSSA):
                m.set_backend(backend)
        model.to(dtype).zero_grad(set_to_none=True)
        loss, pred, _ = model(imgs.to(dtype), noise=noise)
        loss.backward()
        results[backend, dtype] = (loss.detach(), pred.detach(), {k: v.grad.clone() for k, v in
                                                                  model.named_parameters() if v.grad is not None})
    truth, base, got = results.values()
    assert got[2].keys() == base[2].keys() == truth[2].keys() and any("qkv" in k for k in got[2])
    assert_close(got[0], truth[0], base[0], "loss")
    assert_close(got[1], truth[1], base[1], "pred")
    for k in truth[2]:
        assert_close(got[2][k], truth[2][k], base[2][k], k)


@pytest.mark.skipif(CUDA, reason="interpreter-only: the bf16 dot-operand upcast path")
def test_bf16_under_interpreter(variants):
    """bf16 runs under the interpreter (operands upcast for tl.dot); its fp32->bf16 casts truncate where PyTorch (and
    a GPU) round to nearest: up to twice the error per cast, and the backward rounds twice in a chain (P, then dS,
    to bf16), hence k = 2 x 2 = 4 instead of tolerance.K (k = 3 failed at seed shift 17: v1-symmetric's dw)."""
    w = torch.randn(2, 2, 50, 48, dtype=torch.bfloat16)
    dout = torch.randn_like(w)
    out, dw = run(w, dout)
    assert out.dtype == dw.dtype == torch.bfloat16
    assert_mssa_close(w, dout, 48 ** -0.5, out, dw, k=4)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b, h, n, p", [(8, 12, 197, 64), (4, 12, 197, 48), (2, 4, 257, 128), (3, 5, 50, 32),
                                        (1, 2, 1024, 64)])
def test_low_precision_cuda(dtype, b, h, n, p):
    """Error against float64 within tolerance.assert_close of the reference math's in the same dtype."""
    w = torch.randn(b, h, n, p, device="cuda", dtype=dtype)
    dout = torch.randn_like(w)
    out, dw = run(w, dout)
    assert out.dtype == dw.dtype == dtype
    assert_mssa_close(w, dout, p ** -0.5, out, dw)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("b, h, n, p", [(256, 12, 197, 64), (64, 12, 197, 48), (2, 4, 1024, 128), (8, 6, 65, 32)])
def test_fp32_cuda_large(b, h, n, p):
    """CRATE-MAE-sized batch*heads (thousands of programs) and a long sequence, fp32 exact ('ieee') products."""
    w = torch.randn(b, h, n, p, device="cuda")
    dout = torch.randn_like(w)
    out, dw = run(w, dout)
    assert_mssa_close(w, dout, p ** -0.5, out, dw)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype, n, p", [(torch.float32, 65, 256), (torch.float64, 33, 128), (torch.bfloat16, 197, 256),
                                         (torch.float32, 197, 128)])
def test_large_head_dims_cuda(dtype, n, p):
    """Head dims whose tiles crowd shared memory: the pruned autotuning space must keep a config that launches."""
    w = torch.randn(2, 3, n, p, device="cuda", dtype=dtype)
    dout = torch.randn_like(w)
    out, dw = run(w, dout)
    assert_mssa_close(w, dout, p ** -0.5, out, dw)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_fp32_follows_tf32_setting_cuda():
    """With TF32 allowed for PyTorch's matmuls the kernels use it too: errors at most ~2x those of the reference
    math under the same setting, and clearly above exact fp32's (~1e-6)."""
    w = torch.randn(4, 6, 197, 64, device="cuda")
    dout = torch.randn_like(w)
    truth = mssa_math(w, dout, 64 ** -0.5, torch.float64)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        out, dw = run(w, dout)
        base = mssa_math(w, dout, 64 ** -0.5, torch.float32)
    finally:
        torch.set_float32_matmul_precision(before)
    assert_close(out, truth[0], base[0], "out")
    assert_close(dw, truth[1], base[1], "dw", cond=mssa_cond(w, dout, 64 ** -0.5))
    assert rel_err(dw, truth[1]) > 1e-5, "dw as exact as fp32: TF32 was not used"


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_measures_every_candidate_on_cuda(dtype, tmp_path, monkeypatch):
    """Every candidate that supports the inputs runs and agrees with float64 ("ok": none wrong or raising, the SDPA
    kernels, each Triton variant and each built csrc kernel alike); the choice lands in the cache, and a fresh
    process state reads it back without measuring."""
    from crate_kernels.ops import tuning

    monkeypatch.setenv("CRATE_KERNELS_CACHE", str(tmp_path))
    w = torch.randn(2, 3, 50, 64, device="cuda", dtype=dtype)
    assert resolve_backend("auto", w, ("reference", "torch") + launcher_backends("mssa_forward")) == "auto"
    dout = torch.randn_like(w)
    with tuning.fresh_memory():
        out, dw = run(w, dout, backend="auto")
        rows = [r for r in ops.tuning_table() if r["kind"].startswith("mssa")]
    for kind in ("mssa_forward", "mssa_backward"):
        mine = [r for r in rows if r["kind"] == kind]
        assert sum(r["chosen"] for r in mine) == 1
        assert any(r["candidate"] == "triton-v1" and r["status"] == "ok" for r in mine)
        bad = [(r["candidate"], r["status"]) for r in mine if not r["status"].startswith(("ok", "unsupported"))]
        assert not bad, f"{kind}: candidates that raised or disagreed with float64: {bad}"
    assert list(tmp_path.glob("tuning-*.json"))
    with tuning.fresh_memory():
        run(w, dout, backend="auto")
        assert tuning.tuning_stats()["measured"] == 0 and tuning.tuning_stats()["from_cache"] >= 2
    assert_mssa_close(w, dout, 64 ** -0.5, out, dw)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("b, h, n, p", [(8, 12, 197, 64), (4, 12, 197, 48), (2, 4, 257, 64)])
def test_variants_low_precision_cuda(b, h, n, p, other_variants):
    """Each variant in bf16 at CRATE's shapes (one compiled kernel each: the GPU report's test step is short; exact
    fp32 runs every variant through the interpreter): error against float64 within tolerance.assert_close of the
    reference math's."""
    w = torch.randn(b, n, h, p, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    dout = torch.randn_like(w)
    out, dw = run(w, dout)
    assert_mssa_close(w, dout, p ** -0.5, out, dw)


# ------------------------------------------------------------------------------------------------------------
# limits: grids, 32-bit offsets, empty inputs, head dims (each works or raises before launching)
# ------------------------------------------------------------------------------------------------------------
def _run_every_variant(w):
    for fwd, bwd in VARIANT_PAIRS:
        ops.set_variant("mssa_forward", fwd)
        ops.set_variant("mssa_backward", bwd)
        try:
            _run_launchers(w)
        finally:
            ops.set_variant("mssa_forward", None)
            ops.set_variant("mssa_backward", None)


def test_grids_take_batch_times_heads_past_65535():
    """batch x heads = 70,000 (past grid y/z's 65,535): every kernel of every variant launches a 1-D grid (x may reach
    2^31 - 1), one program per row block per head, or persistent programs that loop over heads."""
    w = torch.empty(35000, 17, 2, 32, device="meta").transpose(1, 2)
    launches = triton_launches(lambda: _run_every_variant(w))
    assert {name for name, _ in launches} == set(triton_v1.TRITON_KERNELS) | set(mssa_variants.TRITON_KERNELS)
    for name, grid in launches:
        assert len(grid) == 1 and 0 < grid[0] < 2 ** 31, (name, grid)
        if name != "mssa_bwd_symmetric":  # persistent: min(batch x heads, programs per device)
            assert grid[0] >= 70000 and grid[0] % 70000 == 0, (name, grid)


def test_past_2_31_elements_launch():
    """A (B, N, H, p) view past 2^31 elements (meta tensors: nothing is allocated) launches every kernel: offsets of
    heads are 64-bit (tests/test_aot_compile.py checks the kernels' IR), offsets within a head 32-bit."""
    w = torch.empty(14200, 197, 12, 64, device="meta", dtype=torch.bfloat16).transpose(1, 2)
    assert w.numel() > 2 ** 31
    assert len(triton_launches(lambda: _run_every_variant(w))) >= 2 * len(VARIANT_PAIRS)


def test_variants_run_v1_past_their_head_dims_and_lengths():
    """Head dims past 64 run v1 in every variant; "symmetric" runs v1 past N = 512 (one program per head would leave
    the GPU idle); within those bounds each variant runs its own kernels."""
    def kernels(shape, pair):
        ops.set_variant("mssa_forward", pair[0])
        ops.set_variant("mssa_backward", pair[1])
        try:
            w = torch.empty(shape, device="meta", dtype=torch.bfloat16)
            return {name for name, _ in triton_launches(lambda: _run_launchers(w))}
        finally:
            ops.set_variant("mssa_forward", None)
            ops.set_variant("mssa_backward", None)

    for pair in VARIANT_PAIRS:
        assert kernels((2, 3, 100, 128), pair) == {"mssa_fwd", "mssa_bwd"}
    assert kernels((2, 3, 600, 64), ("tail", "symmetric")) == {"mssa_fwd_tail", "mssa_bwd"}
    assert kernels((2, 3, 500, 64), ("v1", "symmetric")) == {"mssa_fwd", "mssa_delta", "mssa_bwd_symmetric"}
    assert kernels((2, 3, 600, 64), ("v1", "stacked")) == {"mssa_fwd", "mssa_delta", "mssa_bwd_stacked"}


def _run_launchers(w):
    out, lse = launcher("mssa_forward", "triton")(w, 0.125)
    launcher("mssa_backward", "triton")(w, w, out, lse, 0.125)


@pytest.mark.parametrize("pair", VARIANT_PAIRS, ids=["-".join(p) for p in VARIANT_PAIRS])
def test_limits_raise_before_launching(pair):
    """Offsets within one head past 2^31, or a grid past 2^31 programs, raise a ValueError naming the limit before
    any launch; head dims past 256 too."""
    ops.set_variant("mssa_forward", pair[0])
    ops.set_variant("mssa_backward", pair[1])
    try:
        wide = torch.empty_strided((1, 1, 2 ** 20, 64), (0, 0, 2 ** 12, 1), device="meta")
        with pytest.raises(ValueError, match=r"within one head in int32: \(N - 1\) \* stride_N"):
            triton_launches(lambda: launcher("mssa_forward", "triton")(wide, 0.1))
        with pytest.raises(ValueError, match=r"within one head in int32"):
            triton_launches(lambda: launcher("mssa_backward", "triton")(wide, wide, wide, torch.empty(1, 1, 2 ** 20,
                                                                                            device="meta"), 0.1))
        many = torch.empty(2 ** 27, 1, 256, 16, device="meta")
        with pytest.raises(ValueError, match=r"programs, which must stay below 2\^31"):
            triton_launches(lambda: launcher("mssa_forward", "triton")(many, 0.1))
        with pytest.raises(ValueError, match="head dims up to 256"):
            triton_launches(lambda: launcher("mssa_forward", "triton")(torch.empty(1, 1, 4, 257, device="meta"), 0.1))
    finally:
        ops.set_variant("mssa_forward", None)
        ops.set_variant("mssa_backward", None)


def test_empty_inputs(variants, device):
    """An empty batch launches nothing and returns empty results; N = 0 is rejected with its name."""
    w = torch.randn(0, 3, 17, 32, device=device, requires_grad=True)
    out = mssa_attention(w, backend="triton")
    out.sum().backward()
    assert out.shape == w.shape and w.grad.shape == w.shape
    with pytest.raises(ValueError, match="N >= 1 tokens"):
        mssa_attention(torch.randn(2, 3, 0, 32, device=device), backend="triton")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("pair", VARIANT_PAIRS, ids=["-".join(p) for p in VARIANT_PAIRS])
def test_many_heads_cuda(pair):
    """batch x heads = 70,000 on the device (bf16, the kernels test_variants_low_precision_cuda compiled): the last
    heads against float64, error at most ~2x the reference math's in bf16."""
    ops.set_variant("mssa_forward", pair[0])
    ops.set_variant("mssa_backward", pair[1])
    try:
        w = torch.randn(35000, 197, 2, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        dout = torch.randn_like(w)
        out, dw = run(w, dout)
    finally:
        ops.set_variant("mssa_forward", None)
        ops.set_variant("mssa_backward", None)
    assert_mssa_close(w[-20:], dout[-20:], 64 ** -0.5, out[-20:], dw[-20:])


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("pair", VARIANT_PAIRS, ids=["-".join(p) for p in VARIANT_PAIRS])
def test_past_2_31_elements_cuda(pair):
    """A bf16 (B, N, H, p) view past 2^31 elements (14,200 CRATE-MAE-Base images, ~4.3 GB per tensor): the last
    image, whose elements lie past 2^31, against float64 (error at most ~2x the reference math's in bf16)."""
    ops.set_variant("mssa_forward", pair[0])
    ops.set_variant("mssa_backward", pair[1])
    try:
        w = torch.randn(14200, 197, 12, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        assert w.numel() > 2 ** 31
        dout = torch.randn_like(w)
        out, dw = run(w, dout)
    finally:
        ops.set_variant("mssa_forward", None)
        ops.set_variant("mssa_backward", None)
    last, g = w[-1:].clone(), dout[-1:].clone()
    del w, dout
    assert_mssa_close(last, g, 64 ** -0.5, out[-1:], dw[-1:])


def _space(tiles):
    """The kernel's full autotuning space as a GPU sees it (the interpreter keeps one config)."""
    import triton

    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


def _tiles(configs):
    return [triton_common.tile_of(c) for c in configs]


@pytest.mark.parametrize("mode", ["full", "first"])
def test_autotune_pruning(monkeypatch, mode):
    """Tensor-core tiles that fit shared memory for the row size, FMA tiles for exact fp32 products; in autotune mode
    'first' only the first of them (crate_kernels.ops.aot checks on sm_90 and sm_80 that the first one fits)."""
    monkeypatch.setenv("CRATE_KERNELS_AUTOTUNE", mode)
    fwd = _space(triton_v1._FWD_TILES + triton_v1._FWD_EXACT_FP32_TILES)
    bwd = _space(triton_v1._BWD_TILES + triton_v1._BWD_EXACT_FP32_TILES)

    def pruned(dtype, block_d, precision="ieee"):
        args, kwargs = {"W": torch.empty(1, dtype=dtype)}, {"BLOCK_D": block_d, "PRECISION": precision}
        prune_fwd, prune_bwd = (k.early_config_prune for k in (triton_v1._mssa_fwd_kernel, triton_v1._mssa_bwd_kernel))
        return _tiles(prune_fwd(fwd, args, **kwargs)), _tiles(prune_bwd(bwd, args, **kwargs))

    def expect(tiles):
        return list(tiles)[:1] if mode == "first" else list(tiles)

    all_but_fallback = [t for t in triton_v1._BWD_TILES if t[0] * t[1] > 32 * 32]
    # the model's shapes (bf16 p = 64) and TF32 p = 64: every tile but the backward's 32 x 32 fallback
    for dtype, precision in ((torch.bfloat16, "ieee"), (torch.float32, "tf32")):
        assert pruned(dtype, 64, precision) == (expect(triton_v1._FWD_TILES), expect(all_but_fallback))
    # exact fp32: the FMA tiles
    assert pruned(torch.float32, 64) == (expect(triton_v1._FWD_EXACT_FP32_TILES),
                                         expect(triton_v1._BWD_EXACT_FP32_TILES))
    # 512-byte rows (TF32 p = 128, bf16 p = 256): backward tiles up to 64 x 32
    for dtype, block_d, precision in ((torch.float32, 128, "tf32"), (torch.bfloat16, 256, "ieee")):
        _, bwd_kept = pruned(dtype, block_d, precision)
        assert bwd_kept == expect(t for t in triton_v1._BWD_TILES if t[0] * t[1] <= 64 * 32)
        assert bwd_kept[0][:2] == (64, 32)
    # 1 KB rows (TF32 p = 256, fp64 p = 128): the 32 x 32 backward tile alone, no 128-row forward tile
    for dtype, block_d, precision in ((torch.float32, 256, "tf32"), (torch.float64, 128, "ieee")):
        fwd_kept, bwd_kept = pruned(dtype, block_d, precision)
        assert bwd_kept == [(32, 32, 4, 2)]
        assert fwd_kept == expect(t for t in triton_v1._FWD_TILES if t[0] < 128)


def test_autotune_mode_is_checked(monkeypatch):
    from crate_kernels.ops.backend import autotune_space

    monkeypatch.setenv("CRATE_KERNELS_AUTOTUNE", "fast")
    with pytest.raises(ValueError, match="CRATE_KERNELS_AUTOTUNE"):
        autotune_space([1, 2])
