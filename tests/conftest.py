"""Tests tune afresh: launch configs chosen by the tuning stay in memory (tests/test_tuning.py turns the on-disk
store on for its own tests, in a temporary folder)."""

import importlib
import os
import sys

import pytest
import torch

os.environ.setdefault("SPHERE_FAST_TUNING_CACHE", "0")


@pytest.fixture
def fresh_tuning(monkeypatch: pytest.MonkeyPatch):
    """No launch config remembered before the test or after it, and tuning on (its default)."""
    from sphere_fast.ops import _tuning

    monkeypatch.delenv("SPHERE_FAST_AUTOTUNE", raising=False)
    _tuning.forget_tuned_configs()
    yield
    _tuning.forget_tuned_configs()


@pytest.fixture
def as_on_cuda(monkeypatch: pytest.MonkeyPatch):
    """Backends resolved as on a CUDA machine with every backend (where ``auto`` takes a kernel first), whatever the
    tensors' device: ``resolve_backend`` patched where sphere_fast defines it and in each module that imported it."""
    from sphere_fast import backend as backend_module

    attention = importlib.import_module("sphere_fast.ops.attention")  # the package's `attention` is the function

    real = backend_module.resolve_backend

    def resolve_as_on_cuda(op, device, requested, order):
        return real(op, torch.device("cuda"), requested, order)

    for name, module in list(sys.modules.items()):
        if name.startswith("sphere_fast") and getattr(module, "resolve_backend", None) is real:
            monkeypatch.setattr(module, "resolve_backend", resolve_as_on_cuda)
    monkeypatch.setattr(backend_module, "available_backends", lambda device=None: list(backend_module.BACKENDS))
    monkeypatch.delenv("SPHERE_FAST_BACKEND", raising=False)
    caches = (backend_module._resolve, attention._choose)  # memoized answers of the real machine, and then of this
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()
