"""Triton launches on the current CUDA device: every Triton launcher makes its input's device current first
(sphere_fast.ops._util.on_input_device). Checked without a GPU by standing in for torch.cuda.device."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

from sphere_fast.ops._util import on_input_device

LAUNCHERS = {
    "sphere_fast.ops.spherify": ("_triton_fwd", "_triton_bwd", "_triton_noise"),
    "sphere_fast.ops.adaln": ("_triton_fwd", "_triton_bwd"),
    "sphere_fast.ops.swiglu": ("_triton_fwd", "_triton_bwd"),
    "sphere_fast.ops.attention": ("_triton_forward", "_triton_backward"),
    "sphere_fast.ops.rope": ("_triton_rope",),
}


def fake_cuda_tensor(index: int) -> SimpleNamespace:
    return SimpleNamespace(is_cuda=True, device=torch.device("cuda", index), get_device=lambda: index)


def test_launcher_runs_on_the_input_device(monkeypatch: pytest.MonkeyPatch) -> None:
    current = ["cuda:0"]
    switches = []

    @contextlib.contextmanager
    def device(d: torch.device) -> Iterator[None]:
        switches.append(str(d))
        previous, current[0] = current[0], str(d)
        try:
            yield
        finally:
            current[0] = previous

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: int(current[0].split(":")[1]))
    seen = []
    launch = on_input_device(lambda t, *args: seen.append((current[0], args)))
    launch(fake_cuda_tensor(1), 7)
    launch(torch.zeros(1), 8)  # CPU (interpreter): no device switch
    launch(fake_cuda_tensor(0), 9)  # already current: no device switch
    assert seen == [("cuda:1", (7,)), ("cuda:0", (8,)), ("cuda:0", (9,))]
    assert current == ["cuda:0"] and switches == ["cuda:1"]


@pytest.mark.parametrize("module,name", [(m, n) for m, names in LAUNCHERS.items() for n in names])
def test_every_triton_launcher_is_guarded(module: str, name: str) -> None:
    fn = getattr(importlib.import_module(module), name)
    assert fn.__wrapped__.__name__ == name  # functools.wraps of on_input_device
    assert fn.__code__ is on_input_device(lambda t: None).__code__
