"""Hopper compile checks of the seeded-label kernel without a GPU (tests/sm90.py): the Triton kernel compiles for
sm_90a without local memory, also through the op's own launch at one class (Triton passes an int argument equal to 1
as a constant unless told not to). The CUDA kernel is in spherify_cuda.cu, checked in test_sm90_spherify.py."""

from __future__ import annotations

import pytest

from tests import sm90

K = pytest.importorskip("sphere_fast.kernels.labels")


def test_triton_kernel_no_spills() -> None:
    signature = {"seeds_ptr": "*i64", "out_ptr": "*i64", "B": "i32", "counter": "i32", "n": "i32"}
    try:
        info = sm90.compile_triton_sm90(K.seeded_labels_kernel, signature, {"BLOCK": 128})
    except sm90.CompileError as exc:
        pytest.fail(str(exc))
    sm90.assert_no_spills(info)


def labels_compile_for(class_counts: list[int], batches: list[int]) -> int:
    """Run in a child process (interpreter off, the stand-in driver): the op's launches compiled as on a GPU; returns
    how many variants of the kernel they compiled."""
    import torch

    from sphere_fast import ops
    from sphere_fast.ops._util import launches_compile_only

    sm90.compile_ops_on_cpu()
    with launches_compile_only():
        for n in class_counts:
            for batch in batches:
                ops.seeded_labels(torch.arange(batch) - 4, n, backend="triton")
    return sum(len(cache[0]) for cache in K.seeded_labels_kernel.device_caches.values())


def test_the_op_s_launches_compile_to_one_variant(tmp_path) -> None:
    """At one class, and at any batch: a capture's warm-up launches it at the bucket's size, a call at its own, so a
    variant a batch size (Triton specializes ints equal to 1 or divisible by 16) would compile at the call."""
    variants = sm90.call_in_compile_child(
        "tests.test_sm90_labels:labels_compile_for", tmp_path, [1, 1000, 2**31 - 1], [1, 16, 50, 64]
    )
    assert variants == 1
