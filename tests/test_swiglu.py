"""SwiGLU (silu(a) * b, h = cat(a, b)): every fused backend against the eager reference.

Tolerances: fp32 within 1e-5 relative (atol 1e-5 x the tensor's max magnitude); bf16 / fp16: each element is
the fp32 reference on the same rounded inputs rounded once, to nearest (the eager bf16 reference itself rounds
twice; the interpreter rounds bf16 as a GPU does through the kernels' EMULATE_BF16).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from sphere_fast import available_backends
from tests.helpers import (
    FUSED, TOL, assert_gradient_penalty_eager_only, assert_rounded_to_nearest, close, record_launches,
)

sw = importlib.import_module("sphere_fast.ops.swiglu")
needs_cpp = pytest.mark.skipif("cpp" not in available_backends("cpu"), reason="cpp unavailable")


def fwd_bwd(fn, h: torch.Tensor, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = h.detach().requires_grad_(True)  # not a clone: that would make a row-strided view contiguous
    out = fn(leaf)
    (out.float() * dout).sum().backward()
    return out, leaf.grad


def check(backend: str, h: torch.Tensor, tol: float) -> None:
    dout = torch.randn(*h.shape[:-1], h.shape[-1] // 2, generator=torch.Generator().manual_seed(1))
    out, dh = fwd_bwd(lambda t: sw.swiglu(t, backend=backend), h, dout)
    out0, dh0 = fwd_bwd(sw.swiglu_reference, h, dout)
    assert out.dtype == dh.dtype == h.dtype
    close(out, out0, tol, "out")
    close(dh, dh0, tol, "dh")


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return (2 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("H", [64, 170, 513, 2730, 1])
def test_widths_fp32(backend: str, H: int) -> None:
    check(backend, randn(2, 3, 2 * H, seed=H), TOL[torch.float32])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("S", [1, 7, 256])
def test_tokens(backend: str, S: int) -> None:
    check(backend, randn(1, S, 2 * 170, seed=S), TOL[torch.float32])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("H", [170, 192], ids=["flat", "row-tiled"])
def test_low_precision_rounds_once_to_nearest(backend: str, dtype: torch.dtype, H: int) -> None:
    """out and dh in bf16 / fp16 are their fp32 values on the same inputs, rounded once to nearest (H = 170: rows
    not 16-byte aligned, the flat forward). atol 1e-6 x the tensor's max: fp32 sigmoids differ by an ulp or two,
    and silu'(a) = sig * (1 + a * (1 - sig)) cancels near a = -1.28."""
    h = randn(2, 7, 2 * H, dtype=dtype)
    dout = randn(2, 7, H, dtype=dtype, seed=1).float()
    out, dh = fwd_bwd(lambda t: sw.swiglu(t, backend=backend), h, dout)
    out0, dh0 = fwd_bwd(sw.swiglu_reference, h.float(), dout)
    assert out.dtype == dh.dtype == dtype
    assert_rounded_to_nearest(out, out0, dtype, atol=1e-6 * out0.abs().max().item(), what="out")
    assert_rounded_to_nearest(dh, dh0, dtype, atol=1e-6 * dh0.abs().max().item(), what="dh")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("int64", [False, True], ids=["int32", "int64"])
