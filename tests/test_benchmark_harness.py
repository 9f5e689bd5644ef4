"""The benchmark harness's arithmetic, its pytest-benchmark records, the report and the GPU check's CPU path."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import (
    bench_sampling,
    bench_training,
    compile_times,
    goals,
    gpu_check,
    grids,
    harness,
    profile_sampler,
    report,
    tree,
    tune_adaln,
    tune_attention,
    tune_swiglu_linear,
)
from sphere_fast import SphereEncoder, sampling, use_backend
from sphere_fast.model import labels_checked
from sphere_fast.training import LOSS_PRESETS, SphereLoss

ROOT = Path(__file__).resolve().parents[1]
CEILINGS = harness.Ceilings(copy_gbps=4000.0, matmul_tflops=800.0, copy_bytes=2 << 30, matmul_size=8192)


# --------------------------------------------------------------------------------------------- arithmetic


def test_rates_and_percentages_from_given_numbers() -> None:
    m = harness.derived_metrics(2.0, bytes_moved=4 * 10**9, flops=4 * 10**11, ceilings=CEILINGS, baseline_ms=6.0)
    assert m["gbps"] == pytest.approx(2000.0)  # 4 GB in 2 ms
    assert m["pct_copy"] == pytest.approx(50.0)
    assert m["tflops"] == pytest.approx(200.0)  # 0.4 TFLOP in 2 ms
    assert m["pct_matmul"] == pytest.approx(25.0)
    assert m["speedup"] == pytest.approx(3.0)


def test_unknown_models_stay_none() -> None:
    m = harness.derived_metrics(1.0, bytes_moved=10**9)
    assert m["gbps"] == pytest.approx(1000.0)
    assert m["pct_copy"] is None and m["tflops"] is None and m["pct_matmul"] is None and m["speedup"] is None


@pytest.mark.parametrize("ms", [0.0, -1.0, math.nan, math.inf])
def test_bad_times_are_refused(ms: float) -> None:
    with pytest.raises(ValueError, match="ms"):
        harness.derived_metrics(ms, bytes_moved=1)


def test_ceiling_rates() -> None:
    assert harness.copy_rate(10**9, 1.0) == pytest.approx(2000.0)  # read + written
    assert harness.matmul_rate(1000, 1.0) == pytest.approx(2.0)  # 2 n^3 flops


def test_sampler_flops_per_image_follow_the_spec() -> None:
    """T decoder and T - 1 encoder passes, both doubled by CFG (spec section 6): Sphere-XL at 4 steps with combo
    CFG is the spec's 13.3 TFLOP; one step without CFG is one Sphere-L decoder pass (671 GFLOP), two steps add
    an encoder pass (623) and a decoder pass."""
    assert bench_sampling.flops_per_image("sphere-xl-imagenet", 4, 1.4) / 1e12 == pytest.approx(13.3, abs=0.05)
    assert bench_sampling.flops_per_image("sphere-l-imagenet", 1, 1.0) == 671e9
    assert bench_sampling.flops_per_image("sphere-l-imagenet", 2, 1.0) == (2 * 671 + 623) * 1e9
    assert bench_sampling.flops_per_image("tiny", 4, 1.4) is None


def meta_preset(name: str) -> tuple[SphereEncoder, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The preset built on the meta device (FlopCounterMode counts from shapes: no memory, no compute) and batch-1
    images, latents and labels for it."""
    with torch.device("meta"):
        model = SphereEncoder.from_preset(name)
    images = torch.empty(1, 3, model.input_size, model.input_size, device="meta")
    latents = torch.empty(1, *model.latent_shape[1:], device="meta")
    return model, images, latents, torch.zeros(1, dtype=torch.long, device="meta")


def attention_flops(net: torch.nn.Module) -> int:
    """The attention's two products in one pass of a network at batch 1, 4 N^2 W a layer: what the spec's FLOPs
    leave out."""
    return len(net.blocks) * 4 * net.num_tokens**2 * net.blocks[0].attn.proj.in_features


@pytest.mark.parametrize("name", ["sphere-l-imagenet", "sphere-xl-imagenet"])
def test_pass_flops_are_the_models_matmuls_with_weights(name: str) -> None:
    """The spec's FLOPs of a pass (bench_sampling.PASS_GFLOP, integer GFLOP) are what torch's FlopCounterMode
    counts for the model's pass at batch 1 but the attention's two products."""
    model, images, latents, labels = meta_preset(name)
    spec_gflop = dict(zip(("decoder", "encoder"), bench_sampling.PASS_GFLOP[name]))
    for net, inputs in ((model.decoder.eval(), latents), (model.encoder.eval(), images)):
        with use_backend("eager"), torch.no_grad(), labels_checked(), FlopCounterMode(display=False) as counter:
            net(inputs, labels)
        assert (counter.get_total_flops() - attention_flops(net)) / 1e9 == pytest.approx(spec_gflop[net.kind], abs=0.5)


def test_train_step_flops_per_image_are_the_counted_matmuls_with_weights() -> None:
    """bench_training's FLOPs of a Sphere-L training step per image against torch's FlopCounterMode over the
    loss's forward and backward on the meta device (batch 1, no perceptual terms), less attention's products:
    4 N^2 W a layer in each of the four network passes (two encoder, two decoder), twice that in the backward."""
    name = "sphere-l-imagenet"
    model, images, noise, labels = meta_preset(name)
    loss = SphereLoss(model.train(), dataclasses.replace(LOSS_PRESETS["imagenet"], recon_perc=0.0, con_perc=0.0))
    scale = torch.ones(1, device="meta")
    with use_backend("eager"), labels_checked(), FlopCounterMode(display=False) as counter:
        total, _ = loss(images, labels, scale, scale, noise=noise)
        total.backward()
    attention = 2 * attention_flops(model.encoder) + 2 * attention_flops(model.decoder)
    counted = counter.get_total_flops() - 3 * attention
    assert counted == pytest.approx(bench_training.flops_per_image(name), rel=1e-3)


def test_timing_is_the_median_and_keeps_samples() -> None:
    t = harness.Timing([3.0, 1.0, 2.0, 10.0])
    assert float(t) == 2.5 and t.samples_ms == (3.0, 1.0, 2.0, 10.0)
    with pytest.raises(ValueError, match="no timing samples"):
        harness.Timing([])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU smoke path")
def test_smoke_timer_calls_once_with_rotated_args() -> None:
    assert harness.SMOKE
    calls: list[tuple[int, ...]] = []
    ms = harness.cuda_time_ms(lambda *a: calls.append(a) or time.sleep(0.01), warmup=5, rep=7, rotate=[(1,), (2,)])
    assert calls == [(1,)]  # smoke mode: one timed call, no warm-up
    assert 5.0 <= ms < 1000.0 and len(ms.samples_ms) == 1
    assert harness.measure_ceilings() is None
    with pytest.raises(ValueError, match="rotate must hold at least one"):
        harness.cuda_time_ms(lambda: None, rotate=[])


def test_gpu_timer_order_of_work(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CUDA path with torch.cuda stood in for: per timed call an L2-evicting read, the head-start wait,
    # then the events around the call; one synchronize before and one after the loop, none in between.
    log: list[str] = []

    class Event:
        def __init__(self, enable_timing: bool) -> None:
            self.t = 0.0

        def record(self) -> None:
            self.t = float(len(log))
            log.append("record")

        def synchronize(self) -> None:
            log.append("wait for the last call")

        def elapsed_time(self, end: "Event") -> float:
            return end.t - self.t

    flush = torch.zeros(64, dtype=torch.int8), torch.zeros((), dtype=torch.int32)
    monkeypatch.setattr(harness, "SMOKE", False)
    monkeypatch.setattr(harness, "_flush_buffers", lambda: flush)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: log.append("sync"))
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: log.append(f"sleep {cycles}"))
    real_sum = torch.sum
    monkeypatch.setattr(torch, "sum", lambda *a, **k: log.append("read flush") or real_sum(*a, **k))
    ms = harness.cuda_time_ms(lambda: log.append("fn"), warmup=2, rep=3)
    call = ["read flush", "record", f"sleep {harness.HEAD_START_CYCLES}", "record", "fn", "record"]
    # each call queued once the last one ended: no full launch queue holds the host inside its queueing
    assert log == ["fn", "fn", "sync", *call, "wait for the last call", *call, "wait for the last call", *call, "sync"]
    assert ms.samples_ms == (2.0, 2.0, 2.0)
    # the head start is the wait's device time (events around it); the host's queueing of fn here takes far less
    assert ms.head_start_ms == 2.0 and ms.host_ms is not None and ms.host_bound is False
    log.clear()
    harness.cuda_time_ms(lambda: log.append("fn"), warmup=0, rep=1, flush_l2=False)
    assert log == ["sync", "record", f"sleep {harness.HEAD_START_CYCLES}", "record", "fn", "record", "sync"]
    # queueing for 5 ms against a head start of 2 "ms" and a span of 2: the host paced the span
    slow = harness.cuda_time_ms(lambda: time.sleep(0.005), warmup=0, rep=3)
    assert slow.host_ms >= 5.0 and slow.host_bound is True


def test_host_bound_weighs_the_queueing_past_the_head_start_against_the_span() -> None:
    """The host paced a call's span where it was still queueing the call for most of it after the head start; a
    long queueing of a call whose device time is longer still (an eager op of hundreds of launches) is not."""
    share = harness.HOST_BOUND_SHARE
    assert harness.Timing([1.0], host_ms=0.5 + share + 0.01, head_start_ms=0.5).host_bound is True
    assert harness.Timing([1.0], host_ms=0.5 + share - 0.01, head_start_ms=0.5).host_bound is False
    assert harness.Timing([5.0], host_ms=2.0, head_start_ms=0.5).host_bound is False  # device-bound, long queueing
    assert harness.Timing([0.02], host_ms=0.3, head_start_ms=0.5).host_bound is False  # queued within the head start
    assert harness.Timing([1.0]).host_bound is None  # the smoke path's wall clock: not known


def test_gate_passes_rounding_and_stops_wrong_outputs() -> None:
    ref = torch.randn(64, 256)
    harness.gate(ref.to(torch.bfloat16), ref, "bf16 rounding", torch.bfloat16)
    harness.gate((ref, ref * 2), (ref, ref * 2), "pair", torch.float32)
    with pytest.raises(AssertionError, match="wrong output 1"):
        harness.gate((ref, ref * 1.1), (ref, ref), "wrong", torch.float32)
    with pytest.raises(ValueError):
        harness.gate((ref,), (ref, ref), "missing output", torch.float32)


def test_gate_holds_each_dtype_to_its_own_tolerance_and_checks_dtype_and_shape() -> None:
    """The review's cases (bench_spherify's fp32 256x8192): an fp32 row whose kernel writes bf16, or whose norm is
    1.2% off or taken over 7/8 of each row, is stopped; fp32 rounding and another sum order pass, as does the bf16
    row's own rounding (its bound is unchanged: harness.GATE_TOL)."""
    from sphere_fast.ops.spherify import spherify_reference

    z = torch.randn(256, 8192, generator=torch.Generator().manual_seed(0))
    ref = spherify_reference(z.double()).float()  # fp32 inputs, another rounding and sum order than the kernels'
    harness.gate(spherify_reference(z), ref, "fp32", torch.float32)
    harness.gate(spherify_reference(z.bfloat16()), ref, "bf16", torch.bfloat16)
    tail_dropped = z * torch.rsqrt(z[:, : 7 * 1024].pow(2).mean(1, keepdim=True) + 1e-6)
    for wrong, why in ((spherify_reference(z).bfloat16(), "torch.bfloat16 \\(256, 8192\\), expected torch.float32"),
                       (ref * 1.012, "Tensor-likes are not close"), (tail_dropped, "not close"),
                       (spherify_reference(z.bfloat16()).float(), "not close"),
                       (ref[:, :4096], "expected torch.float32 \\(256, 8192\\)")):
        with pytest.raises(AssertionError, match=f"fp32 wrong output 0: .*{why}"):
            harness.gate(wrong, ref, "fp32 wrong", torch.float32)
    with pytest.raises(AssertionError, match="expected torch.bfloat16"):  # a bf16 row may not write fp32 either
        harness.gate(ref, ref, "bf16 row", torch.bfloat16)
    assert harness.GATE_TOL[torch.float32] <= 2**-14 and harness.GATE_TOL[torch.bfloat16] == 2**-6


def test_backward_gate_checks_each_gradient_against_the_float32_reference() -> None:
    """bf16 rounding passes; a gradient off by 10% is stopped, though the output (all the forward gate sees) is
    right."""
    g = torch.Generator().manual_seed(0)
    x, w = (torch.randn(64, 256, generator=g).bfloat16().requires_grad_() for _ in range(2))
    upstream = torch.randn(64, 256, generator=g).bfloat16()
    harness.gate_backward(x.sin() * w, [x, w], upstream, lambda x, w: x.sin() * w, "bf16 rounding")
    # the same output, with d/dx 1.1 times too large
    off = (x.sin() * w).detach() + 1.1 * (x - x.detach()) * (x.cos() * w).detach() + (w - w.detach()) * x.sin().detach()
    harness.gate(off, x.float().sin() * w.float(), "the same output", torch.bfloat16)
    with pytest.raises(AssertionError, match="wrong backward: gradient of input 0"):
        harness.gate_backward(off, [x, w], upstream, lambda x, w: x.sin() * w, "wrong")
    # an fp32 input's gradient is held to the fp32 bound: 0.1% off is stopped
    x32 = x.detach().float().requires_grad_()
    harness.gate_backward(x32.sin(), [x32], upstream.float(), torch.sin, "fp32")
    with pytest.raises(AssertionError, match="fp32 off backward: gradient of input 0"):
        harness.gate_backward(x32.sin() * 1.001, [x32], upstream.float(), torch.sin, "fp32 off")


def test_record_fills_extra_info(benchmark) -> None:
    # An op name no bench uses: this row must never be mistaken for a measurement.
    info = harness.record(benchmark, op="unit-test", impl="triton", shape=(8, 256, 4096), dtype=torch.bfloat16,
                          ms=harness.Timing([0.5, 0.25, 0.25]), bytes_moved=10**9, ceilings=CEILINGS, baseline_ms=1.0)
    assert benchmark.extra_info == info
    assert info["shape"] == [8, 256, 4096] and info["dtype"] == "bf16" and info["ms"] == 0.25
    assert info["gbps"] == pytest.approx(4000.0) and info["pct_copy"] == pytest.approx(100.0)
    assert info["speedup"] == pytest.approx(4.0) and info["tflops"] is None
    assert info["smoke"] == harness.SMOKE and info["device"] == harness.device_name()  # a row says what it measured


