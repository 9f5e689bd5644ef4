"""The fused SwiGLU GEMM (ops.swiglu_linear) against the float64 reference, its launch configs, its bad inputs,
and the SwiGLU layer's use of it (SPHERE_FAST_FUSED_MLP=1). On CUDA when there is one, else in the Triton
interpreter.

Tolerance: the kernel does not round the pre-activation, so its only rounding is the output's: the float64
result on the same rounded inputs rounded once to nearest (half an ulp of each value, plus 2e-5 for the float32
sums); other comparisons within 2 ulp (bf16 2**-6, fp16 2**-9) of the tensor's largest magnitude.
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

from sphere_fast import Sampler, use_backend
from sphere_fast.nn.layers import SwiGLU, padded_mlp_weights
from sphere_fast.ops.swiglu_linear import GemmConfig, swiglu_linear, swiglu_linear_reference
from tests.helpers import TOL, assert_rounded_to_nearest, assert_same_images, close, off_16_byte_boundaries
from tests.tiny import tiny_model

swl = importlib.import_module("sphere_fast.ops.swiglu_linear")  # the module: its function has the same name

pytest.importorskip("triton")
pytestmark = pytest.mark.cuda_capable
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.bfloat16, torch.float16]


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + sum(shape))
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def operands(x_shape: tuple[int, ...], hidden: int, dtype: torch.dtype, bias: bool = True):
    k = x_shape[-1]
    weight = randn(2 * hidden, k, dtype=dtype, scale=k**-0.5, seed=1)
    return randn(*x_shape, dtype=dtype), weight, randn(2 * hidden, dtype=dtype, seed=2) if bias else None


def float64_reference(x, weight, bias, out_width):
    return swiglu_linear_reference(x.double(), weight.double(), None if bias is None else bias.double(), out_width)


# x shape, H, out_width, bias: several tiles and tails in every dim (interpreter tiles are 16 wide), K not a
# multiple of the K tile, a batched x, no bias, and the output padded past H
CASES = [((40, 48), 20, None, True), ((40, 40), 20, 32, False), ((2, 7, 32), 17, 64, True), ((5, 16), 3, 3, True)]


@pytest.fixture(autouse=True)
def unfused_with_fresh_tuning(monkeypatch: pytest.MonkeyPatch, fresh_tuning: None) -> None:
    monkeypatch.delenv("SPHERE_FAST_FUSED_MLP", raising=False)


@pytest.mark.parametrize("x_shape, hidden, out_width, bias", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_the_reference_rounded_once(
    dtype: torch.dtype, x_shape, hidden: int, out_width: int | None, bias: bool
) -> None:
    """The float64 result of the same inputs rounded once, to nearest: within half an ulp of it, plus 2e-5 for
    the float32 sums (truncating, as the interpreter's bf16 cast does unless emulated, is off by a whole ulp)."""
    x, weight, b = operands(x_shape, hidden, dtype, bias)
    with torch.no_grad():
        out = swiglu_linear(x, weight, b, out_width=out_width, backend="triton")
    width = hidden if out_width is None else out_width
    assert out.shape == (*x_shape[:-1], width) and out.dtype == dtype and out.device == x.device
    assert_rounded_to_nearest(out, float64_reference(x, weight, b, out_width), dtype, atol=2e-5)
    assert torch.all(out[..., hidden:] == 0), "the columns past H must be zeros"


def test_sphere_l_shape_matches_the_reference() -> None:
    """Sphere-L's MLP (K 1024, H 2730 padded to 2752) on a GPU; on CPU a slice of its rows and hidden units."""
    tokens, hidden, width = (2048, 2730, 2752) if DEVICE.type == "cuda" else (64, 40, 64)
    x, weight, bias = operands((tokens, 1024), hidden, torch.bfloat16)
    with torch.no_grad():
        out = swiglu_linear(x, weight, bias, out_width=width, backend="triton")
    close(out, float64_reference(x, weight, bias, width), TOL[torch.bfloat16], "out")


def test_strided_inputs_match_the_reference() -> None:
    """Views that are not contiguous (a column slice of x, every other row of a weight, a strided bias) are
    read as the values they show."""
    x_wide, w_tall, b_wide = operands((9, 48), 2 * 12, torch.bfloat16)
    x, weight, bias = x_wide[:, 8:40], w_tall[::2, 8:40], b_wide[::2]
    with torch.no_grad():
        out = swiglu_linear(x, weight, bias, out_width=16, backend="triton")
    close(out, float64_reference(x, weight, bias, 16), TOL[torch.bfloat16], "out")


def test_inputs_off_a_16_byte_boundary_match_the_reference() -> None:
    """Contiguous views that start 2 bytes into their storage (tensor descriptors need 16-byte aligned bases)."""
    x, weight, bias = (off_16_byte_boundaries(t) for t in operands((9, 32), 12, torch.bfloat16))
    assert x.is_contiguous() and x.data_ptr() % 16 and weight.data_ptr() % 16
    with torch.no_grad():
        out = swiglu_linear(x, weight, bias, backend="triton")
    close(out, float64_reference(x, weight, bias, 12), TOL[torch.bfloat16], "out")


def test_operands_on_two_devices_are_refused() -> None:
    x, weight, bias = operands((4, 16), 3, torch.bfloat16)
    with pytest.raises(ValueError, match="share one device"):
        swiglu_linear(x, weight, bias.to("meta"))


def test_no_rows_gives_an_empty_output() -> None:
    x, weight, bias = operands((0, 16), 5, torch.bfloat16)
    with torch.no_grad():
        assert swiglu_linear(x, weight, bias, out_width=8, backend="triton").shape == (0, 8)


def test_eager_backend_is_the_reference_and_differentiable() -> None:
    x, weight, bias = (t.float().requires_grad_() for t in operands((6, 16), 5, torch.float32))
    out = swiglu_linear(x, weight, bias, backend="eager")
    assert torch.equal(out, swiglu_linear_reference(x, weight, bias))
    out.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_every_candidate_gives_the_default_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each candidate alone: the default's bits. On a GPU the op's Hopper candidates at Sphere-L's shape; in the
    interpreter, tiles of 16 and 32 (numpy sums a dot of these alike) over the same K tile."""
    if DEVICE.type == "cuda":
        candidates, (tokens, k, hidden, width) = swl.HOPPER_CANDIDATES, (4096, 1024, 2730, 2752)
    else:
        candidates = (GemmConfig(16, 16, 16, 4, 1, False), GemmConfig(32, 32, 16, 4, 1, False))
        tokens, k, hidden, width = 40, 48, 20, 32
    x, weight, bias = operands((tokens, k), hidden, torch.bfloat16)
    outputs = []
    for config in candidates:
        monkeypatch.setattr(swl, "_candidates", lambda config=config: (config,))
        with torch.no_grad():
            outputs.append(swiglu_linear(x, weight, bias, out_width=width, backend="triton"))
    for config, out in zip(candidates[1:], outputs[1:]):
        assert torch.equal(out, outputs[0]), f"{config} changes the bits of {candidates[0]}"


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_opcheck(bias: bool) -> None:
    """The op's schema and fake kernel (shape, dtype, device, strides of the output) against the real one, and
    its trace under make_fx (fake and symbolic shapes). Inference only: no input needs a gradient."""
    x, weight, b = operands((2, 3, 16), 5, torch.bfloat16, bias)
    torch.library.opcheck(torch.ops.sphere_fast.swiglu_linear_triton.default, (x, weight, b, 16))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_torch_compile_fullgraph(bias: bool) -> None:
    """torch.compile(fullgraph=True) traces the op without a graph break and gives the eager call's bits."""
    x, weight, b = operands((2, 3, 16), 5, torch.bfloat16, bias)

    def mlp(x: torch.Tensor) -> torch.Tensor:
        return swiglu_linear(x * 2, weight, b, out_width=16, backend="triton") + 1

    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")(x)
        assert torch.equal(compiled, mlp(x))


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((torch.ones(4, 8), torch.ones(8)), {}, ValueError, "weight must be \\[2H, K\\]"),
        ((torch.ones(4, 8), torch.ones(5, 8)), {}, ValueError, "weight must be \\[2H, K\\]"),
        ((torch.ones(4, 8), torch.ones(0, 8)), {}, ValueError, "weight must be \\[2H, K\\]"),
        ((torch.ones(4, 6), torch.ones(4, 8)), {}, ValueError, "K = 8"),
        ((torch.ones(4, 8), torch.ones(4, 8), torch.ones(3)), {}, ValueError, "bias must be None or .* shape \\(4,\\)"),
        ((torch.ones(4, 8), torch.ones(4, 8), [0.0] * 4), {}, TypeError, "bias must be None or a tensor .* got list"),
        ((torch.ones(4, 8), torch.ones(4, 8, dtype=torch.float64)), {}, TypeError, "share one dtype"),
        ((torch.ones(4, 8, dtype=torch.int64), torch.ones(4, 8, dtype=torch.int64)), {}, TypeError, "floating"),
        ((torch.ones(4, 8), torch.ones(4, 8)), {"out_width": 1}, ValueError, "out_width must be an int >= H = 2"),
        ((torch.ones(4, 8), torch.ones(2, 8)), {"out_width": True}, TypeError, "out_width must be an int >= H = 1"),
        (([1.0], torch.ones(4, 8)), {}, TypeError, "must be torch.Tensors"),
        ((torch.ones(4, 8), torch.ones(4, 8)), {"backend": "triton"}, TypeError, "float16 or bfloat16"),
        ((torch.ones(4, 4, dtype=torch.bfloat16), torch.ones(4, 4, dtype=torch.bfloat16)), {"backend": "triton"},
         ValueError, "multiple of 16"),
    ],
)
def test_bad_inputs_get_clear_errors(args, kwargs, error, match) -> None:
    args = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
    with pytest.raises(error, match=match):
        swiglu_linear(*args, **kwargs)


