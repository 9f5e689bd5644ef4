"""Turn a pytest-benchmark JSON written through benchmarks/harness.py into a markdown table, and regenerate
the README's performance section from the latest GPU results file.

    python -m benchmarks.report RESULTS.json                 # print the table
    python -m benchmarks.report --readme README.md           # rewrite <!-- perf:start --> ... <!-- perf:end -->
    python -m benchmarks.report --readme README.md --check   # exit 1 if that section is stale

The README section comes only from files in benchmarks/results/ measured on a GPU (not smoke runs), so no
number reaches the README without a results file behind it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks import choices, goals

# the date harness.GATES names (read here without importing the harness, which imports torch)
GATES_SINCE = "2026-12-01"
START = "<!-- perf:start -->"
END = "<!-- perf:end -->"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
IMPL_ORDER = ("eager", "eager_randn", "compile", "compile_networks", "triton", "cpp", "uncaptured", "graph", "fused")
OURS = goals.KERNELS + goals.SAMPLERS + goals.TRAINERS
HOST_MARK = "†"  # after an op row's ms where it may hold host time (goals.host_in_device_time)
NOT_MEASURED = (
    "Not measured on a GPU yet: no speed is claimed until a results file under `benchmarks/results/` backs it."
)


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "%":
        return f"{value:.0f}%"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 1 else f"{value:#.3g}"


def rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The harness rows (extra_info) of a pytest-benchmark JSON; cases without them are ignored. A row recorded
    before rows kept their quartiles (2026-12-02) takes them from pytest-benchmark's statistics of the same samples
    (harness.record hands the CUDA-event samples to it as its rounds, in seconds; its quartile method differs a
    little from the harness's), where it has enough rounds."""
    found = []
    for case in data.get("benchmarks", []):
        row, stats = case.get("extra_info", {}), case.get("stats") or {}
        if "op" not in row:
            continue
        if "ms_q1" not in row and stats.get("rounds", 0) >= goals.QUARTILE_SAMPLES:
            row = {**row, "ms_q1": stats["q1"] * 1e3, "ms_q3": stats["q3"] * 1e3, "n_samples": stats["rounds"]}
        found.append(row)
    return found


def environment(data: dict[str, Any]) -> dict[str, Any]:
    return data.get("machine_info", {}).get("sphere_fast") or {}


def is_gpu_result(data: dict[str, Any]) -> bool:
    env = environment(data)
    return bool(env) and not env.get("smoke", True) and env.get("device", "cpu") != "cpu"