def test_record_takes_dims_of_any_integer_type(benchmark) -> None:
    """numpy's, from a shape computed with it, become ints: the row goes to JSON."""
    info = harness.record(benchmark, op="unit-test", impl="triton", shape=(np.int64(8), 256), dtype="bf16", ms=1.0)
    assert info["shape"] == [8, 256] and all(type(d) is int for d in info["shape"])
    json.dumps(info)


def test_record_streams_its_row_when_asked(benchmark, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = tmp_path / "rows.jsonl"
    monkeypatch.setenv(harness.ROWS_ENV, str(rows))
    info = harness.record(benchmark, op="unit-test", impl="cpp", shape="b1 t4", dtype="bf16", ms=2.0,
                          extra={"images_per_s": 500.0})
    harness.stream_row("environment", {"sphere_fast": {"device": "cpu"}})
    case, env = [json.loads(line) for line in rows.read_text().splitlines()]
    assert case == {"kind": "case", "name": benchmark.fullname, "extra_info": info}
    assert info["images_per_s"] == 500.0 and env == {"kind": "environment", "sphere_fast": {"device": "cpu"}}
    monkeypatch.delenv(harness.ROWS_ENV)
    harness.stream_row("case", {"name": "x"})  # no file asked for: nothing written
    assert len(rows.read_text().splitlines()) == 2


def test_record_stores_event_samples_as_pytest_benchmark_rounds(tmp_path: Path) -> None:
    # Run a real pytest-benchmark session: its stats must be our samples, not a wall-clock no-op.
    (tmp_path / "bench_fake.py").write_text(textwrap.dedent("""
        from benchmarks.harness import Timing, record

        def test_fake(benchmark):
            record(benchmark, op="fake", impl="triton", shape=[4], dtype="fp32",
                   ms=Timing([1.0, 2.0, 3.0, 10.0]), bytes_moved=4000)
    """))
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(tmp_path / "bench_fake.py"), "-q", "-p", "no:cacheprovider",
         f"--rootdir={tmp_path}", "-o", "python_files=bench_*.py", "--benchmark-enable", f"--benchmark-json={out}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    case = json.loads(out.read_text())["benchmarks"][0]
    stats = case["stats"]
    assert stats["rounds"] == 4
    assert stats["min"] == pytest.approx(1e-3) and stats["max"] == pytest.approx(10e-3)
    assert stats["median"] == pytest.approx(2.5e-3) and case["extra_info"]["ms"] == pytest.approx(2.5)
    assert case["options"]["timer"] == "cuda_events" and case["group"] == "fake [4] fp32"


def test_record_keeps_the_samples_count_and_quartiles(benchmark) -> None:
    """A row keeps its samples' spread for the verdicts (goals, choices): their count, and from four samples on
    their quartiles; fewer say little, and a plain float is one sample (the first image rows)."""
    info = harness.record(benchmark, op="unit-test", impl="triton", shape=[4], dtype="fp32",
                          ms=harness.Timing([8.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]))
    assert (info["ms"], info["ms_q1"], info["ms_q3"], info["n_samples"]) == (4.5, 2.75, 6.25, 8)
    assert benchmark.extra_info == info and json.loads(json.dumps(info)) == info
    assert harness.sample_spread([1.0, 2.0, 3.0, 10.0]) == {"ms_q1": 1.75, "ms_q3": 4.75, "n_samples": 4}
    assert harness.sample_spread([1.0, 2.0, 3.0]) == {"ms_q1": None, "ms_q3": None, "n_samples": 3}
    assert harness.sample_spread([9940.0]) == {"ms_q1": None, "ms_q3": None, "n_samples": 1}


def test_record_keeps_what_the_timing_knows_of_its_calls(benchmark) -> None:
    timed = harness.Timing([1.0, 2.0], host_ms=2.45, head_start_ms=0.5, graph_recordings=2)
    info = harness.record(benchmark, op="unit-test", impl="triton", shape=[4], dtype="fp32", ms=timed)
    assert (info["host_ms"], info["head_start_ms"], info["host_bound"], info["graph_recordings"]) == (2.45, 0.5,
                                                                                                      True, 2)
    assert harness.timing_fields(3.0) == {"host_ms": None, "head_start_ms": None, "host_bound": None,
                                          "graph_recordings": None}  # a plain float (the first image rows)


def test_sweep_row_gives_the_time_and_its_rate_or_the_error() -> None:
    assert harness.sweep_row("(64, 4)", lambda: 2.0, lambda ms: 100 / ms) == "| (64, 4) | 2.000 | 50 | ok |"

    def does_not_fit() -> float:
        raise RuntimeError("out of resources: shared memory")

    assert harness.sweep_row("(256, 8)", does_not_fit, lambda ms: ms) == (
        "| (256, 8) | – | – | RuntimeError: out of resources: shared memory |")


@pytest.mark.parametrize("smoke", [True, False], ids=["smoke", "real-sizes"])
def test_impls_compile_the_reference_statically(monkeypatch: pytest.MonkeyPatch, smoke: bool) -> None:
    """The compile baseline: fullgraph, one static compile per case (and room for every case under dynamo's
    recompile limit); a CPU smoke run traces with the eager backend instead of minutes of inductor, a CPU run of
    the real sizes (SPHERE_FAST_BENCH_SMOKE=0) compiles with inductor."""
    monkeypatch.setattr(harness, "SMOKE", smoke)
    compiled: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(kwargs) or fn)
    # set and restored by plain assignment: under torch 2.11 the name is an alias that monkeypatch's undo deletes
    limit = torch._dynamo.config.recompile_limit
    try:
        torch._dynamo.config.recompile_limit = 8
        harness.impls(lambda x, *, backend: x, lambda x: x, device="cpu", backends=())
        assert torch._dynamo.config.recompile_limit >= 256
    finally:
        torch._dynamo.config.recompile_limit = limit
    assert compiled == [{"fullgraph": True, "dynamic": False, "backend": "eager" if smoke else "inductor"}]


def test_nvidia_smi_reads_the_first_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = "NVIDIA H200, GPU-8d1f, 580.1, 1980 MHz, 3201 MHz, 1980 MHz, 3201 MHz, 120 W, 700 W, 31, P0\n" \
            "NVIDIA H200, GPU-77c0, 580.1, 345 MHz, 3201 MHz, 1980 MHz, 3201 MHz, 75 W, 700 W, 29, P0\n"
    monkeypatch.setattr(harness.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=lines))
    smi = harness.nvidia_smi()
    assert smi["name"] == "NVIDIA H200" and smi["clocks.sm"] == "1980 MHz" and smi["pstate"] == "P0"
    assert smi["uuid"] == "GPU-8d1f"
    monkeypatch.setattr(harness.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout="\n"))
    assert harness.nvidia_smi() is None


