"""The fused RoPE pass (sphere_fast.ops.rope.apply_rope) against the eager reference.

Tolerances: fp32 within 1e-5 relative to the tensor's max magnitude (the kernel may contract a product and a
sum into one FMA); bf16 / fp16 within 2 ulp of the max magnitude, and one test checks the kernel's single
rounding to nearest against float32 math. The backward is also checked on its own: <R x, g> = <x, R^T g> in
float32."""

from __future__ import annotations

import functools
import importlib
import math

import pytest
import torch

from sphere_fast import use_backend
from sphere_fast.nn.layers import rope_2d
from sphere_fast.ops.rope import apply_rope, apply_rope_reference, rope_table_reference, rotate_reference
from tests.helpers import (
    TOL, assert_gradient_penalty_eager_only, assert_rounded_to_nearest, close, record_launches, swapped_in_memory,
)

pytest.importorskip("triton")
pytestmark = pytest.mark.cuda_capable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
table = functools.partial(rope_table_reference, device=DEVICE)
rope_mod = importlib.import_module("sphere_fast.ops.rope")


def qk_views(b: int, h: int, n: int, d: int, dtype: torch.dtype, seed: int = 0):
    """A [B, N, 3*H*D] projection output (leaf) and its strided q, k [B, H, N, D] views, as the model makes them."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3 * h * d, generator=g).to(DEVICE, dtype).requires_grad_()
    q, k, _ = qkv.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    return qkv, q, k


def fwd_bwd(fn, qkv, q, k, rope, grads):
    q_rot, k_rot = fn(q, k, rope)
    (dqkv,) = torch.autograd.grad([q_rot, k_rot], qkv, [g.to(q_rot.dtype) for g in grads])
    return q_rot.detach(), k_rot.detach(), dqkv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("b, h, n, d", [(2, 3, 19, 16), (1, 2, 40, 72), (1, 1, 5, 24), (1, 2, 17, 128)])
def test_matches_reference(b: int, h: int, n: int, d: int, dtype: torch.dtype) -> None:
    qkv, q, k = qk_views(b, h, n, d, dtype)
    rope = table(n, d)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(b, h, n, d, generator=g).to(DEVICE) for _ in range(2)]
    ours = fwd_bwd(functools.partial(apply_rope, backend="triton"), qkv, q, k, rope, grads)
    ref = fwd_bwd(apply_rope_reference, qkv, q, k, rope, grads)
    for name, x, r in zip(("q_rot", "k_rot", "dqkv"), ours, ref):
        assert x.dtype == dtype
        close(x, r, TOL[dtype], name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_outputs_are_the_fp32_rotation_rounded_to_nearest(dtype: torch.dtype) -> None:
    """One rounding, to nearest: each output is within half an ulp of the float32 rotation of the same inputs
    (truncating, as the interpreter's bf16 cast does unless emulated, is off by up to a whole ulp)."""
    _, q, k = qk_views(2, 3, 19, 16, dtype)
    rope = table(19, 16)
    with torch.no_grad():
        for out, x in zip(apply_rope(q, k, rope, backend="triton"), (q, k)):
            assert_rounded_to_nearest(out, rotate_reference(x.float(), rope), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_backward_is_the_transposed_rotation_rounded_to_nearest(dtype: torch.dtype) -> None:
    """The backward's outputs are R^T g (the rotation by the opposite angles) of the same inputs rounded once: the
    comparison with autograd's reference, which rounds each product, let a double rounding pass."""
    _, gq, gk = qk_views(2, 3, 19, 16, dtype, seed=3)
    rope = table(19, 16)
    cos, sin = rope.double().chunk(2, dim=-1)
    with torch.no_grad():
        for out, g in zip(rope_mod.rope_bwd(gq, gk, rope), (gq, gk)):
            assert_rounded_to_nearest(out, rotate_reference(g.double(), torch.cat([cos, -sin], -1)), dtype)


@pytest.mark.parametrize("n, d", [(64, 16), (19, 24)])
def test_reference_table_is_the_models(n: int, d: int) -> None:
    """The tests' and benchmarks' table (any n, float64 angles) is the first n rows of the model's (``rope_2d``, which
    the golden-output tests check) on the ceil(sqrt(n))-wide grid, up to the model's float32 angles."""
    side = math.isqrt(n - 1) + 1
    torch.testing.assert_close(table(n, d).cpu(), rope_2d(d, side)[:n], atol=1e-5, rtol=0)


def test_any_table_not_only_the_official() -> None:
    """Each element of a pair takes its own cos and sin: the official table repeats them across a pair, which
    would hide a kernel reading its partner's. A random table, forward and backward, against the reference."""
    b, h, n, d = 1, 2, 9, 16
    qkv, q, k = qk_views(b, h, n, d, torch.float32)
    g = torch.Generator().manual_seed(4)
    rope = torch.randn(n, 2 * d, generator=g).to(DEVICE)
    grads = [torch.randn(b, h, n, d, generator=g).to(DEVICE) for _ in range(2)]
    ours = fwd_bwd(functools.partial(apply_rope, backend="triton"), qkv, q, k, rope, grads)
    ref = fwd_bwd(apply_rope_reference, qkv, q, k, rope, grads)
    for name, x, r in zip(("q_rot", "k_rot", "dqkv"), ours, ref):
        close(x, r, TOL[torch.float32], name)


def test_output_layout_and_strided_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Strided views are read in place (the kernel gets the projection's own memory); outputs are [B, H, N, D]
    with [B, N, H, D] memory; a non-unit last stride is accepted (copied first)."""
    b, h, n, d = 2, 3, 9, 32
    _, q, k = qk_views(b, h, n, d, torch.float32)
    rope = table(n, d)
    launches = record_launches(monkeypatch, rope_mod)
    q_rot, k_rot = apply_rope(q, k, rope, backend="triton")
    assert [t.data_ptr() for t in launches[0].args[:2]] == [q.data_ptr(), k.data_ptr()]
    assert q_rot.shape == k_rot.shape == (b, h, n, d)
    assert q_rot.transpose(1, 2).is_contiguous() and k_rot.transpose(1, 2).is_contiguous()
    q_t = swapped_in_memory(q.detach(), 2, 3)  # head dim not contiguous
    assert q_t.stride(-1) != 1
    ref = apply_rope_reference(q.detach(), k.detach(), rope)
    out = apply_rope(q_t, k.detach(), rope, backend="triton")
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-5)


def test_backward_is_the_transpose() -> None:
    """<R x, g> = <x, R^T g> for the kernel's own forward and backward (no reference involved)."""
    b, h, n, d = 1, 2, 13, 24
    g = torch.Generator().manual_seed(3)
    x, y, gx, gy = (torch.randn(b, h, n, d, generator=g).to(DEVICE) for _ in range(4))
    rope = table(n, d)
    rx, ry = rope_mod.rope_fwd(x, y, rope)
    tx, ty = rope_mod.rope_bwd(gx, gy, rope)
    lhs = (rx * gx).sum() + (ry * gy).sum()
    rhs = (x * tx).sum() + (y * ty).sum()
    torch.testing.assert_close(lhs, rhs, atol=1e-4, rtol=1e-5)
    # a rotation: R^T R = I
    back, _ = rope_mod.rope_bwd(rx, ry, rope)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)


def test_only_one_output_used() -> None:
    qkv, q, k = qk_views(1, 2, 8, 16, torch.float32)
    rope = table(8, 16)
    q_rot, _ = apply_rope(q, k, rope, backend="triton")
    (dqkv,) = torch.autograd.grad(q_rot.sum(), qkv)
    (ref,) = torch.autograd.grad(apply_rope_reference(q, k, rope)[0].sum(), qkv)
    torch.testing.assert_close(dqkv, ref, atol=1e-5, rtol=1e-5)


def test_grad_for_k_only_and_a_strided_table() -> None:
    """A gradient wanted for k alone still goes through the op's backward; a table that is a strided view (the
    same values) is read as the values, not as its memory."""
    q, k = _qk()
    k.requires_grad_()
    rope = table(8, 32).t().contiguous().t()
    assert not rope.is_contiguous()
    q_rot, k_rot = apply_rope(q, k, rope, backend="triton")
    q_ref, k_ref = apply_rope_reference(q, k, rope)
    close(k_rot, k_ref, TOL[torch.float32], "k_rot")
    assert not q_rot.requires_grad and not q_ref.requires_grad  # as the reference: q's rotation needs no gradient
    (dk,) = torch.autograd.grad(k_rot.sum(), k)
    (dk_ref,) = torch.autograd.grad(k_ref.sum(), k)
    close(dk, dk_ref, TOL[torch.float32], "dk")


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_a_gradient_of_a_gradient_is_eager_only(backend: str) -> None:
    """A gradient penalty on the projection's gradient (helpers.assert_gradient_penalty_eager_only)."""
    qkv, q, k = qk_views(1, 2, 8, 16, torch.float32)
    q_rot, k_rot = apply_rope(q, k, table(8, 16), backend=backend)
    assert_gradient_penalty_eager_only(backend, q_rot.square().sum() + k_rot.pow(3).sum(), qkv)


def test_the_reference_table_needs_a_head_dim_divisible_by_4() -> None:
    """Rows and columns each take half the head dim, in pairs: another width would give a table of the wrong
    width ([n, 40] for d = 18), not [n, 2d]."""
    with pytest.raises(ValueError, match="divisible by 4"):
        table(4, 18)


def test_empty_batch() -> None:
    q = torch.zeros(0, 2, 8, 32, device=DEVICE)
    q_rot, k_rot = apply_rope(q, q, table(8, 32), backend="triton")
    assert q_rot.shape == k_rot.shape == q.shape


def test_opcheck() -> None:
    """Schema, fake kernels and autograd: the forward op is differentiable itself (a graph holding it, as
    torch.export's, trains through it; see ops/_library.py), with apply_rope's gradients."""
    _, q, k = qk_views(1, 2, 9, 24, torch.float32)
    q, k = (t.detach().contiguous() for t in (q, k))
    rope = table(9, 24)
    torch.library.opcheck(torch.ops.sphere_fast.rope_fwd, (q, k, rope))
    torch.library.opcheck(torch.ops.sphere_fast.rope_bwd, (q, k, rope))
    torch.library.opcheck(torch.ops.sphere_fast.rope_fwd, (q.requires_grad_(), k, rope))
    dq_rot, dk_rot = torch.randn_like(q), torch.randn_like(k)
    q_rot, k_rot = torch.ops.sphere_fast.rope_fwd(q, k, rope)
    (got,) = torch.autograd.grad((q_rot * dq_rot).sum() + (k_rot * dk_rot).sum(), q)
    q_ref, k_ref = apply_rope_reference(q, k, rope)
    (want,) = torch.autograd.grad((q_ref * dq_rot).sum() + (k_ref * dk_rot).sum(), q)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_compile_fullgraph_no_graph_break() -> None:
    qkv, q, k = qk_views(1, 2, 16, 32, torch.float32)
    rope = table(16, 32)

    def rotate(qkv, rope):
        q, k, _ = qkv.view(1, 16, 3, 2, 32).permute(2, 0, 3, 1, 4).unbind(0)
        q_rot, k_rot = apply_rope(q, k, rope, backend="triton")
        return (q_rot * k_rot).sum()

    compiled = torch.compile(rotate, fullgraph=True, backend="aot_eager")
    (g_c,) = torch.autograd.grad(compiled(qkv, rope), qkv)
    (g_e,) = torch.autograd.grad(rotate(qkv, rope), qkv)
    torch.testing.assert_close(g_c, g_e, atol=0, rtol=0)


def _qk(d: int = 32, dtype: torch.dtype = torch.float32):
    return [torch.randn(1, 2, 8, d, device=DEVICE, dtype=dtype) for _ in range(2)]


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda q, k: (q, k[:, :1], table(8, 32)), ValueError, r"k must match q's shape"),
        (lambda q, k: (q, k.half(), table(8, 32)), TypeError, r"k must have q's dtype torch.float32, got .*float16"),
        (lambda q, k: (q, k.to("meta"), table(8, 32)), ValueError, r"k must match q's shape and device"),
        (lambda q, k: (q, k, table(8, 32).to("meta")), ValueError, r"rope must be on q's device"),
        (lambda q, k: (q[0], k[0], table(8, 32)), ValueError, r"\bq\b.*4-D"),
        (lambda q, k: (q.int(), k.int(), table(8, 32)), TypeError, r"\bq\b.*float16"),
        (lambda q, k: (q.tolist(), k, table(8, 32)), TypeError, r"\bq\b.*Tensor"),
        (lambda q, k: (q, k, table(7, 32)), ValueError, r"rope.*\[8, 64\]"),
        (lambda q, k: (q, k, table(8, 32).double()), TypeError, r"rope.*float32"),
        (lambda q, k: (q, k, None), TypeError, r"rope.*Tensor"),
        (lambda q, k: (q[..., :7], k[..., :7], table(8, 32)), ValueError, "even head dim"),
    ],
)
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_bad_input(make, exc, match, backend: str) -> None:
    q, k, rope = make(*_qk())
    with pytest.raises(exc, match=match):
        apply_rope(q, k, rope, backend=backend)