def header(data: dict[str, Any]) -> str:
    """One paragraph: when, on what, with which versions and clocks, under which ceilings."""
    env = environment(data)
    smi = env.get("nvidia_smi") or {}
    when = data.get("datetime", "unknown date")
    try:
        when = datetime.fromisoformat(when).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        pass
    parts = [f"Measured {when} on {env.get('device', 'an unknown device')}"]
    if smi:
        parts.append(
            f"driver {smi.get('driver_version')}, clocks at the {env.get('clocks_at', 'end')} SM "
            f"{smi.get('clocks.sm')} (max {smi.get('clocks.max.sm')}), memory {smi.get('clocks.mem')}, "
            f"{smi.get('power.draw')}"
        )
    cudnn = f", cuDNN {env['cudnn']}" if env.get("cudnn") else ""
    flash = f", flash-attn {env['flash_attn']}" if env.get("flash_attn") else ""
    parts.append(f"torch {env.get('torch')} (CUDA {env.get('cuda')}{cudnn}), triton {env.get('triton')}{flash}")
    if env.get("cpu_model"):
        parts.append(env["cpu_model"])
    if env.get("cpus"):
        parts.append(f"{env['cpus']} CPUs, inductor compile threads {env.get('inductor_compile_threads')}")
    if env.get("inductor_stored_autotunings"):
        parts.append(f"inductor's cache held max-autotune timings for {env['inductor_stored_autotunings']} GEMMs at "
                     "the start (torch.compile's first calls skip benchmarking them)")
    parts.append(commit_text(data))
    lines = [", ".join(parts) + "."]
    if "switches" in env:
        switches = ", ".join(f"`{name}={value}`" for name, value in env["switches"].items()) or "none"
        tuned = (f"{len(env.get('tuned_configs') or {})} launch configs tuned or read from the store by the end "
                 "(`tuned_configs` in the JSON)" if env.get("clocks_at") != "start"
                 else "the launch configs tuned were not recorded (the run was cut off before its end)")
        lines.append(f"float32 matmul precision {env.get('float32_matmul_precision')}; environment switches: "
                     f"{switches}; {tuned}.")
    ceilings = env.get("ceilings")
    if ceilings:
        lines.append(
            f"Ceilings in the same run: copy {_fmt(ceilings['copy_gbps'], 'n')} GB/s (read + written, "
            f"{ceilings['copy_bytes'] >> 20} MiB), bf16 matmul {_fmt(ceilings['matmul_tflops'], 'n')} TFLOP/s "
            f"({ceilings['matmul_size']}³)."
        )
    if env.get("smoke", True):
        lines.append("**Smoke run (tiny sizes, one call, no GPU timing): these numbers are not measurements.**")
    if data.get("partial"):
        lines.append("The benchmark run was cut off at its time limit: these are the cases it finished.")
    if data.get("merged_calls", 1) > 1:
        lines.append(f"The rows come from {data['merged_calls']} calls of one lease (one tree): a speedup may pair "
                     "rows of two calls, which differ by a few percent from call to call (2% on GPU-bound rows, "
                     "more on host-bound ones, on 2026-11-29).")
    if env.get("deadline_skipped"):
        lines.append(f"The run reached its time limit: {env['deadline_skipped']} selected cases were skipped, not "
                     "measured.")
    recs = rows(data)
    clocked = [r for r in recs if r.get("clocks_while_timed")]
    if clocked:
        read = [r["clocks_while_timed"] for r in clocked]
        slowest = min(clocked, key=lambda r: r["clocks_while_timed"]["sm_mhz_median"])
        where = f"{slowest['impl']} {slowest['op']} {goals.shape_label(slowest['shape'])}"
        lines.append(
            f"While {len(clocked)} long rows were timed (read about every 0.2 s, warm-up calls included): SM clock "
            f"down to {min(c['sm_mhz_min'] for c in read):.0f} MHz, the lowest median "
            f"{slowest['clocks_while_timed']['sm_mhz_median']:.0f} MHz ({where}); power up to "
            f"{max(c['power_w_max'] for c in read):.0f} W, temperature up to "
            f"{max(c['temperature_c_max'] for c in read):.0f} °C."
        )
    skipping = [r for r in recs if r.get("cudagraph_skips")]
    if skipping:
        lines.append(f"{len(skipping)} torch.compile rows ran without inductor's CUDA graphs in part (inductor "
                     f"counted {sum(r['cudagraph_skips'] for r in skipping)} CUDA-graph skips): {_named(skipping)}.")
    hosted = [r for r in recs if goals.host_in_device_time(r)]
    if hosted:
        lines.append(
            f"{len(hosted)} op rows (marked {HOST_MARK} in the tables) were still being queued by the host for most "
            "of their timed span after the GPU-side wait before each call (`harness.HOST_BOUND_SHARE`): the host may "
            f"have set their pace, so their times may hold host time. The verdicts that read them say "
            f"\"{goals.HOST_TIME}\"."
        )
    recording = [r for r in recs if r.get("graph_recordings")]
    if recording:
        lines.append(f"{len(recording)} rows recorded CUDA graphs of torch.compile, or ran them eager, inside their "
                     f"timed calls (a recording syncs and runs the model once more): {_named(recording)}.")
    older = sum("gates" not in r for r in recs)
    if older:
        lines.append(
            f"{older} of {len(recs)} rows were recorded before the present checks (`harness.GATES`, "
            f"{GATES_SINCE}): their outputs were checked in value only, not in dtype and shape, their backward rows' "
            "gradients not at all, and their sampler rows on the mean image difference alone, which could not tell "
            f"a sampler that skipped CFG. The verdicts that read them say \"{goals.OLDER_GATES}\"."
        )
    return "\n\n".join(lines)


def _named(rows: Sequence[dict[str, Any]]) -> str:
    """The implementations and ops of ``rows``, each once: "compile sample sphere-l-imagenet, ..."."""
    return ", ".join(sorted({f"{r['impl']} {r['op']}" for r in rows}))


