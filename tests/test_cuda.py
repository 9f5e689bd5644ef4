"""The fused ops and the model on a CUDA device against the eager reference: the compiled Triton kernels and
the CUDA C++ kernels, which the CPU suites (Triton interpreter, C++ CPU code) cannot reach. GPU-marked:
benchmarks/gpu_check.py runs them; without CUDA they are skipped. (tests/test_attention.py is device-aware
and runs its kernel on CUDA when there is one.)

Tolerances (tests/helpers.py): every output and input gradient is compared with the reference evaluated in
float32 on the same (rounded) inputs, within 1e-5 (fp32) or 2**-6 (bf16) relative to the tensor's largest
magnitude: the kernels compute in fp32 and round once, which test_bf16_ops_round_once_to_nearest checks element
by element for SwiGLU, AdaLN and the noise pair, as the CPU suites do. Model-level: the golden outputs
of the official code within 1e-4 in fp32 (CPU parity is 5e-5; GPU GEMMs sum in another order), except
Triton attention in fp32, whose dots run in TF32 (10-bit mantissa): 2e-2.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import pytest
import torch

import sphere_fast
from sphere_fast import SphereEncoder, ops
from sphere_fast.ops.philox import sphere_noise_reference
from sphere_fast.training import SphereLoss, TrainConfig, Trainer, loss_weights
from tests.helpers import (
    TOL, assert_rounded_to_nearest, assert_same_images, close, off_16_byte_boundaries, stored_residual_reference,
    swapped_in_memory,
)
from tests.test_training import assert_a_non_finite_step_is_skipped
from tests.tiny import NO_PERCEPTUAL, no_label_dropout, tiny_batch, tiny_model

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16]
KERNELS = ["triton", "cpp"]
SEEDS = [5, -3, 2**40 + 1, 0]


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 references without TF32 (cuDNN convolutions default to it)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def require_backend(backend: str) -> str:
    if backend not in sphere_fast.available_backends(DEVICE):
        pytest.skip(f"backend {backend} not available on CUDA here: {sphere_fast.available_backends(DEVICE)}")
    return backend


def randn(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + sum(shape))
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def forward_backward(
    fn: Callable[..., torch.Tensor | Sequence[torch.Tensor]],
    inputs: Sequence[torch.Tensor | None],
    dtype: torch.dtype,
    constants: Sequence[int] = (),
    upstream: torch.dtype = torch.float32,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Outputs of ``fn(*inputs)`` and the gradients of the inputs (but those at ``constants``) for fixed
    upstream gradients (in float32, rounded to ``upstream``); ``dtype`` is what the inputs are cast to (float32
    for the reference run)."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_(i not in constants)
              for i, t in enumerate(inputs)]
    outs = fn(*leaves)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    loss = sum((o.float() * randn(*o.shape, seed=7 + i, dtype=upstream).float()).sum() for i, o in enumerate(outs))
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(loss, wrt))
    return outs, [next(grads) if t is not None and t.requires_grad else None for t in leaves]


def check_against_reference(
    what: str,
    fused: Callable,
    reference: Callable,
    inputs: Sequence[torch.Tensor | None],
    dtype: torch.dtype,
    constants: Sequence[int] = (),
) -> None:
    rounded = [None if t is None else t.to(dtype) for t in inputs]
    outs, grads = forward_backward(fused, rounded, dtype, constants)
    ref_outs, ref_grads = forward_backward(reference, rounded, torch.float32, constants)
    for i, (out, ref) in enumerate(zip(outs, ref_outs, strict=True)):
        assert out.dtype == dtype and out.device.type == "cuda"
        close(out, ref, TOL[dtype], f"{what} output {i}")
    for i, (grad, ref) in enumerate(zip(grads, ref_grads, strict=True)):
        if ref is not None:
            close(grad, ref, TOL[dtype], f"{what} grad of input {i}")


# ------------------------------------------------------------------------------------------------- ops

SPHERIFY_SHAPES = [(4, 4096), (3, 2049), (2, 131072)]  # one block, an odd tail, many blocks per row


@pytest.mark.parametrize("shape", SPHERIFY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNELS)
def test_spherify_ops(backend: str, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    require_backend(backend)
    B, L = shape
    z = randn(B, L, scale=3.0)
    seeds = torch.tensor(SEEDS[:B] + [11] * max(0, B - len(SEEDS)), device=DEVICE)
    scale = torch.tensor([0.7, 0.0, 2.5, 1.0][:B], device=DEVICE)
    small = scale * 0.25
    e = sphere_noise_reference(seeds, (L,), stream=2)  # the convention's draw, float32

    check_against_reference("spherify", lambda z: ops.spherify(z, backend=backend), ops.spherify_reference,
                            [z], dtype)
    check_against_reference(
        "spherify_noise(seeds)",
        lambda z, s: ops.spherify_noise(z, s, seeds=seeds, stream=2, backend=backend),
        lambda z, s: ops.spherify_noise_reference(z, s, e), [z, scale], dtype)
    check_against_reference(
        "spherify_noise(noise)",
        lambda z, s, n: ops.spherify_noise(z, s, noise=n, backend=backend),
        ops.spherify_noise_reference, [z, scale, e], dtype, constants=[2])
    check_against_reference(
        "spherify_noise_pair",
        lambda z, a, b: ops.spherify_noise_pair(z, a, b, seeds=seeds, stream=2, backend=backend),
        lambda z, a, b: (ops.spherify_noise_reference(z, a, e), ops.spherify_noise_reference(z, b, e)),
        [z, scale, small], dtype)


@pytest.mark.parametrize("backend", KERNELS)
def test_sphere_noise_kernels_follow_the_convention(backend: str) -> None:
    require_backend(backend)
    seeds = torch.tensor(SEEDS, dtype=torch.int64)
    # the last: more samples than CUDA's 65535 programs on a grid axis other than x
    for shape, stream in (((4, 64), 0), ((3, 17), 5), ((65536,), 1), ((65537, 3), 2)):
        expected = sphere_noise_reference(seeds, shape, stream=stream)  # the pure-torch Philox on the CPU
        got = ops.sphere_noise(seeds.to(DEVICE), shape, stream, backend=backend)
        # Philox bits are exact; Box-Muller's log/cos differ by an ulp or two between libraries
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KERNELS)
def test_sphere_noise_for_no_samples(backend: str) -> None:
    """Zero seeds: an empty draw, not a launch of a grid with no blocks (an invalid configuration)."""
    require_backend(backend)
    out = ops.sphere_noise(torch.empty(0, dtype=torch.int64, device=DEVICE), (4, 4), backend=backend)
    assert out.shape == (0, 4, 4) and out.device.type == "cuda"


@pytest.mark.parametrize("backend", KERNELS)
def test_noise_of_one_value_samples_at_stream_1(backend: str) -> None:
    """stream * L == 1: Triton passed an int argument equal to 1 as a constant and the noise kernels failed to
    compile (the interpreter ran them); the op's values against the eager backend's."""
    require_backend(backend)
    z, seeds = randn(3, 1), torch.tensor([4, 5, 6], device=DEVICE)
    for op in (lambda b: ops.spherify_noise(z, 0.7, seeds=seeds, stream=1, backend=b),
               lambda b: ops.sphere_noise(seeds, (1,), stream=1, backend=b)):
        torch.testing.assert_close(op(backend), op("eager"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KERNELS)
def test_seeded_labels_kernels_give_the_reference_labels(backend: str) -> None:
    """Bit for bit (integer arithmetic), over many blocks, and no launch for no seeds."""
    require_backend(backend)
    seeds = torch.cat([torch.tensor(SEEDS), torch.arange(70_000) * 7919 - 2**40])
    for n in (1, 1000, 2**31 - 1):
        got = ops.seeded_labels(seeds.to(DEVICE), n, backend=backend)
        assert torch.equal(got.cpu(), ops.seeded_labels_reference(seeds, n)), n
    assert ops.seeded_labels(seeds[:0].to(DEVICE), 10, backend=backend).shape == (0,)


# the C++ forward's 16-byte vectors at the model's widths (4096: two or four a thread), one column at D = 97
ADALN_SHAPES = [(4, 256, 1024), (2, 255, 1152), (2, 3, 4096), (3, 7, 97)]


@pytest.mark.parametrize("tokens", [False, True], ids=["per-sample", "per-token"])
@pytest.mark.parametrize("shape", ADALN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNELS)
def test_adaln_ops(backend: str, dtype: torch.dtype, shape: tuple[int, int, int], tokens: bool) -> None:
    require_backend(backend)
    B, S, D = shape
    mod = (B, S, D) if tokens else (B, 1, D)
    x, branch = randn(B, S, D), randn(B, S, D, seed=1)
    gate, shift, scale = randn(*mod, scale=0.5, seed=2), randn(*mod, scale=0.5, seed=3), randn(*mod, scale=0.5, seed=4)
    weight = 1 + randn(D, scale=0.1, seed=5)
    check_against_reference(
        "gated_residual_adaln",
        lambda *t: ops.gated_residual_adaln(*t, backend=backend),
        ops.gated_residual_adaln_reference, [x, branch, gate, weight, shift, scale], dtype)
    check_against_reference(
        "adaln_modulate", lambda *t: ops.adaln_modulate(*t, backend=backend),
        ops.adaln_modulate_reference, [x, weight, shift, scale], dtype)
    check_against_reference(
        "rmsnorm", lambda x, w: ops.adaln_modulate(x, w, backend=backend),
        lambda x, w: ops.adaln_modulate_reference(x, w), [x, weight], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNELS)
def test_ops_on_inputs_off_16_byte_boundaries(backend: str, dtype: torch.dtype) -> None:
    """The model's widths, with every input one element off a 16-byte boundary: the C++ kernels then take their
    one-column paths instead of 16-byte vectors."""
    require_backend(backend)
    B, S, D = 2, 5, 1024
    inputs = [randn(B, S, D), randn(B, S, D, seed=1), *(randn(B, 1, D, scale=0.5, seed=i) for i in (2, 3, 4))]
    inputs.insert(3, 1 + randn(D, scale=0.1, seed=5))  # x, branch, gate, weight, shift, scale
    check_against_reference(
        "gated_residual_adaln", lambda *t: ops.gated_residual_adaln(*map(off_16_byte_boundaries, t), backend=backend),
        ops.gated_residual_adaln_reference, inputs, dtype)
    check_against_reference("swiglu", lambda h: ops.swiglu(off_16_byte_boundaries(h), backend=backend),
                            ops.swiglu_reference, [randn(B, S, 2 * D, scale=2.0)], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNELS)
def test_ops_on_strided_inputs(backend: str, dtype: torch.dtype) -> None:
    """Inputs given by strides, made inside the call (a copy to the dtype would make them contiguous): SwiGLU rows
    16 elements apart beyond their width; AdaLN's x every other token, the branch with a non-unit last stride, the
    gate expanded over tokens (stride 0), a sliced weight and a transposed shift."""
    require_backend(backend)
    B, S, D = 2, 5, 1024

    def gated(x, branch, gate, weight, shift, scale):
        return ops.gated_residual_adaln(
            torch.stack([x, x], dim=2).flatten(1, 2)[:, ::2], swapped_in_memory(branch, 1, 2),
            gate.expand(B, S, D), torch.stack([weight, weight], dim=1)[:, 0],
            swapped_in_memory(shift, 0, 1), scale, backend=backend)

    inputs = [randn(B, S, D), randn(B, S, D, seed=1), randn(B, 1, D, scale=0.5, seed=2),
              1 + randn(D, scale=0.1, seed=5), randn(B, 1, D, scale=0.5, seed=3), randn(B, 1, D, scale=0.5, seed=4)]
    check_against_reference("gated_residual_adaln", gated, ops.gated_residual_adaln_reference, inputs, dtype)
    check_against_reference("swiglu", lambda h: ops.swiglu(torch.cat([h, h[..., :16]], dim=-1)[..., : 2 * D],
                                                           backend=backend),
                            ops.swiglu_reference, [randn(B, S, 2 * D, scale=2.0)], dtype)


def test_adaln_takes_more_samples_than_a_grid_axis_holds() -> None:
    """65537 samples: the C++ backward puts the batch on grid axis x (y and z stop at 65535), as Triton's does.
    fp32 and test_adaln_ops' 3x7x97 per-sample case but for the batch, so the Triton kernels compiled there
    are reused."""
    B, S, D = 65537, 7, 97
    inputs = [randn(B, S, D), randn(B, S, D, seed=1), *(randn(B, 1, D, scale=0.5, seed=i) for i in (2, 3, 4))]
    inputs.insert(3, 1 + randn(D, scale=0.1, seed=5))  # x, branch, gate, weight, shift, scale
    for backend in KERNELS:
        require_backend(backend)
        check_against_reference("gated_residual_adaln", lambda *t: ops.gated_residual_adaln(*t, backend=backend),
                                ops.gated_residual_adaln_reference, inputs, torch.float32)


def test_cpp_refuses_what_its_cuda_kernels_cannot_launch() -> None:
    """Refused before any work: AdaLN rows wider than the CUDA kernels take (ValueError up front), and 2**31 rows,
    one more than grid axis x holds (stride-0 views: nothing that size is allocated)."""
    require_backend("cpp")
    with pytest.raises(ValueError, match="at most 4096 for the cpp backend on CUDA, got 4097"):
        ops.adaln_modulate(randn(1, 2, 4097), backend="cpp")
    with pytest.raises(RuntimeError, match="grid axis x"):
        ops.adaln_modulate(randn(1, 1, 8).expand(2**31, 1, 8), backend="cpp")
    with pytest.raises(RuntimeError, match="grid axis x"):
        ops.swiglu(randn(1, 16).expand(2**31, 16), backend="cpp")
    # grid axis y (65535 blocks): a row's column blocks (one column a thread: H odd) and a sample's chunks of 8192
    with pytest.raises(RuntimeError, match="swiglu: column blocks of H: 65536 exceed CUDA's limit"):
        ops.swiglu(torch.zeros(1, 2 * (65535 * 256 + 1), device=DEVICE), backend="cpp")
    with pytest.raises(RuntimeError, match="spherify: chunks of a sample's values: 65536 exceed CUDA's limit"):
        ops.spherify(torch.zeros(1, 65535 * 8192 + 1, dtype=torch.bfloat16, device=DEVICE), backend="cpp")


@pytest.mark.parametrize("tokens", [False, True], ids=["per-sample", "per-token"])
def test_adaln_forward_candidates_give_the_same_bits(monkeypatch: pytest.MonkeyPatch, tokens: bool) -> None:
    """The Triton forward's launch configs (ops/adaln.py _fwd_candidates: rows per program, warps, which the tuning
    picks between) give the default's bits, in bf16 at the model's widths (one dropped by the tuning for other
    bits would cost its speed, not the images)."""
    adaln = importlib.import_module("sphere_fast.ops.adaln")
    for B, S, D in ((3, 300, 1152), (2, 1024, 1024), (1, 256, 768)):
        mod = (B, S, D) if tokens else (B, 1, D)
        bf16 = torch.bfloat16
        gate, shift, scale = (randn(*mod, dtype=bf16, scale=0.5, seed=i) for i in (2, 3, 4))
        x, branch = (randn(B, S, D, dtype=bf16, seed=i) for i in (0, 1))
        weight = 1 + randn(D, dtype=bf16, scale=0.1, seed=5)
        outputs = {}
        for config in adaln._fwd_candidates(D, 2, interpret=False):
            monkeypatch.setattr(adaln, "_fwd_candidates", lambda D, itemsize, interpret, config=config: (config,))
            outputs[config] = ops.gated_residual_adaln(x, branch, gate, weight, shift, scale, backend="triton")
            monkeypatch.undo()
        default = next(iter(outputs.values()))
        for config, got in outputs.items():
            for name, a, b in zip(("res", "y"), got, default, strict=True):
                assert torch.equal(a, b), f"{config}: {name}, {B}x{S}x{D}"


@pytest.mark.parametrize("tokens", [False, True], ids=["per-sample", "per-token"])
def test_adaln_backward_stage_candidates_give_the_same_bits(monkeypatch: pytest.MonkeyPatch, tokens: bool) -> None:
    """The Triton backward's pipeline-stage candidates (ops/adaln.py BWD_STAGES, which the tuning picks between)
    give the bits of the unpipelined loop, in bf16 at the XL width and the L width over many rows a program."""
    adaln = importlib.import_module("sphere_fast.ops.adaln")
    for B, S, D in ((3, 300, 1152), (2, 1024, 1024)):
        mod = (B, S, D) if tokens else (B, 1, D)
        gate, shift, scale = (randn(*mod, scale=0.5, seed=i) for i in (2, 3, 4))
        inputs = [randn(B, S, D), randn(B, S, D, seed=1), gate, 1 + randn(D, scale=0.1, seed=5), shift, scale]
        grads = {}
        for stages in adaln.BWD_STAGES:
            monkeypatch.setattr(adaln, "_bwd_stage_candidates", lambda stages=stages: (stages,))
            _, grads[stages] = forward_backward(lambda *t: ops.gated_residual_adaln(*t, backend="triton"), inputs,
                                                torch.bfloat16)
        for stages, got in grads.items():
            for i, (g, g1) in enumerate(zip(got, grads[1], strict=True)):
                assert torch.equal(g, g1), f"{stages} stages, grad of input {i}, {B}x{S}x{D}"


@pytest.mark.parametrize("shape", [(4, 256, 2 * 2730), (3, 7, 2 * 48)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNELS)
def test_swiglu(backend: str, dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
    require_backend(backend)
    check_against_reference("swiglu", lambda h: ops.swiglu(h, backend=backend), ops.swiglu_reference,
                            [randn(*shape, scale=2.0)], dtype)


@pytest.mark.parametrize("backend", KERNELS)
def test_bf16_ops_round_once_to_nearest(backend: str) -> None:
    """SwiGLU, AdaLN and the training noise pair in bf16, at the model's widths (the 16-byte vector paths): each
    output and input gradient is its float32 value on the same inputs (and bf16 upstream gradients) rounded once
    to nearest, as the CPU suites check the interpreter and the C++ CPU code (atol 1e-6 x the tensor's max, for
    float32 sums in another order and fused multiply-adds). The noise scales are constants here: their grads are
    sums over a whole sample (test_spherify_ops checks them)."""
    require_backend(backend)
    bf16 = torch.bfloat16
    B, S, D, L = 4, 256, 1152, 4096
    seeds = torch.tensor(SEEDS, device=DEVICE)
    e = sphere_noise_reference(seeds, (L,), stream=2).to(DEVICE)
    modulations = [randn(B, 1, D, scale=0.5, seed=i) for i in (2, 3, 4)]
    cases = {
        "swiglu": (lambda h: ops.swiglu(h, backend=backend), ops.swiglu_reference,
                   [randn(B, S, 2 * 2752, scale=2.0)], ()),
        "gated_residual_adaln": (
            lambda *t: ops.gated_residual_adaln(*t, backend=backend), stored_residual_reference(bf16),
            [randn(B, S, D), randn(B, S, D, seed=1), modulations[0], 1 + randn(D, scale=0.1, seed=5), *modulations[1:]],
            ()),
        "spherify_noise_pair": (
            lambda z, a, b: ops.spherify_noise_pair(z, a, b, seeds=seeds, stream=2, backend=backend),
            lambda z, a, b: (ops.spherify_noise_reference(z, a, e), ops.spherify_noise_reference(z, b, e)),
            [randn(B, L, scale=3.0), torch.tensor([0.7, 0.0, 2.5, 1.0], device=DEVICE), randn(B, scale=0.2)], (1, 2)),
    }
    for what, (fused, reference, inputs, constants) in cases.items():
        rounded = [t.to(bf16) for t in inputs]
        outs, grads = forward_backward(fused, rounded, bf16, constants, upstream=bf16)
        ref_outs, ref_grads = forward_backward(reference, rounded, torch.float32, constants, upstream=bf16)
        pairs = [(f"output {i}", o, r) for i, (o, r) in enumerate(zip(outs, ref_outs, strict=True))]
        pairs += [(f"grad of input {i}", g, r) for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True))]
        for name, got, exact in pairs:
            if exact is not None:
                assert got.dtype == bf16, f"{what} {name}"
                assert_rounded_to_nearest(got, exact, bf16, atol=1e-6 * exact.abs().max().item(), what=f"{what} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNELS)
def test_padded_mlp_layer(backend: str, dtype: torch.dtype) -> None:
    """Sphere-L's MLP (hidden 2730, run as 2752 through cuBLAS on the fused backends) against the official
    shapes in float32 (eager)."""
    import copy

    from sphere_fast.nn.layers import SwiGLU

    require_backend(backend)
    torch.manual_seed(0)
    layer = SwiGLU(1024).to(DEVICE, dtype)
    official = copy.deepcopy(layer).float()

    def fused(x: torch.Tensor) -> torch.Tensor:
        with sphere_fast.use_backend(backend):
            assert layer.computes_padded(x.device)
            return layer(x)

    def reference(x: torch.Tensor) -> torch.Tensor:
        with sphere_fast.use_backend("eager"):
            return official(x)

    check_against_reference("padded mlp", fused, reference, [randn(2, 256, 1024)], dtype)


# ----------------------------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def golden(reference):
    return torch.load(reference / "golden" / "tiny_cond_linear.pt", weights_only=True)


@pytest.fixture(scope="module")
def golden_model(golden) -> SphereEncoder:
    model = SphereEncoder(**golden["config"]).eval()
    model.load_state_dict(golden["state_dict"], strict=True)
    return model.to(DEVICE)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().cpu() - b.float()).abs().max().item()


@pytest.mark.parametrize("backend", ["eager", *KERNELS])
def test_golden_parity_fp32(golden_model: SphereEncoder, golden, backend: str) -> None:
    if backend != "eager":
        require_backend(backend)
    tol = 2e-2 if backend == "triton" else 1e-4
    c = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in golden["cases"]["forward"].items()}
    case = golden["cases"]["generate"][-1]
    with sphere_fast.use_backend(backend), torch.no_grad():
        assert max_err(golden_model.encoder(c["x"], c["y"]), c["z"].cpu()) < tol
        assert max_err(golden_model.decoder(c["v_noisy"], c["y"]), c["x_dec"].cpu()) < tol
        first, out = golden_model.generate(
            case["y"].shape[0], y=case["y"].to(DEVICE), cfg=case["cfg"], cfg_position=case["cfg_position"],
            forward_steps=case["steps"], cache_sampling_noise=case["cache_noise"], noise=case["noise_draws"],
        )
    assert max_err(first, case["first"]) < tol and max_err(out, case["out"]) < tol


@pytest.fixture(scope="module")
def bf16_model() -> SphereEncoder:
    return tiny_model().to(DEVICE, torch.bfloat16).eval()


def test_backends_agree_on_bf16_samples(bf16_model: SphereEncoder) -> None:
    labels = torch.arange(8, device=DEVICE) % 10
    seeds = torch.arange(8, dtype=torch.int64, device=DEVICE) * 31 + 1
    images = {}
    for backend in ["eager", *(b for b in KERNELS if b in sphere_fast.available_backends(DEVICE))]:
        with sphere_fast.use_backend(backend):
            _, images[backend] = bf16_model.generate(8, y=labels, cfg=1.4, forward_steps=3, seeds=seeds,
                                                     dtype=torch.bfloat16)
    assert len(images) > 1, "no fused backend on CUDA"
    for backend, out in images.items():
        assert_same_images(out, images["eager"], backend)


def test_inductor_compiles_the_fused_model(bf16_model: SphereEncoder) -> None:
    """torch.compile (inductor, fullgraph) over the fused ops on CUDA: no graph break, same outputs."""
    v = bf16_model.f(randn(4, *bf16_model.latent_shape[1:])).to(torch.bfloat16)
    y = torch.tensor([1, 2, 3, 10], device=DEVICE)  # 10 = null label
    compiled = torch.compile(bf16_model.decoder, fullgraph=True)
    with torch.no_grad():
        assert_same_images(compiled(v, y), bf16_model.decoder(v, y), "compiled decoder")


def test_activation_checkpointing_through_the_cuda_kernels() -> None:
    """A bf16-autocast training loss with each block run again in the backward (TrainConfig
    .activation_checkpointing) gives the gradients of the plain backward through the fused CUDA kernels."""
    x, y = (t.to(DEVICE) for t in tiny_batch(6))
    scales = (torch.full((6,), 2.0, device=DEVICE), torch.full((6,), 0.5, device=DEVICE))
    seeds = torch.arange(6, dtype=torch.int64, device=DEVICE) + 3
    grads = {}
    for recompute in (False, True):
        model = no_label_dropout(tiny_model()).to(DEVICE).train()
        for network in (model.encoder, model.decoder):
            network.activation_checkpointing = recompute
        with torch.autocast("cuda", dtype=torch.bfloat16):
            total, _ = SphereLoss(model, loss_weights(NO_PERCEPTUAL))(x, y, *scales, seeds=seeds)
        total.backward()
        grads[recompute] = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        close(grads[True][name], grad, TOL[torch.bfloat16], name)


def test_a_queued_training_step_never_waits_for_the_device() -> None:
    """Trainer.launch_step on CUDA under the sync debug mode, after a first step (the kernels' tuning times
    them): nothing in the step waits for the GPU. Its losses, read afterwards from pinned memory, are those of
    the same step run by the waiting train_step."""
    x, y = (t.pin_memory() for t in tiny_batch(6))  # as fit's loader gives them on a GPU
    config = TrainConfig(global_batch=6, total_steps=3, warmup_steps=1, loss_weights=NO_PERCEPTUAL)
    logged = {}
    for queued in (False, True):
        trainer = Trainer(no_label_dropout(tiny_model()), config, device=DEVICE)
        torch.manual_seed(1)  # the noise levels and seeds each step draws
        trainer.train_step(x, y)
        if queued:
            torch.cuda.set_sync_debug_mode("error")
            try:
                log = trainer.launch_step(x, y)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            logged[queued] = log.read()
        else:
            logged[queued] = trainer.train_step(x, y)
    assert logged[True].keys() == logged[False].keys()
    for name, value in logged[False].items():
        assert math.isclose(logged[True][name], value, rel_tol=1e-5), (name, logged[True][name], value)


def test_a_step_with_non_finite_gradients_is_skipped_on_the_device() -> None:
    """The CUDA fused AdamW takes the step's found_inf: a NaN in a batch changes no weight and no moment (that it
    waits for nothing is test_a_queued_training_step_never_waits_for_the_device's)."""
    assert_a_non_finite_step_is_skipped(DEVICE)


