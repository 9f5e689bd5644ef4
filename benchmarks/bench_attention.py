"""Attention with 2-D RoPE on q and k: eager, torch.compile, our Triton attention (the RoPE pass then the
RoPE-free kernel), each torch SDPA backend, and flash-attn when installed.

Every implementation computes the whole op the model needs, RoPE included: ``eager`` rotates with torch ops
then calls SDPA; the vendor rows rotate q and k with our fused RoPE pass (the Triton kernel on CUDA, one
launch for both) and then call their kernel, as ``ops.attention(impl="sdpa" / "flash_attn")`` does.
Inputs are the strided q, k, v views of one [B, N, 3*H*D] projection output, as the model passes them.
The ``attention_kernel`` rows time the attention alone, every implementation on q and k rotated beforehand (the
RoPE pass's outputs, v still the strided view): the RoPE pass all the whole-op rows share adds the same time to
both sides of their ratios, and so brings them nearer 1.

FLOP model (non-causal, RoPE not counted): forward 4*B*H*N^2*D (q k^T and p v, 2 FLOPs per multiply-add);
backward 2.5x that: five matmuls of the size of the forward's two (q k^T recomputed, dv, dp, dq, dk), as
FlashAttention counts it.
Goal (issue 5, H200): forward >= 1.0x and backward >= 0.9x the best SDPA backend at N = 1024, D = 64 and
72, B*H >= 256.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import pytest
import torch

from benchmarks import grids
from benchmarks.harness import DEVICE, cuda_time_ms, dtype_of, gate, gate_backward, impls, pick, record
from sphere_fast.ops.rope import rope_pass, rope_table_reference

attn = importlib.import_module("sphere_fast.ops.attention")
rope_table = functools.partial(rope_table_reference, device=DEVICE)

DTYPE = dtype_of(grids.ATTENTION_DTYPE)
SHAPES = pick(real=grids.ATTENTION_SHAPES, smoke=[(1, 2, 17, 72)])


def _sdpa_with(backend_name: str) -> Callable[[], Callable[..., torch.Tensor]]:
    """Loader for the RoPE pass + SDPA pinned to one of torch's SDPA backends (RuntimeError if unusable)."""

    def load() -> Callable[..., torch.Tensor]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)

        def run(q, k, v, rope):
            with sdpa_kernel(backend):
                return attn.attention(q, k, v, rope, impl="sdpa")

        q = torch.randn(1, 2, 16, 64, device=DEVICE, dtype=DTYPE)
        run(q, q, q, rope_table(16, 64))  # raises RuntimeError when this backend cannot run here
        return run

    return load


def _flash_attn() -> Callable[..., torch.Tensor]:
    if "flash_attn" not in attn.attention_impls(DEVICE, DTYPE, 64):
        raise ImportError("flash_attn is not importable (or no CUDA)")
    return lambda q, k, v, rope: attn.attention(q, k, v, rope, impl="flash_attn")


VENDOR = {
    "sdpa_flash": _sdpa_with("FLASH_ATTENTION"),
    "sdpa_efficient": _sdpa_with("EFFICIENT_ATTENTION"),
    "sdpa_cudnn": _sdpa_with("CUDNN_ATTENTION"),
    "sdpa_math": _sdpa_with("MATH"),
    "flash_attn": _flash_attn,
}
IMPLS = impls(attn.attention, attn.attention_reference, backends=("triton",), vendor=VENDOR)


def split_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, H, N, D] as the model makes them: strided views of its [B, N, 3*H*D] projection."""
    b, n, width3 = qkv.shape
    return qkv.view(b, n, 3, heads, width3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)


def _inputs(shape: tuple[int, int, int, int], requires_grad: bool):
    b, h, n, d = shape
    qkv = torch.randn(b, n, 3 * h * d, device=DEVICE, dtype=DTYPE, requires_grad=requires_grad)
    return qkv, *split_qkv(qkv, h), rope_table(n, d)


def _rotated_inputs(shape: tuple[int, int, int, int], requires_grad: bool) -> tuple[torch.Tensor, ...]:
    """q and k after the RoPE pass (in its output layout, as the kernels receive them) and v the strided view of
    the projection, each a leaf: the attention_kernel rows' inputs."""
    _, q, k, v, rope = _inputs(shape, requires_grad=False)
    q, k = rope_pass(q, k, rope, None)
    return tuple(t.detach().requires_grad_(requires_grad) for t in (q, k, v))


BACKWARD_FLOPS = 2.5  # the backward's FLOPs per forward FLOP (see the FLOP model above)


def _flops(shape: tuple[int, int, int, int]) -> int:
    b, h, n, d = shape
    return 4 * b * h * n * n * d


def _id(shape: tuple[int, int, int, int]) -> str:
    return "B{}-H{}-N{}-D{}".format(*shape)


def time_forward(benchmark, ceilings, impl, op: str, shape, q, k, v, rope) -> None:
    gate(impl(q, k, v, rope), attn.attention_reference(q.float(), k.float(), v.float(), rope), impl.name, DTYPE)
    ms = cuda_time_ms(lambda: impl(q, k, v, rope))
    record(benchmark, op=op, impl=impl.name, shape=shape, dtype=DTYPE, ms=ms, flops=_flops(shape), ceilings=ceilings)


def time_backward(benchmark, ceilings, impl, op: str, shape, out, leaves, reference) -> None:
    """The backward from ``out`` to ``leaves``, gated against ``reference`` on float32 copies of the leaves."""
    grad = torch.randn_like(out)
    gate_backward(out, leaves, grad, reference, impl.name)
    ms = cuda_time_ms(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True))
    record(benchmark, op=op, impl=impl.name, shape=shape, dtype=DTYPE, ms=ms,
           flops=int(BACKWARD_FLOPS * _flops(shape)), ceilings=ceilings)


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_attention_fwd(benchmark, ceilings, impl, shape) -> None:
    _, q, k, v, rope = _inputs(shape, requires_grad=False)
    time_forward(benchmark, ceilings, impl, "attention_fwd", shape, q, k, v, rope)


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_attention_bwd(benchmark, ceilings, impl, shape) -> None:
    qkv, q, k, v, rope = _inputs(shape, requires_grad=True)
    heads = shape[1]
    time_backward(benchmark, ceilings, impl, "attention_bwd", shape, impl(q, k, v, rope), [qkv],
                  lambda t: attn.attention_reference(*split_qkv(t, heads), rope))


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_attention_kernel_fwd(benchmark, ceilings, impl, shape) -> None:
    time_forward(benchmark, ceilings, impl, "attention_kernel_fwd", shape, *_rotated_inputs(shape, False), None)


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_attention_kernel_bwd(benchmark, ceilings, impl, shape) -> None:
    q, k, v = _rotated_inputs(shape, requires_grad=True)
    time_backward(benchmark, ceilings, impl, "attention_kernel_bwd", shape, impl(q, k, v, None), [q, k, v],
                  attn.attention_reference)
