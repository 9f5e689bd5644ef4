"""The settings chosen without a GPU, and what the rows of one results file say each should be.

Each rule is the one benchmarks/NOTES.md states for its setting, applied to the headline rows that settle it
(benchmarks/conftest.py); a setting whose rows are missing is "not measured". The verdict is advice for the
next change of the code, which stays a person's decision: a results file never changes a default by itself.
Where rows recorded their quartiles, a pair of times decides only where their ranges do not overlap (the rows'
noise, benchmarks/NOTES.md F7); the attention choice keeps its own margin (1.10x) on the medians.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from benchmarks.goals import ms_quartiles, newest_measured, shape_label

Row = dict[str, Any]
ATTENTION_SHAPES = ([16, 16, 1024, 64], [16, 16, 1024, 72])  # B, H, N, D: the model's attention at B*H = 256
# a vendor forward must beat triton by this factor to replace it: the forward rows leave out the backward, the
# tuning at the model's batch and the graph, so a few percent decide nothing (2026-11-29: cuDNN 1.06x at D = 64)
SWITCH_MARGIN = 1.1
# attention implementations `auto` could take; eager / compile time the reference (eager RoPE, then SDPA)
ATTENTION_IMPLS = ("triton", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flash_attn")
SAMPLER_CASES = ("b1 t4 cfg1.4 combo", "b64 t4 cfg1.4 combo")


@dataclass(frozen=True)
class Choice:
    setting: str  # where it is set
    now: str  # what the code does today
    measured: str  # the numbers the verdict reads
    suggests: str


def _rows(rows: Sequence[Row], op: str, impl: str, shape: Callable[[Any], bool] = lambda s: True) -> dict[str, Row]:
    """``impl``'s rows of ``op`` by shape label, for shapes that pass ``shape``."""
    return {shape_label(r["shape"]): r for r in rows if r["op"] == op and r["impl"] == impl and shape(r["shape"])}


def _pairs(base: dict[str, Row], other: dict[str, Row]) -> list[tuple[str, Row, Row]]:
    return [(label, base[label], other[label]) for label in base if label in other]


def _by_tokens(by_shape: dict[str, Row]) -> dict[str, Row]:
    """A linear layer's rows keyed by its token count (the first dim of its [tokens, in, out] shape)."""
    return {label.split("×")[0]: r for label, r in by_shape.items()}


def _within_noise(a: Row, b: Row) -> bool:
    """Whether two rows' quartile ranges overlap, where either recorded its quartiles (rows without them are
    compared by their medians: equal ones are no win for the candidate, as before quartiles were kept)."""
    if all(r.get("ms_q1") is None or r.get("ms_q3") is None for r in (a, b)):
        return False
    (a_q1, a_q3), (b_q1, b_q3) = ms_quartiles(a), ms_quartiles(b)
    return b_q1 <= a_q3 and a_q1 <= b_q3


def _paired(setting: str, now: str, pairs: Sequence[tuple[str, Row, Row]], candidate: str,
            verdicts: tuple[str, str, str]) -> Choice:
    """A choice between today's way (the first row of each pair) and ``candidate`` (the second); ``verdicts``:
    what to do when the candidate is faster in every pair, in none, in some. Pairs within noise (_within_noise)
    are left out of that count and named; where every pair is, the rows decide nothing and today's way stays."""
    if not pairs:
        return Choice(setting, now, "not measured", "not measured")
    noisy = [_within_noise(a, b) for _, a, b in pairs]
    measured = "; ".join(f"{what}: {a['ms']:.3f} -> {b['ms']:.3f} ms {candidate}{' (within noise)' if tie else ''}"
                         for (what, a, b), tie in zip(pairs, noisy, strict=True))
    if all(noisy):
        return Choice(setting, now, measured, f"keep {now}: every pair within noise")
    wins = [b["ms"] < a["ms"] for (_, a, b), tie in zip(pairs, noisy, strict=True) if not tie]
    every, none, some = verdicts
    suggests = every if all(wins) else none if not any(wins) else some
    if any(noisy):
        suggests += f"; {sum(noisy)} of {len(pairs)} pairs within noise, not counted"
    return Choice(setting, now, measured, suggests)