def test_impls_lists_and_skips_with_reasons() -> None:
    def reference(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    def op(x: torch.Tensor, *, backend: str) -> torch.Tensor:
        return x * 2 + (backend == "none")

    def missing_vendor():
        raise ImportError("no module named flash_attn")

    params = harness.impls(op, reference, device="cpu", backends=("triton", "nope"),
                           vendor={"flash": missing_vendor, "sdpa": lambda: reference})
    by_id = {p.id: p for p in params}
    assert list(by_id) == ["eager", "compile", "triton", "nope", "flash", "sdpa"]
    skip_reasons = {k: [m.kwargs["reason"] for m in p.marks] for k, p in by_id.items()}
    assert skip_reasons["nope"] and "not available" in skip_reasons["nope"][0]
    assert skip_reasons["flash"] == ["flash unavailable: no module named flash_attn"]
    assert not skip_reasons["eager"] and not skip_reasons["compile"] and not skip_reasons["sdpa"]
    x = torch.arange(4.0)
    for name in ("eager", "compile", "sdpa"):
        assert torch.equal(by_id[name].values[0](x), x * 2), name
    with pytest.raises(RuntimeError, match="nope"):
        by_id["nope"].values[0](x)


# ------------------------------------------------------------------------------------------------ report


def gpu_checker(tmp_path: Path, budget_s: float = 100, **options: Any) -> gpu_check.Check:
    """A GPU check of every phase on a machine taken as having CUDA, writing into ``tmp_path``."""
    return gpu_check.Check(tmp_path, budget_s=budget_s, phases=gpu_check.PHASES, cuda=True, **options)


def _result(datetime_: str = "2026-11-28T12:00:00+00:00", smoke: bool = False, device: str = "NVIDIA H200") -> dict:
    def row(op: str, impl: str, ms: float, **kw) -> dict:
        return {"extra_info": {"op": op, "impl": impl, "shape": [8, 256, 4096], "dtype": "bf16", "ms": ms,
                               "gbps": None, "tflops": None, "pct_copy": None, "pct_matmul": None, **kw}}

    return {
        "datetime": datetime_,
        "commit_info": {"id": "0123456789abcdef", "dirty": False},
        "machine_info": {"sphere_fast": {
            "device": device, "torch": "2.11.0+cu130", "cuda": "13.0", "triton": "3.6.0", "smoke": smoke,
            "nvidia_smi": {"driver_version": "580.159.03", "clocks.sm": "1980 MHz", "clocks.max.sm": "1980 MHz",
                           "clocks.mem": "3201 MHz", "power.draw": "400 W"},
            "ceilings": {"copy_gbps": 4300.0, "matmul_tflops": 790.0, "copy_bytes": 2 << 30, "matmul_size": 8192},
        }},
        "benchmarks": [
            row("swiglu", "eager", 1.0, gbps=500.0),
            row("swiglu", "compile", 0.5),
            row("swiglu", "triton", 0.25, gbps=2000.0, pct_copy=46.6),
            row("swiglu", "cpp", 0.4, gbps=1250.0, pct_copy=29.1),
            row("copy", "torch", 2.0, gbps=4300.0, pct_copy=100.0),
            {"extra_info": {}},  # a case written without the harness is ignored
        ],
    }


def test_report_marks_op_rows_that_may_hold_host_time_and_names_graph_recordings() -> None:
    data = _result()
    swiglu_eager = data["benchmarks"][0]["extra_info"]
    swiglu_eager.update(host_bound=True, graph_recordings=0)
    data["benchmarks"].append({"extra_info": {**swiglu_eager, "op": "sample tiny", "impl": "compile",
                                              "shape": "b1 t4 no cfg", "graph_recordings": 3}})
    text = report.render(data)
    assert "| 8×256×4096 | bf16 | 1.00† | 0.500 |" in text  # the eager swiglu row, not the others
    assert "1 op rows (marked † in the tables) were still being queued by the host" in text  # not the sampler's
    assert "1 rows recorded CUDA graphs of torch.compile, or ran them eager, inside their timed calls" in text
    assert "compile sample tiny." in text
    assert "†" not in report.render(_result()) and "recorded CUDA graphs" not in report.render(_result())


def test_report_takes_older_rows_quartiles_from_pytest_benchmark_statistics() -> None:
    """Rows recorded before they kept their quartiles have them in pytest-benchmark's statistics of the same samples
    (seconds): the verdicts weigh those; a row's own quartiles, or too few rounds, leave it as it is."""
    data = _result()
    older, own, few = (data["benchmarks"][i] for i in range(3))
    older["stats"] = {"rounds": 50, "q1": 0.0009, "q3": 0.0012}
    own["extra_info"].update(ms_q1=0.4, ms_q3=0.6, n_samples=50)
    own["stats"] = {"rounds": 50, "q1": 0.0001, "q3": 0.0009}
    few["stats"] = {"rounds": 3, "q1": 0.0002, "q3": 0.0003}
    found = report.rows(data)
    assert (found[0]["ms_q1"], found[0]["ms_q3"], found[0]["n_samples"]) == (0.9, 1.2, 50)
    assert (found[1]["ms_q1"], found[1]["ms_q3"]) == (0.4, 0.6)
    assert "ms_q1" not in found[2] and "ms_q1" not in older["extra_info"]  # the file's rows are left as they were


def test_report_renders_pivoted_table() -> None:
    text = report.render(_result())
    assert "Measured 2026-11-28 12:00 UTC on NVIDIA H200" in text
    assert "driver 580.159.03" in text and "torch 2.11.0+cu130" in text
    # no $SPHERE_FAST_COMMIT: the id is the machine's git metadata, which on a lent machine may be stale
    assert "commit not stated by the run (the machine's git metadata, which may be stale: 0123456789)" in text
    assert "copy 4300 GB/s" in text and "bf16 matmul 790 TFLOP/s" in text
    lines = text.splitlines()
    # one table per op, with the columns that op fills
    swiglu = lines.index("#### swiglu")
    assert lines[swiglu + 2] == ("| shape | dtype | eager ms | compile ms | triton ms | cpp ms | ours vs eager | "
                                 "ours vs compile | GB/s | % of copy |")
    assert lines[swiglu + 4] == "| 8×256×4096 | bf16 | 1.00 | 0.500 | 0.250 | 0.400 | 4.00x | 2.00x | 2000 | 47% |"
    copy = lines.index("#### copy")  # a ceiling: no implementation of ours, and the table says whose rates it shows
    assert lines[copy + 2 : copy + 7] == ["No implementation of ours: the rates are the fastest implementation's.", "",
                                          "| shape | dtype | torch ms | GB/s | % of copy |", "|---|---|---|---|---|",
                                          "| 8×256×4096 | bf16 | 2.00 | 4300 | 100% |"]
    assert "Smoke run" not in text


def test_report_number_formats() -> None:
    """Three significant digits below 100 (a trailing zero kept), whole numbers from 100; speedups and shares."""
    fmt = report._fmt
    assert [fmt(v, "n") for v in (None, 1234.4, 100.0, 99.94, 10.0, 9.999, 1.0, 0.05)] == [
        "–", "1234", "100", "99.9", "10.0", "10.00", "1.00", "0.0500"]
    assert fmt(2.5, "x") == "2.50x" and fmt(46.6, "%") == "47%"


def test_report_columns_ours_and_partly_filled() -> None:
    """An op without any of our implementations (a ceiling, a baseline pair) gets no speedup columns; a rate
    column that some shapes filled is kept, with a dash where a shape did not."""
    def row(impl: str, shape: list[int], ms: float, **extra) -> dict:
        return {"op": "matmul", "impl": impl, "shape": shape, "dtype": "bf16", "ms": ms, **extra}

    lines = report.table([row("eager", [64], 2.0), row("torch", [64], 1.0, gbps=800.0),
                          row("eager", [128], 4.0), row("torch", [128], 3.0)]).splitlines()
    assert lines[2] == "No implementation of ours: the rates are the fastest implementation's."
    assert lines[4] == "| shape | dtype | eager ms | torch ms | GB/s |"
    assert lines[6:] == ["| 64 | bf16 | 2.00 | 1.00 | 800 |", "| 128 | bf16 | 4.00 | 3.00 | – |"]


def test_report_rates_are_ours_alone_where_the_op_has_ours() -> None:
    """A shape measured without our kernels (a run cut short) shows no rates: the GB/s and % of copy columns are
    ours, not the compile row's (the review's swiglu_fwd case)."""
    def row(impl: str, shape: list[int], ms: float, gbps: float, pct_copy: float) -> dict:
        return {"op": "swiglu_fwd", "impl": impl, "shape": shape, "dtype": "bf16", "ms": ms, "gbps": gbps,
                "pct_copy": pct_copy}

    text = report.table([row("eager", [64, 1024, 6144], 1.06, 1000.0, 24.0),
                         row("triton", [64, 1024, 6144], 0.283, 4263.0, 100.0),
                         row("eager", [1, 256, 6144], 0.0127, 230.0, 5.0),
                         row("compile", [1, 256, 6144], 0.00544, 550.0, 13.0)])
    assert "| 64×1024×6144 | bf16 | 1.06 | – | 0.283 | 3.75x | 4263 | 100% |" in text
    assert "| 1×256×6144 | bf16 | 0.0127 | 0.00544 | – | – | – | – |" in text
    assert "No implementation of ours" not in text


def test_report_footer_names_the_single_sample_rows() -> None:
    """The first image rows are one wall-clock sample each, not CUDA-event medians; the eager rows' dispatch is
    named."""
    footer = report.render(_result()).split("\n\n")[-1]
    assert "the first image rows: one sample each, a fresh process's wall clock" in footer
    assert "eager rows run sphere_fast's ops on its eager backend" in footer and "official" not in footer


def test_report_footer_states_the_noise_rule() -> None:
    """The footer says how the verdicts weigh the rows' quartiles, not that they compare medians with the bars."""
    footer = report.render(_result()).split("\n\n")[-1]
    assert "the verdicts compare medians with their bars" not in footer
    assert "(a speedup's low end is ours' third quartile against the baseline's first)" in footer
    assert '"within noise" where a range spans it' in footer
    assert "a time to first image from fewer than four processes: its range is its time ±10%" in footer
    assert "A pending choice leaves out the pairs whose quartile ranges overlap." in footer


def test_report_goals_show_the_rows_ranges_and_render_rows_without_them() -> None:
    """A file whose rows kept their quartiles shows each goal's range, and "within noise" where it spans the bar;
    the same rows from an older file (no quartiles) are judged on their medians, as before."""
    def row(impl: str, ms: float, q1: float, q3: float) -> dict:
        return {"extra_info": {"op": "swiglu_fwd", "impl": impl, "shape": [8, 256, 4096], "dtype": "bf16", "ms": ms,
                               "ms_q1": q1, "ms_q3": q3, "n_samples": 20, "gates": harness.GATES}}

    data = {**_result(), "benchmarks": [row("eager", 1.0, 0.9, 1.1), row("triton", 0.3, 0.28, 0.32)]}
    goal = "| #4 | swiglu_fwd: >= 3x eager at 256 tokens |"
    assert f"{goal} 3.33x (2.81-3.93) (bf16 8×256×4096), 1 of 9 shapes | within noise |" in report.render(data)
    for case in data["benchmarks"]:
        case["extra_info"] = {k: v for k, v in case["extra_info"].items() if k not in ("ms_q1", "ms_q3", "n_samples")}
    assert f"{goal} 3.33x (bf16 8×256×4096), 1 of 9 shapes | partly measured |" in report.render(data)


def test_report_of_a_file_without_rows() -> None:
    text = report.render({**_result(), "benchmarks": [{"extra_info": {}}]})
    assert text.startswith("Measured 2026-11-28") and text.endswith("\n\nNo benchmark rows in this file.")


def test_report_main_needs_a_file_or_the_readme(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        report.main([])
    assert exit_info.value.code == 2 and "give a results JSON or --readme" in capsys.readouterr().err


def test_report_splits_the_cold_start_by_stage() -> None:
    stages = {"startup_s": 4.5, "import_torch_s": 3.0, "import_sphere_fast_s": 0.06, "cuda_init_s": 0.5,
              "build_s": 0.4, "first_call_s": 1.6, "capture_compile_pass_s": 0.3, "capture_warm_up_s": 0.9,
              "capture_capture_s": 0.2}
    first = {"op": "first image sphere-l-imagenet", "impl": "graph", "ms": 7000.0, "kernel_caches": "warm", **stages}
    old = {"op": "first image sphere-l-imagenet", "impl": "eager", "ms": 9000.0, "startup_s": 7.0, "build_s": 0.5,
           "first_call_s": 1.5}  # a run from before the CUDA init and the imports were recorded
    text = report.cold_starts([first, old, {"op": "swiglu", "impl": "triton", "ms": 1.0}])
    assert ("- sphere-l-imagenet graph, warm kernel caches: 7.0 s = start-up 4.50 (imports: torch 3.00, "
            "sphere_fast 0.06) + CUDA init 0.50 + model build 0.40 + first call 1.60 (capture: compile pass 0.30, "
            "warm up 0.90, capture 0.20) s") in text
    assert "- sphere-l-imagenet eager: 9.0 s = start-up 7.00 + model build 0.50 + first call 1.50 s" in text
    assert report.cold_starts([{"op": "swiglu", "impl": "triton", "ms": 1.0}]) == ""


def test_report_tables_the_peak_memory_by_implementation() -> None:
    def row(op: str, impl: str, shape: str, peak_gb: float | None) -> dict:
        return {"op": op, "impl": impl, "shape": shape, "dtype": "bf16", "ms": 1.0, "peak_gb": peak_gb}

    records = [
        row("sample sphere-l-imagenet", "graph", "b64 t4 cfg1.4 combo", 21.5),
        row("sample sphere-l-imagenet", "eager", "b64 t4 cfg1.4 combo", 34.0),
        row("sample sphere-l-imagenet", "graph", "b1 t4 cfg1.4 combo", 0.61),
        row("sample sphere-l-imagenet", "graph", "b1 t1 cfg1.4 combo", 0.0),  # found all it needed: a measurement
        row("train step sphere-l-imagenet", "fused", "b16", None),  # measured nothing (a CPU run)
        {"op": "swiglu", "impl": "triton", "shape": [8, 256], "dtype": "bf16", "ms": 1.0},
    ]
    lines = report.peak_memory(records).splitlines()
    assert lines[2:7] == ["| case | eager GB | graph GB |", "|---|---|---|",
                          "| sample sphere-l-imagenet b64 t4 cfg1.4 combo bf16 | 34.0 | 21.5 |",
                          "| sample sphere-l-imagenet b1 t4 cfg1.4 combo bf16 | – | 0.610 |",
                          "| sample sphere-l-imagenet b1 t1 cfg1.4 combo bf16 | – | 0.00 |"]
    assert len(lines) == 8 and lines[-1] == ""
    assert report.peak_memory(records[4:]) == ""
    assert "Peak memory above the weights" in report.render({**_result(), "benchmarks": [
        {"extra_info": r} for r in records]})


def test_report_tables_the_sampler_first_calls_by_implementation() -> None:
    def row(op: str, impl: str, shape: str, first_call_s: float) -> dict:
        return {"op": op, "impl": impl, "shape": shape, "dtype": "bf16", "ms": 1.0, "first_call_s": first_call_s}

    records = [
        row("sample sphere-l-imagenet", "compile_networks", "b64 t4 cfg1.4 combo", 212.0),
        row("sample sphere-l-imagenet", "graph", "b64 t4 cfg1.4 combo", 2.5),
        row("first image sphere-l-imagenet", "graph", "b1 t4 cfg1.4 combo, warm caches", 1.6),  # a fresh process
    ]
    lines = report.first_calls(records).splitlines()
    assert lines[2:5] == ["| case | compile_networks s | graph s |", "|---|---|---|",
                          "| sample sphere-l-imagenet b64 t4 cfg1.4 combo bf16 | 212 | 2.50 |"]
    assert len(lines) == 6 and lines[-1] == ""
    assert report.first_calls(records[2:]) == ""
    assert "sampler case's first call" in report.render({**_result(), "benchmarks": [
        {"extra_info": r} for r in records]})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_peak_memory_measures_nothing_on_cpu() -> None:
    assert harness.PeakMemory().gb() is None


@pytest.mark.gpu
def test_peak_memory_counts_what_the_case_allocated_above_what_it_found() -> None:
    found = torch.empty(64 << 20, dtype=torch.int8, device="cuda")
    memory = harness.PeakMemory()
    scratch = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    del scratch
    kept = torch.empty(32 << 20, dtype=torch.int8, device="cuda")
    assert memory.gb() == pytest.approx((256 << 20) / 1e9, rel=0.01)  # the peak, not what is left
    del found, kept


@pytest.mark.gpu
def test_peak_memory_counts_a_graph_capture() -> None:
    from sphere_fast import Sampler
    from tests.tiny import tiny_model

    model = tiny_model().cuda().eval()
    memory = harness.PeakMemory()
    sampler = Sampler(model, 8, steps=2, cfg=1.4, dtype=torch.float32)
    images = sampler(torch.arange(8), torch.arange(8), clone=False)
    # the images live in the graph's pool and count as allocated: the allocator's stats see the capture
    held = torch.cuda.memory_allocated() - memory.start
    assert held >= images.numel() * images.element_size()
    assert memory.gb() * 1e9 >= held


def test_the_sampling_benchmark_runs_random_weights_on_distinct_samples() -> None:
    """No parameter keeps the official init's zeros (zero AdaLN and head weights would make matmuls unrealistically
    fast), and a case's samples have distinct seeds and cover the classes."""
    for model in (bench_sampling.random_model("tiny"), bench_sampling.build_model("tiny")):  # training's, sampling's
        zeros = [name for name, p in model.named_parameters() if not p.any()]
        assert zeros == []
    labels, seeds = bench_sampling.case_inputs(12, 10)
    assert labels.dtype == seeds.dtype == torch.int64 and labels.shape == seeds.shape == (12,)
    assert sorted(set(labels.tolist())) == list(range(10)) and len(set(seeds.tolist())) == 12


def test_the_sampling_grids_rows() -> None:
    """Each row's shape names its CFG; its timed calls fill about two seconds; the compile rows are slow only at
    realistic sizes (a smoke run traces them, with every other implementation)."""
    assert grids.sampler_case(1, 4, 1.0) == "b1 t4 no cfg"
    assert grids.sampler_case(64, 2, 1.4) == "b64 t2 cfg1.4 combo"
    assert grids.sampler_cases(1) == ["b1 t1 no cfg", "b1 t1 cfg1.4 combo", "b1 t2 no cfg", "b1 t2 cfg1.4 combo",
                                      "b1 t4 no cfg", "b1 t4 cfg1.4 combo"]
    # timed calls: about 2 s of them, at least 3 (a median), at most 20 (batch 1 takes 28 ms)
    assert [bench_sampling.timed_calls(ms) for ms in (28.0, 250.0, 1451.0)] == [20, 8, 3]
    slow = [p.id for p in bench_sampling.impl_params() if "slow" in [mark.name for mark in p.marks]]
    assert slow == ([] if harness.SMOKE else ["compile", "compile_networks"])


def test_the_sampling_runners_build_what_their_rows_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """``uncaptured`` and ``graph`` differ only by the CUDA graph; ``compile_networks`` compiles both networks'
    forwards, from a reset dynamo, and restores the shared model's own forwards after each call."""
    model = bench_sampling.cached_model("tiny")
    samplers = []
    monkeypatch.setattr(bench_sampling, "Sampler", lambda *args, **kwargs: samplers.append(kwargs))
    for impl in ("uncaptured", "graph"):
        bench_sampling.make_runner(impl, model, 2, 1, 1.4)
    assert [kwargs["cuda_graph"] for kwargs in samplers] == [False, True]
    monkeypatch.undo()
    compiled, resets = [], []
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(fn) or compile_(fn, **kwargs))
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(len(compiled)))
    run = bench_sampling.make_runner("compile_networks", model, 2, 1, 1.4)
    assert resets == [0] and compiled == [model.encoder.forward, model.decoder.forward]
    run(*bench_sampling.case_inputs(2, model.num_classes))
    assert "forward" not in vars(model.encoder) and "forward" not in vars(model.decoder)


def test_every_sampling_row_stages_its_host_inputs_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Sampler copies host labels and seeds to the device without a stream sync (sampling.to_device_unsynced):
    the baselines' rows do as well, as a blocking copy would sync each of their timed calls alone."""
    model = bench_sampling.cached_model("tiny")
    labels, seeds = bench_sampling.case_inputs(2, model.num_classes)
    staged: list[torch.Tensor] = []
    stage = sampling.to_device_unsynced
    # the Sampler's rows stage through sampling's function; the baselines' through bench_sampling.to_device alone
    # (generate() stages its labels again, which must not count for them)
    monkeypatch.setattr(sampling, "to_device_unsynced", lambda t, device: staged.append(t) or stage(t, device))
    for impl in ("uncaptured", "graph"):
        staged.clear()
        bench_sampling.make_runner(impl, model, 2, 2, 1.4)(labels, seeds)
        assert any(t is labels for t in staged) and any(t is seeds for t in staged), impl
    monkeypatch.undo()
    to_device = bench_sampling.to_device
    monkeypatch.setattr(bench_sampling, "to_device", lambda t: staged.append(t) or to_device(t))
    for impl in ("eager", "compile", "compile_networks"):
        staged.clear()
        bench_sampling.make_runner(impl, model, 2, 2, 1.4)(labels, seeds)
        assert any(t is labels for t in staged) and any(t is seeds for t in staged), impl


def test_the_sampling_gate_runs_the_eager_loop_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """A row selected without its eager row is still checked against the eager loop's images."""
    make_runner = bench_sampling.make_runner

    def off_by_a_little(impl: str, *args):
        run = make_runner(impl, *args)
        return run if impl == "eager" else lambda labels, seeds: run(labels, seeds) + 1e-3

    monkeypatch.setattr(bench_sampling, "make_runner", off_by_a_little)
    monkeypatch.setattr(bench_sampling, "_reference_images", {})
    with pytest.raises(AssertionError, match="graph differs from eager"):
        bench_sampling.time_sampler(None, None, "graph", "tiny", 2, 1, 1.0)  # stopped before the record


