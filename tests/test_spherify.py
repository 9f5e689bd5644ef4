"""Spherify ops (sphere_fast.ops.spherify) on the triton (interpreter) and cpp (CPU C++) backends vs eager.

Tolerances (kernel vs the eager reference on the same inputs):
  fp32: rtol = atol = 1e-5 (values have RMS 1: the sphere has radius sqrt(L)); gradients atol 1e-5 * max|ref|.
  bf16 / fp16: the reference is evaluated in fp32 on the same low-precision inputs and each element of the
  kernel's output (and dz) must be it rounded once, to nearest (atol 1e-6 x the tensor's max, for fp32 sums in
  another order): the kernels compute in fp32 and round once, bf16 in the interpreter too (EMULATE_BF16).
Interpreter cost: Philox runs at about 40k values/s, so the in-kernel-noise Triton cases use L in {2048, 2049}
(plus 65536 at B = 1; C++ runs 65536 and 90112 at B = 1); plain spherify runs the whole grid, explicit noise
too except Triton at B = 3 with the big L.
"""

import importlib
import math

import pytest
import torch

import sphere_fast
from sphere_fast.ops import philox as P
from sphere_fast.ops.philox import sphere_noise_reference
from tests.helpers import assert_gradient_penalty_eager_only, assert_rounded_to_nearest, swapped_in_memory

S = importlib.import_module("sphere_fast.ops.spherify")

KERNELS = ["triton", "cpp"]
SMALL_L = [2048, 2049]
BIG_L = [65536, 90112]  # 8 and 11 programs a sample: chunk sums over a non-power-of-two count


def _z(batch, length, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + 7 * length + batch)
    # per-sample shape [C, N] like a latent when L allows, with a non-unit radius
    shape = (4, length // 4) if length % 4 == 0 else (length,)
    return (3.0 * torch.randn(batch, *shape, generator=g)).to(dtype)


def _seeds(batch):
    return torch.tensor([5, -3, 2**40 + 1][:batch], dtype=torch.int64)


def _scale(batch):
    return torch.tensor([0.7, 0.0, 2.5][:batch])


def _ref_noise(z, noise=None, seeds=None, stream=0):
    return noise if noise is not None else sphere_noise_reference(seeds, z.shape[1:], stream=stream)


def _close(actual, expected, dtype=torch.float32):
    if dtype == torch.float32:
        torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-5, atol=1e-5)
    else:
        assert actual.dtype == dtype
        assert_rounded_to_nearest(actual, expected.float(), dtype, atol=1e-6 * expected.abs().max().item())


def _grad_close(actual, expected):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


# --------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length", SMALL_L + BIG_L)
@pytest.mark.parametrize("batch", [1, 3])
def test_spherify_forward(backend, dtype, length, batch):
    z = _z(batch, length, dtype)
    out = S.spherify(z, backend=backend)
    assert out.shape == z.shape and out.dtype == dtype
    _close(out, S.spherify_reference(z.float()), dtype)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("length", SMALL_L + BIG_L)
@pytest.mark.parametrize("batch", [1, 3])
def test_noise_forward_explicit(backend, length, batch):
    if backend == "triton" and batch == 3 and length in BIG_L:
        pytest.skip("interpreter time: big L runs at B = 1 for this path")
    z = _z(batch, length)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    out = S.spherify_noise(z, _scale(batch), noise=noise, backend=backend)
    _close(out, S.spherify_noise_reference(z, _scale(batch), noise))
    big, small = S.spherify_noise_pair(z, 1.5, _scale(batch), noise=noise, backend=backend)
    _close(big, S.spherify_noise_reference(z, 1.5, noise))
    _close(small, S.spherify_noise_reference(z, _scale(batch), noise))


def _philox_cases():
    cases = [(b, length, bk) for bk in KERNELS for b in (1, 3) for length in SMALL_L]
    cases += [(1, 65536, "triton")]
    cases += [(1, length, "cpp") for length in BIG_L]
    return cases


