"""Sweep the Triton AdaLN backward's launch configs on a GPU (ops.gated_residual_adaln's backward).

    python -m benchmarks.tune_adaln [--shapes 16x1024x1024 64x1024x768 ...]

A config is (rows per loop step, warps, programs per SM, pipeline stages): each program walks its rows of one
sample a step at a time and keeps the column sums in registers, the batch is spread over about ``programs per
SM`` x the SM count programs (``ops/adaln.py`` ``_bwd_row_block`` and ``_chunking``), and with 2 or 3 stages a
program loads its next rows while it computes the current one (``BWD_STAGES``, which the op tunes per shape).
Each config replaces the op's own for its run (the first row is the op's, stages tuned as in a real call), is
checked against the float32 reference (the gradients of every input, within the benchmarks' 2**-6), then timed
as ``bench_adaln.py`` times the backward; GB/s counts the same bytes. One that does not compile or launch is
reported, not fatal. Prints one markdown table per shape. On CPU (smoke): a tiny shape, the op's config and one
other in the interpreter, so the script cannot rot.
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

from benchmarks.bench_adaln import DTYPE, _adaln_inputs, adaln_bwd_bytes  # noqa: E402
from benchmarks.harness import DEVICE, cuda_time_ms, gate, pick, sweep_row  # noqa: E402
from sphere_fast.ops._util import next_pow2  # noqa: E402

adaln = importlib.import_module("sphere_fast.ops.adaln")

Config = tuple[int, int, int, int | None]  # rows per step, warps, programs per SM, stages (None: the op's tuning)
# Training shapes first (Sphere-L at batch 16, 1024 tokens), then the model widths at 64k rows and small batches.
SHAPES = pick(real=[(16, 1024, 1024), (64, 1024, 768), (64, 1024, 1152), (8, 256, 1024), (1, 1024, 1024)],
              smoke=[(1, 7, 96)])
OTHER_CONFIGS: tuple[Config, ...] = pick(
    real=(*((1, 8, 4, stages) for stages in (1, 2, 3)), (1, 4, 4, 2), (1, 16, 4, 2), (1, 8, 8, 2), (1, 8, 16, 1),
          (1, 8, 16, 2), (2, 8, 4, 1), (2, 16, 4, 2), (4, 16, 16, 2)),
    smoke=((2, 1, 4, 1),),
)


def sm_count() -> int:
    return torch.cuda.get_device_properties(DEVICE).multi_processor_count if DEVICE.type == "cuda" else 1


def own_config(width: int) -> Config:
    """The op's config for ``width``, in the same terms (programs per SM from its program target)."""
    rows, _, warps = adaln._bwd_row_block(width)
    return rows, warps, max(1, adaln._n_programs_target(DEVICE) // sm_count()), None


def backward(inputs: Sequence[torch.Tensor], backend: str | None) -> tuple[torch.Tensor, ...]:
    """The gradients of every input for fixed upstream gradients (seeded), on ``backend`` (None: the float32
    eager reference)."""
    if backend is None:
        res, y = adaln.gated_residual_adaln_reference(*inputs)
    else:
        res, y = adaln.gated_residual_adaln(*inputs, backend=backend)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    grads = [torch.randn(t.shape, generator=g, device=DEVICE).to(t.dtype) for t in (res, y)]
    return torch.autograd.grad((res, y), inputs, grads)


def time_config(shape: tuple[int, int, int], config: Config) -> float:
    """Milliseconds of the backward with ``config`` after its gate; raises if the gate fails or it does not run."""
    rows, warps, per_sm, stages = config
    inputs = _adaln_inputs(*shape, requires_grad=True)
    reference = [t.detach().float().requires_grad_() for t in inputs]
    block = mock.patch.object(adaln, "_bwd_row_block", lambda width: (rows, next_pow2(width), warps))
    programs = mock.patch.object(adaln, "_n_programs_target", lambda device: per_sm * sm_count())
    candidates = adaln._bwd_stage_candidates() if stages is None else (stages,)
    with block, programs, mock.patch.object(adaln, "_bwd_stage_candidates", lambda: candidates):
        gate(backward(inputs, "triton"), backward(reference, None), f"adaln backward {config}", DTYPE)
        res, y = adaln.gated_residual_adaln(*inputs, backend="triton")
        grads = (torch.randn_like(res), torch.randn_like(y))
        return cuda_time_ms(lambda: torch.autograd.grad((res, y), inputs, grads, retain_graph=True))


def sweep(shape: tuple[int, int, int]) -> list[str]:
    """Markdown rows: the op's config, then the others."""
    moved = adaln_bwd_bytes(*shape, DTYPE.itemsize)
    own = own_config(shape[2])
    return [sweep_row(f"{config[:3] + ('tuned',)} (the op)" if config == own else str(config),
                      functools.partial(time_config, shape, config),
                      lambda ms: moved / (ms * 1e-3) / 1e9)
            for config in [own, *(c for c in OTHER_CONFIGS if c != own)]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["x".join(map(str, s)) for s in SHAPES],
                        help="B x N x W (default: %(default)s)")
    args = parser.parse_args(argv)
    for text in args.shapes:
        shape = tuple(int(v) for v in text.split("x"))
        print(f"\n### AdaLN backward (gated residual), {DTYPE}, "
              f"B {shape[0]}, N {shape[1]}, W {shape[2]}\n")
        print("| config (rows per step, warps, programs per SM, stages) | ms | GB/s | gate |")
        print("|---|---|---|---|")
        for row in sweep(shape):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
