"""When the C++ extensions include their CUDA sources (sphere_fast._extension.cuda_build_possible)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from sphere_fast import _extension


@pytest.mark.parametrize(
    "cuda_version,nvcc,cuda_home,gpu,arch_list,expected",
    [
        (None, True, "", False, "9.0a", False),  # CPU torch: nothing to link CUDA code against
        ("13.0", False, "", True, "", False),  # no nvcc
        ("13.0", False, "/usr/local/cuda", True, "", True),  # nvcc off the PATH, where CUDA_HOME says
        ("13.0", True, "", True, "", True),  # the architecture of the visible GPU
        ("13.0", True, "", False, "9.0a", True),  # a GPU-less build machine naming its target
        ("13.0", True, "", False, "", False),  # no target: torch's detection would fail, build the CPU ops only
    ],
)
def test_cuda_build_possible(
    monkeypatch: pytest.MonkeyPatch, cuda_version: str | None, nvcc: bool, cuda_home: str, gpu: bool, arch_list: str,
    expected: bool,
) -> None:
    monkeypatch.setattr(torch.version, "cuda", cuda_version)
    monkeypatch.setattr(_extension.shutil, "which", lambda name: "/usr/bin/nvcc" if nvcc else None)
    monkeypatch.setenv("CUDA_HOME", cuda_home)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    assert _extension.cuda_build_possible() is expected


SPHERIFY = ("sphere_fast_spherify", ("spherify_binding.cpp", "spherify_cpu.cpp"), ("spherify_cuda.cu",))


def loaded_folders(monkeypatch: pytest.MonkeyPatch, tmp_path) -> list[tuple[str, bool]]:
    """load_extension with torch's load recorded, not run: (its build folder, whether torch's lock was there)."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    seen: list[tuple[str, bool]] = []
    def record(**kw) -> None:
        seen.append((kw["build_directory"], os.path.exists(os.path.join(kw["build_directory"], "lock"))))

    monkeypatch.setattr(cpp_extension, "load", record)
    _extension.load_extension.cache_clear()
    try:
        _extension.load_extension(*SPHERIFY)
    finally:
        _extension.load_extension.cache_clear()
    return seen


def test_a_build_says_so_at_the_default_log_level_and_a_built_extension_does_not(
    monkeypatch: pytest.MonkeyPatch, tmp_path, caplog
) -> None:
    """A first cpp call compiled for tens of seconds without a word."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folders: list[Path] = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: folders.append(Path(kw["build_directory"])))
    for built in (False, True):
        _extension.load_extension.cache_clear()
        caplog.clear()
        try:
            with caplog.at_level(logging.WARNING, logger="sphere_fast"):
                _extension.load_extension(*SPHERIFY)
        finally:
            _extension.load_extension.cache_clear()
        said = [r.getMessage() for r in caplog.records if "building the C++ extension" in r.getMessage()]
        assert len(said) == (0 if built else 1) and all("sphere_fast_spherify" in m for m in said)
        (folders[-1] / "sphere_fast_spherify.so").write_bytes(b"")  # as torch's build leaves it


def test_an_unwritable_build_root_names_the_folder_and_the_setting(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A read-only HOME (a service account) failed the first cpp call with a bare OSError from deep in pathlib."""
    root = tmp_path / "a_file"
    root.write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    _extension.load_extension.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=rf"cannot make the build folder {root}/sphere_fast_spherify-\w+ of the "
                                               r"C\+\+ extension sphere_fast_spherify .*set TORCH_EXTENSIONS_DIR"):
            _extension.load_extension(*SPHERIFY)
    finally:
        _extension.load_extension.cache_clear()


