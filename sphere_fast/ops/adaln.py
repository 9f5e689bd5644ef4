"""AdaLN ops: RMSNorm -> (1 + scale) -> + shift, and the gated residual that precedes it.

Layers: the eager references (the executable spec), input checks, launchers for the Triton kernels
(``kernels/adaln.py``) and the C++/CUDA extension (``csrc/adaln_*``), and the ``torch.library`` ops (with
fake kernels; autograd in the ``torch.autograd.Function``s around them, see ``ops/_library.py``) through
which every non-eager backend runs, so torch.compile sees one opaque node per call.

Dtypes: x, branch, gate, weight, shift and scale must share one floating dtype (a mismatch raises
TypeError); math is fp32 inside every kernel, outputs have x's dtype. float64 runs on the eager reference only
(``auto`` takes it there), in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sphere_fast._once import once_per_key
from sphere_fast.backend import EAGER_DTYPES, emulate_bf16, resolve_for_dtype, triton_interpreting
from sphere_fast.ops._library import call_op, define_op, differentiable_by, first_order_only, grad_only_from
from sphere_fast.ops._tuning import launch_tuned
from sphere_fast.ops._util import ceil_div, kernel_runner, next_pow2, on_input_device, unit_last_stride

AUTO_ORDER = ("triton", "cpp", "eager")
EPS_RANGE = (torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max)


def adaln_modulate_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """RMSNorm(x; weight) * (1 + scale) + shift (each of weight, shift, scale optional), computed in float32
    (float64 in float64) and returned in x's dtype."""
    math_dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(math_dtype)
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(math_dtype)
    if scale is not None:
        y = y * (1 + scale.to(math_dtype))
    if shift is not None:
        y = y + shift.to(math_dtype)
    return y.to(x.dtype)


