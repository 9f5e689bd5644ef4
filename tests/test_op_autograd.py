"""The fused ops under autograd beyond a public op's call: the forward ops differentiable by themselves (a graph
that holds them, torch.export's, trains through them), and forward-mode AD and torch.func transforms, whose
derivatives the fused kernels do not give: ``auto`` runs the eager reference there, a fused backend named
explicitly refuses (it would have given zero tangents and dropped gradients without an error)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwad
from torch.export import export

import sphere_fast
from sphere_fast import ops
from sphere_fast.backend import requested_backend
from sphere_fast.ops.rope import rope_table_reference
from tests.helpers import FUSED
from tests.tiny import no_label_dropout, tiny_model

OPS = torch.ops.sphere_fast
FUSED_NAMES = [b for b in ("triton", "cpp") if b in sphere_fast.available_backends("cpu")]


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"x": (2, 5, 16), "branch": (2, 5, 16), "gate": (2, 1, 16), "w": (16,), "shift": (2, 1, 16),
              "scale": (2, 1, 16), "h": (2, 5, 22), "z": (2, 4, 6), "scales": (2, 2), "noise": (2, 4, 6),
              "q": (1, 2, 8, 16), "k": (1, 2, 8, 16), "v": (1, 2, 8, 16)}
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


# (name, the raw op's differentiable outputs, the public op's, the inputs that take a gradient), for one backend
RAW_AND_PUBLIC: list[tuple[str, Callable, Callable, tuple[str, ...]]] = [
    ("swiglu", lambda t, b: [OPS.swiglu_fwd(t["h"], b)], lambda t, b: [ops.swiglu(t["h"], backend=b)], ("h",)),
    ("adaln_modulate",
     lambda t, b: [OPS.adaln_modulate_fwd(t["x"], t["w"], t["shift"], t["scale"], 1e-6, b)[0]],
     lambda t, b: [ops.adaln_modulate(t["x"], t["w"], t["shift"], t["scale"], backend=b)],
     ("x", "w", "shift", "scale")),
    ("gated_residual_adaln",
     lambda t, b: list(OPS.gated_residual_adaln_fwd(t["x"], t["branch"], t["gate"], t["w"], t["shift"], t["scale"],
                                                    1e-6, b)[:2]),
     lambda t, b: list(ops.gated_residual_adaln(t["x"], t["branch"], t["gate"], t["w"], t["shift"], t["scale"],
                                                backend=b)),
     ("x", "branch", "gate", "w", "shift", "scale")),
    ("spherify_noise_pair",
     lambda t, b: list(OPS.spherify_fwd(t["z"], t["scales"], t["noise"], None, 0, b)[0]),
     lambda t, b: ops.spherify_noise_pair(t["z"], t["scales"][0], t["scales"][1], noise=t["noise"], backend=b),
     ("z", "scales")),
]
TRITON_ONLY = [
    ("apply_rope",
     lambda t, b: list(OPS.rope_fwd(t["q"], t["k"], rope_table_reference(8, 16, "cpu"))),
     lambda t, b: list(ops.apply_rope(t["q"], t["k"], rope_table_reference(8, 16, "cpu"), backend=b)), ("q", "k")),
    ("attention",
     lambda t, b: [OPS.attention_triton_fwd(t["q"], t["k"], t["v"])[0]],
     lambda t, b: [ops.attention(t["q"], t["k"], t["v"], backend=b)], ("q", "k", "v")),
]


def _grads(fn: Callable, backend: str, names: tuple[str, ...]) -> list[torch.Tensor]:
    t = _inputs()
    for name in names:
        t[name].requires_grad_()
    outs = fn(t, backend)
    cotangents = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outs)]
    loss = sum((o * c).sum() for o, c in zip(outs, cotangents, strict=True))
    return list(torch.autograd.grad(loss, [t[name] for name in names]))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", RAW_AND_PUBLIC + TRITON_ONLY, ids=lambda c: c[0])
def test_forward_ops_are_differentiable_themselves(case, backend: str) -> None:
    """Each forward op called directly gives the public op's gradients (before, autograd passed the op by: its
    outputs required no grad, or, behind another differentiable op, the inputs before it got none)."""
    name, raw, public, names = case
    if case in TRITON_ONLY and backend != "triton":
        pytest.skip(f"{name} has no C++ kernel")
    for got, want in zip(_grads(raw, backend, names), _grads(public, backend, names), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_an_exported_decoder_trains_as_the_module(backend: str) -> None:
    """torch.export keeps the forward ops in its graph (not the public ops' autograd.Functions): the exported
    module's gradients, to its input and every parameter, are the eager module's."""
    decoder = no_label_dropout(tiny_model()).eval().decoder
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, decoder.num_tokens, decoder.token_channels, generator=g)
    y = torch.randint(0, 10, (3,), generator=g)

    def grads(module: Callable) -> list[torch.Tensor]:
        decoder.zero_grad(set_to_none=True)
        zz = z.clone().requires_grad_()
        out = module(zz, y)
        out.mul(torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return [zz.grad, *(p.grad for p in decoder.parameters())]

    with sphere_fast.use_backend("eager"):
        want = grads(decoder)
    with sphere_fast.use_backend(backend):
        exported = export(decoder, (z, y)).module()
        assert any(str(node.target).startswith("sphere_fast.") for node in exported.graph.nodes)
        got = grads(exported)
    for g_got, g_want in zip(got, want, strict=True):
        assert (g_got is None) == (g_want is None)
        if g_want is not None:
            torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-4)


def test_a_decoder_exports_with_a_batch_dim_up_to_attention_s_launch_batch() -> None:
    """A batch Dim takes max=LAUNCH_BATCH (README): attention runs larger batches in slices, a branch on the size
    that export must fix (Dim("b", min=1) is refused: "Constraints violated"); the module then takes any batch."""
    from torch.export import Dim

    from sphere_fast.ops.attention import LAUNCH_BATCH

    decoder = tiny_model().eval().decoder
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, decoder.num_tokens, decoder.token_channels, generator=g)
    y = torch.randint(0, 10, (3,), generator=g)
    b = Dim("b", min=1, max=LAUNCH_BATCH)
    with sphere_fast.use_backend("cpp"), torch.no_grad():
        exported = export(decoder, (z, y), dynamic_shapes=({0: b}, {0: b})).module()
        for batch in (1, 5):
            torch.testing.assert_close(exported(z[:1].expand(batch, -1, -1), y[:1].expand(batch)),
                                       decoder(z[:1].expand(batch, -1, -1), y[:1].expand(batch)), atol=1e-6, rtol=0)

def _swiglu_jvp(backend: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    h, tangent = _inputs()["h"], _inputs(1)["h"]
    return torch.func.jvp(lambda t: ops.swiglu(t, backend=backend), (h,), (tangent,))


@pytest.mark.parametrize("backend", FUSED)
def test_fused_backends_refuse_forward_mode_and_torch_func(backend: str) -> None:
    h = _inputs()["h"]
    with pytest.raises(NotImplementedError, match=f"swiglu: backend '{backend}' .* cannot run under a torch.func"):
        _swiglu_jvp(backend)
    with sphere_fast.use_backend(backend), pytest.raises(NotImplementedError, match="torch.func transform"):
        torch.func.grad(lambda t: ops.adaln_modulate(t).sum())(h)
    with fwad.dual_level(), pytest.raises(NotImplementedError, match="cannot run under forward-mode AD"):
        ops.spherify(fwad.make_dual(h, torch.ones_like(h)), backend=backend)
    for impl in ("triton", "flash_attn"):  # flash_attn refused before it is found missing (not installable here)
        with pytest.raises(NotImplementedError, match=f"impl '{impl}' cannot run under"):
            torch.func.jacrev(lambda q: ops.attention(q, q, q, impl=impl))(_inputs()["q"])


@pytest.mark.parametrize("backend", FUSED)
def test_fused_backends_run_under_transforms_that_take_no_derivative(backend: str) -> None:
    """vmap (the kernels run sample by sample, recorded for autograd: the gradient reaches the tensors outside,
    where inside vmap the call seemed to need none) and functionalize give eager's values and gradients."""
    h = _inputs()["h"]
    weight = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(3))
    grads = []
    for name in (backend, "eager"):
        leaf = h.clone().requires_grad_()
        out = torch.func.vmap(lambda t, name=name: ops.swiglu(t, backend=name))(leaf)
        torch.testing.assert_close(out, ops.swiglu_reference(h))
        grads.append(torch.autograd.grad((out * weight).sum(), leaf)[0])
    torch.testing.assert_close(*grads)
    torch.testing.assert_close(torch.func.functionalize(lambda t: ops.swiglu(t, backend=backend))(h),
                               ops.swiglu_reference(h))


