"""Seeded class labels: label b is an integer uniform in [0, num_classes) drawn from ``seeds[b]`` alone, so that a
sample's seed decides its label as it decides its noise (Philox4x32-10 keyed by the seed: ops/philox.py).

The draw is Philox's first word w at the counter ``LABEL_COUNTER``, scaled by multiply-shift: floor(w * n / 2**32).
The reference (``seeded_labels_reference``, pure torch integer ops: about 300 small ones, each a launch on a GPU)
is one kernel on the triton and cpp backends. Integer arithmetic only: every backend and device gives the same
labels.
"""

from __future__ import annotations

import torch

from sphere_fast._checks import check_int
from sphere_fast.backend import resolve_backend
from sphere_fast.ops._library import define_op
from sphere_fast.ops._util import ceil_div, kernel_runner, on_input_device
from sphere_fast.ops.philox import check_seeds, philox_below

# The Philox counter of a sample's label: 2**64 - 1 as the unsigned counter, above every noise offset (which stays
# below 2**63), so a label and its sample's noise are separate draws.
LABEL_COUNTER = -1
AUTO_ORDER = ("triton", "cpp", "eager")
_BLOCK = 128

__all__ = ["seeded_labels", "seeded_labels_reference"]


def seeded_labels_reference(seeds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 [B] labels in [0, ``num_classes``), one a seed of ``seeds`` (int64 [B])."""
    return philox_below(seeds, LABEL_COUNTER, num_classes)


@on_input_device
def _triton_labels(seeds: torch.Tensor, num_classes: int) -> torch.Tensor:
    from sphere_fast.kernels.labels import seeded_labels_kernel

    out = torch.empty_like(seeds)
    kernel_runner(seeded_labels_kernel, (ceil_div(seeds.shape[0], _BLOCK),))(
        seeds, out, seeds.shape[0], LABEL_COUNTER, num_classes, BLOCK=_BLOCK
    )
    return out


def _labels_fake(seeds, num_classes, backend=None):
    return torch.empty_like(seeds)


@define_op("seeded_labels", fake=_labels_fake)
def _seeded_labels(seeds: torch.Tensor, num_classes: int, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _triton_labels(seeds, num_classes)
    from sphere_fast.ops.spherify import _cpp_ext  # the spherify extension holds the C++ Philox

    return _cpp_ext().philox_below(seeds, LABEL_COUNTER, num_classes)


def seeded_labels(seeds: torch.Tensor, num_classes: int, *, backend: str | None = None) -> torch.Tensor:
    """int64 [B] class labels uniform in [0, ``num_classes``), label b decided by ``seeds[b]`` alone (int64 [B]):
    ``seeded_labels_reference``'s, in one kernel on the triton and cpp backends."""
    seeds = check_seeds(seeds)
    num_classes = check_int("num_classes", num_classes, 1, 2**31)  # the kernels' product w * n is exact below 2**31
    name = resolve_backend("seeded_labels", seeds.device, backend, AUTO_ORDER)
    if name == "eager" or seeds.shape[0] == 0:  # no samples: no launch of an empty grid
        return seeded_labels_reference(seeds, num_classes)
    return _seeded_labels(seeds.contiguous(), num_classes, name)
