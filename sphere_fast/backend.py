"""Backend registry: which implementation runs each fused op.

Backends: ``eager`` (plain torch, the executable spec), ``triton`` (kernels/), ``cpp`` (the C++/CUDA
extension in csrc/). ``auto`` picks the best available one per op and device. The choice comes from, in
order: the ``backend=`` argument of a call, the innermost ``use_backend(...)`` context, the
``SPHERE_FAST_BACKEND`` environment variable, then ``auto``. Every concrete choice is logged once.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import logging
import os
from collections.abc import Callable
from typing import TypeVar

import torch

from sphere_fast._context import context_value
from sphere_fast._extension import cuda_build_possible, put_pip_ninja_on_path
from sphere_fast._once import once_per_key

F = TypeVar("F", bound=Callable[..., object])
BACKENDS = ("eager", "triton", "cpp")
CHOICES = BACKENDS + ("auto",)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernels take (float32 math inside)
EAGER_DTYPES = (*KERNEL_DTYPES, torch.float64)  # the references compute float64 in float64

logger = logging.getLogger("sphere_fast")
_active: contextvars.ContextVar[str | None] = contextvars.ContextVar("sphere_fast_backend", default=None)


def check_backend_name(name: str, what: str = "backend") -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be one of {CHOICES}, got {name!r}")
    if name not in CHOICES:
        raise ValueError(f"{what} must be one of {CHOICES}, got {name!r}")
    return name


DIFFERENTIATING_TRANSFORMS = {torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp}


def _functorch_transforms() -> list[torch._C._functorch.TransformType]:
    """The torch.func transforms in force, outermost first (none outside them)."""
    if not torch._C._are_functorch_transforms_active():
        return []
    return [interpreter.key() for interpreter in torch._C._functorch.get_interpreter_stack()]


def autodiff_transform() -> str | None:
    """The differentiation in force that the fused kernels cannot follow, if any: their derivatives are
    reverse-mode autograd only, so under forward-mode AD or torch.func's differentiating transforms their outputs
    would pass for constants (zero tangents, gradients left out) without an error. (vmap and functionalize alone
    take no derivative.)"""
    if DIFFERENTIATING_TRANSFORMS.intersection(_functorch_transforms()):
        return "a torch.func transform that differentiates (grad, vjp, jvp, jacrev, jacfwd, hessian)"
    if torch.autograd.forward_ad._current_level >= 0:
        return "forward-mode AD (inside torch.autograd.forward_ad.dual_level)"
    return None


def beyond_first_order_reverse() -> bool:
    """Whether a derivative other than one first-order reverse-mode gradient may be taken of what runs now:
    forward-mode AD, a torch.func transform built on jvp (jvp, jacfwd, hessian), or nested grad transforms."""
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    kinds = _functorch_transforms()
    return torch._C._functorch.TransformType.Jvp in kinds or kinds.count(torch._C._functorch.TransformType.Grad) > 1


def requested_backend(op: str, backend: str | None) -> str:
    """The backend requested for a call of ``op``: ``backend=``, else the active one; under ``autodiff_transform``
    ``auto`` reads as ``eager`` and a fused backend asked for (argument, ``use_backend``, environment) is refused."""
    name = check_backend_name(backend) if backend is not None else active_backend()
    if name != "eager" and (transform := autodiff_transform()) is not None:
        if name != "auto":
            raise NotImplementedError(f"{op}: backend {name!r} (by argument, use_backend or SPHERE_FAST_BACKEND) "
                                      f"cannot run under {transform}: its kernels' gradients are reverse-mode "
                                      "autograd only; use backend 'eager' or 'auto'")
        return "eager"
    return name


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def emulate_bf16(dtype: torch.dtype) -> bool:
    """A Triton kernel's EMULATE_BF16 flag (kernels/rounding.py): bf16 under the interpreter, which truncates
    fp32 -> bf16 where a GPU rounds to nearest even."""
    return triton_interpreting() and dtype == torch.bfloat16


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors where a GPU is visible, and on CPU tensors only under TRITON_INTERPRET=1."""
    if not triton_importable():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and not triton_interpreting()
    return device.type == "cpu" and triton_interpreting()


@functools.cache
def cpp_missing() -> str | None:
    """What the C++ extension, built on first use with ninja and a C++ compiler, lacks here; None if nothing."""
    import shutil

    from torch.utils.cpp_extension import verify_ninja_availability

    put_pip_ninja_on_path()
    try:
        verify_ninja_availability()
    except RuntimeError:
        return "ninja, which it builds with, is not on PATH (pip install ninja)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"its C++ compiler {compiler!r} is not on PATH (set CXX)"
    return None