def commit_text(data: dict[str, Any]) -> str:
    """The commit a run measured: as the run stated it ($SPHERE_FAST_COMMIT, harness.stated_commit), else as the
    machine's git metadata says, which on a lent machine may be stale (results/README.md then names the commit);
    and whether the tree measured is the tree sent, where the run digested both (benchmarks.tree)."""
    commit = data.get("commit_info", {})
    if not commit.get("id"):
        text = "commit unknown"
    else:
        named = f"{commit['id'][:10]}{' (dirty)' if commit.get('dirty') else ''}"
        text = (f"commit {named}" if "git_id" in commit
                else f"commit not stated by the run (the machine's git metadata, which may be stale: {named})")
    if not commit.get("tree"):
        if commit.get("tree_sent"):
            return f"{text}, tree sent {commit['tree_sent']} (the tree measured was not digested)"
        return text
    if not commit.get("tree_sent"):
        return f"{text}, tree {commit['tree']} (the tree sent was not stated: not compared)"
    if tree_verified(commit):
        return f"{text}, tree {commit['tree']} (the tree sent)"
    return f"{text}; **the tree measured ({commit['tree']}) is not the tree sent ({commit['tree_sent']})**"


def tree_verified(commit: dict[str, Any]) -> bool:
    """Whether the run digested the tree it measured and found it to be the tree its sender stated."""
    return bool(commit.get("tree")) and commit.get("tree") == commit.get("tree_sent")


def lease_label(data: dict[str, Any]) -> str:
    """A short label of an earlier lease for the verdicts it judged: its date and commit (see commit_text)."""
    commit = data.get("commit_info", {})
    named = f"{commit['id'][:7]}{' dirty' if commit.get('dirty') else ''}" if commit.get("id") else "unknown"
    stated = "" if "git_id" in commit or not commit.get("id") else " (machine's git)"
    if commit.get("tree_sent") and not tree_verified(commit):
        stated += " (not the tree sent)"
    return f"on {data.get('datetime', '')[:10]} at {named}{stated}"


def table(records: Sequence[dict[str, Any]]) -> str:
    """One markdown table per op: a row per (shape, dtype), one ms column per implementation, then the
    speedups and rates of ours (images/s for the sampler and the training step); columns empty for the whole op
    are left out.

    "ours" is the faster of our rows (triton / cpp kernels, un-captured / graphed sampler, fused training step); a
    row without one shows no rates, and an op with none at all (the ceilings, the linear layers) rates its fastest
    implementation and says so.
    """
    by_op: dict[str, dict[tuple[str, str], dict[str, dict[str, Any]]]] = {}
    for r in records:
        by_op.setdefault(r["op"], {}).setdefault((goals.shape_label(r["shape"]), r["dtype"]), {})[r["impl"]] = r
    return "\n\n".join(_op_table(op, groups) for op, groups in by_op.items())


def _impl_columns(seen: Iterable[str]) -> list[str]:
    """The implementations in ``seen``, in IMPL_ORDER, then any others in the order they came."""
    seen = list(seen)
    return [i for i in IMPL_ORDER if i in seen] + list(dict.fromkeys(i for i in seen if i not in IMPL_ORDER))


def _ms_cell(row: dict[str, Any]) -> str:
    """A row's ms in an op table, marked where its time may hold host time (goals.host_in_device_time)."""
    return _fmt(row["ms"], "n") + (HOST_MARK if goals.host_in_device_time(row) else "")


def _op_table(op: str, groups: dict[tuple[str, str], dict[str, dict[str, Any]]]) -> str:
    impl_cols = _impl_columns(impl for g in groups.values() for impl in g)
    cols = ["shape", "dtype", *(f"{i} ms" for i in impl_cols), "ours vs eager", "ours vs compile", "images/s",
            "GB/s", "% of copy", "TFLOP/s", "% of matmul"]
    has_ours = any(i in OURS for i in impl_cols)
    body = []
    for (shape, dtype), by_impl in groups.items():
        ours = [by_impl[i] for i in OURS if i in by_impl]
        # a baseline's rates in a column of ours would pass for ours: only an op without any row of ours shows them
        rated = ours if has_ours else list(by_impl.values())
        best = min(rated, key=lambda r: r["ms"]) if rated else {}
        baselines = [[by_impl[i]["ms"] for i in names if i in by_impl] for names in (goals.EAGER, goals.COMPILED)]
        speedups = [min(ms) / best["ms"] if ours and ms else None for ms in baselines]
        body.append([shape, dtype, *(_ms_cell(by_impl[i]) if i in by_impl else "–" for i in impl_cols),
                     *(_fmt(x, "x") for x in speedups), _fmt(best.get("images_per_s"), "n"),
                     _fmt(best.get("gbps"), "n"), _fmt(best.get("pct_copy"), "%"),
                     _fmt(best.get("tflops"), "n"), _fmt(best.get("pct_matmul"), "%")])
    derived = range(2 + len(impl_cols), len(cols))
    keep = [c for c in range(len(cols)) if c not in derived or any(row[c] != "–" for row in body)]
    lines = [f"#### {op}", ""]
    if not has_ours and any(c in derived for c in keep):
        lines += ["No implementation of ours: the rates are the fastest implementation's.", ""]
    lines += ["| " + " | ".join(cols[c] for c in keep) + " |", "|" + "---|" * len(keep)]
    lines += ["| " + " | ".join(row[c] for c in keep) + " |" for row in body]
    return "\n".join(lines)


