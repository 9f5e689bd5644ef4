"""The SwiGLU MLP's first projection and activation in one GEMM: silu(a) * b for cat(a, b) = x @ weight^T + bias.

``swiglu_linear(x, weight, bias, out_width=None)``: x [..., K], weight [2H, K] (the official w12: the a rows,
then the b rows), bias [2H] or None -> [..., out_width] (default H). Columns from H on are zeros, so the second
projection can run on a hidden width padded for aligned GEMMs while the first reads the official weight as is.

Backends: ``eager`` is the reference (F.linear, then the SwiGLU reference). ``triton`` is the fused kernel
(kernels/swiglu_linear.py), for inference: it has no backward (a call that needs a gradient is refused), takes
fp16 / bf16, and K a multiple of 8 (16-byte rows for its tensor descriptors). It neither writes nor rounds the
[M, 2H] pre-activation, so it matches the reference up to the GEMM's rounding, not bit for bit (F.linear then
SwiGLU rounds the pre-activation to the input dtype first). ``auto`` takes triton on CUDA where the kernel takes
the inputs, else the reference: it does not refuse what eager takes (fp32, a call that needs a gradient, K not a
multiple of 8), where an explicit ``triton`` raises. There is no C++ kernel: ``cpp`` is resolved as ``auto``. On a
GPU the launch config is tuned per call shape (ops/_tuning.py).

Whether the model's MLPs use it is ``nn.layers.fused_mlp_enabled``: not by default, as against cuBLAS and the
SwiGLU kernel on an H200 it was mixed (benchmarks/bench_linear.py; NOTES, 2026-11-29).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sphere_fast.backend import emulate_bf16, requested_cpp_as_auto, resolve_backend, triton_interpreting
from sphere_fast.ops._library import call_op, define_op, forward_only, needs_grad
from sphere_fast.ops._tuning import launch_tuned
from sphere_fast.ops._util import ceil_div, kernel_runner, next_pow2, on_input_device
from sphere_fast.ops.swiglu import swiglu_reference

AUTO_ORDER = ("triton",)
TRITON_DTYPES = (torch.float16, torch.bfloat16)
GROUP_M = 8


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    warp_specialize: bool


# The default first. All sum K in blocks of 64, in order, so they compute the same bits (the tuning checks);
# each compiles for sm_90a with TMA loads, HGMMA and no spills (tests/test_sm90_swiglu_linear.py). None is
# warp specialized until one has run on a GPU: a deadlock would hang the first call (the sweep in
# benchmarks/tune_swiglu_linear.py times those last).
HOPPER_CANDIDATES = (
    GemmConfig(128, 64, 64, 4, 4, False),
    GemmConfig(128, 128, 64, 8, 3, False),
    GemmConfig(64, 64, 64, 4, 4, False),
)
INTERPRETER_CANDIDATES = (GemmConfig(16, 16, 16, 4, 1, False),)  # tiny tiles: tails and several tiles on CPU


def swiglu_linear_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, out_width: int | None = None
) -> Tensor:
    """swiglu_reference(F.linear(x, weight, bias)), [..., K] -> [..., H], zero-padded to ``out_width`` columns
    when given; in x's dtype throughout (torch's own matmul accumulation)."""
    h = swiglu_reference(F.linear(x, weight, bias))
    return h if out_width is None else F.pad(h, (0, out_width - h.shape[-1]))


def _check_inputs(x: object, weight: object, bias: object, out_width: object) -> int:
    """The hidden width H; raises on inputs no backend can take."""
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError(f"x and weight must be torch.Tensors, got {type(x).__name__} and {type(weight).__name__}")
    if weight.ndim != 2 or weight.shape[0] % 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be [2H, K] (the a rows, then the b rows), got shape {tuple(weight.shape)}")
    hidden, k = weight.shape[0] // 2, weight.shape[1]
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"x must be [..., K] with K = {k} (weight's columns), got shape {tuple(x.shape)}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be None or a tensor of shape ({2 * hidden},), got {type(bias).__name__}")
    if bias is not None and bias.shape != (2 * hidden,):
        raise ValueError(f"bias must be None or a tensor of shape ({2 * hidden},), got {tuple(bias.shape)}")
    tensors = [t for t in (x, weight, bias) if t is not None]
    if len({t.dtype for t in tensors}) > 1:
        raise TypeError(f"x, weight and bias must share one dtype, got {[t.dtype for t in tensors]}")
    if not x.is_floating_point():
        raise TypeError(f"x, weight and bias must be floating tensors, got {x.dtype}")
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"x, weight and bias must share one device, got {[str(t.device) for t in tensors]}")
    if out_width is not None and (not isinstance(out_width, int) or isinstance(out_width, bool)):
        raise TypeError(f"out_width must be an int >= H = {hidden}, got {out_width!r}")
    if out_width is not None and out_width < hidden:
        raise ValueError(f"out_width must be an int >= H = {hidden}, got {out_width!r}")
    return hidden


def triton_refusal(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Exception | None:
    """Why the triton kernel cannot take these (checked) inputs, as the error to raise; None when it can. The
    SwiGLU layer asks this before it runs the fused path."""
    if x.dtype not in TRITON_DTYPES:
        return TypeError(f"swiglu_linear: the triton kernel takes float16 or bfloat16, got {x.dtype} "
                         "(use backend='eager')")
    if x.shape[-1] * x.element_size() % 16:
        return ValueError(f"swiglu_linear: the triton kernel needs K * {x.element_size()} bytes to be a multiple of "
                          f"16 (tensor descriptors), got K = {x.shape[-1]}")
    if needs_grad(x, weight, bias):
        return ValueError("swiglu_linear: the triton kernel has no backward; call it under torch.no_grad() or use "
                          "swiglu(F.linear(x, weight, bias)) for training")
    return None


def _aligned(t: Tensor) -> Tensor:
    """t with rows that a tensor descriptor can read: contiguous and 16-byte aligned (copied when not)."""
    if t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _candidates() -> tuple[GemmConfig, ...]:
    return INTERPRETER_CANDIDATES if triton_interpreting() else HOPPER_CANDIDATES


@on_input_device
def _triton_forward(x: Tensor, weight: Tensor, bias: Tensor | None, out_width: int) -> Tensor:
    from triton.tools.tensor_descriptor import TensorDescriptor

    from sphere_fast.kernels.swiglu_linear import swiglu_linear_kernel

    x2, weight = _aligned(x.reshape(-1, x.shape[-1])), _aligned(weight)
    bias = bias.contiguous() if bias is not None else None  # the kernel reads it with a unit stride
    (m, k), hidden = x2.shape, weight.shape[0] // 2
    out = torch.empty((m, out_width), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], out_width)

    def launch(config: GemmConfig, compile_only: bool = False) -> None:
        grid = (ceil_div(m, config.block_m) * ceil_div(out_width, config.block_n),)
        kernel_runner(swiglu_linear_kernel, grid, compile_only)(
            TensorDescriptor(x2, [m, k], [k, 1], [config.block_m, config.block_k]),
            TensorDescriptor(weight, [2 * hidden, k], [k, 1], [config.block_n, config.block_k]),
            weight if bias is None else bias, out, m, hidden, k, out_width, out.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            GROUP_M=GROUP_M, WARP_SPECIALIZE=config.warp_specialize,
            EMULATE_BF16=emulate_bf16(x.dtype),
            num_warps=config.warps, num_stages=config.stages,
        )

    # the row count in powers of two: how many tiles fill the GPU decides the best one, batch by batch bucket
    key = ("swiglu_linear", x.device, x.dtype, k, hidden, out_width, next_pow2(m))
    launch_tuned(key, _candidates(), launch, (out,))
    return out.view(*x.shape[:-1], out_width)


def _swiglu_linear_fake(x, weight, bias, out_width):
    return x.new_empty((*x.shape[:-1], out_width))


@define_op("swiglu_linear_triton", fake=_swiglu_linear_fake, own_autograd=True)
def _swiglu_linear_triton(x: Tensor, weight: Tensor, bias: Tensor | None, out_width: int) -> Tensor:
    return _triton_forward(x, weight, bias, out_width)


forward_only(_swiglu_linear_triton)


def swiglu_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, *, out_width: int | None = None, backend: str | None = None
) -> Tensor:
    """silu(a) * b for cat(a, b) = x @ weight^T + bias: [..., K] -> [..., out_width] (default H = weight rows / 2),
    the columns from H on zero. The triton backend is inference only (no gradient), fp16 / bf16, and raises on
    other inputs; ``auto`` runs the reference for them, and ``cpp`` (no C++ kernel) is resolved as ``auto``."""
    hidden = _check_inputs(x, weight, bias, out_width)
    out_width = hidden if out_width is None else out_width
    requested = requested_cpp_as_auto("swiglu_linear", backend)  # no C++ kernel: cpp runs as auto
    refusal = triton_refusal(x, weight, bias)
    # auto must not refuse what eager takes: inputs the kernel refuses get an empty auto order, which is eager
    order = () if requested == "auto" and refusal is not None else AUTO_ORDER
    if resolve_backend("swiglu_linear", x.device, requested, order) == "eager":
        return swiglu_linear_reference(x, weight, bias, out_width)
    if refusal is not None:  # an explicit triton
        raise refusal
    return call_op(_swiglu_linear_triton, x, weight, bias, out_width)
