"""Launch-config tuning (sphere_fast.ops._tuning) and the attention kernels' tuned launches.

pick_config is checked with fake timers (no GPU needed). The attention op's candidates keep the summed block,
so whichever one the tuning picks, the output and the gradients must be bitwise those of the default config:
on a GPU that is checked for the op's own Hopper candidates (it keeps images identical across processes and
batch sizes). In the Triton interpreter (CPU) a dot is numpy's matmul, whose summation order can change with
the operands' shapes: there the launch tests use candidates numpy sums alike (16- and 32-row blocks), and a
64-row block over 40 tokens, which numpy sums differently (4e-7 off), shows the tuning refusing a candidate
that changes the bits.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import triton

from sphere_fast.ops import _tuning
from sphere_fast.ops._tuning import pick_config
from sphere_fast.ops._util import compile_pass
from sphere_fast.ops.rope import rope_table_reference
from tests.helpers import last_is_fastest

pytest.importorskip("triton")
attn = importlib.import_module("sphere_fast.ops.attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("fresh_tuning")


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
    assert pick_config("k", ["a", "b", "c"], lambda c: c, timer=timer) == "b"
    assert pick_config("k", ["a", "b", "c"], lambda c: c, timer=timer) == "b"
    assert timer.timed == ["a", "b", "c"], "a remembered key must not be timed again"
    assert pick_config("other key", ["a", "c"], lambda c: c, timer=timer) == "a"


def test_a_choice_is_stored_for_later_processes(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A tuned choice is written to disk; a later process (memory forgotten) launches it without timing, per key,
    inside a compile pass too; a stored choice that is no longer a candidate, or an unreadable file, is tuned
    again; SPHERE_FAST_TUNING_CACHE=0 neither reads nor writes."""
    monkeypatch.setenv("SPHERE_FAST_TUNING_CACHE", str(tmp_path))
    timer = FakeTimer({(1, 2): 2.0, (3, 4): 1.0, (5, 6): 3.0})
    candidates = [(1, 2), (3, 4), (5, 6)]
    key = ("op", torch.device("cpu"), torch.bfloat16, 64)
    assert pick_config(key, candidates, lambda c: c, timer=timer) == (3, 4)
    assert len(list(tmp_path.glob("*.json"))) == 1

    _tuning.forget_tuned_configs()  # a later process
    untimed = FakeTimer({})
    assert pick_config(key, candidates, lambda c: c, timer=untimed) == (3, 4)
    assert untimed.timed == [] and _tuning._chosen[key] == (3, 4)  # remembered once read
    _tuning.forget_tuned_configs()
    with compile_pass():  # the pass compiles the stored choice alone
        compiled: list[tuple[int, int]] = []
        assert pick_config(key, candidates, compiled.append, timer=untimed) == (3, 4)
    assert compiled == []  # no candidate compiled ahead
    assert pick_config(("op", torch.device("cpu"), torch.bfloat16, 128), candidates, lambda c: c, timer=timer) == (3, 4)
    assert timer.timed == candidates * 2, "another key is tuned on its own"

    _tuning.forget_tuned_configs()
    assert pick_config(key, [(1, 2), (5, 6)], lambda c: c, timer=timer) == (1, 2)  # (3, 4) is gone: tune again
    for stored in tmp_path.glob("*.json"):
        stored.write_text("{not json")
    _tuning.forget_tuned_configs()
    assert pick_config(key, candidates, lambda c: c, timer=timer) == (3, 4)
    assert len(timer.timed) == 3 * 2 + 2 + 3

    monkeypatch.setenv("SPHERE_FAST_TUNING_CACHE", "0")
    _tuning.forget_tuned_configs()
    assert pick_config(key, candidates, lambda c: c, timer=timer) == (3, 4)
    assert len(timer.timed) == 3 * 2 + 2 + 3 * 2, "with the store off the key is timed again"


