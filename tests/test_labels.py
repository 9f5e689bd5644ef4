"""Seeded labels (``sphere_fast.ops.labels``): the triton (interpreter) and cpp kernels give the reference's labels
bit for bit (integer arithmetic; the reference is checked against Triton's own Philox in test_philox.py), the op's
schema and fake kernel, the sampler's draw on the active backend, and bad inputs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import sphere_fast
from sphere_fast.ops import labels as L
from sphere_fast.sampling import sample_labels

KERNELS = ["triton", "cpp"]
# the int64 extremes (the key's two words), negative seeds, and more seeds than one Triton block of 128
SEEDS = torch.cat([torch.tensor([5, -3, 2**40 + 1, 0, -(2**63), 2**63 - 1]), torch.arange(300) * 7919 - 1000])


@pytest.mark.parametrize("backend", KERNELS)
def test_kernels_give_the_reference_labels(backend: str) -> None:
    for n in (1, 10, 1000, 2**31 - 1):
        got = L.seeded_labels(SEEDS, n, backend=backend)
        assert got.dtype == torch.int64 and torch.equal(got, L.seeded_labels_reference(SEEDS, n)), n
    strided = SEEDS[::3]
    assert torch.equal(L.seeded_labels(strided, 10, backend=backend), L.seeded_labels_reference(strided, 10))
    assert L.seeded_labels(SEEDS[:0], 10, backend=backend).shape == (0,)


def test_labels_are_uniform_and_apart_from_the_noise() -> None:
    """Each of 10 classes about as frequent; a label is not the noise's first word (another Philox counter)."""
    counts = torch.bincount(L.seeded_labels_reference(torch.arange(10_000), 10), minlength=10)
    assert counts.min() > 850 and counts.max() < 1150, counts  # 1000 each, std about 30
    from sphere_fast.ops.philox import philox_below

    assert not torch.equal(L.seeded_labels_reference(SEEDS, 1000), philox_below(SEEDS, 0, 1000))


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck(backend: str) -> None:
    torch.library.opcheck(torch.ops.sphere_fast.seeded_labels.default, (SEEDS, 10, backend))
    if backend == "cpp":  # the C++ op itself (its fake kernel registered from Python)
        torch.library.opcheck(torch.ops.sphere_fast_cpp.philox_below.default, (SEEDS, L.LABEL_COUNTER, 10),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["eager", *KERNELS])
def test_sampling_draws_seeded_labels_on_the_active_backend(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A seeded call's labels come from one op call on the backend in use (the reference's ~300 ops on eager)."""
    used = []
    kernel = L._seeded_labels
    monkeypatch.setattr(L, "_seeded_labels", lambda seeds, n, name: used.append(name) or kernel(seeds, n, name))
    model = SimpleNamespace(num_classes=10)
    with sphere_fast.use_backend(backend):
        got = sample_labels(model, 6, None, torch.device("cpu"), seeds=SEEDS[:6])
    assert used == ([] if backend == "eager" else [backend])
    assert torch.equal(got, L.seeded_labels_reference(SEEDS[:6], 10))


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: L.seeded_labels([1, 2], 10), TypeError, "seeds"),
        (lambda: L.seeded_labels(torch.tensor([1, 2], dtype=torch.int32), 10), TypeError, "seeds"),
        (lambda: L.seeded_labels(torch.tensor([[1, 2]]), 10), ValueError, "seeds"),
        (lambda: L.seeded_labels(SEEDS, True), TypeError, "num_classes"),
        (lambda: L.seeded_labels(SEEDS, 10.0), TypeError, "num_classes"),
        (lambda: L.seeded_labels(SEEDS, 0), ValueError, "num_classes"),
        (lambda: L.seeded_labels(SEEDS, 2**31), ValueError, "num_classes"),
        (lambda: L.seeded_labels(SEEDS, 10, backend="cuda"), ValueError, "backend"),
    ],
)
def test_bad_input(call, err, match) -> None:
    with pytest.raises(err, match=match):
        call()


def test_the_cpp_op_checks_its_own_inputs() -> None:
    """A direct call of the registered C++ op skips the Python checks: it refuses what its kernels cannot take."""
    L.seeded_labels(SEEDS, 10, backend="cpp")  # loads the extension
    op = torch.ops.sphere_fast_cpp.philox_below
    for seeds, n, match in ((SEEDS, 0, "n must be in"), (SEEDS, 2**31, "n must be in"),
                            (SEEDS.int(), 10, "int64"), (SEEDS[None], 10, "int64")):
        with pytest.raises(RuntimeError, match=match):
            op(seeds, L.LABEL_COUNTER, n)
