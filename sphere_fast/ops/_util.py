"""Small launch helpers shared by the op modules."""


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (block sizes of Triton launches)."""
    return 1 << max(0, (n - 1).bit_length())