def test_choices_are_stored_beside_tritons_cache_unless_told(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.delenv("SPHERE_FAST_TUNING_CACHE")
    assert _tuning.stored_choices_folder() == tmp_path / "triton" / "sphere_fast_tuning"
    monkeypatch.setenv("SPHERE_FAST_TUNING_CACHE", str(tmp_path / "mine"))
    assert _tuning.stored_choices_folder() == tmp_path / "mine"
    monkeypatch.setenv("SPHERE_FAST_TUNING_CACHE", "0")
    assert _tuning.stored_choices_folder() is None


def test_without_triton_choices_go_to_tritons_default_folder(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("SPHERE_FAST_TUNING_CACHE")
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    assert _tuning.stored_choices_folder() == tmp_path / "triton" / "sphere_fast_tuning"
    monkeypatch.delenv("TRITON_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _tuning.stored_choices_folder() == tmp_path / ".triton" / "cache" / "sphere_fast_tuning"


def test_the_code_id_covers_the_versions_and_both_source_folders(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import sphere_fast.kernels

    code_id = _tuning._code_id.__wrapped__  # uncached
    base = code_id()
    for module in (torch, triton):
        with monkeypatch.context() as patched:
            patched.setattr(module, "__version__", "0.0+other")
            assert code_id() != base, module.__name__
    for module in (sphere_fast.kernels, _tuning):
        source = Path(module.__file__)
        copy = tmp_path / source.parent.name
        shutil.copytree(source.parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
        with monkeypatch.context() as patched:
            patched.setattr(module, "__file__", str(copy / source.name))
            assert code_id() == base, "the same sources elsewhere"
            with open(copy / source.name, "a") as edited:
                edited.write("# edited\n")
            assert code_id() != base, source


def test_a_device_in_a_key_stands_for_its_gpu_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"GPU model of {device}")
    _tuning._device_name.cache_clear()
    try:
        key = ("op", torch.device("cuda", 1), (torch.device("cpu"), 64))
        assert _tuning._portable(key) == ("op", "GPU model of cuda:1", ("cpu", 64))
    finally:
        _tuning._device_name.cache_clear()


def test_a_stored_choice_is_keyed_on_the_code_and_the_gpu_model(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Another version of the kernels (or of Triton, torch) or another GPU model does not read the choice; the
    same model at another device index does."""
    monkeypatch.setenv("SPHERE_FAST_TUNING_CACHE", str(tmp_path))
    key = ("op", torch.device("cuda", 0), 64)
    names = {0: "NVIDIA H200", 1: "NVIDIA H200", 2: "NVIDIA A100"}
    monkeypatch.setattr(_tuning, "_device_name", lambda device: names[device.index])
    timer = FakeTimer({"a": 2.0, "b": 1.0})
    assert pick_config(key, ["a", "b"], lambda c: c, timer=timer) == "b"
    untimed = FakeTimer({})
    _tuning.forget_tuned_configs()
    assert pick_config(("op", torch.device("cuda", 1), 64), ["a", "b"], lambda c: c, timer=untimed) == "b"
    _tuning.forget_tuned_configs()
    assert pick_config(("op", torch.device("cuda", 2), 64), ["a", "b"], lambda c: c, timer=timer) == "b"
    assert timer.timed == ["a", "b"] * 2, "another GPU model is tuned on its own"
    _tuning.forget_tuned_configs()
    monkeypatch.setattr(_tuning, "_code_id", lambda: "other kernels")
    assert pick_config(key, ["a", "b"], lambda c: c, timer=timer) == "b"
    assert timer.timed == ["a", "b"] * 3, "other kernels are tuned again"


def test_threads_storing_one_choice_publish_whole_files(monkeypatch: pytest.MonkeyPatch, tmp_path, caplog) -> None:
    """A thread a GPU of one model writes the same file (the key names the model, not the index): each writer's
    temporary file is its own, so the file read back is always whole and no store fails (with temporary names by
    pid alone, 190 of 1600 reads found an empty file and 752 stores failed)."""
    import threading

    monkeypatch.setenv("SPHERE_FAST_TUNING_CACHE", str(tmp_path))
    monkeypatch.setattr(_tuning, "_device_name", lambda device: "NVIDIA H200")
    torn: list[str] = []

    def writer(index: int) -> None:
        key = ("op", torch.device("cuda", index), 64)
        for _ in range(150):
            _tuning._store_choice(key, [index, 1])
            path = _tuning._stored_choice_path(key)
            try:
                json.loads(path.read_text())
            except (ValueError, OSError) as exc:
                torn.append(repr(exc))

    with caplog.at_level("INFO", logger="sphere_fast"):
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert torn == [] and "was not stored" not in caplog.text
    assert [p.suffix for p in tmp_path.iterdir()] == [".json"]  # one file, no temporary left


def test_a_stored_choice_comes_back_as_its_candidate(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The store keeps a config's values only (JSON): a later process gets the candidate itself back, a NamedTuple
    whose type and fields the launchers read (not a plain tuple that merely equals it), and launches it."""
    monkeypatch.setenv("SPHERE_FAST_TUNING_CACHE", str(tmp_path))
    tma = attn.TmaConfig(32, 32, 4, 1, False)
    candidates = [(32, 32, 4, 1), tma]
    assert pick_config("fwd", candidates, lambda c: c, timer=FakeTimer({candidates[0]: 2.0, tma: 1.0})) == tma
    _tuning.forget_tuned_configs()  # a later process
    assert type(pick_config("fwd", candidates, lambda c: c, timer=FakeTimer({}))) is attn.TmaConfig

    swl = importlib.import_module("sphere_fast.ops.swiglu_linear")
    monkeypatch.setattr(swl, "_candidates", lambda: (swl.GemmConfig(16, 16, 16, 4, 1, False),
                                                     swl.GemmConfig(32, 32, 16, 4, 1, False)))
    last_is_fastest(monkeypatch)
    g = torch.Generator().manual_seed(0)
    x, weight = (torch.randn(40, 48, generator=g).to(DEVICE, torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        expected = swl.swiglu_linear(x, weight, backend="triton")
        _tuning.forget_tuned_configs()
        assert torch.equal(swl.swiglu_linear(x, weight, backend="triton"), expected)
    assert [type(config) for config in _tuning._chosen.values()] == [swl.GemmConfig]


def test_a_remembered_choice_that_is_not_a_candidate_is_tuned_again() -> None:
    """A caller may leave out candidates that do not apply to a call (attention's tensor-descriptor configs): the
    key's remembered choice is then not launched; the key is tuned among this call's candidates."""
    timer = FakeTimer({"a": 2.0, "b": 1.0, "c": 3.0})
    assert pick_config("k", ["a", "b", "c"], lambda c: c, timer=timer) == "b"
    assert pick_config("k", ["a", "c"], lambda c: c, timer=timer) == "a"
    assert timer.timed == ["a", "b", "c", "a", "c"]
    assert pick_config("k", ["a", "b", "c"], lambda c: c, timer=timer) == "a"  # still a candidate: no timing
    assert len(timer.timed) == 5


@pytest.mark.gpu
def test_an_op_tuned_on_cuda_stores_its_choice(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """On a GPU: the AdaLN forward (two candidates at D = 1024) stores what it timed, and a later process takes
    it without timing, with the same output bits."""
    from sphere_fast.ops import gated_residual_adaln

    monkeypatch.setenv("SPHERE_FAST_TUNING_CACHE", str(tmp_path))
    g = torch.Generator().manual_seed(0)
    x, branch = (torch.randn(2, 64, 1024, generator=g).cuda().bfloat16() for _ in range(2))
    gate, shift, scale = (torch.randn(2, 1, 1024, generator=g).cuda().bfloat16() for _ in range(3))
    weight = torch.ones(1024, device="cuda", dtype=torch.bfloat16)
    res, y = gated_residual_adaln(x, branch, gate, weight, shift, scale, backend="triton")
    assert len(list(tmp_path.glob("*.json"))) == 1

    def no_timing(launch) -> float:
        raise AssertionError("a stored choice must not be timed again")

    _tuning.forget_tuned_configs()
    monkeypatch.setattr(_tuning, "time_launch_ms", no_timing)
    res2, y2 = gated_residual_adaln(x, branch, gate, weight, shift, scale, backend="triton")
    assert torch.equal(res, res2) and torch.equal(y, y2)


def test_ties_keep_the_default() -> None:
    assert pick_config("k", ["a", "b"], lambda c: c, timer=FakeTimer({"a": 1.0, "b": 1.0})) == "a"


def test_candidates_that_do_not_fit_are_skipped() -> None:
    from triton.runtime.errors import OutOfResources

    too_big = OutOfResources(300_000, 232_448, "shared memory")
    assert pick_config("k", ["a", "b"], lambda c: c, timer=FakeTimer({"a": too_big, "b": 5.0})) == "b"
    with pytest.raises(RuntimeError, match="no launch config of k2 fits"):
        pick_config("k2", ["a", "b"], lambda c: c, timer=FakeTimer({"a": too_big, "b": too_big}))


def test_other_launch_errors_propagate() -> None:
    with pytest.raises(ValueError, match="broken"):
        pick_config("k", ["a", "b"], lambda c: c, timer=FakeTimer({"a": ValueError("broken"), "b": 1.0}))


@pytest.mark.parametrize("changed", [0, 1], ids=["first-output", "second-output"])
def test_a_candidate_that_changes_the_bits_is_not_used(caplog: pytest.LogCaptureFixture, changed: int) -> None:
    """The first candidate that runs sets the expected outputs; a faster one that writes other bits in any
    of them is dropped."""
    outputs = [torch.zeros(4), torch.zeros(3)]

    def launch(config: str) -> str:
        for i, out in enumerate(outputs):
            out.fill_(1.0 + 2**-20 if config == "b" and i == changed else 1.0)
        return config

    timer = FakeTimer({"a": 3.0, "b": 1.0, "c": 2.0})
    with caplog.at_level("WARNING", logger="sphere_fast"):
        assert pick_config("k", ["a", "b", "c"], launch, outputs=outputs, timer=timer) == "c"
    assert "config b changes the result's bits" in caplog.text
    assert timer.timed == ["a", "b", "c"]


def test_the_first_candidate_that_fits_sets_the_expected_bits() -> None:
    from triton.runtime.errors import OutOfResources

    out = torch.zeros(2)
    written = {"a": 5.0, "b": 7.0, "c": 5.0}

    def launch(config: str) -> str:
        out.fill_(written[config])
        return config

    too_big = OutOfResources(300_000, 232_448, "shared memory")
    timer = FakeTimer({"a": too_big, "b": 2.0, "c": 1.0})
    assert pick_config("k", ["a", "b", "c"], launch, outputs=[out], timer=timer) == "b"


def test_non_finite_outputs_decide_nothing() -> None:
    """inf / nan outputs cannot show a candidate changing the result: the default runs, and the next call of the
    key tunes."""
    out = torch.zeros(2)
    written = {"a": float("nan"), "b": float("nan")}

    def launch(config: str) -> str:
        out.fill_(written[config])
        return config

    timer = FakeTimer({"a": 2.0, "b": 1.0})
    assert pick_config("k", ["a", "b"], launch, outputs=[out], timer=timer) == "a"
    assert not _tuning._chosen
    written.update(a=1.0, b=1.0)
    assert pick_config("k", ["a", "b"], launch, outputs=[out], timer=timer) == "b"


def test_no_timing_without_choice_or_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    timer = FakeTimer({"a": 2.0, "b": 1.0})
    assert pick_config("k", ["a"], lambda c: c, timer=timer) == "a"
    monkeypatch.setenv("SPHERE_FAST_AUTOTUNE", "0")
    assert pick_config("k", ["a", "b"], lambda c: c, timer=timer) == "a"
    assert timer.timed == []


def test_no_timing_inside_a_graph_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timing synchronizes, which breaks a CUDA-graph capture: the default runs and nothing is remembered."""
    timer = FakeTimer({"a": 2.0, "b": 1.0})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert pick_config("k", ["a", "b"], lambda c: c, timer=timer) == "a"
    assert timer.timed == [] and not _tuning._chosen


def test_candidates_compile_together_before_any_is_timed() -> None:
    """precompile runs for every candidate inside one Triton AsyncCompileMode (compiles go to its thread pool),
    all before the first timed launch, then once more each outside it (cache hits that raise a failed compile's
    error); a remembered key compiles nothing."""
    from triton.runtime._async_compile import active_mode

    events: list[str] = []

    def precompile(config: str) -> None:
        events.append(f"compile {config}" + (" ahead" if active_mode.get() is not None else ""))

    def launch(config: str) -> str:
        events.append(f"launch {config}")
        return config

    timer = FakeTimer({"a": 2.0, "b": 1.0})
    assert pick_config("k", ["a", "b"], launch, timer=timer, precompile=precompile) == "b"
    assert events == ["compile a ahead", "compile b ahead", "compile a", "compile b", "launch a", "launch b"]
    assert pick_config("k", ["a", "b"], launch, timer=timer, precompile=precompile) == "b"
    assert len(events) == 6
    assert active_mode.get() is None


def test_launch_tuned_compiles_every_candidate_before_timing_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ops' entry point hands pick_config a precompile (the launch with compile_only=True), so all candidates
    compile together before the first is timed, then launches the choice."""
    calls: list[tuple[str, bool]] = []
    monkeypatch.setattr(_tuning, "time_launch_ms", lambda launch: launch() or 1.0)
    _tuning.launch_tuned("launch_tuned key", ["a", "b"], lambda c, compile_only=False: calls.append((c, compile_only)),
                         [torch.zeros(1)])
    assert calls[:2] == [("a", True), ("b", True)] and calls[-3:] == [("a", False), ("b", False), ("a", False)]


def test_a_failing_compile_ahead_only_warns(caplog: pytest.LogCaptureFixture) -> None:
    """Compiling ahead is only a speed-up: if it breaks, each candidate compiles at its timed launch, and the
    choice is the same."""

    def precompile(config: str) -> None:
        raise TypeError("warmup() got an unexpected keyword argument")

    with caplog.at_level("WARNING", logger="sphere_fast"):
        chosen = pick_config("k", ["a", "b"], lambda c: c, timer=FakeTimer({"a": 2.0, "b": 1.0}), precompile=precompile)
    assert chosen == "b"
    assert "compiling the candidates ahead failed" in caplog.text


def test_a_candidate_that_does_not_compile_is_not_used(caplog: pytest.LogCaptureFixture) -> None:
    """A variant the installed Triton cannot compile (Triton 3.9 fails warp-specialized TMA loads that 3.6
    compiles) is dropped before the timing, when the default compiles. The warning gives the error's last line,
    where Triton's CompilationError puts its message after a source excerpt."""
    broken = RuntimeError("at 3:4:\n    offs = tl.arange(0, BLOCK_N)\n    ^\narange's range must be a power of 2")

    def precompile(config: str) -> None:
        if config == "b":
            raise broken

    timer = FakeTimer({"a": 2.0, "b": broken, "c": 1.0})
    with caplog.at_level("WARNING", logger="sphere_fast"):
        assert pick_config("k", ["a", "b", "c"], lambda c: c, timer=timer, precompile=precompile) == "c"
    assert "config b does not compile (RuntimeError: arange's range must be a power of 2); not used" in caplog.text
    assert timer.timed == ["a", "c"]


def test_time_launch_ms_times_queued_launches_after_a_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """The order of work on the stream, with CUDA's events and sleep stood in for (no GPU here): one untimed
    launch, the GPU wait, then TIMED_LAUNCHES launches between the two events; the mean is returned."""
    stream: list[str] = []

    class Event:
        def __init__(self, enable_timing: bool = False):
            assert enable_timing
            self.at = None

        def record(self) -> None:
            self.at = len(stream)
            stream.append("event")

        def synchronize(self) -> None:
            stream.append("sync")

        def elapsed_time(self, end: "Event") -> float:
            return 2.0 * (end.at - self.at - 1)  # 2 ms a launch in between

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: stream.append(f"sleep {cycles}"))
    ms = _tuning.time_launch_ms(lambda: stream.append("launch"))
    n = _tuning.TIMED_LAUNCHES
    assert stream == ["launch", f"sleep {_tuning.QUEUE_AHEAD_CYCLES}", "event", *["launch"] * n, "event", "sync"]
    assert ms == 2.0


# ------------------------------------------------------------------------------------ attention launches


def _inputs(b: int, h: int, n: int, d: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(n + d)
    qkv = torch.randn(b, n, 3, h, d, generator=g).to(DEVICE, dtype).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    rope = rope_table_reference(n, d, device=DEVICE)
    grad = torch.randn(b, h, n, d, generator=g).to(DEVICE, dtype)
    return qkv, q, k, v, rope, grad


def _run(qkv, q, k, v, rope, grad) -> list[torch.Tensor]:
    out = attn.attention(q, k, v, rope, impl="triton")
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    return [out.detach(), dqkv]


def _assert_bitwise(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    for name, a, e in zip(("output", "dqkv"), actual, expected):
        assert torch.equal(a, e), f"{what}: {name} differs from the default config's bits"


def _only(candidates: dict[str, tuple]) -> mock._patch:
    return mock.patch.object(attn, "_candidates", lambda *args, **kwargs: candidates)


def _defaults(candidates: dict[str, tuple]) -> dict[str, tuple]:
    return {name: configs[:1] for name, configs in candidates.items()}


# what the interpreter runs (BLOCK_M, BLOCK_N, warps, stages), each kernel keeping its summed block, in
# variants numpy sums in the same order
INTERPRETER_CANDIDATES = {
    "fwd": ((32, 32, 4, 1), (16, 32, 4, 1)),
    "dkdv": ((32, 32, 4, 1), (32, 16, 4, 1)),
    "dq": ((32, 32, 4, 1), (16, 32, 4, 1)),
}


def _cases() -> list:
    if DEVICE == "cpu":
        return [pytest.param((1, 2, 40, 32), torch.float32, id="interpreter")]
    # D = 128: two backward candidates split the warps and the tensor-core tiles otherwise (N = 64 against 128)
    return [pytest.param((4, 16, 1024, d), torch.bfloat16, id=f"D{d}") for d in (64, 72, 128)]


@pytest.mark.cuda_capable
@pytest.mark.parametrize("shape, dtype", _cases())
def test_every_candidate_gives_the_default_bits(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Each candidate alone (no tuning): the same output and gradient bits as the default config."""
    inputs = _inputs(*shape, dtype)
    own = INTERPRETER_CANDIDATES if DEVICE == "cpu" else attn._candidates(shape[-1], dtype)
    with _only(_defaults(own)):
        expected = _run(*inputs)
    for name, configs in own.items():
        for config in configs[1:]:
            with _only({**_defaults(own), name: (config,)}):
                _assert_bitwise(_run(*inputs), expected, f"{name} {config}")


@pytest.mark.cuda_capable
def test_the_op_launches_the_config_it_picked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The tuned op compiles its candidates ahead (on a GPU: its kernels' warmup takes the launch's arguments),
    times them once per kernel and shape bucket, launches the one it picked, and gives the default config's
    bits."""
    if DEVICE == "cpu":
        inputs, own = _inputs(1, 2, 40, 32, torch.float32), INTERPRETER_CANDIDATES
        timed = last_is_fastest(monkeypatch)
    else:
        inputs, own = _inputs(2, 16, 1024, 64, torch.bfloat16), attn._candidates(64, torch.bfloat16)
    with _only(_defaults(own)):
        expected = _run(*inputs)
    with _only(own), caplog.at_level("WARNING", logger="sphere_fast"):
        actual = _run(*inputs)
        chosen = {key[0].removeprefix("attention "): config for key, config in _tuning._chosen.items()}
        assert "compiling the candidates ahead failed" not in caplog.text
        assert set(chosen) == {"fwd", "dkdv", "dq"}
        assert all(config in own[kernel] for kernel, config in chosen.items()), chosen
        if DEVICE == "cpu":
            assert chosen == {kernel: configs[-1] for kernel, configs in own.items()}
            count = len(timed)
            _run(*inputs)
            assert len(timed) == count, "a remembered shape must not be timed again"
    _assert_bitwise(actual, expected, f"tuned {chosen}")


@pytest.mark.gpu
def test_a_config_that_does_not_compile_is_dropped_on_the_gpu(caplog: pytest.LogCaptureFixture) -> None:
    """With Triton's real compiler: a forward config with a 48-key block (tl.arange takes powers of two only)
    does not compile; the tuning drops it with a warning, and the op gives the default config's bits."""
    inputs, own = _inputs(2, 16, 1024, 64, torch.bfloat16), attn._candidates(64, torch.bfloat16)
    with _only(_defaults(own)):
        expected = _run(*inputs)
    broken = (128, 48, 4, 3)
    with _only({**own, "fwd": (*own["fwd"], broken)}), caplog.at_level("WARNING", logger="sphere_fast"):
        actual = _run(*inputs)
    assert f"config {broken} does not compile" in caplog.text
    assert [config for key, config in _tuning._chosen.items() if key[0] == "attention fwd"] != [broken]
    _assert_bitwise(actual, expected, "tuned without the config that does not compile")


@pytest.mark.skipif(DEVICE != "cpu", reason="needs a candidate that changes the bits: the interpreter has one")
def test_a_faster_candidate_with_other_bits_is_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A 16-key block sums each row's keys in other blocks than the default's 32 (the online softmax rescales
    at other points): other bits. The tuning drops it although it reports fastest, and the op keeps the
    default's bits."""
    inputs = _inputs(1, 2, 40, 32, torch.float32)
    own = {**INTERPRETER_CANDIDATES, "fwd": ((32, 32, 4, 1), (32, 16, 4, 1))}
    with _only(_defaults(own)):
        expected = _run(*inputs)
    last_is_fastest(monkeypatch)
    with _only(own), caplog.at_level("WARNING", logger="sphere_fast"):
        actual = _run(*inputs)
    assert "config (32, 16, 4, 1) changes the result's bits" in caplog.text
    assert "compiling the candidates ahead failed" not in caplog.text
    fwd = [config for key, config in _tuning._chosen.items() if key[0] == "attention fwd"]
    assert fwd == [(32, 32, 4, 1)]
    _assert_bitwise(actual, expected, "tuned")


# ------------------------------------------------------------------------ tensor-descriptor forward


@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU benchmarks/tune_attention.py gates these configs")
@pytest.mark.parametrize("warp_specialize", [False, True], ids=["tma", "tma_ws"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tensor_descriptor_forward_gives_the_pointer_kernels_bits(dtype: torch.dtype, warp_specialize: bool) -> None:
    """attention_fwd_tma_kernel with the blocks of a pointer config: the same output, LSE and so gradient bits
    (the interpreter runs the descriptor loads; bf16 through the same rounding emulation)."""
    inputs = _inputs(1, 2, 64, 32, dtype)
    pointer = INTERPRETER_CANDIDATES["fwd"][0]
    with _only(_defaults(INTERPRETER_CANDIDATES)):
        expected = _run(*inputs)
    with _only({**_defaults(INTERPRETER_CANDIDATES), "fwd": (attn.TmaConfig(*pointer, warp_specialize),)}):
        actual = _run(*inputs)
    _assert_bitwise(actual, expected, f"TmaConfig{(*pointer, warp_specialize)}")
    # and against the eager reference in float64 (RoPE, softmax, gradient), as tests/test_attention.py does
    qkv, q, k, v, rope, grad = inputs
    ref_qkv = qkv.detach().double().requires_grad_()
    rq, rk, rv = ref_qkv.permute(2, 0, 3, 1, 4)
    ref = attn.attention_reference(rq, rk, rv, rope.double())
    (ref_dqkv,) = torch.autograd.grad(ref, ref_qkv, grad.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, r in (("output", actual[0], ref), ("dqkv", actual[1], ref_dqkv)):
        torch.testing.assert_close(a.double(), r, atol=tol, rtol=tol, msg=lambda m: f"{name} vs eager: {m}")


@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU benchmarks/tune_attention.py gates these configs")
def test_a_tensor_descriptor_choice_is_not_launched_where_it_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forward's tuning key holds no memory layout: a TmaConfig tuned on the model's qkv views does not apply
    to contiguous [B, H, N, D] inputs of the same shape (its descriptors would misread them), which tune among
    their pointer configs and give the default's bits."""
    tma = attn.TmaConfig(32, 32, 4, 1, False)
    _, q, k, v, _, _ = _inputs(1, 2, 64, 32, torch.float32)
    contiguous = [t.detach().contiguous() for t in (q, k, v)]
    with _only(_defaults(INTERPRETER_CANDIDATES)), torch.no_grad():
        expected = attn.attention(*contiguous, impl="triton")
    last_is_fastest(monkeypatch)
    with _only({**INTERPRETER_CANDIDATES, "fwd": (*INTERPRETER_CANDIDATES["fwd"], tma)}), torch.no_grad():
        attn.attention(q, k, v, impl="triton")
        assert list(_tuning._chosen.values()) == [tma]
        actual = attn.attention(*contiguous, impl="triton")
        assert list(_tuning._chosen.values()) == [INTERPRETER_CANDIDATES["fwd"][-1]]
    assert torch.equal(actual, expected)


def test_tensor_descriptor_configs_run_only_where_they_apply() -> None:
    """A TmaConfig needs one power-of-two head-dim chunk, N a multiple of its blocks, and 16-byte aligned tensors
    in the model's [B, N, H, D] memory; elsewhere the op takes its other candidates, or says why none applies."""
    tma = attn.TmaConfig(32, 32, 4, 1, False)
    _, q, k, v, _, _ = _inputs(1, 2, 64, 32, torch.float32)
    assert attn._config_applies(tma, q, k, v)
    _, q72, k72, v72, _, _ = _inputs(1, 2, 64, 72, torch.float32)
    assert not attn._config_applies(tma, q72, k72, v72)
    _, q40, k40, v40, _, _ = _inputs(1, 2, 40, 32, torch.float32)
    assert not attn._config_applies(tma, q40, k40, v40)
    assert attn._config_applies((32, 32, 4, 1), q40, k40, v40)  # pointer configs always
    shifted = torch.zeros(1 + 3 * q.numel())[1:].view(1, 64, 3, 2, 32).permute(2, 0, 3, 1, 4)[0]
    assert not attn._config_applies(tma, shifted, k, v)  # 4 bytes past an aligned allocation
    assert not attn._config_applies(tma, q.contiguous(), k, v)  # [B, H, N, D] memory
    gapped = torch.zeros(2, 72, 3, 2, 32)[:, :64].permute(2, 0, 3, 1, 4)[0]  # batches 72 rows apart, not 64
    assert not attn._config_applies(tma, gapped, gapped, gapped)
    spread = torch.zeros(1, 64, 3, 2, 64)[..., :32].permute(2, 0, 3, 1, 4)[0]  # heads 64 columns apart, not 32
    assert not attn._config_applies(tma, spread, spread, spread)
    _, q32, k32, v32, _, _ = _inputs(1, 2, 32, 32, torch.float32)  # N a multiple of block_n, not of block_m
    assert not attn._config_applies(attn.TmaConfig(64, 32, 4, 1, False), q32, k32, v32)
    assert attn._config_applies(attn.TmaConfig(32, 32, 4, 1, False), q32, k32, v32)

    inputs = _inputs(1, 2, 40, 32, torch.float32)
    with _only(_defaults(INTERPRETER_CANDIDATES)):
        expected = _run(*inputs)
    both = {**_defaults(INTERPRETER_CANDIDATES), "fwd": (tma, INTERPRETER_CANDIDATES["fwd"][0])}
    with _only(both):  # N = 40: the TmaConfig is left out, the pointer config runs
        _assert_bitwise(_run(*inputs), expected, "pointer config after the TmaConfig")
    with _only({**both, "fwd": (tma,)}), pytest.raises(ValueError, match="no forward launch config applies"):
        _run(*inputs)