@pytest.mark.parametrize("sampler", ["right", "no cfg", "first step", "other seeds"])
def test_the_sampling_gate_fails_wrong_samplers_at_the_gpu_bound(monkeypatch: pytest.MonkeyPatch, sampler: str) -> None:
    """Held to the GPU's bound (bf16 rounding; smoke mode's float32 bound would catch any change), the tiny model's
    case fails a sampler that skips CFG (half the work, credited with CFG's FLOPs), returns the first step's image
    or another seed's, and passes the right one."""
    make_runner = bench_sampling.make_runner

    def runner(impl: str, model: SphereEncoder, batch: int, steps: int, cfg: float):
        if impl == "eager" or sampler == "right":
            return make_runner(impl, model, batch, steps, cfg)
        if sampler == "other seeds":
            run = make_runner(impl, model, batch, steps, cfg)
            return lambda labels, seeds: run(labels, seeds + 100)
        if sampler == "first step":
            return make_runner(impl, model, batch, 1, cfg)
        return make_runner(impl, model, batch, steps, 1.0)  # no cfg

    rows = []
    monkeypatch.setattr(bench_sampling, "make_runner", runner)
    monkeypatch.setattr(bench_sampling, "_reference_images", {})
    monkeypatch.setattr(bench_sampling, "_unguided_images", {}, raising=False)
    monkeypatch.setattr(bench_sampling, "SMOKE", False)
    monkeypatch.setattr(bench_sampling, "record", lambda benchmark, **row: rows.append(row))
    if sampler == "right":
        bench_sampling.time_sampler(None, None, "uncaptured", "tiny", 2, 4, 1.4)
        assert rows[0]["extra"]["eager_cfg_effect"] >= bench_sampling.MIN_CFG_EFFECT
        return
    with pytest.raises(AssertionError, match="uncaptured differs from eager"):
        bench_sampling.time_sampler(None, None, "uncaptured", "tiny", 2, 4, 1.4)
    assert rows == []


def test_the_sampling_gate_refuses_weights_under_which_cfg_changes_little(monkeypatch: pytest.MonkeyPatch) -> None:
    """random_model's weights alone (the preset's init plus 0.02 noise, the sampling rows' before 2026-12-01): CFG
    moved the images less than bf16 rounding does, so no bound could tell a sampler that skips it. Even the eager
    row fails on such weights."""
    rows = []
    monkeypatch.setattr(bench_sampling, "cached_model", lambda name: bench_sampling.random_model(name).eval())
    monkeypatch.setattr(bench_sampling, "_reference_images", {})
    monkeypatch.setattr(bench_sampling, "_unguided_images", {}, raising=False)
    monkeypatch.setattr(bench_sampling, "record", lambda benchmark, **row: rows.append(row))
    with pytest.raises(AssertionError, match="CFG moves the eager images by only"):
        bench_sampling.time_sampler(None, None, "eager", "tiny", 2, 4, 1.4)
    assert rows == []


def test_a_sampling_rows_rates_count_its_whole_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = []
    monkeypatch.setattr(bench_sampling, "record", lambda benchmark, **row: rows.append(row))
    monkeypatch.setitem(bench_sampling.PASS_GFLOP, "tiny", (3, 2))
    bench_sampling.time_sampler(None, None, "uncaptured", "tiny", 2, 4, 1.4)
    (row,) = rows
    assert row["flops"] == 2 * bench_sampling.flops_per_image("tiny", 4, 1.4) == 2 * (4 * 3 + 3 * 2) * 2e9
    assert row["extra"]["images_per_s"] == pytest.approx(2 / (row["ms"] * 1e-3))


def test_a_cold_start_times_each_stage_from_the_end_of_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter(range(10))
    monkeypatch.setattr(bench_sampling, "time", mock.Mock(time=lambda: float(next(ticks))))
    stages = bench_sampling.cold_start("tiny", "eager", 1, 1, 1.0)
    assert stages == {"done_at": 3.0, "cuda_init_s": 1.0, "build_s": 1.0, "first_call_s": 1.0}


def test_a_cold_start_runs_on_caches_of_its_own_and_fails_with_its_child(tmp_path: Path) -> None:
    env = bench_sampling.kernel_cache_env(tmp_path)
    assert [env[k] for k in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "SPHERE_FAST_TUNING_CACHE")] == [
        str(tmp_path / "triton"), str(tmp_path / "inductor"), str(tmp_path / "tuning")]
    with pytest.raises(AssertionError, match="no-such-model"):
        bench_sampling.first_image_process("no-such-model", "graph", env)


@pytest.mark.parametrize("caches", bench_sampling.CACHE_STATES)
def test_a_first_image_counts_from_the_spawn_after_filling_warm_caches(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caches: str
) -> None:
    runs = []

    def child(name: str, impl: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        runs.append(env["SPHERE_FAST_TUNING_CACHE"])
        stages = {"done_at": 110.0, "cuda_init_s": 0.5, "build_s": 1.0, "first_call_s": 2.0, "capture_warm_up_s": 0.25}
        return subprocess.CompletedProcess([], 0, stdout=json.dumps(stages), stderr="import time: 3 | 1500000 | torch")

    monkeypatch.setattr(bench_sampling, "first_image_process", child)
    monkeypatch.setattr(bench_sampling, "time", mock.Mock(time=lambda: 100.0))
    seconds, extra = bench_sampling.time_first_image("tiny", "graph", caches, tmp_path)
    store = "0" if caches == "warm-untuned" else str(tmp_path / "tuning")
    assert runs == [store] * (1 if caches == "empty" else 2)
    assert seconds == 10.0
    assert extra == {"kernel_caches": caches, "startup_s": 6.5, "import_torch_s": 1.5, "cuda_init_s": 0.5,
                     "build_s": 1.0, "first_call_s": 2.0, "capture_warm_up_s": 0.25}


def test_import_seconds_reads_the_importtime_log() -> None:
    from benchmarks.bench_sampling import import_seconds

    log = textwrap.dedent("""\
        import time: self [us] | cumulative | imported package
        import time:       120 |        120 |   _io
        import time:      3000 |    1500000 | torch
        import time:       400 |        900 |     sphere_fast.ops
        import time:       500 |      60000 | sphere_fast
        import time:        10 |         10 | torch
        Traceback lines and other stderr are skipped
    """)
    assert import_seconds(log) == {"torch": 1.5, "sphere_fast": 0.06}


def test_capture_phases_sums_the_samplers_capture_logs() -> None:
    import logging

    from benchmarks.bench_sampling import capture_phases

    log = logging.getLogger("sphere_fast")
    level = log.level
    with capture_phases() as phases:
        log.info("captured", extra={"capture_seconds": {"compile pass": 1.5, "warm-up": 0.5, "capture": 0.25}})
        log.info("captured", extra={"capture_seconds": {"warm-up": 0.25, "capture": 0.25}})
        log.info("tuned")  # other records carry no phases
    assert phases == {"capture_compile_pass_s": 1.5, "capture_warm_up_s": 0.75, "capture_capture_s": 0.5}
    assert log.level == level and not any(type(h).__name__ == "Collect" for h in log.handlers)


def test_a_stated_commit_replaces_the_git_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lent machine's git metadata is stale: $SPHERE_FAST_COMMIT names the commit measured, in the JSON
    pytest-benchmark writes (the conftest hook) and in the one gpu_check rebuilds from streamed rows; the digest
    of the tree measured is recorded either way."""
    from benchmarks import conftest as bench_conftest

    monkeypatch.setattr(harness, "tree_at_start", lambda: "3fa9c0d1e2b4a5f6")
    monkeypatch.delenv(harness.COMMIT_ENV, raising=False)
    git = {"id": "0a737bad", "dirty": True, "branch": "main"}
    assert harness.stated_commit(git) == {**git, "tree": "3fa9c0d1e2b4a5f6"}
    monkeypatch.setenv(harness.COMMIT_ENV, "9ebd630")
    stated = {"id": "9ebd630", "dirty": False, "branch": "main", "git_id": "0a737bad", "git_dirty": True,
              "tree": "3fa9c0d1e2b4a5f6"}
    assert harness.stated_commit(git) == stated
    hooked = dict(git)
    bench_conftest.pytest_benchmark_update_commit_info(None, hooked)
    assert hooked == stated
    assert gpu_check._commit()["id"] == "9ebd630"
    monkeypatch.setattr(harness, "tree_at_start", lambda: None)  # no git checkout: no digest
    assert harness.stated_commit(git) == {k: v for k, v in stated.items() if k != "tree"}


def test_a_stated_commit_keeps_its_dirty_mark(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lent machine measures the working tree sent, uncommitted edits included: a stated commit from `git
    describe --always --dirty` says so, and the report's header shows it."""
    monkeypatch.setattr(harness, "tree_at_start", lambda: None)
    monkeypatch.setenv(harness.COMMIT_ENV, "9ebd630-dirty")
    stated = harness.stated_commit({"id": "0a737bad1a", "dirty": False})
    assert stated == {"id": "9ebd630", "dirty": True, "git_id": "0a737bad1a", "git_dirty": False}
    assert "commit 9ebd630 (dirty)" in report.header({**_result(), "commit_info": stated})
    assert gpu_check._commit()["dirty"] is True


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                          capture_output=True, text=True).stdout


def test_the_tree_digest_names_the_files_sent_not_the_git_metadata(tmp_path: Path) -> None:
    """The lent machine's copy of a dirty tree, under the git metadata of an older commit (a stale index, a file
    since deleted still in it, ignored build outputs beside it), digests as the tree sent; a changed byte does
    not. Modes are left out: a copy may not keep them."""
    sent = tmp_path / "sent"
    sent.mkdir()
    _git(sent, "init", "-q")
    (sent / ".gitignore").write_text("build/\n")
    (sent / "model.py").write_text("x = 1\n")
    (sent / "gone.py").write_text("old\n")
    _git(sent, "add", "-A")
    _git(sent, "commit", "-q", "-m", "first")
    device = tmp_path / "device"
    _git(tmp_path, "clone", "-q", str(sent), str(device))  # the machine's git metadata: the first commit
    (sent / "model.py").write_text("x = 2\n")  # the sender's edits since: uncommitted
    (sent / "gone.py").unlink()
    (sent / "new.py").write_text("y = 3\n")
    (sent / "build").mkdir()
    (sent / "build" / "ext.so").write_bytes(b"\0")
    (device / "gone.py").unlink()  # the copy: the files sent, over the old metadata, and its own build outputs
    for name in ("model.py", "new.py"):
        shutil.copy(sent / name, device / name)
    (device / "build").mkdir()
    (device / "build" / "ext.so").write_bytes(b"\1")
    (device / "new.py").chmod(0o755)
    outside = tmp_path / "outside.txt"  # a link to a file outside the checkout, which the copy lacks
    outside.write_text("out\n")
    (sent / "link.txt").symlink_to(outside)
    (device / "link.txt").symlink_to(tmp_path / "not-copied.txt")
    assert tree.digest(device) != tree.digest(sent)  # links digest by their target's path
    (device / "link.txt").unlink()
    (device / "link.txt").symlink_to(outside)
    outside.unlink()
    assert tree.tree_files(sent) == [".gitignore", "link.txt", "model.py", "new.py"]
    assert tree.digest(device) == tree.digest(sent) is not None
    assert _git(device, "status", "--porcelain")  # git there does not know this tree
    (device / "model.py").write_text("x = 3\n")
    assert tree.digest(device) != tree.digest(sent)
    assert tree.digest(tmp_path / "none") is None  # no git checkout
    assert tree.described(sent) == f"{_git(sent, 'describe', '--always', '--dirty').strip()}@{tree.digest(sent)}"
    assert tree.described(sent).split("@")[0].endswith("-dirty")
    with mock.patch.object(tree, "_content", side_effect=PermissionError("model.py")):
        assert tree.digest(sent) is None  # a file it cannot read: no digest, not an error that ends the run


def test_the_report_checks_the_tree_measured_against_the_tree_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that states the tree sent (python -m benchmarks.tree) records both digests: the header says whether
    they agree, and one that does not is no lease's file (it measured other code than its commit says)."""
    tree_at_start = harness.tree_at_start
    monkeypatch.setattr(harness, "tree_at_start", lambda: "3fa9c0d1e2b4a5f6")
    monkeypatch.setenv(harness.COMMIT_ENV, "9ebd630-dirty@3fa9c0d1e2b4a5f6")
    same = {**_result(), "commit_info": harness.stated_commit({"id": "0a737bad1a", "dirty": True})}
    assert same["commit_info"]["tree_sent"] == same["commit_info"]["tree"] == "3fa9c0d1e2b4a5f6"
    assert "commit 9ebd630 (dirty), tree 3fa9c0d1e2b4a5f6 (the tree sent)." in report.header(same)
    assert report._lease_key(same) == ("3fa9c0d1e2b4a5f6", "NVIDIA H200")  # dirty, yet known: a lease's tree
    monkeypatch.setenv(harness.COMMIT_ENV, "9ebd630@0000000000000000")
    other = {**_result(), "commit_info": harness.stated_commit({"id": "0a737bad1a", "dirty": True})}
    assert ("commit 9ebd630; **the tree measured (3fa9c0d1e2b4a5f6) is not the tree sent (0000000000000000)**"
            in report.header(other))
    assert report._lease_key(other) is None
    assert report.lease_label(other).endswith("at 9ebd630 (not the tree sent)")
    monkeypatch.setenv(harness.COMMIT_ENV, "9ebd630")
    unsent = {**_result(), "commit_info": harness.stated_commit({"id": "0a737bad1a", "dirty": True})}
    assert "commit 9ebd630, tree 3fa9c0d1e2b4a5f6 (the tree sent was not stated: not compared)" in report.header(unsent)
    assert report._lease_key(unsent) == ("9ebd630", "3fa9c0d1e2b4a5f6", "NVIDIA H200")  # the tree measured too
    monkeypatch.setattr(harness, "tree_at_start", lambda: None)  # the machine could not digest its tree
    monkeypatch.setenv(harness.COMMIT_ENV, "9ebd630@3fa9c0d1e2b4a5f6")
    undigested = {**_result(), "commit_info": harness.stated_commit({"id": "0a737bad1a", "dirty": True})}
    assert ("commit 9ebd630, tree sent 3fa9c0d1e2b4a5f6 (the tree measured was not digested)"
            in report.header(undigested))
    monkeypatch.setenv(harness.COMMIT_ENV, "v1@gpu-9ebd630@3fa9c0d1e2b4a5f6")  # a tag may hold an "@"
    assert harness.stated_commit({})["id"] == "v1@gpu-9ebd630"
    monkeypatch.setenv(harness.TREE_ENV, "5555aaaa5555aaaa")  # as gpu_check passes its digest on
    tree_at_start.cache_clear()
    try:
        assert tree_at_start() == "5555aaaa5555aaaa"
    finally:
        tree_at_start.cache_clear()


