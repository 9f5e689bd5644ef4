"""What the sdist holds: the library's sources, its README as the long description, and no half test suite (a
review found tests/test_*.py in it without the helpers they import)."""

import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_sdist_holds_the_library_and_its_readme_and_no_tests(tmp_path) -> None:
    egg_info = tmp_path / "egg_info"  # not in the checkout
    egg_info.mkdir()
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(egg_info), "sdist", "-d",
                    str(tmp_path)], cwd=ROOT, check=True, capture_output=True)
    (archive,) = tmp_path.glob("sphere_fast-*.tar.gz")
    with tarfile.open(archive) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
        pkg_info = sdist.extractfile(next(n for n in sdist.getnames() if n.endswith("/PKG-INFO")
                                          and n.count("/") == 1)).read().decode()
    sources = [p for folder in ("sphere_fast", "kernels", "csrc") for p in (ROOT / folder).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts]
    assert {str(p.relative_to(ROOT)) for p in sources} <= names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)
    assert "Description-Content-Type: text/markdown" in pkg_info
    assert (ROOT / "README.md").read_text().splitlines()[0] in pkg_info
