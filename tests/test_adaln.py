"""AdaLN ops (adaln_modulate, gated_residual_adaln): every fused backend against the eager reference.

Tolerances: fp32 within 1e-5 relative (atol 1e-5 x the tensor's max magnitude). bf16 / fp16: each output and
gradient element is the fp32 reference on the same (rounded) inputs rounded once, to nearest (the interpreter
rounds bf16 as a GPU does through the kernels' EMULATE_BF16).
"""

from __future__ import annotations

import functools
import importlib
import math
import re

import pytest
import torch

from sphere_fast import _extension, available_backends, use_backend
from sphere_fast.nn.layers import RMSNorm
from sphere_fast.ops import _tuning
from tests.helpers import (
    FUSED, TOL, assert_gradient_penalty_eager_only, assert_rounded_to_nearest, close, last_is_fastest, record_launches,
    stored_residual_reference, swapped_in_memory,
)

adaln = importlib.import_module("sphere_fast.ops.adaln")

WIDTHS = [64, 96, 512, 768, 1024, 1152, 97]
needs_cpp = pytest.mark.skipif("cpp" not in available_backends("cpu"), reason="cpp unavailable")


def make_inputs(B: int, S: int, D: int, *, tokens: bool, dtype=torch.float32, seed: int = 0, gated: bool = True):
    g = torch.Generator().manual_seed(seed)
    mod = (B, S, D) if tokens else (B, 1, D)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    x = rnd(B, S, D)
    branch = rnd(B, S, D) if gated else None
    gate = rnd(*mod, s=0.5) if gated else None
    return x, branch, gate, 1 + rnd(D, s=0.1), rnd(*mod, s=0.5), rnd(*mod, s=0.5)


def run_gated(fn, inputs, grads_out):
    """Forward and backward of gated_residual_adaln-like ``fn``; returns outputs and every input grad. The leaves
    are detached views, not clones, which would make strided, sliced and expanded inputs contiguous."""
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in inputs]
    res, y = fn(*leaves)
    dres, dy = grads_out
    ((res.float() * dres).sum() + (y.float() * dy).sum()).backward()
    return (res, y), [None if t is None else t.grad for t in leaves]


def run_modulate(fn, inputs, dy):
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    (y.float() * dy).sum().backward()
    return y, [None if t is None else t.grad for t in leaves]


NAMES = ("x", "branch", "gate", "weight", "shift", "scale")