def mlp_align(rows: Sequence[Row]) -> Choice:
    """nn.layers.MLP_ALIGN: the Sphere-L MLP's GEMMs with the hidden width 2730 padded to 2752, against
    unpadded, at each token count."""
    from sphere_fast.nn.layers import MLP_ALIGN

    pairs = []
    for layer in ("w12", "w3"):
        plain = _by_tokens(_rows(rows, f"linear_L_{layer}", "torch"))
        padded = _by_tokens(_rows(rows, f"linear_L_{layer}_pad64", "torch"))
        pairs += [(f"{layer} M{tokens}", a, b) for tokens, a, b in _pairs(plain, padded)]
    return _paired("nn.layers.MLP_ALIGN", str(MLP_ALIGN), pairs, "padded", (
        "keep 64: padded is faster in every case", "set 1: padded is slower in every case",
        "mixed: padded wins in some cases only (see the rows)"))


def fused_mlp(rows: Sequence[Row]) -> Choice:
    """SPHERE_FAST_FUSED_MLP (nn.layers.fused_mlp_enabled): the fused GEMM against cuBLAS + the SwiGLU kernel,
    then the graphed Sphere-L sampler with and without it."""
    from sphere_fast.nn.layers import fused_mlp_enabled

    pairs = []
    for model in ("L", "XL"):
        ops = _pairs(_rows(rows, f"mlp_up_{model}", "cublas_swiglu"), _rows(rows, f"mlp_up_{model}", "triton"))
        pairs += [(f"mlp_up {model} {label}", a, b) for label, a, b in ops]
    samplers = _pairs(*(_rows(rows, "sample sphere-l-imagenet", impl, lambda s: s in SAMPLER_CASES)
                        for impl in ("graph", "graph_fused_mlp")))
    pairs += [(f"sampler {label}", a, b) for label, a, b in samplers]
    now = "on" if fused_mlp_enabled() else "off"
    return _paired("SPHERE_FAST_FUSED_MLP (nn.layers.fused_mlp_enabled)", now, pairs, "fused", (
        "turn on by default: fused is faster in every case", "keep off: fused is slower in every case",
        "mixed: key the choice on the token count (see the rows)"))


def attention_impl(rows: Sequence[Row]) -> list[Choice]:
    """What ``auto`` runs for the model's attention (ops/attention.py): the fastest usable implementation of the
    forward at N = 1024, B*H = 256, per head dim. ``auto`` runs ``triton`` or ``sdpa`` (torch picks the SDPA
    kernel: cuDNN's on an H200 with torch 2.11), so an sdpa_* row being the fastest keeps ``sdpa``."""
    from sphere_fast.ops.attention import auto_takes_triton

    out = []
    for shape in ATTENTION_SHAPES:
        label = shape_label(shape)
        now = "triton" if auto_takes_triton(shape[3]) else "sdpa"
        times = {impl: by_shape[label]["ms"] for impl in ATTENTION_IMPLS
                 if label in (by_shape := _rows(rows, "attention_fwd", impl))}
        choice = Choice(f"attention auto impl, D = {shape[3]}", now, "not measured", "not measured")
        if "triton" not in times:
            out.append(choice)
            continue
        fastest = min(times, key=times.get)
        measured = "; ".join(f"{impl} {ms:.3f} ms" for impl, ms in sorted(times.items(), key=lambda kv: kv[1]))
        vs_triton = f"{times['triton'] / times[fastest]:.2f}x faster than triton"
        if fastest == "triton":
            suggests = "keep triton: the fastest" if now == "triton" else "take triton: the fastest"
        elif now == "sdpa" and fastest.startswith("sdpa_"):
            suggests = f"keep sdpa: {fastest} is {vs_triton}"
        elif now == "triton" and times["triton"] < SWITCH_MARGIN * times[fastest]:
            suggests = f"keep triton: {fastest} is only {vs_triton} (under the {SWITCH_MARGIN:.2f}x margin)"
        else:
            suggests = f"take {fastest}: {vs_triton}"
        out.append(Choice(choice.setting, now, measured, suggests))
    return out


def choices(rows: Sequence[Row]) -> list[Choice]:
    return [mlp_align(rows), fused_mlp(rows), *attention_impl(rows)]


def with_earlier(rows: Sequence[Row], earlier: Sequence[tuple[str, Sequence[Row]]]) -> list[Choice]:
    """choices(rows), where a setting they leave unmeasured takes the newest earlier lease's reading, its label after
    the numbers (goals.newest_measured)."""
    return newest_measured(choices, rows, earlier, lambda c: c.measured != "not measured",
                           lambda c, label: replace(c, measured=f"{c.measured} ({label})"))


def table(rows: Sequence[Row], earlier: Sequence[tuple[str, Sequence[Row]]] = ()) -> str:
    lines = ["| setting | now | measured | suggests |", "|---|---|---|---|"]
    lines += [f"| {c.setting} | {c.now} | {c.measured} | {c.suggests} |" for c in with_earlier(rows, earlier)]
    return "\n".join(lines)