@pytest.mark.parametrize("needs_grad", ["x", "weight", "bias"])
def test_triton_refuses_a_call_that_needs_a_gradient(needs_grad: str) -> None:
    operand = dict(zip(("x", "weight", "bias"), operands((4, 16), 3, torch.bfloat16)))
    operand[needs_grad].requires_grad_()
    with pytest.raises(ValueError, match="no backward"):
        swiglu_linear(operand["x"], operand["weight"], operand["bias"], backend="triton")


@pytest.fixture
def resolved_as_on_cuda(monkeypatch: pytest.MonkeyPatch, as_on_cuda):
    """Backends resolved as on a CUDA machine with every backend (auto takes triton), whatever the tensors' device:
    the spy's list of the calls that reach the Triton kernel (each returns the reference instead)."""
    calls: list[torch.dtype] = []
    fake = swl._swiglu_linear_fake
    monkeypatch.setattr(swl, "_swiglu_linear_triton", lambda x, *a: calls.append(x.dtype) or fake(x, *a))
    assert swl.resolve_backend("swiglu_linear", torch.device("cpu"), "auto", swl.AUTO_ORDER) == "triton"
    return calls


def refused_operands() -> dict[str, tuple[tuple[torch.Tensor, ...], type[Exception], str]]:
    """Inputs the Triton kernel refuses (eager takes them all), each with the error an explicit triton raises."""
    fp32 = operands((6, 16), 5, torch.float32)
    needs_grad = tuple(t.requires_grad_() for t in operands((6, 16), 5, torch.bfloat16))
    narrow_k = operands((6, 4), 5, torch.bfloat16)
    return {
        "fp32": (fp32, TypeError, "float16 or bfloat16"),
        "needs_grad": (needs_grad, ValueError, "no backward"),
        "narrow_k": (narrow_k, ValueError, "multiple of 16"),
    }


