"""Compile checks for Hopper (sm_90a) without a GPU: Triton kernels ahead of time, CUDA sources with nvcc.

Not a test file: test modules import it (``from tests import sm90``). Both compilers produce a cubin;
``cuobjdump --dump-resource-usage`` reports per kernel REG / STACK / SHARED / LOCAL, and ``--dump-sass``
the instructions (look for HGMMA in matrix kernels, LDG.E.128 in memory-bound ones, and no LDL/STL).

Under ``TRITON_INTERPRET=1`` (set by the root conftest on CPU machines) ``@triton.jit`` returns
interpreter objects that the compiler rejects, so Triton kernels are then compiled in a child process
with the interpreter off; the kernel must be defined at module level there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sphere_fast.ops._util import TRITON_OPTIONS

NVCC_ARCH_FLAGS = ("-gencode=arch=compute_90a,code=sm_90a", "-std=c++17")
SMEM_LIMIT = 227 * 1024  # opt-in shared memory per block on H100 / H200


class CompileError(RuntimeError):
    """A compiler or cuobjdump failed; the message holds its command and output."""


@dataclass(frozen=True)
class KernelResources:
    """Per-kernel numbers from cuobjdump (bytes, per thread for stack/local) and ptxas -v where known."""

    name: str
    registers: int
    stack: int  # stack frame: local arrays and spills live here
    shared: int  # static shared memory, with sm_90's 1 KB per-block reserve; Triton's is dynamic (launch_shared)
    local: int
    constant: int
    spill_stores: int | None = None  # ptxas -v only (None for Triton, whose ptxas log is not kept)
    spill_loads: int | None = None


@dataclass(frozen=True)
class CompiledKernelInfo:
    """A Triton kernel compiled for sm_90a."""

    name: str
    cubin: bytes
    ptx: str
    ttgir: str  # Triton's GPU IR: its layouts say how a tile's elements spread over threads and warps
    resources: KernelResources
    launch_shared: int  # dynamic shared memory bytes the launcher will request
    num_warps: int
    num_stages: int

    def sass(self) -> str:
        return dump_sass(self.cubin)


class CudaKernels(dict[str, KernelResources]):
    """compile_cuda_sm90's result: mangled kernel name -> resources, plus the cubin and the nvcc log."""

    def __init__(self, resources: Mapping[str, KernelResources], cubin: bytes, log: str) -> None:
        super().__init__(resources)
        self.cubin = cubin
        self.log = log
        self._sass: str | None = None

    def find(self, fragment: str) -> KernelResources:
        """The one kernel whose (mangled) name contains ``fragment``."""
        hits = [name for name in self if fragment in name]
        if len(hits) != 1:
            raise KeyError(f"{len(hits)} kernels match {fragment!r}; kernels: {sorted(self)}")
        return self[hits[0]]

    def sass(self) -> str:
        if self._sass is None:
            self._sass = dump_sass(self.cubin)
        return self._sass

    def opcodes_by_kernel(self) -> dict[str, Counter[str]]:
        """Mangled kernel name -> count_opcodes of its own SASS."""
        sections = re.split(r"^\s*Function : (\S+)\s*$", self.sass(), flags=re.MULTILINE)
        return {name: count_opcodes(body) for name, body in zip(sections[1::2], sections[2::2])}


# ------------------------------------------------------------------------------------------------ tools


def find_cuobjdump() -> str | None:
    """cuobjdump from $SPHERE_FAST_CUOBJDUMP, PATH, nvcc's toolkit, or the copy bundled with Triton."""
    candidates = [os.environ.get("SPHERE_FAST_CUOBJDUMP"), shutil.which("cuobjdump")]
    nvcc = find_nvcc()
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent / "cuobjdump"))
    if os.environ.get("CUDA_HOME"):
        candidates.append(str(Path(os.environ["CUDA_HOME"]) / "bin" / "cuobjdump"))
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def find_nvcc() -> str | None:
    if os.environ.get("CUDA_HOME"):
        nvcc = Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        if os.access(nvcc, os.X_OK):
            return str(nvcc)
    return shutil.which("nvcc")


