"""The device ceilings as benchmark rows (and the example of how a bench file uses the harness).

Rows: a device-to-device copy (bytes read + written) and a bf16 matmul, at the sizes the other rows are
scaled against, so each run's table shows the limits it was measured under.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.harness import DEVICE, cuda_time_ms, pick, record

COPY_BYTES = pick(real=[256 << 20, 2 << 30], smoke=[1 << 16])
MATMUL_SIZES = pick(real=[4096, 8192], smoke=[64])


@pytest.mark.parametrize("nbytes", COPY_BYTES, ids=lambda n: f"{n >> 20}MiB" if n >= 1 << 20 else f"{n}B")
def test_copy(benchmark, ceilings, nbytes: int) -> None:
    src = torch.randint(-128, 127, (nbytes,), dtype=torch.int8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, rep=20)
    assert torch.equal(dst, src)
    record(benchmark, op="copy", impl="torch", shape=[nbytes], dtype=torch.int8, ms=ms,
           bytes_moved=2 * nbytes, ceilings=ceilings)


@pytest.mark.parametrize("n", MATMUL_SIZES)
def test_matmul(benchmark, ceilings, n: int) -> None:
    # bf16 matmuls on CPU are slow and not what smoke mode checks: fp32 there.
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    a = torch.randn(n, n, dtype=dtype, device=DEVICE)
    b = torch.randn(n, n, dtype=dtype, device=DEVICE)
    ms = cuda_time_ms(lambda: a @ b, warmup=3, rep=20)
    record(benchmark, op="matmul", impl="torch", shape=[n, n, n], dtype=dtype, ms=ms,
           bytes_moved=3 * n * n * a.element_size(), flops=2 * n**3, ceilings=ceilings)
