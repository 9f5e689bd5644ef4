"""Training-free edits (spec section 7) on a tiny CPU model, checked against hand-written loops."""

import math

import numpy as np
import pytest
import torch

from sphere_fast import ops
from sphere_fast.editing import (
    bilinear,
    bilinear_noise,
    crossover,
    crossover_mask,
    given_class_embeddings,
    interpolate,
    manipulate,
    reconstruct_images,
    slerp,
)
from tests.test_sampler import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(3, 3, 16, 16)


SEEDS = torch.tensor([5, 6, 7], dtype=torch.int64)


def test_reconstruct(model, images):
    out = reconstruct_images(model, images)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert torch.equal(out, model.reconstruct(images * 2 - 1))
    labels = torch.tensor([1, 2, 10])
    assert torch.equal(reconstruct_images(model, images, labels), model.reconstruct(images * 2 - 1, labels))
    assert not torch.equal(reconstruct_images(model, images, labels), out)
    # one class for every image as an int, as manipulate's target
    assert torch.equal(reconstruct_images(model, images, 2), reconstruct_images(model, images, torch.full((3,), 2)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model.reconstruct(images * 2 - 1).float()
    assert torch.equal(reconstruct_images(model, images, dtype=torch.bfloat16), bf16)
    assert (bf16 - out).abs().max() > 1e-3
    # checked once up front (the networks skip their own check inside the edit)
    with pytest.raises(ValueError, match=r"labels: class labels must be in \[0, 10\]"):
        reconstruct_images(model, images, torch.tensor([1, 2, 11]))


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (torch.rand(3, 3, 16, 16) + 1, ValueError, r"\[0, 1\]"),
        (torch.full((1, 3, 16, 16), float("nan")), ValueError, r"\[0, 1\]"),
        (torch.rand(3, 3, 8, 8), ValueError, "shape"),
        (torch.rand(3, 1, 16, 16), ValueError, r"images must have shape"),
        (torch.rand(0, 3, 16, 16), ValueError, "shape"),
        (torch.zeros(3, 3, 16, 16, dtype=torch.uint8), TypeError, "floating"),
        ([[0.5]], TypeError, "images"),
    ],
)
def test_bad_images(model, bad, error, match):
    with pytest.raises(error, match=match):
        reconstruct_images(model, bad)


def test_edits_refuse_a_model_in_training_mode(images):
    m = tiny_model().train()  # label dropout would make an edit depend on torch's generator, not on its seeds
    for call in (lambda: reconstruct_images(m, images), lambda: manipulate(m, images, 1, seeds=SEEDS),
                 lambda: crossover(m, images, images), lambda: interpolate(m, torch.arange(4))):
        with pytest.raises(ValueError, match="training mode"):
            call()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"dtype": torch.int64}, TypeError, "dtype must be one of"),
        ({"dtype": "bf16"}, TypeError, "dtype must be one of"),
        ({"scheduler": "no"}, TypeError, "scheduler must be a bool"),
        ({"cache_noise": 1}, TypeError, "cache_noise must be a bool"),
    ],
)
def test_edit_options_checked(model, images, kwargs, error, match):
    calls = [lambda: interpolate(model, torch.arange(4), rows=2, cols=2, **kwargs)]
    if "cache_noise" not in kwargs:
        calls.append(lambda: manipulate(model, images, 1, seeds=SEEDS, **kwargs))
    if "dtype" in kwargs:
        calls.append(lambda: reconstruct_images(model, images, **kwargs))
    for call in calls:
        with pytest.raises(error, match=match):
            call()


@pytest.mark.parametrize("scaler", [math.nan, -1.0, math.inf])
def test_model_reconstruct_checks_its_noise_scaler(model, images, scaler):
    with pytest.raises(ValueError, match="noise_scaler must be a finite number >= 0"):
        model.reconstruct(images * 2 - 1, noise_scaler=scaler, sampling=True)


def test_only_a_sphere_encoder_is_edited():
    linear = torch.nn.Linear(2, 2).eval()
    images = torch.rand(2, 3, 16, 16)
    for call in (lambda: reconstruct_images(linear, images), lambda: manipulate(linear, images, 1),
                 lambda: crossover(linear, images, images), lambda: interpolate(linear, torch.arange(4))):
        with pytest.raises(TypeError, match="model must be a SphereEncoder, got Linear$"):
            call()
    compiled = torch.compile(linear)  # the wrapper is named, and the module inside it
    with pytest.raises(TypeError, match=r"got OptimizedModule \(a torch.compile'd model: pass the module, "
                                        r"model._orig_mod\)"):
        reconstruct_images(compiled, images)