def check_gated(backend: str, inputs, tol: float) -> None:
    """The fused backend's outputs and grads against the reference."""
    B, S, D = inputs[0].shape
    g = torch.Generator().manual_seed(1)
    dres, dy = torch.randn(B, S, D, generator=g), torch.randn(B, S, D, generator=g)
    (res, y), grads = run_gated(lambda *t: adaln.gated_residual_adaln(*t, backend=backend), inputs, (dres, dy))
    (res0, y0), grads0 = run_gated(adaln.gated_residual_adaln_reference, inputs, (dres, dy))
    assert res.dtype == y.dtype == inputs[0].dtype
    close(res, res0, tol, "res")
    close(y, y0, tol, "y")
    for name, a, b in zip(NAMES, grads, grads0):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == inputs[NAMES.index(name)].dtype, name
            close(a, b, tol, f"d{name}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("D", WIDTHS)
def test_gated_widths_fp32(backend: str, D: int) -> None:
    check_gated(backend, make_inputs(2, 3, D, tokens=False, seed=D), TOL[torch.float32])


@pytest.mark.parametrize("backend", FUSED)
def test_eps_counts_on_rows_whose_mean_square_is_near_it(backend: str) -> None:
    """On random rows (mean square about 1) eps moves the results by about 1e-6 of their size, under the float32
    tolerance: a wrong eps (ten times too large, or added to the sum instead of the mean) passed every float32 test.
    On rows scaled by 1e-3 (mean square about 1e-6) it changes them by a factor: the fused op, then the plain norm."""
    x, branch, gate, weight, shift, scale = make_inputs(2, 5, 96, tokens=False, seed=12)
    check_gated(backend, [x * 1e-3, branch * 1e-3, gate, weight, shift, scale], TOL[torch.float32])
    dy = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(2))
    inputs = [x * 1e-3, weight, shift, scale]
    y, grads = run_modulate(lambda *t: adaln.adaln_modulate(*t, backend=backend), inputs, dy)
    y0, grads0 = run_modulate(adaln.adaln_modulate_reference, inputs, dy)
    close(y, y0, TOL[torch.float32], "y")
    for name, a, b in zip(("x", "weight", "shift", "scale"), grads, grads0):
        close(a, b, TOL[torch.float32], f"d{name}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("S,D", [(1, 96), (7, 96), (256, 768)])
@pytest.mark.parametrize("tokens", [False, True], ids=["broadcast", "per_token"])
def test_gated_tokens_and_modulation(backend: str, S: int, D: int, tokens: bool) -> None:
    B = 1 if S == 256 else 2  # B=1, S=256: the backward splits one sample over several programs
    check_gated(backend, make_inputs(B, S, D, tokens=tokens, seed=S), TOL[torch.float32])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("absent", ["gate", "weight", "shift", "scale", "gate+shift", "all"])
@pytest.mark.parametrize("tokens", [False, True], ids=["broadcast", "per_token"])
def test_gated_optional_inputs(backend: str, absent: str, tokens: bool) -> None:
    """Each input left out, and the gate and shift together: broadcast, the scale is then the one per-sample
    modulation whose grad the backward's second stage sums."""
    x, br, gate, w, sh, sc = make_inputs(2, 7, 96, tokens=tokens, seed=3)
    drop = {"gate", "weight", "shift", "scale"} if absent == "all" else set(absent.split("+"))
    inputs = [x, br] + [None if n in drop else t for n, t in zip(NAMES[2:], (gate, w, sh, sc))]
    check_gated(backend, inputs, TOL[torch.float32])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("gated", [True, False], ids=["gate", "no-gate"])
def test_branch_is_kept_for_the_backward_only_with_a_gate(backend: str, gated: bool) -> None:
    """Without a gate dbranch is dx, and branch is not kept for the backward (every block of an unconditional
    model: one [B, S, D] tensor a sub-layer until the backward)."""
    x, br, gate, w, sh, sc = (t.requires_grad_() for t in make_inputs(2, 3, 64, tokens=False, seed=4))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.data_ptr()) or t, lambda t: t):
        res, y = adaln.gated_residual_adaln(x, br, gate if gated else None, w, sh, sc, backend=backend)
    assert (br.data_ptr() in saved) == gated
    (dbr,) = torch.autograd.grad((res * 2 + y).sum(), br)
    (dbr0,) = torch.autograd.grad(sum(t.sum() * k for t, k in zip(adaln.gated_residual_adaln_reference(
        x, br, gate if gated else None, w, sh, sc), (2, 1))), br)
    close(dbr, dbr0, TOL[torch.float32], "dbranch")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("B,S", [(0, 3), (2, 0)], ids=["no-samples", "no-tokens"])
def test_no_rows_give_zero_grads(backend: str, B: int, S: int) -> None:
    """No rows to normalise: empty outputs, and every input's grad zero in the input's shape (the per-sample
    modulations' and the weight's are not empty when S = 0 or B = 0 respectively)."""
    inputs = make_inputs(B, S, 64, tokens=False)
    (res, y), grads = run_gated(lambda *t: adaln.gated_residual_adaln(*t, backend=backend), inputs,
                                (torch.ones(B, S, 64), torch.ones(B, S, 64)))
    assert res.shape == y.shape == (B, S, 64)
    for name, grad, t in zip(NAMES, grads, inputs):
        assert grad.shape == t.shape and not grad.any(), name


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("D", [64, 1152, 97])
@pytest.mark.parametrize("variant", ["full", "plain_rmsnorm", "per_token_no_weight"])
def test_modulate(backend: str, D: int, variant: str) -> None:
    x, _, _, w, sh, sc = make_inputs(2, 7, D, tokens=variant == "per_token_no_weight", seed=D, gated=False)
    inputs = {"full": [x, w, sh, sc], "plain_rmsnorm": [x, None, None, None],
              "per_token_no_weight": [x, None, sh, sc]}[variant]
    dy = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(2))
    y, grads = run_modulate(lambda *t: adaln.adaln_modulate(*t, backend=backend), inputs, dy)
    y0, grads0 = run_modulate(adaln.adaln_modulate_reference, inputs, dy)
    close(y, y0, TOL[torch.float32], "y")
    for name, a, b in zip(("x", "weight", "shift", "scale"), grads, grads0):
        assert (a is None) == (b is None), name
        if a is not None:
            close(a, b, TOL[torch.float32], f"d{name}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", [(4, 2, 3, 32), (5, 64), (33,)])
