"""The content digest of a working tree, so that a results file names the exact code it measured.

A lent GPU machine runs a copy of the working tree under stale git metadata: its git id and dirty flag say
nothing about what was sent. The sender states what it sends and the benchmark run digests what it finds:

    python -m benchmarks.tree                     # where the tree is sent from: 2f82371-dirty@3fa9c0d1e2b4a5f6
    export SPHERE_FAST_COMMIT=2f82371-dirty@3fa9c0d1e2b4a5f6   # on the machine, before the benchmark run

The digest covers the files git would take from the tree (tracked ones that exist, untracked ones not ignored),
by path and content (a symbolic link by its target's path), not their modes or the history. Which files are
listed depends on the ignore rules and the index where it runs: a copy under stale metadata digests as the tree
sent unless the two differ there (a file the stale index tracks that the sent .gitignore ignores, a folder only
one side's .git/info/exclude ignores), and then the report says "not the tree sent": a false alarm, never a false
match. Torch-free (the report imports it).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIGEST_CHARS = 16


def tree_files(root: Path) -> list[str]:
    """The files under ``root`` that git would commit with ``git add -A``, sorted: a stale index may list files
    since removed, which are left out."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode("utf-8", "surrogateescape")
    return sorted({name for name in listed.split("\0") if name and _present(root / name)})


def _present(path: Path) -> bool:
    return path.is_symlink() or path.is_file()


def _content(path: Path) -> bytes:
    # a link as git stores one: its target's path (a copy may lack the target, outside the checkout)
    return os.fsencode(os.readlink(path)) if path.is_symlink() else path.read_bytes()


def digest(root: Path = ROOT) -> str | None:
    """A digest of ``root``'s files by path and content (see the module docstring), or None outside a git
    checkout or where a file cannot be read."""
    try:
        files = tree_files(root)
        h = hashlib.sha256()
        for name in files:
            h.update(os.fsencode(name) + b"\0" + hashlib.sha256(_content(root / name)).hexdigest().encode() + b"\n")
    except (OSError, subprocess.CalledProcessError):
        return None
    return h.hexdigest()[:DIGEST_CHARS]


def described(root: Path = ROOT) -> str:
    """What to state as $SPHERE_FAST_COMMIT for the tree at ``root``: ``git describe --always --dirty`` and the
    tree's digest, joined by "@"."""
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True, text=True,
                            check=True).stdout.strip()
    tree_digest = digest(root)
    if tree_digest is None:
        raise RuntimeError(f"cannot digest the tree at {root}")
    return f"{commit}@{tree_digest}"


if __name__ == "__main__":
    print(described())
