"""Small launch helpers shared by the op modules."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from sphere_fast._context import context_value
from sphere_fast._once import ForkSafeLock

F = TypeVar("F", bound=Callable[..., object])

# Compile options every Triton launch passes. The kernels are written and measured with FMA contraction (a * b + c
# as one instruction, as CUDA C++ compiles by default); Triton 3.10 turns it off unless a launch asks for it (3.9
# warns once per process about that), so each launch asks. On Triton 3.6 it is the default: same code, same cache.
TRITON_OPTIONS: dict[str, object] = {"enable_fp_fusion": True}


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (block sizes of Triton launches)."""
    return 1 << max(0, (n - 1).bit_length())


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0 (programs on a grid axis)."""
    return -(-a // b)


def on_input_device(launcher: F) -> F:
    """Run a Triton launcher with its first argument's CUDA device current: Triton launches on the current
    device, so tensors on another GPU would otherwise be read by kernels running on the wrong one."""

    @functools.wraps(launcher)
    def launch(first: torch.Tensor, *args: object, **kwargs: object) -> object:
        # the common case (CPU, or the current GPU) costs one index comparison instead of two device switches
        if not first.is_cuda or first.get_device() == torch.cuda.current_device():
            return launcher(first, *args, **kwargs)
        with torch.cuda.device(first.device):
            return launcher(first, *args, **kwargs)

    return launch  # type: ignore[return-value]


def unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is contiguous (the Triton kernels index it so; other dims go by strides),
    else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def bnhd_empty(q: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] with [B, N, H, D] memory, like q: the model's transpose(1, 2).reshape(B, N, H*D) of an
    attention output is then free, and rows of all heads of a token are written together."""
    b, h, n, d = q.shape
    return torch.empty_strided((b, h, n, d), (n * h * d, d, h * d, 1), dtype=q.dtype, device=q.device)


# CUDA's largest launch grid: 2**31 - 1 programs on axis 0, 65535 on axes 1 and 2
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def check_grid(kernel: Any, grid: tuple[int, ...]) -> None:
    """A launch grid beyond CUDA's limits fails at the launch with an opaque driver error: say which kernel and
    which axis instead (the interpreter would run it anyway, so CPU tests check it here too)."""
    if grid[0] <= GRID_LIMITS[0] and max(grid[1:], default=0) <= GRID_LIMITS[1]:  # the common case, in two comparisons
        return
    for axis, (size, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if size > limit:
            name = getattr(kernel, "__name__", kernel)
            raise ValueError(f"{name}: launch grid {tuple(grid)} exceeds CUDA's limit of {limit} programs on axis "
                             f"{axis}: the input is too large for one launch")


_compiling_only: contextvars.ContextVar[bool] = contextvars.ContextVar("sphere_fast_compiling_only", default=False)


# the tuned launches' keys met so far in the current compile pass (None outside one)
_pass_tuned_keys: contextvars.ContextVar[set[Hashable] | None] = contextvars.ContextVar(
    "sphere_fast_pass_tuned_keys", default=None)


def compiling_only() -> bool:
    """Whether the ops' Triton launches only compile now (inside ``compile_pass``)."""
    return _compiling_only.get()


def launches_compile_only() -> contextlib.AbstractContextManager[bool]:
    """Inside the block the ops' Triton launches compile their kernels, each in this thread when reached, and
    launch nothing: a first run's compiles one after another, without ``compile_pass``'s threads."""
    return context_value(_compiling_only, True)


def first_in_pass(key: Hashable) -> bool:
    """Whether a tuned launch's ``key`` is met for the first time in the current compile pass (True outside
    one); marks it met. A loop repeats its launches (networks, steps, blocks): the candidates compile at the
    first."""
    keys = _pass_tuned_keys.get()
    if keys is None:
        return True
    if key in keys:
        return False
    keys.add(key)
    return True


@contextlib.contextmanager
def compile_pass() -> Iterator[None]:
    """Inside the block the ops compile their Triton kernels instead of launching them, each compile in a thread
    of its own (Triton's AsyncCompileMode; its compiler releases the GIL), then build each kernel's C launcher
    the same way (a gcc run per kernel on a machine's first run, otherwise done at the first launch); the block
    ends when all are done. Code run once inside before its first real run (the sampler's loop) then finds its
    kernels compiled side by side rather than one after another as its launches reach them. The ops' outputs
    stay unwritten; torch's own ops still run. A compile that fails here is ignored: the kernel compiles again
    at its launch, which raises the error. Nested blocks join the outermost one."""
    if compiling_only():
        yield
        return
    import triton

    with context_value(_pass_tuned_keys, set()), launches_compile_only():
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            mode = triton.AsyncCompileMode(pool, ignore_errors=True)
            try:
                with mode:
                    yield
            finally:
                _leave_async_compile_mode(mode)
            # Triton 3.6's compiled kernels (read defensively: a later Triton may keep them elsewhere)
            futures = getattr(mode, "future_kernels", {}).values()
            compiled = [kernel for kernel in (getattr(f, "kernel", None) for f in futures) if kernel is not None]
            for built in [pool.submit(_build_launcher, kernel) for kernel in compiled]:
                built.result()


def _leave_async_compile_mode(mode: Any) -> None:
    """Make sure ``mode`` is no longer Triton's active compile mode in this context: Triton 3.6 leaves it active
    when its exit is interrupted while waiting for the compiles (a Ctrl-C), and every later compile in the
    thread would go to its shut-down pool."""
    from triton.runtime import _async_compile

    active = getattr(_async_compile, "active_mode", None)  # private: read defensively
    if active is not None and active.get() is mode:
        active.set(None)


def _build_launcher(kernel: Any) -> None:
    """Build (into Triton's on-disk cache) the C launcher the kernel's first launch would build. Only a speed-up:
    a failure is logged, and the launch builds it again and raises its error."""
    from triton.runtime.driver import driver

    launcher_cls = getattr(driver.active, "launcher_cls", None)
    if launcher_cls is None:  # a driver that launches nothing (the sm_90 compile checks)
        return
    try:
        launcher_cls(kernel.src, kernel.metadata)
    except Exception as exc:
        logging.getLogger("sphere_fast").info("sphere_fast: building the launcher of %s ahead failed (%r)",
                                              kernel.metadata.name, exc)


def kernel_runner(kernel: Any, grid: tuple[int, ...], compile_only: bool = False) -> Callable[..., object]:
    """How every op starts a Triton kernel: ``kernel[grid]`` with TRITON_OPTIONS, or with ``compile_only`` (or
    inside ``compile_pass``) its warmup, compiled for the same arguments and options but not launched (a tuning
    candidate's precompile). The grid is checked against CUDA's limits first."""
    check_grid(kernel, grid)
    if compile_only or compiling_only():
        return functools.partial(kernel.warmup, grid=grid, **TRITON_OPTIONS)
    if type(kernel).__name__ == "InterpretedFunction":  # the kernel's own kind: no environment read a launch
        return functools.partial(_interpreted_launch, kernel[grid])
    return functools.partial(kernel[grid], **TRITON_OPTIONS)


# Triton's interpreter patches global state for each launch: launches from two threads at once failed ("x >=
# grid_dim[0]"), so the CPU's launches take turns. A child forked while a thread held it gets a fresh one.
_interpreter_lock = ForkSafeLock()


def _interpreted_launch(launch: Callable[..., object], *args: object, **kwargs: object) -> object:
    with _interpreter_lock:
        return launch(*args, **{**TRITON_OPTIONS, **kwargs})
