"""The models' linear layers (cuBLAS through F.linear, bias included) at the token counts sampling runs.

Sphere-L's SwiGLU hidden width is int(1024 * 8/3) = 2730: the w12 output rows (5460 bf16 = 10920 bytes)
and the w3 input rows (5460 bytes) are not 16-byte multiples, which Hopper's TMA-fed GEMM kernels need.
The ``w12_pad64`` / ``w3_pad64`` rows time the same layers with the hidden width padded to 2752, as the
model runs them on the fused backends (``nn.layers.MLP_ALIGN``; zero rows and columns give the same
result); their matmul % against the official rows says whether that padding earns its weight copies.
Sphere-XL's 3072 is aligned already.

Token counts: 2048 (batch 1 with combo CFG, 1024 tokens a sample) and 131072 (batch 64 with CFG).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.harness import DEVICE, cuda_time_ms, pick, record

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
