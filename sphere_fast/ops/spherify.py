"""Spherify f(z) = z * rsqrt(mean(z^2 over non-batch dims) + eps): one sphere of radius sqrt(L) per sample,
and the noisy re-projection f(f(z) + s*e) used by training and sampling.

Layers here: the eager references (the executable spec), input checks, the Triton launchers, the bridge to
the C++ extension (csrc/spherify_*; it also holds the seeded labels' Philox, ops/labels.py), and three
``torch.library`` ops shared by both kernel backends (``sphere_noise`` also carries the eager reference under a
compile trace; autograd: ``_SpherifyFunction``, see ``ops/_library.py``):
``sphere_fast::spherify_fwd`` -> (out [P, *z.shape], stats [B, 3] = |z|^2, z.e, |e|^2 in fp32),
``sphere_fast::spherify_bwd`` and ``sphere_fast::sphere_noise`` (the noise e alone). P is 1 (one scale) or 2
(the training pair from one read of z). Backward saves only z, the per-sample sums and the seeds: e is
regenerated, never stored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sphere_fast._once import once_per_key
from sphere_fast.backend import EAGER_DTYPES, emulate_bf16, resolve_backend, resolve_for_dtype, tracing
from sphere_fast.ops._library import (
    call_op,
    define_op,
    differentiable_by,
    first_order_only,
    grad_only_from,
    plain_op_call,
)
from sphere_fast.ops._util import ceil_div, kernel_runner, next_pow2, on_input_device
from sphere_fast.ops.philox import check_seeds, check_stream, sample_shape, sphere_noise_reference

EPS = 1e-6
AUTO_ORDER = ("triton", "cpp", "eager")
_NUM_WARPS = 8  # 2048-wide tiles: 8 values per thread (tests/test_sm90_spherify.py checks registers)

__all__ = [
    "spherify",
    "spherify_noise",
    "spherify_noise_pair",
    "spherify_noise_reference",
    "spherify_reference",
    "sphere_noise",
]


def spherify_reference(z: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """f(z) = z * rsqrt(mean(z^2 over non-batch dims) + eps) for z [B, ...]: the mean square in float32 at least
    (float64 stays float64), the result in z's dtype."""
    dims = tuple(range(1, z.ndim))
    # the mean square in float32 at least, as the kernels: in float16 it overflows from |z| ~ 256 (f(z) = 0)
    m = z.to(torch.promote_types(z.dtype, torch.float32)).square().mean(dim=dims, keepdim=True)
    return z * torch.rsqrt(m + eps).to(z.dtype)


