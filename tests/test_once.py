"""Once-only work when threads race to it: memoized answers computed once, tuning taking turns, fork-safe locks.

Each race is made certain by a computation slow enough (or held open by an event) that every thread misses the
cache before the first answer is stored; the earlier ``functools.cache`` computed each miss in every thread.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest

from sphere_fast import _extension, backend
from sphere_fast._once import ForkSafeLock, once_per_key
from sphere_fast.ops import _tuning

THREADS = 4


def _race(call, threads: int = THREADS) -> list:
    """``call(i)`` from threads i = 0 .. ``threads`` - 1 released together; their answers."""
    start, answers = threading.Barrier(threads), []

    def run(i: int) -> None:
        start.wait()
        answers.append(call(i))

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert len(answers) == threads, "a thread did not finish"
    return answers


def test_a_key_missed_by_racing_threads_is_computed_once() -> None:
    computed = []

    @once_per_key
    def slow(key: str) -> object:
        computed.append(key)
        time.sleep(0.05)
        return object()

    answers = _race(lambda _: slow("k"))
    assert computed == ["k"] and all(answer is answers[0] for answer in answers)
    slow.cache_clear()
    assert slow("k") is not answers[0] and computed == ["k", "k"]


def test_keywords_are_part_of_the_key() -> None:
    computed = []

    @once_per_key
    def with_default(a: int, b: int = 0) -> int:
        computed.append((a, b))
        return a + b

    assert [with_default(1, b=2), with_default(1, b=2), with_default(1), with_default(1, 2)] == [3, 3, 1, 3]
    assert computed == [(1, 2), (1, 0), (1, 2)]  # functools.cache's key: b=2 and a positional 2 differ


def test_a_key_does_not_wait_for_another_keys_computation() -> None:
    inside, release = threading.Event(), threading.Event()

    @once_per_key
    def held_open(key: str) -> str:
        if key == "slow":
            inside.set()
            release.wait(timeout=30)
        return key

    worker = threading.Thread(target=held_open, args=("slow",))
    worker.start()
    try:
        assert inside.wait(timeout=30)
        answer = []
        other = threading.Thread(target=lambda: answer.append(held_open("fast")))
        other.start()
        other.join(timeout=5)
        assert answer == ["fast"], "a key waited for another key's computation"
    finally:
        release.set()
        worker.join()


def test_an_exception_is_not_remembered() -> None:
    calls = []

    @once_per_key
    def fails_once(key: int) -> int:
        calls.append(key)
        if len(calls) == 1:
            raise RuntimeError("first call fails")
        return key

    with pytest.raises(RuntimeError, match="first call fails"):
        fails_once(1)
    assert fails_once(1) == 1 and fails_once(1) == 1 and calls == [1, 1]


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")  # Python 3.12
def test_a_child_forked_while_another_thread_holds_a_lock_gets_it_free() -> None:
    lock, holding, release = ForkSafeLock(), threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            holding.set()
            release.wait(timeout=60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(timeout=30)
        pid = os.fork()
        if pid == 0:  # the child: the holder thread does not exist here
            code = 1
            try:
                signal.alarm(20)
                with lock:
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        holder.join()
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child waited on its parent's thread's lock"


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")  # Python 3.12
def test_a_child_forked_inside_a_lock_this_thread_holds_releases_it() -> None:
    """The forking thread goes on in the child and leaves the lock: a lock made anew there raised "cannot release
    un-acquired lock"."""
    lock = ForkSafeLock()
    with lock:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                lock.__exit__(None, None, None)
                code = 0
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child could not release the lock its thread held"


def test_racing_first_calls_log_a_backend_choice_once(monkeypatch, caplog) -> None:
    usable = backend.available_backends

    def slow_available_backends(device=None):
        time.sleep(0.05)
        return usable(device)

    monkeypatch.setattr(backend, "available_backends", slow_available_backends)
    backend._resolve.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="sphere_fast"):
            answers = _race(lambda _: backend._resolve("race_op", "cpu", "auto", ("cpp",), False))
    finally:
        backend._resolve.cache_clear()
    assert answers == ["eager"] * THREADS
    assert [r.getMessage() for r in caplog.records if "race_op" in r.getMessage()] == [
        "sphere_fast: race_op on cpu uses the eager backend"
    ]


def test_racing_first_loads_of_an_extension_load_it_once(monkeypatch, tmp_path) -> None:
    import torch.utils.cpp_extension

    loads = []

    def slow_load(name, **kwargs):
        loads.append(name)
        time.sleep(0.05)
        return f"module {name}"

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.utils.cpp_extension, "load", slow_load)
    _extension.load_extension.cache_clear()
    try:
        answers = _race(lambda _: _extension.load_extension("sphere_fast_race", ("spherify_cpu.cpp",)))
    finally:
        _extension.load_extension.cache_clear()
    assert answers == ["module sphere_fast_race"] * THREADS and loads == ["sphere_fast_race"]


def test_racing_threads_tune_a_key_once_and_never_time_at_once(monkeypatch) -> None:
    monkeypatch.setenv("SPHERE_FAST_TUNING_CACHE", "0")
    monkeypatch.setenv("SPHERE_FAST_AUTOTUNE", "1")
    timed, timing, overlaps = [], [], []

    def timer(launch) -> float:
        timing.append(1)
        overlaps.append(len(timing) > 1)
        time.sleep(0.02)
        timed.append(launch())
        timing.pop()
        return {"a": 2.0, "b": 1.0}[timed[-1]]

    try:
        answers = _race(lambda _: _tuning.pick_config(("race_kernel", 0), ["a", "b"], lambda c: c, timer=timer))
        assert answers == ["b"] * THREADS and timed == ["a", "b"]
        _race(lambda i: _tuning.pick_config(("race_kernel", 1 + i % 2), ["a", "b"], lambda c: c, timer=timer))
    finally:
        _tuning.forget_tuned_configs()
    assert timed == ["a", "b"] * 3 and not any(overlaps)
