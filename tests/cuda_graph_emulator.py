"""A CPU stand-in for CUDA graphs, so the capture/replay plumbing of ``sphere_fast.sampling.Sampler`` runs
without a GPU.

Capture runs every op normally and records it (op, arguments, outputs) on a tape, then fills the new
floating results with NaN (a real capture runs no kernel). ``replay()`` runs the tape again with the same
argument tensors, so it reads whatever the static buffers and earlier outputs hold now, and writes each
result into the recorded output tensor in place. That is what a real graph does: fixed kernels on fixed
addresses. So a value baked in at capture time, a buffer not written before replay, a result read before
any replay or an output returned without a copy shows up on CPU as a wrong image. A replay whose op would
read a tensor that moved since the capture (a parameter's ``.data`` replaced, ``module.to(...)``) raises: a
real graph would read the old address, freed memory by then. A host read of a device
value inside the capture (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``, ``torch.equal``,
``nonzero``) raises, as a real capture would fail.

Only ops that pass torch's dispatcher are recorded: aten ops and the ``torch.library`` ops (one op each,
whatever they launch inside). Limits: in-place updates of existing tensors do run during the capture;
graphs sharing a pool do not share memory here (every intermediate of the tape stays alive); a host copy
(``.cpu()``) is invisible on CPU tensors.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from sphere_fast import sampling


class CaptureError(RuntimeError):
    """An operation a CUDA graph capture forbids."""


def _memory(t: torch.Tensor) -> int:
    """The address of the tensor's storage: views and in-place results share their input's."""
    return t.untyped_storage().data_ptr()


@dataclass
class Step:
    """One recorded op call; ``owned`` indexes the result tensors (pytree leaves of ``out``) in new memory,
    not a view or an in-place update of an input."""

    func: torch._ops.OpOverload
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: Any
    owned: list[int]
    addresses: list[int]  # of the tensor arguments' memory at the capture

    @classmethod
    def record(cls, func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Step:
        addresses = [_memory(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        leaves = pytree.tree_leaves(out)
        owned = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and _memory(t) not in addresses]
        return cls(func, args, kwargs, out, owned, addresses)

    def rerun(self) -> None:
        """Run the op again on the current contents of its inputs; new results go into the recorded ones."""
        now = [_memory(t) for t in pytree.tree_leaves((self.args, self.kwargs)) if isinstance(t, torch.Tensor)]
        if now != self.addresses:
            raise CaptureError(f"replay of {self.func}: an input tensor moved since the capture (a CUDA graph would "
                               "read its old, freed memory)")
        old, new = pytree.tree_leaves(self.out), pytree.tree_leaves(self.func(*self.args, **self.kwargs))
        # A view or in-place result already lives in its input's memory, which the re-run rewrote (copy_
        # into an expanded view would even fail); a new result goes where the capture put it.
        for i in self.owned:
            old[i].copy_(new[i])

    def poison(self) -> None:
        """NaN into the new floating results: a real capture runs no kernel, so they hold garbage until a replay."""
        leaves = pytree.tree_leaves(self.out)
        for i in self.owned:
            if leaves[i].is_floating_point():
                leaves[i].fill_(math.nan)


def _reads_device_value(func: torch._ops.OpOverload, args: tuple[Any, ...]) -> bool:
    """Whether the op makes the host wait for a device value: a scalar read (item, equal, ...) or an output
    shape that depends on the values (nonzero, masked_select, ...). Indexing is one only with a mask."""
    if torch.Tag.data_dependent_output in func.tags:
        return True
    if torch.Tag.dynamic_output_shape not in func.tags:
        return False
    if func is torch.ops.aten.index.Tensor:
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return True


class _Recorder(TorchDispatchMode):
    """Runs each op and appends it to ``tape``; refuses host reads of device values."""

    def __init__(self, tape: list[Step]):
        super().__init__()
        self.tape = tape

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _reads_device_value(func, args):
            raise CaptureError(f"{func} reads a device value on the host (a sync) inside a CUDA graph capture")
        out = func(*args, **kwargs)
        self.tape.append(Step.record(func, args, kwargs, out))
        return out


def _forbidden_tolist(self: torch.Tensor) -> Any:
    raise CaptureError(".tolist() reads device values on the host (a sync) inside a CUDA graph capture")


class EmulatedGraph:
    """Stands in for ``torch.cuda.CUDAGraph``: its tape is filled by ``CudaGraphEmulator.graph`` (the capture)
    and run by ``replay()``."""

    def __init__(self, emulator: CudaGraphEmulator):
        self.emulator = emulator
        self.tape: list[Step] | None = None

    def replay(self) -> None:
        if self.tape is None:
            raise RuntimeError("replay() of a graph that was never captured")
        if self.emulator.capturing:
            raise CaptureError("replay() inside a capture")
        self.emulator.replays += 1
        # a real replay writes its outputs outside autograd's bookkeeping, even those made under inference_mode
        with torch.inference_mode():
            for step in self.tape:
                step.rerun()


class _Stream:
    """Stands in for ``torch.cuda.Stream``: CPU work is ordered already."""

    def __init__(self, device: object = None) -> None:
        self.device = device

    def wait_stream(self, other: _Stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


@dataclass
class CudaGraphEmulator:
    """What the emulated ``torch.cuda`` saw: graphs captured (in order), the pool and stream each capture used,
    the pool handles made, and the number of replays."""

    graphs: list[EmulatedGraph] = field(default_factory=list)
    pools: list[object] = field(default_factory=list)
    streams: list[object] = field(default_factory=list)
    handles: list[object] = field(default_factory=list)
    replays: int = 0
    capturing: bool = False

    @property
    def captures(self) -> int:
        return len(self.graphs)

    def recorded_ops(self) -> set[torch._ops.OpOverload]:
        """Every op on every tape."""
        return {step.func for graph in self.graphs for step in graph.tape or ()}

    def new_graph(self) -> EmulatedGraph:
        return EmulatedGraph(self)

    def graph_pool_handle(self) -> object:
        handle = object()
        self.handles.append(handle)
        return handle

    @contextlib.contextmanager
    def graph(self, cuda_graph: EmulatedGraph, pool: object | None = None, stream: object = None) -> Iterator[None]:
        """Stands in for ``torch.cuda.graph``: records the block's ops onto ``cuda_graph``."""
        if self.capturing:
            raise CaptureError("a capture is already in progress")
        if cuda_graph.tape is not None:
            raise CaptureError("this graph was captured already")
        tape: list[Step] = []
        self.capturing = True
        try:
            # .tolist() reads the data without passing the dispatcher, so the mode cannot see it
            with mock.patch.object(torch.Tensor, "tolist", _forbidden_tolist), _Recorder(tape):
                yield
        finally:
            self.capturing = False
        with torch.no_grad():
            for step in tape:
                step.poison()
        cuda_graph.tape = tape
        self.graphs.append(cuda_graph)
        self.pools.append(pool)
        self.streams.append(stream)

    def patch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Swap the parts of ``torch.cuda`` that sampling.py uses for the emulation, and let a CPU
        ``Sampler`` take its graph path."""
        default_stream = _Stream()
        monkeypatch.setattr(torch.cuda, "CUDAGraph", self.new_graph)
        monkeypatch.setattr(torch.cuda, "graph", self.graph)
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", self.graph_pool_handle)
        monkeypatch.setattr(torch.cuda, "Stream", _Stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda: default_stream)
        monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
        monkeypatch.setattr(sampling, "cuda_graphs_usable", lambda device: True)


@pytest.fixture
def emulated_cuda_graphs(monkeypatch: pytest.MonkeyPatch) -> CudaGraphEmulator:
    """CUDA graphs emulated on CPU for the test (see the module docstring)."""
    emulator = CudaGraphEmulator()
    emulator.patch(monkeypatch)
    return emulator
