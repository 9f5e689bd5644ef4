"""The one way sphere_fast warns: at the caller's line, past sphere_fast's and torch's own frames (a decorator such
as ``torch.no_grad`` adds frames, so a fixed stacklevel could land inside either library, where per-module warning
filters cannot select it)."""

from __future__ import annotations

import sys
import warnings

LIBRARIES = ("sphere_fast", "torch")


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first frame outside ``LIBRARIES``."""
    frame, level = sys._getframe(1), 2  # stacklevel 2 is this function's caller
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in LIBRARIES:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
