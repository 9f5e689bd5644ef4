"""The README's set-up commands are the ones CI runs, and its examples run."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line and not line.startswith("#"))
    assert command in readme, f"README must show the CI test command: {command}"


def readme_python_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README has no python example"
    return blocks


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = readme_python_blocks()
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


# Errors inside the library are not reported (follow_imports = silent): only what a user's code sees of our
# annotations. Untyped third-party packages, and the kernels a checkout maps in at import time, are not looked for.
MYPY_CONFIG = """\
[mypy]
follow_imports = silent
[mypy-sphere_fast.kernels.*,triton.*,tqdm.*,flash_attn.*]
ignore_missing_imports = True
"""


def test_readme_python_examples_type_check(tmp_path, monkeypatch):
    """The library ships py.typed: its examples, as a user's own code, pass mypy. A return type wider than what
    a call gives (Sampler's images or a pair) makes each use of the result an error."""
    mypy_api = pytest.importorskip("mypy.api")
    files = []
    for i, block in enumerate(readme_python_blocks()):
        files.append(tmp_path / f"readme_block_{i}.py")
        files[-1].write_text(block)
    (tmp_path / "mypy.ini").write_text(MYPY_CONFIG)
    monkeypatch.setenv("MYPYPATH", str(ROOT))  # this checkout's sphere_fast, before an installed one
    out, err, status = mypy_api.run([
        "--config-file", str(tmp_path / "mypy.ini"), "--cache-dir", str(tmp_path / "cache"), *map(str, files)
    ])
    assert status == 0, out + err
