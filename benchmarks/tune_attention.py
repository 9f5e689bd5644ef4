"""Sweep the Triton attention's launch configs on a GPU: each variant checked against the eager reference,
then timed (forward, and forward + backward) two ways: impl triton (the RoPE pass, then the kernel) and the
kernel without any RoPE (a bound: what the pass costs).

    python -m benchmarks.tune_attention [--shape 16 16 1024 64] [--head-dims 64 72] [--only fwd]

Each variant replaces sphere_fast.ops.attention._candidates (and, for the chunk B rows, _head_chunks) with
that one config for its run, so the op runs exactly as the model calls it, untuned, with only the tile sizes,
warps and pipeline stages (or the width of the head dim's second chunk) changed. The variants are the op's own
tuning candidates (what its runtime tuning picks from), then ones that change the block a kernel sums over:
those change the result's rounding, so the op cannot pick them at run time, and a winner among them would
become the candidates' shared block by hand, with the numbers in benchmarks/NOTES.md. Then the new kernels:
the forward with TMA loads (TmaConfig, with and without warp specialization: not among the candidates until
measured), and the narrower chunk B. A variant that does not compile or launch (shared memory) is reported,
not fatal. Prints one markdown table.
On CPU (smoke): a tiny shape and one variant in the interpreter, so the script cannot rot.
"""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Callable, Sequence
from unittest import mock

import torch

if not torch.cuda.is_available():  # CPU smoke: the kernels run in Triton's interpreter (set before they load)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.bench_attention import BACKWARD_FLOPS, _flops, _inputs, split_qkv  # noqa: E402
from benchmarks.harness import SMOKE, cuda_time_ms, gate  # noqa: E402
attn = importlib.import_module("sphere_fast.ops.attention")

Config = attn.Config
# variants that change the summed block (fwd: BLOCK_N; dkdv: BLOCK_M; dq: BLOCK_N), beyond the op's candidates;
# the kernels a variant does not name keep the op's default config
FWD_VARIANTS: tuple[Config, ...] = ((128, 128, 8, 2), (128, 32, 4, 3))
BWD_VARIANTS: tuple[tuple[Config, Config], ...] = (((64, 64, 8, 2), (64, 64, 8, 2)),)  # (dkdv, dq)
# the forward with TMA loads, with and without warp specialization (not among the op's candidates until
# measured); all but the last keep the default's key block, so they should give its bits. Triton 3.6 splits
# the loop only at 4 warps (compiled for sm_90a, 8 warps gave no producer / consumer split).
TMA_FWD_VARIANTS: tuple[attn.TmaConfig, ...] = (
    attn.TmaConfig(128, 64, 4, 3, False), attn.TmaConfig(128, 64, 4, 3, True), attn.TmaConfig(64, 64, 4, 3, True),
    attn.TmaConfig(128, 128, 4, 2, True),
)
CHUNK_B_WIDTHS = (32,)  # narrower than the op's chunk B (= chunk A): D = 72 as 64 + 32 does 25% fewer MMA FLOPs


def configs_with(
    fwd: Config | attn.TmaConfig | None = None, bwd: tuple[Config, Config] | None = None
) -> Callable[..., dict]:
    """A stand-in for attention._candidates with one config per kernel: ``fwd`` and/or ``bwd`` (dkdv, dq)
    where given, else the op's default."""
    original = attn._candidates

    def candidates(head_dim: int, dtype: torch.dtype, interpret: bool | None = None) -> dict[str, tuple[Config, ...]]:
        chosen = {name: configs[0] for name, configs in original(head_dim, dtype, interpret).items()}
        if fwd is not None:
            chosen["fwd"] = fwd
        if bwd is not None:
            chosen["dkdv"], chosen["dq"] = bwd
        return {name: (config,) for name, config in chosen.items()}

    return candidates


# (label, with RoPE)
MODES = (("pass", True), ("none (bound)", False))


def chunks_with(chunk_b: int | None) -> Callable[[int], tuple[int, int, bool]]:
    """A stand-in for attention._head_chunks with chunk B ``chunk_b`` wide (where the head dim has a chunk B)."""
    original = attn._head_chunks

    def chunks(head_dim: int) -> tuple[int, int, bool]:
        da, db, has_b = original(head_dim)
        return (da, chunk_b, has_b) if has_b and chunk_b is not None else (da, db, has_b)

    return chunks