def gated_residual_adaln_reference(
    x: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor | None,
    weight: torch.Tensor | None,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(res, y): res = x + gate * branch (gate None means 1) in the inputs' promoted dtype, and
    y = adaln_modulate_reference(res, weight, shift, scale, eps) in res's dtype."""
    res = x + branch if gate is None else x + gate * branch
    return res, adaln_modulate_reference(res, weight, shift, scale, eps)


# ----------------------------------------------------------------------------------------------- checks


def _check_inputs(
    x: object,
    branch: object,
    gate: object,
    weight: object,
    shift: object,
    scale: object,
    eps: object,
    *,
    gated: bool,
) -> None:
    """Raise TypeError / ValueError naming the first bad argument; nothing has run yet."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 3:
        raise ValueError(f"x must have shape [B, S, D], got shape {tuple(x.shape)}")
    if x.dtype not in EAGER_DTYPES:
        raise TypeError(f"x must be float32, bfloat16, float16 or float64 (eager only), got {x.dtype}")
    B, S, D = x.shape
    if D == 0:
        raise ValueError("x must have a non-empty last dim D, got D=0")
    modulation = ((B, 1, D), (B, S, D))
    specs = [("weight", weight, ((D,),)), ("shift", shift, modulation), ("scale", scale, modulation)]
    if gated:
        specs += [("branch", branch, ((B, S, D),)), ("gate", gate, modulation)]
    for name, t, shapes in specs:
        if t is None:
            if name == "branch":
                raise TypeError("branch must be a torch.Tensor, got None")
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all inputs must share one device")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
        if not any(tuple(t.shape) == shape for shape in shapes):  # not `in`, which misses symbolic sizes in dynamo
            raise ValueError(f"{name} must have shape {' or '.join(map(str, shapes))}, got {tuple(t.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a finite positive number, got {eps!r}")
    # comparisons, not math.isfinite: they also take dynamo's symbolic floats, and refuse NaN and ints past float's.
    # The kernels take eps as a float32: past its normal range it would be 0 or inf there.
    if not EPS_RANGE[0] <= eps <= EPS_RANGE[1]:
        raise ValueError(
            f"eps must be a finite positive number in float32's normal range [{EPS_RANGE[0]:.3g}, {EPS_RANGE[1]:.3g}],"
            f" got {eps!r}"
        )


# --------------------------------------------------------------------------------------------- launchers


def _rows(t: Tensor | None) -> Tensor | None:
    """Kernels address [B, S, D] by (stride_b, stride_s) and need a unit last stride."""
    return None if t is None else unit_last_stride(t)


def _bs_strides(t: Tensor | None) -> tuple[int, int]:
    # A (B, 1, D) modulation is broadcast over tokens by giving it a zero token stride.
    if t is None:
        return 0, 0
    return t.stride(0), (0 if t.shape[1] == 1 else t.stride(1))


def _is_token(t: Tensor | None, S: int) -> bool:
    return t is not None and t.shape[1] == S and S > 1


def _row_block(D: int) -> tuple[int, int, int]:
    """(rows per program, padded width, warps) of the forward: about 4k elements per program."""
    block_d = next_pow2(D)
    block_m = max(1, min(64, 4096 // block_d))
    num_warps = 4 if block_d * block_m <= 4096 and block_d <= 1024 else 8
    return block_m, block_d, num_warps


def _fwd_candidates(D: int, itemsize: int, interpret: bool) -> tuple[tuple[int, int], ...]:
    """(rows per program, warps) the forward may launch with, the default (``_row_block``) first, then one row
    per program: a small batch gets more programs (1 x 256 rows of width 1024 are 64 programs of 4 rows for 132
    SMs), a large one torch.compile's way of running a row-wise reduction. The one-row tile is offered only where
    it still gives each thread a whole 16-byte vector of the row (widths from 1024 / 512 columns padded, in 16- /
    32-bit types): there a row's columns spread over the threads and warps as in the default, so its sum of
    squares (and every output bit) does not change (test_sm90_adaln compares the layouts; at D = 64 and 512 in
    bf16 they differ). On a GPU the tuning checks the bits as well and times both per shape. Each candidate is one
    more kernel to compile on a machine's first run (in the sampler's compile pass), so there are two. The
    interpreter runs the default only."""
    block_m, block_d, num_warps = _row_block(D)
    if interpret or block_m == 1 or block_d // (32 * num_warps) < 16 // itemsize:
        return ((block_m, num_warps),)
    return (block_m, num_warps), (1, num_warps)


def _bwd_row_block(D: int) -> tuple[int, int, int]:
    """(rows per loop step, padded width, warps) of the backward: one row per step over up to 8 warps; widths
    up to 128 take several rows on one warp (no cross-warp sums at all).

    Several rows over several warps sum the column accumulators across warps every step: the sm_90a SASS of a
    [2, 1024] step has 24 barriers and ~150 shared-memory ops, a [1, 1024] step over 8 warps 3 and 4. On an
    H200 (2026-11-29) the [2, 1024] tile ran at 431 GB/s at D = 768; [1, 2048] at D = 1152 at 1258 GB/s."""
    block_d = next_pow2(D)
    num_warps = max(1, min(8, block_d // 128))
    return (1 if num_warps > 1 else 512 // block_d), block_d, num_warps


# Pipeline stages of the backward's row loop, the default first. With 2 or 3 a program loads its next rows while
# it computes the current one: the same sums in the same order, so on a GPU each call shape takes the fastest
# (ops/_tuning.py times them once and checks that the bits agree). Which one wins at which shape is not recorded:
# the choices stay on the machine that tuned them.
BWD_STAGES = (1, 2, 3)


def _bwd_stage_candidates() -> tuple[int, ...]:
    return BWD_STAGES[:1] if triton_interpreting() else BWD_STAGES


def _n_programs_target(device: torch.device) -> int:
    """How many programs the backward spreads a batch over: enough to fill the GPU a few times."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter / CPU: few programs keep the tests fast


def _chunking(B: int, S: int, block_m: int, device: torch.device) -> tuple[int, int]:
    chunks = max(1, min(ceil_div(_n_programs_target(device), B), ceil_div(S, block_m)))
    rows_per_prog = ceil_div(S, chunks)
    rows_per_prog = ceil_div(rows_per_prog, block_m) * block_m
    return ceil_div(S, rows_per_prog), rows_per_prog


