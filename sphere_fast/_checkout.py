"""setup.py installs the top-level folders kernels/ and csrc/ as sphere_fast.kernels and sphere_fast.csrc. When
sphere_fast is imported from a source checkout, both come from that same checkout: without this, an editable
install maps them to the tree it was made from, which may be another clone (the tests would then run one tree's
Python over another's kernels) or a deleted one, and a checkout that was never installed has none.
checkout_commit names such a checkout's commit, which a training run records."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import subprocess
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path

FOLDERS = {"sphere_fast.kernels": "kernels", "sphere_fast.csrc": "csrc"}


class CheckoutFolders(importlib.abc.MetaPathFinder):
    """Finds sphere_fast.kernels and sphere_fast.csrc in the checkout ``root``; their modules then come from
    there through the packages' own search paths."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        folder = FOLDERS.get(fullname)
        if folder is None:
            return None
        package = self.root / folder
        return importlib.util.spec_from_file_location(
            fullname, package / "__init__.py", submodule_search_locations=[str(package)])


def in_checkout(root: Path) -> bool:
    """Whether ``root`` is a sphere_fast source checkout: its setup.py maps the folders, which are there."""
    setup = root / "setup.py"
    if not setup.is_file() or not all((root / folder / "__init__.py").is_file() for folder in FOLDERS.values()):
        return False
    text = setup.read_text()
    return all(name in text for name in FOLDERS)


def checkout_commit(package_dir: Path) -> str | None:
    """The commit (full hash, ``-dirty`` after it where tracked files differ) of the source checkout
    ``package_dir`` (sphere_fast's folder) lies in: None for an installed copy, or where git cannot say (no git, a
    copy without its repository)."""
    root = package_dir.parent
    if not in_checkout(root):
        return None
    # git's variables point it elsewhere (a hook's GIT_DIR names the repository the hook runs for), and the ceiling
    # keeps it from a repository above root (a copy without .git inside another project)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_CEILING_DIRECTORIES"] = str(root.parent)
    try:
        head, changes = (subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, text=True,
                                        check=True, timeout=60).stdout.strip()
                         for args in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"]))
    except (OSError, subprocess.SubprocessError):
        return None
    return head + "-dirty" * bool(changes)


def map_checkout_folders(package_dir: Path) -> None:
    """Put a CheckoutFolders first on sys.meta_path if ``package_dir`` (sphere_fast's folder) lies in a source
    checkout; an installed copy holds the folders inside the package and is left as it is."""
    root = package_dir.parent
    if in_checkout(root) and not any(isinstance(finder, CheckoutFolders) for finder in sys.meta_path):
        sys.meta_path.insert(0, CheckoutFolders(root))
