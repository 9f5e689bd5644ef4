"""Shared benchmark harness: CUDA-event timing, the device ceilings, and one row per (op, impl, shape, dtype).

A bench file (``benchmarks/bench_<op>.py``) parametrizes over ``impls(...)`` and shapes, times one
implementation per test with ``cuda_time_ms`` and calls ``record``; ``report.py`` pivots the rows into
eager / torch.compile / ours / vendor columns. Bench files import it as
``from benchmarks.harness import ...``.

A bench file, in full::

    import pytest, torch
    from benchmarks.harness import DEVICE, cuda_time_ms, impls, pick, record, tensor_bytes
    from sphere_fast.ops import swiglu, swiglu_reference

    SHAPES = pick(real=[(8, 256, 8192), (64, 256, 8192)], smoke=[(2, 4, 64)])

    @pytest.mark.parametrize("dtype", [torch.bfloat16])
    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    @pytest.mark.parametrize("impl", impls(swiglu, swiglu_reference))
    def test_swiglu(benchmark, ceilings, impl, shape, dtype):
        h = torch.randn(shape, dtype=dtype, device=DEVICE)
        out = impl(h)  # also the correctness gate: compare out with the reference before timing
        ms = cuda_time_ms(lambda: impl(h))
        record(benchmark, op="swiglu", impl=impl.name, shape=shape, dtype=dtype, ms=ms,
               bytes_moved=tensor_bytes(h, out), ceilings=ceilings)

Smoke mode (no CUDA device, or ``SPHERE_FAST_BENCH_SMOKE=1``): tiny sizes, one timed call, wall clock; every
body still runs inside the normal test command, so suites cannot rot. Its numbers mean nothing.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from benchmarks import goals, tree

# "1" forces smoke mode; "0" keeps the real sizes even without CUDA (to list the real grid with --collect-only)
_SMOKE_ENV = os.environ.get("SPHERE_FAST_BENCH_SMOKE")
SMOKE: bool = _SMOKE_ENV == "1" or (_SMOKE_ENV != "0" and not torch.cuda.is_available())
DEVICE: torch.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
L2_FLUSH_BYTES = 256 * 1024 * 1024  # five times the H200's 50 MB L2
OURS = ("triton", "cpp")  # the impl names that are this project's kernels
ROWS_ENV = "SPHERE_FAST_BENCH_ROWS"  # gpu_check sets it: a JSON-lines file each recorded case is appended to
# The commit a run measures, stated by whoever starts it: a lent machine gets the working tree with git metadata
# of an earlier commit (2026-11-29 and -30: the JSON said 0a737ba, dirty, for 9ebd630).
COMMIT_ENV = "SPHERE_FAST_COMMIT"
# The digest of the tree measured, as gpu_check took it at its start (before its phases write anything) for the
# benchmark processes it starts; unset, a process digests the tree itself (tree_at_start).
TREE_ENV = "SPHERE_FAST_TREE_MEASURED"
# The checks a row passed before it was timed, by the date they took their present form: each output in value,
# dtype and shape (gate), each backward's gradients (gate_backward), the sampler's images against the eager loop's
# with CFG's own effect (bench_sampling.check_images). record() marks every row with it; the report says which
# verdicts read rows without the mark (recorded under older, weaker checks).
GATES = "2026-12-01"

T = TypeVar("T")


def pick(real: T, smoke: T) -> T:
    """``real`` normally, ``smoke`` in smoke mode: ``SHAPES = pick(real=[...], smoke=[...])``."""
    return smoke if SMOKE else real


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def dtype_of(name: str) -> torch.dtype:
    """The dtype ``dtype_name`` calls ``name`` (the grids name dtypes so: benchmarks/grids.py)."""
    return next(dtype for dtype, label in DTYPE_NAMES.items() if label == name)


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the given tensors: inputs read once plus outputs written once is the minimal traffic."""
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------------------------- timing


