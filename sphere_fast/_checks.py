"""The library's check of an int argument: one convention for all (a wrong type, bool too, is a TypeError; an int
out of range a ValueError), with one message form."""

from __future__ import annotations


def check_int(name: str, value: object, low: int = 1, high: int | None = None) -> int:
    """``value`` if it is an int in [``low``, ``high``) (``high`` None: no upper bound)."""
    bound = f">= {low}" if high is None else f"in [{low}, {high})"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int {bound}, got {value!r}")
    if value < low or (high is not None and value >= high):
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")
    return value
