"""The fused SwiGLU GEMM compiles ahead of time for Hopper (sm_90a) at each launch config the op tunes over:
tiles come in by TMA (UTMALDG), the dots run on HGMMA, no local-memory spills, shared memory within the limit,
and warp specialization where asked for. No GPU needed (tests/sm90.py)."""

from __future__ import annotations

import pytest

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


@pytest.mark.parametrize("config", HOPPER_CANDIDATES, ids=str)
def test_candidate_uses_tma_and_hgmma_without_spills(config: GemmConfig) -> None:
    sm90.assert_tma_matrix_kernel(compile_config(config), config.warp_specialize, str(config))


def test_fp16_default_config_compiles_without_spills() -> None:
    info = compile_config(HOPPER_CANDIDATES[0], "fp16")
    sm90.assert_no_spills(info)
    assert sm90.hgmma_count(info) > 0