def test_the_rebuilt_results_record_the_checkouts_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(harness.COMMIT_ENV, raising=False)
    monkeypatch.setattr(harness, "tree_at_start", lambda: None)
    outputs = {"rev-parse": "0a737bad\n", "status": " M sphere_fast/model.py\n"}
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 0, stdout=outputs[cmd[1]]))
    assert gpu_check._commit() == {"id": "0a737bad", "dirty": True}
    outputs["status"] = ""
    assert gpu_check._commit() == {"id": "0a737bad", "dirty": False}


def test_environment_records_the_cpus_and_the_report_names_them() -> None:
    """torch.compile's rows compile for minutes, in parallel where inductor may: the CPUs and inductor's compile
    threads are part of a result's environment and its header."""
    env = harness.environment()
    assert env["cpus"] >= 1 and env["inductor_compile_threads"] >= 1
    data = {**_result(), "machine_info": {"sphere_fast": {**_result()["machine_info"]["sphere_fast"], "cpus": 16,
                                                          "inductor_compile_threads": 1}}}
    assert "16 CPUs, inductor compile threads 1" in report.header(data)
    assert "CPUs" not in report.header(_result())  # a file from before they were recorded


def test_environment_records_what_else_a_result_depends_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's switches (sphere_fast's, inductor's, Triton's), float32 precision, CPU model, library versions and
    the launch configs its kernels ran are in its environment, and the header names them."""
    from sphere_fast.ops import _tuning

    monkeypatch.setenv("SPHERE_FAST_FUSED_MLP", "1")
    monkeypatch.setenv("SPHERE_FAST_BENCH_DEADLINE", "1764650000")  # the run's plumbing: not a switch
    monkeypatch.setattr(_tuning, "_chosen", {("attention_fwd", 64): (128, 64, 4, 3)})
    env = harness.environment()
    assert env["switches"]["SPHERE_FAST_FUSED_MLP"] == "1" and not any(k.startswith("PATH") for k in env["switches"])
    assert not set(env["switches"]) & set(harness.RUN_PLUMBING)
    assert env["tuned_configs"] == {"('attention_fwd', 64)": "(128, 64, 4, 3)"}
    assert env["float32_matmul_precision"] == torch.get_float32_matmul_precision()
    assert "cudnn" in env and "flash_attn" in env and "cpu_model" in env
    data = _result()
    data["machine_info"]["sphere_fast"].update(env, cudnn=91002, device="NVIDIA H200", smoke=False,
                                               cpu_model="Intel(R) Xeon(R) Platinum 8480C")
    text = report.header(data)
    assert f"(CUDA {env['cuda']}, cuDNN 91002)" in text and "Intel(R) Xeon(R) Platinum 8480C" in text
    assert "`SPHERE_FAST_FUSED_MLP=1`" in text and "1 launch configs tuned or read" in text
    assert "environment switches" not in report.header(_result())  # a file from before they were recorded
    data["machine_info"]["sphere_fast"]["clocks_at"] = "start"  # rebuilt from a cut-off run's streamed rows
    assert "the launch configs tuned were not recorded (the run was cut off before its end)" in report.header(data)


def test_environment_counts_the_stored_max_autotune_timings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch.compile row whose first call found inductor's GEMM timings on disk did not compile cold: the
    environment counts the GEMMs they cover (an op's input shapes each) and the header says so."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    assert harness.stored_autotunings() == 0
    stored = tmp_path / "cache"
    stored.mkdir()
    timing = {"high": {"choice-a": 0.5, "choice-b": 0.7}}
    # as inductor writes it: the timings under "cache", beside the system they were taken on
    system = {"device": "NVIDIA H200", "version": {"cuda": "13.0"}, "hash": "abc"}
    cache = {"mm": {"[128x64, 64x32]": timing, "[64x64, 64x64]": timing}, "addmm": {"[256x64, 64x32]": timing}}
    (stored / "systemhash").write_text(json.dumps({"system": system, "cache": cache}))
    (stored / "cut-short").write_text('{"mm": {')  # a write cut off by a killed process
    assert harness.stored_autotunings() == 3
    harness.autotunings_at_start.cache_clear()
    try:
        env = harness.environment()
        (stored / "systemhash").unlink()  # what a compile row stores later does not change the count
        assert harness.environment()["inductor_stored_autotunings"] == env["inductor_stored_autotunings"] == 3
    finally:
        harness.autotunings_at_start.cache_clear()
    data = {**_result(), "machine_info": {"sphere_fast": {**_result()["machine_info"]["sphere_fast"], **env}}}
    assert "max-autotune timings for 3 GEMMs" in report.header(data)
    assert "max-autotune" not in report.header(_result())


def test_a_timed_call_that_compiles_fails_its_row() -> None:
    """A torch.compile row times the program its gate call compiled: a recompile (another shape) or dynamo giving
    up and running eager inside the timed calls fails the row, whose times would hold them."""
    compiled = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)
    compiled(torch.ones(3))
    assert harness.cuda_time_ms(lambda: compiled(torch.ones(3))) >= 0  # compiled before: timed
    with pytest.raises(AssertionError, match="compiled or fell back to eager during the timed calls: .*frames"):
        harness.cuda_time_ms(lambda: compiled(torch.ones(5)))
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=False):
        with pytest.raises(AssertionError, match="unimplemented"):  # the limit reached: eager from here on
            harness.cuda_time_ms(lambda: compiled(torch.ones(7)))


def test_timed_calls_count_the_cuda_graph_trees_recording(monkeypatch: pytest.MonkeyPatch) -> None:
    """A timed call of a torch.compile row should replay its CUDA-graph trees: the timing counts the calls that
    recorded a graph or ran eager instead, and the tree's methods are as before after it."""
    from torch._inductor.cudagraph_trees import CUDAGraphTreeManager

    recorded: list[str] = []
    monkeypatch.setattr(CUDAGraphTreeManager, "record_function", lambda self, *a: recorded.append("recorded"))
    monkeypatch.setattr(CUDAGraphTreeManager, "run_eager", lambda self, *a: recorded.append("eager"))
    stand_ins = CUDAGraphTreeManager.record_function, CUDAGraphTreeManager.run_eager

    def record_and_run_eager() -> None:
        CUDAGraphTreeManager.record_function(None, [], 0)
        CUDAGraphTreeManager.run_eager(None, [], 0)

    assert harness.cuda_time_ms(lambda: None).graph_recordings == 0
    assert harness.cuda_time_ms(record_and_run_eager).graph_recordings == 2
    assert recorded == ["recorded", "eager"]
    assert (CUDAGraphTreeManager.record_function, CUDAGraphTreeManager.run_eager) == stand_ins
    with harness.graph_tree_calls() as calls:
        record_and_run_eager()
    assert calls == ["record_function", "run_eager"]


def test_the_sampler_probe_repeats_until_its_graph_trees_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor.cudagraph_trees import CUDAGraphTreeManager

    from benchmarks import bench_sampling

    monkeypatch.setattr(CUDAGraphTreeManager, "run_eager", lambda self, *a: None)
    calls: list[int] = []

    def run(records: int) -> None:  # its first ``records`` calls warm up or record a tree
        calls.append(1)
        if len(calls) <= records:
            CUDAGraphTreeManager.run_eager(None, [], 0)

    assert bench_sampling.settled_probe(lambda: run(2)).graph_recordings == 0 and len(calls) == 3
    calls.clear()
    assert bench_sampling.settled_probe(lambda: run(10)).graph_recordings == 1  # never settles: stops
    assert len(calls) == bench_sampling.SETTLING_CALLS


def test_the_report_names_compile_rows_without_cuda_graphs() -> None:
    data = _result()
    data["benchmarks"].append({"extra_info": {**data["benchmarks"][0]["extra_info"], "op": "sample tiny",
                                              "impl": "compile", "cudagraph_skips": 2}})
    assert ("1 torch.compile rows ran without inductor's CUDA graphs in part (inductor counted 2 CUDA-graph skips): "
            "compile sample tiny.") in report.header(data)
    assert "CUDA graphs" not in report.header(_result())


def test_gpu_clocks_are_read_while_a_long_row_is_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle snapshot of the clocks says nothing of a sustained load: nvidia-smi is read every interval while the
    block runs, summarised for the row, and the header gives the slowest row's clocks; without nvidia-smi (or
    off a GPU) nothing is recorded."""
    readings = ["1980, 420.5, 40\n", "1755, 690.0, 71\n", "1830, 650.0, 66\n"]
    calls = []

    def smi(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)  # a reading past the three: "[N/A]", which ends the polling
        return subprocess.CompletedProcess(cmd, 0, stdout=readings[len(calls) - 1] if len(calls) <= 3 else "[N/A]")

    monkeypatch.setattr(harness.subprocess, "run", smi)
    clocks = harness.GpuClocks(interval_s=0.01)
    clocks.source = "nvidia-smi"  # where pynvml is missing
    deadline = time.monotonic() + 10
    with clocks:
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    summary = clocks.summary()
    assert summary == {"sm_mhz_min": 1755, "sm_mhz_median": 1830, "power_w_max": 690, "temperature_c_max": 71,
                       "clock_samples": 3, "source": "nvidia-smi"}
    assert calls[0][:3] == ["nvidia-smi", "-i", "0"] and "--query-gpu=clocks.sm,power.draw,temperature.gpu" in calls[0]
    monkeypatch.setattr(harness.subprocess, "run", mock.Mock(side_effect=FileNotFoundError("nvidia-smi")))
    with clocks:  # again: no reading now
        pass
    assert clocks.summary() is None
    readers = {"clock_rate": 1980, "power_draw": 512_000, "temperature": 44}  # NVML's units: MHz, mW, °C
    for name, value in readers.items():
        monkeypatch.setattr(torch.cuda, name, lambda device, value=value: value)
    nvml = harness.GpuClocks(interval_s=10)
    nvml.source = "nvml"
    with nvml:
        pass
    assert nvml.summary() == {"sm_mhz_min": 1980, "sm_mhz_median": 1980, "power_w_max": 512, "temperature_c_max": 44,
                              "clock_samples": 1, "source": "nvml"}
    timing, read = harness.timed_with_clocks(lambda: harness.Timing([1.0]))
    assert timing == 1.0 and read is None  # no GPU here
    data = _result()
    sampler = {**data["benchmarks"][0]["extra_info"], "op": "sample sphere-l-imagenet", "impl": "graph",
               "shape": "b64 t4 cfg1.4 combo", "clocks_while_timed": summary}
    data["benchmarks"].append({"extra_info": sampler})
    assert ("While 1 long rows were timed (read about every 0.2 s, warm-up calls included): SM clock down to 1755 "
            "MHz, the lowest median 1830 MHz (graph sample sphere-l-imagenet b64 t4 cfg1.4 combo); power up to 690 W, "
            "temperature up to 71 °C.") in report.header(data)
    assert "long rows" not in report.header(_result())


def test_report_flags_smoke_runs() -> None:
    assert "not measurements" in report.render(_result(smoke=True))


def test_a_file_is_a_gpu_result_only_where_it_says_so() -> None:
    """A results file counts (for the README) when it names a GPU and states that it is no smoke run: one that
    does not say is taken for a smoke run, in the README's choice and in its own header."""
    assert report.is_gpu_result(_result())
    assert not report.is_gpu_result(_result(smoke=True)) and not report.is_gpu_result(_result(device="cpu"))
    unstated = _result()
    del unstated["machine_info"]["sphere_fast"]["smoke"]
    assert not report.is_gpu_result(unstated)
    assert "not measurements" in report.header(unstated)


def test_readme_section_uses_latest_gpu_result(tmp_path: Path) -> None:
    assert report.readme_section(tmp_path) == report.NOT_MEASURED
    (tmp_path / "smoke.json").write_text(json.dumps(_result("2026-12-01T00:00:00+00:00", smoke=True, device="cpu")))
    assert report.readme_section(tmp_path) == report.NOT_MEASURED
    older = _result("2026-11-01T00:00:00+00:00")
    older["commit_info"] = {"id": "fedcba9876543210", "dirty": False}  # another commit: not merged
    (tmp_path / "a.json").write_text(json.dumps(older))
    (tmp_path / "b.json").write_text(json.dumps(_result("2026-11-20T08:30:00+00:00")))
    section = report.readme_section(tmp_path)
    assert section.startswith("From `benchmarks/results/b.json`. Earlier leases' files, for the cases this one "
                              "did not measure: `a.json` (print one")
    assert "2026-11-20 08:30 UTC" in section and "smoke.json" not in section


def test_readme_section_merges_the_calls_of_one_lease(tmp_path: Path) -> None:
    """A lease's op-suite call writes a second file: same commit and device, read with the headline's file.
    A case in both keeps the newer row; a file of another commit is left out."""
    headline, suites = _result("2026-11-20T08:00:00+00:00"), _result("2026-11-20T08:30:00+00:00")
    headline["partial"] = True  # the lease's first call was cut off: so is what the section shows
    other = _result("2026-11-10T00:00:00+00:00")
    suites["benchmarks"] = [{"extra_info": {**headline["benchmarks"][2]["extra_info"], "ms": 0.125}},
                            {"extra_info": {**headline["benchmarks"][2]["extra_info"], "op": "rope"}}]
    other["commit_info"] = {"id": "fedcba9876543210", "dirty": False}
    other["benchmarks"] = [{"extra_info": {**headline["benchmarks"][2]["extra_info"], "op": "attention_fwd"}}]
    elsewhere = _result("2026-11-20T07:00:00+00:00", device="NVIDIA H100")  # the same commit on another GPU
    elsewhere["benchmarks"] = [{"extra_info": {**headline["benchmarks"][2]["extra_info"], "op": "spherify"}}]
    for name, data in (("a.json", headline), ("b.json", suites), ("c.json", other), ("d.json", elsewhere)):
        (tmp_path / name).write_text(json.dumps(data))
    section = report.readme_section(tmp_path)
    assert section.startswith("From `benchmarks/results/a.json` and `benchmarks/results/b.json`. Earlier leases' "
                              "files, for the cases this one did not measure: `c.json`, `d.json` (")
    assert "#### swiglu" in section and "#### rope" in section and "#### attention_fwd" not in section
    assert "#### spherify" not in section
    swiglu = section[section.index("#### swiglu"):section.index("#### copy")]
    assert "| 0.125 |" in swiglu and "| 0.250 |" not in swiglu and "| 1.00 |" in swiglu  # newer triton, eager kept
    assert "cut off at its time limit" in section and "Measured 2026-11-20 08:30 UTC" in section  # the newer file
    assert "clocks at the end" in section  # the newer, complete file's environment: not the cut one's start
    assert "The rows come from 2 calls of one lease (one tree): a speedup may pair rows of two calls" in section
    assert "calls of one lease" not in report.render(suites)