def test_rope_grad_refused_on_triton() -> None:
    q, k = _qk()
    with pytest.raises(ValueError, match="rope must not require grad"):
        apply_rope(q, k, table(8, 32).requires_grad_(), backend="triton")
    with torch.no_grad():  # nothing is recorded: the table is read as any other
        q_rot, _ = apply_rope(q, k, table(8, 32).requires_grad_(), backend="triton")
    close(q_rot, apply_rope_reference(q, k, table(8, 32))[0], TOL[torch.float32], "q_rot")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpp_backend_runs_as_auto(dtype: torch.dtype) -> None:
    """There is no C++ kernel for RoPE: ``cpp`` (backend= or use_backend) is resolved as auto, as attention's RoPE
    pass is: the eager reference on CPU, the Triton kernel on CUDA; gradients flow either way."""
    qkv, q, k = qk_views(1, 2, 8, 32, dtype)
    rope, grads = table(8, 32), _qk(dtype=dtype)
    expected = fwd_bwd(lambda q, k, rope: apply_rope(q, k, rope, backend="auto"), qkv, q, k, rope, grads)
    with use_backend("cpp"):
        in_context = fwd_bwd(apply_rope, qkv, q, k, rope, grads)
    explicit = fwd_bwd(lambda q, k, rope: apply_rope(q, k, rope, backend="cpp"), qkv, q, k, rope, grads)
    for got in (in_context, explicit):
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
    if DEVICE == "cpu":  # auto is the reference on CPU
        assert all(torch.equal(a, b) for a, b in zip(expected[:2], apply_rope_reference(q, k, rope)))


