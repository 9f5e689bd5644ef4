"""The sm_90 compile-check tools (tests/sm90.py) on a tiny Triton kernel and a tiny torch-free .cu."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import sm90

triton = pytest.importorskip("triton")
tl = triton.language

needs_cuobjdump = pytest.mark.skipif(
    sm90.find_cuobjdump() is None, reason="cuobjdump not found (nor triton's bundled one)"
)
needs_nvcc = pytest.mark.skipif(sm90.find_nvcc() is None, reason="nvcc not found on PATH or in CUDA_HOME")


@triton.jit
def _double(x):
    return x * 2.0


@triton.jit
def scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, _double(tl.load(x_ptr + offs, mask=mask)), mask=mask)


@triton.jit
def dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    m = tl.arange(0, M)
    n = tl.arange(0, N)
    k = tl.arange(0, K)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b))


@needs_cuobjdump
def test_triton_elementwise_compiles_for_sm90() -> None:
    info = sm90.compile_triton_sm90(
        scale_kernel,
        {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"},
        {"BLOCK": 1024},
        num_warps=4,
        aligned=("x_ptr", "y_ptr", "n"),  # what the JIT assumes for torch tensors and n % 16 == 0
    )
    assert info.name == "scale_kernel"
    assert 0 < info.resources.registers <= 255
    assert "sm_90a" in info.ptx.split(".target", 1)[1].splitlines()[0]
    sm90.assert_no_spills(info)
    ops = sm90.count_opcodes(info.sass())
    # 1024 elements / 128 threads = 8 fp32 each: aligned pointers and n must give 128-bit accesses.
    assert ops["LDG.E.128"] >= 1 and ops["STG.E.128"] >= 1, ops
    assert not any(op.startswith(("LDL", "STL")) for op in ops)


@needs_cuobjdump
def test_triton_alignment_hint_changes_code() -> None:
    # Default: pointers aligned, n not known divisible by 16, so the masked loads stay scalar.
    info = sm90.compile_triton_sm90(scale_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}, {"BLOCK": 1024})
    ops = sm90.count_opcodes(info.sass())
    assert ops["LDG.E.128"] == 0 and ops["LDG.E"] >= 1, ops


@needs_cuobjdump
def test_triton_bf16_dot_uses_wgmma() -> None:
    info = sm90.compile_triton_sm90(
        dot_kernel, {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32"}, {"M": 64, "N": 64, "K": 64}
    )
    assert any(op.startswith("HGMMA") for op in sm90.count_opcodes(info.sass())), "expected HGMMA (wgmma) on sm_90a"
    assert info.launch_shared > 0  # operands are staged through (dynamic) shared memory for wgmma


def test_triton_bad_signature_names_the_argument() -> None:
    with pytest.raises((ValueError, sm90.CompileError), match="nope"):
        sm90.compile_triton_sm90(
            scale_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "nope": "i32"}, {"BLOCK": 64}
        )


CUDA_SOURCE = r"""
extern "C" __global__ void axpy(float* __restrict__ y, const float* __restrict__ x, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += a * x[i];
}

// A register array indexed at run time goes to the stack frame (local memory).
template <int N>
__global__ void gather_local(float* y, const int* idx) {
    float buf[N];
    for (int i = 0; i < N; ++i) buf[i] = y[i] * 2.0f;
    y[threadIdx.x] = buf[idx[threadIdx.x]];
}
template __global__ void gather_local<256>(float*, const int*);

__global__ void uses_smem(float* y) {
    __shared__ float tile[256];
    tile[threadIdx.x] = y[threadIdx.x];
    __syncthreads();
    y[threadIdx.x] = tile[255 - threadIdx.x];
}
"""


@needs_nvcc
@needs_cuobjdump
def test_cuda_resources_and_spill_check(tmp_path: Path) -> None:
    src = tmp_path / "tiny.cu"
    src.write_text(CUDA_SOURCE)
    kernels = sm90.compile_cuda_sm90(src)
    assert set(kernels) >= {"axpy"} and len(kernels) == 3, sorted(kernels)
    axpy = kernels["axpy"]
    assert axpy.registers > 0 and axpy.stack == 0 and axpy.spill_stores == 0 and axpy.spill_loads == 0
    sm90.assert_no_spills(axpy)
    # cuobjdump's SHARED may add the 1 KB that sm_90 reserves per block to the 1 KB declared.
    assert 256 * 4 <= kernels.find("uses_smem").shared <= 2 * 256 * 4
    local = kernels.find("gather_local")
    assert local.stack >= 256 * 4
    with pytest.raises(AssertionError, match="gather_local.*STACK="):
        sm90.assert_no_spills(kernels)
    assert "FFMA" in kernels.sass()


@needs_nvcc
@needs_cuobjdump
def test_cuda_compiles_are_shared_until_a_source_or_header_changes(tmp_path: Path) -> None:
    (tmp_path / "inc").mkdir()
    header, src = tmp_path / "inc" / "scale.h", tmp_path / "scaled.cu"
    header.write_text("#define SCALE 2.0f\n")
    src.write_text('#include "scale.h"\n__global__ void scaled(float* y) { y[threadIdx.x] *= SCALE; }\n')
    first = sm90.compile_cuda_sm90(src, [tmp_path / "inc"])
    assert sm90.compile_cuda_sm90(src, [tmp_path / "inc"]) is first
    header.write_text("#define SCALE 3.0f\n")
    assert sm90.compile_cuda_sm90(src, [tmp_path / "inc"]) is not first
    src.write_text(src.read_text().replace("scaled", "renamed"))
    assert sm90.compile_cuda_sm90(src, [tmp_path / "inc"]).find("renamed").registers > 0


@needs_nvcc
def test_cuda_compile_error_carries_compiler_output(tmp_path: Path) -> None:
    src = tmp_path / "broken.cu"
    src.write_text("__global__ void k(float* y) { y[0] = undefined_name; }\n")
    with pytest.raises(sm90.CompileError, match="undefined_name"):
        sm90.compile_cuda_sm90(src)


def test_resource_parser_reads_every_field(monkeypatch: pytest.MonkeyPatch) -> None:
    report = """
Resource usage:
 Common:
  GLOBAL:0
 Function kern_a:
  REG:40 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:544 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function kern_b:
  REG:10 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:552 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    monkeypatch.setattr(sm90, "_cuobjdump", lambda cubin, flag: report)
    res = sm90.resource_usage(b"")
    assert res["kern_a"] == sm90.KernelResources("kern_a", registers=40, stack=16, shared=1024, local=8, constant=544)
    assert res["kern_b"].registers == 10 and res["kern_b"].local == 0
    with pytest.raises(AssertionError, match="kern_a"):
        sm90.assert_no_spills(res)
    sm90.assert_no_spills(res["kern_b"])


@needs_cuobjdump
def test_triton_compiles_share_a_child_process_that_outlives_a_failed_compile() -> None:
    if type(sm90._unwrap(scale_kernel)).__name__ != "InterpretedFunction":
        pytest.skip("Triton compiles in this process where the interpreter is off")
    signature = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}
    sm90.compile_triton_sm90(scale_kernel, signature, {"BLOCK": 1024})
    worker = sm90._worker
    with pytest.raises(sm90.CompileError, match="scale_kernel for sm_90 failed(.|\n)*power of 2"):
        sm90.compile_triton_sm90(scale_kernel, signature, {"BLOCK": 1000})
    assert sm90.compile_triton_sm90(scale_kernel, signature, {"BLOCK": 512}).name == "scale_kernel"
    assert sm90._worker is worker and worker.proc.poll() is None
