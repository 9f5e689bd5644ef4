"""The issues' speed goals, judged from the rows of one results file: met, not met, within noise, partly measured, or
not measured.

Each goal names the rows it reads (op, shape filter, implementations) and states its bar as the issue does.
"Ours" is what a user gets by default: the implementation ``auto`` runs on a GPU (the kernel ops' first in their
AUTO_ORDER, triton; the graphed ``Sampler``), not the faster of ours in each row group as the report's tables
show. Where several shapes qualify, the worst one is judged. A goal holds at every case of its grid that passes
its filter (grids.py): it says how many of them were measured, and one that holds where measured but not
everywhere is "partly measured". A verdict read from rows recorded before the current gates (harness.GATES)
says so.

Rows are noisy (benchmarks/NOTES.md, F7): a value comes with the range its rows' quartiles give (harness.record
keeps them), and a case whose range spans its bar is "within noise", neither met nor not met. Rows without
quartiles (fewer than four samples) are judged on their medians alone, except the time to first image: one process
a row, given FIRST_IMAGE_NOISE either side.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, TypeVar

from benchmarks import grids

KERNELS = ("triton", "cpp")
# what `auto` runs on CUDA for the kernel ops (adaln, swiglu, spherify: their AUTO_ORDER starts with it), and the
# Sampler's default (cuda_graph=True): the implementations the goals judge
AUTO_KERNEL = ("triton",)
AUTO_SAMPLER = ("graph",)
# the eager baselines, judged by the faster: the reference, and where a suite has it the official code's
# formulation (spherify noise from torch.randn instead of the seed convention's Philox in torch ops)
EAGER = ("eager", "eager_randn")
# the torch.compile baselines, judged by the faster: a whole function compiled, and for the sampler also each
# network compiled with the loop eager
COMPILED = ("compile", "compile_networks")
SAMPLERS = ("uncaptured", "graph")
TRAINERS = ("fused",)  # a training step on the fused backends (no goal of its own yet)
SDPA = ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math")

Row = dict[str, Any]
Judged = TypeVar("Judged")  # a goal's verdict or a setting's choice


@dataclass(frozen=True)
class Verdict:
    issue: int
    goal: str
    measured: str  # the worst qualifying value, and where; "–" when nothing qualified
    status: str  # met | not met | within noise | partly measured | not measured; " (earlier lease)" after one carried
    older_gates: bool = False  # a row it read lacks harness.GATES' mark (checked less before it was timed)
    host_time: bool = False  # an op row it read may hold host time (host_in_device_time)


# what the goals table says after a verdict's measured value when it read rows under older gates
OLDER_GATES = "rows under older gates"
# ... and when an op row it read may hold host time
HOST_TIME = "rows that may hold host time"
# the ops whose rows time a whole loop as a user runs it, host included: the head start is not meant to hide theirs
LOOP_OPS = ("sample ", "train step ", "first image ")


def host_in_device_time(row: Row) -> bool:
    """Whether an op row, meant as device time, may hold host time: the host was still queueing the call for most
    of its timed span (harness.Timing.host_bound). Unknown (rows before 2026-12-02) counts as no."""
    return bool(row.get("host_bound")) and not row["op"].startswith(LOOP_OPS)


# the status of a goal whose case's range spans its bar: the rows cannot tell met from not met
WITHIN_NOISE = "within noise"
# which case of a goal decides it: one below its bar before one within noise, before one that clears it
STATUS_ORDER = ("not met", WITHIN_NOISE, "met")


# quartiles of fewer samples say little about the spread: such rows record none (the verdicts read their median)
QUARTILE_SAMPLES = 4


class Ranged(NamedTuple):
    """A goal's value from the rows' medians, and the range their quartiles give (higher is better: ``low`` is the
    pessimistic end; all three equal where the rows recorded no quartiles), and the rows it was computed from."""

    value: float
    low: float
    high: float
    read: tuple[Row, ...] = ()


def ms_quartiles(row: Row) -> tuple[float, float]:
    """A row's first and third quartile in ms. Where it recorded none (under QUARTILE_SAMPLES samples, or written
    before rows kept them and without pytest-benchmark's statistics): a time to first image from so few processes
    FIRST_IMAGE_NOISE either side of its time, any other row its median twice."""
    q1, q3 = row.get("ms_q1"), row.get("ms_q3")
    if q1 is not None and q3 is not None:
        return q1, q3
    noise = FIRST_IMAGE_NOISE if row["op"].startswith("first image ") else 0.0
    return row["ms"] * (1 - noise), row["ms"] * (1 + noise)


def _status(v: Ranged, bar: float) -> str:
    """Met where even the pessimistic end clears ``bar``, not met where even the optimistic end falls short."""
    return "met" if v.low >= bar else "not met" if v.high < bar else WITHIN_NOISE


def shape_label(shape: Any) -> str:
    """A row's shape as the tables show it: "8×256×4096", or the sampler's own label."""
    return shape if isinstance(shape, str) else "×".join(str(d) for d in shape)


def _groups(rows: Sequence[Row], op: str, keep: Callable[[Any], bool]) -> dict[str, dict[str, Row]]:
    """Rows of ``op`` whose shape passes ``keep``, by shape label, then by implementation."""
    groups: dict[str, dict[str, Row]] = {}
    for r in rows:
        if r["op"] == op and keep(r["shape"]):
            groups.setdefault(f"{r['dtype']} {shape_label(r['shape'])}", {})[r["impl"]] = r
    return groups


def _grid(rows: Sequence[Row], op: str, keep: Callable[[Any], bool]) -> tuple[dict[str, dict[str, Row]], list[str]]:
    """``_groups(rows, op, keep)``, and the labels of the real grid's cases of ``op`` that pass ``keep``: the shapes
    a goal must hold at."""
    cases = [f"{dtype} {shape_label(shape)}" for dtype, shape in grids.cases(op) if keep(shape)]
    return _groups(rows, op, keep), cases


def _best(group: dict[str, Row], impls: Sequence[str]) -> Row | None:
    found = [group[i] for i in impls if i in group]
    return min(found, key=lambda r: r["ms"]) if found else None


def _judge(
    issue: int,
    goal: str,
    groups: dict[str, dict[str, Row]],
    value: Callable[[dict[str, Row]], Ranged | None],
    bar: float,
    unit: str,
    expected: Sequence[str] = (),
    counted: str = "shapes",
) -> Verdict:
    """The worst ``value`` over the groups (where it can be computed) against ``bar`` (higher is better): a group
    whose range lies below the bar before one whose range spans it (within noise), the lowest value first; with
    ``expected`` (the labels of the cases the goal must hold at, ``counted`` in the text), how many of those have
    a value: a bar held where measured is only "partly measured" until all of them are."""
    values = [(v, label) for label, g in groups.items() if (v := value(g)) is not None and math.isfinite(v.value)]
    if not values:
        return Verdict(issue, goal, "–", "not measured")
    worst, label = min(values, key=lambda vl: (STATUS_ORDER.index(_status(vl[0], bar)), vl[0].value))
    decimals = 0 if unit == "%" else 2
    low, high = near_bar(worst.low, bar, decimals), near_bar(worst.high, bar, decimals)
    spread = f" ({low}-{high})" if low != high else ""  # a range that rounds to one value is left out
    shown = f"{near_bar(worst.value, bar, decimals)}{unit}{spread} ({label})"
    status = _status(worst, bar)
    if expected:
        measured = len(set(expected) & {where for _, where in values})
        shown += f", {measured} of {len(expected)} {counted}"
        if status == "met" and measured < len(expected):
            status = "partly measured"
    read = [r for v, _ in values for r in v.read]
    return Verdict(issue, goal, shown, status, any("gates" not in r for r in read),
                   any(host_in_device_time(r) for r in read))


def near_bar(value: float, bar: float, decimals: int) -> str:
    """``value`` to ``decimals`` places, or to more where those would print it as its bar (84.6% against 85% is not
    "85%": a miss that reads as a pass)."""
    while value != bar and f"{value:.{decimals}f}" == f"{bar:.{decimals}f}":  # two floats differ by 17 places
        decimals += 1
    return f"{value:.{decimals}f}"


def _ours(impls: Sequence[str], field: str) -> Callable[[dict[str, Row]], Ranged | None]:
    """``field`` (pct_copy, pct_matmul) of the fastest of ``impls``; its range at the row's quartiles (a rate scales
    inversely with the time)."""

    def value(g: dict[str, Row]) -> Ranged | None:
        best = _best(g, impls)
        pct = None if best is None else best.get(field)
        if pct is None:
            return None
        q1, q3 = ms_quartiles(best)
        return Ranged(pct, pct * best["ms"] / q3, pct * best["ms"] / q1, (best,))

    return value


def _speedup(impls: Sequence[str], baselines: Sequence[str]) -> Callable[[dict[str, Row]], Ranged | None]:
    """Baseline time over ours; the best of ``baselines`` when several are given. Its range: ours' third quartile
    against the baseline's first (the pessimistic end), and the reverse."""

    def value(g: dict[str, Row]) -> Ranged | None:
        ours, base = _best(g, impls), _best(g, baselines)
        if not (ours and base):
            return None
        (ours_q1, ours_q3), (base_q1, base_q3) = ms_quartiles(ours), ms_quartiles(base)
        return Ranged(base["ms"] / ours["ms"], base_q1 / ours_q3, base_q3 / ours_q1, (ours, base))

    return value