def hand_manipulation(model, images, labels, steps, scaler, seeds, scheduler=False):
    """Spec 7 written out: each step encodes, re-projects with scaled cached noise, decodes."""
    x = images * 2 - 1
    e = ops.sphere_noise(seeds, model.latent_shape[1:], stream=1)
    outs = []
    with torch.no_grad():
        for t in range(1, steps + 1):
            r = 1 - t / (steps + 1) if scheduler else 1.0
            z = model.encoder(x, labels)
            x = model.decoder(ops.spherify_noise(z, scaler * model.sigma_max * r, noise=e), labels)
            outs.append((x * 0.5 + 0.5).clamp(0, 1))
    return outs


@pytest.mark.parametrize("scheduler", [False, True])
def test_manipulate_matches_hand_loop(model, images, scheduler):
    labels = torch.tensor([4, 4, 8])
    outs = manipulate(model, images, labels, steps=3, noise_scaler=0.25, seeds=SEEDS, scheduler=scheduler)
    ref = hand_manipulation(model, images, labels, 3, 0.25, SEEDS, scheduler)
    assert len(outs) == 3
    for out, expected in zip(outs, ref):
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_manipulate_target_forms(model, images):
    by_int = manipulate(model, images, 4, steps=1, seeds=SEEDS)[0]
    assert torch.equal(by_int, manipulate(model, images, torch.full((3,), 4), steps=1, seeds=SEEDS)[0])
    assert torch.equal(by_int, manipulate(model, images, np.int64(4), steps=1, seeds=SEEDS)[0])  # numpy's ints too
    assert (by_int - manipulate(model, images, 5, steps=1, seeds=SEEDS)[0]).abs().max() > 1e-3
    null = manipulate(model, images, None, steps=1, seeds=SEEDS)[0]
    assert torch.equal(null, manipulate(model, images, 10, steps=1, seeds=SEEDS)[0])
    # without noise one step is a reconstruction (null class)
    near = manipulate(model, images, None, steps=1, noise_scaler=0.0, seeds=SEEDS)[0]
    assert torch.equal(near, reconstruct_images(model, images))
    # no seeds: one fresh seed a sample (copies of one image move apart)
    copies = manipulate(model, images[:1].expand(4, -1, -1, -1), 4, steps=1)[0].flatten(1)
    assert torch.cdist(copies, copies).add(torch.eye(4) * 1e9).min() > 1e-4


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"target": 11}, ValueError, "target"),
        ({"target": torch.tensor([1, 2])}, ValueError, "target"),
        ({"target": True}, TypeError, "target"),
        ({"steps": 0}, ValueError, "steps"),
        ({"noise_scaler": -0.1}, ValueError, "noise_scaler"),
        ({"noise_scaler": float("inf")}, ValueError, "noise_scaler"),
        ({"noise_scaler": True}, TypeError, "noise_scaler"),
        ({"seeds": torch.tensor([1, 2, 3], dtype=torch.int32)}, TypeError, "seeds"),
    ],
)
def test_manipulate_bad_args(model, images, kwargs, error, match):
    args = {"target": 3, **kwargs}
    with pytest.raises(error, match=match):
        manipulate(model, images, args.pop("target"), **args)


def test_manipulate_unconditional(images):
    m = tiny_model(num_classes=0)
    assert len(manipulate(m, images, None, steps=2, seeds=SEEDS)) == 2
    with pytest.raises(ValueError, match="unconditional"):
        manipulate(m, images, 3, seeds=SEEDS)


def test_crossover_masks():
    t, f = True, False
    assert crossover_mask("vertical", 4).tolist() == [[t, t, f, f]] * 4
    assert crossover_mask("horizontal", 4).tolist() == [[t] * 4, [t] * 4, [f] * 4, [f] * 4]
    assert crossover_mask("upper_triangular", 3).tolist() == [[t, t, t], [f, t, t], [f, f, t]]
    assert crossover_mask("flipped_triangular", 3).tolist() == [[t, t, t], [t, t, f], [t, f, f]]
    with pytest.raises(ValueError, match="mask"):
        crossover_mask("diagonal", 4)
    with pytest.raises(TypeError, match=r"mask must be one of the names .*, got a Tensor$"):  # not its elements
        crossover_mask(torch.ones(4, 4, dtype=torch.bool), 4)