COLD_STAGES = (("startup_s", "start-up"), ("cuda_init_s", "CUDA init"), ("build_s", "model build"),
               ("first_call_s", "first call"))


def cold_starts(records: Sequence[dict[str, Any]]) -> str:
    """A line per time-to-first-image row: its stages in seconds (start-up: the interpreter and the imports,
    with the torch and sphere_fast imports where the run recorded them; the first call with its graph capture's
    phases where recorded)."""
    lines = []
    for r in records:
        if not r["op"].startswith("first image"):
            continue
        imports = [f"{key[len('import_'):-len('_s')]} {value:.2f}" for key, value in r.items()
                   if key.startswith("import_") and key.endswith("_s")]
        phases = [f"{key[len('capture_'):-len('_s')].replace('_', ' ')} {value:.2f}" for key, value in r.items()
                  if key.startswith("capture_") and key.endswith("_s")]
        details = {"startup_s": imports and f"imports: {', '.join(imports)}",
                   "first_call_s": phases and f"capture: {', '.join(phases)}"}
        stages = [f"{label} {r[key]:.2f}" + (f" ({details[key]})" if details.get(key) else "")
                  for key, label in COLD_STAGES if key in r]
        lines.append(f"- {goals.first_image_label(r)}: {r['ms'] / 1e3:.1f} s = {' + '.join(stages)} s")
    return "Time to first image, by stage:\n\n" + "\n".join(lines) + "\n\n" if lines else ""


def _by_impl(records: Sequence[dict[str, Any]], key: str, unit: str, ops: str = "") -> str:
    """A table of the rows (of ops starting with ``ops``) that recorded ``key``: a line per case, a column per
    implementation, headed "<impl> <unit>"; empty where no row recorded it."""
    by_case: dict[str, dict[str, float]] = {}
    for r in records:
        if r.get(key) is not None and r["op"].startswith(ops):
            by_case.setdefault(f"{r['op']} {goals.shape_label(r['shape'])} {r['dtype']}", {})[r["impl"]] = r[key]
    if not by_case:
        return ""
    impl_cols = _impl_columns(impl for g in by_case.values() for impl in g)
    lines = ["| case | " + " | ".join(f"{i} {unit}" for i in impl_cols) + " |", "|" + "---|" * (len(impl_cols) + 1)]
    lines += [f"| {case} | " + " | ".join(_fmt(g.get(i), "n") for i in impl_cols) + " |" for case, g in by_case.items()]
    return "\n".join(lines)


def peak_memory(records: Sequence[dict[str, Any]]) -> str:
    """A table of the rows that recorded their peak memory (the sampler, the training step): GB above the
    weights, by implementation."""
    table = _by_impl(records, "peak_gb", "GB")
    return table and (
        "Peak memory above the weights and inputs a case found, from its first call (capture, compile, the "
        "first optimiser step) to its last timed one:\n\n" + table + "\n\n"
    )


def first_calls(records: Sequence[dict[str, Any]]) -> str:
    """A table of the sampler rows' first calls in seconds (a process's first call at that shape: the compile,
    capture or tuning it triggers, in a process that ran other cases before), by implementation."""
    table = _by_impl(records, "first_call_s", "s", ops="sample ")
    return table and (
        "Each sampler case's first call, in seconds (what a compile, capture or tuning at that shape costs a "
        "process that already ran other cases; time to first image above for a fresh process):\n\n" + table + "\n\n"
    )


