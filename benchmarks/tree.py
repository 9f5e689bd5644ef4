"""The content digest of a working tree, so that a results file names the exact code it measured.

A lent GPU machine runs a copy of the working tree under stale git metadata: its git id and dirty flag say
nothing about what was sent. The sender states what it sends and the benchmark run digests what it finds:

    python -m benchmarks.tree                     # where the tree is sent from: 2f82371-dirty@3fa9c0d1e2b4a5f6
    export SPHERE_FAST_COMMIT=2f82371-dirty@3fa9c0d1e2b4a5f6   # on the machine, before the benchmark run

The digest covers the files git would take from the tree (tracked ones that exist, untracked ones not ignored),
by path and content, so it does not depend on the index, the history or the files' modes: two copies of the same
files digest alike whatever their .git says. Torch-free (the report imports it).
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIGEST_CHARS = 16


def tree_files(root: Path) -> list[str]:
    """The files under ``root`` that git would commit with ``git add -A``, sorted: a stale index may list files
    since removed, which are left out."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode()
    return sorted({name for name in listed.split("\0") if name and (root / name).is_file()})


def digest(root: Path = ROOT) -> str | None:
    """A digest of ``root``'s files by path and content (see the module docstring), or None outside a git
    checkout."""
    try:
        files = tree_files(root)
    except (OSError, subprocess.CalledProcessError):
        return None
    h = hashlib.sha256()
    for name in files:
        content = hashlib.sha256((root / name).read_bytes()).hexdigest()
        h.update(f"{name}\0{content}\n".encode())
    return h.hexdigest()[:DIGEST_CHARS]


def described(root: Path = ROOT) -> str:
    """What to state as $SPHERE_FAST_COMMIT for the tree at ``root``: ``git describe --always --dirty`` and the
    tree's digest, joined by "@"."""
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True, text=True,
                            check=True).stdout.strip()
    return f"{commit}@{digest(root)}"


if __name__ == "__main__":
    print(described())