@pytest.mark.parametrize("batch, length, backend", _philox_cases())
def test_noise_forward_and_backward_seeded(batch, length, backend):
    z = _z(batch, length)
    seeds, scale = _seeds(batch), _scale(batch)
    g = torch.Generator().manual_seed(2)
    zk = z.clone().requires_grad_()
    sk = scale.clone().requires_grad_()
    out = S.spherify_noise(zk, sk, seeds=seeds, stream=1, backend=backend)
    zr = z.clone().requires_grad_()
    sr = scale.clone().requires_grad_()
    ref = S.spherify_noise_reference(zr, sr, _ref_noise(z, seeds=seeds, stream=1))
    _close(out, ref)
    grad = torch.randn(out.shape, generator=g)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    _grad_close(zk.grad, zr.grad)
    _grad_close(sk.grad, sr.grad)
    if batch > 1:
        assert sk.grad[1] == 0  # scale 0: the output is f(z), constant in s


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["seeds", "noise"])
def test_noise_low_precision(backend, dtype, mode):
    """The training pair and dz in bf16 / fp16, each rounded once from its fp32 value on the same inputs."""
    batch, length = 3, 2049
    z = _z(batch, length, dtype)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(4))
    kw = dict(seeds=_seeds(batch)) if mode == "seeds" else dict(noise=noise.to(dtype))
    g1, g2 = (torch.randn(z.shape, generator=torch.Generator().manual_seed(s)).to(dtype) for s in (6, 7))
    zk, zr = z.clone().requires_grad_(), z.float().requires_grad_()
    big, small = S.spherify_noise_pair(zk, 2.0, _scale(batch), **kw, backend=backend)
    e = _ref_noise(z, noise=noise.to(dtype).float() if mode == "noise" else None, seeds=kw.get("seeds"))
    big0, small0 = S.spherify_noise_reference(zr, 2.0, e), S.spherify_noise_reference(zr, _scale(batch), e)
    _close(big, big0, dtype)
    _close(small, small0, dtype)
    ((big * g1).sum() + (small * g2).sum()).backward()
    ((big0 * g1.float()).sum() + (small0 * g2.float()).sum()).backward()
    _close(zk.grad, zr.grad, dtype)


# -------------------------------------------------------------------------------------------- backward


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("length", SMALL_L + BIG_L)
def test_spherify_backward(backend, length):
    batch = 3 if length in SMALL_L else 1
    z = _z(batch, length)
    grad = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    zk, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    (S.spherify(zk, backend=backend) * grad).sum().backward()
    (S.spherify_reference(zr) * grad).sum().backward()
    _grad_close(zk.grad, zr.grad)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("mode", ["seeds", "noise"])
@pytest.mark.parametrize("length", SMALL_L)
def test_pair_backward(backend, mode, length):
    batch = 3
    z = _z(batch, length)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    kw = dict(seeds=_seeds(batch)) if mode == "seeds" else dict(noise=noise)
    e = _ref_noise(z, noise=kw.get("noise"), seeds=kw.get("seeds"))
    g1, g2 = (torch.randn(z.shape, generator=torch.Generator().manual_seed(s)) for s in (6, 7))
    small = _scale(batch)

    zk, bk, sk = z.clone().requires_grad_(), torch.tensor(1.3).requires_grad_(), small.clone().requires_grad_()
    vb, vs = S.spherify_noise_pair(zk, bk, sk, **kw, backend=backend)
    ((vb * g1).sum() + (vs * g2).sum()).backward()
    zr, br, sr = z.clone().requires_grad_(), torch.tensor(1.3).requires_grad_(), small.clone().requires_grad_()
    rb, rs = S.spherify_noise_reference(zr, br, e), S.spherify_noise_reference(zr, sr, e)
    ((rb * g1).sum() + (rs * g2).sum()).backward()
    _close(vb, rb)
    _close(vs, rs)
    _grad_close(zk.grad, zr.grad)
    _grad_close(bk.grad, br.grad)
    _grad_close(sk.grad, sr.grad)


@pytest.mark.parametrize("backend", KERNELS)
def test_a_gradient_for_the_scales_alone(backend):
    """A frozen z and trainable scales: the op still records its backward. The loss weighs the outputs at random:
    their sum of squares is L whatever the scale (an output is on the sphere), so its gradient is rounding."""
    g = torch.Generator().manual_seed(8)
    z, noise, weights = _z(3, 64), torch.randn(3, 4, 16, generator=g), torch.randn(3, 4, 16, generator=g)
    scale = _scale(3).requires_grad_()
    (grad,) = torch.autograd.grad((S.spherify_noise(z, scale, noise=noise, backend=backend) * weights).sum(), scale)
    (grad0,) = torch.autograd.grad((S.spherify_noise_reference(z, scale, noise) * weights).sum(), scale)
    _grad_close(grad, grad0)
    # one scale trainable: the other output requires no grad, as the reference's
    big, small = S.spherify_noise_pair(z, scale, 0.5, noise=noise, backend=backend)
    assert big.requires_grad and not small.requires_grad
    (grad_pair,) = torch.autograd.grad((big * weights).sum(), scale)
    _grad_close(grad_pair, grad0)