@pytest.mark.parametrize("case", ["fp32", "needs_grad", "narrow_k"])
@pytest.mark.parametrize("requested", [None, "auto", "cpp"])
def test_auto_takes_the_reference_where_the_triton_kernel_refuses(resolved_as_on_cuda, case: str, requested) -> None:
    """Under auto (nothing requested, a use_backend("auto") block, or cpp, which has no kernel for this op) on
    CUDA, inputs the Triton kernel refuses run the eager reference, gradients included: auto must not refuse what
    one of its backends takes. An explicit triton still raises the kernel's error."""
    (x, weight, bias), error, match = refused_operands()[case]
    with use_backend(requested) if requested is not None else contextlib.nullcontext():
        out = swiglu_linear(x, weight, bias, out_width=8)
    assert torch.equal(out, swiglu_linear_reference(x, weight, bias, 8))
    assert resolved_as_on_cuda == [], "the Triton kernel was called"
    if case == "needs_grad":
        out.float().sum().backward()
        assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (x, weight, bias))
    with pytest.raises(error, match=match):
        swiglu_linear(x, weight, bias, out_width=8, backend="triton")
    with use_backend("triton"), pytest.raises(error, match=match):
        swiglu_linear(x, weight, bias, out_width=8)


@pytest.mark.parametrize("requested", ["auto", "cpp"])
def test_auto_and_cpp_take_triton_on_cuda_where_it_runs(resolved_as_on_cuda, requested: str) -> None:
    x, weight, bias = operands((6, 16), 5, torch.bfloat16)
    with torch.no_grad():
        swiglu_linear(x, weight, bias, backend=requested)
        with use_backend(requested):
            swiglu_linear(x, weight, bias)
    assert resolved_as_on_cuda == [torch.bfloat16] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpp_backend_runs_as_auto(dtype: torch.dtype) -> None:
    """There is no C++ kernel: ``cpp`` (backend= or use_backend) is resolved as auto. Inputs that need a gradient
    run the eager reference everywhere; without one, on CPU too, and on CUDA the Triton kernel where it takes them."""
    x, weight, bias = (t.requires_grad_() for t in operands((6, 16), 5, dtype))
    expected = swiglu_linear_reference(x, weight, bias, 8)
    with use_backend("cpp"):
        in_context = swiglu_linear(x, weight, bias, out_width=8)
    for out in (swiglu_linear(x, weight, bias, out_width=8, backend="cpp"), in_context):
        assert torch.equal(out, expected)
        (dx,) = torch.autograd.grad(out.float().sum(), x)
        assert dx.abs().sum() > 0
    x, weight, bias = (t.detach() for t in (x, weight, bias))
    with torch.no_grad():
        out = swiglu_linear(x, weight, bias, out_width=8, backend="cpp")
    if DEVICE.type == "cpu":
        assert torch.equal(out, swiglu_linear_reference(x, weight, bias, 8))
    else:
        close(out, float64_reference(x, weight, bias, 8), TOL[dtype], "out")