def test_cpp_backend_takes_the_triton_kernel_where_auto_does(monkeypatch: pytest.MonkeyPatch, as_on_cuda) -> None:
    """Resolved as on a CUDA machine with every backend: cpp runs the Triton kernel, as auto does."""
    launches = record_launches(monkeypatch, rope_mod)
    q, k = _qk()
    with use_backend("cpp"):
        in_context = apply_rope(q, k, table(8, 32))
    explicit = apply_rope(q, k, table(8, 32), backend="cpp")
    assert [launch.kernel for launch in launches] == ["rope_kernel"] * 2
    triton = apply_rope(q, k, table(8, 32), backend="triton")
    assert all(torch.equal(a, b) for got in (in_context, explicit) for a, b in zip(got, triton))
    # a table that needs a gradient: the kernel refuses it, so auto (and cpp) run the reference, which gives it
    launches.clear()
    rope = table(8, 32).requires_grad_()
    for name in ("auto", "cpp"):
        q_rot, k_rot = apply_rope(q, k, rope, backend=name)
        assert all(torch.equal(a, b) for a, b in zip((q_rot, k_rot), apply_rope_reference(q, k, rope)))
        (grad,) = torch.autograd.grad(q_rot.sum() + k_rot.sum(), rope)
        assert grad.abs().sum() > 0
    assert launches == []
    with pytest.raises(ValueError, match="rope must not require grad"):
        apply_rope(q, k, rope, backend="triton")