class Timing(float):
    """A median in milliseconds that also carries every sample (``record`` hands them to pytest-benchmark); from
    cuda_time_ms, how many times torch.compile's CUDA-graph trees recorded or ran eager during the timed calls
    (graph_recordings) and, on a GPU, the host's time to queue a call and the head start it had (medians)."""

    samples_ms: tuple[float, ...]
    host_ms: float | None
    head_start_ms: float | None
    graph_recordings: int

    def __new__(
        cls, samples_ms: Sequence[float], host_ms: float | None = None, head_start_ms: float | None = None,
        graph_recordings: int = 0,
    ) -> Timing:
        if not samples_ms:
            raise ValueError("no timing samples")
        self = super().__new__(cls, statistics.median(samples_ms))
        self.samples_ms = tuple(float(s) for s in samples_ms)
        self.host_ms, self.head_start_ms, self.graph_recordings = host_ms, head_start_ms, graph_recordings
        return self

    @property
    def host_bound(self) -> bool | None:
        """Whether the host was still queueing the call for most of its timed span (past the head start, more than
        HOST_BOUND_SHARE of the median time): the host paced the span, not the device. None if not known."""
        if self.host_ms is None or self.head_start_ms is None:
            return None
        return self.host_ms - self.head_start_ms > HOST_BOUND_SHARE * self