def test_leases_merge_only_one_clean_commits_files_within_a_lease(tmp_path: Path) -> None:
    """Files that share a stale or dirty commit id are separate leases (each call takes the tree afresh), and so
    are a clean commit's files further apart than a lease lasts (the review's case: 0a737ba dirty, three days
    apart, old eager with new triton)."""
    def result(when: str, commit: dict, ms: float) -> dict:
        data = _result(when)
        data["commit_info"] = commit
        data["benchmarks"] = [{"extra_info": {**data["benchmarks"][2]["extra_info"], "ms": ms}}]
        return data

    stale = {"id": "0a737bad1a", "dirty": True}
    clean = {"id": "9ebd630", "dirty": False}
    files = {"a.json": result("2026-11-30T01:29:00+00:00", stale, 0.5),
             "b.json": result("2026-12-03T10:00:00+00:00", stale, 0.4),
             "c.json": result("2026-12-03T10:10:00+00:00", stale, 0.3),
             "d.json": result("2026-12-04T10:00:00+00:00", clean, 0.2),
             "e.json": result("2026-12-04T10:29:00+00:00", clean, 0.1),
             "f.json": result("2026-12-04T11:00:00+00:00", clean, 0.1),
             "g.json": result("2026-12-04T11:05:00+00:00", {"dirty": False}, 0.1),  # no commit recorded
             # a bare stated commit (no digest sent) whose calls measured two trees: not one lease
             "h.json": result("2026-12-05T10:00:00+00:00", {**clean, "tree": "aaaa"}, 0.1),
             "i.json": result("2026-12-05T10:10:00+00:00", {**clean, "tree": "bbbb"}, 0.1)}
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    found = report.leases(report.gpu_results(tmp_path))
    assert [[path.name for path in paths] for paths, _ in found] == [
        ["i.json"], ["h.json"], ["g.json"], ["f.json"], ["d.json", "e.json"], ["c.json"], ["b.json"], ["a.json"]]


def test_readme_goals_left_unmeasured_come_from_earlier_leases_on_that_gpu(tmp_path: Path) -> None:
    """A goal the newest lease did not measure is judged from the newest earlier lease that did, on the same GPU
    model, dated, and with a status that says so (not a pass or a fail of the code now); without such a lease it
    stays unmeasured."""
    newest = _result("2026-11-30T01:00:00+00:00")

    def lease(when: str, commit: str, device: str, pct_copy: float) -> dict:
        data = _result(when, device=device)
        data["commit_info"] = {"id": commit, "dirty": False}
        data["benchmarks"] = [{"extra_info": {**newest["benchmarks"][2]["extra_info"], "op": "spherify_noise_fwd",
                                              "shape": [256, 32768], "pct_copy": pct_copy}}]
        return data

    files = {"new.json": newest, "h200.json": lease("2026-11-29T18:00:00+00:00", "aaaa", "NVIDIA H200", 8.0),
             "old.json": lease("2026-11-28T18:00:00+00:00", "bbbb", "NVIDIA H200", 20.0),
             "h100.json": lease("2026-11-29T20:00:00+00:00", "cccc", "NVIDIA H100", 90.0)}
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    section = report.readme_section(tmp_path)
    goal = "| #3 | spherify_noise_{}: >= 85% of copy bandwidth at B*L >= 8M | {} |"
    assert goal.format("fwd", "8% (bf16 256×32768), 1 of 4 shapes on 2026-11-29 at aaaa (machine's git); "
                              f"{goals.OLDER_GATES} | not met (earlier lease)") in section
    assert goal.format("bwd", "– | not measured") in section
    assert "#### spherify_noise_fwd" not in section  # the cases' tables are the newest lease's alone


def test_report_header_says_what_the_rows_passed_and_what_the_run_skipped() -> None:
    """The header names a stated commit as measured; counts the rows recorded before the present gates (each
    verdict that reads one says so) and the cases the run's deadline skipped."""
    data = _result()
    assert "5 of 5 rows were recorded before the present checks" in report.header(data)  # the ceiling row too
    data["commit_info"] = {"id": "9ebd630", "dirty": False, "git_id": "0a737bad1a", "git_dirty": True}
    data["machine_info"]["sphere_fast"]["deadline_skipped"] = 7
    data["benchmarks"] = [{"extra_info": {**b["extra_info"], "gates": harness.GATES}} for b in data["benchmarks"]
                          if b["extra_info"]]
    text = report.header(data)
    assert "commit 9ebd630." in text and "0a737ba" not in text
    assert "The run reached its time limit: 7 selected cases were skipped, not measured." in text
    assert "before the present checks" not in text
    assert report.GATES_SINCE == harness.GATES
    assert report.lease_label(_result("2026-11-29T18:30:00+00:00")) == "on 2026-11-29 at 0123456 (machine's git)"
    assert report.lease_label({**data, "datetime": "2026-12-02T00:00:00+00:00"}) == "on 2026-12-02 at 9ebd630"


def test_readme_markers_are_rewritten_and_checked(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Performance\n\n{report.START}\nold numbers\n{report.END}\n\n## Layout\n")
    results = tmp_path / "results"
    results.mkdir()
    args = ["--readme", str(readme), "--results", str(results)]
    assert report.main([*args, "--check"]) == 1
    assert report.main(args) == 0
    text = readme.read_text()
    assert "old numbers" not in text and report.NOT_MEASURED in text and text.endswith("## Layout\n")
    assert report.main([*args, "--check"]) == 0
    for broken in ("no markers here", f"{report.END}\nold numbers\n{report.START}"):
        with pytest.raises(ValueError, match="perf:start"):
            report.replace_section(broken, "x")


def test_readme_performance_section_comes_from_the_results_files() -> None:
    # No number in the README without a results file: regenerate with python -m benchmarks.report --readme README.md
    assert report.main(["--readme", str(ROOT / "README.md"), "--check"]) == 0


# --------------------------------------------------------------------------------------------- gpu check


def test_phase_timeout_kills_the_command(tmp_path: Path) -> None:
    log = tmp_path / "slow.log"
    start = time.monotonic()
    status, secs = gpu_check.run_logged([sys.executable, "-c", "import time; time.sleep(30)"], log, timeout=0.5)
    assert status == "timeout" and time.monotonic() - start < 10
    assert "killed after" in log.read_text()
    assert gpu_check.run_logged([sys.executable, "-c", "raise SystemExit(5)"], log, 30)[0] == "failed"
    assert gpu_check.run_logged([sys.executable, "-c", "raise SystemExit(5)"], log, 30, ok_codes=(0, 5))[0] == "ok"


def test_build_phase_reports_each_failing_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check, "BUILD_CALLS", {"fine": "ops.swiglu_reference(torch.ones(2, 4))",
                                                   "broken": "ops.no_such_op()"})
    check = gpu_checker(tmp_path, budget_s=120)
    check.build()
    (phase,) = check.results
    assert phase.status == "failed" and "broken (failed)" in phase.note and "fine" not in phase.note
    log = (tmp_path / "build.log").read_text()
    assert "===== fine" in log and "no_such_op" in log and "AttributeError" in log
    assert not list(tmp_path.glob(".build-*"))


def test_build_phase_is_a_timeout_only_when_every_failing_op_timed_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_stop = gpu_check._stop

    def stop(proc, timeout):  # the "slow" op's process ran past its limit
        rc = real_stop(proc, timeout)
        return None if "# slow" in proc.args[-1] else rc

    monkeypatch.setattr(gpu_check, "_stop", stop)
    for calls, status in (({"slow": "pass  # slow", "broken": "ops.no_such_op()"}, "failed"),
                          ({"slow": "pass  # slow"}, "timeout")):
        monkeypatch.setattr(gpu_check, "BUILD_CALLS", calls)
        check = gpu_checker(tmp_path, budget_s=120)
        check.build()
        (phase,) = check.results
        assert phase.status == status and "slow (timeout)" in phase.note


def test_attention_tests_run_in_processes_of_their_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An illegal address in one kernel test poisons its process's CUDA context: on an H200 it failed every
    later test of that worker, so the attention and RoPE-pass tests (Triton kernels) run in a pytest of their own,
    then the fused-MLP GEMM's (a kernel not yet run on a GPU), then the rest."""
    calls = []

    def fake_run(cmd, log, timeout, env=None, ok_codes=(0,)):
        calls.append(cmd)
        return ("failed" if len(calls) == 1 else "ok"), 1.0

    monkeypatch.setattr(gpu_check, "run_logged", fake_run)
    check = gpu_checker(tmp_path)
    check.tests()
    assert len(calls) == 3 and {"tests/test_attention.py", "tests/test_rope.py"} <= set(calls[0])
    assert "tests/test_swiglu_linear.py" in calls[1] and "tests/test_attention.py" not in calls[1]
    ignored = {f"--ignore=tests/{name}.py" for name in ("test_attention", "test_rope", "test_swiglu_linear")}
    assert ignored | {"tests"} <= set(calls[2])
    assert all("gpu or cuda_capable" in c for c in calls)
    (phase,) = check.results
    assert phase.name == "tests" and phase.status == "failed"


@pytest.mark.parametrize("failing", [None, 0, 1, 2])
def test_the_fused_mlp_cases_run_only_when_its_tests_passed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: int | None
) -> None:
    """A kernel that fails its GPU tests may crash in its benchmark cases and so end every later case of the
    benchmark process: the fused MLP's cases are left out unless its own test group passed."""
    calls = []

    def fake_run(cmd, log, timeout, env=None, ok_codes=(0,)):
        calls.append(cmd)
        return ("failed" if len(calls) - 1 == failing else "ok"), 1.0

    monkeypatch.setattr(gpu_check, "run_logged", fake_run)
    for bench_k, expected in (("", "not (mlp_up or fused_mlp)"), ("linear", "(linear) and not (mlp_up or fused_mlp)")):
        check = gpu_checker(tmp_path, bench_k=bench_k)
        check.tests()
        calls.clear()
        check.bench()
        (bench,) = calls
        selection = bench[bench.index("-k") + 1] if "-k" in bench else None
        if failing == 1:  # the fused MLP's group (the second)
            assert selection == expected and "benchmarks left out" in check.results[0].note
        else:
            assert selection == (f"({bench_k})" if bench_k else None)
        calls.clear()


def test_bench_phase_passes_a_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict = {}

    def fake_run(cmd, log, timeout, env=None, ok_codes=(0,)):
        seen.update(cmd=cmd, timeout=timeout, env=env)
        return "ok", 1.0

    monkeypatch.setattr(gpu_check, "run_logged", fake_run)
    check = gpu_checker(tmp_path)
    check.bench()
    deadline = float(seen["env"]["SPHERE_FAST_BENCH_DEADLINE"])
    expected = time.time() + 100 - gpu_check.JSON_MARGIN_S
    assert expected - 5 < deadline <= expected + 1
    assert seen["timeout"] <= 100 and f"--benchmark-json={check.bench_json}" in seen["cmd"]
    assert "--run-slow" in seen["cmd"] and seen["env"][harness.ROWS_ENV].startswith(str(tmp_path))
    assert check.bench_json.parent == tmp_path and check.bench_json.name.startswith("bench-")
    assert "--benchmark-enable" in seen["cmd"] and seen["env"]["TORCH_CUDA_ARCH_LIST"]
    assert f"--durations={gpu_check.DURATIONS_SHOWN}" in seen["cmd"]  # the slowest cases, for planning a lease


def test_sanitize_phase_runs_memcheck_over_small_kernel_tests_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compute-sanitizer's memcheck over the GPU tests of SANITIZE_K, one allocation a tensor (torch's caching
    allocator would hide an access past a tensor inside its block), in one process; skipped without the tool and
    left out of the default phases (it slows the kernels many times over)."""
    seen: dict = {}
    monkeypatch.setattr(gpu_check, "run_logged", lambda cmd, log, timeout, env=None, ok_codes=(0,): (
        seen.update(cmd=cmd, env=env, log=log), ("ok", 1.0))[1])
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    check = gpu_checker(tmp_path)
    check.sanitize()
    assert not seen and check.results[-1].status == "skipped" and "compute-sanitizer" in check.results[-1].note
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: f"/opt/cuda/bin/{name}")
    check.sanitize()
    cmd = seen["cmd"]
    assert cmd[:5] == ["/opt/cuda/bin/compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1"]
    assert cmd[cmd.index("-k") + 1] == gpu_check.SANITIZE_K and "-n" not in cmd and "gpu or cuda_capable" in cmd
    assert seen["env"]["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1" and seen["log"].name == "sanitize.log"
    assert "sanitize" in gpu_check.PHASES and "sanitize" not in gpu_check.DEFAULT_PHASES


def test_sanitize_selection_reaches_every_kernel_family() -> None:
    """SANITIZE_K names tests by their names: a rename must not leave a kernel family out unnoticed."""
    listed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", "tests",
         "-m", "gpu or cuda_capable", "-k", gpu_check.SANITIZE_K],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
    ).stdout
    for test in ("test_cuda.py::test_ops_on_strided_inputs", "test_cuda.py::test_ops_on_inputs_off_16_byte",
                 "test_cuda.py::test_swiglu", "test_cuda.py::test_noise_of_one_value_samples",
                 "test_attention.py::test_non_unit_last_strides", "test_rope.py::", "test_swiglu_linear.py::",
                 "test_cuda.py::test_seeded_labels_kernels_give_the_reference_labels"):
        assert test in listed, f"{test} not selected by SANITIZE_K"


def test_tests_phase_spreads_each_group_over_workers_and_ranks_a_failure_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With pytest-xdist each group runs over TEST_WORKERS processes; a group that selects no test (exit 5) is
    fine; one group failing and another timing out make the phase "failed" (the build phase's rule)."""
    calls = []
    outcomes = iter(["timeout", "failed", "ok"])
    monkeypatch.setattr(gpu_check, "run_logged", lambda cmd, log, timeout, env=None, ok_codes=(0,): (
        calls.append((cmd, ok_codes)), (next(outcomes), 1.0))[1])
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: name == "xdist" or None)
    check = gpu_checker(tmp_path)
    check.tests()
    assert len(calls) == 3 and all(cmd[-2:] == ["-n", str(gpu_check.TEST_WORKERS)] for cmd, _ in calls)
    assert all(set(ok_codes) == {0, 5} for _, ok_codes in calls)
    assert check.results[0].status == "failed" and check.results[0].note.startswith("see tests.log")
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None)
    calls.clear()
    outcomes = iter(["ok"] * 3)
    gpu_checker(tmp_path).tests()
    assert calls and not any("-n" in cmd for cmd, _ in calls)