def _run(cmd: Sequence[str], what: str) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompileError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr


def _cuobjdump(cubin: bytes, flag: str) -> str:
    tool = find_cuobjdump()
    if tool is None:
        raise CompileError("cuobjdump not found (PATH, nvcc's folder, CUDA_HOME or triton's bundled copy)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        proc = subprocess.run([tool, flag, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompileError(f"cuobjdump {flag} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")
_FIELD = re.compile(r"([A-Z]+(?:\[\d+\])?):(\d+)")


def resource_usage(cubin: bytes) -> dict[str, KernelResources]:
    """Parse ``cuobjdump --dump-resource-usage`` into KernelResources per function."""
    out: dict[str, KernelResources] = {}
    name: str | None = None
    for line in _cuobjdump(cubin, "--dump-resource-usage").splitlines():
        m = _FUNCTION.match(line)
        if m:
            name = m.group(1)
            continue
        fields = dict(_FIELD.findall(line))
        if name is not None and "REG" in fields:
            out[name] = KernelResources(
                name=name,
                registers=int(fields["REG"]),
                stack=int(fields.get("STACK", 0)),
                shared=int(fields.get("SHARED", 0)),
                local=int(fields.get("LOCAL", 0)),
                constant=int(fields.get("CONSTANT[0]", 0)),
            )
            name = None
    if not out:
        raise CompileError("cuobjdump reported no functions in the cubin")
    return out


def dump_sass(cubin: bytes) -> str:
    return _cuobjdump(cubin, "--dump-sass")


_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def count_opcodes(sass: str) -> Counter[str]:
    """Opcode (with modifiers, e.g. ``LDG.E.128``) -> count, predicates stripped."""
    return Counter(_OPCODE.findall(sass))


# ---------------------------------------------------------------------------------------------- checks


def hgmma_count(info: CompiledKernelInfo) -> int:
    """Hopper tensor-core (warpgroup) matrix instructions in a kernel's SASS."""
    return sum(n for op, n in count_opcodes(info.sass()).items() if op.startswith("HGMMA"))


def assert_no_spills(info: CompiledKernelInfo | KernelResources | Mapping[str, KernelResources]) -> None:
    """Fail if any kernel uses local memory: a stack frame, LOCAL bytes or ptxas-reported spills."""
    if isinstance(info, CompiledKernelInfo):
        kernels = [info.resources]
    elif isinstance(info, KernelResources):
        kernels = [info]
    else:
        kernels = list(info.values())
    bad = [
        k
        for k in kernels
        if k.stack or k.local or (k.spill_stores or 0) or (k.spill_loads or 0)
    ]
    if bad:
        lines = [
            f"{k.name}: STACK={k.stack} LOCAL={k.local} spill stores={k.spill_stores} loads={k.spill_loads} "
            f"(REG={k.registers})"
            for k in bad
        ]
        raise AssertionError(
            "kernel uses local memory (spills or a register array indexed at run time): "
            + "; ".join(lines)
            + ". Shrink the block / num_stages, or index register arrays with compile-time constants only."
        )


def assert_tma_matrix_kernel(info: CompiledKernelInfo, warp_specialized: bool, what: str) -> None:
    """A Hopper matrix kernel fed by the TMA: no spills, shared memory within the limit, tiles loaded by
    UTMALDG, dots on HGMMA, and producer / consumer register budgets (USETMAXREG) iff ``warp_specialized``
    (which shows that Triton did split its loop)."""
    assert_no_spills(info)
    assert info.launch_shared <= SMEM_LIMIT, f"{what}: {info.launch_shared} B shared memory"
    ops = count_opcodes(info.sass())
    assert hgmma_count(info) > 0, f"{what}: no HGMMA in the SASS"
    assert any(op.startswith("UTMALDG") for op in ops), f"{what}: no TMA loads in the SASS"
    assert any(op.startswith("USETMAXREG") for op in ops) == warp_specialized, f"{what}: warp specialization"


# ---------------------------------------------------------------------------------------------- triton


def _unwrap(fn: Any) -> Any:
    """The JITFunction (or interpreter object) under @triton.autotune / @triton.heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction) and type(fn).__name__ != "InterpretedFunction" and hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def _compile_in_process(fn: Any, spec: dict[str, Any]) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arg_names: list[str] = list(fn.arg_names)
    unknown = set(spec["signature"]) - set(arg_names)
    if unknown:
        raise ValueError(f"signature names {sorted(unknown)} are not arguments of {fn.__name__}: {arg_names}")
    # Every argument needs a type; constexpr arguments are typed "constexpr" with their value in constexprs.
    signature = {name: spec["signature"].get(name, "constexpr") for name in arg_names}
    missing = [n for n, t in signature.items() if t == "constexpr" and n not in spec["constexprs"]]
    if missing:
        raise ValueError(f"arguments {missing} of {fn.__name__} have neither a type in signature nor a constexpr value")
    aligned = spec["aligned"]
    if aligned is None:  # torch allocations are 16-byte aligned: the JIT specializes pointers the same way
        aligned = [n for n, t in signature.items() if t.startswith("*")]
    attrs = {(arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=spec["constexprs"], attrs=attrs)
    # the ops' own launch options first: these checks compile the code a launch gets
    options = {**TRITON_OPTIONS, "num_warps": spec["num_warps"], "num_stages": spec["num_stages"], **spec["options"]}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    return {
        "name": kernel.metadata.name,
        "cubin": kernel.asm["cubin"],
        "ptx": kernel.asm["ptx"],
        "ttgir": kernel.asm["ttgir"],
        "shared": kernel.metadata.shared,
    }


class CompileOnlyDriver:
    """Stands in for Triton's CUDA driver where there is no GPU (``triton.runtime.driver.set_active``, with the
    interpreter off): the JIT then specializes and compiles a kernel's launch arguments for sm_90a, as its
    ``warmup`` does on a GPU. Launching cannot work. ``launcher_cls``, if given, is what a compile pass builds
    each kernel's launcher with (a GPU driver's builds a C module)."""

    def __init__(self, launcher_cls: Any = None) -> None:
        self.launcher_cls = launcher_cls

    def get_current_target(self) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


def compile_ops_on_cpu(launcher_cls: Any = None) -> None:
    """For a child process with the interpreter off (process-wide; restores nothing): Triton's driver becomes
    CompileOnlyDriver(launcher_cls) and the triton backend takes CPU tensors, so ops called with them inside a
    compile pass (``sphere_fast.ops._util.compile_pass``) compile their kernels for sm_90a for the arguments of
    those calls. A launch fails."""
    import importlib

    from triton.runtime.driver import driver

    from sphere_fast import backend

    attention = importlib.import_module("sphere_fast.ops.attention")  # the module: ops.attention is the op
    for module in (backend, attention):
        module.triton_usable = lambda device: True
    backend._resolve.cache_clear()
    attention._choose.cache_clear()
    driver.set_active(CompileOnlyDriver(launcher_cls))


class FirstTimedLaunch(Exception):
    """Raised by compile_up_to_first_timing's timer: the tuning has compiled its candidates and would time one."""


