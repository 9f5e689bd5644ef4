"""Seeds of a run's random streams, and random draws that torch.compile can trace with dynamic shapes."""

from __future__ import annotations

import hashlib
import operator

import torch

# Names the way a run's stream seeds derive from its seed; a checkpoint records it (a run resumed under another
# derivation reads the rest of its data in another order).
SEED_DERIVATION = "blake2b-64/1"


def derive_seed(seed: int, *stream: int | str) -> int:
    """The seed in [0, 2**63) of the random stream named ``stream`` (a tag and indices) in a run seeded ``seed``: a
    hash, so every (seed, stream) starts an unrelated stream, none of them the seed's own. An additive seed + k
    would not: run 1's epoch 0 would shuffle as run 0's epoch 1, and rank 0's noise would redraw the initial
    weights' numbers."""
    # operator.index: a numpy integer's repr is not its int's, and would name another stream
    parts = (operator.index(seed), *(k if isinstance(k, str) else operator.index(k) for k in stream))
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator_kwargs(generator: torch.Generator | None) -> dict[str, torch.Generator]:
    """``generator=`` for torch.rand / randperm only when one is given: an explicit ``generator=None`` selects the
    overloads that refuse symbolic sizes, so torch.compile(dynamic=True) of the training forward failed."""
    return {} if generator is None else {"generator": generator}
