"""The op benchmarks' grids at real sizes, in one place: the bench files time these cases (smoke mode has tiny ones
of its own), and goals.py counts how many of a goal's cases a results file measured. Dtypes are the rows' labels
(harness.dtype_name). No torch import: the README's check reads this through goals.py."""

from __future__ import annotations

import itertools

SPHERIFY_OPS = ("spherify_fwd", "spherify_bwd", "spherify_noise_fwd", "spherify_noise_bwd", "spherify_noise_pair_fwd",
                "spherify_noise_pair_bwd")
SPHERIFY_SHAPES = [(1, 2048), (64, 2048), (256, 8192), (256, 32768), (64, 131072)]  # (B, L)
SPHERIFY_DTYPES = ("bf16", "fp32")

# AdaLN and SwiGLU at a block's activations: (B, N, W)
BLOCK_SHAPES = list(itertools.product((1, 8, 64), (256, 1024), (768, 1024, 1152)))
BLOCK_DTYPE = "bf16"
ADALN_OPS = ("adaln_modulate_fwd", "adaln_modulate_bwd", "gated_residual_adaln_fwd", "gated_residual_adaln_bwd")

ATTENTION_HEADS = 16
# (B, H, N, D) with B*H in {16, 256, 1024}
ATTENTION_SHAPES = [(bh // ATTENTION_HEADS, ATTENTION_HEADS, n, d)
                    for bh, n, d in itertools.product((16, 256, 1024), (256, 1024), (64, 72))]
ATTENTION_DTYPE = "bf16"
# the whole op (RoPE pass included), then the attention alone on rotated q and k (bench_attention.py)
ATTENTION_OPS = ("attention_fwd", "attention_bwd", "attention_kernel_fwd", "attention_kernel_bwd")

# the sampler's grid (issue 6)
SAMPLER_MODELS = ("sphere-l-imagenet", "sphere-xl-imagenet")
SAMPLER_BATCHES = (1, 8, 64, 256)
SAMPLER_STEPS = (1, 2, 4)
SAMPLER_CFGS = (1.0, 1.4)  # no CFG, and combo CFG at the ImageNet scale
SAMPLER_DTYPE = "bf16"


def sampler_case(batch: int, steps: int, cfg: float) -> str:
    """A sampler row's shape label: "b64 t4 cfg1.4 combo", "b1 t2 no cfg"."""
    return f"b{batch} t{steps} " + (f"cfg{cfg} combo" if cfg > 1 else "no cfg")


def sampler_cases(batch: int) -> list[str]:
    """The grid's labels at ``batch``: every step count, with and without CFG."""
    return [sampler_case(batch, steps, cfg) for steps in SAMPLER_STEPS for cfg in SAMPLER_CFGS]


def swiglu_hidden(width: int) -> int:
    """The SwiGLU MLP width of a ``width``-wide block (1024 -> 2731 ~ the model's 2730)."""
    return round(width * 8 / 3)


def cases(op: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of each row the real grid of ``op`` records (the SwiGLU rows record their input's shape,
    [B, N, 2H]); empty for an op whose grid is not here."""
    if op in SPHERIFY_OPS:
        return [(dtype, shape) for shape in SPHERIFY_SHAPES for dtype in SPHERIFY_DTYPES]
    if op in ADALN_OPS:
        return [(BLOCK_DTYPE, shape) for shape in BLOCK_SHAPES]
    if op in ("swiglu_fwd", "swiglu_bwd"):
        return [(BLOCK_DTYPE, (b, n, 2 * swiglu_hidden(w))) for b, n, w in BLOCK_SHAPES]
    if op in ATTENTION_OPS:
        return [(ATTENTION_DTYPE, shape) for shape in ATTENTION_SHAPES]
    return []