@functools.cache
def _flush_buffers() -> tuple[torch.Tensor, torch.Tensor]:
    """A buffer larger than L2 and the scalar its read writes to."""
    buffer = torch.zeros(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    return buffer, torch.zeros((), dtype=torch.int32, device="cuda")


# A GPU-side wait before each timed call, about 0.5 ms at H200 clocks (~2 GHz): the CPU queues the call's
# launches meanwhile, so their Python and dispatch stay out of the events. An op's eager backward (autograd, the
# op's launcher, a Triton launch, its small torch ops) can take a few hundred microseconds of host time: with
# 0.1 ms (until 2026-11-29) the small shapes' rows timed that host time, not the kernels. The host cost of a call
# has rows of its own (bench_dispatch.py, forward alone and with its backward).
HEAD_START_CYCLES = 1_000_000
# The share of a call's timed span the host may still spend queueing it (after the head start) before its row
# counts as host-bound (Timing.host_bound).
HOST_BOUND_SHARE = 0.8


def cuda_time_ms(
    fn: Callable[..., Any],
    *,
    warmup: int = 10,
    rep: int = 50,
    rotate: Sequence[Sequence[Any]] | None = None,
    flush_l2: bool = True,
) -> Timing:
    """Median milliseconds of ``fn()`` (or ``fn(*rotate[i % len(rotate)])``) over ``rep`` timed calls.

    CUDA events around each call, each call queued once the previous one ended (no device-wide sync, and the
    host's time to queue a call is its own, not a wait for a full launch queue); ``warmup`` calls first
    (compilation, autotuning, allocator) are not timed. Before each call a 256 MB read evicts L2 (a read,
    not a memset, so no dirty lines are written back during the call), so inputs come from HBM as in a real
    model step; then a short GPU wait (HEAD_START_CYCLES) lets the CPU queue the call ahead, so launch latency
    stays out of the events; a call that needs more CPU time than that (an eager loop of thousands of
    launches) is timed with its CPU overhead, as it would run. ``rotate`` cycles through input sets, for
    cases where flushing is not enough or not wanted (then pass flush_l2=False). The result also holds the
    host's time to queue a call and the head start's device time (``Timing.host_bound`` weighs them), and how
    often torch.compile's CUDA-graph trees recorded a graph or ran eager in the timed calls (``graph_recordings``;
    a call that replays records none). A compile in them fails (no_compiles). In smoke mode: one call, wall clock
    without a GPU.
    """
    if rotate is not None and len(rotate) == 0:
        raise ValueError("rotate must hold at least one argument tuple")
    args: Callable[[int], Sequence[Any]] = (lambda i: rotate[i % len(rotate)]) if rotate else (lambda i: ())
    if SMOKE:
        warmup, rep = 0, 1
    if not torch.cuda.is_available():  # then SMOKE is set: the wall clock only checks that fn runs
        with no_compiles("the timed calls"), graph_tree_calls() as recorded:
            start = time.perf_counter()
            fn(*args(0))
            wall_ms = (time.perf_counter() - start) * 1e3
        return Timing([wall_ms], graph_recordings=len(recorded))
    for i in range(warmup):
        fn(*args(i))
    with no_compiles("the timed calls"), graph_tree_calls() as recorded:
        timing = _timed_calls(fn, args, warmup, rep, flush_l2)
    timing.graph_recordings = len(recorded)
    return timing


def _timed_calls(fn: Callable[..., Any], args: Callable[[int], Sequence[Any]], offset: int, rep: int,
                 flush_l2: bool) -> Timing:
    """cuda_time_ms' timed calls, the ``rotate`` sets from ``offset`` (the warm-up calls took the first)."""
    flush = _flush_buffers() if flush_l2 else None
    waits, starts, ends = ([torch.cuda.Event(enable_timing=True) for _ in range(rep)] for _ in range(3))
    host_ms = []
    torch.cuda.synchronize()
    for i in range(rep):
        if i:  # an empty queue, so that the host's queueing below is its own time, not a wait for a full queue
            ends[i - 1].synchronize()
        if flush is not None:
            torch.sum(flush[0], dim=0, dtype=torch.int32, out=flush[1])
        waits[i].record()
        torch.cuda._sleep(HEAD_START_CYCLES)
        starts[i].record()
        queueing = time.perf_counter()
        fn(*args(offset + i))
        ends[i].record()
        host_ms.append((time.perf_counter() - queueing) * 1e3)
    torch.cuda.synchronize()
    return Timing([s.elapsed_time(e) for s, e in zip(starts, ends)], host_ms=statistics.median(host_ms),
                  head_start_ms=statistics.median(w.elapsed_time(s) for w, s in zip(waits, starts)))


# dynamo's counter groups that grow only when it compiles a frame, or gives up on one and runs it eager
COMPILE_COUNTERS = ("frames", "stats", "unimplemented", "graph_break")


def compile_counts() -> dict[str, dict[str, int]]:
    """dynamo's and inductor's counters now (``torch._dynamo.utils.counters``), by group."""
    from torch._dynamo.utils import counters

    return {group: dict(names) for group, names in counters.items()}


def counts_grown(
    before: Mapping[str, Mapping[str, int]], groups: Sequence[str] | None = None
) -> dict[str, dict[str, int]]:
    """What grew since ``before`` (a compile_counts snapshot), by how much, in ``groups`` (default: all)."""
    grown = {}
    for group, names in compile_counts().items():
        if groups is None or group in groups:
            was = before.get(group, {})
            changed = {name: n - was.get(name, 0) for name, n in names.items() if n > was.get(name, 0)}
            if changed:
                grown[group] = changed
    return grown


@contextlib.contextmanager
def no_compiles(what: str) -> Iterator[None]:
    """Fails where torch.compile compiled a frame, or fell back to eager on one, inside the block: a timed call
    must time the program compiled before it (a recompile's minutes, or eager code, would be timed as it)."""
    before = compile_counts()
    yield
    grown = counts_grown(before, COMPILE_COUNTERS)
    if grown:
        raise AssertionError(f"torch.compile compiled or fell back to eager during {what}: {grown}")


# inductor's CUDA-graph tree methods that run only where a graph is not replayed: a new recording, an eager run.
# A timed call that runs them times a recording's device sync and extra run, or a call without its graph.
GRAPH_TREE_RECORDING = ("record_function", "run_eager")


@contextlib.contextmanager
def graph_tree_calls() -> Iterator[list[str]]:
    """The names of the CUDA-graph tree methods of torch.compile ("reduce-overhead", "max-autotune") called inside
    the block that run only where a tree does not replay a graph (GRAPH_TREE_RECORDING): filled as they run. The
    class's methods are wrapped, so calls of every thread count (a compiled backward runs on autograd's); blocks
    must not overlap across threads. A tree's runs without any graph are inductor's CUDA-graph skips instead
    (counted by inductor: the sampler's compile rows record them)."""
    try:
        from torch._inductor.cudagraph_trees import CUDAGraphTreeManager
    except ImportError:  # no inductor in this build of torch: no graph trees either
        yield []
        return
    calls: list[str] = []

    def counted(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return method(*args, **kwargs)

        return call

    methods = {name: getattr(CUDAGraphTreeManager, name) for name in GRAPH_TREE_RECORDING}
    for name, method in methods.items():
        setattr(CUDAGraphTreeManager, name, counted(name, method))
    try:
        yield calls
    finally:
        for name, method in methods.items():
            setattr(CUDAGraphTreeManager, name, method)


class PeakMemory:
    """The most CUDA memory allocated since it was made, above what was allocated then: a case's working memory
    (activations, workspaces, a captured graph's pool, optimiser state made on the first step), without the
    weights and inputs it found. On CPU it measures nothing (``gb()`` is None)."""

    def __init__(self) -> None:
        self.start: int | None = None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()

    def gb(self) -> float | None:
        if self.start is None:
            return None
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - self.start) / 1e9


class GpuClocks:
    """GPU 0's SM clock (MHz), power (W) and temperature (°C) about every ``interval_s`` while the block runs: a
    sustained load (the sampler's and training's rows, seconds a call) may run below the clock an idle snapshot
    shows (the header's). Read in this process through NVML (torch.cuda's readers) where pynvml is installed, else
    from an nvidia-smi process each time. Sampling stops at the first reading that fails; ``summary()`` after
    the block: None without a sample."""

    FIELDS = ("clocks.sm", "power.draw", "temperature.gpu")

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, ...]] = []
        self.source = "nvml" if importlib.util.find_spec("pynvml") else "nvidia-smi"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> tuple[float, ...] | None:
        if self.source == "nvml":
            try:
                return (float(torch.cuda.clock_rate(0)), torch.cuda.power_draw(0) / 1e3,
                        float(torch.cuda.temperature(0)))
            except Exception:  # pynvml's NVMLError and its kin: no reading, as for nvidia-smi below
                return None
        values = query_gpu(self.FIELDS, units=False, timeout=5)
        try:
            return tuple(float(v) for v in values) if values else None
        except ValueError:  # "[N/A]"
            return None

    def _poll(self) -> None:
        while True:
            sample = self._read()
            if sample is None:
                return
            self.samples.append(sample)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> GpuClocks:
        self.samples.clear()
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="gpu-clocks", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict[str, float] | None:
        if not self.samples:
            return None
        clocks, power, temperature = zip(*self.samples)
        return {"sm_mhz_min": min(clocks), "sm_mhz_median": statistics.median(clocks), "power_w_max": max(power),
                "temperature_c_max": max(temperature), "clock_samples": len(clocks), "source": self.source}


