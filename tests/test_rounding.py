"""The kernels' bf16 rounding emulation (kernels/rounding.py: ``to_dtype`` with EMULATE_BF16) against torch's own
fp32 -> bf16 conversion, bit for bit: round to nearest, ties to the even value, on the values where the two
directions differ (exact ties with an even and an odd kept bit, one bit either side of a tie), and at the edges
(signed zeros, subnormals, the largest finite float, which rounds to inf, and infinities)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from sphere_fast.kernels.rounding import to_dtype  # noqa: E402

pytestmark = pytest.mark.cuda_capable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _round_to_bf16_kernel(X, OUT, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    tl.store(OUT + offs, to_dtype(tl.load(X + offs, mask=mask), tl.bfloat16, True), mask=mask)


def _edge_bits() -> list[int]:
    """fp32 bit patterns: for kept values with an even and an odd last bit, the exact tie and its neighbours."""
    bits = []
    for kept in (0x3F80_0000, 0x3F81_0000, 0x4049_0000, 0x404A_0000, 0x0001_0000, 0x7F7E_0000, 0x7F7F_0000):
        for low in (0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF):
            bits += [kept | low, kept | low | 0x8000_0000]
    return bits + [0x0000_0000, 0x8000_0000, 0x0000_0001, 0x7F7F_FFFF, 0x7F80_0000, 0xFF80_0000] + NAN_BITS


# NaNs: quiet, with the whole mantissa set (rounding it up carried into the exponent), signalling, negative
NAN_BITS = [0x7FC0_0000, 0x7FFF_FFFF, 0xFFFF_FFFF, 0x7F80_0001, 0xFFC0_0000]


def test_to_dtype_rounds_as_torch_does() -> None:
    """Bit for bit, but for NaNs: a NaN (its payload is the hardware's: torch's CPU conversion gives 0x7FC0, a GPU's
    cvt 0x7FFF)."""
    bits = torch.tensor(_edge_bits(), dtype=torch.int64).to(torch.int32)  # wraps the sign bit into int32
    x = bits.view(torch.float32).to(DEVICE)
    out = torch.empty_like(x)
    _round_to_bf16_kernel[(1,)](x, out, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    expected = x.to(torch.bfloat16).float()
    nan = x.isnan()
    assert nan.sum() == len(NAN_BITS) and out[nan].isnan().all()
    wrong = ((out.view(torch.int32) != expected.view(torch.int32)) & ~nan).nonzero().flatten().tolist()
    assert not wrong, [(hex(_edge_bits()[i] & 0xFFFF_FFFF), out[i].item(), expected[i].item()) for i in wrong]


def test_the_emulation_compiles_for_hopper() -> None:
    """On a GPU the test above runs the emulation compiled: it must compile (with a constexpr if whose body
    returned, the compiler took both returns, bf16 and fp32, and refused them)."""
    from tests.sm90 import compile_triton_sm90

    info = compile_triton_sm90(_round_to_bf16_kernel, {"X": "*fp32", "OUT": "*fp32", "N": "i32"}, {"BLOCK": 128})
    assert info.resources.local == 0
