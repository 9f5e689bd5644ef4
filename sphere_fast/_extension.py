"""Build and load the C++/CUDA extensions of csrc/ on first use (ninja, in a build folder of each configuration)."""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from sphere_fast._env import env_switch
from sphere_fast._files import os_lock
from sphere_fast._once import once_per_key

logger = logging.getLogger("sphere_fast")


def csrc_dir() -> Path:
    return Path(str(importlib.resources.files("sphere_fast.csrc")))


def cuda_build_possible() -> bool:
    """CUDA sources are compiled when torch is a CUDA build, nvcc is found and there is a GPU architecture to
    compile for: a visible GPU or ``TORCH_CUDA_ARCH_LIST`` (a CUDA torch on a machine without a GPU builds the
    CPU ops only, instead of failing in torch's architecture detection)."""
    has_nvcc = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
    has_target = torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    return torch.version.cuda is not None and has_nvcc and has_target


def put_pip_ninja_on_path() -> None:
    """Put the ninja package's binary (a dependency of sphere_fast) on PATH when no ninja is there: torch's builds
    look on PATH only, and a venv's python run without activating the venv (a full path, a Jupyter kernel, cron)
    has the venv's bin folder, where pip put ninja, off PATH. It changes this process's PATH (its subprocesses
    inherit it) the first time the cpp backend is looked for."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


# CUDA sources built with precise transcendental functions: the Philox normals follow tl.randn's libdevice
# logf / cosf, which --use_fast_math's __logf / __cosf missed by up to 3.3e-5 on an H200. They keep the rest of
# --use_fast_math, its fast arithmetic flags.
PRECISE_MATH_SOURCES = frozenset({"spherify_cuda.cu"})
FAST_ARITHMETIC = ("--ftz=true", "--prec-div=false", "--prec-sqrt=false", "--fmad=true")


def nvcc_flags(cuda_sources: tuple[str, ...]) -> list[str]:
    """nvcc flags of an extension made of ``cuda_sources`` (tests/sm90.py compiles with the same)."""
    precise = PRECISE_MATH_SOURCES.intersection(cuda_sources)
    return ["-O3", *(FAST_ARITHMETIC if precise else ("--use_fast_math",)), "-lineinfo"]


def build_folder(name: str, sources: list[str], flags: list[str], cuda_flags: list[str]) -> Path:
    """The build folder of extension ``name`` in this configuration: torch's root for JIT builds
    (``TORCH_EXTENSIONS_DIR``), then a folder per torch build, Python, source paths and flags. torch's own folder
    is one per name: two checkouts, two torch versions or a CPU-only build beside a CUDA one shared it, and a
    process that waited for another's build imported that one's library; a torch upgraded in place kept the old
    one (its headers are no dependency ninja tracks)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    config = (torch.__version__, torch.version.git_version, torch.version.cuda, torch.version.hip, sys.version,
              sources, flags, cuda_flags)
    return root / f"{name}-{hashlib.sha256(repr(config).encode()).hexdigest()[:16]}"


@once_per_key
def load_extension(name: str, cpu_sources: tuple[str, ...], cuda_sources: tuple[str, ...] = ()) -> ModuleType:
    """Compile ``csrc/<source>`` files into the extension ``name`` and import it.

    CUDA sources are added (and ``SPHERE_FAST_WITH_CUDA`` defined for the C++ sources) only when a CUDA build is
    possible, so the same op builds CPU-only on CPU torch. Raises RuntimeError with the compiler output on failure.
    Processes (torchrun's ranks, other jobs) build one at a time under an OS lock on the build folder, which the
    kernel releases when its holder dies, so each runs ninja itself: a build that failed in one is not imported by
    another, and a process killed mid-build leaves no lock that the next would wait on for ever (torch's own
    ``lock`` file, which it leaves, is removed under the OS lock: its holder can only be dead).
    """
    from torch.utils.cpp_extension import load

    root = csrc_dir()
    sources = [str(root / s) for s in cpu_sources]
    # no -std flag: torch.utils.cpp_extension picks the standard its headers need (C++20 from torch 2.14)
    flags = ["-O3"]
    cuda_flags = nvcc_flags(cuda_sources)
    if cuda_sources and cuda_build_possible():
        sources += [str(root / s) for s in cuda_sources]
        flags.append("-DSPHERE_FAST_WITH_CUDA")  # the bindings' CUDA launchers (the .cu files never read it)
    folder = build_folder(name, sources, flags, cuda_flags)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(f"cannot make the build folder {folder} of the C++ extension {name} ({exc}); set "
                           "TORCH_EXTENSIONS_DIR to a writable folder") from exc
    put_pip_ninja_on_path()
    with os_lock(folder / "sphere_fast.lock"):
        (folder / "lock").unlink(missing_ok=True)
        if not (folder / f"{name}.so").exists():  # at the default level: a first call is silent for a while
            logger.warning("sphere_fast: building the C++ extension %s for this torch and configuration, once "
                           "(tens of seconds; SPHERE_FAST_VERBOSE_BUILD=1 shows the compiler)", name)
        try:
            return load(
                name=name,
                sources=sources,
                extra_include_paths=[str(root)],
                extra_cflags=flags,
                extra_cuda_cflags=cuda_flags,
                build_directory=str(folder),
                verbose=env_switch("SPHERE_FAST_VERBOSE_BUILD", default=False),
            )
        except BaseException:
            forget_build(name)
            raise


def forget_build(name: str) -> None:
    """Drop torch's record of the extension's sources, which it makes before building: after a failed or
    interrupted build it would take the sources for built, skip the build and fail to import a library never
    written (an ImportError hiding the build's error, for the rest of the process)."""
    from torch.utils import cpp_extension

    versioner = getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None)  # torch's in-process record
    getattr(versioner, "entries", {}).pop(name, None)


def load_ops(
    name: str,
    cpu_sources: tuple[str, ...],
    cuda_sources: tuple[str, ...],
    namespace: str,
    fakes: Mapping[str, Callable[..., Any]],
) -> Any:
    """``load_extension``, then fake kernels (for tracing: torch.compile, opcheck) for the ops it registers in
    ``namespace``, whose schemas are defined in C++: ``fakes`` maps an op's name to its fake. Returns
    ``torch.ops.<namespace>``. A fake registers once a process: callers cache this call."""
    load_extension(name, cpu_sources, cuda_sources)
    for op, fake in fakes.items():
        torch.library.register_fake(f"{namespace}::{op}", fake)
    return getattr(torch.ops, namespace)