def test_unaligned_rows_run_flat_with_the_tiled_bits(dtype: torch.dtype, int64: bool, monkeypatch) -> None:
    """Rows whose bytes are not a multiple of 16 (H = 2731, and a view with a row stride of 5473) take the flat
    forward, which gives the row-tiled kernel's bits, with int32 offsets or (past INT32_LIMIT) int64 ones."""
    if "triton" not in available_backends("cpu"):
        pytest.skip("the Triton backend is not available here")
    assert sw._rows_aligned(2752, 5504, 2) and not sw._rows_aligned(2731, 5462, 2)
    assert not sw._rows_aligned(2736, 5470, 2)  # aligned width, unaligned row stride
    launches = record_launches(monkeypatch, sw)
    if int64:  # past the rows' extent in h (16386, 16418 elements), not past the output's (8193, 8208)
        monkeypatch.setattr(sw, "INT32_LIMIT", 12_000)
    for h in (randn(3, 2 * 2731, dtype=dtype), randn(3, 2 * 2736 + 1, dtype=dtype)[:, : 2 * 2736]):
        flat = sw.swiglu(h, backend="triton")
        with monkeypatch.context() as forced:
            forced.setattr(sw, "_rows_aligned", lambda *args: True)
            tiled = sw.swiglu(h, backend="triton")
        assert torch.equal(flat, tiled)
    launched = [(launch.kernel, launch.kwargs.get("INT64")) for launch in launches]
    assert launched == [("swiglu_fwd_flat_kernel", int64), ("swiglu_fwd_kernel", None)] * 2


@pytest.mark.parametrize("backend", FUSED)
def test_no_rows(backend: str) -> None:
    """Zero rows: empty outputs and gradients in h's shape, as eager gives."""
    h = randn(0, 3, 8)
    out, dh = fwd_bwd(lambda t: sw.swiglu(t, backend=backend), h, torch.randn(0, 3, 4))
    out0, dh0 = fwd_bwd(sw.swiglu_reference, h, torch.randn(0, 3, 4))
    assert out.shape == out0.shape and dh.shape == dh0.shape == h.shape


@pytest.mark.parametrize("backend", FUSED)
def test_gradient_where_dout_times_a_overflows(backend: str) -> None:
    """a = -1e38: silu(a) = -0, so db = dout * silu(a) = -0, as the reference's; dout * a first overflowed to -inf
    and gave NaN."""
    h = torch.tensor([[-1e38, 1.0], [-20.0, 3.0]], requires_grad=True)
    dout = torch.tensor([[10.0], [2.0]])
    (want,) = torch.autograd.grad(sw.swiglu(h, backend="eager"), h, dout)
    (got,) = torch.autograd.grad(sw.swiglu(h, backend=backend), h, dout)
    assert want.isfinite().all()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_non_contiguous(backend: str) -> None:
    base = randn(2, 5, 2 * 170 + 6)
    row_strided = base[..., : 2 * 170]  # unit last stride, padded rows: read in place
    transposed = randn(2, 2 * 170, 5).transpose(1, 2)  # non-unit last stride: copied
    for h in (row_strided, transposed):
        assert not h.is_contiguous()
        check(backend, h, TOL[torch.float32])


def test_rows_apart_are_read_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton forward reads h where it is when its last dim is contiguous, whatever its row stride (the
    model's padded rows): the kernel gets h's own memory; only a non-unit last stride is copied first."""
    if "triton" not in available_backends("cpu"):
        pytest.skip("the Triton backend is not available here")
    launches = record_launches(monkeypatch, sw)
    row_strided = randn(2, 5, 2 * 170 + 6)[..., : 2 * 170]
    transposed = randn(2, 2 * 170, 5).transpose(1, 2)
    for h in (row_strided, transposed):
        sw.swiglu(h, backend="triton")
    assert len(launches) == 2 and launches[0].args[0].data_ptr() == row_strided.data_ptr()
    assert launches[1].args[0].data_ptr() != transposed.data_ptr() and launches[1].args[0].stride(-1) == 1


@pytest.mark.parametrize("backend", ["eager"] + FUSED)
def test_bad_inputs_raise(backend: str) -> None:
    with pytest.raises(ValueError, match="h must have an even"):
        sw.swiglu(randn(2, 3, 7), backend=backend)
    with pytest.raises(ValueError, match="h must have an even, non-zero"):
        sw.swiglu(randn(2, 0), backend=backend)
    with pytest.raises(TypeError, match="h must be float32"):
        sw.swiglu(torch.ones(2, 4, dtype=torch.int32), backend=backend)
    with pytest.raises(TypeError, match="h must be a torch.Tensor"):
        sw.swiglu([1.0, 2.0], backend=backend)


@pytest.mark.parametrize("backend", ["eager"] + FUSED)
def test_a_gradient_of_a_gradient_is_eager_only(backend: str) -> None:
    """A gradient penalty on h's gradient (helpers.assert_gradient_penalty_eager_only)."""
    h = randn(3, 10).requires_grad_()
    assert_gradient_penalty_eager_only(backend, sw.swiglu(h, backend=backend).square().sum(), h)


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend: str) -> None:
    """The ops' schema and fake kernels, also with an input that requires grad (the forward op's gradient is
    checked against the public op's in test_op_autograd.py)."""
    h = randn(2, 3, 2 * 85)
    torch.library.opcheck(torch.ops.sphere_fast.swiglu_fwd.default, (h, backend))
    torch.library.opcheck(torch.ops.sphere_fast.swiglu_fwd.default, (h.clone().requires_grad_(), backend))
    torch.library.opcheck(torch.ops.sphere_fast.swiglu_bwd.default, (randn(2, 3, 85), h, backend))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M", [6, 0], ids=["rows", "no-rows"])
