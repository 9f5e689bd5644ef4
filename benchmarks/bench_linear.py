"""The models' linear layers (cuBLAS through F.linear, bias included) at the token counts sampling runs.

Sphere-L's SwiGLU hidden width is int(1024 * 8/3) = 2730: the w12 output rows (5460 bf16 = 10920 bytes)
and the w3 input rows (5460 bytes) are not 16-byte multiples, which Hopper's TMA-fed GEMM kernels need.
The ``w12_pad64`` / ``w3_pad64`` rows time the same layers with the hidden width padded to 2752, as the
model runs them on the fused backends (``nn.layers.MLP_ALIGN``; zero rows and columns give the same
result); their matmul % against the official rows says whether that padding earns its weight copies.
Sphere-XL's 3072 is aligned already.

``test_mlp_up`` times the MLP's first half, x -> silu(a) * b at the hidden width the model computes with:
``eager`` (F.linear on the official w12, then silu(a) * b in torch), ``cublas_swiglu`` (what the fused backends
run by default: F.linear on the padded w12, then the SwiGLU kernel) and ``triton`` (ops.swiglu_linear: one GEMM
with the activation in its epilogue, on the official w12). Whether ``triton`` beats ``cublas_swiglu`` at both
token counts decides the default of SPHERE_FAST_FUSED_MLP (nn/layers.py).

Token counts: 2048 (batch 1 with combo CFG, 1024 tokens a sample) and 131072 (batch 64 with CFG).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from benchmarks.harness import DEVICE, cuda_time_ms, gate, pick, record
from sphere_fast import available_backends, ops
from sphere_fast.nn.layers import SwiGLU

DTYPE = pick(real=torch.bfloat16, smoke=torch.float32)
TOKENS = pick(real=[2048, 131072], smoke=[8])
# name -> (in_features, out_features)
LAYERS = pick(
    real={
        "L_qkv": (1024, 3072), "L_proj": (1024, 1024), "L_w12": (1024, 5460), "L_w3": (2730, 1024),
        "L_w12_pad64": (1024, 5504), "L_w3_pad64": (2752, 1024),
        "XL_qkv": (1152, 3456), "XL_w12": (1152, 6144), "XL_w3": (3072, 1152),
    },
    smoke={"L_w3": (10, 4)},
)


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda m: f"M{m}")
def test_linear(benchmark, ceilings, tokens: int, layer: str) -> None:
    k, n = LAYERS[layer]
    x = torch.randn(tokens, k, dtype=DTYPE, device=DEVICE)
    weight = torch.randn(n, k, dtype=DTYPE, device=DEVICE) / k**0.5
    bias = torch.randn(n, dtype=DTYPE, device=DEVICE)
    out = torch.nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(out.float(), x.float() @ weight.float().T + bias.float(), atol=5e-2, rtol=5e-2)
    ms = cuda_time_ms(lambda: torch.nn.functional.linear(x, weight, bias))
    record(benchmark, op=f"linear_{layer}", impl="torch", shape=[tokens, k, n], dtype=DTYPE, ms=ms,
           bytes_moved=(tokens * k + n * k + tokens * n) * x.element_size(), flops=2 * tokens * k * n,
           ceilings=ceilings)


MLP_WIDTHS = pick(real={"L": 1024, "XL": 1152}, smoke={"tiny": 16})
MLP_UP_IMPLS = ("eager", "cublas_swiglu", "triton")
MLP_DTYPE = torch.bfloat16  # the fused kernel's dtypes are fp16 / bf16 (in smoke mode too, in the interpreter)


def mlp_layer(width: int, tokens: int) -> tuple[SwiGLU, torch.Tensor]:
    """A SwiGLU layer of ``width`` (random init, MLP_DTYPE, no gradients) and an input of ``tokens`` rows."""
    torch.manual_seed(0)
    layer = SwiGLU(width).to(DEVICE, MLP_DTYPE).requires_grad_(False)
    return layer, torch.randn(tokens, width, dtype=MLP_DTYPE, device=DEVICE)


def mlp_up_flops(layer: SwiGLU, tokens: int) -> int:
    """The MLP's first half, [tokens, k] x [k, 2H] with H its unpadded width: 2 FLOPs a multiply-add."""
    return 2 * tokens * layer.w12.in_features * 2 * layer.w3.in_features


def mlp_up_runs(layer: SwiGLU, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """The MLP's first half on ``x`` with the layer's weights, as each of MLP_UP_IMPLS computes it."""
    w12, b12 = layer.w12.weight, layer.w12.bias
    w12_padded, b12_padded = layer.padded_w12()
    width = layer.padded_hidden
    return {
        "eager": lambda: ops.swiglu_linear_reference(x, w12, b12),
        "cublas_swiglu": lambda: ops.swiglu(torch.nn.functional.linear(x, w12_padded, b12_padded), backend="triton"),
        "triton": lambda: ops.swiglu_linear(x, w12, b12, out_width=width, backend="triton"),
    }


def gate_mlp_up(out: torch.Tensor, layer: SwiGLU, x: torch.Tensor, what: str) -> None:
    """out's first H columns against the float32 reference (the padded columns are not compared)."""
    reference = ops.swiglu_linear_reference(x.float(), layer.w12.weight.float(), layer.w12.bias.float())
    gate(out[:, : layer.w3.in_features], reference, what, x.dtype)


@pytest.mark.parametrize("impl", MLP_UP_IMPLS)
@pytest.mark.parametrize("model", list(MLP_WIDTHS))
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda m: f"M{m}")
def test_mlp_up(benchmark, ceilings, tokens: int, model: str, impl: str) -> None:
    if impl != "eager" and "triton" not in available_backends(DEVICE):
        pytest.skip(f"the triton backend is not available on {DEVICE.type}")
    layer, x = mlp_layer(MLP_WIDTHS[model], tokens)
    k, hidden = layer.w12.in_features, layer.w3.in_features
    run = mlp_up_runs(layer, x)[impl]
    with torch.no_grad():
        gate_mlp_up(run(), layer, x, impl)
        ms = cuda_time_ms(run)
    out_width = hidden if impl == "eager" else layer.padded_hidden
    record(benchmark, op=f"mlp_up_{model}", impl=impl, shape=[tokens, k, hidden], dtype=MLP_DTYPE, ms=ms,
           bytes_moved=(tokens * k + 2 * hidden * k + tokens * out_width) * x.element_size(),
           flops=mlp_up_flops(layer, tokens), ceilings=ceilings)
