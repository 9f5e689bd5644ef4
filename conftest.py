"""Test setup: Triton kernels run in the interpreter on CPU (must be set before any kernel import)."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def interpret_dots_row_by_row() -> None:
    """The interpreter's tl.dot is one numpy matmul, and OpenBLAS may sum a row's products in another order for
    another tile height (it does on AVX-512 machines): the same kernel with another row block would then differ
    in the last bit where a GPU's MMA gives the same bits, and the tuning, which drops a candidate that changes a
    bit, would too. A batch of one-row products sums each row the same way whatever the tile."""
    import numpy as np
    from triton.runtime import interpreter

    dot = interpreter.InterpreterBuilder.create_dot

    def row_by_row_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.primitive_bitwidth == 8 or b.dtype.primitive_bitwidth == 8:  # fp8: the interpreter's own path
            return dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        rows = np.matmul(np.expand_dims(a.data, -2), np.expand_dims(b.data, -3), dtype=d.data.dtype)
        return interpreter.TensorHandle(rows.squeeze(-2) + d.data, d.dtype.scalar)

    interpreter.InterpreterBuilder.create_dot = row_by_row_dot


if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    interpret_dots_row_by_row()


def reference_dir() -> Path:
    return Path(os.environ.get("SPHERE_FAST_REFERENCE", Path(__file__).resolve().parents[1] / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference() -> Path:
    path = reference_dir()
    if not (path / "official_state_dict" / "presets.json").exists():
        pytest.skip(f"reference data not found at {path} (set SPHERE_FAST_REFERENCE)")
    return path


# torch's float32 settings as the session began
FLOAT32_SETTINGS = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32


@pytest.fixture(autouse=True)
def keep_float32_precision():
    """A Trainer turns TF32 on for its process (as the official training does), one that a module-scoped fixture
    builds too: every test and benchmark case ends with the session's first float32 settings, so no later one
    inherits TF32 (on a GPU, float32 attention under ``auto`` would take the TF32 kernel)."""
    yield
    torch.set_float32_matmul_precision(FLOAT32_SETTINGS[0])
    torch.backends.cudnn.allow_tf32 = FLOAT32_SETTINGS[1]


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