def test_pinned_labels_and_seeds_changed_after_a_queued_step_do_not_reach_it() -> None:
    """A caller's pinned buffer of labels and seeds, changed right after launch_step while the device is busy
    and the step's copies of it are queued: the step's losses are those of the values it was given."""
    x, y = tiny_batch(6)
    seeds = torch.arange(6)
    scales = (torch.full((6,), 0.9), torch.full((6,), 0.3))
    config = TrainConfig(global_batch=6, total_steps=3, warmup_steps=1, loss_weights=NO_PERCEPTUAL)
    expected = Trainer(no_label_dropout(tiny_model()), config, device=DEVICE).train_step(x, y, scales=scales,
                                                                                         seeds=seeds)
    trainer = Trainer(no_label_dropout(tiny_model()), config, device=DEVICE)
    pinned_y, pinned_seeds = y.pin_memory(), seeds.pin_memory()
    torch.cuda._sleep(100_000_000)  # tens of ms of device work queued ahead of the step's copies
    log = trainer.launch_step(x, pinned_y, scales=scales, seeds=pinned_seeds)
    pinned_y.add_(1).remainder_(10)
    pinned_seeds.add_(1000)
    logged = log.read()
    for name, value in expected.items():
        assert math.isclose(logged[name], value, rel_tol=1e-5), name


