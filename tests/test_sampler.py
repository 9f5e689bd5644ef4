"""Sampler: the un-captured path and bucket logic on CPU; the captured path on CUDA (gpu-marked)."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sphere_fast import SphereEncoder, editing, ops, sampling
from sphere_fast.sampling import GraphKey, GuidedNetworks, Sampler, bucket_for, sample_labels, to_unit

TINY = {"width": 32, "layers": 1, "heads": 2}


def tiny_model(device: str = "cpu", num_classes: int = 10, layers: int = TINY["layers"]) -> SphereEncoder:
    torch.manual_seed(0)
    size = {**TINY, "layers": layers}
    m = SphereEncoder(
        input_size=16, patch_size=4, vit_enc_model_size=size, vit_dec_model_size=size, token_channels=4,
        num_classes=num_classes, noise_sigma_max_angle=80.0,
    )
    # the official init zeroes the heads and AdaLN; perturb every weight so all paths carry signal
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval().to(device)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


SEEDS = torch.tensor([11, 22, 33, 44, 55], dtype=torch.int64)
LABELS = torch.tensor([0, 3, 9, 3, 5])


@pytest.mark.parametrize(
    "steps,cfg,position,cache,scheduler,dtype",
    [
        (1, 1.0, "combo", True, False, torch.float32),
        (3, 1.4, "combo", True, False, torch.float32),
        (3, 1.6, "enc", False, True, torch.float32),
        (2, 1.4, "dec", True, False, torch.bfloat16),
    ],
)
def test_uncaptured_equals_generate(model, steps, cfg, position, cache, scheduler, dtype):
    sampler = Sampler(
        model, 8, steps, cfg=cfg, cfg_position=position, cache_noise=cache, scheduler=scheduler, dtype=dtype
    )
    first, final = sampler(LABELS, SEEDS, return_first=True)
    ref_first, ref_final = model.generate(
        5, y=LABELS, cfg=cfg, cfg_position=position, forward_steps=steps, use_sampling_scheduler=scheduler,
        cache_sampling_noise=cache, seeds=SEEDS, dtype=dtype,
    )
    assert final.shape == (5, 3, 16, 16) and final.dtype == torch.float32
    assert 0 <= final.min() and final.max() <= 1
    assert torch.equal(first, ref_first) and torch.equal(final, ref_final)
    assert torch.equal(sampler(LABELS, SEEDS), final)  # return_first=False gives the final images alone


def test_seeds_decide_the_image(model):
    sampler = Sampler(model, 8, 2, cfg=1.4, dtype=torch.float32)
    a = sampler(LABELS, SEEDS)
    assert torch.equal(a, sampler(LABELS, SEEDS.clone()))
    b = sampler(LABELS, SEEDS + 1000)
    assert ((a - b).abs().flatten(1).amax(1) > 1e-3).all()  # every sample changed
    # no seeds: fresh ones each call, and one each sample (samples of one label differ)
    assert not torch.equal(sampler(LABELS), sampler(LABELS))
    same_label = sampler(torch.full((4,), 3)).flatten(1)
    assert torch.cdist(same_label, same_label).add(torch.eye(4) * 1e9).min() > 1e-3


def test_a_sampler_cannot_be_copied_or_pickled(model, tmp_path):
    """It holds captured graphs, their pool and a lock: a copy says to make a new Sampler (the model copies)."""
    import copy
    import pickle

    sampler = Sampler(model, 2, 1, dtype=torch.float32)
    for copy_it in (copy.copy, copy.deepcopy, pickle.dumps, lambda s: torch.save(s, tmp_path / "sampler.pt")):
        with pytest.raises(TypeError, match=r"cannot be copied or pickled.*Make a new Sampler\(model"):
            copy_it(sampler)
    assert torch.equal(Sampler(copy.deepcopy(model), 2, 1, dtype=torch.float32)(seeds=SEEDS[:2]),
                       sampler(seeds=SEEDS[:2]))


def test_defaults_are_the_papers_evaluation(model):
    """Cached noise, no scheduler, cfg 1 at the combo position, bf16 (sample sets take these defaults)."""
    sampler = Sampler(model, 2, steps=3)
    assert (sampler.cache_noise, sampler.scheduler, sampler.dtype, sampler.cfg, sampler.cfg_position) == (
        True, False, torch.bfloat16, 1.0, "combo")
    labels, seeds = torch.tensor([1, 7]), torch.tensor([3, 4], dtype=torch.int64)
    images = Sampler(model, 2, steps=3, dtype=torch.float32)(labels, seeds)
    _, cached = model.generate(2, y=labels, forward_steps=3, cache_sampling_noise=True, seeds=seeds,
                               dtype=torch.float32)
    torch.testing.assert_close(images, cached, atol=1e-6, rtol=0)


def test_labels_matter_and_random_labels(model):
    sampler = Sampler(model, 8, 2, cfg=1.4, dtype=torch.float32)
    a = sampler(LABELS, SEEDS)
    b = sampler((LABELS + 1) % 10, SEEDS)
    assert (a - b).abs().max() > 1e-3
    torch.manual_seed(5)
    out = sampler()
    assert out.shape == (8, 3, 16, 16)


def test_labels_left_out_are_drawn_from_the_seeds(model, monkeypatch):
    """Without labels a sample's label comes from its given seed: the same seeds give the same images (whatever
    torch's generator holds, which is neither read nor advanced), in the Sampler as in generate, in any batch; the
    labels spread over the real classes. A call without seeds draws its labels as its seeds, from torch's
    generator, without the ~300 integer ops of the seeded draw."""
    sampler = Sampler(model, 8, 2, cfg=1.4, cache_noise=False, dtype=torch.float32)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    images = sampler(seeds=SEEDS)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    assert torch.equal(sampler(seeds=SEEDS), images)
    _, generated = model.generate(5, cfg=1.4, forward_steps=2, seeds=SEEDS, dtype=torch.float32)
    assert torch.equal(generated, images)
    torch.testing.assert_close(sampler(seeds=SEEDS[3:4])[0], images[3], atol=1e-5, rtol=0)
    labels = sample_labels(model, 2000, None, torch.device("cpu"), seeds=torch.arange(2000))
    assert labels.unique().tolist() == list(range(10))
    assert torch.equal(labels[SEEDS], sample_labels(model, 5, None, torch.device("cpu"), seeds=SEEDS))
    monkeypatch.setattr(sampling, "seeded_labels", lambda *args: pytest.fail("labels drawn from fresh seeds"))
    torch.manual_seed(3)
    unseeded = sampler()
    torch.manual_seed(3)
    assert torch.equal(sampler(), unseeded)


@pytest.mark.parametrize("steps,cfg", [(1, 1.0), (3, 1.4)])
def test_image_independent_of_batch(model, steps, cfg):
    sampler = Sampler(model, 8, steps, cfg=cfg, dtype=torch.float32)
    alone = sampler(LABELS[1:2], SEEDS[1:2])
    together = sampler(LABELS, SEEDS)
    shuffled = sampler(LABELS.flip(0), SEEDS.flip(0))
    padded = sampler(torch.cat([LABELS, LABELS[:3]]), torch.cat([SEEDS, torch.tensor([1, 2, 3])]))
    torch.testing.assert_close(alone[0], together[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(shuffled.flip(0), together, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded[:5], together, atol=1e-5, rtol=0)


def test_unconditional_model():
    m = tiny_model(num_classes=0)
    # cfg has nothing to guide: ignored, as the official code does, with a warning
    with pytest.warns(UserWarning, match=r"^cfg > 1 on an unconditional model \(num_classes=0\)") as caught:
        sampler = Sampler(m, 4, 2, cfg=1.4, dtype=torch.float32)
        Sampler(m, 4, 2, cfg=2.5, dtype=torch.float32)
    # one text for every cfg: a text per value would grow the caller's warning registry without end (a server)
    assert len({str(w.message) for w in caught}) == 1
    seeds = SEEDS[:3]
    _, ref = m.generate(3, forward_steps=2, cache_sampling_noise=True, seeds=seeds)
    with pytest.warns(UserWarning, match="has no effect"):
        assert torch.equal(sampler(seeds=seeds), ref)
    with pytest.raises(ValueError, match=r"^labels given to an unconditional model \(num_classes=0\)$"):
        sampler(torch.zeros(3, dtype=torch.long), seeds)
    with pytest.warns(UserWarning, match="has no effect"):
        m.generate(3, cfg=1.4, seeds=seeds)


def test_a_warning_points_at_the_callers_line():
    """Past sphere_fast's frames and torch's (no_grad's wrapper): per-module warning filters can select it."""
    m = tiny_model(num_classes=0)
    calls = (lambda: Sampler(m, 2, 1, cfg=1.4, dtype=torch.float32), lambda: m.generate(2, cfg=1.4),
             lambda: editing.interpolate(m, SEEDS[:4], rows=1, cols=2, cfg=1.4))
    for call in calls:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        assert [(w.filename, str(w.message)[:7]) for w in caught] == [(__file__, "cfg > 1")]


def test_the_null_label_samples_unconditionally(model):
    """The null label (num_classes), which the networks and the edits take, is taken by generate and the
    Sampler too: its sample is unconditional, so CFG (both branches null) leaves it as it is."""
    null = torch.full((5,), model.num_classes, dtype=torch.long)
    unguided = Sampler(model, 5, 2, cfg=1.0, dtype=torch.float32)(null, SEEDS)
    torch.testing.assert_close(Sampler(model, 5, 2, cfg=3.0, dtype=torch.float32)(null, SEEDS), unguided,
                               rtol=0, atol=1e-6)
    _, generated = model.generate(5, y=null, forward_steps=2, cache_sampling_noise=True, seeds=SEEDS)
    assert torch.equal(generated, unguided)
    assert not torch.allclose(Sampler(model, 5, 2, cfg=1.0, dtype=torch.float32)(LABELS, SEEDS), unguided)


def test_cpu_never_captures(model):
    sampler = Sampler(model, 8, 2, dtype=torch.float32, cuda_graph=True)
    assert not sampler.use_graphs
    sampler(LABELS, SEEDS)
    assert sampler.graph_keys == ()


def test_bucket_for():
    assert [bucket_for(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert [bucket_for(n, 6) for n in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 4, 6, 6]
    assert bucket_for(1, 1) == 1 and bucket_for(200, 256) == 256 and bucket_for(65, 100) == 100
    for bad in (0, 9):
        with pytest.raises(ValueError, match="batch_size=8"):
            bucket_for(bad, 8)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"cfg": 0.5}, ValueError, "cfg"),
        ({"cfg": math.nan}, ValueError, "cfg"),
        ({"cfg": math.inf}, ValueError, "cfg"),
        ({"cfg": 1e39}, ValueError, r"cfg must be a number in \[1, float32's largest\], got 1e\+39"),  # inf weight
        ({"cfg": True}, TypeError, "cfg"),
        ({"steps": True}, TypeError, "steps"),
        ({"steps": 0}, ValueError, "steps"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"cfg_position": "both"}, ValueError, "cfg_position"),
        ({"dtype": torch.int32}, TypeError, "dtype"),
        ({"cache_noise": 1}, TypeError, "cache_noise"),
        ({"scheduler": "linear"}, TypeError, "scheduler must be a bool"),
        ({"cuda_graph": 1}, TypeError, "cuda_graph must be a bool"),
    ],
)
def test_bad_constructor_args(model, kwargs, error, match):
    args = {"batch_size": 4, "steps": 2, **kwargs}
    with pytest.raises(error, match=match):
        Sampler(model, **args)