def test_plain_rmsnorm_any_rank(backend: str, shape: tuple[int, ...]) -> None:
    """RMSNorm modules (q/k norms on [B, H, N, d], 2-D features) call adaln_modulate without modulation."""
    x = torch.randn(*shape)
    w = 1 + 0.1 * torch.randn(shape[-1])
    dy = torch.randn(*shape)
    y, grads = run_modulate(lambda *t: adaln.adaln_modulate(*t, backend=backend), [x, w], dy)
    y0, grads0 = run_modulate(adaln.adaln_modulate_reference, [x, w], dy)
    close(y, y0, TOL[torch.float32], "y")
    for name, a, b in zip(("x", "weight"), grads, grads0):
        close(a, b, TOL[torch.float32], f"d{name}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("modulation", ["broadcast", "per_token", "ungated"])
def test_gated_low_precision_rounds_once_to_nearest(backend: str, dtype: torch.dtype, modulation: str) -> None:
    """Every output and grad in bf16 / fp16 is its fp32 value on the same inputs rounded once to nearest, where
    y and the grads follow the stored (rounded) residual, as the kernels normalise it (stored_residual_reference).
    atol 1e-6 x the tensor's max: fp32 sums in another order, and the shift's cancellation in y."""
    inputs = list(make_inputs(2, 7, 768, tokens=modulation == "per_token", dtype=dtype, seed=5))
    if modulation == "ungated":
        inputs[2] = None
    g = torch.Generator().manual_seed(1)
    dres, dy = (torch.randn(2, 7, 768, generator=g).to(dtype).float() for _ in range(2))
    (res, y), grads = run_gated(lambda *t: adaln.gated_residual_adaln(*t, backend=backend), inputs, (dres, dy))
    (res0, y0), grads0 = run_gated(stored_residual_reference(dtype), [t if t is None else t.float() for t in inputs],
                                   (dres, dy))
    for name, actual, exact in zip(("res", "y", *(f"d{n}" for n in NAMES)), (res, y, *grads), (res0, y0, *grads0)):
        if exact is None:
            assert actual is None, name
            continue
        assert actual.dtype == dtype, name
        assert_rounded_to_nearest(actual, exact, dtype, atol=1e-6 * exact.abs().max().item(), what=name)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gated_normalises_the_residual_it_returns(backend: str, dtype: torch.dtype) -> None:
    """y is the modulation of the stored (rounded) residual, as in an unfused model that reads res back: y matches
    the reference on the returned res bit for bit but where the two fp32 sums round apart. Normalising the
    unrounded fp32 sum moves about 18% of y by an ulp (fp16)."""
    inputs = make_inputs(2, 64, 96, tokens=False, dtype=dtype, seed=6)
    res, y = adaln.gated_residual_adaln(*inputs, backend=backend)
    ref = adaln.adaln_modulate_reference(res, *inputs[3:])
    assert (y != ref).float().mean().item() <= 1e-3
    close(y, ref, TOL[dtype], "y")


@pytest.mark.parametrize("backend", FUSED)
def test_non_contiguous_inputs(backend: str) -> None:
    B, S, D = 2, 5, 96
    x, br, gate, w, sh, sc = make_inputs(B, S, D, tokens=True, seed=7)
    # x strided over tokens, branch with a non-unit last stride, a stride-0 expanded gate, a sliced weight.
    x_nc = torch.cat([x, x], dim=1)[:, ::2]
    br_nc = swapped_in_memory(br, 1, 2)
    gate_nc = gate[:, :1].expand(B, S, D)
    w_nc = torch.stack([w, w], dim=1)[:, 0]
    sh_nc = swapped_in_memory(sh, 0, 1)
    inputs = [x_nc, br_nc, gate_nc, w_nc, sh_nc, sc]
    assert not any(t.is_contiguous() for t in inputs[:5])
    check_gated(backend, inputs, TOL[torch.float32])


@pytest.mark.parametrize("backend", FUSED)
def test_strided_upstream_grads(backend: str) -> None:
    """Outputs used through a transpose get their gradients as strided views: the backward reads them as such."""
    inputs = make_inputs(2, 5, 96, tokens=False, seed=8)
    g = torch.Generator().manual_seed(9)
    grads_out = (torch.randn(5, 2, 96, generator=g), torch.randn(5, 2, 96, generator=g))

    def transposed(fn):
        return lambda *t: tuple(out.transpose(0, 1) for out in fn(*t))

    fused = functools.partial(adaln.gated_residual_adaln, backend=backend)
    _, grads = run_gated(transposed(fused), inputs, grads_out)
    _, grads0 = run_gated(transposed(adaln.gated_residual_adaln_reference), inputs, grads_out)
    for name, a, b in zip(NAMES, grads, grads0):
        close(a, b, TOL[torch.float32], f"d{name}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("wanted", NAMES[2:])
def test_a_gradient_wanted_for_one_modulation_only(backend: str, wanted: str) -> None:
    """Frozen activations and one trainable modulation input: the op still records its backward."""
    inputs = make_inputs(2, 3, 64, tokens=False, seed=10)
    leaf = inputs[NAMES.index(wanted)].detach().requires_grad_(True)
    with_leaf = [leaf if name == wanted else t for name, t in zip(NAMES, inputs)]
    res, y = adaln.gated_residual_adaln(*with_leaf, backend=backend)
    (grad,) = torch.autograd.grad(y.sum(), leaf)
    res0, y0 = adaln.gated_residual_adaln_reference(*with_leaf)
    (grad0,) = torch.autograd.grad(y0.sum(), leaf)
    close(grad, grad0, TOL[torch.float32], f"d{wanted}")
    # res = x + gate * branch requires grad only through the gate, as the reference's
    assert res.requires_grad == res0.requires_grad == (wanted == "gate")


@pytest.mark.parametrize("backend", FUSED)
def test_strided_weight_modulate(backend: str) -> None:
    # a weight that needs a contiguous copy: the copy must live until the kernel has read it
    x, _, _, w, sh, sc = make_inputs(2, 5, 64, tokens=False, seed=11, gated=False)
    dy = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    w_pair = torch.stack([w, torch.full_like(w, 1e3)], dim=1).requires_grad_(True)
    w_nc = w_pair[:, 0]
    assert not w_nc.is_contiguous()
    y = adaln.adaln_modulate(x, w_nc, sh, sc, backend=backend)
    (y * dy).sum().backward()
    y0, (_, dw0, _, _) = run_modulate(adaln.adaln_modulate_reference, [x, w, sh, sc], dy)
    close(y, y0, TOL[torch.float32], "y")
    close(w_pair.grad[:, 0], dw0, TOL[torch.float32], "dweight")


@pytest.mark.parametrize("backend", ["eager"] + FUSED)
def test_bad_inputs_raise(backend: str) -> None:
    x, br, gate, w, sh, sc = make_inputs(2, 3, 64, tokens=False)
    gated = adaln.gated_residual_adaln
    with pytest.raises(ValueError, match="shift"):
        adaln.adaln_modulate(x, w, sh[:, :, :32], sc, backend=backend)
    with pytest.raises(ValueError, match="scale"):
        adaln.adaln_modulate(x, w, sh, torch.zeros(2, 2, 64), backend=backend)
    with pytest.raises(ValueError, match="x must have shape"):
        adaln.adaln_modulate(x[0], w, sh, sc, backend=backend)
    with pytest.raises(TypeError, match="weight"):
        adaln.adaln_modulate(x, w.half(), sh, sc, backend=backend)
    with pytest.raises(TypeError, match="x must be"):
        adaln.adaln_modulate(x.long(), backend=backend)
    with pytest.raises(ValueError, match="weight is on meta"):
        adaln.adaln_modulate(x, w.to("meta"), sh, sc, backend=backend)
    with pytest.raises(ValueError, match="eps"):
        adaln.adaln_modulate(x, w, sh, sc, eps=float("nan"), backend=backend)
    for eps in (0.0, 1e-50, 1e39):  # 1e-50 and 1e39: 0 and inf as the kernels' float32
        match = rf"eps must be a finite positive number in float32's normal range .* got {re.escape(repr(eps))}"
        with pytest.raises(ValueError, match=match):
            adaln.adaln_modulate(x, w, sh, sc, eps=eps, backend=backend)
    with pytest.raises(ValueError, match="non-empty last dim"):
        adaln.adaln_modulate(x[:, :, :0], backend=backend)
    for shape in ((4, 0), (2, 3, 4, 0)):  # a plain RMSNorm of any rank
        with pytest.raises(ValueError, match="non-empty last dim"):
            adaln.adaln_modulate(x.new_ones(shape), backend=backend)
    with pytest.raises(ValueError, match="branch"):
        gated(x, br[:, :2], gate, w, sh, sc, backend=backend)
    with pytest.raises(TypeError, match="gate"):
        gated(x, br, gate.double(), w, sh, sc, backend=backend)
    with pytest.raises(TypeError, match="branch"):
        gated(x, None, gate, w, sh, sc, backend=backend)
    # a modulation for one sample, or a weight with a leading dim, would be read as if it had B samples / D values
    with pytest.raises(ValueError, match=r"shift must have shape \(2, 1, 64\) or \(2, 3, 64\), got \(1, 1, 64\)"):
        adaln.adaln_modulate(x, w, sh[:1], sc, backend=backend)
    with pytest.raises(ValueError, match=r"weight must have shape \(64,\), got \(1, 64\)"):
        adaln.adaln_modulate(x, w[None], sh, sc, backend=backend)
    with pytest.raises(TypeError, match="eps must be a finite positive number, got True"):
        adaln.adaln_modulate(x, w, sh, sc, eps=True, backend=backend)
    with pytest.raises(TypeError, match="eps must be a finite positive number, got 'x'"):
        adaln.adaln_modulate(x, w, sh, sc, eps="x", backend=backend)
    with pytest.raises(ValueError, match=r"x must have shape \[B, S, D\], got shape \(\)"):
        adaln.adaln_modulate(torch.tensor(1.0), backend=backend)


@pytest.mark.parametrize("backend", ["eager"] + FUSED)
@pytest.mark.parametrize("gated", [False, True], ids=["modulate", "gated"])
def test_a_gradient_of_a_gradient_is_eager_only(backend: str, gated: bool) -> None:
    """A gradient penalty on x's gradient (helpers.assert_gradient_penalty_eager_only)."""
    inputs = [t.requires_grad_() for t in make_inputs(2, 3, 8, tokens=False, gated=gated) if t is not None]
    if gated:
        outs = adaln.gated_residual_adaln(*inputs, backend=backend)
    else:
        outs = (adaln.adaln_modulate(*inputs, backend=backend),)
    assert_gradient_penalty_eager_only(backend, sum(t.square().sum() for t in outs), inputs[0])


def test_backward_splits_a_sample_over_programs() -> None:
    """The column reduction never runs on one program per sample: long samples get several chunks."""
    chunks, rows = adaln._chunking(1, 1024, 4, torch.device("cpu"))
    assert chunks > 1 and chunks * rows >= 1024


@needs_cpp
def test_cpp_backward_bits_do_not_depend_on_the_thread_count() -> None:
    """The C++ CPU backward splits its partial sums by a constant, not by the thread count, so the grads have the
    same bits whatever torch.set_num_threads says (1 and 2 threads split one sample differently before)."""
    x, _, _, w, sh, sc = make_inputs(1, 64, 96, tokens=False, gated=False)
    dy = torch.randn(1, 64, 96, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            grads.append(run_modulate(lambda *t: adaln.adaln_modulate(*t, backend="cpp"), [x, w, sh, sc], dy)[1])
    finally:
        torch.set_num_threads(threads)
    for name, one, two in zip(("x", "weight", "shift", "scale"), *grads, strict=True):
        assert torch.equal(one, two), name


@needs_cpp
def test_cpp_takes_a_size_1_last_dim_of_any_stride() -> None:
    """(2, 3, 1) with strides (3, 1, 3) is contiguous as torch counts it (a size-1 dim's stride is never used), so
    the op gets it uncopied."""
    x, branch = (torch.randn(2, 1, 3, generator=torch.Generator().manual_seed(i)).transpose(1, 2) for i in (0, 1))
    assert x.is_contiguous() and x.stride(-1) == 3
    torch.testing.assert_close(adaln.adaln_modulate(x, backend="cpp"), adaln.adaln_modulate_reference(x))
    res, y = adaln.gated_residual_adaln(x, branch, None, None, None, None, backend="cpp")
    res0, y0 = adaln.gated_residual_adaln_reference(x, branch, None, None, None, None)
    torch.testing.assert_close(res, res0)
    torch.testing.assert_close(y, y0)


@needs_cpp
def test_cpp_ops_check_their_arguments() -> None:
    """The registered C++ ops called directly (no Python checks in front) raise instead of reading an input of
    another dtype or shape as if it were res's."""
    op = adaln._cpp_ext()
    x, w = torch.randn(2, 3, 8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.bfloat16)
    _, _, rstd = op.fwd(x, None, None, w, None, None, 1e-6)
    dy = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="dy must have res's dtype BFloat16, got Float"):
        op.bwd(dy.float(), None, x, None, None, w, None, None, rstd)
    with pytest.raises(RuntimeError, match=r"dy must be a contiguous tensor of res's shape \[2, 3, 8\], got \[1, 1,"):
        op.bwd(dy[:1, :1], None, x, None, None, w, None, None, rstd)
    with pytest.raises(RuntimeError, match=r"dres must be a contiguous tensor of res's shape"):
        op.bwd(dy, dy[:, :2], x, None, None, w, None, None, rstd)
    for bad_rstd in (rstd.double(), rstd[:1]):
        with pytest.raises(RuntimeError, match=r"rstd must be a contiguous float32 \[B, S\] = \[2, 3\]"):
            op.bwd(dy, None, x, None, None, w, None, None, bad_rstd)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[8\], got \[1, 8\]"):
        op.fwd(x, None, None, w[None], None, None, 1e-6)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[8\], got \[1, 8\]"):
        op.bwd(dy, None, x, None, None, w[None], None, None, rstd)
    with pytest.raises(RuntimeError, match=r"shift must have shape \[2, 1, 8\] or \[2, 3, 8\], got \[1, 1,"):
        op.fwd(x, None, None, w, x[:1, :1], None, 1e-6)
    # a per-token gate without a branch: the backward returned its gradient unwritten (memory's old values)
    with pytest.raises(RuntimeError, match=r"a gate needs a branch"):
        op.bwd(dy, None, x, None, dy, w, None, None, rstd)
    with pytest.raises(RuntimeError, match=r"a gate needs a branch"):
        op.fwd(x, None, dy, w, None, None, 1e-6)
    with pytest.raises(RuntimeError, match=r"the rows must have a width D > 0, got 0"):  # the CPU twin gave NaN rstd
        op.fwd(x[..., :0], None, None, None, None, None, 1e-6)


@needs_cpp
@pytest.mark.parametrize("B", [2, 0], ids=["rows", "no-rows"])
def test_cpp_backward_op_outputs_do_not_alias(B: int) -> None:
    """Every absent input gets an empty gradient of its own: the op's schema promises outputs that alias nothing."""
    op = adaln._cpp_ext()
    x, w = torch.randn(B, 3, 8), torch.randn(8)
    _, _, rstd = op.fwd(x, None, None, w, None, None, 1e-6)
    torch.library.opcheck(op.bwd.default, (torch.randn(B, 3, 8), None, x, None, None, w, None, None, rstd),
                          test_utils=("test_schema",))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B, tokens", [(2, False), (2, True), (0, True)], ids=["per-sample", "per-token", "no-rows"])
def test_cpp_ext_opcheck(B: int, tokens: bool, dtype: torch.dtype) -> None:
    """The extension's ops called directly, fake kernels included (registered when it loads): contiguous outputs
    and grads even of strided inputs, fp32 rstd, empty grads of absent inputs, zero grads without rows."""
    op = adaln._cpp_ext()
    x, br, gate, w, sh, sc = make_inputs(B, 3, 8, tokens=tokens, dtype=dtype)
    x_t, br_t = swapped_in_memory(x, 0, 1), swapped_in_memory(br, 0, 1)
    for args in ((x, br, gate, w, sh, sc), (x_t, br_t, gate, w, sh, sc), (x_t, None, None, None, None, None)):
        torch.library.opcheck(op.fwd.default, (*args, 1e-6))
    res, _, rstd = op.fwd(x, br, gate, w, sh, sc, 1e-6)
    dy, dres = torch.randn_like(res), torch.randn_like(res)
    gate_t, sh_t, sc_t = (swapped_in_memory(t, 0, 1) for t in (gate, sh, sc))
    for args in ((dy, dres, res, br, gate, w, sh, sc), (dy, None, res, br_t, gate_t, None, sh_t, sc_t),
                 (dy, None, res, None, None, None, None, None)):
        torch.library.opcheck(op.bwd.default, (*args, rstd))


def test_cpp_cuda_width_limit_is_the_kernels() -> None:
    """The Python limit that refuses wide rows up front (ValueError, tests/test_cuda.py) is the C++ one."""
    header = (_extension.csrc_dir() / "adaln_math.h").read_text()
    assert int(re.search(r"kAdalnCudaMaxWidth = (\d+);", header)[1]) == adaln.CPP_CUDA_MAX_WIDTH


@pytest.mark.parametrize("backend", ["eager", *FUSED])
def test_compile_with_dynamic_shapes(backend: str) -> None:
    """torch.compile(dynamic=True): the input checks take symbolic sizes and a symbolic eps (an RMSNorm's) without
    breaking the graph; a huge int eps is a ValueError, as any other eps past float's range."""
    torch._dynamo.reset()
    norm = RMSNorm(8)
    x = torch.randn(2, 3, 8)
    with use_backend(backend):
        out = torch.compile(norm, fullgraph=True, dynamic=True, backend="aot_eager")(x)
        torch.testing.assert_close(out, norm(x))
    for eps in (10**400, math.inf, math.nan):
        with pytest.raises(ValueError, match="eps must be a finite positive number"):
            adaln.adaln_modulate(x, eps=eps, backend=backend)


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend: str) -> None:
    """Schema and fake kernels, also with inputs that require grad (the forward ops' gradients are checked against
    the public ops' in test_op_autograd.py)."""
    x, br, gate, w, sh, sc = make_inputs(2, 3, 96, tokens=False)
    torch.library.opcheck(torch.ops.sphere_fast.gated_residual_adaln_fwd.default, (x, br, gate, w, sh, sc, 1e-6, backend))
    needing_grad = [t.clone().requires_grad_() for t in (x, br, gate, w)]
    torch.library.opcheck(torch.ops.sphere_fast.gated_residual_adaln_fwd.default,
                          (*needing_grad, sh, sc, 1e-6, backend))
    torch.library.opcheck(torch.ops.sphere_fast.adaln_modulate_fwd.default, (needing_grad[0], w, sh, sc, 1e-6, backend))
    torch.library.opcheck(torch.ops.sphere_fast.adaln_modulate_fwd.default, (x, w, sh, sc, 1e-6, backend))
    torch.library.opcheck(torch.ops.sphere_fast.adaln_modulate_fwd.default, (x, None, None, None, 1e-6, backend))
    res = x + gate * br
    rstd = torch.rsqrt(res.square().mean(-1) + 1e-6)
    dy, dres = torch.randn_like(res), torch.randn_like(res)
    args = (dy, dres, res, br, gate, w, sh, sc, rstd, backend)
    torch.library.opcheck(torch.ops.sphere_fast.adaln_bwd.default, args)
    # absent inputs get empty gradients; a strided x gets contiguous outputs (the fake kernels must agree)
    args = (dy, None, res, br, None, None, None, None, rstd, backend)
    torch.library.opcheck(torch.ops.sphere_fast.adaln_bwd.default, args)
    # no tokens: the grads of modulations [B, 1, D] (here with permuted strides) still have elements, contiguous
    empty, gate_t = res[:, :0], swapped_in_memory(gate, 0, 2)
    args = (empty, None, empty, empty, gate_t, w, sh, sc, rstd[:, :0], backend)
    torch.library.opcheck(torch.ops.sphere_fast.adaln_bwd.default, args)
    x_t, br_t = swapped_in_memory(x, 0, 1), swapped_in_memory(br, 0, 1)
    torch.library.opcheck(torch.ops.sphere_fast.adaln_modulate_fwd.default, (x_t, w, sh, sc, 1e-6, backend))
    torch.library.opcheck(torch.ops.sphere_fast.gated_residual_adaln_fwd.default,
                          (x_t, br_t, gate, w, sh, sc, 1e-6, backend))


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph(backend: str) -> None:
    x, br, gate, w, sh, sc = make_inputs(2, 3, 96, tokens=False)

    def block(x, br, gate, w, sh, sc):
        res, y = adaln.gated_residual_adaln(x, br, gate, w, sh, sc, backend=backend)
        return res, adaln.adaln_modulate(y, w, sh, sc, backend=backend) * 2

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_(True) for t in (x, br, gate, w, sh, sc)]
    res, out = compiled(*leaves)
    (res.sum() + out.square().sum()).backward()
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, br, gate, w, sh, sc)]
    res0, out0 = block(*ref_leaves)
    (res0.sum() + out0.square().sum()).backward()
    close(out, out0, 1e-5, "compiled out")
    for name, a, b in zip(NAMES, leaves, ref_leaves):
        close(a.grad, b.grad, 1e-5, f"compiled d{name}")


