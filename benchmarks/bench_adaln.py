"""AdaLN (RMSNorm + modulate, alone and after a gated residual) and SwiGLU: eager, torch.compile, Triton, CUDA.

Byte model (minimal HBM traffic, e = element size, M = B*N rows, W width, (B, 1, W) modulation):
  adaln_modulate fwd: read x; write y                               -> 2*M*W*e (+ 2*B*W*e modulation, W*e weight,
                                                                       4*M rstd)
  adaln_modulate bwd: read dy, x; write dx                          -> 3*M*W*e (+ rstd, the small grads)
  gated_residual_adaln fwd: read x, branch; write res, y            -> 4*M*W*e (+ 3*B*W*e modulation, W*e weight,
                                                                       4*M rstd)
  gated_residual_adaln bwd: read dy, dres, res, branch; write dx, dbranch -> 6*M*W*e (+ rstd, the small grads)
  swiglu fwd (H = 8W/3 hidden): read h [M, 2H]; write out [M, H]    -> 3*M*H*e
  swiglu bwd: read dout, h; write dh                                -> 5*M*H*e
Rates are reported against the measured copy ceiling; the goal (issue 4) is fwd >= 85 %, bwd >= 75 % at
M >= 32k rows, and never slower than eager or torch.compile.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from benchmarks import grids
from benchmarks.harness import DEVICE, cuda_time_ms, dtype_of, gate, gate_backward, impls, pick, record

adaln = importlib.import_module("sphere_fast.ops.adaln")
swiglu = importlib.import_module("sphere_fast.ops.swiglu")

DTYPE = dtype_of(grids.BLOCK_DTYPE)
SHAPES = pick(real=grids.BLOCK_SHAPES, smoke=[(1, 7, 96)])


def _adaln_inputs(B: int, N: int, W: int, requires_grad: bool) -> list[torch.Tensor]:
    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=DEVICE, dtype=DTYPE).requires_grad_(requires_grad)

    return [t(B, N, W), t(B, N, W), t(B, 1, W), t(W), t(B, 1, W), t(B, 1, W)]


def adaln_bwd_bytes(B: int, N: int, W: int, itemsize: int, gated: bool = True) -> int:
    """The bytes the AdaLN backward must move: six [B, N, W] tensors gated (dy, dres, res and branch read, dx
    and dbranch written), three not (dy and x read, dx written), the float32 rstd, and the per-sample
    modulations and the weight."""
    return (6 if gated else 3) * B * N * W * itemsize + 4 * B * N + ((3 if gated else 2) * B * W + W) * itemsize


def _id(shape: tuple[int, int, int]) -> str:
    return "B{}-N{}-W{}".format(*shape)


MODULATE = impls(adaln.adaln_modulate, adaln.adaln_modulate_reference)
GATED = impls(adaln.gated_residual_adaln, adaln.gated_residual_adaln_reference)
SWIGLU = impls(swiglu.swiglu, swiglu.swiglu_reference)


def _floats(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.float() for t in inputs]


def time_forward(benchmark, ceilings, impl, op: str, shape, inputs: list[torch.Tensor], reference,
                 bytes_moved: int) -> None:
    """Gate ``impl`` against the float32 ``reference``, then time and record its forward."""
    gate(impl(*inputs), reference(*_floats(inputs)), impl.name, DTYPE)
    ms = cuda_time_ms(lambda: impl(*inputs))
    record(benchmark, op=op, impl=impl.name, shape=shape, dtype=DTYPE, ms=ms, bytes_moved=bytes_moved,
           ceilings=ceilings)


def time_backward(benchmark, ceilings, impl, op: str, shape, inputs: list[torch.Tensor], reference,
                  bytes_moved: int) -> None:
    """Gate ``impl``'s gradients (for random upstream gradients) against the float32 ``reference``'s, then time
    and record its backward."""
    outputs = impl(*inputs)
    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    upstream = tuple(torch.randn_like(o) for o in outputs)
    gate_backward(outputs, inputs, upstream, reference, impl.name)
    ms = cuda_time_ms(lambda: torch.autograd.grad(outputs, inputs, upstream, retain_graph=True))
    record(benchmark, op=op, impl=impl.name, shape=shape, dtype=DTYPE, ms=ms, bytes_moved=bytes_moved,
           ceilings=ceilings)


def _modulate_inputs(B: int, N: int, W: int, requires_grad: bool) -> list[torch.Tensor]:
    x, _, _, *modulation = _adaln_inputs(B, N, W, requires_grad)
    return [x, *modulation]


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("impl", MODULATE)
def test_adaln_modulate_fwd(benchmark, ceilings, impl, shape) -> None:
    B, N, W = shape
    e, M = DTYPE.itemsize, B * N
    time_forward(benchmark, ceilings, impl, "adaln_modulate_fwd", shape, _modulate_inputs(B, N, W, False),
                 adaln.adaln_modulate_reference, 2 * M * W * e + (2 * B * W + W) * e + 4 * M)


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("impl", MODULATE)
def test_adaln_modulate_bwd(benchmark, ceilings, impl, shape) -> None:
    B, N, W = shape
    e = DTYPE.itemsize
    time_backward(benchmark, ceilings, impl, "adaln_modulate_bwd", shape, _modulate_inputs(B, N, W, True),
                  adaln.adaln_modulate_reference, adaln_bwd_bytes(B, N, W, e, gated=False))


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("impl", GATED)
def test_gated_residual_adaln_fwd(benchmark, ceilings, impl, shape) -> None:
    B, N, W = shape
    e, M = DTYPE.itemsize, B * N
    time_forward(benchmark, ceilings, impl, "gated_residual_adaln_fwd", shape, _adaln_inputs(B, N, W, False),
                 adaln.gated_residual_adaln_reference, 4 * M * W * e + (3 * B * W + W) * e + 4 * M)


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("impl", GATED)
def test_gated_residual_adaln_bwd(benchmark, ceilings, impl, shape) -> None:
    B, N, W = shape
    e = DTYPE.itemsize
    time_backward(benchmark, ceilings, impl, "gated_residual_adaln_bwd", shape, _adaln_inputs(B, N, W, True),
                  adaln.gated_residual_adaln_reference, adaln_bwd_bytes(B, N, W, e))


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("impl", SWIGLU)
def test_swiglu_fwd(benchmark, ceilings, impl, shape) -> None:
    B, N, W = shape
    H = grids.swiglu_hidden(W)
    h = torch.randn(B, N, 2 * H, device=DEVICE, dtype=DTYPE)
    time_forward(benchmark, ceilings, impl, "swiglu_fwd", (B, N, 2 * H), [h], swiglu.swiglu_reference,
                 3 * B * N * H * h.element_size())


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("impl", SWIGLU)
def test_swiglu_bwd(benchmark, ceilings, impl, shape) -> None:
    B, N, W = shape
    H = grids.swiglu_hidden(W)
    h = torch.randn(B, N, 2 * H, device=DEVICE, dtype=DTYPE, requires_grad=True)
    time_backward(benchmark, ceilings, impl, "swiglu_bwd", (B, N, 2 * H), [h], swiglu.swiglu_reference,
                  5 * B * N * H * h.element_size())