def _per_sample(scale: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return scale.to(z.dtype).reshape(-1, *[1] * (z.ndim - 1))  # [B] or [] -> [B or 1, 1, ...]: broadcasts


def spherify_noise_reference(z: torch.Tensor, scale: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
    """f(f(z) + scale[b] * noise) for a float or [B] ``scale`` (exactly f(z)[b] where it is 0) and a ``noise`` of
    z's shape, given in z's dtype as ``spherify_noise`` does (a float32 noise would make a bf16 result float32)."""
    v = spherify_reference(z)
    if not isinstance(scale, torch.Tensor):
        # a Python scale stays a scalar: no host-to-device copy inside a captured graph
        return v if scale == 0 else spherify_reference(v + scale * noise)
    s = _per_sample(scale, z)
    return torch.where(s == 0, v, spherify_reference(v + s * noise))


# ---------------------------------------------------------------------------------------------- input checks


def _values_checkable(t: torch.Tensor) -> bool:
    """Value checks read the tensor on the host: done for CPU tensors outside a compile trace and torch.func
    transforms only (vmap cannot branch on a value). On a GPU they would stall every call (the training step's
    scales) on a device sync, and a graph capture could not read them at all."""
    return t.device.type == "cpu" and not plain_op_call()


def _check_z(z: object) -> torch.Tensor:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor of shape [B, ...], got {type(z).__name__}")
    if z.ndim < 2 or 0 in z.shape[1:]:
        raise ValueError(f"z must have shape [B, ...] with at least 2 dims, none empty after B, got {tuple(z.shape)}")
    if z.dtype not in EAGER_DTYPES:
        raise TypeError(f"z must have dtype in {EAGER_DTYPES} (float64 on the eager backend only), got {z.dtype}")
    return z


def _check_scale(name: str, scale: object, z: torch.Tensor) -> torch.Tensor | float:
    """A finite float, or a finite floating tensor of shape [] or [B] on z's device."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a tensor of shape [B], got {type(scale).__name__}")
    if not isinstance(scale, torch.Tensor):
        try:
            value = float(scale)
        except OverflowError:
            raise ValueError(f"{name} must be finite, got an int beyond float's range") from None
        # v - v is 0 for a finite v and NaN for inf or NaN; a symbolic float (torch.compile's dynamic=True), whose
        # value is not known at the trace, passes (math.isfinite would break the graph)
        if value - value != 0:
            raise ValueError(f"{name} must be finite, got {scale}")
        return value
    if not scale.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {scale.dtype}")
    if scale.shape not in ((), (z.shape[0],)):
        raise ValueError(f"{name} must have shape [] or [B]=[{z.shape[0]}], got {tuple(scale.shape)}")
    if scale.device != z.device:
        raise ValueError(f"{name} must be on {z.device} (the device of z), got {scale.device}")
    if _values_checkable(scale) and not bool(torch.isfinite(scale).all()):
        raise ValueError(f"{name} must be finite, got {scale}")
    return scale


def _check_noise_source(
    z: torch.Tensor, noise: torch.Tensor | None, seeds: torch.Tensor | None, stream: int
) -> None:
    check_stream(stream, math.prod(z.shape[1:]))
    if (noise is None) == (seeds is None):
        raise ValueError("give exactly one of noise= (explicit e) or seeds= ([B] int64 per-sample seeds)")
    if noise is not None:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
        if not noise.is_floating_point():
            raise TypeError(f"noise must be a floating tensor, got {noise.dtype}")
        if noise.shape != z.shape:
            raise ValueError(f"noise must have the shape of z {tuple(z.shape)}, got {tuple(noise.shape)}")
        if noise.device != z.device:
            raise ValueError(f"noise must be on {z.device} (the device of z), got {noise.device}")
    else:
        check_seeds(seeds, batch=z.shape[0], device=z.device)


def _scales_tensor(z: torch.Tensor, *scales: torch.Tensor | float) -> torch.Tensor:
    """[P, B] float32 per-sample scales for the kernels (keeps autograd to tensor scales)."""
    rows = []
    for s in scales:
        if isinstance(s, torch.Tensor):
            rows.append(s.to(torch.float32).expand(z.shape[0]))
        else:
            rows.append(torch.full((z.shape[0],), s, dtype=torch.float32, device=z.device))
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------- Triton launchers


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[B, L] view with unit column stride (copies only when the per-sample values are not contiguous)."""
    t2 = t.reshape(t.shape[0], -1)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def _noise_args(
    z2: torch.Tensor, scales: torch.Tensor | None, noise: torch.Tensor | None, seeds: torch.Tensor | None, stream: int
):
    """(mode, noise [B, L] or a dummy, seeds or a dummy, row stride of noise, 64-bit offset base, scales or a
    dummy); without scales (plain spherify) the kernels read no noise."""
    from sphere_fast.kernels.spherify import NOISE_NONE, NOISE_PHILOX, NOISE_TENSOR

    if scales is None:
        return NOISE_NONE, z2, z2, 0, 0, z2
    scales = scales.contiguous()
    length = z2.shape[1]
    if noise is not None:
        n2 = _rows(noise)
        return NOISE_TENSOR, n2, z2, n2.stride(0), 0, scales
    return NOISE_PHILOX, z2, seeds.contiguous(), 0, stream * length, scales  # the kernels read seeds[b]


@on_input_device
def _triton_fwd(z, scales, noise, seeds, stream):
    from sphere_fast.kernels import spherify as K

    z2 = _rows(z)
    batch, length = z2.shape
    pairs = 1 if scales is None else scales.shape[0]
    block, chunk, nsplit = K.launch_config(length)
    mode, n2, sd, stride_n, base, scales_arg = _noise_args(z2, scales, noise, seeds, stream)
    partial = torch.empty((batch, nsplit, 4), dtype=torch.float32, device=z.device)
    out = torch.empty((pairs, *z.shape), dtype=z.dtype, device=z.device)
    stats = torch.empty((batch, 3), dtype=torch.float32, device=z.device)
    grid = (batch, nsplit)
    kernel_runner(K.spherify_fwd_partials_kernel, grid)(
        z2, n2, sd, partial, length, z2.stride(0), stride_n, base, CHUNK=chunk, BLOCK=block, NOISE=mode, num_warps=_NUM_WARPS
    )
    kernel_runner(K.spherify_fwd_apply_kernel, grid)(
        z2, n2, sd, scales_arg, partial, out, stats, batch, length, z2.stride(0), stride_n, base, EPS,
        SPLIT_P2=next_pow2(nsplit), CHUNK=chunk, BLOCK=block, NOISE=mode, PAIR=pairs == 2,
        EMULATE_BF16=emulate_bf16(z.dtype), num_warps=_NUM_WARPS,
    )
    return out, stats


@on_input_device
def _triton_bwd(grad, z, scales, noise, seeds, stats, stream):
    from sphere_fast.kernels import spherify as K

    z2 = _rows(z)
    batch, length = z2.shape
    pairs = grad.shape[0]
    block, chunk, nsplit = K.launch_config(length)
    g = grad.reshape(pairs, batch, length).contiguous()
    mode, n2, sd, stride_n, base, scales_arg = _noise_args(z2, scales, noise, seeds, stream)
    partial = torch.empty((batch, nsplit, 4), dtype=torch.float32, device=z.device)
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    dscales = torch.zeros((pairs, batch), dtype=torch.float32, device=z.device)
    grid = (batch, nsplit)
    kernel_runner(K.spherify_bwd_partials_kernel, grid)(
        g, z2, n2, sd, partial, batch, length, z2.stride(0), stride_n, base,
        CHUNK=chunk, BLOCK=block, NOISE=mode, PAIR=pairs == 2, num_warps=_NUM_WARPS,
    )
    kernel_runner(K.spherify_bwd_apply_kernel, grid)(
        g, z2, n2, sd, scales_arg, stats.contiguous(), partial, dz, dscales, batch, length, z2.stride(0),
        stride_n, base, EPS,
        SPLIT_P2=next_pow2(nsplit), CHUNK=chunk, BLOCK=block, NOISE=mode, PAIR=pairs == 2,
        EMULATE_BF16=emulate_bf16(z.dtype), num_warps=_NUM_WARPS,
    )
    return dz, dscales


@on_input_device
def _triton_noise(seeds: torch.Tensor, length: int, stream: int) -> torch.Tensor:
    from sphere_fast.kernels.spherify import sphere_noise_kernel

    block = min(4096, next_pow2(length))
    out = torch.empty((seeds.shape[0], length), dtype=torch.float32, device=seeds.device)
    # the kernel reads seeds[b] at unit stride
    kernel_runner(sphere_noise_kernel, (seeds.shape[0], ceil_div(length, block)))(
        seeds.contiguous(), out, length, stream * length, BLOCK=block
    )
    return out


# ---------------------------------------------------------------------------------------------- C++ bridge


@once_per_key
def _cpp_ext():
    from sphere_fast._extension import load_ops

    fakes = {"spherify_fwd": _fwd_fake, "spherify_bwd": _bwd_fake, "sphere_noise": _noise_fake,
             "philox_below": lambda seeds, counter, n: torch.empty_like(seeds)}
    return load_ops("sphere_fast_spherify", ("spherify_binding.cpp", "spherify_cpu.cpp"), ("spherify_cuda.cu",),
                    "sphere_fast_cpp", fakes)


# -------------------------------------------------------------------------------------- ops and autograd


# Fake kernels of both the sphere_fast ops and the C++ ones under them (which take no backend argument).
def _fwd_fake(z, scales, noise, seeds, stream, backend=None):
    pairs = 1 if scales is None else scales.shape[0]
    return z.new_empty((pairs, *z.shape)), z.new_empty((z.shape[0], 3), dtype=torch.float32)


def _bwd_fake(grad, z, scales, noise, seeds, stats, stream, backend=None):
    return torch.empty_like(z, memory_format=torch.contiguous_format), grad.new_empty(
        (grad.shape[0], z.shape[0]), dtype=torch.float32
    )


def _noise_fake(seeds, length, stream, backend=None):
    return seeds.new_empty((seeds.shape[0], length), dtype=torch.float32)


@define_op("spherify_fwd", fake=_fwd_fake, own_autograd=True)
def _spherify_fwd(
    z: torch.Tensor,
    scales: torch.Tensor | None,
    noise: torch.Tensor | None,
    seeds: torch.Tensor | None,
    stream: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _triton_fwd(z, scales, noise, seeds, stream)
    return _cpp_ext().spherify_fwd(z, scales, noise, seeds, stream)


@define_op("spherify_bwd", fake=_bwd_fake)
def _spherify_bwd(
    grad: torch.Tensor,
    z: torch.Tensor,
    scales: torch.Tensor | None,
    noise: torch.Tensor | None,
    seeds: torch.Tensor | None,
    stats: torch.Tensor,
    stream: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _triton_bwd(grad, z, scales, noise, seeds, stats, stream)
    return _cpp_ext().spherify_bwd(grad, z, scales, noise, seeds, stats, stream)


class _SpherifyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, scales, noise, seeds, stream: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        out, stats = call_op(_spherify_fwd, z, scales, noise, seeds, stream, backend)
        ctx.save_for_backward(z, scales, noise, seeds, stats)
        ctx.mark_non_differentiable(stats)
        ctx.stream = stream
        ctx.backend = backend
        return out, stats

    @staticmethod
    @first_order_only("spherify")
    def backward(ctx, grad_out: torch.Tensor, _dstats: torch.Tensor):
        z, scales, noise, seeds, stats = ctx.saved_tensors
        dz, dscales = _spherify_bwd(grad_out, z, scales, noise, seeds, stats, ctx.stream, ctx.backend)
        return dz, (dscales if ctx.needs_input_grad[1] else None), None, None, None, None


differentiable_by(_spherify_fwd, _SpherifyFunction, constants=("noise",))


@define_op("sphere_noise", fake=_noise_fake)
def _sphere_noise(seeds: torch.Tensor, length: int, stream: int, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _triton_noise(seeds, length, stream)
    if backend == "eager":
        return sphere_noise_reference(seeds, (length,), stream=stream)
    return _cpp_ext().sphere_noise(seeds, length, stream)


def _reference_noise(seeds: torch.Tensor, dims: tuple[int, ...], stream: int) -> torch.Tensor:
    """The eager backend's noise: under torch.compile one opaque op, as inductor does not finish lowering its ten
    Philox rounds inlined into the spherify reductions."""
    if tracing():
        return _sphere_noise(seeds, math.prod(dims), stream, "eager").view(seeds.shape[0], *dims)
    return sphere_noise_reference(seeds, dims, stream=stream)


# ---------------------------------------------------------------------------------------------- public ops


def spherify(z: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """f(z) for z of shape [B, ...]."""
    name = resolve_for_dtype("spherify", "z", _check_z(z), backend, AUTO_ORDER)
    if name == "eager" or z.shape[0] == 0:  # no samples: nothing to launch (as the other ops take B = 0)
        return spherify_reference(z)
    return call_op(_spherify_fwd, z, None, None, None, 0, name)[0][0]


def sphere_noise(
    seeds: torch.Tensor, shape: Sequence[int], stream: int = 0, *, backend: str | None = None
) -> torch.Tensor:
    """[B, *shape] float32 noise e of the sphere_fast convention (``philox.sphere_noise_reference``): one
    kernel on the triton and cpp backends instead of the reference's chain of elementwise Philox ops.

    ``shape`` is the per-sample shape, without B (B is ``len(seeds)``): for a z of shape [B, ...] pass
    ``z.shape[1:]``; ``z.shape`` itself would give [B, B, ...].
    """
    seeds = check_seeds(seeds)
    dims = sample_shape(shape)
    stream = check_stream(stream, math.prod(dims))
    name = resolve_backend("sphere_noise", seeds.device, backend, AUTO_ORDER)
    if name == "eager":
        return _reference_noise(seeds, dims, stream)
    return _sphere_noise(seeds, math.prod(dims), stream, name).view(seeds.shape[0], *dims)


def _noisy(
    op: str,
    z: torch.Tensor,
    scales: tuple[tuple[str, torch.Tensor | float], ...],
    noise: torch.Tensor | None,
    seeds: torch.Tensor | None,
    stream: int,
    backend: str | None,
) -> list[torch.Tensor]:
    name = resolve_for_dtype(op, "z", _check_z(z), backend, AUTO_ORDER)
    values = [_check_scale(label, s, z) for label, s in scales]
    _check_noise_source(z, noise, seeds, stream)
    if name == "eager" or z.shape[0] == 0:
        # e in z's dtype, as the official randn_like(z): a float32 noise would make a bf16 result float32
        e = (noise if noise is not None else _reference_noise(seeds, tuple(z.shape[1:]), stream)).to(z.dtype)
        return [spherify_noise_reference(z, s, e) for s in values]
    if noise is not None and noise.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: noise must not require grad on the fused backends (they give no gradient for it); "
                         "use backend='eager' to differentiate the noise")
    out, _ = call_op(_spherify_fwd, z, _scales_tensor(z, *values), noise, seeds, stream, name)
    # one view each, not unbind's: a view may then change in place
    return [grad_only_from(out[k], z, v) for k, v in enumerate(values)]


def spherify_noise(
    z: torch.Tensor,
    scale: torch.Tensor | float,
    *,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    stream: int = 0,
    backend: str | None = None,
) -> torch.Tensor:
    """f(f(z) + scale[b] * e); e is ``noise`` if given, else drawn from ``seeds`` and ``stream``.

    ``scale`` is a float or a [B] tensor (differentiable); where scale[b] == 0 the result is exactly f(z)[b]
    (for finite noise: the fused kernels add 0 * e).
    """
    return _noisy("spherify_noise", z, (("scale", scale),), noise, seeds, stream, backend)[0]


def spherify_noise_pair(
    z: torch.Tensor,
    scale_big: torch.Tensor | float,
    scale_small: torch.Tensor | float,
    *,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    stream: int = 0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(f(z) + scale_big*e), f(f(z) + scale_small*e)) with one shared e, from one read of z (the training step)."""
    big, small = _noisy(
        "spherify_noise_pair", z, (("scale_big", scale_big), ("scale_small", scale_small)), noise, seeds, stream,
        backend,
    )
    return big, small