def test_cpp_ext_opcheck(M: int, dtype: torch.dtype) -> None:
    """The extension's ops called directly, fake kernels included (registered when it loads): contiguous [M, H]
    and [M, 2H] outputs, also of an h whose rows lie apart."""
    op = sw._cpp_ext()
    h = randn(M, 2 * 5, dtype=dtype)
    for h2 in (h, randn(M, 2 * 5 + 2, dtype=dtype)[:, :10]):
        torch.library.opcheck(op.fwd.default, (h2,))
        torch.library.opcheck(op.bwd.default, (randn(M, 5, dtype=dtype, seed=1), h2))


@needs_cpp
def test_cpp_backward_refuses_a_dout_of_another_rank() -> None:
    """The op called directly: a contiguous [M, H, 2] dout has [M, H]'s first sizes, and was read as one."""
    h = randn(3, 8)
    with pytest.raises(RuntimeError, match=r"dout must be a contiguous \[M, H\] tensor like h"):
        sw._cpp_ext().bwd(randn(3, 4, 2), h)


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph(backend: str) -> None:
    def mlp(h: torch.Tensor) -> torch.Tensor:
        return sw.swiglu(h * 2, backend=backend).sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    h = randn(2, 3, 2 * 85)
    out, dh = fwd_bwd(compiled, h, torch.ones(2, 3))
    out0, dh0 = fwd_bwd(mlp, h, torch.ones(2, 3))
    close(out, out0, 1e-5, "out")
    close(dh, dh0, 1e-5, "dh")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("width, padded", [(40, 128), (48, 128), (24, 64)])
