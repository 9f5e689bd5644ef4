"""The one way sphere_fast replaces a file atomically: written under a temporary name beside it, then renamed over
it, so that a reader sees the old file or the new one whole, never a part."""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replaced_atomically(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path beside ``path`` (ending in ``suffix``, for writers that name files by it) for the
    block to write; then renames it over ``path``, or removes it if the block raised. The name is this writer's
    alone (process, thread and a random part): threads of one process, or processes of containers that share a
    pid, writing the same file would otherwise write into one temporary file and publish each other's halves."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