def test_crossover(model, images):
    a, b = images[:2], images[1:]
    composite, outs = crossover(model, a, b, "vertical", steps=2, noise_scaler=0.4, seeds=SEEDS[:2])
    assert torch.equal(composite[..., :8], a[..., :8]) and torch.equal(composite[..., 8:], b[..., 8:])
    expected = manipulate(model, composite, None, steps=2, noise_scaler=0.4, seeds=SEEDS[:2])
    assert len(outs) == 2 and all(torch.equal(o, e) for o, e in zip(outs, expected))
    _, bf16 = crossover(model, a, b, steps=1, seeds=SEEDS[:2], dtype=torch.bfloat16)
    assert torch.equal(bf16[0], manipulate(model, composite, None, steps=1, seeds=SEEDS[:2], dtype=torch.bfloat16)[0])
    assert (bf16[0] - crossover(model, a, b, steps=1, seeds=SEEDS[:2])[1][0]).abs().max() > 1e-3
    swapped, _ = crossover(model, a, b, "horizontal", swap=True, steps=1, seeds=SEEDS[:2])
    assert torch.equal(swapped[..., :8, :], b[..., :8, :]) and torch.equal(swapped[..., 8:, :], a[..., 8:, :])
    with pytest.raises(ValueError, match="same shape"):
        crossover(model, images, images[:2])
    with pytest.raises(TypeError, match="swap"):
        crossover(model, a, b, swap=1)


def test_edits_on_a_bf16_model(model, images):
    # a model cast to bf16 (how the spec evaluates) takes the images in its dtype; results stay float in [0, 1]
    bf16 = tiny_model().to(torch.bfloat16)
    recon = reconstruct_images(bf16, images)
    assert recon.dtype == torch.float32
    assert (recon - reconstruct_images(model, images)).abs().max() < 0.1
    steps = manipulate(bf16, images, 3, steps=2, seeds=SEEDS)
    assert len(steps) == 2 and all(s.dtype == torch.float32 and 0 <= s.min() and s.max() <= 1 for s in steps)
    composite, outs = crossover(bf16, images[:2], images[1:], seeds=SEEDS[:2])
    assert (outs[0] - crossover(model, images[:2], images[1:], seeds=SEEDS[:2])[1][0]).abs().max() < 0.1
    # the composite is the stitched input itself, not its bf16 round trip
    assert composite.dtype == torch.float32
    assert torch.equal(composite[..., :8], images[:2, ..., :8]) and torch.equal(composite[..., 8:], images[1:, ..., 8:])
    # the images enter the network as 2x - 1 rounded once to bf16, not as bf16(x) * 2 - 1 (a second rounding)
    with torch.no_grad():
        expected = bf16.reconstruct((images * 2 - 1).to(torch.bfloat16)).float()
    assert torch.equal(recon, expected)


def test_slerp_and_bilinear():
    torch.manual_seed(2)
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    b = b / b.norm(dim=-1, keepdim=True) * a.norm(dim=-1, keepdim=True)  # equal norms per token
    w = torch.tensor([[0.0], [0.3], [1.0]]).reshape(3, 1, 1)
    out = slerp(a, b, w)
    assert torch.equal(out[0], a) and torch.equal(out[2], b)
    torch.testing.assert_close(out[1].norm(dim=-1), a.norm(dim=-1))  # stays on each token's sphere
    assert (out[1].norm(dim=-1) - torch.lerp(a, b, 0.3).norm(dim=-1) > 1e-4).all()  # lerp cuts inside
    assert torch.equal(slerp(a, a.clone(), torch.tensor(0.5)), a)  # parallel: lerp fallback, no NaN
    corners = torch.randn(4, 5, 2)
    for method in ("lerp", "slerp"):
        grid = bilinear(corners, 3, 4, method).reshape(3, 4, 5, 2)
        for (i, j), k in (((0, 0), 0), ((0, 3), 1), ((2, 0), 2), ((2, 3), 3)):
            assert torch.equal(grid[i, j], corners[k])
    grid = bilinear(corners, 3, 3).reshape(3, 3, 5, 2)
    torch.testing.assert_close(grid[1, 1], corners.mean(0))
    low = corners.bfloat16()  # a bf16 model's class embeddings: mixed in fp32, not rounded at each step
    assert torch.equal(bilinear(low, 3, 3, "slerp"), bilinear(low.float(), 3, 3, "slerp"))
    with pytest.raises(ValueError, match="method"):
        bilinear(corners, 2, 2, "cubic")


def test_mixed_noise_keeps_the_corners_noise_level():
    """Every grid point's draw is N(0, I) as the corners' are: the refinement then adds the same noise level
    everywhere. A plain lerp of four independent draws has std 0.5 at the grid's centre."""
    draws = torch.randn(4, 5000, 8, generator=torch.Generator().manual_seed(3))  # tokens of 8 channels
    for method in ("lerp", "slerp"):
        grid = bilinear_noise(draws, 3, 5, method).reshape(3, 5, 5000, 8)
        assert torch.equal(grid[0, 0], draws[0]) and torch.equal(grid[2, 4], draws[3])
        torch.testing.assert_close(grid.std(dim=(2, 3)), torch.ones(3, 5), atol=0.03, rtol=0)
    assert abs(bilinear(draws, 3, 5, "lerp").reshape(3, 5, -1)[1, 2].std().item() - 0.5) < 0.03