@on_input_device
def _triton_fwd(
    x: Tensor, branch: Tensor | None, gate: Tensor | None, weight: Tensor | None,
    shift: Tensor | None, scale: Tensor | None, eps: float,
) -> tuple[Tensor | None, Tensor, Tensor]:
    from sphere_fast.kernels.adaln import adaln_fwd_kernel

    x, branch, gate, shift, scale = (_rows(t) for t in (x, branch, gate, shift, scale))
    weight = None if weight is None else weight.contiguous()
    B, S, D = x.shape
    y = torch.empty((B, S, D), dtype=x.dtype, device=x.device)
    res = torch.empty_like(y) if branch is not None else None
    rstd = torch.empty((B, S), dtype=torch.float32, device=x.device)
    M = B * S
    if M == 0:
        return res, y, rstd
    block_d = next_pow2(D)
    dummy = y  # pointer for absent inputs; never read (its HAS_* flag is off)
    flags = dict(HAS_BRANCH=branch is not None, HAS_GATE=gate is not None, HAS_W=weight is not None,
                 HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None)

    def launch(config: tuple[int, int], compile_only: bool = False) -> None:
        block_m, num_warps = config
        kernel_runner(adaln_fwd_kernel, (ceil_div(M, block_m),), compile_only)(
            x, _or(branch, dummy), _or(gate, dummy), _or(weight, dummy), _or(shift, dummy), _or(scale, dummy),
            _or(res, dummy), y, rstd,
            M, S, D, eps,
            *_bs_strides(x), *_bs_strides(branch), *_bs_strides(gate), *_bs_strides(shift), *_bs_strides(scale),
            **flags, BLOCK_M=block_m, BLOCK_D=block_d, EMULATE_BF16=emulate_bf16(x.dtype), num_warps=num_warps,
        )

    # the program count (rows, in powers of two) and how the modulations are read decide the fastest config
    per_token = tuple(_is_token(t, S) for t in (gate, shift, scale))
    key = ("adaln fwd", x.device, x.dtype, D, tuple(flags.values()), per_token, next_pow2(M))
    outputs = [t for t in (res, y, rstd) if t is not None]
    launch_tuned(key, _fwd_candidates(D, x.element_size(), triton_interpreting()), launch, outputs)
    return res, y, rstd


def _or(t: Tensor | None, other: Tensor) -> Tensor:
    return other if t is None else t


@on_input_device
def _triton_bwd(
    dy: Tensor, dres: Tensor | None, res: Tensor, branch: Tensor | None, gate: Tensor | None,
    weight: Tensor | None, shift: Tensor | None, scale: Tensor | None, rstd: Tensor,
) -> tuple[Tensor | None, ...]:
    from sphere_fast.kernels.adaln import adaln_bwd_kernel

    B, S, D = res.shape
    if B * S == 0:
        # contiguous, as the fake says: a modulation [B, 1, D] keeps elements (and zeros_like its strides) at S = 0
        return tuple(None if t is None else torch.zeros(t.shape, dtype=t.dtype, device=t.device)
                     for t in (res, branch, gate, weight, shift, scale))
    dy, res, rstd = dy.contiguous(), res.contiguous(), rstd.contiguous()
    dres = None if dres is None else dres.contiguous()
    branch, gate, scale = _rows(branch), _rows(gate), _rows(scale)
    weight = None if weight is None else weight.contiguous()
    block_m, block_d, num_warps = _bwd_row_block(D)
    chunks, rows_per_prog = _chunking(B, S, block_m, res.device)
    gate_tok, shift_tok, scale_tok = _is_token(gate, S), _is_token(shift, S), _is_token(scale, S)

    dx = torch.empty((B, S, D), dtype=res.dtype, device=res.device)
    dbranch = torch.empty_like(dx) if branch is not None else None

    def partial(t: Tensor | None, tok: bool) -> Tensor | None:
        return torch.empty((B * chunks, D), dtype=torch.float32, device=res.device) if t is not None and not tok else None

    def per_token(t: Tensor | None, tok: bool) -> Tensor | None:
        return torch.empty_like(dx) if t is not None and tok else None

    pw = partial(weight, False)
    pg, psh, psc = partial(gate, gate_tok), partial(shift, shift_tok), partial(scale, scale_tok)
    dg, dsh, dsc = per_token(gate, gate_tok), per_token(shift, shift_tok), per_token(scale, scale_tok)
    dummy = dx  # the pointer of an absent input: never read
    flags = dict(
        HAS_DRES=dres is not None, HAS_BRANCH=branch is not None, HAS_GATE=gate is not None,
        HAS_W=weight is not None, HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None,
        GATE_TOK=gate_tok, SHIFT_TOK=shift_tok, SCALE_TOK=scale_tok,
    )

    def launch(stages: int, compile_only: bool = False) -> None:
        kernel_runner(adaln_bwd_kernel, (B, chunks), compile_only)(
            dy, _or(dres, dummy), res, _or(branch, dummy), _or(gate, dummy), _or(weight, dummy), _or(scale, dummy),
            rstd, dx, _or(dbranch, dummy), _or(dg, dummy), _or(dsh, dummy), _or(dsc, dummy),
            _or(pw, rstd), _or(pg, rstd), _or(psh, rstd), _or(psc, rstd),
            S, D, rows_per_prog, chunks,
            *_bs_strides(branch), *_bs_strides(gate), *_bs_strides(scale),
            **flags, BLOCK_M=block_m, BLOCK_D=block_d, STAGES=stages, EMULATE_BF16=emulate_bf16(res.dtype),
            num_warps=num_warps,
        )

    # the loop's length and the program count decide what pipelining gains: rows per program and programs
    # (in powers of two) are part of the key
    key = ("adaln bwd", res.device, res.dtype, D, tuple(flags.values()), rows_per_prog, next_pow2(B * chunks))
    outputs = [t for t in (dx, dbranch, dg, dsh, dsc, pw, pg, psh, psc) if t is not None]
    launch_tuned(key, _bwd_stage_candidates(), launch, outputs)

    dweight, dg_s, dsh_s, dsc_s = _finish_bwd(pw, pg, psh, psc, B, chunks, D, dummy)
    # a per-sample modulation's grad is summed in the second stage, a per-token one is complete already
    dg, dsh, dsc = (tok if summed is None else summed for tok, summed in ((dg, dg_s), (dsh, dsh_s), (dsc, dsc_s)))
    return dx, dbranch, dg, dweight, dsh, dsc