def cpp_buildable() -> bool:
    return cpp_missing() is None


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: CUDA if present, else CPU): on CUDA without a visible GPU only
    ``eager``. ``cpp`` runs on CUDA only where its CUDA kernels can be built (a CUDA torch and nvcc): without nvcc
    the extension is built for the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    names = ["eager"]
    if triton_usable(device):
        names.append("triton")
    # is_available: TORCH_CUDA_ARCH_LIST lets the CUDA kernels build without a GPU, where they cannot run
    if cpp_buildable() and (device.type == "cpu" or (torch.cuda.is_available() and cuda_build_possible())):
        names.append("cpp")
    return names


def active_backend() -> str:
    """The backend requested now (a name or ``auto``), before per-op resolution."""
    name = _active.get()
    if name is None:
        name = check_backend_name(os.environ.get("SPHERE_FAST_BACKEND", "auto"), "SPHERE_FAST_BACKEND")
    return name


def use_backend(name: str) -> contextlib.AbstractContextManager[str]:
    """Run the ops inside the block on ``name`` (``eager``, ``triton``, ``cpp`` or ``auto``)."""
    return context_value(_active, check_backend_name(name))


def tracing() -> bool:
    """Whether this thread traces a graph (torch.compile, torch.export), where host reads of values are left out.
    ``torch.compiler.is_compiling()`` alone is one flag for the whole process (torch holds it through a compile):
    another thread's compile read as this thread's and turned its input checks off. Under dynamo the first test is
    traced as True; a non-strict export runs its Python under a fake mode of this thread."""
    if torch.compiler.is_dynamo_compiling():
        return True
    return torch.compiler.is_compiling() and torch._guards.detect_fake_mode() is not None


def constant_under_compile(fn: F) -> F:
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo when sphere_fast is imported
    (about 1.5 s of a cold start): that decorator only marks the function, and dynamo reads the mark when it
    traces a call (tests/test_backend.py checks that the marks are the same)."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@constant_under_compile
def requested_cpp_as_auto(op: str, backend: str | None) -> str:
    """The backend requested for ``op``, one with no C++ kernel (``requested_backend``), ``cpp`` read as ``auto``:
    such an op runs on the backend ``auto`` picks for it, so every op runs under ``cpp``. A constant under
    torch.compile (the active backend lives in a context variable)."""
    requested = requested_backend(op, backend)
    return "auto" if requested == "cpp" else requested


@constant_under_compile
def resolve_backend(op: str, device: torch.device, requested: str | None, auto_order: tuple[str, ...]) -> str:
    """The concrete backend for one call of ``op`` on ``device``.

    ``auto_order`` lists the op's preferred backends on CUDA; on CPU ``auto`` is always eager (the CPU
    kernels exist to prove the CUDA math without a GPU, not to be fast). Under torch.compile it runs once
    at trace time and its answer is a constant, so it causes no graph break.
    """
    return _resolve(op, device.type, requested_backend(op, requested), auto_order, triton_interpreting())


def auto_order_for(dtype: torch.dtype, auto_order: tuple[str, ...]) -> tuple[str, ...]:
    """An op's ``auto`` order for inputs of ``dtype``: none for float64, which only the eager references take
    (``auto`` must not refuse what one of its backends takes)."""
    return () if dtype == torch.float64 else auto_order


def resolve_for_dtype(
    op: str, name: str, t: torch.Tensor, requested: str | None, auto_order: tuple[str, ...]
) -> str:
    """``resolve_backend`` for an op whose input ``name`` is ``t`` (the caller checked that its dtype is one of
    ``EAGER_DTYPES``). Under ``auto`` float64 takes the eager reference (``auto_order_for``); a kernel backend asked
    for by name refuses it."""
    backend = resolve_backend(op, t.device, requested, auto_order_for(t.dtype, auto_order))
    if backend != "eager" and t.dtype not in KERNEL_DTYPES:
        raise kernel_dtype_error(op, name, t.dtype, backend)
    return backend


def kernel_dtype_error(op: str, name: str, dtype: torch.dtype, backend: str) -> TypeError:
    return TypeError(
        f"{op}: {name} has dtype {dtype}, which the {backend} backend does not take (its kernels compute in float32 "
        f"and take {', '.join(str(d) for d in KERNEL_DTYPES)}); use the eager backend"
    )


@once_per_key
def _resolve(op: str, device_type: str, name: str, auto_order: tuple[str, ...], interpreting: bool) -> str:
    # Memoized: every op call resolves its backend, and the answer depends only on these arguments (the
    # interpreter flag decides whether Triton runs on CPU). Logged once, when first computed.
    usable = available_backends(device_type)
    if name == "auto":
        name = next((b for b in auto_order if b in usable), "eager") if device_type == "cuda" else "eager"
    elif name not in usable:
        why_not_cpp = f"; cpp: {missing}" if name == "cpp" and (missing := cpp_missing()) else ""
        raise RuntimeError(
            f"backend {name!r} is not available for {op} on {device_type} "
            f"(available: {usable}; triton on CPU needs TRITON_INTERPRET=1{why_not_cpp})"
        )
    logger.info("sphere_fast: %s on %s uses the %s backend", op, device_type, name)
    return name