def test_sample_set_from_cuda_graphs(bf16_model: SphereEncoder, tmp_path) -> None:
    """sample-set's files on CUDA (graph replays, buckets 4 and 1) hold the un-captured sampler's images."""
    import numpy as np
    from PIL import Image

    from sphere_fast.sample_set import image_labels, image_path, image_seeds, to_uint8, write_sample_set

    assert write_sample_set(bf16_model, tmp_path, 5, batch_size=4, steps=2, cfg=1.4, seed=1) == 5
    files = np.stack([np.asarray(Image.open(image_path(tmp_path, i, 5))) for i in range(5)]).astype(int)
    plain = sphere_fast.Sampler(bf16_model, 5, 2, cfg=1.4, cuda_graph=False)
    expected = to_uint8(plain(labels=image_labels(10, range(5)).to(DEVICE), seeds=image_seeds(1, range(5))))
    assert np.abs(files - expected.astype(int)).max() <= 1  # kernel rounding may move a value across a step


def test_graphs_capture_sdpa_at_a_head_dim_that_is_not_a_power_of_two() -> None:
    """At head dim 72 (Sphere-XL's) auto runs SDPA, whose kernel torch picks (cuDNN's on an H200): the sampler
    captures it in its graph and replays the un-captured sampler's images, the same bits on each replay."""
    size = {"width": 144, "layers": 1, "heads": 2}
    model = tiny_model(vit_enc_model_size=size, vit_dec_model_size=size).to(DEVICE, torch.bfloat16).eval()
    assert ops.attention_impl(torch.zeros(1, 2, 4, 72, device=DEVICE, dtype=torch.bfloat16)) == "sdpa"
    labels = torch.arange(4, device=DEVICE)
    seeds = torch.arange(4, dtype=torch.int64, device=DEVICE) + 7
    graphed = sphere_fast.Sampler(model, 4, 2, cfg=1.4)
    images = graphed(labels, seeds).clone()
    assert len(graphed.graph_keys) == 1
    assert_same_images(images, sphere_fast.Sampler(model, 4, 2, cfg=1.4, cuda_graph=False)(labels, seeds), "sdpa graph")
    assert torch.equal(graphed(labels, seeds), images)
