"""sphere_fast.ops.philox against Triton's own tl.randint4x / tl.rand / tl.randn (run by the interpreter).

The Philox words and the uniforms must match bit for bit. The normals go through log/sqrt/cos, whose float32
implementations differ between torch and numpy (the interpreter) by an ulp or two, so they are compared with
atol = rtol = 1e-6 (|e| < 6, observed max difference 3.6e-7).
"""

import pytest
import torch
import triton
import triton.language as tl

from sphere_fast.ops import philox as P

SEEDS = [0, 1, 42, 2**32 + 5, -1, -(2**40) - 17, 2**63 - 1, -(2**63)]
N = 1024


@triton.jit
def _randoms_kernel(seed, off_ptr, w0_ptr, w1_ptr, u_ptr, n_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    off = tl.load(off_ptr + i)
    w0, w1, _, _ = tl.randint4x(seed, off)
    tl.store(w0_ptr + i, w0.to(tl.int32, bitcast=True))
    tl.store(w1_ptr + i, w1.to(tl.int32, bitcast=True))
    tl.store(u_ptr + i, tl.rand(seed, off))
    tl.store(n_ptr + i, tl.randn(seed, off))


def _offsets() -> torch.Tensor:
    special = torch.tensor([2**32 - 2, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 3, 2**62 + 7, 123456789012])
    head = torch.arange(N - special.numel())
    return torch.cat([head, special]).to(torch.int64)


def _triton_randoms(seed: int, offsets: torch.Tensor):
    w0, w1 = (torch.empty(N, dtype=torch.int32) for _ in range(2))
    u, n = (torch.empty(N, dtype=torch.float32) for _ in range(2))
    _randoms_kernel[(1,)](seed, offsets, w0, w1, u, n, N)
    return w0.to(torch.int64) & 0xFFFFFFFF, w1.to(torch.int64) & 0xFFFFFFFF, u, n


@pytest.mark.parametrize("seed", SEEDS)
def test_matches_triton(seed):
    offsets = _offsets()
    w0, w1, u, n = _triton_randoms(seed, offsets)
    c0, c1 = P._philox_c0_c1(torch.tensor(seed), offsets)
    assert torch.equal(c0, w0) and torch.equal(c1, w1)
    assert torch.equal(P._uint_to_uniform(c0), u)
    torch.testing.assert_close(P.philox_randn(torch.tensor(seed), offsets), n, atol=1e-6, rtol=1e-6)


@triton.jit
def _words_to_normal_kernel(w0_ptr, w1_ptr, u_ptr, n_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    u1 = tl.random.uint_to_uniform_float(tl.load(w0_ptr + i))
    u2 = tl.random.uint_to_uniform_float(tl.load(w1_ptr + i))
    n, _ = tl.random.pair_uniform_to_normal(u1, u2)
    tl.store(u_ptr + i, u1)
    tl.store(n_ptr + i, n)


def test_edge_words_map_as_triton_maps_them():
    """The words at the ends of the int32 range and around its sign (which Philox gives once in 2**32 draws):
    a zero word's uniform is floored, so its normal stays finite."""
    words = torch.tensor([0, 1, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1])
    c0, c1 = words, words.flip(0)
    u, n = torch.empty(8), torch.empty(8)
    _words_to_normal_kernel[(1,)](c0.to(torch.int32), c1.to(torch.int32), u, n, 8)  # the same 32 bits
    assert torch.equal(P._uint_to_uniform(c0), u)
    normal = P._words_to_normal(c0, c1)
    assert bool(normal.isfinite().all())
    torch.testing.assert_close(normal, n, atol=1e-6, rtol=1e-6)


def test_sphere_noise_convention():
    seeds = torch.tensor([3, -9, 2**35], dtype=torch.int64)
    shape = (2, 5, 7)
    e = P.sphere_noise_reference(seeds, shape, stream=3)
    assert e.shape == (3, *shape) and e.dtype == torch.float32
    length = 2 * 5 * 7
    for b in range(3):
        offsets = 3 * length + torch.arange(length)
        assert torch.equal(e[b].flatten(), P.philox_randn(seeds[b], offsets))
    # streams are disjoint slices of one sequence
    assert torch.equal(P.sphere_noise_reference(seeds, (length,), stream=1)[:, :4], P.philox_randn(seeds[:, None], length + torch.arange(4)))


def test_noise_statistics_and_determinism():
    seeds = torch.tensor([11, 12], dtype=torch.int64)
    e = P.sphere_noise_reference(seeds, (65536,), stream=0)
    assert abs(e.mean().item()) < 0.01  # 131k draws: std of the mean is 0.003
    assert abs(e.var().item() - 1.0) < 0.02
    assert torch.equal(e, P.sphere_noise_reference(seeds, (65536,), stream=0))
    assert not torch.equal(e[0], e[1])
    assert not torch.equal(e, P.sphere_noise_reference(seeds, (65536,), stream=1))


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: P.sphere_noise_reference([1, 2], (4,)), TypeError, "seeds"),
        (lambda: P.sphere_noise_reference(torch.tensor([1, 2], dtype=torch.int32), (4,)), TypeError, "seeds"),
        (lambda: P.sphere_noise_reference(torch.tensor([[1, 2]]), (4,)), ValueError, "seeds"),
        (lambda: P.sphere_noise_reference(torch.tensor([1]), (0, 3)), ValueError, "shape"),
        (lambda: P.sphere_noise_reference(torch.tensor([1]), (2.5,)), TypeError, "shape"),
        (lambda: P.sphere_noise_reference(torch.tensor([1]), (True, 3)), TypeError, "shape"),
        (lambda: P.sphere_noise_reference(torch.tensor([1]), ()), ValueError, "non-empty"),
        (lambda: P.sphere_noise_reference(torch.tensor([1]), (4,), stream=-1), ValueError, "stream"),
        (lambda: P.philox_randn(torch.tensor(1.0), torch.tensor([1])), TypeError, "seed"),
        (lambda: P.philox_randn(torch.tensor(1), torch.tensor([1], dtype=torch.int32)), TypeError, "offset"),
        (lambda: P.philox_randn(torch.tensor(1), torch.tensor([1], device="meta")), ValueError, "same device"),
    ],
)
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_philox_below_scales_triton_s_word_at_the_top_counter():
    """philox_below(seed, -1, n) = floor(word * n / 2**32) for Philox's first word at offset -1, the unsigned counter
    2**64 - 1 (Triton's own randint4x); every value lies in [0, n) and each of n = 10 is about as frequent."""
    seeds = torch.tensor(SEEDS)
    words = torch.stack([_triton_randoms(seed, torch.full((N,), -1))[0][0] for seed in SEEDS])
    for n in (1, 10, 1000, 2**31 - 1):
        expected = torch.tensor([w * n // 2**32 for w in words.tolist()])
        assert torch.equal(P.philox_below(seeds, -1, n), expected)
    counts = torch.bincount(P.philox_below(torch.arange(10_000), -1, 10), minlength=10)
    assert counts.min() > 850 and counts.max() < 1150, counts  # 1000 each, std about 30