def timed_with_clocks(time_calls: Callable[[], Timing]) -> tuple[Timing, dict[str, float] | None]:
    """``time_calls()`` and, on a GPU, what GpuClocks read meanwhile, its warm-up calls included (for the row:
    ``clocks_while_timed``)."""
    if not torch.cuda.is_available():
        return time_calls(), None
    with GpuClocks() as clocks:
        timing = time_calls()
    return timing, clocks.summary()


# --------------------------------------------------------------------------------------------- ceilings


@dataclass(frozen=True)
class Ceilings:
    """The device's measured limits, in the same run as the benchmarks they scale."""

    copy_gbps: float  # device-to-device copy, bytes read + written
    matmul_tflops: float  # bf16 matmul through torch (cuBLAS)
    copy_bytes: int
    matmul_size: int


def copy_rate(nbytes: int, ms: float) -> float:
    """GB/s of a copy of ``nbytes``: it reads and writes each byte."""
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_rate(n: int, ms: float) -> float:
    """TFLOP/s of an n x n x n matmul."""
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measure_ceilings(copy_bytes: int | None = None, matmul_size: int | None = None) -> Ceilings | None:
    """Copy bandwidth and bf16 matmul rate of this device; None without CUDA (nothing to scale against).

    Defaults: a 2 GiB copy and an 8192^3 matmul (tiny in smoke mode). Random data, not zeros: the matmul
    runs measurably faster on zeros (METHOD.md).
    """
    if not torch.cuda.is_available():
        return None
    copy_bytes = copy_bytes or pick(real=2 << 30, smoke=1 << 20)
    matmul_size = matmul_size or pick(real=8192, smoke=256)
    src = torch.randint(-128, 127, (copy_bytes,), dtype=torch.int8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, rep=20, flush_l2=False)
    del src, dst
    a = torch.randn(matmul_size, matmul_size, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(matmul_size, matmul_size, dtype=torch.bfloat16, device="cuda")
    mm_ms = cuda_time_ms(lambda: a @ b, warmup=3, rep=20, flush_l2=False)
    return Ceilings(
        copy_gbps=copy_rate(copy_bytes, copy_ms),
        matmul_tflops=matmul_rate(matmul_size, mm_ms),
        copy_bytes=copy_bytes,
        matmul_size=matmul_size,
    )


# ---------------------------------------------------------------------------------------------- records


def _finite_positive(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")


def derived_metrics(
    ms: float,
    *,
    bytes_moved: int | None = None,
    flops: int | None = None,
    ceilings: Ceilings | None = None,
    baseline_ms: float | None = None,
) -> dict[str, float | None]:
    """GB/s, TFLOP/s, their % of the ceilings and the speedup over ``baseline_ms`` (None where unknown)."""
    _finite_positive("ms", ms)
    _finite_positive("baseline_ms", baseline_ms)
    seconds = ms * 1e-3
    gbps = bytes_moved / seconds / 1e9 if bytes_moved is not None else None
    tflops = flops / seconds / 1e12 if flops is not None else None
    return {
        "gbps": gbps,
        "tflops": tflops,
        "pct_copy": 100 * gbps / ceilings.copy_gbps if gbps is not None and ceilings else None,
        "pct_matmul": 100 * tflops / ceilings.matmul_tflops if tflops is not None and ceilings else None,
        "speedup": baseline_ms / ms if baseline_ms is not None else None,
    }


def _replay_timer(samples_ms: Sequence[float]) -> Callable[[], float]:
    """A clock for pytest-benchmark that makes each round last one of our CUDA-event samples."""
    ticks: Iterator[float] = iter([t for s in samples_ms for t in (0.0, s * 1e-3)])

    def cuda_events() -> float:  # the name pytest-benchmark stores as the timer
        return next(ticks)

    return cuda_events


def sample_spread(samples_ms: Sequence[float]) -> dict[str, float | int | None]:
    """The samples' count and quartiles in ms (None under goals.QUARTILE_SAMPLES samples): the noise the verdicts
    weigh."""
    if len(samples_ms) < goals.QUARTILE_SAMPLES:
        return {"ms_q1": None, "ms_q3": None, "n_samples": len(samples_ms)}
    q1, _, q3 = statistics.quantiles(samples_ms, n=4, method="inclusive")  # within the samples' own min and max
    return {"ms_q1": q1, "ms_q3": q3, "n_samples": len(samples_ms)}


def timing_fields(ms: float) -> dict[str, float | bool | None]:
    """What a Timing knows of its calls beyond their times (None where unknown, as for a plain float): the host's
    median queueing of a call against its head start (``host_bound``: an op row's time may then hold host time)
    and the CUDA-graph tree recordings or eager runs in its timed calls."""
    return {"host_ms": getattr(ms, "host_ms", None), "head_start_ms": getattr(ms, "head_start_ms", None),
            "host_bound": getattr(ms, "host_bound", None), "graph_recordings": getattr(ms, "graph_recordings", None)}


def record(
    benchmark: Any,
    *,
    op: str,
    impl: str,
    shape: Sequence[int] | str,
    dtype: torch.dtype | str,
    ms: float,
    bytes_moved: int | None = None,
    flops: int | None = None,
    ceilings: Ceilings | None = None,
    baseline_ms: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Store one measured case in pytest-benchmark's JSON (``extra_info``) and return that info.

    ``ms`` is the median (a ``Timing`` from cuda_time_ms also passes its samples, which then become
    pytest-benchmark's rounds, so its own table and ``pytest-benchmark compare`` show device times; the row keeps
    their count and quartiles, ``sample_spread``, and what it knows of the calls, ``timing_fields``). ``extra`` adds
    case-specific fields (images/s, ...). The row is also streamed (``stream_row``).
    """
    samples = getattr(ms, "samples_ms", (float(ms),))
    info: dict[str, Any] = {
        "op": op,
        "impl": impl,
        "shape": shape if isinstance(shape, str) else [int(d) for d in shape],
        "dtype": dtype_name(dtype),
        "ms": float(ms),
        **sample_spread(samples),
        **timing_fields(ms),
        **derived_metrics(ms, bytes_moved=bytes_moved, flops=flops, ceilings=ceilings, baseline_ms=baseline_ms),
        "bytes_moved": bytes_moved,
        "flops": flops,
        "smoke": SMOKE,
        "device": device_name(),
        "gates": GATES,
        **(extra or {}),
    }
    benchmark.extra_info.update(info)
    stream_row("case", {"name": getattr(benchmark, "fullname", benchmark.name), "extra_info": info})
    benchmark.group = f"{op} {info['shape']} {info['dtype']}"
    # pytest-benchmark 5.3.1 reads the clock from benchmark._timer when pedantic builds its runner.
    benchmark._timer = _replay_timer(samples)
    benchmark.pedantic(lambda: None, rounds=len(samples), iterations=1, warmup_rounds=0)
    return info


Tensors = torch.Tensor | Sequence[torch.Tensor]


def _as_tuple(t: Tensors) -> tuple[torch.Tensor, ...]:
    return (t,) if isinstance(t, torch.Tensor) else tuple(t)


# Each output within this fraction of the reference's largest magnitude (and relatively), by the dtype it must
# have. bf16 / fp16: 2**-6, two bf16 ulps. Not tighter: one rounding to bf16 is up to 2**-8 of a value (8
# significant bits), the bf16 attention's output came within 2**-8 of the largest (P rounded before p v) and the
# AdaLN kernels normalise the residual they rounded; 2**-7 would still pass a norm over 7/8 of each row (7.6e-3).
# fp32: 2**-14, 300x the fp32 kernels' own error (2e-7 on the CPU: rounding, sum order) and 64x under one bf16
# rounding of the input (2**-8); an fp32 op whose dots run in TF32 (unit roundoff 2**-11) passes a tol of its own.
GATE_TOL = {torch.float32: 2**-14, torch.bfloat16: 2**-6, torch.float16: 2**-6}


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, tol: float, what: str) -> None:
    # the dtype too: a row's bytes count the element size it should write, and .float() below would hide it
    if out.dtype != dtype or out.shape != ref.shape:
        raise AssertionError(f"{what}: {out.dtype} {tuple(out.shape)}, expected {dtype} {tuple(ref.shape)}")
    ref = ref.float()
    atol = tol * max(ref.abs().max().item(), 1e-6)
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def gate(actual: Tensors, expected: Tensors, what: str, dtype: torch.dtype, tol: float | None = None) -> None:
    """The correctness gate before timing, so that a wrong kernel is never timed: each output has ``dtype`` (the
    inputs') and the reference's shape, and is within ``tol`` (default GATE_TOL[dtype]) of the reference,
    relative to the reference's largest magnitude."""
    for i, (out, ref) in enumerate(zip(_as_tuple(actual), _as_tuple(expected), strict=True)):
        _close(out, ref, dtype, GATE_TOL[dtype] if tol is None else tol, f"{what} output {i}")


def gate_backward(
    outputs: Tensors, inputs: Sequence[torch.Tensor], upstream: Tensors, reference: Callable[..., Tensors], what: str
) -> None:
    """The gate before timing a backward: the gradients of ``inputs`` through ``outputs`` for the upstream
    gradients ``upstream`` against those of ``reference`` run on float32 copies of ``inputs``, each of its input's
    dtype and shape and within twice GATE_TOL of the reference's largest magnitude (a gradient sums more rounded
    terms than an output: the bf16 attention's came within 2**-7 of it at 1024 tokens on the CPU, its output
    within 2**-8)."""
    grads = torch.autograd.grad(_as_tuple(outputs), inputs, _as_tuple(upstream), retain_graph=True)
    leaves = [t.detach().float().requires_grad_() for t in inputs]
    expected = torch.autograd.grad(_as_tuple(reference(*leaves)), leaves, [g.float() for g in _as_tuple(upstream)])
    for i, (grad, ref, x) in enumerate(zip(grads, expected, inputs, strict=True)):
        _close(grad, ref, x.dtype, 2 * GATE_TOL[x.dtype], f"{what} backward: gradient of input {i}")


def sweep_row(name: str, run: Callable[[], float], rate: Callable[[float], float]) -> str:
    """One markdown row of a launch-config sweep, ``| name | ms | rate | ok |`` from ``run()``'s milliseconds, or
    the error of a config that does not fit, compile or pass its gate: a result, not a crash."""
    try:
        ms = run()
    except Exception as exc:
        return f"| {name} | – | – | {type(exc).__name__}: {str(exc)[:80]} |"
    return f"| {name} | {ms:.3f} | {rate(ms):.0f} | ok |"


def stream_row(kind: str, payload: Mapping[str, Any]) -> None:
    """Append ``{"kind": kind, **payload}`` as one line to the file named by $SPHERE_FAST_BENCH_ROWS, if set.

    pytest-benchmark writes its JSON only when the session ends; these lines survive a run that is killed
    at its time limit, and gpu_check rebuilds the results from them (report.results_from_rows)."""
    path = os.environ.get(ROWS_ENV)
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"kind": kind, **payload}) + "\n")


# ------------------------------------------------------------------------------------------------ impls


@dataclass(frozen=True)
class Impl:
    """One implementation of an op for a bench to time; ``fn`` is None when it is skipped."""

    name: str
    fn: Callable[..., Any] | None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fn is None:
            raise RuntimeError(f"implementation {self.name} is not available here")
        return self.fn(*args, **kwargs)


def _param(name: str, fn: Callable[..., Any] | None, skip_reason: str | None = None) -> Any:
    marks = [pytest.mark.skip(reason=skip_reason)] if skip_reason else []
    return pytest.param(Impl(name, fn), id=name, marks=marks)


def impls(
    op: Callable[..., Any],
    reference: Callable[..., Any],
    *,
    device: torch.device | str | None = None,
    backends: Sequence[str] = OURS,
    vendor: Mapping[str, Callable[[], Callable[..., Any]]] | None = None,
) -> list[Any]:
    """pytest params (ids: eager, compile, triton, cpp, then vendor names) of the implementations to time.

    ``reference`` is the eager spec and also what torch.compile compiles (fullgraph); ``op`` is the
    sphere_fast op, called with ``backend=<name>`` for each of ``backends`` that ``available_backends``
    lists for the device (others are skipped with the reason). ``vendor`` maps a name to a loader that
    returns the callable or raises ImportError / RuntimeError (skipped with its message). In smoke mode
    on CPU torch.compile uses its ``eager`` backend: the graph is still traced, without minutes of C++
    compilation.
    """
    from sphere_fast.backend import available_backends

    device = torch.device(device) if device is not None else DEVICE
    compile_backend = "eager" if device.type == "cpu" and SMOKE else "inductor"
    # Each shape x dtype case is its own static compile (dynamic=False, as a fixed-shape model would get);
    # past dynamo's default limit of 8 per function it would silently run eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    params = [
        _param("eager", reference),
        _param("compile", torch.compile(reference, fullgraph=True, dynamic=False, backend=compile_backend)),
    ]
    usable = available_backends(device)
    for name in backends:
        if name in usable:
            params.append(_param(name, functools.partial(op, backend=name)))
        else:
            params.append(_param(name, None, f"backend {name} not available on {device.type} (have: {usable})"))
    for name, load in (vendor or {}).items():
        try:
            params.append(_param(name, load()))
        except (ImportError, RuntimeError) as exc:
            params.append(_param(name, None, f"{name} unavailable: {exc}"))
    return params