@pytest.mark.parametrize("backend", ["eager", *FUSED])
def test_vmap_takes_per_sample_noise_scales(backend: str) -> None:
    """Under vmap a tensor scale cannot be value-checked on the host (vmap cannot branch on a value): the call runs
    as a loop over the samples would."""
    t = _inputs()
    z, noise, scale = t["z"], t["noise"], torch.tensor([0.5, 2.0])
    out = torch.func.vmap(lambda zi, ei, si: ops.spherify_noise(zi, si, noise=ei, backend=backend))(z, noise, scale)
    pair = torch.func.vmap(lambda zi, ei, si: ops.spherify_noise_pair(zi, si, si / 2, noise=ei, backend=backend))
    loop = [ops.spherify_noise_pair(z[i], scale[i], scale[i] / 2, noise=noise[i], backend="eager") for i in range(2)]
    torch.testing.assert_close(out, torch.stack([ops.spherify_noise(z[i], scale[i], noise=noise[i], backend="eager")
                                                 for i in range(2)]))
    for got, expected in zip(pair(z, noise, scale), zip(*loop), strict=True):
        torch.testing.assert_close(got, torch.stack(expected))


@pytest.mark.parametrize("backend", FUSED)
def test_graphs_holding_the_ops_refuse_forward_mode(backend: str) -> None:
    """An exported module and a function compiled before take the forward op without the public op's check:
    the op's own autograd kernel refuses forward-mode AD (it gave no tangent, or zeros)."""

    class SwiGLU(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return ops.swiglu(t, backend=backend)

    h, tangent = _inputs()["h"], _inputs(1)["h"]
    exported = export(SwiGLU(), (h,)).module()
    with pytest.raises(NotImplementedError, match="swiglu_fwd cannot run under a torch.func transform"):
        torch.func.jvp(exported, (h,), (tangent,))
    compiled = torch.compile(SwiGLU(), backend="aot_eager", fullgraph=True)
    compiled(h)
    with fwad.dual_level(), pytest.raises(Exception, match="swiglu_fwd cannot run under forward-mode AD"):
        compiled(fwad.make_dual(h, tangent))


def test_ops_refuse_a_constant_input_that_requires_grad() -> None:
    """The noise and the RoPE table get no gradient from the forward ops: one requiring grad is refused there too
    (the public ops refuse it before; a graph holding the op met it only at run time)."""
    t = _inputs()
    with pytest.raises(ValueError, match="noise must not require grad"):
        OPS.spherify_fwd(t["z"].requires_grad_(), t["scales"], t["noise"].requires_grad_(), None, 0, FUSED_NAMES[0])
    table = rope_table_reference(8, 16, "cpu").requires_grad_()
    if "triton" in FUSED_NAMES:
        with pytest.raises(ValueError, match="rope must not require grad"):
            OPS.rope_fwd(t["q"].requires_grad_(), t["k"], table)


def test_auto_reads_as_eager_under_forward_mode_and_torch_func() -> None:
    """On CPU auto is eager anyway; the choice itself is checked here, and the tangents against eager's."""
    seen: list[str] = []
    with sphere_fast.use_backend("auto"):
        torch.func.grad(lambda t: (seen.append(requested_backend("op", None)) or t).sum())(torch.zeros(2))
        with fwad.dual_level():
            seen.append(requested_backend("op", None))
        torch.func.vmap(lambda t: seen.append(requested_backend("op", None)) or t)(torch.zeros(2))  # no derivative
        seen.append(requested_backend("op", None))
        out, tangent = _swiglu_jvp(None)
    assert seen == ["eager", "eager", "auto", "auto"]
    want_out, want_tangent = _swiglu_jvp("eager")
    torch.testing.assert_close(tangent, want_tangent)
    torch.testing.assert_close(out, want_out)


@pytest.mark.skipif("cpp" not in sphere_fast.available_backends("cpu"), reason="cpp unavailable")
def test_the_cpp_extension_ops_themselves_refuse_a_gradient() -> None:
    """The C++ ops under the sphere_fast ones have no derivative: called directly on inputs that require grad,
    their backward raises (torch's default fallback warned and left the gradients None)."""
    adaln, spherify, swiglu = (importlib.import_module(f"sphere_fast.ops.{m}") for m in ("adaln", "spherify", "swiglu"))
    x = torch.randn(1, 3, 8, requires_grad=True)
    outputs = [swiglu._cpp_ext().fwd(x[0]), adaln._cpp_ext().fwd(x, None, None, None, None, None, 1e-6)[1],
               spherify._cpp_ext().spherify_fwd(x, None, None, None, 0)[0]]
    for out in outputs:
        with pytest.raises(RuntimeError, match="not implemented"):
            out.sum().backward()
    torch.testing.assert_close(outputs[0], ops.swiglu(x[0].detach(), backend="cpp"))  # the values stay right


@pytest.mark.skipif("triton" not in sphere_fast.available_backends("cpu"), reason="triton unavailable")
def test_the_forward_only_op_refuses_a_gradient() -> None:
    """The fused MLP GEMM has no backward: called directly (or from a graph holding it) on inputs that require
    grad it refuses, where autograd had passed it by and the inputs got no gradient."""
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(4, 32, generator=g).bfloat16(), torch.randn(32, 32, generator=g).bfloat16()
    with torch.no_grad():
        want = OPS.swiglu_linear_triton(x, weight, None, 16)
    with pytest.raises(ValueError, match="swiglu_linear_triton has no backward"):
        OPS.swiglu_linear_triton(x, weight.requires_grad_(), None, 16)
    torch.testing.assert_close(OPS.swiglu_linear_triton(x, weight.detach(), None, 16), want, atol=0, rtol=0)
