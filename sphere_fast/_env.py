"""The one way sphere_fast reads an on/off switch from the environment."""

from __future__ import annotations

import os


def env_switch(name: str, default: bool) -> bool:
    """``name`` set to 1 (on) or 0 (off); unset or empty, ``default``. Any other value is refused: ``true`` or
    ``off`` would otherwise leave the default in force without a word."""
    value = os.environ.get(name, "")
    if value == "":
        return default
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1 (or unset), got {value!r}")
    return value == "1"
