"""Random draws that torch.compile can trace with dynamic shapes."""

from __future__ import annotations

import torch


def generator_kwargs(generator: torch.Generator | None) -> dict[str, torch.Generator]:
    """``generator=`` for torch.rand / randperm only when one is given: an explicit ``generator=None`` selects the
    overloads that refuse symbolic sizes, so torch.compile(dynamic=True) of the training forward failed."""
    return {} if generator is None else {"generator": generator}
