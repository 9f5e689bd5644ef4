"""Test setup: Triton kernels run in the interpreter on CPU (must be set before any kernel import)."""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def reference_dir() -> Path:
    return Path(os.environ.get("SPHERE_FAST_REFERENCE", Path(__file__).resolve().parents[1] / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference() -> Path:
    path = reference_dir()
    if not (path / "official_state_dict" / "presets.json").exists():
        pytest.skip(f"reference data not found at {path} (set SPHERE_FAST_REFERENCE)")
    return path


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests and benchmarks marked slow")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
