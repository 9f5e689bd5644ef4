"""sphere_fast imported from a source checkout takes kernels/ and csrc/ from that checkout (sphere_fast._checkout)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

from sphere_fast import _checkout

ROOT = Path(__file__).resolve().parents[1]


def test_a_stale_editable_install_does_not_supply_the_kernels(tmp_path: Path) -> None:
    """An editable install's finder (last on sys.meta_path, as setuptools puts it) that maps the two folders to
    another tree: the checkout's own folders are imported, their modules too."""
    for folder in ("kernels", "csrc"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("raise ImportError('the other tree was imported')\n")
    script = textwrap.dedent(f"""
        import importlib.abc, importlib.util, sys
        from pathlib import Path

        class OtherTree(importlib.abc.MetaPathFinder):
            def find_spec(self, fullname, path=None, target=None):
                folder = {{"sphere_fast.kernels": "kernels", "sphere_fast.csrc": "csrc"}}.get(fullname)
                if folder is None:
                    return None
                init = Path({str(tmp_path)!r}) / folder / "__init__.py"
                return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[])

        sys.meta_path.append(OtherTree())
        import sphere_fast.csrc, sphere_fast.kernels.rope
        print(sphere_fast.kernels.__file__, sphere_fast.csrc.__file__, sphere_fast.kernels.rope.__file__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kernels, csrc, rope = map(Path, proc.stdout.split())
    assert kernels == ROOT / "kernels" / "__init__.py" and csrc == ROOT / "csrc" / "__init__.py"
    assert rope == ROOT / "kernels" / "rope.py"


def test_an_installed_copy_is_left_as_it_is(tmp_path: Path, monkeypatch) -> None:
    """A package folder whose parent is no sphere_fast checkout (site-packages: no setup.py; another project's
    setup.py) adds no finder; a checkout adds one, once."""
    installed = tmp_path / "site-packages" / "sphere_fast"
    for folder in ("kernels", "csrc"):  # folders of those names beside it are not enough
        (installed.parent / folder).mkdir(parents=True)
        (installed.parent / folder / "__init__.py").touch()
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, _checkout.CheckoutFolders)])
    _checkout.map_checkout_folders(installed)
    (installed.parent / "setup.py").write_text("setup(name='another')\n")
    _checkout.map_checkout_folders(installed)
    assert not any(isinstance(f, _checkout.CheckoutFolders) for f in sys.meta_path)
    (installed.parent / "setup.py").write_text((ROOT / "setup.py").read_text())
    _checkout.map_checkout_folders(installed)
    _checkout.map_checkout_folders(installed)
    added = [f for f in sys.meta_path if isinstance(f, _checkout.CheckoutFolders)]
    assert len(added) == 1 and added[0].root == installed.parent and sys.meta_path[0] is added[0]


def test_the_checkout_commit_is_that_of_its_own_repository(tmp_path: Path, monkeypatch) -> None:
    """checkout_commit names the checkout's HEAD, as a full hash (git describe gave a tag alone on a tagged commit),
    whatever GIT_DIR says (a git hook's names the hook's repository); an installed copy has none, nor has a copy
    of the checkout without its .git that lies in another project's repository (whose commit is not the
    package's)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # the tests run from a git checkout
        assert re.fullmatch(head.stdout.strip() + "(-dirty)?", _checkout.checkout_commit(ROOT / "sphere_fast"))
        monkeypatch.setenv("GIT_DIR", str(tmp_path / "elsewhere"))
        assert _checkout.checkout_commit(ROOT / "sphere_fast").startswith(head.stdout.strip())
        monkeypatch.delenv("GIT_DIR")
    assert _checkout.checkout_commit(tmp_path / "site-packages" / "sphere_fast") is None
    project = tmp_path / "project"
    copy = project / "vendored"
    for folder in ("kernels", "csrc"):
        (copy / folder).mkdir(parents=True)
        (copy / folder / "__init__.py").touch()
    (copy / "setup.py").write_text((ROOT / "setup.py").read_text())
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "other"], cwd=project, check=True)
    assert _checkout.in_checkout(copy) and _checkout.checkout_commit(copy / "sphere_fast") is None