def _numel(shape: Any) -> int:
    return 0 if isinstance(shape, str) else math.prod(shape)


def _spherify(rows: Sequence[Row]) -> list[Verdict]:
    out = []
    for op in grids.SPHERIFY_OPS:
        big, cases = _grid(rows, op, lambda s: _numel(s) >= 8 << 20)
        out.append(_judge(3, f"{op}: >= 85% of copy bandwidth at B*L >= 8M", big, _ours(AUTO_KERNEL, "pct_copy"), 85,
                          "%", cases))
        out.append(_judge(3, f"{op}: >= 5x eager at B*L >= 8M", big, _speedup(AUTO_KERNEL, EAGER), 5, "x", cases))
    return out


BLOCK_OPS = (*grids.ADALN_OPS, "swiglu_fwd", "swiglu_bwd")


def _adaln(rows: Sequence[Row]) -> list[Verdict]:
    out = []
    for op in BLOCK_OPS:
        pct = 75 if op.endswith("_bwd") else 85
        many, cases = _grid(rows, op, lambda s: _numel(s[:2]) >= 32 << 10)  # B*N rows
        out.append(_judge(4, f"{op}: >= {pct}% of copy bandwidth at >= 32k rows", many,
                          _ours(AUTO_KERNEL, "pct_copy"), pct, "%", cases))
    for op in BLOCK_OPS:
        tokens_256, at_256 = _grid(rows, op, lambda s: s[1] == 256)
        every, grid = _grid(rows, op, lambda s: True)
        out.append(_judge(4, f"{op}: >= 3x eager at 256 tokens", tokens_256, _speedup(AUTO_KERNEL, EAGER), 3, "x",
                          at_256))
        out.append(_judge(4, f"{op}: never slower than eager", every, _speedup(AUTO_KERNEL, EAGER), 1, "x", grid))
        out.append(_judge(4, f"{op}: >= torch.compile", every, _speedup(AUTO_KERNEL, COMPILED), 1, "x", grid))
    return out