def test_a_failed_build_is_built_again_at_the_next_call(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """torch records an extension's sources before building it: after a failed (or interrupted) build, its next
    load took them for built and raised an ImportError of the library never written, hiding the build's error for
    the rest of the process. Each call builds again and shows the compiler's error."""
    from torch.utils.cpp_extension import JIT_EXTENSION_VERSIONER

    failing = tmp_path / "failing_cxx"  # answers torch's version query, fails every compile
    failing.write_text('#!/bin/sh\ncase " $* " in *" -c "*) echo "no space left" >&2; exit 1;; esac\nexec c++ "$@"\n')
    failing.chmod(0o755)
    monkeypatch.setenv("CXX", str(failing))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    name = "sphere_fast_failing_build"  # not an extension's name: torch's record of the real ones stays as it is
    try:
        for _ in range(2):
            with pytest.raises(RuntimeError, match=f"Error building extension '{name}'"):
                _extension.load_extension(name, *SPHERIFY[1:])
            assert name not in JIT_EXTENSION_VERSIONER.entries
    finally:
        _extension.load_extension.cache_clear()


def test_each_torch_and_build_config_has_a_build_folder_of_its_own(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """torch's JIT folder is one per extension name: two torch versions (an upgrade in place too), two checkouts
    or a CPU-only build beside a CUDA one shared it, and a process waiting for another's build imported that one's
    library. Here each gets its folder, under TORCH_EXTENSIONS_DIR."""
    (first, _), = loaded_folders(monkeypatch, tmp_path)
    monkeypatch.setattr(torch, "__version__", "2.99.0+cpu")
    (other_torch, _), = loaded_folders(monkeypatch, tmp_path)
    monkeypatch.setattr(_extension, "csrc_dir", lambda: tmp_path / "another_checkout" / "csrc")
    (other_checkout, _), = loaded_folders(monkeypatch, tmp_path)
    assert len({first, other_torch, other_checkout}) == 3
    assert all(folder.startswith(str(tmp_path / "sphere_fast_spherify-")) for folder in (first, other_torch))


def test_a_build_lock_left_by_a_killed_process_is_not_waited_on(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """torch's lock file, left by a process killed while it built (torchrun's SIGTERM, the OOM killer), made every
    later process wait for ever; under sphere_fast's OS lock (released by the kernel when its holder dies) it can
    only be a dead process's, and is removed before torch's load."""
    (folder, _), = loaded_folders(monkeypatch, tmp_path)
    open(os.path.join(folder, "lock"), "w").close()
    assert loaded_folders(monkeypatch, tmp_path) == [(folder, False)]


def test_processes_build_one_at_a_time(tmp_path) -> None:
    """A second process waits for the OS lock the first holds (so each runs ninja itself: a build that failed in
    one is not imported by the other), and goes on once it is released (by the kernel too, if its holder dies)."""
    import fcntl
    import subprocess
    import sys
    import time

    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    child = ("from unittest import mock; from sphere_fast import _extension\n"
             "with mock.patch('torch.utils.cpp_extension.load', lambda **kw: print(kw['build_directory'])):\n"
             f"    _extension.load_extension(*{SPHERIFY!r})\n")
    folder = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, check=True)
    folder = folder.stdout.strip()
    with open(os.path.join(folder, "sphere_fast.lock"), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiting = subprocess.Popen([sys.executable, "-c", child], env=env, stdout=subprocess.PIPE, text=True)
        time.sleep(3)
        assert waiting.poll() is None, "the second process did not wait for the lock"
    out, _ = waiting.communicate(timeout=60)
    assert waiting.returncode == 0 and out.strip() == folder


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")  # Python 3.12: the point
def test_a_child_forked_during_a_load_does_not_keep_its_lock(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A process forked (a DataLoader worker) while one thread loads an extension and another waits for its build
    lock inherits both threads' descriptors of the lock, which no thread of the child closes: the child's own load
    waited on it for ever (and so did every other process), also for the lock granted to the waiter after the fork.
    The child drops its copies: once the parent's loads end, the lock can be taken."""
    import fcntl
    import signal
    import threading
    import time

    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    inside, release, folders = threading.Event(), threading.Event(), []

    def slow_load(**kw) -> None:
        folders.append(kw["build_directory"])
        inside.set()
        release.wait(30)

    monkeypatch.setattr(cpp_extension, "load", slow_load)
    _extension.load_extension.cache_clear()
    loads = [threading.Thread(target=_extension.load_extension, args=SPHERIFY) for _ in range(2)]
    pid = None
    try:
        loads[0].start()
        assert inside.wait(30)
        loads[1].start()
        time.sleep(0.5)  # the second load waits for the lock the first holds
        pid = os.fork()
        if pid == 0:  # the child: take the lock as its own load would, within 20 s
            code = 1
            try:
                signal.alarm(20)
                with open(os.path.join(folders[0], "sphere_fast.lock"), "a") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                code = 0
            finally:
                os._exit(code)
    finally:
        release.set()
        for load in loads:
            load.join()
        _extension.load_extension.cache_clear()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child waited on an inherited build lock"