def time_variant(
    shape: Sequence[int], rope: bool, fwd: Config | attn.TmaConfig | None,
    bwd: tuple[Config, Config] | None,
    chunk_b: int | None = None,
) -> tuple:
    """(forward ms, forward + backward ms) of one variant after its correctness gate; raises if it fails."""
    qkv, q, k, v, table = _inputs(tuple(shape), requires_grad=True)  # the model's strided q, k, v views
    table = table if rope else None
    with mock.patch.object(attn, "_candidates", configs_with(fwd, bwd)), \
            mock.patch.object(attn, "_head_chunks", chunks_with(chunk_b)):
        out = attn.attention(q, k, v, table, impl="triton")
        ref_qkv = qkv.detach().float().requires_grad_()
        rq, rk, rv = split_qkv(ref_qkv, shape[1])
        ref = attn.attention_reference(rq, rk, rv, table)
        grad = torch.randn_like(out)
        (dqkv,) = torch.autograd.grad(out, qkv, grad)
        (ref_dqkv,) = torch.autograd.grad(ref, ref_qkv, grad.float())
        gate([out, dqkv], [ref, ref_dqkv], f"attention fwd {fwd} bwd {bwd}", qkv.dtype)
        fwd_ms = cuda_time_ms(lambda: attn.attention(q, k, v, table, impl="triton"))
        step_ms = cuda_time_ms(lambda: torch.autograd.grad(attn.attention(q, k, v, table, impl="triton"), qkv, grad))
    return fwd_ms, step_ms


Plan = tuple[str, Config | attn.TmaConfig | None, tuple[Config, Config] | None, int | None]


def plans_for(head_dim: int) -> list[Plan]:
    """(name, fwd, (dkdv, dq), chunk B width) of every variant at ``head_dim``: every forward variant (with the
    op's backward), then every backward variant (with the op's forward); then the TMA forward variants; last,
    where the head dim has a chunk B, the op's configs with the narrower chunk B widths (a 16-wide one
    miscompiled on an H200)."""
    if SMOKE:
        return [("interpreter", None, None, None)]
    own = attn._candidates(head_dim, torch.bfloat16, interpret=False)
    plans: list[Plan] = [(f"fwd {c}", c, None, None) for c in own["fwd"] + FWD_VARIANTS]
    defaults = (own["dkdv"][0], own["dq"][0])
    plans += [(f"dkdv {c}", None, (c, defaults[1]), None) for c in own["dkdv"]]
    plans += [(f"dq {c}", None, (defaults[0], c), None) for c in own["dq"][1:]]
    plans += [(f"dkdv {c[0]} dq {c[1]}", None, c, None) for c in BWD_VARIANTS]
    # new kernels last: a warp-specialized one that deadlocked would stop the sweep here
    plans += [(f"fwd {c}", c, None, None) for c in TMA_FWD_VARIANTS]
    da, db, has_b = attn._head_chunks(head_dim)
    plans += [(f"chunk B {w}", None, None, w) for w in CHUNK_B_WIDTHS if has_b and head_dim - da <= w < db]
    return plans


def sweep(shape: Sequence[int], only: str = "") -> list[str]:
    """Markdown rows of the variants of plans_for whose name starts with ``only``, each in every RoPE mode."""
    flops = _flops(tuple(shape))
    plans = [plan for plan in plans_for(shape[3]) if plan[0].startswith(only)]
    rows = []
    for name, fwd, bwd, chunk_b in plans:
        for label, rope in MODES:
            try:
                fwd_ms, step_ms = time_variant(shape, rope, fwd, bwd, chunk_b)
            except Exception as exc:  # a variant that does not fit or compile is a result, not a crash
                why = f"{type(exc).__name__}: {str(exc)[:80]}"
                rows.append(f"| {name} | {label} | – | – | – | {why} |")
                continue
            fwd_tf = flops / (fwd_ms * 1e-3) / 1e12
            step_tf = (1 + BACKWARD_FLOPS) * flops / (step_ms * 1e-3) / 1e12
            rows.append(f"| {name} | {label} | {fwd_ms:.3f} | {fwd_tf:.0f} | {step_ms:.3f} "
                        f"({step_tf:.0f} TFLOP/s) | ok |")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, metavar=("B", "H", "N", "D"),
                        default=(1, 2, 40, 64) if SMOKE else (16, 16, 1024, 64))
    parser.add_argument("--head-dims", type=int, nargs="+", help="sweep these head dims at the shape's B, H, N")
    parser.add_argument("--only", default="", metavar="PREFIX",
                        help='only the variants whose name starts with PREFIX ("fwd", "fwd TmaConfig", "dkdv", ...)')
    args = parser.parse_args(argv)
    b, h, n, d = args.shape
    for head_dim in args.head_dims or [d]:
        shape = (b, h, n, head_dim)
        print(f"\n### Triton attention configs, bf16, B={b} H={h} N={n} D={head_dim}\n")
        print("| variant | RoPE | fwd ms | fwd TFLOP/s | fwd + bwd ms | gate |")
        print("|---|---|---|---|---|---|")
        for row in sweep(shape, args.only):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
