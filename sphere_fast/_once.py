"""Work done once per process when threads race to it, under locks that a forked child gets fresh."""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

R = TypeVar("R")


class ForkSafeLock:
    """A re-entrant lock that a child forked while another thread held it gets free: the holder is a thread the
    child does not have, so the child would wait on it for ever. One the forking thread holds stays held (that
    thread goes on in the child, and releases it)."""

    _all: weakref.WeakSet[ForkSafeLock] = weakref.WeakSet()

    def __init__(self) -> None:
        self._lock = threading.RLock()
        ForkSafeLock._all.add(self)

    def __enter__(self) -> ForkSafeLock:
        self._lock.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()

    @classmethod
    def _renew_all(cls) -> None:
        for lock in list(cls._all):
            if not lock._lock._is_owned():  # type: ignore[attr-defined]
                lock._lock = threading.RLock()


os.register_at_fork(after_in_child=ForkSafeLock._renew_all)


def once_per_key(compute: Callable[..., R]) -> Callable[..., R]:
    """``functools.cache`` that computes each key once when threads miss it together (the others wait for its
    answer: one log line, one extension load). Keys wait only on their own computation, and a hit costs what
    ``functools.cache``'s does. An exception is not cached, as there. Its ``cache_info`` counts calls (a racing
    miss too), not computations."""
    computed = functools.cache(compute)
    key_locks: dict[Hashable, ForkSafeLock] = {}
    key_locks_guard = ForkSafeLock()

    def compute_under_key_lock(*args: Any, **kwargs: Any) -> R:
        with key_locks_guard:
            lock = key_locks.setdefault((args, tuple(sorted(kwargs.items()))), ForkSafeLock())
        with lock:
            return computed(*args, **kwargs)

    cached = functools.cache(functools.wraps(compute)(compute_under_key_lock))
    clear_hits = cached.cache_clear

    def cache_clear() -> None:
        clear_hits()
        computed.cache_clear()
        key_locks.clear()

    cached.cache_clear = cache_clear  # type: ignore[method-assign]
    return cached