@pytest.mark.parametrize("backend", KERNELS + ["eager"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_outputs_keep_the_dtype_of_z(backend, dtype):
    """Drawn or given (in another dtype), the noise leaves the result in z's dtype on every backend."""
    z = _z(2, 64, dtype)
    outputs = [S.spherify(z, backend=backend),
               *S.spherify_noise_pair(z, 0.5, _scale(2), seeds=_seeds(2), backend=backend),
               S.spherify_noise(z, _scale(2), noise=torch.randn(z.shape), backend=backend)]
    assert [out.dtype for out in outputs] == [dtype] * 4


def test_eager_gradcheck_fp64():
    z = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([0.8, 1.7], dtype=torch.float64, requires_grad=True)
    noise = torch.randn(2, 3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z, s: S.spherify_noise(z, s, noise=noise, backend="eager"), (z, scale))
    assert torch.autograd.gradcheck(lambda z: S.spherify(z, backend="eager"), (z,))


# ---------------------------------------------------------------------------------------- noise & invariants


# (offset, int32 Philox word) for seed 0, found by search (about one draw in 2**22, then 2**24, is this close to
# zero): -317 maps to the uniform ~v * 2**-31 = 316 * 4.66e-10 = 1.47e-7, just over the 1e-7 floor (an
# off-by-one word moves the normal by over 1e-4); -20 maps to 8.8e-9, which the floor raises to 1e-7.
WORDS_NEAR_ZERO = [(4826271, -317), (38471471, -20)]


@pytest.mark.parametrize("offset, word", WORDS_NEAR_ZERO, ids=["over-the-floor", "floored"])
@pytest.mark.parametrize("backend", KERNELS)
def test_noise_of_a_word_near_zero(backend, offset, word):
    seed, length = torch.tensor([0]), 1024
    stream, j = divmod(offset, length)
    c0, _ = P._philox_c0_c1(seed[0], torch.tensor([offset]))
    assert c0.item() == word % 2**32
    expected = P.philox_randn(seed[0], torch.tensor([offset]))
    got = S.sphere_noise(seed, (length,), stream, backend=backend)[0, j]
    torch.testing.assert_close(got, expected[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", KERNELS)
def test_noise_at_offsets_past_2_32(backend):
    """Offsets are 64-bit: a stream whose offsets pass 2**32 feeds Philox's second counter word."""
    seeds = torch.tensor([3, -(2**40)], dtype=torch.int64)
    stream = (1 << 32) // 700  # offsets from 2**32 - 396 to 2**32 + 303
    expected = sphere_noise_reference(seeds, (700,), stream=stream)
    torch.testing.assert_close(S.sphere_noise(seeds, (700,), stream, backend=backend), expected, atol=1e-6, rtol=1e-6)


def test_noise_identical_across_backends():
    seeds = torch.tensor([0, 9, -(2**40), 2**62 + 3], dtype=torch.int64)
    shape = (3, 700)
    eager = sphere_noise_reference(seeds, shape, stream=2)
    # log/cos differ by an ulp or two between torch, numpy (interpreter) and libm: see test_philox.py
    torch.testing.assert_close(S.sphere_noise(seeds, shape, stream=2, backend="triton"), eager, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(S.sphere_noise(seeds, shape, stream=2, backend="cpp"), eager, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", KERNELS + ["eager"])
def test_strided_seeds(backend):
    # seeds sliced out of a larger tensor: each sample must still use its own seed
    pool = torch.tensor([5, 111, -3, 222, 2**40 + 1, 333], dtype=torch.int64)
    seeds = pool[::2]
    assert not seeds.is_contiguous()
    z = _z(3, 2048)
    out = S.spherify_noise(z, _scale(3), seeds=seeds, stream=1, backend=backend)
    _close(out, S.spherify_noise_reference(z, _scale(3), _ref_noise(z, seeds=seeds.contiguous(), stream=1)))
    torch.testing.assert_close(S.sphere_noise(seeds, (3, 70), stream=2, backend=backend),
                               sphere_noise_reference(seeds.contiguous(), (3, 70), stream=2), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", KERNELS + ["eager"])
def test_deterministic_and_batch_independent(backend):
    z = _z(3, 2049)
    seeds, scale = _seeds(3), _scale(3)
    out = S.spherify_noise(z, scale, seeds=seeds, backend=backend)
    assert torch.equal(out, S.spherify_noise(z, scale, seeds=seeds, backend=backend))
    for b in range(3):
        alone = S.spherify_noise(z[b : b + 1], scale[b : b + 1], seeds=seeds[b : b + 1], backend=backend)
        if backend == "eager":
            _close(alone[0], out[b])
        else:  # the split of a sample over programs depends on L only
            assert torch.equal(alone[0], out[b])


@pytest.mark.parametrize("backend", KERNELS + ["eager"])
def test_zero_scale_is_exactly_spherify(backend):
    z = _z(3, 2048)
    plain = S.spherify(z, backend=backend)
    assert torch.equal(S.spherify_noise(z, 0.0, seeds=_seeds(3), backend=backend), plain)
    mixed = S.spherify_noise(z, _scale(3), seeds=_seeds(3), backend=backend)
    assert torch.equal(mixed[1], plain[1])


@pytest.mark.parametrize("backend", KERNELS + ["eager"])
def test_float16_mean_square_does_not_overflow(backend):
    """The mean square is taken in float32 on every backend: in float16 it overflows from |z| ~ 256 and f(z) was 0
    on eager (and so on auto on the CPU)."""
    z = (_z(2, 64) * 300).half()
    noisy = S.spherify_noise_reference(z.float(), 0.5, _ref_noise(z, seeds=_seeds(2)))
    for out, truth in ((S.spherify(z, backend=backend), S.spherify_reference(z.float())),
                       (S.spherify_noise(z, 0.5, seeds=_seeds(2), backend=backend), noisy)):
        assert out.dtype == torch.float16
        torch.testing.assert_close(out.float(), truth, rtol=2e-3, atol=2e-3)  # a few float16 roundings


@pytest.mark.parametrize("backend", KERNELS)
def test_a_sample_whose_mean_square_overflows(backend):
    """One element 1e20 takes sample 1's |z|^2 past float32's range: f(z) is 0 there and the noisy outputs are f(s*e),
    with finite gradients, as the reference's (the kernels took 0 * inf: the whole sample NaN); sample 0 as ever."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 64, generator=g)
    z[1, 0] = 1e20
    scales = [torch.tensor([0.7, 1.3]), torch.tensor([0.2, 0.4])]
    noise = torch.randn(2, 64, generator=g)
    grads = torch.randn(2, 2, 64, generator=g)

    def run(name):
        leaves = [t.clone().requires_grad_() for t in (z, *scales)]
        outs = S.spherify_noise_pair(leaves[0], *leaves[1:], noise=noise, backend=name)
        return [*outs, *torch.autograd.grad(outs, leaves, list(grads))]

    expected = run("eager")
    assert all(t.isfinite().all() for t in expected)
    got = run(backend)
    for out, want in zip(got[:2], expected[:2]):
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for grad, want in zip(got[2:], expected[2:]):  # sample 1's scale gradients are 0 but for float32's rounding
        _grad_close(grad, want)


@pytest.mark.parametrize("backend", KERNELS + ["eager"])
def test_outputs_may_change_in_place(backend):
    """Each output is a view of its own (not one of unbind's, which autograd will not let change in place)."""
    z = _z(2, 64).requires_grad_()
    big, small = S.spherify_noise_pair(z, 0.9, 0.2, seeds=_seeds(2), backend=backend)
    single = S.spherify_noise(z, 0.9, seeds=_seeds(2), backend=backend)
    for out in (big, small, single):
        out.mul_(2)
    (big + small + single).sum().backward()
    expected = torch.autograd.grad((2 * (sum(S.spherify_noise_pair(z, 0.9, 0.2, seeds=_seeds(2), backend="eager"))
                                         + S.spherify_noise(z, 0.9, seeds=_seeds(2), backend="eager"))).sum(), z)[0]
    _close(z.grad, expected)


@pytest.mark.parametrize("backend", KERNELS + ["eager"])
def test_a_noise_that_requires_grad(backend):
    """eager differentiates through an explicit noise; the kernels give it no gradient, so they refuse it (as
    apply_rope refuses a table that requires grad) unless grad mode is off."""
    z, weights = _z(2, 64), _z(2, 64, seed=1)
    noise = (_z(2, 64, seed=2) / 3).requires_grad_()
    if backend == "eager":
        (S.spherify_noise(z, 0.5, noise=noise, backend=backend) * weights).sum().backward()
        assert noise.grad.abs().max() > 0
        return
    for make in (lambda: S.spherify_noise(z, 0.5, noise=noise, backend=backend),
                 lambda: S.spherify_noise_pair(z, 0.5, 0.2, noise=noise, backend=backend)):
        with pytest.raises(ValueError, match="noise must not require grad"):
            make()
    with torch.no_grad():
        _close(S.spherify_noise(z, 0.5, noise=noise, backend=backend), S.spherify_noise_reference(z, 0.5, noise))


@pytest.mark.parametrize("backend", KERNELS + ["eager"])
def test_a_gradient_of_a_gradient_is_eager_only(backend):
    """A gradient penalty on z's gradient (helpers.assert_gradient_penalty_eager_only)."""
    z, weights = _z(2, 64).requires_grad_(), _z(2, 64, seed=1)
    out = S.spherify_noise(z, 0.5, seeds=_seeds(2), backend=backend)
    assert_gradient_penalty_eager_only(backend, (out * weights).sum(), z)


@pytest.mark.parametrize("backend", KERNELS)
def test_non_contiguous(backend):
    base = _z(3, 4096).reshape(3, 64, 64)
    z = base.transpose(1, 2)[:, :, ::2]  # [3, 64, 32], no unit stride
    noise = torch.randn(3, 32, 64).transpose(1, 2)
    _close(S.spherify(z, backend=backend), S.spherify_reference(z.contiguous()))
    _close(
        S.spherify_noise(z, _scale(3), noise=noise, backend=backend),
        S.spherify_noise_reference(z.contiguous(), _scale(3), noise.contiguous()),
    )
    zc = _z(3, 4096).reshape(3, 4096)[:, ::2]  # [B, L] with a column stride of 2: copied for the kernels
    _close(S.spherify(zc, backend=backend), S.spherify_reference(zc.contiguous()))
    zb = _z(6, 2048)[::2]  # batch-strided rows stay views
    _close(
        S.spherify_noise(zb, _scale(3), seeds=_seeds(3), backend=backend),
        S.spherify_noise_reference(zb, _scale(3), _ref_noise(zb, seeds=_seeds(3))),
    )
    noise_rows = torch.randn(3, 4, 512, generator=torch.Generator().manual_seed(5))  # its own row stride, not z's
    _close(
        S.spherify_noise(zb, _scale(3), noise=noise_rows, backend=backend),
        S.spherify_noise_reference(zb, _scale(3), noise_rows),
    )


def test_use_backend_context():
    z = _z(1, 2048)
    with sphere_fast.use_backend("cpp"):
        _close(S.spherify(z), S.spherify_reference(z))


@pytest.mark.parametrize("backend", KERNELS + ["eager"])
def test_no_samples(backend):
    """B = 0, as the other ops take it: empty results of the right shapes and dtype, and empty gradients."""
    z = torch.ones(0, 3, 4, requires_grad=True)
    seeds, scale = torch.zeros(0, dtype=torch.int64), torch.ones(0, requires_grad=True)
    outs = [S.spherify(z, backend=backend), S.spherify_noise(z, scale, seeds=seeds, backend=backend),
            *S.spherify_noise_pair(z, scale, 0.5, noise=torch.ones(0, 3, 4), backend=backend)]
    assert all(out.shape == (0, 3, 4) and out.dtype == torch.float32 for out in outs)
    grad_z, grad_scale = torch.autograd.grad(sum(out.sum() for out in outs), (z, scale))
    assert grad_z.shape == (0, 3, 4) and grad_scale.shape == (0,)


# -------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend", KERNELS + ["eager"])
@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(z=torch.ones(2, 8, dtype=torch.int32)), TypeError, "z"),
        (dict(z=torch.ones(8)), ValueError, "z"),
        (dict(z=torch.ones(2, 0)), ValueError, "none empty after B"),
        (dict(seeds=torch.tensor([1, 2, 3])), ValueError, "seeds"),
        (dict(seeds=torch.tensor([1.0, 2.0])), TypeError, "seeds"),
        (dict(seeds=torch.tensor([1, 2], device="meta")), ValueError, "seeds"),
        (dict(scale=torch.ones(3)), ValueError, "scale"),
        (dict(scale=torch.tensor([1.0, float("nan")])), ValueError, "scale"),
        (dict(scale=float("inf")), ValueError, "scale"),
        (dict(scale=10**400), ValueError, "scale must be finite"),
        (dict(scale="1"), TypeError, "scale"),
        (dict(scale=torch.ones(2, device="meta")), ValueError, "scale must be on cpu"),
        (dict(scale=True), TypeError, "scale must be a float or a tensor of shape \\[B\\], got bool"),
        (dict(scale=torch.tensor([1, 2])), TypeError, "scale must be a floating tensor, got torch.int64"),
        (dict(noise=torch.ones(2, 8, dtype=torch.int32), seeds=None), TypeError, "noise must be a floating tensor"),
        (dict(noise=torch.ones(2, 8, device="meta"), seeds=None), ValueError, "noise must be on cpu"),
        (dict(noise=torch.ones(2, 8)), ValueError, "noise"),
        (dict(seeds=None), ValueError, "noise"),
        (dict(noise=torch.ones(2, 7), seeds=None), ValueError, "noise"),
        (dict(stream=-2), ValueError, "stream"),
        (dict(stream=True), TypeError, "stream"),
        # offsets stream * L + j past 2**63: the C++ kernels wrapped round to stream 0's noise
        (dict(stream=2**60), ValueError, r"stream 1152921504606846976 puts the noise offsets \(stream \* 8 \+ j\)"),
    ],
)
def test_bad_input(backend, kwargs, err, match):
    args = dict(z=torch.ones(2, 8), scale=torch.ones(2), seeds=torch.tensor([1, 2]), stream=0)
    args.update(kwargs)
    z, scale = args.pop("z"), args.pop("scale")
    with pytest.raises(err, match=match):
        S.spherify_noise(z, scale, **args, backend=backend)


@pytest.mark.parametrize("backend", KERNELS + ["eager"])
def test_near_zero_latent_keeps_eps(backend):
    """Where mean(z^2) is far below eps = 1e-6, f(z) = z / sqrt(mean(z^2) + eps) is much shorter than the
    sphere's radius: the eps is in the sum (float64 formula here, not the reference)."""
    z = 1e-5 * _z(2, 64)
    expected = z.double() / (z.double().square().mean(dim=(1, 2), keepdim=True) + 1e-6).sqrt()
    assert expected.square().mean() < 0.01  # far from radius 1 per value
    _close(S.spherify(z, backend=backend), expected)


@pytest.mark.parametrize("backend", KERNELS + ["eager"])
def test_sphere_noise_bad_input(backend):
    seeds = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="stream"):
        S.sphere_noise(seeds, (4,), stream=-1, backend=backend)
    with pytest.raises(ValueError, match="past 2\\*\\*63"):
        S.sphere_noise(seeds, (4,), stream=2**61, backend=backend)
    assert S.sphere_noise(seeds, (4,), stream=2**61 - 1, backend=backend).isfinite().all()  # the last one whole
    with pytest.raises(ValueError, match="shape"):
        S.sphere_noise(seeds, (0, 4), backend=backend)
    with pytest.raises(ValueError, match="seeds"):
        S.sphere_noise(seeds[None], (4,), backend=backend)


def _bad_op_calls():
    """(op, arguments, message) of calls that the registered C++ ops refuse; without the checks they divided by a
    batch of 0, overran the kernels' per-output arrays with P = 3, or read noise past its end."""
    z = _z(2, 16)
    noise, seeds, stats, one = torch.randn(z.shape), _seeds(2), torch.ones(2, 3), torch.full((1, 2), 0.5)
    three = torch.full((3, 2), 0.5)
    return {
        "empty-z": ("spherify_fwd", (torch.empty(0, 4), None, None, None, 0), r"z must be a non-empty \[B, \.\.\.\]"),
        "three-scales": ("spherify_fwd", (z, three, noise, None, 0), r"scales must be \[P, B\] with P = 1 or 2"),
        "no-scales": ("spherify_fwd", (z, one[:0], noise, None, 0), r"scales must be \[P, B\]"),
        "scales-of-another-batch": ("spherify_fwd", (z, torch.full((1, 3), 0.5), noise, None, 0), "B = 2, got"),
        "scales-without-noise": ("spherify_fwd", (z, one, None, None, 0), "scales need noise or seeds"),
        "noise-of-another-shape": ("spherify_fwd", (z, one, noise[:1], None, 0), "noise must have z's shape"),
        "int32-seeds": ("spherify_fwd", (z, one, None, seeds.int(), 0), r"seeds must be an int64 \[B\] = \[2\]"),
        "seeds-of-another-batch": ("spherify_fwd", (z, one, None, seeds[:1], 0), r"seeds must be an int64 \[B\]"),
        "bwd-three-scales": ("spherify_bwd", (torch.randn(3, *z.shape), z, three, noise, None, stats, 0),
                             r"scales must be \[P, B\]"),
        "bwd-grad-of-another-shape": ("spherify_bwd", (torch.randn(2, *z.shape), z, one, noise, None, stats, 0),
                                      r"grad must be \[P, \*z.shape\] = \[1, 2, 4, 4\]"),
        "bwd-stats-of-another-shape": ("spherify_bwd", (torch.randn(1, *z.shape), z, one, noise, None, stats[:, :2], 0),
                                       r"stats must be \[B, 3\]"),
        "noise-seeds-of-two-dims": ("sphere_noise", (seeds[None], 4, 0), r"seeds must be an int64 \[B\] tensor"),
        # the CUDA kernels' element types on the CPU too (it computed float64 there)
        "float64-z": ("spherify_fwd", (z.double(), None, None, None, 0), "take float32, float16 or bfloat16"),
    }


@pytest.mark.parametrize("case", _bad_op_calls())
def test_cpp_ops_check_their_arguments(case):
    """The registered C++ ops called directly (no Python checks in front) raise a RuntimeError naming the
    argument, instead of crashing the process or writing past an array."""
    op, args, match = _bad_op_calls()[case]
    S._cpp_ext()
    with pytest.raises(RuntimeError, match=match):
        getattr(torch.ops.sphere_fast_cpp, op)(*args)


def test_fp64_rejected_by_kernels():
    with pytest.raises(TypeError, match="z"):
        S.spherify(torch.ones(2, 8, dtype=torch.float64), backend="cpp")


# ------------------------------------------------------------------------------------- torch.library


def _strided(t):
    """t's values in memory with its last two dims swapped (not contiguous)."""
    out = swapped_in_memory(t, -1, -2)
    assert not out.is_contiguous()
    return out


@pytest.mark.parametrize("backend", ["triton", "cpp", "eager"])
def test_zero_scale_gradient_is_plain_spherifys_on_a_near_zero_latent(backend):
    """At scale 0 the output is f(z), so its gradient is f's: on a latent with mean(z^2) far under eps the kernels'
    c = 1 / sqrt(mean(z^2) + eps) is about 1000, and a backward taking c for the noise term's factor is that far off
    (an ordinary latent has c near 1 and cannot tell)."""
    g = torch.Generator().manual_seed(1)
    z0, grad = 1e-5 * torch.randn(2, 4, 16, generator=g), torch.randn(2, 4, 16, generator=g)
    seeds = torch.tensor([5, -3], dtype=torch.int64)
    z_ref = z0.double().requires_grad_()
    (S.spherify_reference(z_ref) * grad.double()).sum().backward()
    expected = z_ref.grad.float()
    atol = 1e-5 * expected.abs().max().item()
    z = z0.clone().requires_grad_()
    (S.spherify_noise(z, torch.zeros(2), seeds=seeds, backend=backend) * grad).sum().backward()
    torch.testing.assert_close(z.grad, expected, rtol=1e-5, atol=atol)
    z = z0.clone().requires_grad_()
    big, small = S.spherify_noise_pair(z, torch.zeros(2), 0.0, seeds=seeds, backend=backend)  # the pair's kernels
    ((big + small) * grad).sum().backward()
    torch.testing.assert_close(z.grad, 2 * expected, rtol=1e-5, atol=2 * atol)


def _opcheck_args(backend):
    z = _z(2, 72)
    scales = torch.tensor([[0.5, 0.0], [1.5, 2.0]])
    noise = torch.randn(z.shape)
    seeds = _seeds(2)
    return [
        (z, None, None, None, 0, backend),
        (z, scales[:1], None, seeds, 3, backend),
        (z, scales, noise, None, 0, backend),
        (_strided(z).bfloat16(), scales, None, seeds, 1, backend),  # contiguous outputs, float32 stats: as the fakes
    ]


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck(backend):
    """Schema and fake kernels, also with inputs that require grad (the forward op's gradient is checked against
    the public op's in test_op_autograd.py)."""
    z, scales, noise, *rest = _opcheck_args(backend)[2]
    torch.library.opcheck(torch.ops.sphere_fast.spherify_fwd.default,
                          (z.clone().requires_grad_(), scales.clone().requires_grad_(), noise, *rest))
    for args in _opcheck_args(backend):
        torch.library.opcheck(torch.ops.sphere_fast.spherify_fwd.default, args)
        z, scales, noise, seeds, stream, _ = args
        out, stats = torch.ops.sphere_fast.spherify_fwd(z, scales, noise, seeds, stream, backend)
        grad = torch.randn(out.shape)
        bwd = (grad, z, scales, noise, seeds, stats, stream, backend)
        torch.library.opcheck(torch.ops.sphere_fast.spherify_bwd.default, bwd)
        if backend == "cpp":  # the C++ ops themselves (fake kernels registered from Python)
            torch.library.opcheck(torch.ops.sphere_fast_cpp.spherify_fwd.default, args[:5], test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.sphere_fast.sphere_noise.default, (_seeds(3), 70, 2, backend))


@pytest.mark.parametrize("backend", KERNELS)
def test_ops_read_strided_inputs(backend):
    """A caller of the ops themselves may pass strided [P, B] scales, gradients and stats: same bits as
    contiguous ones."""
    z, scales, noise = _z(2, 72), torch.tensor([[0.5, 0.0], [1.5, 2.0]]), torch.randn(2, 4, 18)
    fwd, bwd = torch.ops.sphere_fast.spherify_fwd, torch.ops.sphere_fast.spherify_bwd
    out, stats = fwd(z, scales, noise, None, 0, backend)
    torch.testing.assert_close(fwd(z, _strided(scales), noise, None, 0, backend), (out, stats), atol=0, rtol=0)
    grad = torch.randn(out.shape)
    grad_strided = torch.cat([grad, grad], dim=1)[:, : grad.shape[1]]  # pairs apart by two batches: a view still
    assert not grad_strided.is_contiguous()
    torch.testing.assert_close(bwd(grad_strided, z, _strided(scales), noise, None, _strided(stats), 0, backend),
                               bwd(grad, z, scales, noise, None, stats, 0, backend), atol=0, rtol=0)


@pytest.mark.parametrize("backend", KERNELS + ["eager"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()

    def step(z, s, seeds):
        big, small = S.spherify_noise_pair(z, s, 0.5, seeds=seeds, stream=2, backend=backend)
        e = S.sphere_noise(seeds, z.shape[1:], stream=1, backend=backend)
        return (big * small).sum() + S.spherify(z + e, backend=backend).square().sum()

    z = _z(2, 256)
    s = torch.tensor([1.0, 0.3])
    zc, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out_c = compiled(zc, s, _seeds(2))
    out_r = step(zr, s, _seeds(2))
    out_c.backward()
    out_r.backward()
    torch.testing.assert_close(out_c, out_r)
    torch.testing.assert_close(zc.grad, zr.grad)


def test_a_non_finite_float_scale_is_refused_under_compile_and_a_symbolic_one_traces():
    """A float scale is a constant of a static trace, checked there as in eager; under dynamic=True it is a symbolic
    float with no value to check at the trace (math.isfinite of it broke the graph)."""
    for dynamic in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(lambda z, scale: S.spherify_noise(z, scale, seeds=_seeds(2)), fullgraph=True,
                                 backend="aot_eager", dynamic=dynamic)
        z = _z(2, 16)
        torch.testing.assert_close(compiled(z, 0.5), S.spherify_noise(z, 0.5, seeds=_seeds(2)))
        if not dynamic:
            with pytest.raises(Exception, match="scale must be finite, got inf"):
                compiled(z, math.inf)


def test_inductor_compiles_the_eager_noise_ops():
    """Inductor (what torch.compile runs by default) over the eager backend's seeded ops, auto's on the CPU: the
    noise is one opaque op there, as inlining its ten Philox rounds did not finish lowering (> 15 minutes for a
    [3, 4, 5] latent)."""
    torch._dynamo.reset()

    def step(z, s):
        seeds = torch.arange(3)  # constant seeds: inductor folded the whole Philox chain into each output
        big, small = S.spherify_noise_pair(z, s, 0.5, seeds=seeds, backend="eager")
        e = S.sphere_noise(seeds, z.shape[1:], stream=1, backend="eager")
        return big, small, S.spherify_noise(z + e, 0.7, seeds=seeds, backend="eager")

    z, s = _z(3, 20).reshape(3, 4, 5), torch.tensor([0.0, 0.5, 1.0])
    for got, expected in zip(torch.compile(step, fullgraph=True)(z, s), step(z, s), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
