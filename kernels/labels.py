"""Triton kernel of seeded labels: out[b] = floor(w * n / 2**32) for w Philox's first word of seeds[b] at a counter."""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["B", "counter", "n"])
def seeded_labels_kernel(seeds_ptr, out_ptr, B, counter, n, BLOCK: tl.constexpr):
    """One label per seed. ``counter`` is taken as Philox's 64-bit counter (the int64 -1 is 2**64 - 1) and n < 2**31,
    so the 64-bit product w * n cannot overflow. No int argument is specialized: one compiled variant serves every
    batch (a capture's warm-up launches it at the bucket's size, a call at its own)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < B
    seed = tl.load(seeds_ptr + offs, mask=mask, other=0)
    # an int64 block of counters: randint4x takes its high word from 64-bit offsets only
    word = tl.randint(seed, tl.full([BLOCK], 0, tl.int64) + counter)
    label = (word.to(tl.uint64) * n.to(tl.uint64)) >> 32
    tl.store(out_ptr + offs, label.to(tl.int64), mask=mask)