def test_a_failed_phase_points_at_its_log_and_the_build_env_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MAX_JOBS", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    seen = {}
    monkeypatch.setattr(gpu_check, "run_logged", lambda cmd, log, timeout, env=None, ok_codes=(0,): (
        seen.update(env=env), ("failed", 1.0))[1])
    check = gpu_checker(tmp_path)
    check.profile()
    assert check.results[-1].note == "see profile.log"
    assert seen["env"]["MAX_JOBS"] == str(os.cpu_count() or 4) and seen["env"]["TORCH_CUDA_ARCH_LIST"] == "9.0a"


def test_the_bench_json_names_the_device_and_a_complete_one_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file name is the device's name in lower-case words joined by dashes; where pytest-benchmark wrote its
    JSON, the streamed rows are not used (they lack what it records) and are removed."""
    written = _result()

    def run(cmd, log, timeout, env=None, ok_codes=(0,)):
        Path(env[harness.ROWS_ENV]).write_text(json.dumps({"kind": "case", "name": "streamed"}) + "\n")
        Path(next(a for a in cmd if a.startswith("--benchmark-json=")).split("=", 1)[1]).write_text(
            json.dumps(written))
        return "ok", 1.0

    monkeypatch.setattr(gpu_check, "run_logged", run)
    monkeypatch.setattr(gpu_check, "_device_name", lambda: "NVIDIA H200 (MIG 1g.18gb)")
    check = gpu_checker(tmp_path)
    check.bench()
    assert check.bench_json.name.endswith("-nvidia-h200-mig-1g-18gb.json")
    assert json.loads(check.bench_json.read_text()) == written and "rebuilt" not in check.results[-1].note
    assert sorted(p.name for p in tmp_path.iterdir()) == [check.bench_json.name]


def test_gpu_check_refuses_unknown_phases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main([str(tmp_path), "--phases", "tests,benchmark"])
    assert exit_info.value.code == 2 and "unknown phases ['benchmark']" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_bench_k_selects_the_benchmark_cases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict = {}
    monkeypatch.setattr(gpu_check, "run_logged", lambda cmd, *a, **k: (seen.update(cmd=cmd), ("ok", 1.0))[1])
    gpu_checker(tmp_path, bench_k="adaln or swiglu").bench()
    assert seen["cmd"][-2:] == ["-k", "(adaln or swiglu)"]
    gpu_checker(tmp_path).bench()
    assert "-k" not in seen["cmd"]


def test_tests_k_selects_the_gpu_tests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--tests-k reaches every test group; the opt-in kernels' benchmarks are then left out, since their group
    may have run none of its tests."""
    calls = []
    monkeypatch.setattr(gpu_check, "run_logged", lambda cmd, *a, **k: (calls.append(cmd), ("ok", 1.0))[1])
    check = gpu_checker(tmp_path, tests_k="adaln")
    check.tests()
    assert len(calls) == len(gpu_check.TEST_GROUPS) and all(c[c.index("-k") + 1] == "adaln" for c in calls)
    assert "-k 'adaln'" in check.results[0].note and check.bench_selection() == "not (mlp_up or fused_mlp)"
    calls.clear()
    gpu_checker(tmp_path).tests()
    assert not any("-k" in c for c in calls)


def test_case_timeout_applies_to_the_benchmark_cases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: name == "pytest_timeout" or None)
    check = gpu_checker(tmp_path, case_timeout_s=550)
    bench, tests = check.pytest("bench"), check.pytest("tests")
    assert bench[bench.index("--timeout") + 1] == "550"
    assert tests[tests.index("--timeout") + 1] == str(gpu_check.PER_TEST_TIMEOUT_S["tests"])


# pytest-benchmark opens its JSON file when it starts: a killed run leaves it empty (seen on an H200)
@pytest.mark.parametrize("json_left", [None, ""], ids=["no-json", "empty-json"])
def test_bench_json_is_rebuilt_from_streamed_rows_when_the_run_is_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, json_left: str | None
) -> None:
    env_row = _result()["machine_info"]
    cases = [{"name": f"case{i}", "extra_info": r["extra_info"]} for i, r in enumerate(_result()["benchmarks"][:2])]

    def killed_run(cmd, log, timeout, env=None, ok_codes=(0,)):
        lines = [json.dumps({"kind": "environment", **env_row})]
        lines += [json.dumps({"kind": "case", **c}) for c in cases]
        Path(env[harness.ROWS_ENV]).write_text("\n".join(lines) + '\n{"kind": "case", "na')  # cut mid-line
        if json_left is not None:
            Path(next(a for a in cmd if a.startswith("--benchmark-json=")).split("=", 1)[1]).write_text(json_left)
        return "timeout", 99.0

    monkeypatch.setattr(gpu_check, "run_logged", killed_run)
    check = gpu_checker(tmp_path)
    check.skip("profile", "not requested (--phases)")  # the note goes to the bench phase, not the first
    check.bench()
    data = json.loads(check.bench_json.read_text())
    assert data["benchmarks"] == cases and data["partial"] is True and report.is_gpu_result(data)
    assert "rebuilt from the 2 cases" in check.results[-1].note and check.results[-1].status == "timeout"
    assert check.results[0].note == "not requested (--phases)"
    assert "cut off" in report.render(data) and "#### swiglu" in report.render(data)
    assert "| #3 |" in check.summary()  # the goal verdicts, from the rebuilt file
    assert "| nn.layers.MLP_ALIGN |" in check.summary()  # and the pending choices
    assert sorted(p.name for p in tmp_path.iterdir()) == [check.bench_json.name]  # the rows file is gone


def test_a_rebuilt_file_names_its_clocks_as_the_starts() -> None:
    """The streamed environment row is written as the session starts (the ceilings fixture): a file rebuilt from
    it shows clocks at the start; pytest-benchmark's own JSON reads them at the end."""
    from datetime import datetime, timezone

    lines = [json.dumps({"kind": "environment", **_result()["machine_info"]})]
    rebuilt = report.results_from_rows(lines, datetime(2026, 12, 3, tzinfo=timezone.utc))
    assert "clocks at the start SM 1980 MHz" in report.header(rebuilt)
    assert "clocks at the end SM 1980 MHz" in report.header(_result())


