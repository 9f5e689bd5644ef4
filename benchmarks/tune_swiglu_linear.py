"""Sweep the fused SwiGLU GEMM's launch configs on a GPU (ops.swiglu_linear), against what the model runs
without it: cuBLAS on the padded w12, then the SwiGLU kernel.

    python -m benchmarks.tune_swiglu_linear [--models L XL] [--tokens 2048 131072]

Each config replaces sphere_fast.ops.swiglu_linear._candidates for its run, so the op runs as the model calls
it, untuned. The configs are the op's own candidates (what its runtime tuning picks from), then others with
the same K tile (they should give the same bits, so a winner can join the candidates as it is), then some with
another K tile (other rounding: a winner there would replace the candidates' shared K tile by hand, with the
numbers in benchmarks/NOTES.md), then warp-specialized ones (not candidates until one has run on a GPU). Each
is checked against the float32 reference before it is timed; one that does not compile or launch (shared
memory) is reported, not fatal. Prints one markdown table per shape.
On CPU (smoke): a tiny shape and the interpreter's config, so the script cannot rot.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
from collections.abc import Sequence
from unittest import mock

import torch

if not torch.cuda.is_available():  # CPU smoke: the kernels run in Triton's interpreter (set before they load)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.bench_linear import MLP_WIDTHS, gate_mlp_up, mlp_layer, mlp_up_flops, mlp_up_runs  # noqa: E402
from benchmarks.harness import SMOKE, cuda_time_ms, sweep_row  # noqa: E402
from sphere_fast.nn.layers import SwiGLU  # noqa: E402

swl = importlib.import_module("sphere_fast.ops.swiglu_linear")
GemmConfig = swl.GemmConfig

# the op's K tile (64), beyond its candidates: other stages and tiles
SAME_K_TILE = (
    GemmConfig(128, 64, 64, 4, 3, False), GemmConfig(128, 64, 64, 4, 5, False), GemmConfig(128, 128, 64, 8, 4, False),
    GemmConfig(64, 128, 64, 4, 4, False), GemmConfig(256, 64, 64, 8, 3, False),
)
OTHER_K_TILE = (GemmConfig(128, 64, 128, 4, 3, False), GemmConfig(128, 128, 32, 8, 5, False))
# warp specialized, last: a deadlock would stop the sweep there. Triton 3.6 splits the loop into producer and
# consumer warps at 4 warps, not at 8 (compiled for sm_90a: no USETMAXREG at 8).
WARP_SPECIALIZED = (GemmConfig(128, 64, 64, 4, 4, True), GemmConfig(128, 64, 64, 4, 3, True))


def configs() -> list[GemmConfig]:
    if SMOKE:
        return list(swl.INTERPRETER_CANDIDATES)
    return [*swl.HOPPER_CANDIDATES, *SAME_K_TILE, *OTHER_K_TILE, *WARP_SPECIALIZED]


def time_config(layer: SwiGLU, x: torch.Tensor, config: GemmConfig | None) -> float:
    """Milliseconds of the MLP's first half after its correctness gate: the fused op with ``config``, or (None)
    cuBLAS on the padded w12 and the SwiGLU kernel. Raises if the gate fails or the config does not run."""
    run = mlp_up_runs(layer, x)["cublas_swiglu" if config is None else "triton"]
    with mock.patch.object(swl, "_candidates", lambda: (config,)), torch.no_grad():
        gate_mlp_up(run(), layer, x, str(config))
        return cuda_time_ms(run)


def sweep(width: int, tokens: int) -> list[str]:
    """Markdown rows: the unfused baseline, then every config."""
    layer, x = mlp_layer(width, tokens)
    flops = mlp_up_flops(layer, tokens)
    return [sweep_row("cuBLAS + SwiGLU kernel" if config is None else str(tuple(config)),
                      functools.partial(time_config, layer, x, config), lambda ms: flops / (ms * 1e-3) / 1e12)
            for config in [None, *configs()]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MLP_WIDTHS), default=list(MLP_WIDTHS)[:1])
    parser.add_argument("--tokens", type=int, nargs="+", default=[64] if SMOKE else [2048, 131072])
    args = parser.parse_args(argv)
    for model in args.models:
        width = MLP_WIDTHS[model]
        for tokens in args.tokens:
            print(f"\n### Fused SwiGLU GEMM, bf16, {model} (K = {width}), {tokens} tokens\n")
            print("| config (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, warp specialized) | ms | TFLOP/s | gate |")
            print("|---|---|---|---|")
            for row in sweep(width, tokens):
                print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
