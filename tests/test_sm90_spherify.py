"""Hopper compile checks of the spherify kernels without a GPU: the Triton kernels ahead of time for sm_90a
and the CUDA source with nvcc; every kernel must be free of local memory (spills)."""

import inspect
import re

import pytest

from sphere_fast import _extension
from tests.sm90 import (
    CompileError,
    assert_no_spills,
    compile_cuda_sm90,
    compile_triton_sm90,
    count_opcodes,
    find_nvcc,
)

K = pytest.importorskip("sphere_fast.kernels.spherify")
NUM_WARPS = 8  # as the launcher (sphere_fast.ops.spherify._NUM_WARPS)
BLOCK, CHUNK = 2048, 8192  # launch_config for L >= 8192


def _signature(names, dtype):
    types = {
        "z_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "dz_ptr": f"*{dtype}",
        "noise_ptr": "*fp32", "seeds_ptr": "*i64", "scale_ptr": "*fp32", "partial_ptr": "*fp32",
        "stats_ptr": "*fp32", "dscale_ptr": "*fp32", "B": "i32", "L": "i32", "stride_z": "i32",
        "stride_n": "i32", "noise_base": "i64", "eps": "fp32",
    }
    return {n: types[n] for n in names if n in types}


# the largest variant of each kernel (pair, Philox) in fp32 and bf16, plus plain and explicit-noise fp32
CASES = [
    (kernel, dtype, noise, pair)
    for kernel in ("spherify_fwd_partials_kernel", "spherify_fwd_apply_kernel", "spherify_bwd_partials_kernel",
                   "spherify_bwd_apply_kernel")
    for dtype, noise, pair in (
        ("fp32", K.NOISE_NONE, False),
        ("fp32", K.NOISE_TENSOR, True),
        ("fp32", K.NOISE_PHILOX, True),
        ("bf16", K.NOISE_PHILOX, True),
    )
    if not (kernel == "spherify_fwd_partials_kernel" and pair and noise == K.NOISE_TENSOR)
]


@pytest.mark.parametrize("kernel, dtype, noise, pair", CASES)
def test_triton_kernels_no_spills(kernel, dtype, noise, pair):
    fn = getattr(K, kernel)
    constexprs = {"CHUNK": CHUNK, "BLOCK": BLOCK, "NOISE": noise}
    if kernel != "spherify_fwd_partials_kernel":
        constexprs["PAIR"] = pair  # spherify_fwd_partials_kernel has no PAIR: its "pair" case is the Philox one
    if "_apply_" in kernel:
        constexprs.update(SPLIT_P2=16, EMULATE_BF16=False)
    names = list(inspect.signature(fn.fn).parameters)  # JITFunction and the interpreter both keep .fn
    try:
        info = compile_triton_sm90(fn, _signature(names, dtype), constexprs, num_warps=NUM_WARPS)
    except CompileError as exc:
        pytest.fail(str(exc))
    if noise == K.NOISE_PHILOX:
        # tl.randn's libdevice cosf keeps a 28-32 byte stack array for its Payne-Hanek path (|x| > 105615),
        # never taken here (|x| < 2 pi); anything beyond that frame, or any LOCAL, is a real spill.
        r = info.resources
        assert r.local == 0 and r.stack <= 32, r
    else:
        assert_no_spills(info)


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found")
def test_cuda_kernels_no_spills():
    root = _extension.csrc_dir()
    kernels = compile_cuda_sm90(root / "spherify_cuda.cu", include_dirs=[root])
    # 3 element types x (3 modes for fwd_partials + 5 (mode, pairs) variants x 3 other kernels), the noise kernel and
    # the seeded labels' (ops/labels.py)
    assert len(kernels) == 56, sorted(kernels)
    # Philox kernels (noise mode kNoisePhilox = 2, first template int): precise cosf keeps the same 32-byte
    # Payne-Hanek frame as tl.randn's (see above), never used for |x| < 2 pi
    philox = {n: r for n, r in kernels.items() if "noise_kernel" in n or re.search(r"I(f|13__nv_bfloat16|6__half)Li2E", n)}
    assert len(philox) == 3 * 7 + 1, sorted(philox)  # 3 dtypes x (fwd_partials + 3 kernels x 2 pair counts) + noise
    for name, r in philox.items():
        assert r.local == 0 and r.stack <= 32 and not r.spill_stores and not r.spill_loads, (name, r)
    assert_no_spills({n: r for n, r in kernels.items() if n not in philox})


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found")
def test_cuda_noise_uses_precise_log_and_cos():
    """The Philox normals follow tl.randn's precise logf / cosf: no MUFU.LG2 / MUFU.COS approximations (with
    --use_fast_math the C++ noise missed Triton's and the CPU reference by 3.3e-5 on an H200), while divisions
    stay the fast approximate ones (MUFU.RCP, without the precise path's many more)."""
    root = _extension.csrc_dir()
    ops = count_opcodes(compile_cuda_sm90(root / "spherify_cuda.cu", include_dirs=[root]).sass())
    fast = {op: n for op, n in ops.items() if op in ("MUFU.LG2", "MUFU.COS", "MUFU.SIN")}
    assert not fast, f"fast-math approximations in the spherify kernels: {fast}"
    assert ops["MUFU.RCP"] < 100, f"{ops['MUFU.RCP']} MUFU.RCP: precise division is back (--prec-div)"


def noise_at_stream_1_compiles() -> bool:
    """Run in a child process (interpreter off, the stand-in driver): the noise ops on one-value samples at stream
    1, whose offset stream * L is 1 (Triton passed an int argument equal to 1 as a constant), compiled as their
    launches on a GPU would be (forward and backward)."""
    import torch

    from sphere_fast import ops
    from sphere_fast.ops._util import launches_compile_only
    from tests import sm90

    sm90.compile_ops_on_cpu()
    z, seeds = torch.randn(2, 1, requires_grad=True), torch.tensor([1, 2])
    with launches_compile_only():
        ops.spherify_noise(z, 0.5, seeds=seeds, stream=1, backend="triton").sum().backward()
        ops.sphere_noise(seeds, (1,), stream=1, backend="triton")
    return True


def test_noise_of_one_value_samples_at_stream_1_compiles(tmp_path) -> None:
    from tests import sm90

    assert sm90.call_in_compile_child("tests.test_sm90_spherify:noise_at_stream_1_compiles", tmp_path)
