"""Loads and rounding that behave the same in the Triton interpreter as on the GPU."""

import triton
import triton.language as tl


@triton.jit
def to_dtype(x, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Round x to dtype. EMULATE_BF16 (interpreter, bf16): the interpreter truncates fp32 -> bf16 and its
    bf16 dot is wrong, so round to nearest even by hand and keep the value in fp32 (a dot takes it as is;
    a store rounds it exactly)."""
    # one return after an if/else: the compiler visits the statements after a constexpr if whose body returns,
    # and two returns of two types do not compile
    if EMULATE_BF16:
        xf = x.to(tl.float32)
        bits = xf.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        # a NaN whose mantissa is high would carry into the exponent (to 0 or inf): torch's quiet NaN instead
        rounded = tl.where(xf != xf, float("nan"), bits.to(tl.float32, bitcast=True))
    else:
        rounded = x.to(dtype)
    return rounded


@triton.jit
def desc_load(desc, row, col, EMULATE_BF16: tl.constexpr):
    """The tensor descriptor's block at (row, col) (on Hopper the TMA copies it into shared memory; rows and
    columns past the tensor's end read as zeros). EMULATE_BF16: in fp32, as the interpreter's bf16 dot is wrong."""
    x = desc.load([row, col])
    if EMULATE_BF16:
        x = x.to(tl.float32)
    return x
