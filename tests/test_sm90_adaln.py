"""AdaLN and SwiGLU kernels compile for Hopper (sm_90a) without local-memory spills.

Triton kernels are compiled ahead of time at the launch configurations the ops use for the model's
widths; the torch-free CUDA sources are compiled with nvcc. Both cubins are read with cuobjdump.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from tests import sm90

pytest.importorskip("triton")
adaln = importlib.import_module("sphere_fast.ops.adaln")
swiglu = importlib.import_module("sphere_fast.ops.swiglu")
CSRC = Path(__file__).resolve().parents[1] / "csrc"

needs_cuobjdump = pytest.mark.skipif(sm90.find_cuobjdump() is None, reason="cuobjdump not found")
needs_nvcc = pytest.mark.skipif(sm90.find_nvcc() is None, reason="nvcc not found")


def _ptrs(names: str, ty: str) -> dict[str, str]:
    return {n: ty for n in names.split()}


FWD_CASES = [(D, config) for D in (768, 1024, 1152) for config in adaln._fwd_candidates(D, 2, interpret=False)]


@needs_cuobjdump
@pytest.mark.parametrize("D,config", FWD_CASES, ids=[f"{D}-{m}x{w}" for D, (m, w) in FWD_CASES])
def test_triton_adaln_fwd_sm90(D: int, config: tuple[int, int]) -> None:
    """Every forward candidate the tuning may pick (rows per program, warps) at the model's widths: no spills,
    and 128-bit loads (the columns a thread owns are contiguous, as the rows' strides are multiples of 16)."""
    from sphere_fast.kernels.adaln import adaln_fwd_kernel

    block_m, num_warps = config
    sig = {**_ptrs("X BR G W SH SC RES Y", "*bf16"), "RSTD": "*fp32", "M": "i32", "S": "i32", "D": "i32", "eps": "fp32"}
    sig.update(_ptrs("sx_b sx_s sbr_b sbr_s sg_b sg_s ssh_b ssh_s ssc_b ssc_s", "i32"))
    flags = dict.fromkeys(("HAS_BRANCH", "HAS_GATE", "HAS_W", "HAS_SHIFT", "HAS_SCALE"), True)
    constexprs = {**flags, "BLOCK_M": block_m, "BLOCK_D": adaln.next_pow2(D), "EMULATE_BF16": False}
    aligned = [name for name in sig if name != "eps"]
    info = sm90.compile_triton_sm90(adaln_fwd_kernel, sig, constexprs, num_warps=num_warps, aligned=aligned)
    sm90.assert_no_spills(info)
    assert sm90.count_opcodes(info.sass())["LDG.E.128"] > 0


def _row_sum_layout(D: int, config: tuple[int, int], dtype: str) -> str:
    """The layout of the forward's sum of squares operand (the tt.reduce over a row) in its sm_90a Triton GPU IR:
    how a row's columns spread over a thread's registers, the lanes and the warps, which fixes the sum's order."""
    from sphere_fast.kernels.adaln import adaln_fwd_kernel

    block_m, num_warps = config
    sig = {**_ptrs("X BR G W SH SC RES Y", f"*{dtype}"), "RSTD": "*fp32", "M": "i32", "S": "i32", "D": "i32",
           "eps": "fp32"}
    sig.update(_ptrs("sx_b sx_s sbr_b sbr_s sg_b sg_s ssh_b ssh_s ssc_b ssc_s", "i32"))
    flags = dict.fromkeys(("HAS_BRANCH", "HAS_GATE", "HAS_SHIFT", "HAS_SCALE"), False)
    constexprs = {**flags, "HAS_W": True, "BLOCK_M": block_m, "BLOCK_D": adaln.next_pow2(D), "EMULATE_BF16": False}
    # as a launch at the model's shapes specializes: pointers aligned, the width and row strides multiples of 16
    aligned = [name for name, kind in sig.items() if kind.startswith("*")] + ["D", "sx_b", "sx_s"]
    ir = sm90.compile_triton_sm90(adaln_fwd_kernel, sig, constexprs, num_warps=num_warps, aligned=aligned).ttgir
    layouts = dict(re.findall(r"^(#blocked\d*) = (#ttg\.blocked<[^>]*>)", ir, flags=re.M))
    operand = re.search(r'"tt\.reduce"\(%\S+\) <\{axis = 1 : i32\}>.*?\}\) : \(tensor<[^>]*, (#blocked\d*)>\)', ir,
                        flags=re.S)
    assert operand is not None, "no row reduction found"
    return layouts[operand.group(1)]


@needs_cuobjdump
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("D", [64, 512, 768, 1152])
def test_triton_adaln_fwd_candidates_sum_a_row_alike(D: int, dtype: str) -> None:
    """The forward's tuning candidates (_fwd_candidates) sum a row's squares over the same threads and warps as
    the default, so that the tuning changes the speed, never a bit (at D = 64 and 512 in bf16 one row a program
    spread a row otherwise: the candidate is not offered there)."""
    itemsize = 2 if dtype == "bf16" else 4
    candidates = adaln._fwd_candidates(D, itemsize, interpret=False)
    default, *others = [_row_sum_layout(D, config, dtype) for config in candidates]
    assert all(layout == default for layout in others), (candidates, default, others)


BWD_CASES = [(1152, False), (1152, True), (1024, False), (768, False)]  # (width, per-token modulations)


@needs_cuobjdump
@pytest.mark.parametrize("D,per_token,stages", [(*case, stages) for stages in adaln.BWD_STAGES for case in BWD_CASES])
def test_triton_adaln_bwd_sm90(D: int, per_token: bool, stages: int) -> None:
    """Each pipeline-stage candidate compiles without spills. One stage: pointers aligned, sizes and strides
    not (any width). More stages, compiled as the model's widths and strides run them (multiples of 16): the row
    loop's loads go through cp.async (LDGSTS), so the candidates differ in more than their name."""
    from sphere_fast.kernels.adaln import adaln_bwd_kernel

    block_m, block_d, num_warps = adaln._bwd_row_block(D)
    sig = {**_ptrs("DY DRES RES BR G W SC DX DBR DG DSH DSC", "*bf16"), **_ptrs("RSTD PW PG PSH PSC", "*fp32")}
    sig.update(_ptrs("S D rows_per_prog CHUNKS sbr_b sbr_s sg_b sg_s ssc_b ssc_s", "i32"))
    flags = dict.fromkeys(("HAS_DRES", "HAS_BRANCH", "HAS_GATE", "HAS_W", "HAS_SHIFT", "HAS_SCALE"), True)
    flags.update(dict.fromkeys(("GATE_TOK", "SHIFT_TOK", "SCALE_TOK"), per_token))
    info = sm90.compile_triton_sm90(
        adaln_bwd_kernel, sig, dict(flags, BLOCK_M=block_m, BLOCK_D=block_d, STAGES=stages, EMULATE_BF16=False),
        num_warps=num_warps, aligned=list(sig) if stages > 1 else None,
    )
    sm90.assert_no_spills(info)
    pipelined = sum(n for op, n in sm90.count_opcodes(info.sass()).items() if op.startswith("LDGSTS"))
    assert (pipelined > 0) == (stages > 1), pipelined


@needs_cuobjdump
@pytest.mark.parametrize("sums", ["all", "weight only", "modulations only"])
def test_triton_adaln_bwd_finish_sm90(sums: str) -> None:
    """The backward's second stage (all four sums; per-token modulations: the weight's alone; no weight: the
    modulations'), compiled as a launch at the model's widths specializes it (pointers, D and CHUNKS multiples of
    16): no spills, 128-bit loads of the fp32 partials."""
    from sphere_fast.kernels.adaln import adaln_bwd_finish_kernel

    sig = {**_ptrs("PW PG PSH PSC", "*fp32"), **_ptrs("DW DG DSH DSC", "*bf16"),
           **_ptrs("B CHUNKS D SAMPLE_PROGRAMS", "i32")}
    flags = dict.fromkeys(("HAS_GATE", "HAS_SHIFT", "HAS_SCALE"), sums != "weight only")
    flags["HAS_W"] = sums != "modulations only"
    info = sm90.compile_triton_sm90(
        adaln_bwd_finish_kernel, sig, {**flags, "BLOCK_R": adaln.FINISH_BLOCK_R, "BLOCK_D": adaln.FINISH_BLOCK_D,
                                  "EMULATE_BF16": False},
        num_warps=4, aligned=["PW", "PG", "PSH", "PSC", "DW", "DG", "DSH", "DSC", "CHUNKS", "D"],
    )
    sm90.assert_no_spills(info)
    assert sm90.count_opcodes(info.sass())["LDG.E.128"] > 0


@needs_cuobjdump
@pytest.mark.parametrize("kernel", ["swiglu_fwd_kernel", "swiglu_bwd_kernel"])
def test_triton_swiglu_sm90(kernel: str) -> None:
    module = importlib.import_module("sphere_fast.kernels.swiglu")
    block_m, block_n = swiglu._blocks(2730)
    ptrs = "H_PTR OUT" if kernel == "swiglu_fwd_kernel" else "DOUT H_PTR DH"
    sig = {**_ptrs(ptrs, "*bf16"), "M": "i32", "H": "i32", "stride_h": "i32"}
    info = sm90.compile_triton_sm90(getattr(module, kernel), sig,
                                    dict(BLOCK_M=block_m, BLOCK_N=block_n, EMULATE_BF16=False))
    sm90.assert_no_spills(info)


@needs_cuobjdump
def test_triton_swiglu_flat_forward_sm90() -> None:
    """The forward for rows that are not 16-byte aligned (H = 2731 in bf16) stores whole 128-bit words, which the
    row-tiled kernel cannot there; no spills. Compiled as the JIT specializes a launch of M*H elements with M a
    multiple of 16 (N divisible by 16: the stores' mask is constant over each word), H and stride_h not."""
    module = importlib.import_module("sphere_fast.kernels.swiglu")
    sig = {**_ptrs("H_PTR OUT", "*bf16"), "N": "i32", "H": "i32", "stride_h": "i32"}
    flat = sm90.compile_triton_sm90(module.swiglu_fwd_flat_kernel, sig,
                                    dict(BLOCK=swiglu.FLAT_BLOCK, INT64=False, EMULATE_BF16=False),
                                    num_warps=4, aligned=["H_PTR", "OUT", "N"])
    sm90.assert_no_spills(flat)
    assert sm90.count_opcodes(flat.sass())["STG.E.128"] > 0
    block_m, block_n = swiglu._blocks(2731)
    tiled_sig = {**_ptrs("H_PTR OUT", "*bf16"), "M": "i32", "H": "i32", "stride_h": "i32"}
    tiled = sm90.compile_triton_sm90(module.swiglu_fwd_kernel, tiled_sig,
                                     dict(BLOCK_M=block_m, BLOCK_N=block_n, EMULATE_BF16=False))
    assert sm90.count_opcodes(tiled.sass())["STG.E.128"] == 0


@needs_nvcc
@needs_cuobjdump
@pytest.mark.parametrize("source,kernels", [("adaln_cuda.cu", 37), ("swiglu_cuda.cu", 12)])
def test_cuda_sources_sm90(source: str, kernels: int) -> None:
    compiled = sm90.compile_cuda_sm90(CSRC / source, [CSRC])
    assert len(compiled) == kernels, sorted(compiled)  # every dtype x column-count instantiation is built
    sm90.assert_no_spills(compiled)
    assert all(k.registers * 256 <= 65536 for k in compiled.values())  # 256-thread blocks fit an SM


@needs_nvcc
@needs_cuobjdump
def test_cuda_swiglu_vector_kernels_move_16_bytes_an_access() -> None:
    """The C++ SwiGLU kernels for 16-byte aligned rows: every global access 128 bits wide (the scalar kernels:
    one element); forward reads a and b, writes out; backward reads a, b and dout, writes da and db."""
    compiled = sm90.compile_cuda_sm90(CSRC / "swiglu_cuda.cu", [CSRC])
    vector = {name: ops for name, ops in compiled.opcodes_by_kernel().items() if "_vec_kernel" in name}
    assert len(vector) == 6, sorted(compiled)  # forward and backward, three dtypes
    for name, ops in vector.items():
        memory = {op: n for op, n in ops.items() if op.startswith(("LDG", "STG"))}
        expected = {"LDG.E.128": 2, "STG.E.128": 1} if "fwd" in name else {"LDG.E.128": 3, "STG.E.128": 2}
        assert memory == expected, (name, memory)


@needs_nvcc
@needs_cuobjdump
def test_cuda_adaln_forward_vector_kernels_move_16_bytes_an_access() -> None:
    """The C++ AdaLN forward for 16-byte aligned rows: per vector of columns six 128-bit loads (x, gate, branch,
    weight, scale, shift) and two 128-bit stores (res, y); the row's rstd is the one 32-bit store."""
    compiled = sm90.compile_cuda_sm90(CSRC / "adaln_cuda.cu", [CSRC])
    vector = {name: ops for name, ops in compiled.opcodes_by_kernel().items() if "adaln_fwd_vec_kernel" in name}
    assert len(vector) == 9, sorted(compiled)  # three dtypes x 1, 2 or 4 vectors a thread
    for name, ops in vector.items():
        per_thread = int(re.search(r"Li(\d)E", name).group(1))
        memory = {op: n for op, n in ops.items() if op.startswith(("LDG", "STG"))}
        assert memory == {"LDG.E.128": 6 * per_thread, "STG.E.128": 2 * per_thread, "STG.E": 1}, (name, memory)


@needs_nvcc
@needs_cuobjdump
def test_cuda_adaln_backward_vector_kernels_move_16_bytes_an_access() -> None:
    """The C++ AdaLN backward for 16-byte aligned rows, per vector of columns: the weight's 128-bit load before
    the row loop, six in it (dy, res, scale; dres, gate, branch) and five 128-bit stores (dscale, dshift; dx,
    dbranch, dgate), then the four fp32 partial rows as 128-bit stores (two each for 8 bf16 / fp16 columns, one
    for 4 fp32); the row's rstd is the one 32-bit load. Four vectors a thread in fp32 only (a 16-bit width of
    4096 is 512 vectors)."""
    compiled = sm90.compile_cuda_sm90(CSRC / "adaln_cuda.cu", [CSRC])
    vector = {name: ops for name, ops in compiled.opcodes_by_kernel().items() if "adaln_bwd_vec_kernel" in name}
    assert len(vector) == 7, sorted(compiled)  # 1 or 2 vectors a thread in each dtype, 4 in fp32
    for name, ops in vector.items():
        per_thread = int(re.search(r"Li(\d)E", name).group(1))
        partial_stores = 4 if "vec_kernelIf" in name else 8
        memory = {op: n for op, n in ops.items() if op.startswith(("LDG", "STG"))}
        expected = {"LDG.E.128": 7 * per_thread, "LDG.E": 1, "STG.E.128": (5 + partial_stores) * per_thread}
        assert memory == expected, (name, memory)


@needs_nvcc
@needs_cuobjdump
def test_cuda_adaln_finish_reads_the_partials_as_global_memory() -> None:
    """The C++ backward's second stage picks its partials among the params' pointers at run time: its loads and
    stores must still be global ones (LDG / STG), not generic (LD / ST), and its sums stay off the stack."""
    compiled = sm90.compile_cuda_sm90(CSRC / "adaln_cuda.cu", [CSRC])
    finish = {name: ops for name, ops in compiled.opcodes_by_kernel().items() if "adaln_finish_kernel" in name}
    assert len(finish) == 3, sorted(compiled)
    for name, ops in finish.items():
        generic = {op: n for op, n in ops.items() if op.startswith(("LD.", "ST."))}
        assert not generic and ops["LDG.E"] > 0, (name, generic)
        assert compiled[name].stack == 0, compiled[name]