# ------------------------------------------------------------------------------------------ the layer


def layer_and_input(dtype: torch.dtype, width: int = 40) -> tuple[SwiGLU, torch.Tensor]:
    torch.manual_seed(width)
    return SwiGLU(width).to(DEVICE, dtype), randn(2, 5, width, dtype=dtype, seed=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_runs_fused_when_enabled_and_matches_the_official_layer(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPHERE_FAST_FUSED_MLP=1, no gradient: the layer (hidden 106, padded to 128) runs the fused op once and
    matches the official layer in float64 (the output rounded twice: the fused GEMM's and w3's)."""
    layer, x = layer_and_input(dtype)
    calls = []
    monkeypatch.setattr(swl, "_swiglu_linear_triton", lambda *a: calls.append(a[-1]) or swl._triton_forward(*a))
    monkeypatch.setenv("SPHERE_FAST_FUSED_MLP", "1")
    with use_backend("triton"), torch.no_grad():
        assert layer.runs_fused(x)
        out = layer(x)
    assert calls == [128], "one fused call, writing the padded hidden width"
    w = {name: t.detach().double() for name, t in layer.state_dict().items()}
    hidden = float64_reference(x, w["w12.weight"], w["w12.bias"], None)
    close(out, torch.nn.functional.linear(hidden, w["w3.weight"], w["w3.bias"]), 2 * TOL[dtype], "out")


def test_layer_keeps_the_unfused_path_where_the_fused_op_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off by default; with it on, a call that needs a gradient, float32 and the eager backend still run the
    unfused layer (training is unchanged: same bits as with it off)."""
    layer, x = layer_and_input(torch.bfloat16)
    with use_backend("triton"), torch.no_grad():
        assert not layer.runs_fused(x)
    monkeypatch.setenv("SPHERE_FAST_FUSED_MLP", "1")
    with use_backend("eager"), torch.no_grad():
        assert not layer.runs_fused(x)
    with use_backend("triton"):
        assert not layer.runs_fused(x)
        with_grad = layer(x)
        monkeypatch.setenv("SPHERE_FAST_FUSED_MLP", "0")
        assert torch.equal(layer(x), with_grad)
        with torch.no_grad():
            assert not layer.float().runs_fused(x.float())


def test_loop_pads_only_w3_when_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside padded_mlp_weights a fused layer reads the official w12 and pads only w3, once for the loop."""
    layer, x = layer_and_input(torch.bfloat16)
    made = []
    for name in ("padded_w12", "padded_w3"):
        real = getattr(SwiGLU, name)
        monkeypatch.setattr(SwiGLU, name, lambda self, real=real, name=name: made.append(name) or real(self))
    monkeypatch.setenv("SPHERE_FAST_FUSED_MLP", "1")
    with use_backend("triton"), torch.no_grad(), padded_mlp_weights():
        first, second = layer(x), layer(x)
    assert made == ["padded_w3"]
    assert torch.equal(first, second)


@pytest.mark.gpu
def test_fused_mlp_samples_and_compiles_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """SPHERE_FAST_FUSED_MLP=1 on the triton backend: the same images as eager, from the graphed sampler as from
    generate(), and torch.compile (inductor, fullgraph) runs the fused op."""
    model = tiny_model().to(DEVICE, torch.bfloat16).eval()
    labels = torch.arange(8, device=DEVICE) % 10
    seeds = torch.arange(8, dtype=torch.int64, device=DEVICE) * 31 + 1
    with use_backend("eager"):
        _, eager = model.generate(8, y=labels, cfg=1.4, forward_steps=3, seeds=seeds, dtype=torch.bfloat16)
    monkeypatch.setenv("SPHERE_FAST_FUSED_MLP", "1")
    calls, real_forward = [], swl._triton_forward
    monkeypatch.setattr(swl, "_triton_forward", lambda *a: calls.append(1) or real_forward(*a))
    with use_backend("triton"), torch.no_grad():
        _, fused = model.generate(8, y=labels, cfg=1.4, forward_steps=3, seeds=seeds, dtype=torch.bfloat16)
        assert calls, "generate did not run the fused MLP"
        graphed = Sampler(model, 8, 3, cfg=1.4)(labels, seeds)
        v = model.f(randn(4, *model.latent_shape[1:], dtype=torch.float32)).to(torch.bfloat16)
        y = torch.tensor([1, 2, 3, 10], device=DEVICE)  # 10 = the null label
        calls.clear()
        torch._dynamo.reset()  # a decoder compiled earlier with the fused MLP off must not be reused
        compiled = torch.compile(model.decoder, fullgraph=True)(v, y)
        assert calls, "the compiled decoder does not run the fused MLP"
        decoded = model.decoder(v, y)
    assert_same_images(fused, eager, "fused MLP generate")
    assert_same_images(graphed, fused, "fused MLP graphed sampler")
    assert_same_images(compiled, decoded, "fused MLP compiled decoder")
