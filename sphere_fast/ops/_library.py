"""How the fused ops are registered with PyTorch: ``torch.library`` define + impl for the kernels, and each forward
op's autograd in a ``torch.autograd.Function`` around it, entered only when a call needs a gradient. The autograd
is the op's own (its Autograd kernel), so a graph holding the op (torch.export, inductor) differentiates it too.

Not ``@torch.library.custom_op``: that decorator runs every call through Python layers (its autograd
wrapper, alias checks, and a dynamo-disable wrapper that imports ``torch._dynamo``, about 1.8 s, on the first
call). At batch 1 the un-captured sampler is host-bound and makes about 120 op calls a network pass. The
ops stay visible to torch.compile as graph leaves: the schema comes from the kernel's type hints and the
fake kernel gives the output shapes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from sphere_fast.backend import autodiff_transform, tracing

Backward = TypeVar("Backward", bound=Callable[..., object])

LIBRARY = torch.library.Library("sphere_fast", "FRAGMENT")
DEVICE_KEYS = ("CPU", "CUDA")  # CPU: the C++ kernels, and the Triton ones under TRITON_INTERPRET=1
FUNCTIONS: dict[torch._ops.OpOverload, type[torch.autograd.Function]] = {}  # each differentiable op's autograd


def define_op(
    name: str, fake: Callable[..., object], *, own_autograd: bool = False
) -> Callable[[Callable[..., object]], torch._ops.OpOverload]:
    """Decorator: ``fn`` becomes ``torch.ops.sphere_fast.<name>`` on CPU and CUDA tensors (schema from its
    type hints, ``fake`` for fake tensors), and the decorated name is that op. An op with ``own_autograd`` gets
    its Autograd kernel from ``differentiable_by`` or ``forward_only``; autograd passes any other by (the backward
    ops, the noise: nothing of theirs is differentiated)."""

    def register(fn: Callable[..., object]) -> torch._ops.OpOverload:
        LIBRARY.define(name + torch.library.infer_schema(fn, mutates_args=()))
        for key in DEVICE_KEYS:
            LIBRARY.impl(name, fn, key)
        if not own_autograd:
            LIBRARY.impl(name, torch.library.fallthrough_kernel, "Autograd")
        torch.library.register_fake(f"sphere_fast::{name}", fake, lib=LIBRARY)
        return getattr(torch.ops.sphere_fast, name).default

    return register


def differentiable_by(
    op: torch._ops.OpOverload, function: type[torch.autograd.Function], constants: tuple[str, ...] = ()
) -> None:
    """``function`` (its forward takes the op's arguments and returns the op's outputs) becomes the op's Autograd
    kernel: a call that needs a gradient is recorded through it, any other runs the kernel below autograd. It gives
    the ``constants`` inputs no gradient, so one requiring grad is refused, as is forward-mode AD (the public ops
    check both before calling; a graph holding the op, an exported or compiled one, is checked here)."""
    names = [argument.name for argument in op._schema.arguments]
    constant_at = [names.index(name) for name in constants]

    def autograd_kernel(keyset: torch._C.DispatchKeySet, *args: object) -> object:
        transform = autodiff_transform()
        if transform is not None:
            raise NotImplementedError(f"{op._schema.name} cannot run under {transform}: its gradient is "
                                      "reverse-mode autograd only")
        if needs_grad(*args):  # type: ignore[arg-type]
            for i in constant_at:
                if isinstance(args[i], torch.Tensor) and args[i].requires_grad:
                    raise ValueError(f"{op._schema.name}: {names[i]} must not require grad (the op gives it none)")
            return function.apply(*args)
        return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    LIBRARY.impl(op._schema.name.split("::")[1], autograd_kernel, "Autograd", with_keyset=True)
    FUNCTIONS[op] = function


def forward_only(op: torch._ops.OpOverload) -> None:
    """The Autograd kernel of an op without a backward: a call that needs a gradient is refused (the public op
    refuses it first; a graph holding the op, an exported one trained, would leave its inputs without gradients)."""

    def autograd_kernel(keyset: torch._C.DispatchKeySet, *args: object) -> object:
        if needs_grad(*args):  # type: ignore[arg-type]
            raise ValueError(f"{op._schema.name} has no backward: run it under torch.no_grad()")
        return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    LIBRARY.impl(op._schema.name.split("::")[1], autograd_kernel, "Autograd", with_keyset=True)


def call_op(op: torch._ops.OpOverload, *args: object) -> Any:
    """``op(*args)`` as its Autograd kernel would run it, less that Python layer (2-3 us of host time a call, where
    the un-captured sampler makes about 800 calls and a training step about 500): a call that needs a gradient
    enters the op's autograd.Function directly, any other runs the op below autograd (so does the Function's
    forward, where grad mode is off). Under torch.compile the op is called as it is, a leaf of the graph, and so
    under torch.func.vmap, whose batching fallback calls it sample by sample on tensors that then show their
    requires_grad (inside vmap they do not: the call would seem to need no gradient)."""
    if plain_op_call():
        return op(*args)
    if needs_grad(*args):  # type: ignore[arg-type]
        return FUNCTIONS[op].apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def plain_op_call() -> bool:
    """Whether ops are called as they are (``call_op``): under torch.compile or a torch.func transform."""
    return tracing() or torch._C._are_functorch_transforms_active()


def needs_grad(*tensors: torch.Tensor | float | None) -> bool:
    """Whether a call must be recorded for autograd: grad mode on and some input requiring grad."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def grad_only_from(out: torch.Tensor, *inputs: torch.Tensor | float | None) -> torch.Tensor:
    """``out`` requiring grad only when an input it depends on does, as the reference's outputs: an autograd.Function
    marks all its outputs whenever any of its inputs requires grad (``autograd.grad`` would then give zeros where
    the reference raises). A detached alias shares the version counter: in-place changes are still caught. An
    output that requires no grad (no autograd.Function ran: the sampler's path) is returned as it is."""
    return out.detach() if out.requires_grad and not needs_grad(*inputs) else out


def first_order_only(op: str) -> Callable[[Backward], Backward]:
    """Decorator of an op's autograd.Function backward: the backward ops have no gradient of their own, so a
    backward whose result is to be differentiated again (``create_graph=True``, which runs it in grad mode) raises,
    where it would give gradients whose own gradient silently left out this op's second-order terms."""

    def decorate(backward: Backward) -> Backward:
        @functools.wraps(backward)
        def checked(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(f"{op}: the fused backends have no second-order gradient (a backward with "
                                   "create_graph=True); use backend='eager' to differentiate a gradient (its "
                                   "attention is torch's SDPA: outside float64, run the forward inside "
                                   "torch.nn.attention.sdpa_kernel(SDPBackend.MATH))")
            return backward(ctx, *grads)

        return checked  # type: ignore[return-value]

    return decorate
