"""Launch-config tuning (sphere_fast.ops._tuning) and the attention kernels' tuned launches.

pick_config is checked with fake timers (no GPU needed). The attention op is checked with several
candidates that keep the summed block: whichever one the tuning picks, the output and the gradients must be
bitwise those of the default config. That is checked on a GPU, with the compiled kernels and the op's own
Hopper candidates: it is what keeps images identical across processes. In the Triton interpreter (CPU) a
dot is numpy's matmul, whose summation order can change with the operands' shapes (a 64-row query block over
40 tokens differs from two 32-row blocks by 4e-7), so there the candidates must agree within 1e-6 of the
largest magnitude: the launches are right, the bits are the GPU run's to prove.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from unittest import mock

import pytest
import torch

from sphere_fast.ops import _tuning
from sphere_fast.ops._tuning import pick_config
from sphere_fast.ops.rope import rope_table_reference

pytest.importorskip("triton")
attn = importlib.import_module("sphere_fast.ops.attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("SPHERE_FAST_AUTOTUNE", raising=False)
    _tuning.forget_tuned_configs()
    yield
    _tuning.forget_tuned_configs()


class FakeTimer:
    """Runs each launch and reports the time listed for its config (an exception instance is raised)."""

    def __init__(self, times: dict[str, object]):
        self.times = times
        self.timed: list[str] = []

    def __call__(self, launch) -> float:
        config = launch()
        self.timed.append(config)
        result = self.times[config]
        if isinstance(result, Exception):
            raise result
        return result


def test_picks_the_fastest_once_per_key() -> None:
    timer = FakeTimer({"a": 2.0, "b": 1.0, "c": 3.0})
    assert pick_config("k", ["a", "b", "c"], lambda c: c, timer) == "b"
    assert pick_config("k", ["a", "b", "c"], lambda c: c, timer) == "b"
    assert timer.timed == ["a", "b", "c"], "a remembered key must not be timed again"
    assert pick_config("other key", ["a", "c"], lambda c: c, timer) == "a"


def test_ties_keep_the_default() -> None:
    assert pick_config("k", ["a", "b"], lambda c: c, FakeTimer({"a": 1.0, "b": 1.0})) == "a"


def test_candidates_that_do_not_fit_are_skipped() -> None:
    from triton.runtime.errors import OutOfResources

    too_big = OutOfResources(300_000, 232_448, "shared memory")
    assert pick_config("k", ["a", "b"], lambda c: c, FakeTimer({"a": too_big, "b": 5.0})) == "b"
    with pytest.raises(RuntimeError, match="no launch config of k2 fits"):
        pick_config("k2", ["a", "b"], lambda c: c, FakeTimer({"a": too_big, "b": too_big}))


def test_other_launch_errors_propagate() -> None:
    with pytest.raises(ValueError, match="broken"):
        pick_config("k", ["a", "b"], lambda c: c, FakeTimer({"a": ValueError("broken"), "b": 1.0}))


def test_no_timing_without_choice_or_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    timer = FakeTimer({"a": 2.0, "b": 1.0})
    assert pick_config("k", ["a"], lambda c: c, timer) == "a"
    monkeypatch.setenv("SPHERE_FAST_AUTOTUNE", "0")
    assert pick_config("k", ["a", "b"], lambda c: c, timer) == "a"
    assert timer.timed == []


def test_no_timing_inside_a_graph_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timing synchronizes, which breaks a CUDA-graph capture: the default runs and nothing is remembered."""
    timer = FakeTimer({"a": 2.0, "b": 1.0})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert pick_config("k", ["a", "b"], lambda c: c, timer) == "a"
    assert timer.timed == [] and not _tuning._chosen


# ------------------------------------------------------------------------------------ attention launches