def test_only_a_sphere_encoder_is_sampled():
    with pytest.raises(TypeError, match="model must be a SphereEncoder, got Linear"):
        Sampler(torch.nn.Linear(2, 2).eval(), 4, 1)


def test_training_mode_refused():
    m = tiny_model().train()
    with pytest.raises(ValueError, match="eval"):
        Sampler(m, 4, 1)
    sampler = Sampler(m.eval(), 4, 1)
    m.train()  # after construction: found at the call
    for call in (sampler, sampler.prepare):
        with pytest.raises(ValueError, match="eval"):
            call()
    m.eval().decoder.y_embedder.train()  # label dropout is each embedder's own switch
    for call in (sampler, lambda: m.generate(4, y=LABELS[:4], seeds=SEEDS[:4])):
        with pytest.raises(ValueError, match=r"model.decoder.y_embedder is in training mode .* model.eval\(\)"):
            call()


def test_sampler_follows_its_model_to_another_device():
    m = tiny_model()
    sampler = Sampler(m, 8, 2, cfg=1.4, dtype=torch.float32)
    assert sampler(seeds=SEEDS).device.type == "cpu"
    m.to("meta")  # stands in for another device (CPU -> CUDA, cuda:0 -> cuda:1)
    assert sampler(seeds=SEEDS).device.type == "meta" and sampler.device.type == "meta"