def test_class_embeddings_interpolated_and_restored(model):
    corner_labels = torch.tensor([2, 7, 2, 7])
    table = model.decoder.y_embedder.embedding_table.weight
    original = model.decoder.y_embedder
    with given_class_embeddings(model, corner_labels, 1, 3):
        emb = model.decoder.y_embedder(torch.tensor([0, 0, 0, 10, 10, 10]))[:, 0]
    assert model.decoder.y_embedder is original
    torch.testing.assert_close(emb[:3], torch.stack([table[2], (table[2] + table[7]) / 2, table[7]]))
    assert torch.equal(emb[3:], table[[10, 10, 10]])  # the null branch keeps the null row
    with pytest.raises(RuntimeError), given_class_embeddings(model, corner_labels, 1, 3):
        raise RuntimeError
    assert model.encoder.y_embedder is not None and model.decoder.y_embedder is original


@pytest.mark.parametrize(
    "method,cache_noise,scheduler", [("lerp", True, False), ("slerp", True, False), ("slerp", False, True)]
)
def test_interpolate_corners_are_samples(model, method, cache_noise, scheduler):
    seeds = torch.tensor([1, 2, 3, 4], dtype=torch.int64)
    labels = torch.tensor([0, 5, 9, 5])
    options = {"cache_noise": cache_noise, "scheduler": scheduler}
    grid = interpolate(model, seeds, labels, rows=3, cols=3, method=method, steps=3, cfg=1.4, **options)
    assert grid.shape == (3, 3, 3, 16, 16)
    _, ref = model.generate(4, y=labels, cfg=1.4, forward_steps=3, cache_sampling_noise=cache_noise,
                            use_sampling_scheduler=scheduler, seeds=seeds)
    corners = torch.stack([grid[0, 0], grid[0, 2], grid[2, 0], grid[2, 2]])
    torch.testing.assert_close(corners, ref, atol=1e-5, rtol=0)
    assert (grid[1, 1] - grid[0, 0]).abs().max() > 1e-3
    if method == "lerp":  # corners without labels: generate's, which draws them from the seeds
        torch.manual_seed(3)
        grid = interpolate(model, seeds, rows=2, cols=2, method=method, steps=3, cfg=1.4, **options)
        torch.manual_seed(7)
        _, ref = model.generate(4, cfg=1.4, forward_steps=3, cache_sampling_noise=cache_noise,
                                use_sampling_scheduler=scheduler, seeds=seeds)
        torch.testing.assert_close(grid.flatten(0, 1), ref, atol=1e-5, rtol=0)
    if method == "slerp" and not cache_noise:  # in bf16 too
        grid = interpolate(model, seeds, labels, rows=2, cols=2, method=method, steps=3, cfg=1.4, dtype=torch.bfloat16,
                           **options)
        _, ref = model.generate(4, y=labels, cfg=1.4, forward_steps=3, cache_sampling_noise=cache_noise,
                                use_sampling_scheduler=scheduler, seeds=seeds, dtype=torch.bfloat16)
        torch.testing.assert_close(grid.flatten(0, 1), ref, atol=1e-5, rtol=0)


def test_interpolate_lerp_and_slerp_differ(model):
    seeds = torch.tensor([1, 2, 3, 4], dtype=torch.int64)
    labels = torch.tensor([0, 0, 0, 0])
    lerped = interpolate(model, seeds, labels, rows=1, cols=3, method="lerp")
    slerped = interpolate(model, seeds, labels, rows=1, cols=3, method="slerp")
    assert torch.equal(lerped[:, [0, 2]], slerped[:, [0, 2]])
    assert (lerped[0, 1] - slerped[0, 1]).abs().max() > 1e-4


def test_interpolate_unconditional_and_bad_args(model):
    m = tiny_model(num_classes=0)
    seeds = torch.tensor([1, 2, 3, 4], dtype=torch.int64)
    assert interpolate(m, seeds, rows=2, cols=2).shape == (2, 2, 3, 16, 16)
    with pytest.raises(ValueError, match="seeds"):
        interpolate(model, seeds[:3])
    with pytest.raises(ValueError, match="rows"):
        interpolate(model, seeds, rows=0)
    with pytest.raises(ValueError, match="method"):
        interpolate(model, seeds, method="cubic")
    with pytest.raises(ValueError, match=r"labels: class labels must be in \[0, 10\]"):
        interpolate(model, seeds, torch.tensor([0, 1, 2, 11]))
    # the null label is a corner as generate takes it: that corner's image is its unconditional sample
    null_corner = interpolate(model, seeds, torch.tensor([0, 1, 2, 10]), rows=2, cols=2, cache_noise=False)
    _, unconditional = model.generate(1, y=torch.tensor([10]), forward_steps=1, seeds=seeds[3:])
    torch.testing.assert_close(null_corner[1, 1], unconditional[0], rtol=0, atol=1e-6)