def test_the_triton_forward_tunes_rows_and_warps(monkeypatch: pytest.MonkeyPatch, fresh_tuning: None) -> None:
    """Given the GPU's candidates (rows per program, warps), the forward compiles them ahead, times each once per
    shape (each reported faster than the last), launches the one it picked, remembers it, and gives the default
    config's bits (the interpreter ignores the warps; the rows a program takes must not change a row's sums)."""
    if "triton" not in available_backends("cpu"):
        pytest.skip("the Triton backend is not available here")

    inputs = make_inputs(2, 9, 1024, tokens=False, dtype=torch.bfloat16)
    expected = adaln.gated_residual_adaln(*inputs, backend="triton")
    candidates = adaln._fwd_candidates(1024, 2, interpret=False)
    block_m, _, warps = adaln._row_block(1024)  # the default, then one row a program with the default's warps
    assert candidates == ((block_m, warps), (1, warps))
    assert adaln._fwd_candidates(1024, 2, interpret=True) == candidates[:1]
    # where one row leaves a thread less than a 16-byte vector, its sum would spread otherwise: the default alone
    assert [len(adaln._fwd_candidates(D, 2, interpret=False)) for D in (64, 96, 512, 768, 1152)] == [1, 1, 1, 2, 2]
    assert len(adaln._fwd_candidates(512, 4, interpret=False)) == 2
    timed = last_is_fastest(monkeypatch)
    monkeypatch.setattr(adaln, "_fwd_candidates", lambda D, itemsize, interpret: candidates)
    launches = record_launches(monkeypatch, adaln)
    actual = adaln.gated_residual_adaln(*inputs, backend="triton")
    chosen = [config for key, config in _tuning._chosen.items() if key[0] == "adaln fwd"]
    assert len(candidates) > 1 and chosen == [candidates[-1]] and len(timed) == len(candidates)
    launched = [(launch.kwargs["BLOCK_M"], launch.kwargs["num_warps"]) for launch in launches
                if launch.kernel == "adaln_fwd_kernel" and not launch.compile_only]
    assert launched == [*candidates, candidates[-1]]  # each timed, then the pick
    adaln.gated_residual_adaln(*inputs, backend="triton")
    assert len(timed) == len(candidates), "a remembered shape must not be timed again"
    for name, a, b in zip(("res", "y"), actual, expected, strict=True):
        assert torch.equal(a, b), name


