"""Every GPU check in one command: build the CUDA extensions for sm_90a, run the GPU tests (marked gpu or
cuda_capable), run the benchmark suites at real sizes, and write JSON plus a markdown report to a folder; the
report prints last.

    bash benchmarks/gpu_check.sh OUTDIR            # or: python -m benchmarks.gpu_check OUTDIR

Each phase runs in its own process group under a timeout, all inside --budget seconds (default 450, so
the whole check ends inside 8 minutes); the benchmarks get whatever time the earlier phases left, run the
headline cases first (benchmarks/conftest.py: HEADLINE) and stream each case to disk, so a run cut off at
its limit still yields its results. On an H200 (2026-11-28) the build took 23-27 s and the GPU tests 106 s,
so the benchmarks need runs of their own: ``--phases install,build,bench --bench-k "spherify or adaln"``
(a pytest -k expression) picks the cases, ``--tests-k`` the GPU tests, and ``--case-timeout`` lets one case
run longer than 240 s (a torch.compile max-autotune case). Without a CUDA device the GPU phases are skipped,
and the report says so; a short summary (phases and goal verdicts) prints after it. The profile phase runs a
sampler call at batch 64 and at batch 1 under torch.profiler (benchmarks/profile_sampler.py). The sanitize phase,
only when --phases names it, runs small GPU tests of every kernel (--sanitize-k) under compute-sanitizer's memcheck,
which fails on an access past a tensor that left the values right. Files in OUTDIR
(at most 8, flat, as the device tool returns them): env.json, <phase>.log, bench-<date>-<device>.json (copy it
to benchmarks/results/ to publish it), report.md.
Exit status 1 if a phase failed or ran out of time.

The golden-parity GPU tests read the reference data from $SPHERE_FAST_REFERENCE (default ../shared/reference)
and skip without it. On a lent machine that only receives the working tree, copy it into the ignored
.reference/ first and carry that folder: ``cp -r ../shared/reference .reference``, then run
``bash benchmarks/gpu_check.sh $OUT`` with ``.reference`` carried (the script points the variable there).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import choices, goals, harness, report

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("install", "build", "tests", "sanitize", "profile", "bench")
# memcheck slows the kernels many times over: a call of its own, by --phases
DEFAULT_PHASES = tuple(p for p in PHASES if p != "sanitize")
# bench: the rest of the budget
PHASE_LIMITS_S = {"install": 90, "build": 150, "tests": 180, "sanitize": 300, "profile": 90, "bench": 600}
# The sanitize phase's GPU tests: every kernel family at small shapes, on strided, unaligned, one-value and empty
# inputs, where a mask or bound that is off reads or writes past a tensor (on CPU the interpreter aborted there).
SANITIZE_K = ("off_16_byte or strided_inputs or one_value_samples or noise_for_no_samples or last_strides or "
              "strided_rope or k_and_v_alone or (test_swiglu and 3x7x96) or seeded_labels")
MIN_PHASE_S = 10  # below this a phase is not started
TEST_WORKERS = 6
# the Triton attention and RoPE-pass tests, then the fused-MLP GEMM's (new kernels and launch configs first run
# on a GPU there), each group in processes of its own
FUSED_MLP_TESTS = ("tests/test_swiglu_linear.py",)
ISOLATED_GROUPS = (("tests/test_attention.py", "tests/test_rope.py", "tests/test_tuning.py"), FUSED_MLP_TESTS)
# An opt-in kernel's benchmark cases (a pytest -k expression), run only once its test group passed in this
# check: a kernel that fails its tests may crash, and a crash ends every later case of the benchmark process.
OPT_IN_CASES = {FUSED_MLP_TESTS: "mlp_up or fused_mlp"}
ISOLATED_TESTS = tuple(t for group in ISOLATED_GROUPS for t in group)
TEST_GROUPS = (*(list(g) for g in ISOLATED_GROUPS), ["tests", *(f"--ignore={t}" for t in ISOLATED_TESTS)])
# seconds a test may take, by phase (a torch.compile(max-autotune) bench case compiles for minutes)
PER_TEST_TIMEOUT_S = {"tests": 120, "sanitize": 120, "bench": 240}
JSON_MARGIN_S = 30  # bench cases stop starting this long before the phase limit
DURATIONS_SHOWN = 30

# One tiny CUDA call per op that has a C++ backend: its first call compiles the op's extension (lazily,
# through sphere_fast._extension.load_extension). Keep in step with the ops' signatures.
BUILD_CALLS: dict[str, str] = {
    "spherify": "ops.spherify(torch.randn(2, 3, 8, 8, device='cuda'), backend='cpp')",
    "spherify_noise": (
        "ops.spherify_noise(torch.randn(2, 3, 8, 8, device='cuda'), 0.5, "
        "seeds=torch.arange(2, device='cuda'), backend='cpp')"
    ),
    "adaln_modulate": (
        "ops.adaln_modulate(torch.randn(2, 4, 64, device='cuda'), torch.randn(64, device='cuda'), "
        "torch.randn(2, 1, 64, device='cuda'), torch.randn(2, 1, 64, device='cuda'), backend='cpp')"
    ),
    "swiglu": "ops.swiglu(torch.randn(2, 4, 128, device='cuda'), backend='cpp')",
}


@dataclass
class Phase:
    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float
    note: str = ""


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """Wait for ``proc``; at ``timeout`` kill its process group (its ninja / nvcc / pytest children too)."""
    try:
        return proc.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def run_logged(
    cmd: Sequence[str], log: Path, timeout: float, env: Mapping[str, str] | None = None, ok_codes: Sequence[int] = (0,)
) -> tuple[str, float]:
    """Run ``cmd`` in its own process group with output appended to ``log``; (ok | failed | timeout, seconds)."""
    start = time.monotonic()
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(
            list(cmd), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=dict(env or os.environ),
            start_new_session=True,
        )
        rc = _stop(proc, timeout)
        if rc is None:
            out.write(f"\n[gpu_check] killed after {timeout:.0f} s\n")
    status = "timeout" if rc is None else ("ok" if rc in ok_codes else "failed")
    return status, time.monotonic() - start


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


class Check:
    """Runs the phases in order against one deadline and collects what the report shows."""

    def __init__(
        self, out: Path, budget_s: float, phases: Sequence[str], cuda: bool, bench_k: str = "",
        case_timeout_s: float = PER_TEST_TIMEOUT_S["bench"], tests_k: str = "", sanitize_k: str = SANITIZE_K,
    ) -> None:
        self.out = out
        self.bench_k = bench_k
        self.tests_k = tests_k
        self.sanitize_k = sanitize_k
        self.timeouts = {**PER_TEST_TIMEOUT_S, "bench": case_timeout_s}
        self.deadline = time.monotonic() + budget_s
        self.phases = phases
        self.cuda = cuda
        self.results: list[Phase] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")  # sm_90a: wgmma / setmaxnreg kernels
        self.env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
        self.bench_json: Path | None = None
        self.unverified_cases: list[str] = []  # OPT_IN_CASES whose tests did not pass in this check

    def skip(self, name: str, why: str) -> None:
        self.results.append(Phase(name, "skipped", 0.0, why))
        print(f"[gpu_check] {name}: skipped ({why})", flush=True)

    def limit(self, name: str) -> float | None:
        """Seconds phase ``name`` may take, or None (recorded as skipped) when the budget is spent."""
        left = min(PHASE_LIMITS_S[name], self.deadline - time.monotonic())
        if left < MIN_PHASE_S:
            self.skip(name, "out of time budget")
            return None
        return left

    def done(self, phase: Phase) -> None:
        self.results.append(phase)
        print(f"[gpu_check] {phase.name}: {phase.status} in {phase.seconds:.0f} s; {phase.note}", flush=True)

    def timed(
        self,
        name: str,
        cmd: Sequence[str],
        note: str,
        ok_codes: Sequence[int] = (0,),
        env: Mapping[str, str] | None = None,
    ) -> None:
        limit = self.limit(name)
        if limit is not None:
            status, secs = run_logged(cmd, self.out / f"{name}.log", limit, {**self.env, **(env or {})}, ok_codes)
            self.done(Phase(name, status, secs, note if status == "ok" else f"see {name}.log"))

    def run(self, name: str) -> None:
        if name not in self.phases:
            self.skip(name, "not requested (--phases)")
        elif name == "install":
            self.install()
        elif not self.cuda:
            self.skip(name, "no CUDA device: torch.cuda.is_available() is False")
        else:
            getattr(self, name)()

    def install(self) -> None:
        # sphere_fast imported from this checkout takes csrc/ and kernels/ from it too (sphere_fast._checkout),
        # where the lazy extension builds look for their sources; otherwise an install makes them importable.
        start = time.monotonic()
        spec = importlib.util.find_spec("sphere_fast.csrc")
        if spec is not None and spec.origin and Path(spec.origin).resolve().is_relative_to(ROOT):
            self.done(Phase("install", "ok", time.monotonic() - start, "sphere_fast imports from this checkout"))
            return
        self.timed(
            "install",
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(ROOT)],
            "pip install -e . (editable, no deps)",
        )

    def build(self) -> None:
        limit = self.limit("build")
        if limit is None:
            return
        start = time.monotonic()
        # One process per op, all at once: each extension is its own ninja build.
        procs = {}
        for name, call in BUILD_CALLS.items():
            op_log = self.out / f".build-{name}.log"
            script = (f"import torch\nfrom sphere_fast import ops\n{call}\n"
                      "if torch.cuda.is_available():\n    torch.cuda.synchronize()  # surface launch errors here\n")
            with op_log.open("w") as out:
                procs[name] = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=out,
                                               stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        failed = []
        with (self.out / "build.log").open("a") as log:
            for name, proc in procs.items():
                rc = _stop(proc, limit - (time.monotonic() - start))
                if rc != 0:
                    failed.append(f"{name} ({'timeout' if rc is None else 'failed'})")
                op_log = self.out / f".build-{name}.log"
                log.write(f"===== {name}: {BUILD_CALLS[name]} -> {'timeout' if rc is None else f'exit {rc}'}\n")
                log.write(op_log.read_text(errors="replace"))
                op_log.unlink()
        if not failed:
            phase = Phase("build", "ok", time.monotonic() - start, f"{len(procs)} ops built and ran with backend='cpp'")
        else:
            status = "timeout" if all("timeout" in f for f in failed) else "failed"
            phase = Phase("build", status, time.monotonic() - start, "; ".join(failed) + "; see build.log")
        self.done(phase)

    def pytest(self, phase: str, *args: str) -> list[str]:
        # A hung case fails alone (pytest-timeout) instead of eating the phase.
        timeout = ["--timeout", f"{self.timeouts[phase]:.0f}"] if importlib.util.find_spec("pytest_timeout") else []
        # --durations: the slowest cases in the phase's log, to plan what the next lease's budget can hold
        return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--durations={DURATIONS_SHOWN}",
                *timeout, *args]

    def tests(self) -> None:
        limit = self.limit("tests")
        if limit is None:
            return
        # Spread over processes (pytest-xdist): Triton's JIT compiles are CPU-bound and the tests are small.
        workers = ["-n", str(TEST_WORKERS)] if importlib.util.find_spec("xdist") else []
        marks = "gpu or cuda_capable"
        select = ["-k", self.tests_k] if self.tests_k else []
        start, statuses = time.monotonic(), []
        # An illegal address poisons the CUDA context of its process for every later test there: the
        # attention and RoPE kernels' tests get a process of their own. Exit 5 means no test was selected.
        for group in TEST_GROUPS:
            left = limit - (time.monotonic() - start)
            cmd = self.pytest("tests", *group, "-m", marks, *select, *workers)
            statuses.append(run_logged(cmd, self.out / "tests.log", left, self.env, ok_codes=(0, 5))[0])
            # with --tests-k a group may have run none of its tests: its kernel is not verified
            if (statuses[-1] != "ok" or self.tests_k) and tuple(group) in OPT_IN_CASES:
                self.unverified_cases.append(OPT_IN_CASES[tuple(group)])
        # a failure outranks a timeout, as in the build phase: it is a result, a timeout asks for more time
        status = next((s for s in ("failed", "timeout") if s in statuses), "ok")
        note = f'pytest -m "{marks}"{f" -k {self.tests_k!r}" if self.tests_k else ""}, {len(TEST_GROUPS)} groups'
        note = note if status == "ok" else "see tests.log"
        if self.unverified_cases:
            note += f"; benchmarks left out: {' / '.join(self.unverified_cases)}"
        self.done(Phase("tests", status, time.monotonic() - start, note))

    def sanitize(self) -> None:
        """GPU tests under compute-sanitizer's memcheck: an access past a tensor fails here even where the values
        came out right. Each tensor gets an allocation of its own (no caching allocator), so such an access
        falls outside every allocation, where memcheck sees it."""
        tool = shutil.which("compute-sanitizer")
        if tool is None:
            self.skip("sanitize", "compute-sanitizer is not on the PATH")
            return
        memcheck = [tool, "--tool", "memcheck", "--error-exitcode", "1", "--print-limit", "20"]
        cmd = [*memcheck, *self.pytest("sanitize", "tests", "-m", "gpu or cuda_capable", "-k", self.sanitize_k)]
        self.timed("sanitize", cmd, f"memcheck, no errors: -k {self.sanitize_k!r}",
                   env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})

    def profile(self) -> None:
        # the sampler's kernels grouped (matmul, attention, fused ops): where its time goes, in profile.log
        cmd = [sys.executable, "-m", "benchmarks.profile_sampler"]
        self.timed("profile", cmd, "sampler kernel groups in profile.log")

    def bench(self) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M")
        device = re.sub(r"[^a-z0-9]+", "-", _device_name().lower()).strip("-")
        self.bench_json = self.out / f"bench-{stamp}-{device}.json"
        rows = self.out / ".bench-rows.jsonl"
        # Cases starting after the deadline are skipped, so pytest still ends and writes the JSON in time.
        left = self.deadline - time.monotonic()
        deadline = time.time() + min(PHASE_LIMITS_S["bench"], left) - JSON_MARGIN_S
        select = ["-k", self.bench_selection()] if self.bench_k or self.unverified_cases else []
        cmd = self.pytest("bench", "benchmarks", "--run-slow", "--benchmark-enable",
                          f"--benchmark-json={self.bench_json}", *select)
        env = {"SPHERE_FAST_BENCH_DEADLINE": f"{deadline:.0f}", harness.ROWS_ENV: str(rows)}
        self.timed("bench", cmd, "benchmarks at real sizes, headline cases first", env=env)
        if rows.exists() and _read_json(self.bench_json) is None:
            # a case ran past the phase limit and pytest was killed before writing its JSON (pytest-benchmark
            # creates the file, empty, when it starts)
            data = report.results_from_rows(rows.read_text().splitlines(), datetime.now(timezone.utc), _commit())
            self.bench_json.write_text(json.dumps(data, indent=2))
            self.results[-1].note += f"; JSON rebuilt from the {len(data['benchmarks'])} cases streamed before the cut"
        rows.unlink(missing_ok=True)

    def bench_selection(self) -> str:
        """The -k expression of the bench phase: --bench-k, less the cases of opt-in kernels whose tests failed."""
        terms = [f"({self.bench_k})"] if self.bench_k else []
        terms += [f"not ({cases})" for cases in self.unverified_cases]
        return " and ".join(terms)

    def report(self, env_info: Mapping[str, object], total_s: float) -> str:
        smi = env_info.get("nvidia_smi") or {}
        lines = [
            "# GPU check",
            "",
            f"Device {env_info['device']}, driver {smi.get('driver_version', '–')}, torch {env_info['torch']} "
            f"(CUDA {env_info['cuda']}), triton {env_info['triton']}, Python {sys.version.split()[0]}; "
            f"clocks before: SM {smi.get('clocks.sm', '–')}, memory {smi.get('clocks.mem', '–')}. "
            f"Total {total_s:.0f} s.",
        ]
        if not self.cuda:
            lines += ["", "**No CUDA device: the build, GPU tests and benchmarks were skipped.**"]
        lines += ["", self.phase_table()]
        for p in self.results:
            if p.status in ("failed", "timeout"):
                lines += ["", f"{p.name}.log (end):", "```", tail(self.out / f"{p.name}.log"), "```"]
        lines.append("")
        data = _read_json(self.bench_json)
        if data is not None:
            lines.append(report.render(data))
        else:
            lines.append("No benchmark results in this run.")
        return "\n".join(lines) + "\n"


    def phase_table(self) -> str:
        lines = ["| phase | status | seconds | note |", "|---|---|---|---|"]
        return "\n".join(lines + [f"| {p.name} | {p.status} | {p.seconds:.0f} | {p.note} |" for p in self.results])

    def summary(self) -> str:
        """The phases, the goal verdicts and the pending choices: short, printed after the full report so an
        output tail holds it."""
        lines = ["## Summary", "", self.phase_table(), ""]
        data = _read_json(self.bench_json)
        if data is not None:
            lines += [goals.table(report.rows(data)), "", choices.table(report.rows(data))]
        else:
            lines.append("No benchmark results in this run.")
        return "\n".join(lines) + "\n"


def _read_json(path: Path | None) -> dict[str, object] | None:
    """The benchmark JSON at ``path``, or None where there is none or it is empty or cut short."""
    try:
        return json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None


def _commit() -> dict[str, object]:
    """The checkout's commit, as pytest-benchmark records it (empty where this is no git checkout), or the one
    $SPHERE_FAST_COMMIT states."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
        git = {"id": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.CalledProcessError):
        git = {}
    return harness.stated_commit(git)


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for the JSON, logs and report.md")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all phases (default %(default)s)")
    parser.add_argument("--phases", default=",".join(DEFAULT_PHASES),
                        help=f"comma-separated subset of {','.join(PHASES)} (default %(default)s)")
    parser.add_argument("--bench-k", default="", help="pytest -k expression choosing the benchmark cases (default: all)")
    parser.add_argument("--tests-k", default="", help="pytest -k expression choosing the GPU tests (default: all; "
                        "leaves out the opt-in kernels' benchmarks)")
    parser.add_argument("--sanitize-k", default=SANITIZE_K, help="pytest -k expression choosing the GPU tests run "
                        "under compute-sanitizer (default: small cases of every kernel)")
    parser.add_argument("--case-timeout", type=float, default=PER_TEST_TIMEOUT_S["bench"],
                        help="seconds one benchmark case may run (default %(default)s; a max-autotune compile may need more)")
    args = parser.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from {PHASES}")

    import torch

    start = time.monotonic()
    measured = harness.tree_at_start()  # the tree as sent: before the build writes into it
    if measured:  # ... and so for the benchmark processes this one starts
        os.environ[harness.TREE_ENV] = measured
    args.out.mkdir(parents=True, exist_ok=True)
    env_info = harness.environment()
    (args.out / "env.json").write_text(json.dumps(env_info, indent=2))
    check = Check(args.out, args.budget, phases, torch.cuda.is_available(), args.bench_k, args.case_timeout,
                  args.tests_k, args.sanitize_k)
    if not check.cuda:
        print("[gpu_check] no CUDA device: skipping the build, GPU tests and benchmarks", flush=True)
    for name in PHASES:
        check.run(name)
    text = check.report(env_info, time.monotonic() - start)
    (args.out / "report.md").write_text(text)
    print(text, flush=True)
    print(check.summary(), flush=True)  # last, so the device tool's output tail holds it
    return 1 if any(p.status in ("failed", "timeout") for p in check.results) else 0


if __name__ == "__main__":
    sys.exit(main())