def _inputs(b: int, h: int, n: int, d: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(n + d)
    qkv = torch.randn(b, n, 3, h, d, generator=g).to(DEVICE, dtype).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    rope = rope_table_reference(n, d, device=DEVICE)
    grad = torch.randn(b, h, n, d, generator=g).to(DEVICE, dtype)
    return qkv, q, k, v, rope, grad


def _run(impl: str, qkv, q, k, v, rope, grad) -> list[torch.Tensor]:
    out = attn.attention(q, k, v, rope, impl=impl)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    return [out.detach(), dqkv]


def assert_same_result(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if DEVICE == "cuda":
        assert torch.equal(actual, expected), f"{what} differs from the default config's bits"
    else:
        atol = 1e-6 * float(expected.abs().max())
        torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")


def _only(candidates: dict[str, tuple]) -> mock._patch:
    return mock.patch.object(attn, "_candidates", lambda *args, **kwargs: candidates)


def _interpreter_candidates() -> dict[str, tuple]:
    # BLOCK_M / BLOCK_N / warps / stages as the interpreter takes them; each kernel keeps its summed block
    return {
        "fwd": ((32, 32, 4, 1), (16, 32, 4, 1), (64, 32, 4, 1)),
        "dkdv": ((32, 32, 4, 1), (32, 16, 4, 1)),
        "dq": ((32, 32, 4, 1), (16, 32, 4, 1)),
    }


def _cases() -> list:
    if DEVICE == "cpu":
        return [pytest.param((1, 2, 40, 32), torch.float32, impl, id=f"interpreter-{impl}")
                for impl in attn.TRITON_IMPLS]
    return [pytest.param((4, 16, 1024, d), torch.bfloat16, impl, id=f"D{d}-{impl}")
            for d in (64, 72) for impl in attn.TRITON_IMPLS]


@pytest.mark.cuda_capable
@pytest.mark.parametrize("shape, dtype, impl", _cases())
def test_every_candidate_gives_the_default_bits(shape: tuple[int, int, int, int], dtype: torch.dtype, impl: str) -> None:
    inputs = _inputs(*shape, dtype)
    d = shape[-1]
    if DEVICE == "cpu":
        own = _interpreter_candidates()
    else:
        own = attn._candidates(d, dtype, impl == "triton_rope_on_load")
    defaults = {name: configs[:1] for name, configs in own.items()}
    with _only(defaults):
        expected = _run(impl, *inputs)
    for name, configs in own.items():
        for config in configs[1:]:
            with _only({**defaults, name: (config,)}):
                actual = _run(impl, *inputs)
            for what, a, e in zip(("output", "dqkv"), actual, expected):
                assert_same_result(a, e, f"{name} {config}: {what}")


@pytest.mark.cuda_capable
def test_the_op_launches_the_config_it_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tuned op times its candidates once per kernel and shape bucket, launches the fastest, and matches
    the default config."""
    inputs = _inputs(1, 2, 40, 32, torch.float32) if DEVICE == "cpu" else _inputs(2, 16, 1024, 64, torch.bfloat16)
    own = _interpreter_candidates() if DEVICE == "cpu" else attn._candidates(64, torch.bfloat16)
    with _only({name: configs[:1] for name, configs in own.items()}):
        expected = _run("triton", *inputs)
    if DEVICE == "cpu":
        timed = []

        def last_is_fastest(launch) -> float:
            launch()
            timed.append(1)
            return 1.0 / len(timed)

        monkeypatch.setattr(_tuning, "time_launch_ms", last_is_fastest)
    with _only(own):
        actual = _run("triton", *inputs)
        chosen = dict(_tuning._chosen)
        assert {key[0] for key in chosen} == {"attention fwd", "attention dkdv", "attention dq"}
        for key, config in chosen.items():
            assert config in own[key[0].split()[1]]
        if DEVICE == "cpu":
            assert timed and all(config == own[key[0].split()[1]][-1] for key, config in chosen.items())
            count = len(timed)
            _run("triton", *inputs)
            assert len(timed) == count, "a remembered shape must not be timed again"
    for what, a, e in zip(("output", "dqkv"), actual, expected):
        assert_same_result(a, e, what)