@contextlib.contextmanager
def compile_up_to_first_timing() -> Iterator[list[str]]:
    """For a child process with the interpreter off (it changes process-wide state and restores none): Triton's
    driver becomes CompileOnlyDriver and the tuning's timer one that raises FirstTimedLaunch, which ends the
    block (and is swallowed here), so an op called inside runs its tuning up to its first timed launch. Yields
    the list the sphere_fast warnings logged inside are appended to."""
    from triton.runtime.driver import driver

    from sphere_fast.ops import _tuning

    def timer(launch: Any) -> float:
        raise FirstTimedLaunch

    driver.set_active(CompileOnlyDriver())
    _tuning.time_launch_ms = timer
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("sphere_fast").addHandler(handler)
    try:
        yield warnings
    except FirstTimedLaunch:
        return
    raise AssertionError("the block ended without the tuning timing a launch")


def call_in_compile_child(function: str, cache_dir: Path, *args: Any) -> Any:
    """``function`` ("module:name", importable from the repository root) called with ``args`` in a child process
    with the interpreter off and an empty Triton cache in ``cache_dir``; returns what it returned, through JSON.
    For functions that set up the stand-in driver themselves (compile_up_to_first_timing, compile_ops_on_cpu)."""
    module, name = function.split(":")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(cache_dir)}
    code = f"import json; from {module} import {name} as f; print(json.dumps(f(*{args!r})))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