def test_the_triton_backward_tunes_its_pipeline_stages(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fresh_tuning: None
) -> None:
    """Given several stage candidates (as on a GPU), the backward compiles them ahead, times each once per shape
    (a stand-in timer here that reports each launch faster than the last), launches the one it picked,
    remembers it, and gives the one-stage loop's bits."""
    if "triton" not in available_backends("cpu"):
        pytest.skip("the Triton backend is not available here")

    inputs = make_inputs(2, 9, 96, tokens=False)
    g = torch.Generator().manual_seed(1)
    grads_out = torch.randn(2, 9, 96, generator=g), torch.randn(2, 9, 96, generator=g)
    run = functools.partial(run_gated, lambda *t: adaln.gated_residual_adaln(*t, backend="triton"), inputs, grads_out)
    monkeypatch.setattr(adaln, "_bwd_stage_candidates", lambda: (1,))
    _, expected = run()
    timed = last_is_fastest(monkeypatch)
    monkeypatch.setattr(adaln, "_bwd_stage_candidates", lambda: adaln.BWD_STAGES)
    launches = record_launches(monkeypatch, adaln)
    with caplog.at_level("INFO", logger="sphere_fast"):
        _, actual = run()
    chosen = [config for key, config in _tuning._chosen.items() if key[0] == "adaln bwd"]
    assert chosen == [adaln.BWD_STAGES[-1]] and len(timed) == len(adaln.BWD_STAGES)
    launched = [launch.kwargs["STAGES"] for launch in launches
                if launch.kernel == "adaln_bwd_kernel" and not launch.compile_only]
    assert launched == [*adaln.BWD_STAGES, adaln.BWD_STAGES[-1]]  # each timed, then the pick
    assert "compiling the candidates ahead failed" not in caplog.text and "bits" not in caplog.text
    run()
    assert len(timed) == len(adaln.BWD_STAGES), "a remembered shape must not be timed again"
    for name, a, b in zip(NAMES, actual, expected, strict=True):
        assert torch.equal(a, b), name