def render(data: dict[str, Any], earlier: Sequence[tuple[str, Sequence[dict[str, Any]]]] = ()) -> str:
    """``data``'s header and tables; ``earlier`` (label, rows of an earlier lease, newest first) judges the goals
    ``data`` did not measure."""
    recs = rows(data)
    if not recs:
        return f"{header(data)}\n\nNo benchmark rows in this file."
    return (
        f"{header(data)}\n\n### Goals\n\n{goals.table(recs, earlier)}\n\n"
        f"### Pending choices\n\n{choices.table(recs, earlier)}\n\n"
        f"### All cases\n\n{table(recs)}\n\n"
        f"{cold_starts(recs)}{first_calls(recs)}{peak_memory(recs)}"
        "Times are medians of CUDA-event timings (L2 flushed before each op-suite call, not in the sampler's or the "
        "training step's loops or for the header's ceilings), except the dispatch rows: the host's clock per call, "
        "the fastest of five rounds (bench_dispatch.py), and the first image rows: one sample each, a fresh "
        "process's wall clock from the parent (bench_sampling.py). The op rows are device time: a GPU-side wait of "
        "about 0.5 ms before each call keeps up to that much of its launch's host cost out (the dispatch rows time "
        "that). Each row's samples are in the JSON; a row of four or more samples also has their quartiles (rows "
        "recorded before 2026-12-02: pytest-benchmark's, by its own method, of the same samples). "
        "A goal's value is from the medians, its range in brackets from the quartiles (a speedup's low end is "
        "ours' third quartile against the baseline's first): a goal is not met where a case's whole range falls "
        "short of its bar, \"within noise\" where a range spans it, and met where every range clears it; rows "
        "without quartiles are judged on their medians, except a time to first image from fewer than four "
        f"processes: its range is its time ±{goals.FIRST_IMAGE_NOISE:.0%}. A pending choice leaves out the pairs "
        "whose quartile ranges overlap. "
        "The op rows' torch.compile is its default mode, the sampler's max-autotune, the training step's "
        "max-autotune-no-cudagraphs. \"% of matmul\", and so the goals' model FLOP utilisation, divide by the bf16 "
        "matmul rate measured in the same run (the issue's measure), not by the GPU's datasheet peak, which is "
        "higher (989 TFLOP/s dense bf16 for an H200). "
        "The tables' speedups and rates are those of the faster of our implementations (triton / cpp kernels; the "
        "un-captured / graphed sampler; the training step on the fused backends); the goals judge what a user gets "
        "by default (triton, which `auto` runs on a GPU; the graphed sampler). The sampler's and the training "
        "step's eager rows run sphere_fast's ops on its eager backend, their checks and dispatch included, and the "
        "dispatch rows' eager spherify_noise is its pure-torch Philox (benchmarks/NOTES.md, 2026-12-01)."
    )


def results_from_rows(lines: Sequence[str], when: datetime, commit: dict[str, Any] | None = None) -> dict[str, Any]:
    """A results JSON like pytest-benchmark's, rebuilt from the rows harness.stream_row wrote (for a run cut
    off before pytest-benchmark wrote its own): the environment (with the ceilings) and every case recorded."""
    env: dict[str, Any] = {}
    cases = []
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the last line of a killed run may be cut short
            continue
        if row.get("kind") == "environment":
            env = {**row["sphere_fast"], "clocks_at": "start"}  # streamed as the session starts (conftest)
        elif row.get("kind") == "case":
            cases.append({"name": row["name"], "extra_info": row["extra_info"]})
    return {
        "machine_info": {"sphere_fast": env},
        "commit_info": commit or {},
        "datetime": when.isoformat(),
        "partial": True,
        "benchmarks": cases,
    }


# A lent machine is held for at most 30 minutes: files further apart are not one lease's calls.
LEASE_S = 30 * 60


def _lease_key(data: dict[str, Any]) -> tuple[str, ...] | None:
    """What a file's lease is known by, or None where it stands alone: a tree known to be the one sent
    (tree_verified) with the device, dirty or not; without that, a clean stated commit with the digest of the tree
    measured (where there is one) and the device. A dirty or unknown commit is not known to be the tree another
    call measured (each call takes the working tree afresh, and a lent machine's git id is stale)."""
    commit = data.get("commit_info", {})
    device = environment(data).get("device", "")
    if tree_verified(commit):
        return commit["tree"], device
    if not commit.get("id") or commit.get("dirty") is not False or commit.get("tree_sent"):
        return None
    return commit["id"], commit.get("tree", ""), device  # the tree measured, where digested, must agree too


