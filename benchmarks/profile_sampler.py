"""Where the sampler's time goes: one un-captured sampler call under torch.profiler, its kernels grouped.

    python -m benchmarks.profile_sampler [--model sphere-l-imagenet] [--batch 64 1] [--steps 4] [--cfg 1.4]

Same model, dtype and inputs as benchmarks/bench_sampling.py (random weights, bf16 on a GPU; the tiny float32
model on CPU). The call runs un-captured so that every kernel is its own profiler event (the graphed sampler
replays the same kernels). Prints, per batch size, the total device time and the number of kernels per
kernel group (matmul, attention, the fused ops, the rest), a graph replay's time where the un-captured call is
host-bound (batch 1), then the top kernels, and where the call's host time goes: its wall time without a
profiler and, under cProfile, the Python functions with the most time of their own (sphere_fast's layers and
checks, torch's dispatch, Triton's launches, any wait on the GPU). The GPU check runs it as its "profile"
phase. The warm-up calls log the backend each op took and the attention's tuned launch configs with the time
of every candidate (the sphere_fast logger at INFO, on stderr).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_sampling import DTYPE, build_model, case_inputs
from benchmarks.harness import DEVICE, SMOKE, cuda_time_ms
from sphere_fast.sampling import Sampler

# kernel-name patterns, first match wins; the fused ops are the Triton / C++ kernels of sphere_fast.ops
GROUPS: tuple[tuple[str, str], ...] = (
    ("rope", r"rope"),
    ("attention", r"attention|flash|fmha|sdpa|softmax"),
    ("matmul", r"gemm|gemv|matmul|cutlass|sm90_xmma|nvjet|\bmm\b|addmm|linear"),
    ("spherify", r"spherify|noise|philox|seeded_labels|(fwd|bwd)_(partials|apply)"),  # and the seeded draws
    ("adaln / swiglu", r"adaln|modulate|swiglu|layer_norm|layernorm"),
)


def kernel_group(name: str) -> str:
    """The group a kernel (or CPU op) name belongs to; "other" when no pattern matches."""
    for group, pattern in GROUPS:
        if re.search(pattern, name, re.IGNORECASE):
            return group
    return "other"


def group_times(events: Iterable[tuple[str, float]]) -> dict[str, tuple[float, int]]:
    """(name, microseconds) pairs summed per kernel_group: (microseconds, kernels), largest time first."""
    times: dict[str, float] = defaultdict(float)
    counts: Counter[str] = Counter()
    for name, us in events:
        group = kernel_group(name)
        times[group] += us
        counts[group] += 1
    return {g: (times[g], counts[g]) for g in sorted(times, key=lambda g: -times[g])}


def format_groups(totals: dict[str, tuple[float, int]], wall_ms: float) -> str:
    """The groups as a table; the kernel counts show what launches cost where kernels are short (batch 1)."""
    all_us = sum(us for us, _ in totals.values()) or 1.0
    lines = ["| group | ms | % of kernel time | kernels |", "|---|---|---|---|"]
    lines += [f"| {g} | {us / 1e3:.2f} | {100 * us / all_us:.0f}% | {n} |" for g, (us, n) in totals.items()]
    lines.append(f"\nkernel time {all_us / 1e3:.2f} ms of a {wall_ms:.2f} ms call")
    return "\n".join(lines)


HOST_BOUND_SHARE = 0.9
HOST_TIMED_CALLS = 3


def host_table(call: Callable[[], object], top: int) -> str:
    """Where ``call``'s host time goes: its wall time without a profiler (the fastest of HOST_TIMED_CALLS),
    then one call under cProfile, the ``top`` functions by time of their own. ``call`` should end by waiting
    for the device, so that a host-bound call's gaps and a device-bound call's wait both show."""
    walls = []
    for _ in range(HOST_TIMED_CALLS):
        start = time.perf_counter()
        call()
        walls.append(time.perf_counter() - start)
    profiler = cProfile.Profile()
    profiler.runcall(call)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return f"host: {1e3 * min(walls):.2f} ms a call without a profiler\n{out.getvalue().strip()}"


def profile_batch(model: torch.nn.Module, name: str, batch: int, steps: int, cfg: float, top: int) -> None:
    """Print the kernel groups and top kernels of one un-captured call at ``batch``; on a GPU, when its kernels
    fill less than HOST_BOUND_SHARE of the call, also the time of a graph replay of the same loop (against the
    kernel time: the gaps between kernels that a graph keeps)."""
    sampler = Sampler(model, batch, steps, cfg=cfg, dtype=DTYPE, cuda_graph=False)
    labels, seeds = case_inputs(batch, model.num_classes)
    for _ in range(2):  # Triton JIT, autotuning and the allocator's pools stay out of the profile
        sampler(labels, seeds)
    on_gpu = DEVICE.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    if on_gpu:
        torch.cuda.synchronize()
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2)) if on_gpu else (None, None)
    with profile(activities=activities) as prof:
        if on_gpu:
            start.record()
        sampler(labels, seeds)
        if on_gpu:
            end.record()
            torch.cuda.synchronize()
    wall_ms = start.elapsed_time(end) if on_gpu else float("nan")
    if on_gpu:  # device kernels only: each is one event of device type CUDA
        cuda_events = (e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        kernels = [(e.name, e.device_time_total) for e in cuda_events]
    else:  # CPU smoke: each op call's self time stands in for a kernel
        kernels = [(e.name, e.self_cpu_time_total) for e in prof.events()]
    print(f"# Sampler profile: {name}, batch {batch}, {steps} steps, cfg {cfg}, {DTYPE}, "
          f"{torch.cuda.get_device_name() if on_gpu else 'CPU'}\n")
    print(format_groups(group_times(kernels), wall_ms))
    if on_gpu and sum(us for _, us in kernels) < HOST_BOUND_SHARE * wall_ms * 1e3:
        # host-bound: the graph replay shows what is left without the host (kernels and the gaps between them)
        graphed = Sampler(model, batch, steps, cfg=cfg, dtype=DTYPE)
        replay_ms = cuda_time_ms(lambda: graphed(labels, seeds), warmup=2, rep=3, flush_l2=False)
        print(f"graph replay of the same loop: {replay_ms:.2f} ms")
    sort_by = "cuda_time_total" if on_gpu else "self_cpu_time_total"
    print("\n" + prof.key_averages().table(sort_by=sort_by, row_limit=top, max_name_column_width=90) + "\n")

    def synchronized_call() -> None:
        sampler(labels, seeds)
        if on_gpu:
            torch.cuda.synchronize()

    print(host_table(synchronized_call, top) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny" if SMOKE else "sphere-l-imagenet")
    parser.add_argument("--batch", type=int, nargs="+", default=[2] if SMOKE else [64, 1],
                        help="one profile per batch size (default %(default)s)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cfg", type=float, default=1.4)
    parser.add_argument("--top", type=int, default=25,
                        help="kernels, and host functions, listed (default %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("sphere_fast").setLevel(logging.INFO)

    model = build_model(args.model)
    for batch in args.batch:
        profile_batch(model, args.model, batch, args.steps, args.cfg, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
