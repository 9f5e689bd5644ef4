"""Build every C++/CUDA extension against a CUDA build of torch (no GPU needed) and check that each op
registered a CUDA kernel. Run by .ci/cuda_build_check.sh inside a venv holding torch 2.14.1 cu13.0."""

import importlib

import torch

# (op module, its extension loader, an op of the extension)
EXTENSIONS = [
    ("sphere_fast.ops.spherify", "_cpp_ext", "sphere_fast_cpp::spherify_fwd"),
    ("sphere_fast.ops.spherify", "_cpp_ext", "sphere_fast_cpp::philox_below"),  # the seeded labels' op
    ("sphere_fast.ops.adaln", "_cpp_ext", "sphere_fast_adaln::fwd"),
    ("sphere_fast.ops.swiglu", "_cpp_ext", "sphere_fast_swiglu::fwd"),
]


def main() -> None:
    assert torch.version.cuda is not None, f"needs a CUDA build of torch, got {torch.__version__}"
    for module, loader, op in EXTENSIONS:
        getattr(importlib.import_module(module), loader)()
        keys = {line.split(":")[0] for line in torch._C._dispatch_dump(op).splitlines()}
        assert {"CPU", "CUDA"} <= keys, f"{op} lacks a CPU or CUDA kernel: {sorted(keys)}"
        print(f"built {module}: {op} has CPU and CUDA kernels")


if __name__ == "__main__":
    main()
