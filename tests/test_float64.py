"""float64 on every op: the eager references compute it in float64 (gradcheck: float32 math inside would fail it),
``auto`` takes them for it where it would run a kernel (resolved here as on a CUDA machine with every backend), and
a kernel backend asked for by name refuses it with a TypeError that names the dtype and the eager backend."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import sphere_fast
from sphere_fast import backend as backend_module
from sphere_fast import ops
from sphere_fast.ops.rope import rope_table_reference

SEEDS = torch.tensor([3, 4])
TABLE = rope_table_reference(4, 16, "cpu")  # N = 4 tokens, head dim 16 (the Triton attention's smallest)

# name: (call(backend, *tensors), shapes of the float64 tensors, the backends with a kernel of their own)
CASES: dict[str, tuple[Callable[..., object], list[tuple[int, ...]], tuple[str, ...]]] = {
    "spherify": (lambda b, z: ops.spherify(z, backend=b), [(2, 3, 4)], ("triton", "cpp")),
    "spherify_noise": (
        lambda b, z, s, e: ops.spherify_noise(z, s, noise=e, backend=b), [(2, 3, 4), (2,), (2, 3, 4)],
        ("triton", "cpp"),
    ),
    "spherify_noise_pair": (
        lambda b, z, s1, s2: ops.spherify_noise_pair(z, s1, s2, seeds=SEEDS, backend=b), [(2, 3, 4), (2,), (2,)],
        ("triton", "cpp"),
    ),
    "adaln_modulate": (
        lambda b, x, w, sh, sc: ops.adaln_modulate(x, w, sh, sc, backend=b), [(2, 3, 8), (8,), (2, 1, 8), (2, 3, 8)],
        ("triton", "cpp"),
    ),
    "gated_residual_adaln": (
        lambda b, x, br, g, w, sh, sc: ops.gated_residual_adaln(x, br, g, w, sh, sc, backend=b),
        [(2, 3, 8), (2, 3, 8), (2, 1, 8), (8,), (2, 1, 8), (2, 1, 8)], ("triton", "cpp"),
    ),
    "swiglu": (lambda b, h: ops.swiglu(h, backend=b), [(2, 3, 10)], ("triton", "cpp")),
    "apply_rope": (lambda b, q, k: ops.apply_rope(q, k, TABLE, backend=b), [(1, 2, 4, 16)] * 2, ("triton",)),
    "attention": (lambda b, q, k, v: ops.attention(q, k, v, TABLE, backend=b), [(1, 2, 4, 16)] * 3, ("triton",)),
    "swiglu_linear": (
        lambda b, x, w, bias: ops.swiglu_linear(x, w, bias, backend=b), [(2, 3, 8), (12, 8), (12,)], ("triton",),
    ),
}


def _tensors(name: str, requires_grad: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = CASES[name][1]
    return [(torch.randn(s, generator=g, dtype=torch.float64) * 0.5).requires_grad_(requires_grad) for s in shapes]


@pytest.mark.parametrize("name", CASES)
def test_eager_computes_float64(name: str) -> None:
    call, _, _ = CASES[name]
    inputs = _tensors(name, requires_grad=True)
    out = call("eager", *inputs)
    assert all(t.dtype == torch.float64 for t in (out if isinstance(out, tuple) else (out,)))
    assert torch.autograd.gradcheck(lambda *t: call("eager", *t), inputs)


@pytest.mark.parametrize("name", CASES)
def test_auto_takes_the_reference_where_a_kernel_would_run(name: str, as_on_cuda: None) -> None:
    call, _, kernels = CASES[name]
    assert backend_module.resolve_backend(name, torch.device("cpu"), "auto", ("triton",)) == "triton"
    inputs = _tensors(name)
    expected = call("eager", *inputs)
    backends = [None, "auto"] + (["cpp"] if "cpp" not in kernels else [])  # cpp without a C++ kernel: as auto
    for backend in backends:
        with sphere_fast.use_backend("auto"):
            torch.testing.assert_close(call(backend, *inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", CASES)
def test_kernel_backends_refuse_float64(name: str, as_on_cuda: None) -> None:
    call, _, kernels = CASES[name]
    for backend in kernels:
        with pytest.raises(TypeError, match=r"float64\b.*\beager\b") as refused:
            call(backend, *_tensors(name))
        assert f"{backend} backend" in str(refused.value) or f"{backend} kernel" in str(refused.value)
