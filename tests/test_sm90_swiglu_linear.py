"""The fused SwiGLU GEMM compiles ahead of time for Hopper (sm_90a) at each launch config the op tunes over:
tiles come in by TMA (UTMALDG), the dots run on HGMMA, no local-memory spills, shared memory within the limit,
and warp specialization where asked for. No GPU needed (tests/sm90.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import tune_swiglu_linear
from sphere_fast.ops.swiglu_linear import GROUP_M, HOPPER_CANDIDATES, GemmConfig
from tests import sm90

pytest.importorskip("triton")
kernels = pytest.importorskip("sphere_fast.kernels.swiglu_linear")

pytestmark = pytest.mark.skipif(sm90.find_cuobjdump() is None, reason="cuobjdump not found (nor triton's bundled one)")


def compile_config(config: GemmConfig, dtype: str = "bf16") -> sm90.CompiledKernelInfo:
    tile = f"tensordesc<{dtype}[{{}},{config.block_k}]>"
    signature = {"X_DESC": tile.format(config.block_m), "W_DESC": tile.format(config.block_n),
                 "BIAS": f"*{dtype}", "OUT": f"*{dtype}"}
    signature |= {name: "i32" for name in ("M", "H", "K", "OUT_WIDTH", "stride_om")}
    constexprs = dict(HAS_BIAS=True, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                      GROUP_M=GROUP_M, WARP_SPECIALIZE=config.warp_specialize, EMULATE_BF16=False)
    # Sphere-L: K = 1024, the output padded to 2752 columns (16-divisible, as the JIT sees them); H = 2730 is not
    aligned = ["BIAS", "OUT", "K", "OUT_WIDTH", "stride_om"]
    return sm90.compile_triton_sm90(kernels.swiglu_linear_kernel, signature, constexprs, num_warps=config.warps,
                                    num_stages=config.stages, aligned=aligned)


@pytest.mark.parametrize("config", HOPPER_CANDIDATES + tune_swiglu_linear.WARP_SPECIALIZED, ids=str)
def test_candidate_uses_tma_and_hgmma_without_spills(config: GemmConfig) -> None:
    """The op's candidates and the sweep's warp-specialized configs."""
    sm90.assert_tma_matrix_kernel(compile_config(config), config.warp_specialize, str(config))


def test_fp16_default_config_compiles_without_spills() -> None:
    info = compile_config(HOPPER_CANDIDATES[0], "fp16")
    sm90.assert_no_spills(info)
    assert sm90.hgmma_count(info) > 0


def test_candidates_share_the_k_tile() -> None:
    """The candidates may differ in speed only: all sum K in the same tiles, in the same order."""
    assert len({c.block_k for c in HOPPER_CANDIDATES}) == 1
    assert len(set(HOPPER_CANDIDATES)) == len(HOPPER_CANDIDATES)


def tuning_compiles() -> dict:
    """Run in a child process (interpreter off, the compile-only driver): the op's launcher on a Sphere-L MLP
    shape up to the tuning's first timed launch. Returns the configs the kernel then holds compiled (BLOCK_M,
    BLOCK_N, BLOCK_K, WARP_SPECIALIZE, stages; not warps, as warp specialization adds producer warps) and the
    sphere_fast warnings."""
    import importlib

    swl = importlib.import_module("sphere_fast.ops.swiglu_linear")  # the module: the op has its name

    x, weight = torch.zeros(4096, 1024, dtype=torch.bfloat16), torch.zeros(5460, 1024, dtype=torch.bfloat16)
    with sm90.compile_up_to_first_timing() as warnings:
        swl._triton_forward(x, weight, None, 2752)
    kernel = kernels.swiglu_linear_kernel

    def constant(compiled, name: str) -> object:
        return compiled.src.constants[(kernel.arg_names.index(name),)]

    compiled = [[*(constant(c, n) for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "WARP_SPECIALIZE")), c.metadata.num_stages]
                for c in kernel.device_caches[0][0].values()]
    return {"compiled": sorted(compiled), "warnings": warnings}


def test_tuning_compiles_every_candidate_ahead(tmp_path: Path) -> None:
    """The op's compile-only launches (its precompile for the tuning) take its launch arguments, the tensor
    descriptors too: before the first timed launch the kernel holds every candidate compiled for sm_90a, and
    none warp specialized."""
    result = sm90.call_in_compile_child("tests.test_sm90_swiglu_linear:tuning_compiles", tmp_path)
    assert result["warnings"] == []
    expected = [[c.block_m, c.block_n, c.block_k, c.warp_specialize, c.stages] for c in HOPPER_CANDIDATES]
    assert result["compiled"] == sorted(expected) and not any(c.warp_specialize for c in HOPPER_CANDIDATES)