def test_layer_pads_hidden_width_on_fused_backends(backend: str, width: int, padded: int, monkeypatch) -> None:
    """The SwiGLU layer (hidden int(W * 8/3): 106, 128, 64) runs its GEMMs with the hidden width padded to a
    multiple of MLP_ALIGN on the fused backends (``padded_hidden``, the hidden width itself where aligned), the
    official shapes on eager; output and every gradient (to the official parameters) agree, and the parameters
    keep the official shapes."""
    from sphere_fast import use_backend
    from sphere_fast.nn.layers import MLP_ALIGN, SwiGLU

    torch.manual_seed(width)
    layer = SwiGLU(width)
    hidden = int(width * 8 / 3)
    assert padded == -(-hidden // MLP_ALIGN) * MLP_ALIGN == layer.padded_hidden
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == {
        "w12.weight": (2 * hidden, width), "w12.bias": (2 * hidden,), "w3.weight": (width, hidden), "w3.bias": (width,),
    }
    linear_weights = []
    real_linear = torch.nn.functional.linear

    def recording_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        linear_weights.append(tuple(w.shape))
        return real_linear(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", recording_linear)
    x = randn(2, 5, width, seed=1).requires_grad_(True)
    dout = randn(2, 5, width, seed=2)
    results = {}
    for name in ("eager", backend):
        linear_weights.clear()
        with use_backend(name):
            out = layer(x)
        grads = torch.autograd.grad((out * dout).sum(), [x, *layer.parameters()])
        results[name] = (linear_weights.copy(), out, grads)
    assert results["eager"][0] == [(2 * hidden, width), (width, hidden)]
    assert results[backend][0] == [(2 * padded, width), (width, padded)]
    close(results[backend][1], results["eager"][1], TOL[torch.float32], "out")
    for i, (g, g0) in enumerate(zip(results[backend][2], results["eager"][2])):
        assert g.shape == g0.shape
        close(g, g0, TOL[torch.float32], f"grad {i}")


@pytest.mark.parametrize("backend", FUSED)
def test_a_loops_padded_weights_are_its_threads_own(backend: str) -> None:
    """One thread's open padded_mlp_weights loop is invisible to another thread calling the same model: that one
    pads per call and sees its weight changes (the loop's weights were kept on the shared layers: another thread
    then read stale weights, or failed when the loop closed under it)."""
    import threading

    from sphere_fast import use_backend
    from sphere_fast.nn.layers import SwiGLU, padded_mlp_weights

    torch.manual_seed(0)
    layer = SwiGLU(40)
    x = randn(3, 40, seed=1)
    opened, done = threading.Event(), threading.Event()

    def loop() -> None:
        with use_backend(backend), torch.no_grad(), padded_mlp_weights():
            layer(x)  # pads once, kept for the loop
            opened.set()
            done.wait(30)

    worker = threading.Thread(target=loop)
    worker.start()
    try:
        assert opened.wait(30)
        with use_backend(backend), torch.no_grad():
            before = layer(x)
            layer.w3.weight.mul_(2)
            after = layer(x)
            expected = layer.w3(sw.swiglu_reference(layer.w12(x)))
    finally:
        done.set()
        worker.join()
    assert not torch.equal(before, after)
    close(after, expected, TOL[torch.float32], "out after the weight change")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_layer_keeps_no_padded_weights_for_its_backward(backend: str, autocast: bool) -> None:
    """Training on a fused backend: the padded weights (under autocast their bf16 casts) are not kept for the
    backward but made again there; output and gradients are those of F.linear on the padded weights."""
    from sphere_fast import use_backend
    from sphere_fast.nn.layers import SwiGLU

    torch.manual_seed(0)
    layer = SwiGLU(40)  # hidden 106, padded to 128
    x = randn(2, 5, 40, seed=1).requires_grad_(True)
    dout = randn(2, 5, 40, seed=2)

    def run(forward):
        shapes = []
        hooks = (lambda t: shapes.append(tuple(sorted(t.shape))) or t, lambda t: t)  # weights are kept transposed
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), use_backend(backend):
            with torch.autograd.graph.saved_tensors_hooks(*hooks):
                out = forward()
        return shapes, out, torch.autograd.grad((out.float() * dout).sum(), [x, *layer.parameters()])

    def padded_f_linear():
        h = sw.swiglu(torch.nn.functional.linear(x, *layer.padded_w12()))
        return torch.nn.functional.linear(h, layer.padded_w3(), layer.w3.bias)

    (shapes, out, grads), (shapes0, out0, grads0) = run(lambda: layer(x)), run(padded_f_linear)
    padded_weights = {(40, 256), (40, 128)}
    assert padded_weights <= set(shapes0) and not padded_weights & set(shapes)
    assert out.dtype == out0.dtype and torch.equal(out, out0)  # the same GEMMs on the same values (CPU)
    for g, g0 in zip(grads, grads0):
        assert g.dtype == g0.dtype and torch.equal(g, g0)


@pytest.mark.parametrize("backend", FUSED)
def test_a_float64_layer_is_not_padded(backend: str) -> None:
    """float64 runs the eager swiglu: its layer computes at the official width, and keeps float64 under autocast
    with a gradient as without one (autocast leaves float64 alone, as the padded GEMMs' casts do)."""
    from sphere_fast import use_backend
    from sphere_fast.nn.layers import SwiGLU, _PaddedHiddenLinear

    layer = SwiGLU(40).double()
    with use_backend(backend):
        assert layer.computes_padded(torch.device("cpu")) and not layer.computes_padded(torch.device("cpu"),
                                                                                        torch.float64)
    x = randn(2, 40, seed=1).double().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _PaddedHiddenLinear.apply(x, layer.w12.weight, layer.w12.bias, 128, True)
    assert out.dtype == torch.float64


@pytest.mark.parametrize("backend", FUSED)
def test_padded_mlp_weights_pads_once_for_a_loop(backend: str, monkeypatch) -> None:
    """Inside padded_mlp_weights each padded layer pads its weights once, at its first call; every call gives
    the same bits as padding per call. Aligned layers and the eager backend pad nothing."""
    from sphere_fast import use_backend
    from sphere_fast.nn.layers import SwiGLU, padded_mlp_weights

    torch.manual_seed(0)
    model = torch.nn.Sequential(SwiGLU(40), SwiGLU(40), torch.nn.Linear(40, 48), SwiGLU(48))  # 106, 106, 128
    x = randn(2, 5, 40)
    pads = []
    real_pad = torch.nn.functional.pad

    def counting_pad(*args, **kwargs):
        pads.append(1)
        return real_pad(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "pad", counting_pad)
    with torch.no_grad(), use_backend(backend):
        per_call = [model(x) for _ in range(3)]
        assert len(pads) == 3 * 2 * 3  # three calls, two padded layers, three pads each
        pads.clear()
        with padded_mlp_weights():
            assert pads == []
            once = [model(x) for _ in range(3)]
            assert len(pads) == 2 * 3
        pads.clear()
        model(x)
        assert len(pads) == 2 * 3  # after the loop: per call again
    for a, b in zip(per_call, once):
        assert torch.equal(a, b)
    pads.clear()
    with use_backend("eager"), padded_mlp_weights():
        model(x)
    assert pads == []


class _LoRA(torch.nn.Module):
    """A low-rank adapter around a frozen Linear, as peft wraps one (weight and bias still reachable)."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base, self.weight, self.bias = base, base.weight, base.bias
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


@pytest.mark.parametrize("backend", FUSED)
def test_a_layer_that_is_not_a_plain_linear_is_called_not_bypassed(backend: str) -> None:
    """The padded path reads w12's and w3's weights instead of calling them: an adapter in their place, a subclass
    or a hook would be skipped without a word. Those layers are called as the official MLP calls them, on every
    backend: the same result as eager, the adapter trained, the hooks fired."""
    from sphere_fast import use_backend
    from sphere_fast.nn.layers import SwiGLU, plain_linear

    torch.manual_seed(0)
    layer = SwiGLU(40)  # hidden 106: padded on the fused backends
    x = randn(2, 5, 40, seed=3)
    with use_backend(backend):
        assert layer.computes_padded(x.device) and plain_linear(layer.w12)
        plain = layer(x)
        layer.w12 = _LoRA(layer.w12)
        adapted = layer(x)
        adapted.sum().backward()
    with use_backend("eager"):
        expected = layer(x)
    assert not torch.allclose(adapted, plain, atol=1e-3)  # the adapter counts
    torch.testing.assert_close(adapted, expected, rtol=1e-5, atol=1e-5)
    assert layer.w12.down.weight.grad is not None and layer.w12.down.weight.grad.abs().sum() > 0
    layer.w12 = layer.w12.base
    fired = []
    layer.w3.register_forward_hook(lambda module, args, out: fired.append(out.shape))
    layer.w12.register_full_backward_hook(lambda module, grad_in, grad_out: fired.append(grad_out[0].shape))
    with use_backend(backend):
        out = layer(x.requires_grad_())
        out.sum().backward()
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    assert fired == [(2, 5, 40), (2, 5, 212)] and not plain_linear(layer.w3) and not plain_linear(layer.w12)
