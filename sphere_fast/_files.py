"""Files shared between processes: the one way sphere_fast replaces a file atomically (written under a temporary
name beside it, then renamed over it, so that a reader sees the old file or the new one whole, never a part), and
its one OS lock."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO


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


@contextlib.contextmanager
def os_lock(path: Path, wait: bool = True) -> Iterator[IO[str]]:
    """An exclusive OS lock (flock) on the file ``path``, made if missing, for the block; yields the file, open for
    appending. The kernel releases it when its holder dies, so a killed process leaves no lock behind. With
    ``wait=False`` a lock that another holder has raises BlockingIOError at once. On a filesystem without file
    locks it raises an OSError that names ``path`` and says so."""
    with open(path, "a") as held:
        _held_locks.add(held.fileno())  # before the wait: a lock granted after a fork is the child's copy's too
        try:
            _flock(held, path, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            yield held
        finally:
            _held_locks.discard(held.fileno())


def _flock(held: IO[str], path: Path, operation: int) -> None:
    try:
        fcntl.flock(held, operation)
    except OSError as err:
        # NFS without lockd (ENOLCK), Lustre mounted noflock (ENOSYS), some FUSE mounts (EOPNOTSUPP): the bare
        # "[Errno 37] No locks available" names neither the file nor the cause
        if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        raise OSError(err.errno, f"cannot lock {path} ({err.strerror}): its filesystem offers no file locks (NFS "
                      "without lockd, Lustre mounted noflock?); use a folder on one that does") from err


# The OS locks this process holds or waits for now (their descriptors). A child forked meanwhile (a DataLoader
# worker) shares each lock through its copy of the descriptor, which none of its threads would close: the lock would
# outlive its holder's block, and the child's own lock (and every other process's) would wait on it for ever.
_held_locks: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _held_locks:
        os.close(fd)  # the child's copy only: the parent keeps the lock until its block ends
    _held_locks.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)