# The second stage's tile: rows of partials a step, columns a program. The dweight program walks all B*chunks
# rows (about 4 programs per SM in all): 64 rows a step keep that walk to a few steps of L2 latency.
FINISH_BLOCK_R, FINISH_BLOCK_D = 64, 32


def _finish_bwd(
    pw: Tensor | None, pg: Tensor | None, psh: Tensor | None, psc: Tensor | None, B: int, chunks: int, D: int,
    like: Tensor,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The backward's second stage: the B*chunks partial rows of each column sum -> dweight [D] and the
    per-sample dgate, dshift, dscale [B, 1, D], in ``like``'s dtype, in one launch (eight torch ops before: a sum
    and a cast each); None where its partial is None."""
    from sphere_fast.kernels.adaln import adaln_bwd_finish_kernel

    def grad(partial: Tensor | None, *shape: int) -> Tensor | None:
        return None if partial is None else torch.empty(shape, dtype=like.dtype, device=like.device)

    dweight = grad(pw, D)
    dg_s, dsh_s, dsc_s = grad(pg, B, 1, D), grad(psh, B, 1, D), grad(psc, B, 1, D)
    sample_programs = B if any(t is not None for t in (pg, psh, psc)) else 0
    programs = sample_programs + (pw is not None)
    if programs:
        some = next(t for t in (pw, pg, psh, psc) if t is not None)
        kernel_runner(adaln_bwd_finish_kernel, (programs, ceil_div(D, FINISH_BLOCK_D)))(
            _or(pw, some), _or(pg, some), _or(psh, some), _or(psc, some),
            _or(dweight, like), _or(dg_s, like), _or(dsh_s, like), _or(dsc_s, like),
            B, chunks, D, sample_programs,
            HAS_W=pw is not None, HAS_GATE=pg is not None, HAS_SHIFT=psh is not None, HAS_SCALE=psc is not None,
            BLOCK_R=FINISH_BLOCK_R, BLOCK_D=FINISH_BLOCK_D, EMULATE_BF16=emulate_bf16(like.dtype), num_warps=4,
        )
    return dweight, dg_s, dsh_s, dsc_s


@once_per_key
def _cpp_ext():
    from sphere_fast._extension import load_ops

    return load_ops("sphere_fast_adaln_ext", ("adaln_binding.cpp", "adaln_cpu.cpp"), ("adaln_cuda.cu",),
                    "sphere_fast_adaln", {"fwd": _fwd_fake, "bwd": _bwd_fake})


# The widest row the C++ backend's CUDA kernels take (csrc/adaln_math.h kAdalnCudaMaxWidth); its CPU kernels and
# the Triton ones take any width.
CPP_CUDA_MAX_WIDTH = 4096


def _forward(
    backend: str, x: Tensor, branch: Tensor | None, gate: Tensor | None, weight: Tensor | None,
    shift: Tensor | None, scale: Tensor | None, eps: float,
) -> tuple[Tensor | None, Tensor, Tensor]:
    if backend == "triton":
        return _triton_fwd(x, branch, gate, weight, shift, scale, eps)
    if backend == "cpp":
        if x.is_cuda and x.shape[-1] > CPP_CUDA_MAX_WIDTH:
            raise ValueError(f"x's last dim D must be at most {CPP_CUDA_MAX_WIDTH} for the cpp backend on CUDA, got "
                             f"{x.shape[-1]}; the triton backend takes any D")
        x, branch, gate, shift, scale = (_rows(t) for t in (x, branch, gate, shift, scale))
        return _cpp_ext().fwd(x, branch, gate, weight, shift, scale, eps)  # res is empty without a branch
    raise ValueError(f"no fused adaln kernels for backend {backend!r}")


def _backward(backend: str, *args: Tensor | None) -> tuple[Tensor | None, ...]:
    if backend == "triton":
        return _triton_bwd(*args)
    if backend == "cpp":
        dy, dres, res, branch, gate, weight, shift, scale, rstd = args
        dy, dres, res = (None if t is None else t.contiguous() for t in (dy, dres, res))
        branch, gate, shift, scale = (_rows(t) for t in (branch, gate, shift, scale))
        return _cpp_ext().bwd(dy, dres, res, branch, gate, weight, shift, scale, rstd)  # empty where absent
    raise ValueError(f"no fused adaln kernels for backend {backend!r}")


# -------------------------------------------------------------------------------------- ops and autograd


# Fake kernels of both the sphere_fast ops and the C++ ones under them (which take no backend argument).
def _fwd_fake(x, branch, gate, weight, shift, scale, eps, backend=None):
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    res = x.new_empty(0) if branch is None else torch.empty_like(y)  # the C++ op's res is empty without a branch
    return res, y, x.new_empty(x.shape[:2], dtype=torch.float32)


def _modulate_fake(x, weight, shift, scale, eps, backend):
    return _fwd_fake(x, None, None, weight, shift, scale, eps)[1:]


def _bwd_fake(dy, dres, res, branch, gate, weight, shift, scale, rstd, backend=None):
    # contiguous grads, as the kernels give (without rows too)
    def like(t: Tensor | None) -> Tensor:
        return res.new_empty(0) if t is None else torch.empty(t.shape, dtype=t.dtype, device=t.device)

    return like(res), like(branch), like(gate), like(weight), like(shift), like(scale)


@define_op("adaln_modulate_fwd", fake=_modulate_fake, own_autograd=True)
def _modulate_fwd(
    x: Tensor, weight: Tensor | None, shift: Tensor | None, scale: Tensor | None, eps: float, backend: str
) -> tuple[Tensor, Tensor]:
    _, y, rstd = _forward(backend, x, None, None, weight, shift, scale, eps)
    return y, rstd


@define_op("gated_residual_adaln_fwd", fake=_fwd_fake, own_autograd=True)
def _gated_fwd(
    x: Tensor, branch: Tensor, gate: Tensor | None, weight: Tensor | None, shift: Tensor | None,
    scale: Tensor | None, eps: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    res, y, rstd = _forward(backend, x, branch, gate, weight, shift, scale, eps)
    # res is a Tensor, as a branch is given; the annotation is the op's schema, so it stays
    return res, y, rstd  # type: ignore[return-value]


@define_op("adaln_bwd", fake=_bwd_fake)
def _adaln_bwd(
    dy: Tensor, dres: Tensor | None, res: Tensor, branch: Tensor | None, gate: Tensor | None,
    weight: Tensor | None, shift: Tensor | None, scale: Tensor | None, rstd: Tensor, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _backward(backend, dy, dres, res, branch, gate, weight, shift, scale, rstd)
    # ops cannot return None: an absent input gets an empty gradient. Six of them (the annotation is the schema).
    return tuple(res.new_empty(0) if g is None else g for g in grads)  # type: ignore[return-value]


def _grad(g: Tensor, t: Tensor | None) -> Tensor | None:
    return None if t is None else g


class _ModulateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, shift, scale, eps: float, backend: str) -> tuple[Tensor, Tensor]:
        y, rstd = call_op(_modulate_fwd, x, weight, shift, scale, eps, backend)
        ctx.save_for_backward(x, weight, shift, scale, rstd)
        ctx.mark_non_differentiable(rstd)
        ctx.backend = backend
        return y, rstd

    @staticmethod
    @first_order_only("adaln_modulate")
    def backward(ctx, dy: Tensor, _drstd: Tensor):
        x, weight, shift, scale, rstd = ctx.saved_tensors
        dx, _, _, dw, dsh, dsc = _adaln_bwd(dy, None, x, None, None, weight, shift, scale, rstd, ctx.backend)
        return dx, _grad(dw, weight), _grad(dsh, shift), _grad(dsc, scale), None, None


class _GatedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, branch, gate, weight, shift, scale, eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
        res, y, rstd = call_op(_gated_fwd, x, branch, gate, weight, shift, scale, eps, backend)
        # without a gate dbranch is dx and branch is not read: not kept (an unconditional model's every block)
        ctx.save_for_backward(res, None if gate is None else branch, gate, weight, shift, scale, rstd)
        ctx.mark_non_differentiable(rstd)
        ctx.backend = backend
        return res, y, rstd

    @staticmethod
    @first_order_only("gated_residual_adaln")
    def backward(ctx, dres: Tensor, dy: Tensor, _drstd: Tensor):
        res, branch, gate, weight, shift, scale, rstd = ctx.saved_tensors
        dx, db, dg, dw, dsh, dsc = _adaln_bwd(dy, dres, res, branch, gate, weight, shift, scale, rstd, ctx.backend)
        if gate is None:
            db = dx
        return dx, db, _grad(dg, gate), _grad(dw, weight), _grad(dsh, shift), _grad(dsc, scale), None, None


differentiable_by(_modulate_fwd, _ModulateFunction)
differentiable_by(_gated_fwd, _GatedFunction)


# ------------------------------------------------------------------------------------------ public ops


def adaln_modulate(
    x: Tensor,
    weight: Tensor | None = None,
    shift: Tensor | None = None,
    scale: Tensor | None = None,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> Tensor:
    """RMSNorm(x; weight) * (1 + scale) + shift for x [B, S, D]; shift/scale (B, 1, D), (B, S, D) or None.

    Without shift and scale (a plain RMSNorm) x may have any number of leading dims.
    """
    if isinstance(x, Tensor) and x.ndim not in (0, 3) and shift is None and scale is None:
        # The kernels see [1, rows, D]; a view when x allows it. rows explicit: with D = 0 reshape cannot infer a -1.
        rows = x.shape[:-1].numel()
        return adaln_modulate(x.reshape(1, rows, x.shape[-1]), weight, None, None, eps, backend=backend).view(x.shape)
    _check_inputs(x, None, None, weight, shift, scale, eps, gated=False)
    name = resolve_for_dtype("adaln_modulate", "x", x, backend, AUTO_ORDER)
    if name == "eager":
        return adaln_modulate_reference(x, weight, shift, scale, eps)
    return call_op(_modulate_fwd, x, weight, shift, scale, float(eps), name)[0]


def gated_residual_adaln(
    x: Tensor,
    branch: Tensor,
    gate: Tensor | None,
    weight: Tensor | None,
    shift: Tensor | None,
    scale: Tensor | None,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(res, y) with res = x + gate * branch (gate None means 1) and y = adaln_modulate(res, ...), one pass."""
    _check_inputs(x, branch, gate, weight, shift, scale, eps, gated=True)
    name = resolve_for_dtype("gated_residual_adaln", "x", x, backend, AUTO_ORDER)
    if name == "eager":
        return gated_residual_adaln_reference(x, branch, gate, weight, shift, scale, eps)
    res, y, _ = call_op(_gated_fwd, x, branch, gate, weight, shift, scale, float(eps), name)
    return grad_only_from(res, x, branch, gate), y