def _attention(rows: Sequence[Row]) -> list[Verdict]:
    """Issue 5's bars on the whole op (the RoPE pass included, as the model runs it), then on the attention alone
    (q and k rotated beforehand: the RoPE pass the whole-op rows share brings their ratios nearer 1)."""
    out = []
    for whole, alone, bar in (("attention_fwd", "attention_kernel_fwd", 1.0),
                              ("attention_bwd", "attention_kernel_bwd", 0.9)):
        for op, what in ((whole, ""), (alone, " (attention alone)")):
            # (B, H, N, D)
            shapes, cases = _grid(rows, op, lambda s: s[2] == 1024 and s[3] in (64, 72) and s[0] * s[1] >= 256)
            out.append(_judge(5, f"{op}: >= {bar}x the best SDPA backend at N = 1024, D = 64 / 72, B*H >= 256"
                              f"{what}", shapes, _speedup(["triton"], SDPA), bar, "x", cases))
    return out


def _sampler_labels(cases: Sequence[str]) -> list[str]:
    """Sampler cases as _groups keys them: with their dtype."""
    return [f"{grids.SAMPLER_DTYPE} {case}" for case in cases]


def _sampler(rows: Sequence[Row]) -> list[Verdict]:
    out = []
    headline = grids.sampler_case(64, 4, 1.4)
    large = [case for batch in grids.SAMPLER_BATCHES if batch >= 64 for case in grids.sampler_cases(batch)]
    at_1 = grids.sampler_cases(1)
    for model in grids.SAMPLER_MODELS:
        op = f"sample {model}"
        b64 = _groups(rows, op, lambda s: s == headline)
        b1 = _groups(rows, op, lambda s: s in at_1)
        at_large = _groups(rows, op, lambda s: s in large)
        vs_eager, vs_compile = _speedup(AUTO_SAMPLER, EAGER), _speedup(AUTO_SAMPLER, COMPILED)
        out.append(_judge(6, f"{model}: >= 2x eager at batch 64, 4 steps, CFG", b64, vs_eager, 2, "x"))
        out.append(_judge(6, f"{model}: >= 1.3x torch.compile at batch 64, 4 steps, CFG", b64, vs_compile, 1.3, "x"))
        out.append(_judge(6, f"{model}: >= 4x eager at batch 1", b1, vs_eager, 4, "x", _sampler_labels(at_1), "cases"))
        out.append(_judge(6, f"{model}: >= 60% model FLOP utilisation at batch >= 64", at_large,
                          _ours(AUTO_SAMPLER, "pct_matmul"), 60, "%", _sampler_labels(large), "cases"))
        # "first image within seconds of process start (torch.compile's cold start is the comparison)": both
        cold = _groups(rows, f"first image {model}", lambda s: s.endswith(", empty caches"))
        out.append(_first_image_within(model, cold, FIRST_IMAGE_S))
        out.append(_judge(6, f"{model}: first image from a cold process (empty caches) faster than torch.compile's",
                          cold, _speedup(AUTO_SAMPLER, COMPILED), 1, "x"))
    return out


