"""When the C++ extensions include their CUDA sources (sphere_fast._extension.cuda_build_possible)."""

from __future__ import annotations

import pytest
import torch

from sphere_fast import _extension


@pytest.mark.parametrize(
    "cuda_version,nvcc,cuda_home,gpu,arch_list,expected",
    [
        (None, True, "", False, "9.0a", False),  # CPU torch: nothing to link CUDA code against
        ("13.0", False, "", True, "", False),  # no nvcc
        ("13.0", False, "/usr/local/cuda", True, "", True),  # nvcc off the PATH, where CUDA_HOME says
        ("13.0", True, "", True, "", True),  # the architecture of the visible GPU
        ("13.0", True, "", False, "9.0a", True),  # a GPU-less build machine naming its target
        ("13.0", True, "", False, "", False),  # no target: torch's detection would fail, build the CPU ops only
    ],
)
def test_cuda_build_possible(
    monkeypatch: pytest.MonkeyPatch, cuda_version: str | None, nvcc: bool, cuda_home: str, gpu: bool, arch_list: str,
    expected: bool,
) -> None:
    monkeypatch.setattr(torch.version, "cuda", cuda_version)
    monkeypatch.setattr(_extension.shutil, "which", lambda name: "/usr/bin/nvcc" if nvcc else None)
    monkeypatch.setenv("CUDA_HOME", cuda_home)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    assert _extension.cuda_build_possible() is expected