def test_headline_cases_exist_in_the_real_grid_and_come_first() -> None:
    from benchmarks import conftest

    # Collect the real-size grid (no GPU needed to list it); every headline pattern must select cases.
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, env={**os.environ, "SPHERE_FAST_BENCH_SMOKE": "0"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    ranks = [conftest.headline_rank(i) for i in ids]
    assert ranks == sorted(ranks)  # headline cases first, in HEADLINE order
    for rank, pattern in enumerate(conftest.HEADLINE):
        assert rank in ranks, f"headline pattern {pattern!r} selects no benchmark"
    assert ranks.count(len(conftest.HEADLINE)) > 500  # the grids follow
    spherify = conftest.HEADLINE.index("benchmarks/bench_spherify.py::test_spherify_noise_fwd[*-B256-L32768-bfloat16]")
    assert conftest.headline_rank("benchmarks/bench_spherify.py::test_spherify_noise_fwd[cpp-B256-L32768-bfloat16]") == spherify


def test_bench_cases_after_the_deadline_are_skipped_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The results file counts the cases the deadline skipped (the report's header says so)."""
    from benchmarks import conftest

    monkeypatch.setattr(conftest, "_deadline_skipped", [])
    item = mock.Mock(nodeid="benchmarks/bench_adaln.py::test_swiglu_fwd[triton-B1-N256-W768]")
    monkeypatch.setenv("SPHERE_FAST_BENCH_DEADLINE", str(time.time() + 60))
    conftest.pytest_runtest_setup(item)  # before the deadline: runs
    monkeypatch.setenv("SPHERE_FAST_BENCH_DEADLINE", str(time.time() - 1))
    with pytest.raises(pytest.skip.Exception, match="budget"):
        conftest.pytest_runtest_setup(item)
    machine_info: dict[str, Any] = {}
    monkeypatch.setattr(harness, "environment", lambda ceilings=None: {"device": "cpu"})
    conftest.pytest_benchmark_update_machine_info(None, machine_info)
    assert machine_info["sphere_fast"] == {"device": "cpu", "deadline_skipped": 1}


def test_spent_budget_skips_phases(tmp_path: Path) -> None:
    check = gpu_checker(tmp_path, budget_s=0)
    for name in ("build", "tests", "bench"):
        check.run(name)
    assert [(p.name, p.status, p.note) for p in check.results] == [
        (n, "skipped", "out of time budget") for n in ("build", "tests", "bench")
    ]


def test_a_phase_gets_its_own_limit_or_what_is_left(tmp_path: Path) -> None:
    """A phase runs for its own limit or the budget left, the smaller; with under MIN_PHASE_S left it is skipped."""
    roomy = gpu_checker(tmp_path, budget_s=1000)
    assert roomy.limit("install") == gpu_check.PHASE_LIMITS_S["install"]
    tight = gpu_checker(tmp_path, budget_s=60)
    assert 55 < tight.limit("bench") <= 60
    short = gpu_checker(tmp_path, budget_s=gpu_check.MIN_PHASE_S - 1)
    assert short.limit("tests") is None and short.results[0].status == "skipped"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_gpu_check_on_cpu_skips_gpu_parts_and_prints_report_then_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gpu_check.main([str(tmp_path)]) == 0
    report_md = (tmp_path / "report.md").read_text()
    assert "No CUDA device" in report_md and "| bench | skipped |" in report_md
    assert "| install | ok | " in report_md and "imports from this checkout" in report_md  # and pip ran nowhere
    printed = capsys.readouterr().out.rstrip()
    summary = printed[printed.rindex("## Summary"):]
    assert printed.removesuffix(summary).rstrip().endswith(report_md.rstrip())
    assert "| bench | skipped |" in summary and "No benchmark results in this run." in summary
    assert json.loads((tmp_path / "env.json").read_text())["device"] == "cpu"
    wrapper = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert wrapper.returncode == 0, wrapper.stderr


def test_gpu_check_fails_on_a_phase_that_timed_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A phase cut off at its limit fails the check, like a failed one, and the report shows its log's end."""
    (tmp_path / "tests.log").write_text("collected 40 items\n[gpu_check] killed after 180 s\n")

    def run(check: gpu_check.Check, name: str) -> None:
        if name == "tests":
            check.done(gpu_check.Phase("tests", "timeout", 180.0, "see tests.log"))

    monkeypatch.setattr(gpu_check.Check, "run", run)
    assert gpu_check.main([str(tmp_path), "--phases", "tests"]) == 1
    assert "tests.log (end):\n```\ncollected 40 items\n[gpu_check] killed" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    "name, group",
    [
        ("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNN", "matmul"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "matmul"),
        ("attention_fwd_kernel", "attention"),
        ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float>", "attention"),
        ("aten::mm", "matmul"),
        ("rope_kernel", "rope"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
        ("adaln_fwd_kernel", "adaln / swiglu"),
        ("swiglu_fwd_kernel", "adaln / swiglu"),
        ("spherify_fwd_partials_kernel", "spherify"),
        ("seeded_labels_kernel", "spherify"),
        ("void sphere_fast::(anonymous namespace)::philox_below_kernel(long const*, long*, long, long, long)",
         "spherify"),
        ("void sphere_fast::(anonymous namespace)::noise_kernel(long const*, float*, long, long)", "spherify"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "other"),
    ],
)
def test_profile_groups_kernel_names(name: str, group: str) -> None:
    assert profile_sampler.kernel_group(name) == group


def test_profile_sampler_smoke_prints_the_groups(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU: the tiny model's ops stand in for kernels; the group table, the op table and the host table (the
    sampler's own functions among Python's) print, once for each batch size, of an un-captured sampler with the
    asked steps and CFG."""
    made = []
    sampler = profile_sampler.Sampler

    def recording_sampler(*args, **kwargs):
        made.append((*args[1:], kwargs["cfg"], kwargs["cuda_graph"]))  # batch, steps, cfg, cuda_graph
        return sampler(*args, **kwargs)

    monkeypatch.setattr(profile_sampler, "Sampler", recording_sampler)
    assert profile_sampler.main(["--batch", "1", "2", "--steps", "2", "--cfg", "1.5"]) == 0
    assert made == [(1, 2, 1.5, False), (2, 2, 1.5, False)]
    out = capsys.readouterr().out
    assert "| group | ms | % of kernel time | kernels |" in out and "| matmul |" in out and "aten::" in out
    assert out.count(" ms a call without a profiler") == 2 and out.count("Ordered by: internal time") == 2
    assert "sphere_fast/model.py" in out
    headers = [line for line in out.splitlines() if line.startswith("# Sampler profile")]
    assert [h.rsplit(",", 2)[0] for h in headers] == [f"# Sampler profile: tiny, batch {b}, 2 steps, cfg 1.5"
                                                       for b in (1, 2)]


def test_profile_tables_largest_group_first_and_the_fastest_host_call(monkeypatch: pytest.MonkeyPatch) -> None:
    totals = profile_sampler.group_times([("gemm_a", 1.0), ("attention_fwd_kernel", 2.0), ("gemm_b", 2.0)])
    assert list(totals.items()) == [("matmul", (3.0, 2)), ("attention", (2.0, 1))]
    table = profile_sampler.format_groups(totals, 1.0)
    assert "| matmul | 0.00 | 60% | 2 |\n| attention | 0.00 | 40% | 1 |" in table
    assert table.endswith("kernel time 0.01 ms of a 1.00 ms call")
    assert "| other | 0.00 | 0% | 3 |" in profile_sampler.format_groups({"other": (0.0, 3)}, 1.0)  # no kernel time
    ticks = iter([0.0, 1.0, 10.0, 10.5, 20.0, 22.0])  # three calls of 1, 0.5 and 2 s
    monkeypatch.setattr(profile_sampler, "time", mock.Mock(perf_counter=lambda: next(ticks)))
    assert profile_sampler.host_table(lambda: None, 3).startswith("host: 500.00 ms a call without a profiler\n")


def test_tune_attention_variant_replaces_only_what_it_names() -> None:
    """A variant is one config per kernel (nothing left to tune): the named ones, else the op's defaults."""
    own = tune_attention.attn._candidates(64, torch.bfloat16, interpret=False)
    base = {name: configs[:1] for name, configs in own.items()}
    fwd_only = tune_attention.configs_with(fwd=(64, 64, 4, 2))(64, torch.bfloat16, interpret=False)
    assert fwd_only == {**base, "fwd": ((64, 64, 4, 2),)}
    bwd = ((32, 64, 4, 2), (64, 32, 4, 2))
    bwd_only = tune_attention.configs_with(bwd=bwd)(64, torch.bfloat16, interpret=False)
    assert bwd_only == {**base, "dkdv": (bwd[0],), "dq": (bwd[1],)}


def test_tune_attention_only_filters_the_smoke_run(capsys: pytest.CaptureFixture[str]) -> None:
    """--only keeps the variants whose name starts with its prefix (the GPU plan's order:
    test_tune_attention_plans_every_variant_once_in_order): the smoke run's one variant is not a "fwd" one."""
    assert tune_attention.main(["--shape", "1", "2", "17", "32", "--only", "fwd"]) == 0  # smoke: no fwd rows
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("| interpreter")]


def test_tune_swiglu_linear_sweeps_the_candidates_first_and_gates_each(capsys: pytest.CaptureFixture[str]) -> None:
    """The GPU sweep: the op's candidates, then the same-K-tile configs, then the others, the warp-specialized
    ones last, none twice; on CPU (smoke) the baseline and the interpreter's config both pass their gate."""
    swl = tune_swiglu_linear.swl
    with mock.patch.object(tune_swiglu_linear, "SMOKE", False):
        configs = tune_swiglu_linear.configs()
    assert configs[: len(swl.HOPPER_CANDIDATES)] == list(swl.HOPPER_CANDIDATES) and len(set(configs)) == len(configs)
    own_k = swl.HOPPER_CANDIDATES[0].block_k
    assert all(c.block_k == own_k for c in tune_swiglu_linear.SAME_K_TILE)
    assert all(c.block_k != own_k for c in tune_swiglu_linear.OTHER_K_TILE)
    specialized = [c.warp_specialize for c in configs]
    assert specialized == sorted(specialized) and configs[-1].warp_specialize
    assert tune_swiglu_linear.main(["--tokens", "24"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms" not in line]
    assert len(rows) == 2 and all(row.endswith("| ok |") for row in rows), rows


def test_tune_adaln_runs_the_op_config_first_and_gates_each(capsys: pytest.CaptureFixture[str]) -> None:
    """The sweep's first row is the op's own config; each config runs in the interpreter (smoke) and passes the
    gate; a config that breaks the op is a row, not a crash."""
    rows, _, warps = tune_adaln.adaln._bwd_row_block(96)
    assert tune_adaln.own_config(96) == (rows, warps, 4, None)  # stages: the op's own tuning
    assert tune_adaln.main(["--shapes", "1x7x96"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| (")]
    assert len(table) == 1 + len(tune_adaln.OTHER_CONFIGS) and "(the op)" in table[0]
    assert all(row.endswith("| ok |") for row in table), table
    with mock.patch.object(tune_adaln, "OTHER_CONFIGS", ((0, 1, 4, 1),)):  # no rows a step: nothing is computed
        failed = tune_adaln.sweep((1, 7, 96))[1]
    assert "| – | – |" in failed and "ok" not in failed


def test_tune_attention_chunk_b_variant() -> None:
    """A chunk B variant narrows chunk B only where there is one, and the narrowed kernel passes the gate
    (in the interpreter: the 16-wide miscompile was GPU-only, so this proves the math, not the compiler)."""
    assert tune_attention.chunks_with(32)(72) == (64, 32, True)
    assert tune_attention.chunks_with(32)(64) == tune_attention.attn._head_chunks(64) == (64, 64, False)
    fwd_ms, step_ms = tune_attention.time_variant((1, 2, 17, 72), True, None, None, chunk_b=32)
    assert fwd_ms > 0 and step_ms > 0


def test_tune_attention_smoke_gates_and_times_every_rope_mode(capsys: pytest.CaptureFixture[str]) -> None:
    """On CPU: the interpreter's config, checked against the eager reference (forward and gradients), with
    the RoPE pass and without RoPE."""
    assert tune_attention.main(["--shape", "1", "2", "17", "32"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| interpreter")]
    assert [row.split(" | ")[1] for row in rows] == [label for label, _ in tune_attention.MODES], rows
    assert all(row.endswith("| ok |") for row in rows), rows


def test_tune_attention_plans_every_variant_once_in_order() -> None:
    """The GPU sweep at D = 72: the op's forward candidates and the other forward blocks, the op's dkdv ones, its
    other dq ones (its default dq runs in every dkdv row), the other backward blocks, the TMA forwards, then the
    chunk B widths that still hold the head dim's rest (D = 112 leaves 48 columns: none of 32)."""
    attn = tune_attention.attn
    own = attn._candidates(72, torch.bfloat16, interpret=False)
    expected = ([f"fwd {c}" for c in own["fwd"] + tune_attention.FWD_VARIANTS] + [f"dkdv {c}" for c in own["dkdv"]]
                + [f"dq {c}" for c in own["dq"][1:]] + [f"dkdv {a} dq {b}" for a, b in tune_attention.BWD_VARIANTS]
                + [f"fwd {c}" for c in tune_attention.TMA_FWD_VARIANTS] + ["chunk B 32"])
    with mock.patch.object(tune_attention, "SMOKE", False):
        assert [name for name, *_ in tune_attention.plans_for(72)] == expected
        assert [name for name, *_ in tune_attention.plans_for(96)][-1] == "chunk B 32"  # 64 + 32: the rest fits
        assert not [name for name, *_ in tune_attention.plans_for(112) if name.startswith("chunk B")]


def test_tune_attention_rows_count_the_flops_of_bench_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward 4·B·H·N²·D FLOPs, forward + backward 3.5x that; --only keeps the names starting with it ("dq"
    leaves out the "dkdv ... dq ..." rows)."""
    monkeypatch.setattr(tune_attention, "SMOKE", False)
    monkeypatch.setattr(tune_attention, "time_variant", lambda *args: (1.0, 2.0))
    rows = tune_attention.sweep((16, 16, 1024, 64), only="dq")
    flops = 4 * 16 * 16 * 1024**2 * 64
    assert rows and all(row.startswith("| dq ") for row in rows), rows
    assert all(row.endswith(f"| {flops / 1e9:.0f} | 2.000 ({3.5 * flops / 2e9:.0f} TFLOP/s) | ok |") for row in rows)


def test_tune_attention_runs_the_variant_it_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """time_variant calls the op with impl triton and the RoPE mode it is given, under the chunk B width it is
    given, and its gate checks the gradient too: a backward that doubles dq fails it."""
    attn = tune_attention.attn
    calls, chunks = [], []
    real_attention, real_chunks_with = attn.attention, tune_attention.chunks_with

    def attention(q, k, v, rope=None, **kwargs):
        calls.append((rope is not None, kwargs.get("impl")))
        return real_attention(q, k, v, rope, **kwargs)

    def chunks_with(width):
        narrowed = real_chunks_with(width)

        def spy(head_dim):
            chunks.append(narrowed(head_dim))
            return chunks[-1]
        return spy

    monkeypatch.setattr(attn, "attention", attention)
    monkeypatch.setattr(tune_attention, "chunks_with", chunks_with)
    tune_attention.time_variant((1, 2, 17, 72), False, None, None, chunk_b=32)
    assert calls and set(calls) == {(False, "triton")}, calls
    assert chunks and set(chunks) == {(64, 32, True)}, chunks
    real_bwd = attn.attention_triton_bwd
    monkeypatch.setattr(attn, "attention_triton_bwd", lambda do, *args: (2 * real_bwd(do, *args)[0],
                                                                         *real_bwd(do, *args)[1:]))
    with pytest.raises(AssertionError):
        tune_attention.time_variant((1, 2, 17, 32), True, None, None)


def test_tune_attention_sweeps_each_head_dim_asked_for(capsys: pytest.CaptureFixture[str]) -> None:
    assert tune_attention.main(["--shape", "1", "2", "17", "32", "--head-dims", "16", "32", "--only", "fwd"]) == 0
    titles = [line for line in capsys.readouterr().out.splitlines() if line.startswith("### ")]
    assert [title.split()[-1] for title in titles] == ["D=16", "D=32"]


def test_tune_adaln_runs_each_config_as_it_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A config's rows a step, programs per SM and stages reach the op's launch (its tuning key and candidates),
    its gate's truth is float32, and the op's own config counts programs per SM from the op's target."""
    adaln = tune_adaln.adaln
    launches, truths = [], []
    real_launch, real_gate = adaln.launch_tuned, tune_adaln.gate
    monkeypatch.setattr(adaln, "launch_tuned", lambda key, candidates, *a: (launches.append((key, candidates)),
                                                                             real_launch(key, candidates, *a))[1])
    monkeypatch.setattr(tune_adaln, "gate", lambda actual, expected, *args: (truths.append(expected),
                                                                             real_gate(actual, expected, *args))[1])
    tune_adaln.time_config((1, 64, 96), (1, 1, 2, 3))  # 2 programs on the CPU's one "SM": 32 rows each
    backward = [(key, candidates) for key, candidates in launches if key[0] == "adaln bwd"]
    assert backward and all(key[-2] == 32 and candidates == (3,) for key, candidates in backward), backward
    assert truths and all(t.dtype == torch.float32 for truth in truths for t in truth)
    monkeypatch.setattr(tune_adaln, "sm_count", lambda: 132)
    monkeypatch.setattr(adaln, "_n_programs_target", lambda device: 264)
    assert tune_adaln.own_config(1024)[2] == 2


def test_tune_adaln_rows_count_the_bytes_of_bench_adaln(monkeypatch: pytest.MonkeyPatch) -> None:
    """GB/s from bench_adaln's byte model of the backward; a config equal to the op's runs once, as the op's."""
    from benchmarks.bench_adaln import adaln_bwd_bytes

    own = tune_adaln.own_config(96)
    monkeypatch.setattr(tune_adaln, "OTHER_CONFIGS", (own, (2, 1, 4, 1)))
    monkeypatch.setattr(tune_adaln, "time_config", lambda shape, config: 1.0)
    rows = tune_adaln.sweep((4, 1024, 96))
    assert len(rows) == 2 and "(the op)" in rows[0]
    assert rows[1] == f"| (2, 1, 4, 1) | 1.000 | {adaln_bwd_bytes(4, 1024, 96, 2) / 1e6:.0f} | ok |"
    assert adaln_bwd_bytes(4, 1024, 96, 2) == 2 * (6 * 4 * 1024 * 96 + 3 * 4 * 96 + 96) + 4 * 4 * 1024


def test_tune_swiglu_linear_runs_the_config_it_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """The op launches with the one config given (no tuning), and a row's TFLOP/s counts the unpadded GEMM."""
    swl = tune_swiglu_linear.swl
    config = swl.INTERPRETER_CANDIDATES[0]._replace(warps=8)  # the interpreter ignores warps
    launched = []
    real_launch = swl.launch_tuned
    monkeypatch.setattr(swl, "launch_tuned", lambda key, candidates, *a: (launched.append(candidates),
                                                                           real_launch(key, candidates, *a))[1])
    layer, x = tune_swiglu_linear.mlp_layer(64, 24)
    tune_swiglu_linear.time_config(layer, x, config)
    assert launched and set(launched) == {(config,)}
    monkeypatch.setattr(tune_swiglu_linear, "time_config", lambda layer, x, config: 0.001)
    flops = 2 * 4096 * 64 * 2 * layer.w3.in_features
    rows = tune_swiglu_linear.sweep(64, 4096)
    assert rows[0] == f"| cuBLAS + SwiGLU kernel | 0.001 | {flops / 1e6:.0f} | ok |" and flops / 1e6 > 100


@pytest.mark.skipif(shutil.which("gcc") is None, reason="builds a stub libcuda with gcc")
def test_compile_times_runs_every_way_on_the_same_kernels(capsys: pytest.CaptureFixture[str]) -> None:
    """One round at one layer a network: each way compiles (or, warm, loads) the same kernels in its fresh
    process, and the warm pass finds the launchers the cold one built loadable (the stub driver). A Triton that
    launches every kernel through one generic launcher (3.8; 3.6 builds one per kernel signature) builds none."""
    from triton.backends.nvidia import driver as nvidia_driver

    compile_times.main(["--layers", "1", "--rounds", "1"])
    lines = capsys.readouterr().out.splitlines()
    counts = {line.split(":")[0]: line.split(" for ")[1].split(" kernels")[0] for line in lines[:3]}
    assert list(counts) == [f"round 1, {way}" for way in compile_times.WAYS]
    assert len(set(counts.values())) == 1 and int(next(iter(counts.values()))) > 0, lines
    built = [int(line.split(" kernels, ")[1].split(" launchers")[0]) for line in lines[:3]]
    per_kernel = hasattr(nvidia_driver, "make_launcher")
    assert (built[0] > 0 and built[1] > 0) == per_kernel and built[2] == 0, lines  # warm: loads what cold built
    assert lines[3].startswith("one by one: median ") and "compile pass, warm cache: median " in lines[3]


def test_compile_times_gives_each_cold_run_an_empty_cache_and_prints_medians(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three rounds with stand-in children: each cold run (one by one, the pass) compiles into a cache no earlier
    run filled, the warm pass runs on its round's pass cache, and each way's median is printed."""
    runs = []
    run = subprocess.run

    def child(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
        if cmd[0] == "gcc":  # the stub libcuda
            return run(cmd, **kwargs)
        runs.append((cmd[cmd.index("--child") + 1], kwargs["env"]["TRITON_CACHE_DIR"], cmd[-1]))
        seconds = float(len(runs) ** 2)  # 1, 4, 9, 16, ...: a way's three rounds have a median unlike their mean
        result = {"seconds": seconds, "loop_seconds": 0.5, "kernels": 3, "launcher_builds": 0}
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(result), stderr="")

    monkeypatch.setattr(compile_times.subprocess, "run", child)
    compile_times.main(["--layers", "4", "--rounds", "3"])
    assert [mode for mode, _, _ in runs] == ["one by one", "compile pass", "compile pass"] * 3
    assert {layers for _, _, layers in runs} == {"4"}
    caches = [cache for _, cache, _ in runs]
    cold = caches[0::3] + caches[1::3]
    assert len(set(cold)) == 6 and caches[2::3] == caches[1::3]
    assert capsys.readouterr().out.splitlines()[-1] == (
        "one by one: median 16.00 s, compile pass: median 25.00 s, compile pass, warm cache: median 36.00 s")