# "within seconds" read as under ten: a minute would be torch.compile's kind of start
FIRST_IMAGE_S = 10.0
# a time to first image without quartiles (fewer than four processes) shows no spread of its own: it is taken as this
# share either side of it, F7's allowance for one cold process (a floor: host-bound rows moved up to 30% call to call)
FIRST_IMAGE_NOISE = 0.1


def _first_image_within(model: str, cold: dict[str, dict[str, Row]], seconds: float) -> Verdict:
    """The graphed sampler's first image from a cold process with empty caches against ``seconds``, judged as
    _judge judges (lower is better here), on the range ms_quartiles gives: met where even its slow end is within
    ``seconds``; the slowest case decides, one not met before one within noise."""
    goal = f"{model}: first image from a cold process (empty caches) within {seconds:.0f} s"
    judged = []
    for label, g in cold.items():
        for row in (g[impl] for impl in AUTO_SAMPLER if impl in g):
            fast, slow = (ms / 1e3 for ms in ms_quartiles(row))
            status = "met" if slow <= seconds else "not met" if fast > seconds else WITHIN_NOISE
            judged.append((STATUS_ORDER.index(status), -row["ms"], status, fast, slow, label, row))
    if not judged:
        return Verdict(6, goal, "–", "not measured")
    *_, status, fast, slow, label, row = min(judged, key=lambda j: j[:2])
    n = row.get("n_samples", 1)  # rows written before the count was kept are one process each
    fast_s, slow_s = near_bar(fast, seconds, 1), near_bar(slow, seconds, 1)
    spread = f"{fast_s}-{slow_s} s, " if fast_s != slow_s else ""
    shown = f"{near_bar(row['ms'] / 1e3, seconds, 1)} s ({spread}{n} process{'es' if n > 1 else ''}) ({label})"
    return Verdict(6, goal, shown, status, "gates" not in row)


