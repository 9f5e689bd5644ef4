"""Pure-torch Philox4x32-10 normal draws, bit-identical to Triton's ``tl.randn(seed, offset)``.

Noise element j of sample b in stream k is ``tl.randn(seeds[b], k * L + j)``: sphere_fast's noise convention, so
that a sample's noise depends on its seed alone, the same on every backend and batch.

Triton's recipe (triton/language/random.py): key (k0, k1) = (low, high) 32 bits of the 64-bit seed,
counter (c0, c1, c2, c3) = (low, high) 32 bits of the 64-bit offset, 0, 0; ten Philox rounds; c0 and c1
become uniforms via int32 -> |x| -> float32 * 4.6566127342e-10; Box-Muller keeps r*cos(th).
uint32 values live in int64 tensors and are masked back to 32 bits after every operation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_M32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_N_ROUNDS = 10
_UINT_TO_FLOAT = 4.6566127342e-10
_TWO_PI = 6.283185307179586
_U1_MIN = 1.0e-7


def _mul_hi_lo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * x for a 32-bit constant a and uint32 values x.

    The 64-bit product would overflow int64, so x is split into 16-bit halves (each partial product < 2^48).
    """
    x_hi = x >> 16
    x_lo = x & 0xFFFF
    p_hi = a * x_hi
    p_lo = a * x_lo
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def _philox_c0_c1(seed: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First two output words of Philox4x32-10 for counter (offset_lo, offset_hi, 0, 0), key = seed."""
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    c0 = offset & _M32
    c1 = (offset >> 32) & _M32
    c0, c1 = torch.broadcast_tensors(c0, c1)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1


def _uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    # Triton bitcasts to int32 and maps negative v to -v - 1; for v = x - 2^32 that is 0xFFFFFFFF - x.
    x = torch.where(x > 0x7FFFFFFF, _M32 - x, x)
    # torch.full, not torch.tensor: no host-to-device copy, so a CUDA graph can capture it
    return x.to(torch.float32) * torch.full((), _UINT_TO_FLOAT, dtype=torch.float32, device=x.device)


def _check_int64(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int64 torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype torch.int64, got {t.dtype}")
    return t


def philox_randn(seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """tl.randn(seed, offset) elementwise: seed and offset int64 tensors broadcast together -> float32."""
    seed = _check_int64("seed", seed)
    offset = _check_int64("offset", offset)
    if seed.device != offset.device:
        raise ValueError(f"seed and offset must be on the same device, got {seed.device} and {offset.device}")
    return _words_to_normal(*_philox_c0_c1(seed, offset))


def philox_below(seed: torch.Tensor, offset: int, n: int) -> torch.Tensor:
    """Integers uniform in [0, ``n``) (n < 2**31), one per seed of ``seed`` (int64): Philox4x32-10's first word at
    counter ``offset`` (taken as an unsigned 64-bit counter), scaled by multiply-shift. Integer arithmetic only, so
    every device gives the same integers."""
    seed = _check_int64("seed", seed)
    word, _ = _philox_c0_c1(seed, torch.full_like(seed, offset))
    return (word * n) >> 32


def _words_to_normal(c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """Box-Muller's cosine half on two uint32 words, as tl.randn: u1 floored at 1e-7 (a zero word gives a finite
    normal)."""
    u1 = _uint_to_uniform(c0).clamp_min(_U1_MIN)
    u2 = _uint_to_uniform(c1)
    two_pi = torch.full((), _TWO_PI, dtype=torch.float32, device=u2.device)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(two_pi * u2)


def sample_shape(shape: Sequence[int] | int) -> tuple[int, ...]:
    """A per-sample shape as a tuple of positive ints (validated)."""
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if any(isinstance(d, bool) or not isinstance(d, int) for d in dims):
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}")
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"shape must be a non-empty sequence of positive ints, got {dims}")
    return dims


def check_seeds(seeds: object, batch: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Validate per-sample seeds: a 1-D int64 tensor, of length ``batch`` and on ``device`` when given."""
    seeds = _check_int64("seeds", seeds)
    if seeds.ndim != 1:
        raise ValueError(f"seeds must be 1-D [B], got shape {tuple(seeds.shape)}")
    if batch is not None and seeds.shape[0] != batch:
        raise ValueError(f"seeds must have length B={batch}, got {seeds.shape[0]}")
    if device is not None and seeds.device != device:
        raise ValueError(f"seeds must be on {device} (the device of z), got {seeds.device}")
    return seeds


def check_stream(stream: object, length: int) -> int:
    """A stream of noise of ``length`` elements a sample: its offsets stream * length + j must stay below 2**63
    (the kernels' 64-bit offsets would wrap round to another stream's noise)."""
    if isinstance(stream, bool) or not isinstance(stream, int):
        raise TypeError(f"stream must be an int, got {type(stream).__name__}")
    if stream < 0:
        raise ValueError(f"stream must be >= 0, got {stream}")
    if (stream + 1) * length > 2**63:
        raise ValueError(f"stream {stream} puts the noise offsets (stream * {length} + j) past 2**63")
    return stream


def sphere_noise_reference(seeds: torch.Tensor, shape: Sequence[int], stream: int = 0) -> torch.Tensor:
    """[B, *shape] float32 noise of the sphere_fast convention for per-sample ``seeds`` [B] (int64).

    Element j (flattened) of sample b is tl.randn(seeds[b], stream * L + j) with L = prod(shape).
    """
    seeds = check_seeds(seeds)
    dims = sample_shape(shape)
    length = math.prod(dims)
    stream = check_stream(stream, length)
    offsets = stream * length + torch.arange(length, dtype=torch.int64, device=seeds.device)
    return philox_randn(seeds[:, None], offsets[None, :]).reshape(seeds.shape[0], *dims)