# ------------------------------------------------------------------------------------------ environment


@functools.cache
def tree_at_start() -> str | None:
    """The digest (benchmarks.tree) of the tree this process measures: $SPHERE_FAST_TREE_MEASURED where gpu_check
    set it, else taken at this function's first call, which a benchmark session makes as it starts (conftest)."""
    return os.environ.get(TREE_ENV) or tree.digest()


def stated_commit(commit_info: dict[str, Any]) -> dict[str, Any]:
    """``commit_info`` (pytest-benchmark's git id and dirty flag) with the digest of the tree measured (``tree``)
    and what $SPHERE_FAST_COMMIT states, where set (``python -m benchmarks.tree`` where the tree was sent from):
    its commit, dirty where it ends in "-dirty", and the digest of the tree sent (``tree_sent``), which the report
    compares with ``tree``. What git said is kept as ``git_id`` / ``git_dirty``."""
    info = dict(commit_info)
    measured = tree_at_start()
    if measured is not None:
        info["tree"] = measured
    stated = os.environ.get(COMMIT_ENV, "").strip()
    if not stated:
        return info
    described, _, sent = stated.rpartition("@") if "@" in stated else (stated, "", "")
    commit = described.removesuffix("-dirty")
    info.update(id=commit, dirty=commit != described, git_id=commit_info.get("id"), git_dirty=commit_info.get("dirty"))
    if sent:
        info["tree_sent"] = sent
    return info


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def query_gpu(fields: Sequence[str], units: bool = True, timeout: float = 20) -> list[str] | None:
    """GPU 0's values of nvidia-smi's ``fields`` (read only), with their units or without, or None without
    nvidia-smi or an answer."""
    fmt = "csv,noheader" if units else "csv,noheader,nounits"
    try:
        out = subprocess.run(["nvidia-smi", "-i", "0", f"--query-gpu={','.join(fields)}", f"--format={fmt}"],
                             capture_output=True, text=True, timeout=timeout, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return [v.strip() for v in out.splitlines()[0].split(",")] if out else None


def nvidia_smi() -> dict[str, str] | None:
    """Name, UUID (which of a model's GPUs), driver, clocks, power and temperature from nvidia-smi (read only),
    or None without it."""
    fields = ("name", "uuid", "driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem",
              "power.draw", "power.limit", "temperature.gpu", "pstate")
    values = query_gpu(fields)
    return dict(zip(fields, values)) if values else None


def stored_autotunings() -> int:
    """How many GEMMs inductor's on-disk cache ($TORCHINDUCTOR_CACHE_DIR/cache) holds max-autotune timings for
    at the start: a torch.compile row's first call takes those timings instead of compiling and benchmarking
    every choice again, so its first-call seconds are then not a cold compile's."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    gemms = 0
    for path in (Path(cache_dir()) / "cache").glob("*"):
        try:
            # inductor writes {"system": {...}, "cache": {op: {inputs: {precision: {choice: ms}}}}}
            timings = json.loads(path.read_text())["cache"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        gemms += sum(len(by_inputs) for by_inputs in timings.values() if isinstance(by_inputs, dict))
    return gemms


@functools.cache
def autotunings_at_start() -> int:
    """stored_autotunings() at its first call in this process: the benchmark session makes that call as it
    starts (conftest), so its JSON counts what the compile rows found, not what they stored."""
    return stored_autotunings()


# environment variables that change what a run measures: sphere_fast's switches, inductor's and Triton's; not
# the run's plumbing (paths, its deadline, what it states of itself), which differs from call to call
SWITCH_PREFIXES = ("SPHERE_FAST_", "TORCHINDUCTOR_", "TRITON_")
RUN_PLUMBING = (COMMIT_ENV, TREE_ENV, ROWS_ENV, "SPHERE_FAST_BENCH_DEADLINE", "SPHERE_FAST_REFERENCE",
                "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def cpu_model() -> str | None:
    """The CPU's model name (the host-bound rows depend on it), from /proc/cpuinfo where there is one."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(ceilings: Ceilings | None = None) -> dict[str, Any]:
    """What a result depends on: device, driver, clocks, versions, CPUs, switches, the launch configs tuned so
    far, smoke flag and the ceilings."""
    from torch._inductor import config as inductor_config

    from sphere_fast.ops._tuning import tuned_configs

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env: dict[str, Any] = {
        "device": device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "cudnn": torch.backends.cudnn.version(),
        "flash_attn": package_version("flash-attn"),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "switches": {name: value for name, value in sorted(os.environ.items())
                     if name.startswith(SWITCH_PREFIXES) and name not in RUN_PLUMBING},
        "smoke": SMOKE,
        # torch.compile rows spend minutes compiling: inductor's parallel compiles depend on these
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "inductor_compile_threads": inductor_config.compile_threads,
        "inductor_stored_autotunings": autotunings_at_start(),
        "nvidia_smi": nvidia_smi(),
        "ceilings": asdict(ceilings) if ceilings else None,
        "tuned_configs": tuned_configs(),  # at the session's end: every case's
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["sm_count"] = props.multi_processor_count
        env["capability"] = f"{props.major}.{props.minor}"
    return env
