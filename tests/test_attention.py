"""Fused-RoPE attention (sphere_fast.ops.attention): the Triton kernel against a float64 reference.

Rule for fp16/bf16 (as in the flash-attn tests): the max error of our output and of each gradient against
float64 must be within 2x the error PyTorch's own SDPA makes in the same dtype (plus a tiny floor for
cases where SDPA is exact). fp32 must be within a TF32-sized tolerance (the GPU dots run in TF32).
On CPU the kernels run in the Triton interpreter (root conftest sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools
import importlib
import logging

import pytest
import torch

from sphere_fast.ops._util import check_grid
from sphere_fast.ops.attention import attention, attention_impl, attention_reference
from sphere_fast.ops.rope import apply_rope, rope_table_reference
from tests.helpers import record_launches, swapped_in_memory

pytest.importorskip("triton")
pytestmark = pytest.mark.cuda_capable
# the package re-exports the function under the module's name, so fetch the module itself
attn_mod = importlib.import_module("sphere_fast.ops.attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The kernel's fp32 dots run in TF32 on the GPU (see check_against_fp64); the interpreter's run in fp32.
FP32_VS_REFERENCE_TOL = 5e-3 if DEVICE == "cuda" else 1e-5
official_rope = functools.partial(rope_table_reference, device=DEVICE)  # [n, 2d] cos | sin, per the spec
HEAD_DIMS = (32, 64, 72, 80, 104, 128)


@pytest.fixture(autouse=True)
def default_launch_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU these tests run every head dim, dtype and RoPE mode: tuning would compile and time every launch
    candidate of each. They check the default configs; tests/test_tuning.py checks the others and the tuning."""
    monkeypatch.setenv("SPHERE_FAST_AUTOTUNE", "0")