@pytest.mark.parametrize(
    "labels,seeds,error,match",
    [
        (torch.zeros(0, dtype=torch.long), None, ValueError, "labels/seeds"),
        (None, torch.zeros(0, dtype=torch.int64), ValueError, "labels/seeds"),
        (torch.zeros(9, dtype=torch.long), None, ValueError, "batch_size=8"),
        (None, torch.arange(3, dtype=torch.int32), TypeError, "seeds"),
        (None, torch.arange(3.0), TypeError, "seeds"),
        (None, [1, 2, 3], TypeError, "seeds"),
        (torch.zeros(3, dtype=torch.long), torch.arange(4), ValueError, "same length"),
        (torch.tensor([0, 11, 1]), None, ValueError,
         r"labels: class labels must be in \[0, 10\], got values in \[0, 11\]"),
        (torch.tensor([0, -1, 1]), None, ValueError,
         r"labels: class labels must be in \[0, 10\], got values in \[-1, 1\]"),
        (torch.zeros(3, dtype=torch.int32), None, TypeError,
         r"labels must be a 1-D int64 tensor of 3 labels, got torch.int32"),
        (torch.zeros(3, 1, dtype=torch.long), None, ValueError, r"got torch.int64 of shape \(3, 1\)"),
        ([0, 1, 2], None, TypeError, "labels must be a 1-D int64 tensor of 8 labels, got list"),
        (np.int64(3), None, TypeError, "labels must be a 1-D int64 tensor of 8 labels, got numpy.int64"),
    ],
)
def test_bad_call_args(model, labels, seeds, error, match):
    sampler = Sampler(model, 8, 1, dtype=torch.float32)
    with pytest.raises(error, match=match):
        sampler(labels, seeds)


