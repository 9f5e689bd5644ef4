"""Benchmark fixtures: the device ceilings, measured once per session, and the run's environment in the JSON."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from benchmarks import harness

_session_ceilings: list[harness.Ceilings | None] = []


@pytest.fixture(scope="session")
def ceilings() -> harness.Ceilings | None:
    """Copy GB/s and bf16 matmul TFLOP/s of this device in this run; None on CPU."""
    if not _session_ceilings:
        _session_ceilings.append(harness.measure_ceilings())
    return _session_ceilings[0]


def pytest_benchmark_update_machine_info(config: Any, machine_info: dict[str, Any]) -> None:
    # report.py reads device, versions, clocks and ceilings from here.
    machine_info["sphere_fast"] = harness.environment(_session_ceilings[0] if _session_ceilings else None)


def pytest_runtest_setup(item: pytest.Item) -> None:
    # gpu_check sets a deadline so that a suite running long still ends cleanly and writes its JSON.
    deadline = os.environ.get("SPHERE_FAST_BENCH_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("gpu_check time budget spent (SPHERE_FAST_BENCH_DEADLINE)")
