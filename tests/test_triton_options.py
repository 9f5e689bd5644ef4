"""Every Triton launch of the ops passes ops._util.TRITON_OPTIONS (FMA contraction asked for: Triton 3.10 turns
it off by default), seen at the interpreter's launch entry point while a training loss, its backward and the
forward-only kernels run on the triton backend."""

from __future__ import annotations

import pytest
import torch

from sphere_fast import ops, use_backend
from sphere_fast.backend import triton_interpreting
from sphere_fast.ops._util import GRID_LIMITS, TRITON_OPTIONS, kernel_runner
from sphere_fast.training import SphereLoss, loss_weights
from tests.tiny import NO_PERCEPTUAL, tiny_batch, tiny_model

interpreter = pytest.importorskip("triton.runtime.interpreter")

# every kernel a launcher in sphere_fast/ops starts, but the TMA forward (tuning only, never on the CPU)
LAUNCHED_KERNELS = {
    "adaln_fwd_kernel", "adaln_bwd_kernel", "adaln_bwd_finish_kernel", "rope_kernel", "attention_fwd_kernel",
    "attention_bwd_preprocess_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel",
    "spherify_fwd_partials_kernel", "spherify_fwd_apply_kernel", "spherify_bwd_partials_kernel",
    "spherify_bwd_apply_kernel", "sphere_noise_kernel", "seeded_labels_kernel", "swiglu_fwd_kernel",
    "swiglu_bwd_kernel", "swiglu_linear_kernel",
}


def test_every_triton_launch_asks_for_fp_fusion(monkeypatch) -> None:
    launches: list[tuple[str, dict]] = []
    run = interpreter.InterpretedFunction.run

    def recorded_run(self, *args, grid, warmup, **kwargs):
        launches.append((self.__name__, kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", recorded_run)
    model = tiny_model().train()
    x, y = tiny_batch(6)
    scales = (torch.full((6,), 2.0), torch.full((6,), 0.5))
    with use_backend("triton"):
        total, _ = SphereLoss(model, loss_weights(NO_PERCEPTUAL))(x, y, *scales, seeds=torch.arange(6) + 1)
        total.backward()
        ops.sphere_noise(torch.arange(2), (4, 4))
        ops.seeded_labels(torch.arange(2), 10)
        weight = torch.randn(2 * 16, 8, dtype=torch.bfloat16)
        ops.swiglu_linear(torch.randn(4, 8, dtype=torch.bfloat16), weight, None, out_width=16)
    assert {name for name, _ in launches} == LAUNCHED_KERNELS
    without = sorted({name for name, kwargs in launches if kwargs.get("enable_fp_fusion") is not True})
    assert without == [], f"launched without TRITON_OPTIONS: {without}"


def test_a_precompiled_candidate_gets_the_launch_options() -> None:
    """compile_ahead's warmup must compile what the launch runs (the options are part of Triton's cache key)."""
    calls = {}

    class Kernel:
        def warmup(self, *args, **kwargs):
            calls["warmup"] = kwargs

        def __getitem__(self, grid):
            return lambda **kwargs: calls.__setitem__("launch", kwargs)

    kernel_runner(Kernel(), (1,), compile_only=True)(num_warps=4)
    kernel_runner(Kernel(), (1,), compile_only=False)()
    assert calls["warmup"] == {"grid": (1,), "num_warps": 4, **TRITON_OPTIONS}
    assert calls["launch"] == TRITON_OPTIONS


@pytest.mark.parametrize("grid, axis", [((2**31,), 0), ((1, 65536), 1), ((1, 1, 65536), 2)])
def test_kernel_runner_refuses_a_grid_beyond_cuda_s_limits(grid: tuple[int, ...], axis: int) -> None:
    """CUDA would fail such a launch with an opaque driver error, and the interpreter would run it."""
    grids = []

    class Kernel:
        __name__ = "some_kernel"

        def __getitem__(self, grid):
            grids.append(grid)
            return lambda **kwargs: None

    kernel_runner(Kernel(), GRID_LIMITS)  # the largest grid is fine
    expected = rf"some_kernel: launch grid .* limit of {GRID_LIMITS[axis]} programs on axis {axis}"
    with pytest.raises(ValueError, match=expected):
        kernel_runner(Kernel(), grid)
    assert grids == [GRID_LIMITS]


def test_interpreted_launches_from_threads_take_turns(monkeypatch) -> None:
    """Triton's interpreter patches global state for each launch: two threads launching at once failed ("x >=
    grid_dim[0]", in 17 of 40 spherify calls in a review). On the CPU the launches take turns: no launch starts
    while another runs (each made slow here, so that two would overlap without the turns)."""
    import threading
    import time

    if not triton_interpreting():
        pytest.skip("the interpreter's launches only")
    running, overlaps = [], []
    run = interpreter.InterpretedFunction.run

    def slow_run(self, *args, **kwargs):
        running.append(1)
        overlaps.append(len(running) > 1)
        time.sleep(0.01)
        try:
            return run(self, *args, **kwargs)
        finally:
            running.pop()

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", slow_run)
    z = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    expected = ops.spherify(z, backend="triton")
    results: list[bool] = []
    start = threading.Barrier(2)

    def call() -> None:
        start.wait()
        results.extend(torch.equal(ops.spherify(z, backend="triton"), expected) for _ in range(5))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 10 and not any(overlaps)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")  # Python 3.12
def test_a_child_forked_during_a_launch_can_launch() -> None:
    """A child forked (a DataLoader worker) while another thread was inside an interpreted launch inherited the
    launches' lock held, by a thread it does not have: its every launch waited for ever. It gets a fresh lock."""
    import os
    import signal

    from sphere_fast.ops import _util

    if not triton_interpreting():
        pytest.skip("the interpreter's launches only")
    z = torch.randn(2, 16)
    with _util._interpreter_lock:  # as a launch of another thread holds it
        pid = os.fork()
        if pid == 0:  # the child: one launch, within 20 s
            code = 1
            try:
                signal.alarm(20)
                code = 0 if torch.equal(ops.spherify(z, backend="triton"), ops.spherify(z, backend="triton")) else 2
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child could not launch"