@pytest.mark.parametrize("flag", ["return_first", "clone"])
def test_call_switches_must_be_bools(model, flag):
    with pytest.raises(TypeError, match=f"{flag} must be a bool, got 'no'"):
        Sampler(model, 8, 1, dtype=torch.float32)(**{flag: "no"})


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"dtype": torch.int64}, TypeError, "dtype must be one of"),
        ({"dtype": "bf16"}, TypeError, "dtype must be one of"),
        ({"cfg": "1.4"}, TypeError, r"cfg must be a number in \[1, float32's largest\], got '1.4'"),
        ({"cache_sampling_noise": "no"}, TypeError, "cache_noise must be a bool"),
        ({"use_sampling_scheduler": 0.5}, TypeError, "scheduler must be a bool"),
    ],
)
def test_generate_checks_its_options(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        model.generate(2, forward_steps=2, **kwargs)


def test_random_labels_are_real_classes(model):
    assert sample_labels(model, 2000, None, torch.device("cpu")).unique().tolist() == list(range(10))  # never null


def test_generate_s_cfg_weight_is_the_sampler_s_bit_for_bit(model):
    """generate computes its CFG weight on the device (a float64 product, so torch.compile keeps cfg symbolic), the
    Sampler's graphs take the Python float: the same float32 for every cfg, exact or not in binary."""
    cfgs = [1.0 + k / 7 for k in range(1, 200)] + [1.1, 1.3, 2.7, 7.77, 10**0.5, 123.456789, 3e38, 2, 2**64]
    for position in ("combo", "enc", "dec"):
        for cfg in cfgs:
            weight = GuidedNetworks.from_scale(model, LABELS, cfg, position).weight
            expected = torch.tensor(sampling.guidance_weight(cfg, position), dtype=torch.float32)
            assert weight.dtype == torch.float32 and torch.equal(weight, expected), (position, cfg)


def test_guided_networks_need_labels_and_a_weight(model):
    with pytest.raises(ValueError, match="CFG needs labels y and a weight"):
        GuidedNetworks(model, None, "dec", None)
    with pytest.raises(ValueError, match="CFG needs labels y and a weight"):
        GuidedNetworks(model, LABELS, "enc", None)


def test_each_network_conditions_once_a_loop(model, monkeypatch):
    """A network's AdaLN modulations depend only on the labels: computed at its first pass, reused after."""
    calls = []

    def counted(name: str):
        conditioning = getattr(model, name).conditioning
        return lambda y: calls.append(name) or conditioning(y)

    for name in ("encoder", "decoder"):
        monkeypatch.setattr(getattr(model, name), "conditioning", counted(name))
    Sampler(model, 5, 3, cfg=1.4, dtype=torch.float32)(LABELS, SEEDS)
    assert sorted(calls) == ["decoder", "encoder"]


def test_guided_output_keeps_the_networks_dtype(model):
    """The CFG mix runs in float32 and is rounded once to the network's output dtype."""
    v = model.f(torch.randn(5, *model.latent_shape[1:]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = GuidedNetworks.from_scale(model, LABELS, 1.0, "dec").decode(v)
        guided = GuidedNetworks.from_scale(model, LABELS, 1.5, "dec").decode(v)
    assert plain.dtype == guided.dtype == torch.bfloat16


def test_cfg_mix_rounds_once_as_torch_lerp_with_a_float_weight(model):
    """In bf16 the guided output is the official torch.lerp(uncond, cond, cfg) with a Python-float weight (computed
    in float32, rounded once), not a lerp with the weight rounded to bf16 (1.4 -> 1.3984375)."""
    v = model.f(torch.randn(5, *model.latent_shape[1:], generator=torch.Generator().manual_seed(3)))
    null = torch.full_like(LABELS, model.num_classes)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        guided = GuidedNetworks.from_scale(model, LABELS, 1.4, "dec").decode(v)
        cond, uncond = model.decoder(torch.cat([v, v]), torch.cat([LABELS, null])).chunk(2)
    assert guided.dtype == torch.bfloat16
    assert torch.equal(guided, torch.lerp(uncond, cond, 1.4).clamp(-1, 1))


def test_cfg_mix_of_a_float64_model_runs_in_float64():
    """A float64 model's mix is torch.lerp in float64 (a float32 mix rounds it to 24 bits); cfg 1.5: a weight the
    float32 weight tensor holds exactly."""
    model = tiny_model().double()
    x = torch.rand(5, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    null = torch.full_like(LABELS, model.num_classes)
    with torch.no_grad():
        guided = GuidedNetworks.from_scale(model, LABELS, 1.5, "enc").encode(x)
        cond, uncond = model.encoder(torch.cat([x, x]), torch.cat([LABELS, null])).chunk(2)
    assert guided.dtype == torch.float64
    assert torch.equal(guided, torch.lerp(uncond, cond, 1.5))


def test_cfg_1_runs_each_network_on_one_batch(model):
    """cfg = 1 is no guidance: no null-class branch (the networks see B samples, not 2B), as with no labels."""
    batches = []
    hooks = [net.register_forward_pre_hook(lambda net, args: batches.append(args[0].shape[0]))
             for net in (model.encoder, model.decoder)]
    try:
        Sampler(model, 8, 2, cfg=1.0, dtype=torch.float32)(LABELS, SEEDS)
    finally:
        for hook in hooks:
            hook.remove()
    assert batches == [5, 5, 5]


def test_images_are_clamped_to_the_unit_range():
    assert torch.equal(to_unit(torch.tensor([-3.0, -1.0, 0.0, 0.5, 3.0])), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0]))


def test_float32_turns_off_an_enclosing_autocast(model):
    """float32 images are float32 inside the caller's autocast too; dtype None (generate's default) runs as
    called: in the enclosing autocast's dtype."""
    fp32 = Sampler(model, 5, 2, cfg=1.4, dtype=torch.float32, cuda_graph=False)(LABELS, SEEDS)
    inside: dict[str, torch.Tensor] = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside["sampler"] = Sampler(model, 5, 2, cfg=1.4, dtype=torch.float32, cuda_graph=False)(LABELS, SEEDS)
        for dtype in (torch.float32, None):
            inside[str(dtype)] = model.generate(5, y=LABELS, cfg=1.4, forward_steps=2, seeds=SEEDS, dtype=dtype)[1]
    assert torch.equal(inside["sampler"], fp32) and torch.equal(inside["torch.float32"], fp32)
    bf16 = Sampler(model, 5, 2, cfg=1.4, dtype=torch.bfloat16, cuda_graph=False)(LABELS, SEEDS)
    assert torch.equal(inside["None"], bf16) and (bf16 - fp32).abs().amax() > 1e-4


@pytest.mark.parametrize("weights,dtype", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_autocast_to_the_other_half_type_refused(weights, dtype):
    """Autocast to one half type cannot run weights of the other (torch fails deep inside with "Unexpected
    floating ScalarType"): refused up front, naming both."""
    m = tiny_model().to(weights)
    match = f"dtype {dtype} cannot run a model with {weights} weights"
    for call in (lambda: Sampler(m, 5, 2, cfg=1.4, dtype=dtype), lambda: m.generate(5, y=LABELS, dtype=dtype),
                 lambda: editing.reconstruct_images(m, torch.rand(2, 3, 16, 16), dtype=dtype)):
        with pytest.raises(TypeError, match=match):
            call()


def test_float32_runs_without_autocast(model):
    """float32 is no autocast at all (autocast to it warns on the CPU and does nothing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Sampler(model, 5, 2, cfg=1.4, dtype=torch.float32)(LABELS, SEEDS)
        model.generate(5, y=LABELS, forward_steps=2, seeds=SEEDS, dtype=torch.float32)


def test_recorded_noise_is_checked_and_taken_in_float32(model):
    draws = [torch.randn(5, 16, 4, dtype=torch.float64) for _ in range(2)]
    _, final = model.generate(5, y=LABELS, forward_steps=2, noise=draws)
    assert torch.equal(final, model.generate(5, y=LABELS, forward_steps=2, noise=[d.float() for d in draws])[1])
    with pytest.raises(ValueError, match=r"noise\[1\] must have shape \(5, 16, 4\), got \(5, 16\)"):
        model.generate(5, y=LABELS, forward_steps=2, noise=[draws[0], draws[1][..., 0]])
    for bad, got in ((draws[1].tolist(), "list"), (draws[1].long(), "torch.int64")):
        with pytest.raises(TypeError, match=rf"noise\[1\] must be a floating tensor of N\(0, I\) draws, got {got}"):
            model.generate(5, y=LABELS, forward_steps=2, noise=[draws[0], bad])
    for value in (float("nan"), float("inf")):
        bad = draws[1].clone()
        bad[3, 2, 1] = value
        with pytest.raises(ValueError, match=r"noise\[1\] holds NaN or infinite values"):
            model.generate(5, y=LABELS, forward_steps=2, noise=[draws[0], bad])
    huge = draws[1].clone()
    huge[0, 0, 0] = 1e300  # finite in float64, infinite in the float32 the loop takes
    with pytest.raises(ValueError, match=r"noise\[1\] holds NaN or infinite values"):
        model.generate(5, y=LABELS, forward_steps=2, noise=[draws[0], huge])
    # a draw left over means the run is not the one the draws were recorded from
    for steps, cache, given in ((2, False, 3), (3, True, 3), (3, False, 2), (1, False, 2)):
        with pytest.raises(ValueError, match=f"noise holds {given} draws; {steps} steps with cache_noise={cache}"):
            model.generate(5, y=LABELS, forward_steps=steps, cache_sampling_noise=cache, noise=(draws * 2)[:given])


def test_recorded_noise_is_read_on_the_host_before_the_networks_run(model, monkeypatch):
    """The draws' finiteness is read once, before the first network pass: a read between passes (each refinement
    draw's, when first taken) waits for the device to finish the passes queued before it."""
    order = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            order.append("read" if func in (torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default,
                                             torch.ops.aten._local_scalar_dense.default) else str(func))
            return func(*args, **(kwargs or {}))

    draws = [torch.randn(5, 16, 4) for _ in range(4)]
    with Ops():
        model.generate(5, y=LABELS, forward_steps=4, noise=draws)
    first_pass = next(i for i, op in enumerate(order) if "linear" in op or "addmm" in op or "convolution" in op)
    reads = [i for i, op in enumerate(order) if op == "read"]
    assert reads and max(reads) < first_pass, (reads, first_pass)


def test_global_generator_draws_in_the_official_order(model):
    """Without seeds or noise, generate draws as the official code: the initial point on the CPU generator, then
    the random labels, then the refinement draws on the model's device. So after the same manual_seed it makes
    the official run's labels and images."""
    torch.manual_seed(7)
    e0 = torch.randn(5, 16, 4)
    labels = torch.randint(0, 10, (5,))
    e1 = torch.randn(5, 16, 4)
    expected = model.generate(5, y=labels, cfg=1.4, forward_steps=2, noise=[e0, e1])
    torch.manual_seed(7)
    got = model.generate(5, cfg=1.4, forward_steps=2)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_recorded_noise_on_a_bf16_model_matches_the_loop_written_out():
    """The refinement noise meets the bf16 latent in bf16 (the loop's latents stay in the weights' dtype)."""
    model = tiny_model().to(torch.bfloat16)
    e0, e1 = (torch.randn(5, 16, 4, generator=torch.Generator().manual_seed(k)) for k in (1, 2))
    _, final = model.generate(5, y=LABELS, forward_steps=2, noise=[e0, e1])
    with torch.no_grad():
        x = model.decoder(model.f(e0).bfloat16(), LABELS)
        v = ops.spherify_noise(model.encoder(x, LABELS), model.sigma_max, noise=e1.bfloat16())
        expected = (model.decoder(v, LABELS).float() * 0.5 + 0.5).clamp(0, 1)
    assert torch.equal(final, expected)


def test_prepare_checks_its_count_where_nothing_is_captured(model):
    sampler = Sampler(model, 8, 1, dtype=torch.float32)
    assert sampler.prepare(3) is None  # on CPU the loop runs un-captured
    with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
        sampler.prepare(0)
    with pytest.raises(ValueError, match="batch_size=8 samples, got 9"):
        sampler.prepare(9)


def test_bad_attribute_change_caught_at_call(model):
    sampler = Sampler(model, 8, 1, dtype=torch.float32)
    sampler.steps = 0
    with pytest.raises(ValueError, match="steps"):
        sampler()
    sampler.steps, sampler.cfg = 1, 0.0
    with pytest.raises(ValueError, match="cfg"):
        sampler()


def test_compile_decoder_fullgraph(model):
    v = model.f(torch.randn(3, *model.latent_shape[1:]))
    y = torch.tensor([1, 2, 10])  # 10 = null label
    compiled = torch.compile(model.decoder, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(v, y), model.decoder(v, y), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compile_sampler_loop_fullgraph(model):
    sampler = Sampler(model, 4, 2, cfg=1.4, dtype=torch.float32)
    key = GraphKey(4, 2, "combo", True, False, torch.float32, "auto")
    labels, seeds = LABELS[:4], SEEDS[:4]
    w = torch.tensor(math.sqrt(1.4))
    compiled = torch.compile(sampler.loop, fullgraph=True)
    with torch.no_grad():
        expected = sampler.loop(key, labels, seeds, w)
        torch.testing.assert_close(compiled(key, labels, seeds, w), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("inputs,dynamic", [("labels", None), ("noise", None), ("labels", True)])
def test_compile_generate_fullgraph(model, inputs, dynamic):
    """generate compiles to one graph with its labels or recorded noise given, and with dynamic=True: their host
    checks (the labels' range, the noise's finiteness, the scales' and cfg's) broke the graph (review: compile)."""
    kwargs = {"y": LABELS, "seeds": SEEDS} if inputs == "labels" else {
        "y": LABELS, "noise": [torch.randn(5, 16, 4, generator=torch.Generator().manual_seed(k)) for k in (1, 2)]}
    compiled = torch.compile(model.generate, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    got = compiled(5, cfg=1.4, forward_steps=2, **kwargs)
    expected = model.generate(5, cfg=1.4, forward_steps=2, **kwargs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_compiled_generate_takes_a_new_cfg_without_compiling_again(model):
    """After dynamo's one recompile that makes cfg symbolic, later cfg values reuse the graph: the CFG weight, filled
    with torch.full, specialised cfg, so each value compiled anew and a sweep of 8 values hit the recompile limit."""
    from torch._dynamo.utils import counters

    compiled = torch.compile(model.generate, fullgraph=True, backend="aot_eager")
    graphs = []
    for cfg in (1.4, 1.6, 2.0, 2.5):
        got = compiled(5, y=LABELS, cfg=cfg, forward_steps=2, seeds=SEEDS)
        graphs.append(counters["stats"]["unique_graphs"])
        for a, b in zip(got, model.generate(5, y=LABELS, cfg=cfg, forward_steps=2, seeds=SEEDS)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert graphs[3] - graphs[0] <= 1, graphs


# ---------------------------------------------------------------------------------------------- CUDA graphs


@pytest.fixture(scope="module")
def cuda_model():
    return tiny_model("cuda").to(torch.bfloat16)


@pytest.mark.gpu
def test_captured_equals_uncaptured(cuda_model):
    labels, seeds = LABELS.cuda(), SEEDS.cuda()
    for steps, cfg, position in ((1, 1.0, "combo"), (4, 1.4, "combo"), (3, 1.6, "enc")):
        graphed = Sampler(cuda_model, 8, steps, cfg=cfg, cfg_position=position)
        plain = Sampler(cuda_model, 8, steps, cfg=cfg, cfg_position=position, cuda_graph=False)
        first, final = graphed(labels, seeds, return_first=True)
        ref_first, ref_final = plain(labels, seeds, return_first=True)
        # the graph runs the padded bucket (8 rows), the plain path 5: GEMM rounding may differ slightly
        torch.testing.assert_close(final, ref_final, atol=2e-2, rtol=0)
        torch.testing.assert_close(first, ref_first, atol=2e-2, rtol=0)
        # a full bucket: the same shapes on both paths (cuBLAS may still pick other algorithms in a capture)
        full_labels, full_seeds = torch.cat([labels, labels[:3]]), torch.cat([seeds, seeds[:3] + 7])
        out = graphed(full_labels, full_seeds)
        _, ref_generate = cuda_model.generate(
            8, y=full_labels, cfg=cfg, cfg_position=position, forward_steps=steps, cache_sampling_noise=True,
            seeds=full_seeds, dtype=torch.bfloat16,
        )
        for ref in (plain(full_labels, full_seeds), ref_generate):
            torch.testing.assert_close(out, ref, atol=2e-2, rtol=0)
            assert (out - ref).abs().mean() < 2e-3


@pytest.mark.gpu
def test_captures_log_their_phases_on_cuda(cuda_model, caplog):
    """On a GPU each capture logs its phases' seconds: the first with the compile pass, a later bucket without."""
    sampler = Sampler(cuda_model, 8, 2, cfg=1.4)
    with caplog.at_level("INFO", logger="sphere_fast"):
        sampler.prepare(8)
        sampler.prepare(2)
    phases = [r.capture_seconds for r in caplog.records if hasattr(r, "capture_seconds")]
    assert [list(p) for p in phases] == [["compile pass", "warm-up", "capture"], ["warm-up", "capture"]]
    assert all(seconds > 0 for p in phases for seconds in p.values())


@pytest.mark.gpu
def test_replays_bit_identical_and_seeds_matter(cuda_model):
    sampler = Sampler(cuda_model, 8, 2, cfg=1.4)
    labels, seeds = LABELS.cuda(), SEEDS.cuda()
    a = sampler(labels, seeds)
    assert torch.equal(a, sampler(labels, seeds))
    assert torch.equal(a, sampler(labels.cpu(), seeds.cpu()))
    b = sampler(labels, seeds + 1)
    assert ((a - b).abs().flatten(1).amax(1) > 1e-3).all()
    assert not torch.equal(sampler(labels), sampler(labels))
    assert len(sampler.graph_keys) == 1
    torch.testing.assert_close(sampler(labels[1:2], seeds[1:2])[0], a[1], atol=2e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_a_pinned_buffer_changed_after_the_call_does_not_reach_its_images(cuda_model, cuda_graph):
    """A serving loop reuses one pinned host buffer of labels and seeds: changed right after a call, while the
    device is still busy and the call's copies of it are queued, it must not change that call's images."""
    sampler = Sampler(cuda_model, 8, 2, cfg=1.4, cuda_graph=cuda_graph)
    expected = sampler(LABELS.cuda(), SEEDS.cuda())
    labels, seeds = LABELS.pin_memory(), SEEDS.pin_memory()
    torch.cuda._sleep(100_000_000)  # tens of ms of device work queued ahead of the call's copies
    images = sampler(labels, seeds)
    seeds.add_(1000)
    labels.add_(1).remainder_(10)
    assert torch.equal(images, expected)


@pytest.mark.gpu
def test_graph_selection(cuda_model):
    sampler = Sampler(cuda_model, 8, 2, cfg=1.4)
    labels, seeds = LABELS.cuda(), SEEDS.cuda()
    a = sampler(labels, seeds)
    assert sampler.graph_keys == (GraphKey(8, 2, "combo", True, False, torch.bfloat16, "auto"),)
    sampler.cfg = 2.0  # same graph, new weight in its buffer
    b = sampler(labels, seeds)
    assert len(sampler.graph_keys) == 1 and (a - b).abs().max() > 1e-3
    plain = Sampler(cuda_model, 8, 2, cfg=2.0, cuda_graph=False)
    torch.testing.assert_close(b, plain(labels, seeds), atol=2e-2, rtol=0)
    sampler.cfg = 1.0  # guidance off: a graph without the null branch
    sampler(labels, seeds)
    sampler.steps = 3
    sampler(labels, seeds)
    sampler(labels[:3], seeds[:3])
    sampler(labels[:3], seeds[:3])  # replays the bucket-4 graph
    assert sampler.graph_keys == (
        GraphKey(8, 2, "combo", True, False, torch.bfloat16, "auto"),
        GraphKey(8, 2, None, True, False, torch.bfloat16, "auto"),
        GraphKey(8, 3, None, True, False, torch.bfloat16, "auto"),
        GraphKey(4, 3, None, True, False, torch.bfloat16, "auto"),
    )
    sampler.steps, sampler.cfg = 2, 1.4
    assert torch.equal(sampler(labels, seeds), a)  # back to the first graph
    assert len(sampler.graph_keys) == 4


@pytest.mark.gpu
def test_prepare_and_views_on_cuda(cuda_model):
    sampler = Sampler(cuda_model, 8, 2, cfg=1.4)
    key = sampler.prepare(5)
    assert key == GraphKey(8, 2, "combo", True, False, torch.bfloat16, "auto") and sampler.graph_keys == (key,)
    labels, seeds = LABELS.cuda(), SEEDS.cuda()
    copy = sampler(labels, seeds)
    view = sampler(labels, seeds, clone=False)
    assert sampler.graph_keys == (key,) and torch.equal(view, copy)
    sampler(labels, seeds + 1)  # the same graph replays into the buffers the view shows
    assert not torch.equal(view, copy)


@pytest.mark.gpu
def test_moved_parameters_are_captured_again_on_cuda(cuda_model):
    """A graph replayed after its parameters moved would read freed memory: the sampler captures again."""
    import copy

    model = copy.deepcopy(cuda_model)
    sampler = Sampler(model, 8, 2, cfg=1.4)
    labels, seeds = LABELS.cuda(), SEEDS.cuda()
    before = sampler(labels, seeds)
    for p in model.parameters():
        p.data = p.data.clone()  # the same values in new memory
    # the old blocks are free in torch's caching allocator: these NaNs most likely land there, where a stale
    # replay would read
    garbage = [torch.full_like(p, float("nan")) for p in model.parameters()]
    assert torch.equal(sampler(labels, seeds), before)
    assert len(sampler.graph_keys) == 1 and len(garbage) > 0


@pytest.mark.gpu
def test_tuned_launch_configs_keep_the_images(cuda_model, monkeypatch):
    """The attention's launch configs tuned at run time give the images of its default configs, bit for bit,
    captured or not (the tuning may only change the speed)."""
    from sphere_fast.ops._tuning import forget_tuned_configs

    labels, seeds = LABELS.cuda(), SEEDS.cuda()
    for graph in (False, True):
        monkeypatch.setenv("SPHERE_FAST_AUTOTUNE", "0")
        expected = Sampler(cuda_model, 8, 2, cfg=1.4, cuda_graph=graph)(labels, seeds)
        monkeypatch.delenv("SPHERE_FAST_AUTOTUNE")
        forget_tuned_configs()
        assert torch.equal(Sampler(cuda_model, 8, 2, cfg=1.4, cuda_graph=graph)(labels, seeds), expected)


def test_loop_pads_mlp_weights_once_and_images_stay_the_same(model, monkeypatch) -> None:
    """On a fused backend (the tiny model's MLP width 85 is padded to 128) the loop pads each MLP's weights
    once for all its steps; the images are bit for bit those of padding at every network pass."""
    import contextlib

    import sphere_fast
    from sphere_fast import sampling
    from sphere_fast.nn.layers import SwiGLU

    if "cpp" not in sphere_fast.available_backends("cpu"):
        pytest.skip("cpp backend not available")
    calls = []
    real = SwiGLU.padded_w12
    monkeypatch.setattr(SwiGLU, "padded_w12", lambda self: calls.append(1) or real(self))
    sampler = Sampler(model, 5, 3, cfg=1.4, dtype=torch.float32)
    walks = []
    modules = torch.nn.Module.modules
    monkeypatch.setattr(torch.nn.Module, "modules", lambda self: walks.append(1) or modules(self))
    with sphere_fast.use_backend("cpp"):
        once = sampler(LABELS, SEEDS)
        assert len(calls) == 2  # one MLP in the encoder, one in the decoder
        assert walks == []  # the loop walked the model's modules to open (about 1 ms at Sphere-L's 717)
        calls.clear()
        monkeypatch.setattr(sampling, "padded_mlp_weights", lambda: contextlib.nullcontext())
        per_pass = sampler(LABELS, SEEDS)
        assert len(calls) == 5  # 3 decoder and 2 encoder passes
    assert torch.equal(once, per_pass)


def test_fused_mlp_gives_the_same_images(model, monkeypatch) -> None:
    """SPHERE_FAST_FUSED_MLP=1 on the triton backend (bf16; the interpreter on CPU): each network pass runs its
    MLP as ops.swiglu_linear, and the images are the unfused loop's up to bf16 rounding."""
    import copy
    import importlib

    import sphere_fast

    if "triton" not in sphere_fast.available_backends("cpu"):
        pytest.skip("triton backend not available")
    swl = importlib.import_module("sphere_fast.ops.swiglu_linear")
    calls = []
    monkeypatch.setattr(swl, "_swiglu_linear_triton", lambda *a: calls.append(1) or swl._triton_forward(*a))
    monkeypatch.delenv("SPHERE_FAST_FUSED_MLP", raising=False)
    sampler = Sampler(copy.deepcopy(model).to(torch.bfloat16), 5, 2, cfg=1.4, dtype=torch.bfloat16)
    with sphere_fast.use_backend("triton"):
        unfused = sampler(LABELS, SEEDS)
        assert calls == []
        monkeypatch.setenv("SPHERE_FAST_FUSED_MLP", "1")
        fused = sampler(LABELS, SEEDS)
    assert len(calls) == 3, "2 decoder passes and 1 encoder pass, one MLP each, both CFG branches in one call"
    diff = (fused.float() - unfused.float()).abs()
    assert diff.mean() < 2e-3 and diff.max() < 5e-2, f"mean {diff.mean():.2e}, max {diff.max():.2e}"
