"""The one way sphere_fast sets a context variable for a block of code."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def context_value(var: contextvars.ContextVar[T], value: T) -> Iterator[T]:
    """``var`` holds ``value`` inside the block (in this thread or task) and its previous value after it."""
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)