def qkv_leaf(b: int, h: int, n: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """The model's fused projection output [B, N, 3*H*D]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, 3 * h * d, generator=g, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()


def split_qkv(qkv: torch.Tensor, h: int, d: int):
    """q, k, v as the model makes them: strided [B, H, N, D] views of qkv, no copy."""
    b, n, _ = qkv.shape
    return qkv.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)


def run(fn, qkv: torch.Tensor, h: int, d: int, rope, grad_out: torch.Tensor):
    """Output and (dq, dk, dv) of fn on the strided q, k, v views of qkv."""
    q, k, v = split_qkv(qkv, h, d)
    out = fn(q, k, v, rope)
    (dqkv,) = torch.autograd.grad(out, qkv, grad_out.to(out.dtype))
    b, n, _ = qkv.shape
    return [out.detach()] + list(dqkv.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0))


def sdpa_in_slices(q, k, v, rope, batch: int = 32768):
    """The low-precision SDPA baseline over batch slices: on an H200 (torch 2.11) the cuDNN SDPA backward
    failed ("mha_graph.execute ... is_good()") at B = 65600, H = 2, so torch's kernels get at most ``batch``
    sequences a call. Each sequence's result is the same as in one call."""
    outs = [attention_reference(*(t[i : i + batch] for t in (q, k, v)), rope) for i in range(0, q.shape[0], batch)]
    return torch.cat(outs)


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """fp32 results within FP32_VS_REFERENCE_TOL x the reference's largest magnitude. TF32 on the GPU: 10-bit
    mantissa inputs (unit roundoff 2**-11 = 4.9e-4), fp32 accumulation; the gradients pass through three chained
    products. Measured on an H200: up to 2.6e-3 * max|ref|."""
    tol = FP32_VS_REFERENCE_TOL * max(1.0, expected.abs().max().item())
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol, f"{what}: fp32 error {err:.3g} > TF32 tolerance {tol:.3g}"


def check_against_fp64(b: int, h: int, n: int, d: int, dtype: torch.dtype, with_rope: bool = True) -> None:
    qkv = qkv_leaf(b, h, n, d, dtype)
    rope = official_rope(n, d) if with_rope else None
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(DEVICE)
    ours = run(functools.partial(attention, impl="triton"), qkv, h, d, rope, grad_out)
    ref = run(attention_reference, qkv.detach().double().requires_grad_(), h, d, rope, grad_out)
    names = ("out", "dq", "dk", "dv")
    if dtype == torch.float32:
        for name, x, r in zip(names, ours, ref):
            assert_fp32_close(x, r, f"{name} (D={d}, N={n})")
        return
    torch_lp = run(sdpa_in_slices, qkv, h, d, rope, grad_out)
    for name, x, p, r in zip(names, ours, torch_lp, ref):
        err = (x.double() - r).abs().max().item()
        err_torch = (p.double() - r).abs().max().item()
        assert err <= 2 * err_torch + 1e-4 * max(1.0, r.abs().max().item()), (
            f"{name}: {dtype} error {err:.3g} vs float64 is over 2x torch SDPA's {err_torch:.3g} (D={d}, N={n})"
        )
        if DEVICE == "cpu":
            # The max error is one output rounding on both sides, so it hid a biased rounding of P or dS (truncated:
            # 1.15-1.49x SDPA's RMS error in bf16); the RMS error shows it (here 0.94-1.06x the CPU SDPA's).
            rms, rms_torch = ((t.double() - r).square().mean().sqrt().item() for t in (x, p))
            assert rms <= 1.08 * rms_torch + 1e-6 * max(1.0, r.abs().max().item()), (
                f"{name}: {dtype} RMS error {rms:.3g} vs float64 is over 1.08x torch SDPA's {rms_torch:.3g} "
                f"(D={d}, N={n})"
            )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_head_dims_match_fp64(d: int, dtype: torch.dtype) -> None:
    check_against_fp64(1, 2, 17, d, dtype)


@pytest.mark.parametrize(
    "n, d, dtype, with_rope",
    [
        (1, 64, torch.bfloat16, True),
        (1, 72, torch.float32, True),
        (64, 80, torch.float16, True),
        (64, 104, torch.float32, False),
        (256, 64, torch.bfloat16, True),
        (256, 72, torch.float16, True),
    ],
)
def test_token_counts_match_fp64(n: int, d: int, dtype: torch.dtype, with_rope: bool) -> None:
    check_against_fp64(2 if n < 256 else 1, 1, n, d, dtype, with_rope)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rope_pass_with_a_gradient_keeps_q_and_k_unrotated(dtype: torch.dtype) -> None:
    """Backend triton with a gradient: the RoPE pass and the kernel are one autograd node that keeps q and k as given
    (views of qkv, kept through v anyway) and rotates them again in the backward: the rotated copies (2 B H N D
    values) are not kept, and the output and gradients are those of the pass and the kernel as two nodes, bit for
    bit."""
    h, n, d = 2, 16, 32
    qkv = qkv_leaf(2, h, n, d, dtype)
    rope = official_rope(n, d)
    grad_out = torch.randn(2, h, n, d, dtype=torch.float64).to(DEVICE)
    kept: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def one_node(q, k, v, rope):
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            return attention(q, k, v, rope, backend="triton")

    def two_nodes(q, k, v, rope):
        return attention(*apply_rope(q, k, rope, backend="triton"), v, backend="triton")

    got, want = run(one_node, qkv, h, d, rope, grad_out), run(two_nodes, qkv, h, d, rope, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    new = {ptr: size for ptr, size in kept.items() if ptr != qkv.untyped_storage().data_ptr()}
    out_bytes, lse_bytes = got[0].numel() * got[0].element_size(), 2 * h * n * 4
    assert sum(new.values()) == out_bytes + lse_bytes + rope.numel() * 4, new


def test_very_negative_scores_stay_finite() -> None:
    """All scores far below zero (a padded key scores 0 > every real one): no inf/nan from the tail."""
    h, n, d = 1, 17, 32
    q = torch.full((1, h, n, d), 8.0, device=DEVICE, requires_grad=True)
    k = torch.full((1, h, n, d), -8.0, device=DEVICE, requires_grad=True)
    v = torch.randn(1, h, n, d, device=DEVICE, requires_grad=True)
    grad_out = torch.randn(1, h, n, d, device=DEVICE)
    ours = [attention(q, k, v, impl="triton")]
    ours += torch.autograd.grad(ours[0], (q, k, v), grad_out)
    ref = [attention_reference(q, k, v)]
    ref += torch.autograd.grad(ref[0], (q, k, v), grad_out)
    tol = max(FP32_VS_REFERENCE_TOL, 1e-4)
    for name, x, r in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(x, r, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def test_a_dominant_first_key_block_keeps_the_running_max() -> None:
    """Key 0 scores far above every later key (204 in log2 units): the online softmax's running max must never
    fall back to a later block's lower max, whose rescale factor exp2(old - new) would overflow to inf. Every
    query attends to key 0 alone."""
    h, n, d = 1, 128, 32  # four key blocks in the interpreter, two on a GPU
    q = torch.zeros(1, h, n, d, device=DEVICE)
    q[..., 0] = 20.0
    k = -q.clone()
    k[:, :, 0] = q[:, :, 0]
    v = torch.randn(1, h, n, d, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    out = attention(q, k, v, impl="triton")
    tol = FP32_VS_REFERENCE_TOL
    torch.testing.assert_close(out, v[:, :, :1].expand_as(out), atol=tol, rtol=tol)
    torch.testing.assert_close(out, attention_reference(q, k, v), atol=tol, rtol=tol)


def test_layouts_and_output_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Contiguous [B, H, N, D], strided qkv views and a non-unit head-dim stride give the same result; the
    qkv views are read in place (the kernel gets the projection's own memory); the output is [B, H, N, D] over
    [B, N, H, D] memory so the model's transpose + reshape is free."""
    b, h, n, d = 2, 2, 20, 32
    qkv = qkv_leaf(b, h, n, d, torch.float32).detach()
    rope = official_rope(n, d)
    q, k, v = split_qkv(qkv, h, d)
    launches = record_launches(monkeypatch, attn_mod)
    attention(q, k, v, impl="triton")  # with RoPE, q and k reach the kernel rotated by the RoPE pass (test_rope)
    assert [t.data_ptr() for t in launches[0].args[:3]] == [q.data_ptr(), k.data_ptr(), v.data_ptr()]
    out_view = attention(q, k, v, rope, impl="triton")
    out_contig = attention(q.contiguous(), k.contiguous(), v.contiguous(), rope, impl="triton")
    odd = swapped_in_memory(q, 2, 3)  # head dim stride N
    assert odd.stride(-1) != 1
    out_odd = attention(odd, k, v, rope, impl="triton")
    torch.testing.assert_close(out_view, out_contig, atol=0, rtol=0)
    torch.testing.assert_close(out_odd, out_contig, atol=0, rtol=0)
    reference = attention_reference(q, k, v, rope)
    torch.testing.assert_close(out_view, reference, atol=FP32_VS_REFERENCE_TOL, rtol=FP32_VS_REFERENCE_TOL)
    assert out_view.transpose(1, 2).is_contiguous()


def test_empty_batch() -> None:
    q = torch.zeros(0, 2, 8, 32, device=DEVICE)
    assert attention(q, q, q, official_rope(8, 32), impl="triton").shape == q.shape


# Past CUDA's limit of 65535 programs on grid axes y and z: B*H (which a 16-head model sampled at batch 2048 with
# CFG passes), and B (the kernels' grid is (tiles, H, B): the op launches a larger batch in slices). H, N and D as
# in test_head_dims_match_fp64[32-...], whose compiled kernels the GPU runs reuse.
LARGE_SHAPES = {"B*H": (4370, 15, 4, 32), "B": (65600, 2, 4, 32)}  # B, H, N, D
KERNELS = ("attention_fwd_kernel", "attention_bwd_preprocess_kernel", "attention_bwd_dkdv_kernel",
           "attention_bwd_dq_kernel")


@pytest.mark.parametrize("shape", LARGE_SHAPES.values(), ids=LARGE_SHAPES.keys())
def test_large_batches_launch_within_cuda_limits(shape: tuple[int, int, int, int], monkeypatch) -> None:
    """Every attention launch (the forward, the backward's three kernels) keeps its grid within CUDA's limits, and
    each kernel's launches cover the batch once. The kernels are not run here (65k programs are too many for the
    interpreter): each grid goes through the launcher's own check instead (the next tests run the slicing in the
    interpreter and the large shapes on a GPU)."""
    batches = {name: [] for name in KERNELS}

    def checked_no_launch(kernel, grid, compile_only=False):
        check_grid(kernel, grid)
        batches[kernel.__name__].append(grid[2])
        return lambda *args, **kwargs: None

    monkeypatch.setattr(attn_mod, "kernel_runner", checked_no_launch)
    b, h, n, d = shape
    q = torch.zeros(b, h, n, d, device=DEVICE)
    o, lse = attn_mod._triton_forward(q, q, q)
    attn_mod._triton_backward(o, q, q, q, o, lse)
    slices = [min(attn_mod.LAUNCH_BATCH, b - start) for start in range(0, b, attn_mod.LAUNCH_BATCH)]
    assert batches == {name: slices for name in KERNELS}


def test_a_batch_launched_in_slices_matches_fp64(monkeypatch) -> None:
    """The slicing that keeps a large batch under the grid limit, run for real: 5 sequences in slices of 2."""
    monkeypatch.setattr(attn_mod, "LAUNCH_BATCH", 2)
    for dtype in (torch.float32, torch.bfloat16):
        check_against_fp64(5, 2, 17, 32, dtype)


def test_sdpa_takes_a_large_batch_in_slices(monkeypatch) -> None:
    """impl ``sdpa`` hands torch's SDPA at most LAUNCH_BATCH sequences a call, forward and backward (its cuDNN
    backward failed at 65600 sequences on an H200): 5 sequences in slices of 2 give one call's output and
    gradients."""
    b, h, n, d = 5, 2, 9, 32
    rope = official_rope(n, d)
    grad_out = torch.randn(b, h, n, d, dtype=torch.float64).to(DEVICE)
    qkv = qkv_leaf(b, h, n, d, torch.float32)
    whole = run(functools.partial(attention, impl="sdpa"), qkv, h, d, rope, grad_out)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls: list[int] = []

    def counted_sdpa(q, k, v):
        calls.append(q.shape[0])
        return sdpa(q, k, v)

    monkeypatch.setattr(attn_mod, "LAUNCH_BATCH", 2)
    monkeypatch.setattr(attn_mod.F, "scaled_dot_product_attention", counted_sdpa)
    sliced = run(functools.partial(attention, impl="sdpa"), qkv, h, d, rope, grad_out)
    assert calls == [2, 2, 1]
    for name, x, y in zip(("out", "dq", "dk", "dv"), sliced, whole):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU: 65k programs are too many for the interpreter")
@pytest.mark.parametrize("shape", LARGE_SHAPES.values(), ids=LARGE_SHAPES.keys())
def test_large_batches_match_fp64(shape: tuple[int, int, int, int]) -> None:
    check_against_fp64(*shape, torch.bfloat16)


def test_opcheck() -> None:
    """Schema and fake kernels, also with an input that requires grad (the forward op's gradient is checked
    against the public op's in test_op_autograd.py)."""
    h, n, d = 1, 9, 24
    q, k, v = (t.detach().contiguous() for t in split_qkv(qkv_leaf(1, h, n, d, torch.float32), h, d))
    torch.library.opcheck(torch.ops.sphere_fast.attention_triton_fwd, (q, k, v))
    torch.library.opcheck(torch.ops.sphere_fast.attention_triton_fwd, (q.clone().requires_grad_(), k, v))
    o, lse = torch.ops.sphere_fast.attention_triton_fwd(q, k, v)
    torch.library.opcheck(torch.ops.sphere_fast.attention_triton_bwd, (torch.randn_like(o), q, k, v, o, lse))
    # the log-sum-exp stays float32 for bf16 inputs
    torch.library.opcheck(torch.ops.sphere_fast.attention_triton_fwd, tuple(t.bfloat16() for t in (q, k, v)))


def test_a_strided_rope_table() -> None:
    """A table that is a column slice of a wider one (row stride 4D) gives what its contiguous copy gives."""
    h, n, d = 2, 17, 32
    qkv = qkv_leaf(1, h, n, d, torch.float32)
    rope = official_rope(n, d)
    wide = torch.zeros(n, 4 * d, device=DEVICE)
    wide[:, : 2 * d] = rope
    grad_out = torch.randn(1, h, n, d, device=DEVICE)
    fn = functools.partial(attention, impl="triton")
    expected = run(fn, qkv, h, d, rope, grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), run(fn, qkv, h, d, wide[:, : 2 * d], grad_out), expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")


def test_non_unit_last_strides() -> None:
    """q, k, v as every other column of wider tensors, and the output used transposed (its gradient arrives with
    a last-dim stride of N): read as their contiguous copies would be."""
    b, h, n, d = 1, 2, 17, 32
    g = torch.Generator().manual_seed(3)
    wide = [torch.randn(b, h, n, 2 * d, generator=g).to(DEVICE) for _ in range(3)]
    grad_t = torch.randn(b, h, d, n, generator=g).to(DEVICE)
    rope = official_rope(n, d)

    def outputs(fn):
        leaves = [t.clone().requires_grad_() for t in wide]
        out = fn(*(t[..., ::2] for t in leaves), rope)
        return [out, *torch.autograd.grad((out.transpose(2, 3) * grad_t).sum(), leaves)]

    for name, a, r in zip(("out", "dq", "dk", "dv"), outputs(functools.partial(attention, impl="triton")),
                          outputs(attention_reference)):
        assert_fp32_close(a, r, name)


def test_gradients_for_k_and_v_alone() -> None:
    """A frozen q (k and v trainable): the op still records its backward."""
    q, k, v = _inputs(n=17)
    k, v = k.requires_grad_(), v.requires_grad_()
    rope = official_rope(17, 32)
    grads = torch.autograd.grad(attention(q, k, v, rope, impl="triton").square().sum(), (k, v))
    grads0 = torch.autograd.grad(attention_reference(q, k, v, rope).square().sum(), (k, v))
    for name, a, b in zip(("dk", "dv"), grads, grads0):
        assert_fp32_close(a, b, name)


def test_a_gradient_of_a_gradient_is_refused() -> None:
    """A gradient penalty (a loss on the projection's gradient, taken with create_graph=True): the triton backward
    has no gradient of its own, so it raises rather than silently leave out its second-order terms."""
    qkv = qkv_leaf(1, 1, 16, 32, torch.float32)
    out = attention(*split_qkv(qkv, 1, 32), official_rope(16, 32), impl="triton")
    with pytest.raises(RuntimeError, match="no second-order gradient"):
        (dqkv,) = torch.autograd.grad(out.square().sum(), qkv, create_graph=True)
        dqkv.square().sum().backward()


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ v


def test_eager_attention_takes_forward_mode_and_second_order_derivatives() -> None:
    """The eager backend's attention is torch's SDPA, whose CPU flash kernel has neither a forward-mode nor a
    second-order derivative: float64 (gradgradcheck) and forward-mode AD or torch.func run its math kernel, with the
    derivatives of the formula itself."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradgradcheck(lambda *t: attention(*t, backend="eager"), (q, k, v))
    q, k, v, dq = (torch.randn(1, 2, 8, 16, generator=g) for _ in range(4))
    out, tangent = torch.func.jvp(lambda t: attention(t, k, v, official_rope(8, 16), backend="eager"), (q,), (dq,))
    expected = torch.func.jvp(lambda t: _explicit_attention(*apply_rope(t, k, official_rope(8, 16), backend="eager"),
                                                            v), (q,), (dq,))
    torch.testing.assert_close((out, tangent), expected, rtol=1e-5, atol=1e-5)
    hessian_vector = torch.func.jvp(torch.func.grad(lambda t: attention(t, k, v, backend="eager").square().sum()),
                                    (q,), (dq,))[1]
    expected = torch.func.jvp(torch.func.grad(lambda t: _explicit_attention(t, k, v).square().sum()), (q,), (dq,))[1]
    torch.testing.assert_close(hessian_vector, expected, rtol=1e-4, atol=1e-5)


def test_a_head_dim_takes_the_candidates_of_its_padded_width() -> None:
    """Tiles are chosen for the width a kernel runs at, as their registers and shared memory are: D = 72 and 96
    run as two 64-wide chunks (128), D = 48 as two 32-wide ones (64)."""
    def candidates(d: int) -> dict:
        return attn_mod._candidates(d, torch.bfloat16, interpret=False)

    assert candidates(72) == candidates(96) == candidates(128) != candidates(64)
    assert candidates(48) == candidates(64)


def test_compile_fullgraph_no_graph_break() -> None:
    """The op is a torch.library op with a fake kernel: one graph, same values and gradients."""
    h, n, d = 2, 16, 32
    qkv = qkv_leaf(1, h, n, d, torch.float32)
    rope = official_rope(n, d)

    def block(qkv, rope):
        q, k, v = split_qkv(qkv, h, d)
        return attention(q, k, v, rope, backend="triton").transpose(1, 2).reshape(1, n, h * d)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out_c = compiled(qkv, rope)
    (g_c,) = torch.autograd.grad(out_c.square().sum(), qkv)
    out_e = block(qkv, rope)
    (g_e,) = torch.autograd.grad(out_e.square().sum(), qkv)
    torch.testing.assert_close(out_c, out_e, atol=0, rtol=0)
    torch.testing.assert_close(g_c, g_e, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_compile_with_dynamic_shapes(backend: str) -> None:
    """torch.compile(dynamic=True) makes the head dim symbolic: the impl choice takes it as an int (the graph
    guards on it) instead of failing to trace."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(s)) for s in range(3))
    rope = official_rope(16, 16)

    def attend(q, k, v, rope):
        return attention(q, k, v, rope, backend=backend)

    out = torch.compile(attend, fullgraph=True, dynamic=True, backend="aot_eager")(q, k, v, rope)
    torch.testing.assert_close(out, attend(q, k, v, rope))


def test_impl_choice_is_visible(caplog: pytest.LogCaptureFixture) -> None:
    q = torch.zeros(1, 1, 4, 32, device=DEVICE)
    if DEVICE == "cpu":
        assert attention_impl(q) == "sdpa"  # auto on CPU: the kernels run only to prove the math
    assert attention_impl(q, backend="eager") == "sdpa"
    assert attention_impl(q, backend="triton") == "triton"
    assert attention_impl(q, impl="triton") == "triton"
    attn_mod._choose.cache_clear()  # the choice is memoized and logged when first made
    with caplog.at_level(logging.INFO, logger="sphere_fast"):
        attention(q, q, q, backend="triton")
        attention(q, q, q, backend="triton")
    assert sum("attention on" in r.getMessage() and "impl triton" in r.getMessage() for r in caplog.records) == 1


def test_auto_keeps_fp32_exact_unless_tf32_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's fp32 dots run in TF32, so auto gives fp32 inputs to SDPA at torch's default precision."""
    if DEVICE == "cpu":  # make auto resolve to triton as it does on CUDA
        monkeypatch.setattr(attn_mod, "resolve_backend", lambda *args: "triton")
    attn_mod._choose.cache_clear()  # memoized choices made before (or, at the end, under) the patch
    q32, q16 = torch.zeros(1, 1, 4, 32, device=DEVICE), torch.zeros(1, 1, 4, 32, device=DEVICE, dtype=torch.bfloat16)
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert attention_impl(q32) == "sdpa" and attention_impl(q16) == "triton"
        assert attention_impl(q32, backend="triton") == "triton"  # asked for by name: TF32 is the user's call
        for allowing_tf32 in ("high", "medium"):
            torch.set_float32_matmul_precision(allowing_tf32)
            assert attention_impl(q32) == "triton"
    finally:
        torch.set_float32_matmul_precision(precision)
        attn_mod._choose.cache_clear()


@pytest.mark.parametrize("warp_specialize", [False, True], ids=["tma", "tma-warp-specialized"])
def test_tma_forward_gives_the_pointer_kernels_bits(monkeypatch: pytest.MonkeyPatch, warp_specialize: bool) -> None:
    """The forward with TMA loads runs only for a TmaConfig, which no default candidate list holds yet (the sm_90
    tests compile it): offered one here, at two key blocks (so the running max rescales the accumulator), it gives
    the pointer kernel's sums in the same order, and the reference's values."""
    b, h, n, d = 2, 2, 64, 32
    qkv = (2.0 * torch.randn(b, n, 3 * h * d, generator=torch.Generator().manual_seed(0))).to(torch.float16)
    q, k, v = qkv.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # the model's strided views
    pointer = attention(q, k, v, impl="triton")
    tma = attn_mod.TmaConfig(32, 32, 4, 1, warp_specialize)
    assert attn_mod._config_applies(tma, q, k, v)
    candidates = attn_mod._candidates
    monkeypatch.setattr(attn_mod, "_candidates", lambda *args, **kwargs: {**candidates(*args, **kwargs), "fwd": (tma,)})
    out = attention(q, k, v, impl="triton")
    torch.testing.assert_close(out, pointer, atol=0, rtol=0)
    torch.testing.assert_close(out.float(), attention_reference(q.float(), k.float(), v.float()), atol=2e-3, rtol=2e-3)


def test_auto_runs_triton_on_power_of_two_head_dims_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel pads D = 72 to 128; SDPA's cuDNN kernel was 3x faster there on an H200 (ops/attention.py)."""
    if DEVICE == "cpu":  # make auto resolve to triton as it does on CUDA
        monkeypatch.setattr(attn_mod, "resolve_backend", lambda *args: "triton")
    attn_mod._choose.cache_clear()
    try:
        for d, auto in ((32, "triton"), (64, "triton"), (128, "triton"), (72, "sdpa"), (80, "sdpa"), (104, "sdpa")):
            q = torch.zeros(1, 1, 4, d, device=DEVICE, dtype=torch.bfloat16)
            assert attention_impl(q) == auto, d
            assert attention_impl(q, backend="triton") == "triton"  # asked for by name
    finally:
        attn_mod._choose.cache_clear()


def test_cpp_backend_means_flash_attn_where_usable_else_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention has no C++ kernel of its own: backend cpp takes flash-attn where it can run (CUDA, fp16 / bf16,
    the package installed), else SDPA, and the RoPE pass runs as backend auto (there is no C++ RoPE kernel)."""
    q = torch.zeros(1, 1, 4, 64, device=DEVICE, dtype=torch.bfloat16)
    monkeypatch.setattr(attn_mod, "resolve_backend", lambda *args: "cpp")
    attn_mod._choose.cache_clear()
    try:
        monkeypatch.setattr(attn_mod, "attention_impls", lambda *args: ("sdpa", "triton", "flash_attn"))
        assert attention_impl(q, backend="cpp") == "flash_attn"
        attn_mod._choose.cache_clear()
        monkeypatch.setattr(attn_mod, "attention_impls", lambda *args: ("sdpa", "triton"))
        assert attention_impl(q, backend="cpp") == "sdpa"
        attn_mod._choose.cache_clear()
        calls: list = []
        real_pass = attn_mod.rope_pass
        monkeypatch.setattr(attn_mod, "rope_pass", lambda q, k, rope, backend: calls.append(backend) or real_pass(
            q, k, rope, backend))
        q, k, v = _inputs()
        rope = official_rope(8, 32)
        out = attention(q, k, v, rope, backend="cpp")
        assert calls == ["cpp"]  # the pass reads cpp as auto (ops/rope.py)
        if DEVICE == "cpu":
            assert_fp32_close(out, attention_reference(q, k, v, rope), "cpp with its RoPE pass")
    finally:
        attn_mod._choose.cache_clear()


def test_tuned_configs_are_kept_per_batch_bucket() -> None:
    """A launch config is tuned per program count: B*H in powers of two, so batches of one bucket share it."""
    key = functools.partial(attn_mod._tuning_key, "attention fwd")
    shapes = {b: torch.empty(b, 16, 256, 64, device="meta") for b in (1, 3, 4, 5, 64)}
    assert key(shapes[3]) == key(shapes[4]) and len({key(shapes[b]) for b in (1, 4, 5, 64)}) == 4


def _inputs(b=1, h=2, n=8, d=32, dtype=torch.float32):
    return [torch.randn(b, h, n, d, device=DEVICE, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda q, k, v: (q, k[:, :, :4], v, None), ValueError, r"\bk\b.*shape"),
        (lambda q, k, v: (q, k, v[:, :1], None), ValueError, r"\bv\b.*shape"),
        (lambda q, k, v: (q[0], k[0], v[0], None), ValueError, r"\bq\b.*4-D"),
        (lambda q, k, v: (q, k, v, official_rope(7, 32)), ValueError, r"rope.*\[8, 64\]"),
        (lambda q, k, v: (q, k, v, official_rope(8, 16)), ValueError, r"rope.*\[8, 64\]"),
        (lambda q, k, v: (q, k, v, official_rope(8, 32).double()), TypeError, r"rope.*float32"),
        (lambda q, k, v: (q, k, v, official_rope(8, 32).tolist()), TypeError, r"rope.*Tensor"),
        (lambda q, k, v: (q.int(), k, v, None), TypeError, r"\bq\b.*float16"),
        (lambda q, k, v: (q.double(), k.double(), v.double(), None), ValueError, r"'triton' cannot run .*float64"),
        (lambda q, k, v: (q, k.half(), v, None), TypeError, r"\bk\b.*dtype"),
        (lambda q, k, v: (q, k, v.int(), None), TypeError, r"\bv\b.*float16"),
        (lambda q, k, v: (q.cpu().numpy(), k, v, None), TypeError, r"\bq\b.*Tensor"),
        (lambda q, k, v: (q, k, v.to("meta"), None), ValueError, r"\bv\b must be on q's device"),
        (lambda q, k, v: (q[..., :7], k[..., :7], v[..., :7], official_rope(8, 32)), ValueError, "even head dim"),
    ],
)
def test_bad_input(make, exc, match) -> None:
    q, k, v, rope = make(*_inputs())
    with pytest.raises(exc, match=match):
        attention(q, k, v, rope, impl="triton")


@pytest.mark.parametrize("d", [8, 136, 33])
def test_unsupported_head_dim_for_triton(d: int) -> None:
    q, k, v = _inputs(d=d)
    with pytest.raises(ValueError, match=f"head dim {d}"):
        attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match=f"head dim {d}"):
        attention(q, k, v, impl="triton")
    # the reference path takes any head dim
    torch.testing.assert_close(attention(q, k, v, backend="eager"), attention_reference(q, k, v))


def test_bad_impl_name_and_rope_grad() -> None:
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="impl must be one of"):
        attention(q, k, v, impl="cudnn")
    with pytest.raises(ValueError, match=r"backend must be one of .*, got 'bogus'"):  # checked even beside an impl
        attention(q, k, v, backend="bogus", impl="sdpa")
    for kwargs in ({"impl": 3}, {"backend": 1}, {"backend": 1, "impl": "sdpa"}):  # a wrong type is a TypeError
        with pytest.raises(TypeError, match=f"{next(iter(kwargs))} must be one of"):
            attention(q, k, v, **kwargs)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="impl 'flash_attn' cannot run"):
            attention(q, k, v, impl="flash_attn")
    rope = official_rope(8, 32).requires_grad_()
    with pytest.raises(ValueError, match="rope must not require grad"):
        attention(q, k, v, rope, impl="triton", backend="triton")
    # under auto the kernel's RoPE pass is auto's, which differentiates a table that requires grad on eager
    out = attention(q, k, v, rope, impl="triton")
    (grad,) = torch.autograd.grad(out.sum(), rope)
    (expected,) = torch.autograd.grad(attention_reference(q, k, v, rope).sum(), rope)
    assert_fp32_close(grad, expected, "rope's gradient through the triton impl under auto")
    with torch.no_grad():  # nothing is recorded: the table is a constant there
        out = attention(q, k, v, rope, impl="triton")
    assert_fp32_close(out, attention_reference(q, k, v, rope.detach()), "triton under no_grad")