def verdicts(rows: Sequence[Row]) -> list[Verdict]:
    """Every goal of issues 3 to 6, in issue order."""
    return [*_spherify(rows), *_adaln(rows), *_attention(rows), *_sampler(rows)]


def first_image_label(row: Row) -> str:
    """'<model> <impl>', with the state of the kernel caches where the run recorded it."""
    caches = f", {row['kernel_caches']} kernel caches" if row.get("kernel_caches") else ""
    return f"{row['op'].removeprefix('first image ')} {row['impl']}{caches}"


def first_image_seconds(rows: Sequence[Row]) -> list[str]:
    """Time to first image per model and implementation (issue 6 compares ours with torch.compile's)."""
    return [f"{first_image_label(r)}: {r['ms'] / 1e3:.1f} s" for r in rows if r["op"].startswith("first image ")]


def newest_measured(
    judge: Callable[[Sequence[Row]], list[Judged]],
    rows: Sequence[Row],
    earlier: Sequence[tuple[str, Sequence[Row]]],
    measured: Callable[[Judged], bool],
    carried: Callable[[Judged, str], Judged],
) -> list[Judged]:
    """judge(rows), where an entry they leave unmeasured is the newest of ``earlier``'s (label, rows of an earlier
    lease, newest first) that measured it, marked by ``carried(entry, label)``."""
    older = [(label, judge(old)) for label, old in earlier]
    judged = []
    for i, entry in enumerate(judge(rows)):
        found = [(label, entries[i]) for label, entries in older if measured(entries[i])]
        if not measured(entry) and found:
            label, old = found[0]
            entry = carried(old, label)
        judged.append(entry)
    return judged


def with_earlier(rows: Sequence[Row], earlier: Sequence[tuple[str, Sequence[Row]]]) -> list[Verdict]:
    """verdicts(rows), where a goal they leave unmeasured takes the newest earlier lease's verdict, its label after
    the measured value (newest_measured) and its status marked as an earlier lease's: older code's, not a pass or
    a fail of this one."""
    return newest_measured(verdicts, rows, earlier, lambda v: v.status != "not measured",
                           lambda v, label: replace(v, measured=f"{v.measured} {label}",
                                                    status=f"{v.status} (earlier lease)"))


def _notes(v: Verdict) -> list[str]:
    """A verdict's measured value, then what the table says of the rows it read."""
    return [v.measured, *([OLDER_GATES] if v.older_gates else []), *([HOST_TIME] if v.host_time else [])]


def table(rows: Sequence[Row], earlier: Sequence[tuple[str, Sequence[Row]]] = ()) -> str:
    """The goals as a markdown table (a goal ``rows`` leave unmeasured judged from ``earlier``: with_earlier), then
    the times to first image."""
    lines = ["| issue | goal | measured (worst case) | verdict |", "|---|---|---|---|"]
    lines += [f"| #{v.issue} | {v.goal} | {'; '.join(_notes(v))} | {v.status} |"
              for v in with_earlier(rows, earlier)]
    firsts = first_image_seconds(rows)
    lines += ["", "Time to first image from a cold process: " + ("; ".join(firsts) if firsts else "not measured") + "."]
    return "\n".join(lines)