class _CompileWorker:
    """A child process with the interpreter off that compiles Triton kernels for sm_90a, one after another, for as
    long as this process's environment and import path stay as they were when it started (else a new one starts):
    a new child for each compile spent about 2 s importing torch and triton. Requests and answers are pickles on
    its stdin and on a duplicate of its stdout (whatever it prints goes to its stderr, kept in a file)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, env=self.env)

    def serves(self, env: Mapping[str, str]) -> bool:
        return self.proc.poll() is None and self.env == env

    def compile(self, spec: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            pickle.dump(spec, self.proc.stdin)
            self.proc.stdin.flush()
            ok, out = pickle.load(self.proc.stdout)
        except (EOFError, BrokenPipeError, pickle.UnpicklingError):
            self.close()
            self.stderr.seek(0)
            raise CompileError(f"the Triton compile process for sm_90 died:\n{self.stderr.read().decode()}") from None
        if not ok:
            raise CompileError(f"Triton compile of {spec['qualname']} for sm_90 failed:\n{out}")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait()


_worker: _CompileWorker | None = None


def _compile_in_child(fn: Any, spec: dict[str, Any]) -> dict[str, Any]:
    global _worker
    raw = fn.fn  # InterpretedFunction keeps the plain Python function
    if "<locals>" in raw.__qualname__:
        raise ValueError(
            f"{raw.__qualname__}: define the kernel at module level to compile it under TRITON_INTERPRET=1"
        )
    # pytest names the running test in the environment: not a reason for a new worker
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTEST_CURRENT_TEST": ""}
    # The child must import the kernel's module the way this process did.
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [os.environ.get("PYTHONPATH", "")])
    if _worker is None or not _worker.serves(env):
        if _worker is not None:
            _worker.close()
        _worker = _CompileWorker(env)
    return _worker.compile({**spec, "module": raw.__module__, "qualname": raw.__qualname__})


def compile_triton_sm90(
    fn: Any,
    signature: Mapping[str, str],
    constexprs: Mapping[str, Any] | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    *,
    aligned: Iterable[str] | None = None,
    options: Mapping[str, Any] | None = None,
) -> CompiledKernelInfo:
    """Compile a ``@triton.jit`` kernel (autotune/heuristics wrappers are unwrapped) for sm_90a.

    signature: argument name -> Triton type (``"*fp32"``, ``"*bf16"``, ``"i32"``, ``"fp32"``...); arguments
    given in ``constexprs`` (name -> value) may be left out. aligned: arguments to mark 16-divisible, as the
    JIT does at run time for 16-byte aligned pointers and ints divisible by 16 (default: every pointer, no
    int; name the size arguments too to see the code a launch with n % 16 == 0 gets). options: extra
    triton.compile options.
    """
    fn = _unwrap(fn)
    spec = {
        "signature": dict(signature),
        "constexprs": dict(constexprs or {}),
        "num_warps": num_warps,
        "num_stages": num_stages,
        "aligned": None if aligned is None else list(aligned),
        "options": dict(options or {}),
    }
    if type(fn).__name__ == "InterpretedFunction":
        out = _compile_in_child(fn, spec)
    else:
        out = _compile_in_process(fn, spec)
    resources = resource_usage(out["cubin"])
    if out["name"] not in resources:
        raise CompileError(f"cuobjdump lists {sorted(resources)}, not the kernel {out['name']}")
    return CompiledKernelInfo(
        name=out["name"],
        cubin=out["cubin"],
        ptx=out["ptx"],
        ttgir=out["ttgir"],
        resources=resources[out["name"]],
        launch_shared=out["shared"],
        num_warps=num_warps,
        num_stages=num_stages,
    )


# ------------------------------------------------------------------------------------------------ cuda


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_spills(log: str) -> dict[str, tuple[int, int]]:
    """Kernel -> (spill store bytes, spill load bytes) from ``-Xptxas -v`` output."""
    spills: dict[str, tuple[int, int]] = {}
    current: str | None = None
    for line in log.splitlines():
        entry = _PTXAS_ENTRY.search(line)
        if entry:
            current = entry.group(1)
            continue
        m = _PTXAS_SPILLS.search(line)
        if m and current is not None:
            spills[current] = (int(m.group(2)), int(m.group(3)))
            current = None
    return spills


# (a .cu, its include folders, the bytes of it and of their files) -> its compile: a test session runs nvcc once a
# source, however many tests read its kernels.
_cuda_compiles: dict[tuple[Any, ...], CudaKernels] = {}


def compile_cuda_sm90(
    cu_path: str | os.PathLike[str], include_dirs: Iterable[str | os.PathLike[str]] = ()
) -> CudaKernels:
    """nvcc a (torch-free) .cu for sm_90a into a cubin; kernel name -> resources, with ptxas spill counts.

    Uses the nvcc flags sphere_fast._extension builds that source with (nvcc_flags). Raises
    CompileError with nvcc's output on failure. The result is shared by every call with the same sources.
    """
    include_dirs = [str(d) for d in include_dirs]
    files = [Path(cu_path)] + sorted(f for d in include_dirs for f in Path(d).iterdir() if f.is_file())
    key = (str(cu_path), tuple(include_dirs), tuple((str(f), f.read_bytes()) for f in files))
    if key not in _cuda_compiles:
        _cuda_compiles[key] = _compile_cuda(cu_path, include_dirs)
    return _cuda_compiles[key]


def _compile_cuda(cu_path: str | os.PathLike[str], include_dirs: list[str]) -> CudaKernels:
    from sphere_fast._extension import nvcc_flags  # here: the compile child process needs no torch

    nvcc = find_nvcc()
    if nvcc is None:
        raise CompileError("nvcc not found (PATH or CUDA_HOME)")
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path = Path(tmp) / "out.cubin"
        cmd = [nvcc, *NVCC_ARCH_FLAGS, *nvcc_flags((Path(cu_path).name,)), "-cubin", "-Xptxas", "-v", "-o", str(cubin_path)]
        cmd += [f"-I{d}" for d in include_dirs]
        cmd.append(str(cu_path))
        log = _run(cmd, "nvcc")
        cubin = cubin_path.read_bytes()
    spills = _ptxas_spills(log)
    resources = {}
    for name, r in resource_usage(cubin).items():
        stores, loads = spills.get(name, (None, None))
        resources[name] = replace(r, spill_stores=stores, spill_loads=loads)
    return CudaKernels(resources, cubin, log)


def _serve() -> None:
    """The compile worker's loop (see _CompileWorker): a spec in, (True, compiled) or (False, the error) out, until
    its stdin closes."""
    import importlib
    import traceback

    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # prints from the compiler go to stderr, not into the answers
    while True:
        try:
            spec = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        try:
            obj: Any = importlib.import_module(spec["module"])
            for part in spec["qualname"].split("."):
                obj = getattr(obj, part)
            answer = (True, _compile_in_process(_unwrap(obj), spec))
        except Exception:
            answer = (False, traceback.format_exc())
        pickle.dump(answer, answers)
        answers.flush()


if __name__ == "__main__":
    _serve()