def _seconds(data: dict[str, Any]) -> float | None:
    try:
        return datetime.fromisoformat(data.get("datetime") or "").timestamp()
    except ValueError:
        return None


def _same_lease(first: dict[str, Any], later: dict[str, Any]) -> bool:
    """Whether ``later`` is a call of the lease whose first call wrote ``first``: the same tree (_lease_key) and
    device, within LEASE_S of it."""
    key, start, end = _lease_key(first), _seconds(first), _seconds(later)
    return (key is not None and key == _lease_key(later) and start is not None and end is not None
            and 0 <= end - start <= LEASE_S)


def _case_key(row: dict[str, Any]) -> tuple[str, str, str, str]:
    return row["op"], row["impl"], goals.shape_label(row["shape"]), row["dtype"]


def gpu_results(results_dir: Path = RESULTS_DIR) -> list[tuple[Path, dict[str, Any]]]:
    """The GPU (non-smoke) results files in ``results_dir`` with their contents, oldest first by recorded date."""
    found = []
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        if is_gpu_result(data):
            found.append((data.get("datetime", ""), path, data))
    return [(path, data) for _, path, data in sorted(found, key=lambda f: f[0])]


def leases(found: Sequence[tuple[Path, dict[str, Any]]]) -> list[tuple[list[Path], dict[str, Any]]]:
    """``found`` (gpu_results: oldest first) by lease, newest first: the files of one lease's calls (_same_lease)
    merged into the newest one's, a case measured twice keeping its newest row."""
    by_lease: list[list[tuple[Path, dict[str, Any]]]] = []
    for path, data in found:
        lease = next((files for files in by_lease if _same_lease(files[0][1], data)), None)
        if lease is None:
            by_lease.append([(path, data)])
        else:
            lease.append((path, data))
    merged_leases = []
    for lease in sorted(by_lease, key=lambda files: files[-1][1].get("datetime", ""), reverse=True):
        merged: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        for _, data in lease:
            merged.update((_case_key(r), {"extra_info": r}) for r in rows(data))
        partial = any(data.get("partial") for _, data in lease)
        merged_leases.append(([path for path, _ in lease], {**lease[-1][1], "partial": partial,
                                                            "merged_calls": len(lease),
                                                            "benchmarks": list(merged.values())}))
    return merged_leases


def readme_section(results_dir: Path = RESULTS_DIR) -> str:
    found = gpu_results(results_dir)
    if not found:
        return NOT_MEASURED
    (paths, data), *older = leases(found)
    names = " and ".join(f"`benchmarks/results/{path.name}`" for path in paths)
    files = [f"`{path.name}`" for path, _ in found if path not in paths]
    # the newest lease alone is tabled (one commit's numbers); older leases measured cases it may not have, and
    # judge the goals it did not measure (on the same GPU model only)
    note = (f" Earlier leases' files, for the cases this one did not measure: {', '.join(files)} (print one "
            "with `python -m benchmarks.report benchmarks/results/<file>`); a goal or choice this one did not "
            "measure shows the newest earlier lease's verdict, with its date and commit (measured on older code)."
            if files else "")
    device = environment(data).get("device")
    earlier = [(lease_label(old), rows(old)) for _, old in older if environment(old).get("device") == device]
    return f"From {names}.{note}\n\n{render(data, earlier)}"


def replace_section(text: str, section: str) -> str:
    """``text`` with everything between the perf markers replaced by ``section``."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"README must hold exactly one {START} followed by one {END}")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{section}\n{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="?", type=Path, help="a pytest-benchmark JSON to print as a table")
    parser.add_argument("--readme", type=Path, help="regenerate this README's perf section")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="results folder (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="with --readme: exit 1 if the section is stale")
    args = parser.parse_args(argv)
    if args.json is None and args.readme is None:
        parser.error("give a results JSON or --readme")
    if args.json is not None:
        print(render(json.loads(args.json.read_text())))
    if args.readme is not None:
        text = args.readme.read_text()
        new = replace_section(text, readme_section(args.results))
        if args.check:
            if new != text:
                print(f"{args.readme}: performance section is stale; "
                      f"run python -m benchmarks.report --readme {args.readme}")
                return 1
        elif new != text:
            args.readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
