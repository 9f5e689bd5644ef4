"""The attention kernels compile ahead of time for Hopper (sm_90a) with the launch configs the op uses:
no local-memory spills, tensor-core HGMMA in the matrix kernels, and the head-dim chunk widths.
No GPU needed (tests/sm90.py compiles in a child process when the interpreter is on)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import tune_attention
from sphere_fast.ops.attention import Config, _candidates, _head_chunks
from tests import sm90

pytest.importorskip("triton")
kernels = pytest.importorskip("sphere_fast.kernels.attention")

pytestmark = pytest.mark.skipif(sm90.find_cuobjdump() is None, reason="cuobjdump not found (nor triton's bundled one)")

HEAD_DIMS = (32, 64, 72, 80, 104, 128)
TT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
KERNELS = {
    "fwd": kernels.attention_fwd_kernel,
    "dkdv": kernels.attention_bwd_dkdv_kernel,
    "dq": kernels.attention_bwd_dq_kernel,
}


def compile_kernel(
    which: str, head_dim: int, dtype: torch.dtype, config: Config | None = None
) -> sm90.CompiledKernelInfo:
    """Compile one kernel with exactly the constexprs ops/attention.py uses on a GPU and one of its launch
    config candidates (default: the first)."""
    fn = KERNELS[which]
    da, db, has_b = _head_chunks(head_dim)
    block_m, block_n, warps, stages = config or _candidates(head_dim, dtype, interpret=False)[which][0]
    signature = {}
    for name in fn.arg_names:
        if name in ("LSE", "DELTA"):
            signature[name] = "*fp32"
        elif name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            signature[name] = f"*{TT[dtype]}"
        elif name.startswith("stride") or name in ("H", "N"):
            signature[name] = "i32"
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
    constexprs = dict(
        HEAD_DIM=head_dim, DA=da, DB=db, HAS_B=has_b, BLOCK_M=block_m, BLOCK_N=block_n, EMULATE_BF16=False
    )
    if which != "dkdv":
        constexprs["EVEN_N"] = True  # the model's N = 256 and 1024
    # torch tensors are 16-byte aligned and the model's strides (multiples of 3*H*D) are 16-divisible,
    # which the JIT specializes on: hint the same here so the code matches what runs
    aligned = [n for n, t in signature.items() if t.startswith("*") or n.startswith("stride")]
    return sm90.compile_triton_sm90(fn, signature, constexprs, num_warps=warps, num_stages=stages, aligned=aligned)


# forward at every head dim; backward once per tile tier (<= 64 and 128 columns wide) and at D = 72 (two chunks)
BF16_CASES = [("fwd", d) for d in HEAD_DIMS] + [(w, d) for w in ("dkdv", "dq") for d in (64, 72, 128)]


@pytest.mark.parametrize("which, head_dim", BF16_CASES)
def test_bf16_kernels_use_hgmma_without_spills(which: str, head_dim: int) -> None:
    info = compile_kernel(which, head_dim, torch.bfloat16)
    sm90.assert_no_spills(info)
    assert info.launch_shared <= sm90.SMEM_LIMIT, f"{which} D={head_dim}: {info.launch_shared} B shared memory"
    assert sm90.hgmma_count(info) > 0, f"{which} D={head_dim}: no HGMMA in the SASS"


# every other tuning candidate, at the model head dims (Sphere-L 64, Sphere-XL 72) and the widest
CANDIDATE_CASES = [
    pytest.param(which, head_dim, config, id=f"{which}-D{head_dim}-{config}")
    for head_dim in (64, 72, 128)
    for which, configs in _candidates(head_dim, torch.bfloat16, interpret=False).items()
    for config in configs[1:]
]


@pytest.mark.parametrize("which, head_dim, config", CANDIDATE_CASES)
def test_tuning_candidates_without_spills(which: str, head_dim: int, config: Config) -> None:
    info = compile_kernel(which, head_dim, torch.bfloat16, config)
    sm90.assert_no_spills(info)
    assert info.launch_shared <= sm90.SMEM_LIMIT, f"{which} D={head_dim} {config}: {info.launch_shared} B shared memory"
    assert sm90.hgmma_count(info) > 0, f"{which} D={head_dim} {config}: no HGMMA in the SASS"


def test_candidates_keep_the_summed_block() -> None:
    """The candidates of a kernel may differ in speed only: fwd and dq keep the key block they sum over, dkdv
    the query block."""
    for head_dim in (64, 72, 128):
        for which, configs in _candidates(head_dim, torch.bfloat16, interpret=False).items():
            summed = {c[0] if which == "dkdv" else c[1] for c in configs}
            assert len(summed) == 1, (which, head_dim, configs)
            assert len(set(configs)) == len(configs), (which, head_dim, configs)


def forward_tuning_compiles(head_dim: int) -> dict:
    """Run in a child process (interpreter off, the compile-only driver): the attention forward on [2, 16, 1024,
    head_dim] bf16 views of one qkv tensor, with the op's candidates and the TMA variants of
    benchmarks/tune_attention.py, up to the tuning's first timed launch. Returns what each forward kernel then
    holds compiled (pointer: BLOCK_M, BLOCK_N, warps, stages; tma: BLOCK_M, BLOCK_N, WARP_SPECIALIZE, stages)
    and the sphere_fast warnings."""
    import importlib
    from unittest import mock

    from sphere_fast.kernels.attention import attention_fwd_kernel, attention_fwd_tma_kernel

    attention = importlib.import_module("sphere_fast.ops.attention")  # the module: sphere_fast.ops.attention is the op

    def with_tma(*args, **kwargs) -> dict:
        own = _candidates(*args, **kwargs)
        return {**own, "fwd": own["fwd"] + tune_attention.TMA_FWD_VARIANTS}

    q, k, v = torch.zeros(2, 1024, 3, 16, head_dim, dtype=torch.bfloat16).permute(2, 0, 3, 1, 4)
    with sm90.compile_up_to_first_timing() as warnings, mock.patch.object(attention, "_candidates", with_tma):
        attention._triton_forward(q, k, v)

    def constant(compiled, kernel, name: str) -> object:
        return compiled.src.constants[(kernel.arg_names.index(name),)]

    fwd, fwd_tma = attention_fwd_kernel, attention_fwd_tma_kernel
    pointer = [[constant(c, fwd, "BLOCK_M"), constant(c, fwd, "BLOCK_N"), c.metadata.num_warps, c.metadata.num_stages]
               for c in fwd.device_caches[0][0].values()]
    tma = [[constant(c, fwd_tma, "BLOCK_M"), constant(c, fwd_tma, "BLOCK_N"), constant(c, fwd_tma, "WARP_SPECIALIZE"),
            c.metadata.num_stages] for c in fwd_tma.device_caches[0][0].values()]
    return {"pointer": sorted(pointer), "tma": sorted(tma), "warnings": warnings}


@pytest.mark.parametrize("head_dim", [64, 72])
def test_tuning_compiles_every_forward_candidate_ahead(head_dim: int, tmp_path: Path) -> None:
    """The op's compile-only launches (its precompile for the tuning) take its launch arguments, TMA
    descriptors too: before the first timed launch each forward kernel holds every candidate that applies
    compiled for sm_90a, and no more (at D = 72, two head-dim chunks, no TMA config applies)."""
    result = sm90.call_in_compile_child("tests.test_sm90_attention:forward_tuning_compiles", tmp_path, head_dim)
    assert result["warnings"] == []
    own = _candidates(head_dim, torch.bfloat16, interpret=False)["fwd"]
    assert result["pointer"] == sorted(list(c) for c in own)
    tma = [[c.block_m, c.block_n, c.warp_specialize, c.stages] for c in tune_attention.TMA_FWD_VARIANTS]  # JSON lists
    assert result["tma"] == (sorted(tma) if head_dim == 64 else [])


@pytest.mark.parametrize("config", tune_attention.TMA_FWD_VARIANTS, ids=str)
def test_tensor_descriptor_forward_uses_tma_and_hgmma_without_spills(config) -> None:
    """The forward with TMA loads, at each config benchmarks/tune_attention.py times (bf16, D = 64): tiles
    come in by UTMALDG, dots by HGMMA, no spills; with warp specialization the producer and consumer warps
    set their register budgets (USETMAXREG), which shows that Triton did split the loop."""
    fn = kernels.attention_fwd_tma_kernel
    signature = {name: f"tensordesc<bf16[{rows},64]>"
                 for name, rows in (("Q_DESC", config.block_m), ("K_DESC", config.block_n), ("V_DESC", config.block_n))}
    signature |= {"O": "*bf16", "LSE": "*fp32", "H": "i32", "N": "i32", "qk_scale": "fp32"}
    signature |= {name: "i32" for name in fn.arg_names if name.startswith("stride")}
    constexprs = dict(HEAD_DIM=64, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                      WARP_SPECIALIZE=config.warp_specialize, EMULATE_BF16=False)
    aligned = [n for n, t in signature.items() if t.startswith("*") or n.startswith("stride")]
    info = sm90.compile_triton_sm90(fn, signature, constexprs, num_warps=config.warps, num_stages=config.stages,
                                    aligned=aligned)
    sm90.assert_tma_matrix_kernel(info, config.warp_specialize, str(config))


def test_fp16_backward_without_spills() -> None:
    sm90.assert_no_spills(compile_kernel("dkdv", 72, torch.float16))


@pytest.mark.parametrize("which", list(KERNELS))
def test_fp32_fits_shared_memory(which: str) -> None:
    """fp32 (TF32 dots) at the widest head dim must launch; its backward spills there (not checked)."""
    info = compile_kernel(which, 128, torch.float32)
    assert info.launch_shared <= sm90.SMEM_LIMIT, f"{which}: {info.launch_shared} B shared memory"
    if which == "fwd":
        sm90.assert_no_spills(info)


def test_preprocess_compiles_without_spills() -> None:
    signature = {n: "i32" for n in kernels.attention_bwd_preprocess_kernel.arg_names if n.startswith("stride")}
    signature.update(O="*bf16", DO="*bf16", DELTA="*fp32", H="i32", N="i32")
    info = sm90.compile_triton_sm90(
        kernels.attention_bwd_preprocess_kernel, signature, dict(HEAD_DIM=72, D_PAD=128, BLOCK_M=64), num_warps=4
    )
    sm90.assert_no_spills(info)


@pytest.mark.parametrize("head_dim, width", [(32, 32), (64, 64), (72, 128), (80, 128), (104, 128), (128, 128)])
def test_head_dim_tile_width(head_dim: int, width: int) -> None:
    """Chunk B is as wide as chunk A: a 16-wide one (D = 72 as 64 + 16) miscompiled on an H200 (Triton 3.6)."""
    da, db, has_b = _head_chunks(head_dim)
    assert da + (db if has_b else 0) == width


@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "transpose"])
@pytest.mark.parametrize("head_dim", [64, 72])
def test_rope_pass_vector_memory_only(head_dim: int, transpose: bool) -> None:
    """The RoPE pass (run before the RoPE-free kernel) at its launch config: no spills, no shared memory,
    and every global load and store 128 bits wide (the pairs are split in registers)."""
    from sphere_fast.kernels.rope import rope_kernel
    from sphere_fast.ops.rope import _launch_config

    block_n, d_pad = _launch_config(head_dim, interpret=False)
    signature = {name: "*bf16" for name in ("Q", "K", "QO", "KO")} | {"ROPE": "*fp32"}
    signature |= {n: "i32" for n in rope_kernel.arg_names if n.startswith("stride") or n in ("H", "N")}
    aligned = [n for n, t in signature.items() if t.startswith("*") or n.startswith("stride")]
    constexprs = dict(HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_N=block_n, TRANSPOSE=transpose, EMULATE_BF16=False)
    info = sm90.compile_triton_sm90(rope_kernel, signature, constexprs, num_warps=4, aligned=aligned)
    sm90.assert_no_spills(info)
    assert info.launch_shared == 0, f"{info.launch_shared} B shared memory"
    memory_ops = {op: n for op, n in sm90.count_opcodes(info.sass()).items() if op.startswith(("LDG", "STG", "LDS", "STS"))}
    assert set(memory_ops) == {"LDG.E.128", "STG.E.128"}, memory_ops
