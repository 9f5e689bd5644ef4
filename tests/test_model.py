"""Model structure (presets, state_dict keys, configs, the official init), its own functions (reconstruct, the
training forward, label dropout) and bad-input errors."""

import json
import math

import pytest
import torch

import sphere_fast
from sphere_fast import SphereEncoder
from sphere_fast.nn.layers import LabelEmbedder, RMSNorm, sincos_pos_embed_2d
from sphere_fast.ops.spherify import spherify_noise_reference
from sphere_fast.training import noisy_latent_pair
from tests import spec_reference


def official_keys(path):
    keys = {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            continue
        name, rest = line.split(" ", 1)
        shape = rest.rsplit(" ", 1)[0].strip("()").replace(" ", "")
        keys[name] = tuple(int(s) for s in shape.split(",") if s)
    return keys


PRESET_NAMES = ["sphere-l-af", "sphere-l-of", "sphere-l-imagenet", "sphere-xl-imagenet", "sphere-b-cifar10", "sphere-s-cifar10"]


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_matches_official(reference, name):
    expected = json.loads((reference / "official_state_dict" / "presets.json").read_text())[name]
    with torch.device("meta"):
        model = SphereEncoder.from_preset(name)
    assert sum(p.numel() for p in model.parameters()) == expected["parameters"]
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_keys(reference / "official_state_dict" / f"{name}.txt")
    assert len(got) == expected["tensors"]
    assert model.config == {**model.config, **expected["config"]}


def tiny(**kw):
    cfg = dict(input_size=16, patch_size=4, vit_enc_model_size={"width": 32, "layers": 2, "heads": 2},
               vit_dec_model_size={"width": 32, "layers": 2, "heads": 2}, token_channels=4, num_classes=5,
               vit_enc_latent_mlp_mixer_depth=1, vit_dec_latent_mlp_mixer_depth=1, noise_sigma_max_angle=80,
               mix_hard_cases_max_angle=85)
    cfg.update(kw)
    return SphereEncoder(**cfg).eval()


def perturb(model):
    """Random weights everywhere (the official init zeroes heads and AdaLN, which would hide paths)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


CONFIGS = {
    "cond-linear": {},
    "uncond-linear": dict(num_classes=0),
    "cond-conv": dict(pixel_head_type="conv"),
    "uncond-conv-32px": dict(num_classes=0, pixel_head_type="conv", input_size=32, patch_size=2),
    "no-mixer": dict(vit_enc_latent_mlp_mixer_depth=0, vit_dec_latent_mlp_mixer_depth=0),
    "affine-free-mixer": dict(affine_latent_mlp_mixer=False, vit_enc_latent_mlp_mixer_depth=2),
    "spherified-blocks": dict(spherify_model=True),
    "asymmetric-64px": dict(input_size=64, patch_size=8, vit_dec_model_size={"width": 48, "layers": 3, "heads": 4}),
    "halved": dict(halve_model_size=True, vit_enc_model_size={"width": 32, "layers": 4, "heads": 2}),
}


# float64: every op on its eager reference in float64, as the transcription (its RoPE table float32, as the model's)
TOLERANCES = {torch.float32: {"atol": 5e-5, "rtol": 1e-4}, torch.float64: {"atol": 1e-12, "rtol": 1e-12}}


@pytest.mark.parametrize("dtype", TOLERANCES, ids=str)
@pytest.mark.parametrize("name", CONFIGS)
def test_config_matches_spec_reference(name, dtype):
    model = perturb(tiny(**CONFIGS[name])).to(dtype)
    cfg = {**model.config}
    sd = model.state_dict()
    enc, dec = model.encoder, model.decoder
    B = 2
    x = (torch.rand(B, 3, cfg["input_size"], cfg["input_size"]) * 2 - 1).to(dtype)
    y = torch.tensor([1, 3]) if cfg["num_classes"] else None
    with torch.no_grad():
        z = model.encoder(x, y)
        z_ref = spec_reference.vit(sd, "encoder", "encoder", cfg, x, y, enc.blocks[0].attn.heads, len(enc.blocks))
        torch.testing.assert_close(z, z_ref, **TOLERANCES[dtype])
        v = model.f(z)
        img = model.decoder(v, y)
        img_ref = spec_reference.vit(sd, "decoder", "decoder", cfg, v, y, dec.blocks[0].attn.heads, len(dec.blocks), cfg["spherify_model"])
        torch.testing.assert_close(img, img_ref, **TOLERANCES[dtype])
    assert img.shape == x.shape and img.dtype == dtype


def test_state_dict_round_trip():
    a, b = perturb(tiny()), tiny()
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(a.reconstruct(x), b.reconstruct(x), rtol=0, atol=0)


def test_state_dict_errors_list_keys():
    model = tiny()
    sd = model.state_dict()
    sd.pop("encoder.blocks.0.norm1.weight")
    sd["encoder.extra"] = torch.zeros(1)
    sd["decoder.ffn.linear.bias"] = torch.zeros(7)
    with pytest.raises(ValueError) as err:
        model.load_state_dict(sd)
    msg = str(err.value)
    assert "encoder.blocks.0.norm1.weight" in msg and "encoder.extra" in msg and "decoder.ffn.linear.bias" in msg
    only_missing = model.state_dict()
    only_missing.pop("decoder.pos_embed")
    with pytest.raises(ValueError, match=r"1 missing keys: \['decoder.pos_embed'\]"):
        model.load_state_dict(only_missing)
    for dtype in (torch.int64, torch.bool, torch.complex64):  # torch's own would cast them silently
        typed = model.state_dict()
        typed["decoder.pos_embed"] = typed["decoder.pos_embed"].to(dtype)
        with pytest.raises(ValueError, match=rf"1 mis-typed keys: \['decoder.pos_embed: expected a floating tensor, "
                                             rf"got {dtype}'\]"):
            model.load_state_dict(typed, assign=True)


@pytest.mark.parametrize(
    "wrap", [lambda sd: {"model": sd, "epoch": 3}, lambda sd: {f"module.{k}": v for k, v in sd.items()}]
)
def test_state_dict_errors_are_short_and_name_the_wrapper(wrap):
    """A checkpoint file's dict (or DDP's prefixed keys) given as a state_dict: a message of a few lines that
    names the reader, not every key of the model."""
    model = tiny()
    with pytest.raises(ValueError, match="read_official") as err:
        model.load_state_dict(wrap(model.state_dict()))
    assert len(str(err.value)) < 1500 and "more" in str(err.value)


def test_an_official_ema_dict_given_as_a_state_dict_names_its_reader():
    """The official EMA dict holds the RoPE tables (non-persistent here): loading it as it is names
    read_official(path, key='ema_model'), which checks and drops them."""
    model = tiny()
    ema = {**model.state_dict(), "encoder.rope": model.encoder.rope[None], "decoder.rope": model.decoder.rope[None]}
    with pytest.raises(ValueError, match=r"2 unexpected keys.*read_official\(path, key='ema_model'\)"):
        model.load_state_dict(ema)


def test_docstrings_of_the_noise_level_properties():
    assert "degrees" in SphereEncoder.noise_sigma_max_angle.__doc__ and "tan" in SphereEncoder.sigma_max.__doc__


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vit_enc_model_size="enormous"), "vit_enc_model_size"),
        (dict(vit_dec_model_size={"width": 32}), "vit_dec_model_size"),
        (dict(input_size=18), "divisible"),
        (dict(vit_enc_model_size={"width": 30, "layers": 1, "heads": 4}),
         r"width \(30\) must be divisible by heads \(4\)"),
        (dict(vit_dec_model_size={"width": 40, "layers": 1, "heads": 4}),
         "head dim must be divisible by 4 for 2-D RoPE, got 10"),
        (dict(pixel_head_type="mlp"), "pixel_head_type"),
        (dict(num_classes=-1), "num_classes"),
        (dict(vit_enc_model_size={"width": 32, "layers": 0, "heads": 2}), "positive int 'width', 'layers', 'heads'"),
        (dict(in_context_size=4), "in_context_size must be 0 .*, got 4"),
        (dict(in_context_size=-1), "in_context_size must be 0 .*, got -1"),
        (dict(noise_sigma_max_angle=86, mix_hard_cases_max_angle=85),
         r"noise_sigma_max_angle \(86\) must be <= mix_hard_cases_max_angle \(85\)"),
        (dict(noise_sigma_max_angle=90, mix_hard_cases_max_angle=89), r"noise_sigma_max_angle .* in \(0, 90\)"),
        (dict(noise_sigma_max_angle="80"), r"noise_sigma_max_angle must be a number of degrees in \(0, 90\), got '80'"),
        (dict(mix_hard_cases_max_angle=90.5), r"mix_hard_cases_max_angle must be a number of degrees"),
        (dict(num_classes=True), "num_classes must be an int >= 0, got True"),
        (dict(patch_size=True), "patch_size must be a positive int"),
        (dict(vit_dec_latent_mlp_mixer_depth=-1), "vit_dec_latent_mlp_mixer_depth must be an int >= 0"),
        (dict(vit_enc_latent_mlp_mixer_depth=True), "vit_enc_latent_mlp_mixer_depth must be an int >= 0, got True"),
        (dict(halve_model_size=True, vit_dec_model_size={"width": 32, "layers": 1, "heads": 2}),
         "halve_model_size leaves vit_dec_model_size with 0 layers"),
        (dict(halve_model_size="no"), "halve_model_size must be a bool, got 'no'"),  # truthy: it halved
        (dict(use_pixel_consistency=1), "use_pixel_consistency must be a bool, got 1"),
        (dict(mix_hard_cases_prob="abc"), r"mix_hard_cases_prob must be a number in \[0, 1\], got 'abc'"),  # failed in
        (dict(mix_hard_cases_prob=5.0), r"mix_hard_cases_prob must be a number in \[0, 1\], got 5.0"),  # training
        (dict(vit_enc_model_size=123), "vit_enc_model_size must be a size name or a dict, got int"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_official_init():
    """The spec's init (section 5), rule by rule, on a model large enough for the statistics: xavier-uniform
    weights lie within their bound with std bound / sqrt(3); normal ones have their std (within 10%; 25% for the
    81 weights of the output conv)."""
    torch.manual_seed(0)
    size = {"width": 64, "layers": 1, "heads": 2}
    model = tiny(vit_enc_model_size=size, vit_dec_model_size=size, num_classes=10)
    enc, dec = model.encoder, model.decoder

    def xavier_uniform(w: torch.Tensor, gain: float = 1.0, tol: float = 0.1) -> None:
        bound = gain * math.sqrt(6 / (w.shape[0] + w[0].numel()))  # fans of the weight seen as [out, in*k*k]
        assert w.abs().max() <= bound and abs(w.std().item() / (bound / math.sqrt(3)) - 1) < tol

    for linear in (enc.blocks[0].attn.qkv, dec.blocks[0].mlp.w12, enc.x_embedder[1]):
        xavier_uniform(linear.weight)
        assert not linear.bias.any()
    xavier_uniform(enc.x_embedder[0].weight)  # the patch conv
    decoder_input = [m.weight.flatten() for m in dec.x_embedder.modules() if isinstance(m, torch.nn.Linear)]
    assert abs(torch.cat(decoder_input).std().item() - 1) < 0.1
    xavier_uniform(dec.out[2].weight, gain=0.01, tol=0.25)
    for vit in (enc, dec):
        assert abs(vit.y_embedder.embedding_table.weight.std().item() / 0.02 - 1) < 0.1
        zeroed = [block.adaLN_modulation[1] for block in vit.blocks] + [vit.ffn.adaLN_modulation[1], vit.ffn.linear]
        assert not any(m.weight.any() or m.bias.any() for m in zeroed)
        assert not any(b.alpha1.any() or b.alpha2.any() for b in vit.modules() if hasattr(b, "alpha1"))


def test_sincos_embedding_needs_a_width_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4 for the 2-D sin-cos embedding, got 30"):
        sincos_pos_embed_2d(30, 4)


def test_halve_model_size_halves_both_networks():
    model = tiny(halve_model_size=True, vit_enc_model_size={"width": 32, "layers": 4, "heads": 2},
                 vit_dec_model_size={"width": 32, "layers": 6, "heads": 2})
    assert (len(model.encoder.blocks), len(model.decoder.blocks)) == (2, 3)
    # a size name is halved in a copy: the table, and so the next model of that size, keep it whole
    for _ in range(2):
        model = SphereEncoder(input_size=16, patch_size=4, vit_enc_model_size="tiny", vit_dec_model_size="tiny",
                              token_channels=4, halve_model_size=True)
        assert (len(model.encoder.blocks), len(model.decoder.blocks)) == (1, 1)
    assert sphere_fast.MODEL_SIZES["tiny"] == {"width": 64, "layers": 2, "heads": 2}


def test_preset_overrides_win():
    with torch.device("meta"):
        model = SphereEncoder.from_preset("sphere-l-imagenet", vit_dec_model_size="tiny", num_classes=7)
    preset = sphere_fast.PRESETS["sphere-l-imagenet"]["config"]
    expected = {**preset, "vit_dec_model_size": "tiny", "num_classes": 7}
    assert {key: model.config[key] for key in expected} == expected
    assert model.decoder.blocks[0].attn.proj.in_features == 64 and model.decoder.y_embedder.num_classes == 7


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        SphereEncoder.from_preset("sphere-q-mnist")


def test_bad_inputs():
    model = tiny()
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"x must have shape \[B, 3, 16, 16\]"):
        model.encoder(torch.rand(2, 3, 32, 32), y)
    with pytest.raises(ValueError, match="x must have shape"):
        model.encoder(torch.rand(2, 1, 16, 16), y)
    with pytest.raises(ValueError, match="z must have shape"):
        model.decoder(torch.rand(2, 16, 5), y)
    with pytest.raises(ValueError, match="empty batch"):
        model.decoder(torch.rand(0, 16, 4), y[:0])
    for labels in ([0, 6], [-1, 0]):
        with pytest.raises(ValueError, match=r"labels must be in \[0, 5\]"):
            model.encoder(torch.rand(2, 3, 16, 16), torch.tensor(labels))
    for labels in (torch.tensor([0, 1, 2]), y[:, None]):  # a wrong shape is a ValueError, a wrong type a TypeError
        with pytest.raises(ValueError, match=r"y must be an int64 tensor of shape \(2,\)"):
            model.decoder(torch.rand(2, 16, 4), labels)
    with pytest.raises(TypeError, match="y must be an int64"):
        model.encoder(torch.rand(2, 3, 16, 16), None)
    with pytest.raises(TypeError, match="y must be an int64"):
        model.encoder(torch.rand(2, 3, 16, 16), y.int())
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.uint8"):
        model.encoder(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), y)
    with pytest.raises(ValueError, match="unconditional"):
        tiny(num_classes=0).decoder(torch.rand(2, 16, 4), y)
    for kwargs, match in [
        (dict(cfg=0.5), "cfg"),
        (dict(cfg=float("nan")), "cfg"),
        (dict(forward_steps=0), "forward_steps"),
        (dict(cfg_position="both"), "cfg_position"),
        (dict(y=torch.tensor([0, 6])), r"labels must be in \[0, 5\]"),  # 5, the null label, is taken
    ]:
        with pytest.raises(ValueError, match=match):
            model.generate(2, **kwargs)
    with pytest.raises(ValueError, match="batch_size"):
        model.generate(0)
    with pytest.raises(ValueError, match="noise"):
        model.generate(2, forward_steps=3, noise=[torch.randn(2, 16, 4)])
    with pytest.raises(ValueError, match="at most one of noise and seeds"):
        model.generate(2, noise=[torch.randn(2, 16, 4)], seeds=torch.arange(2))


@pytest.mark.parametrize("noise, expected", [(80, 85), (84, 89), (85, 89), (70.5, 75.5)])
def test_the_hard_cases_angle_follows_the_noise_angle(noise, expected):
    """Unless given, the hard cases' angle is min(noise angle + 5, 89) (spec section 4, as the official training
    sets it): a noise angle changed alone must not leave it behind (no hard cases past the noise, or a refusal)."""
    model = tiny(noise_sigma_max_angle=noise, mix_hard_cases_max_angle=None)
    assert model.mix_hard_cases_max_angle == expected == model.config["mix_hard_cases_max_angle"]
    assert tiny(noise_sigma_max_angle=noise, mix_hard_cases_max_angle=89).mix_hard_cases_max_angle == 89


def test_a_new_noise_angle_is_checked_and_saved_with_the_model(tmp_path):
    """Setting the angle (to sample at another noise level) keeps the constructor's checks, and the config a
    checkpoint saves follows it: the reloaded model samples as the one saved."""
    from sphere_fast.checkpoint import load_checkpoint, save_checkpoint

    model = perturb(tiny())
    model.noise_sigma_max_angle = 60
    assert model.config["noise_sigma_max_angle"] == 60 and model.sigma_max == pytest.approx(math.tan(math.pi / 3))
    for bad, match in ((95, r"in \(0, 90\), got 95"), (86, r"\(86\) must be <= mix_hard_cases_max_angle \(85\)"),
                       ("60", "got '60'")):
        with pytest.raises(ValueError, match=match):
            model.noise_sigma_max_angle = bad
    assert model.noise_sigma_max_angle == 60
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path, model))
    assert loaded.eval().noise_sigma_max_angle == 60
    y, seeds = torch.tensor([0, 1]), torch.arange(2)
    torch.testing.assert_close(loaded.generate(2, y=y, forward_steps=2, seeds=seeds)[1],
                               model.generate(2, y=y, forward_steps=2, seeds=seeds)[1], rtol=0, atol=0)


def test_inputs_must_match_the_weights_dtype_and_device():
    """Checked before the first layer: torch's own errors name neither the argument nor the fix."""
    model = tiny()
    x, y, z = torch.rand(2, 3, 16, 16), torch.tensor([0, 1]), torch.rand(2, 16, 4)
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the encoder's weights are torch.float32"):
        model.encoder(x.double(), y)
    half = tiny().to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"z has dtype torch.float32 but the decoder's weights are torch.bfloat16"):
        half.decoder(z, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert half.decoder(z, y).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"x is on meta but the encoder's weights are on cpu"):
        model.encoder(x.to("meta"), y.to("meta"))
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor of images \[B, 3, H, W\] in \[-1, 1\], got list"):
        model.reconstruct(x.tolist())


def test_sampling_and_reconstruction_refuse_training_mode():
    """Label dropout applies in training mode: the same seeds would give other images (the Sampler and the edits
    refuse it too)."""
    model = tiny().train()
    with pytest.raises(ValueError, match="training mode"):
        model.generate(2, y=torch.tensor([0, 1]), cfg=1.4, seeds=torch.arange(2))
    with pytest.raises(ValueError, match="training mode"):
        model.reconstruct(torch.rand(2, 3, 16, 16), torch.tensor([0, 1]))


def test_reconstruct_with_sampling_noise():
    """reconstruct(sampling=True): the latent re-projected with noise of noise_scaler * sigma_max, f(f(z) + s e),
    e drawn from torch's generator, then decoded; with noise_scaler 0 it draws nothing."""
    model = perturb(tiny())
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([1, 4])
    torch.manual_seed(3)
    out = model.reconstruct(x, y, noise_scaler=0.5, sampling=True)
    with torch.no_grad():
        z = model.encoder(x, y)
        torch.manual_seed(3)
        v = spherify_noise_reference(z, 0.5 * model.sigma_max, torch.randn_like(z))
        expected = (model.decoder(v, y) * 0.5 + 0.5).clamp(0, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # no noise to add: the plain reconstruction, and no draw from the generator
    state = torch.get_rng_state()
    out = model.reconstruct(x, y, noise_scaler=0.0, sampling=True)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(out, model.reconstruct(x, y), atol=0, rtol=0)
    for flag in ("no", 1):  # truthy non-bools would add noise
        with pytest.raises(TypeError, match="sampling must be a bool"):
            model.reconstruct(x, y, sampling=flag)


def test_training_forward_re_encodes_the_big_noise_images():
    """The training forward decodes the big- and small-noise latents with the same labels (pixel consistency);
    with latent consistency it re-encodes the first B decoded images (those of the big noise); in eval mode it
    does not."""
    model = perturb(tiny(use_pixel_consistency=True, use_latent_consistency=True)).train()
    for vit in (model.encoder, model.decoder):
        vit.y_embedder.dropout_prob = 0.0  # no random label drop: the calls below see the same labels
    x, y = torch.rand(3, 3, 16, 16) * 2 - 1, torch.tensor([1, 4, 2])
    torch.manual_seed(5)
    images, _, u_big, _ = model(x, y)
    torch.manual_seed(5)
    v_big, v_small = noisy_latent_pair(model, model.encoder(x, y))
    torch.testing.assert_close(images, model.decoder(torch.cat([v_big, v_small]), torch.cat([y, y])), atol=0, rtol=0)
    torch.testing.assert_close(u_big, model.encoder(images[:3], y), atol=0, rtol=0)
    assert model.eval()(x, y)[2] is None


def test_label_dropout_drops_its_share_to_the_null_label():
    embedder = LabelEmbedder(num_classes=10, width=4, dropout_prob=0.1).train()
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (20000,))
    rows = embedder(labels)[:, 0]
    null = (rows == embedder.embedding_table.weight[10]).all(dim=1).float().mean().item()
    assert 0.09 < null < 0.11
    assert torch.equal(embedder.eval()(labels)[:, 0], embedder.embedding_table.weight[labels])


def test_a_models_label_embedders_drop_at_the_recipes_rate():
    """The spec's p = 0.1 is the model's default (the test above passes its rate): 0 would train no unconditional
    branch for CFG, silently."""
    model = tiny().train()
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (20000,))
    for vit in (model.encoder, model.decoder):
        rows = vit.y_embedder(labels)[:, 0]
        assert 0.09 < (rows == vit.y_embedder.embedding_table.weight[5]).all(dim=1).float().mean().item() < 0.11


def test_rms_norm_takes_its_eps():
    x = torch.randn(2, 3, 4) * 0.1
    norm = RMSNorm(4, eps=0.5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        torch.testing.assert_close(norm(x), x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 0.5) * norm.weight)


def test_generate_options_shapes_and_range():
    model = perturb(tiny())
    for kwargs in [dict(), dict(cfg=1.5, cfg_position="dec"), dict(cfg=2.0, cfg_position="enc", forward_steps=3, use_sampling_scheduler=True),
                   dict(forward_steps=2, cache_sampling_noise=True, dtype=torch.bfloat16)]:
        first, out = model.generate(3, **kwargs)
        assert first.shape == out.shape == (3, 3, 16, 16)
        assert first.dtype == out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 1


def test_generate_with_seeds_is_batch_independent():
    model = perturb(tiny())
    seeds = torch.tensor([11, 2**40 + 3, -7], dtype=torch.int64)
    y = torch.tensor([1, 2, 3])
    kwargs = dict(cfg=1.4, forward_steps=3, cache_sampling_noise=False)
    _, batch = model.generate(3, y=y, seeds=seeds, **kwargs)
    _, alone = model.generate(1, y=y[1:2], seeds=seeds[1:2], **kwargs)
    torch.testing.assert_close(alone[0], batch[1], atol=1e-6, rtol=0)
    _, again = model.generate(3, y=y, seeds=seeds, **kwargs)
    assert torch.equal(again, batch)
    _, other = model.generate(3, y=y, seeds=seeds + 1, **kwargs)
    assert (other - batch).abs().max() > 1e-3


def test_generate_seeds_follow_the_noise_convention():
    """Seeded sampling equals replaying the convention's draws: stream 0, then 1 (cached) or t."""
    from sphere_fast.ops import sphere_noise

    model = perturb(tiny())
    seeds = torch.tensor([5, 6], dtype=torch.int64)
    y = torch.tensor([0, 4])
    shape = model.latent_shape[1:]
    for cache in (True, False):
        draws = [sphere_noise(seeds, shape, stream=k) for k in ((0, 1) if cache else (0, 1, 2))]
        seeded = model.generate(2, y=y, forward_steps=3, cache_sampling_noise=cache, seeds=seeds)
        replayed = model.generate(2, y=y, forward_steps=3, cache_sampling_noise=cache, noise=draws)
        torch.testing.assert_close(seeded, replayed, atol=1e-5, rtol=0)


def test_bf16_weights_generate_close_to_fp32():
    """bf16 weights (the official evaluation cast): RoPE stays fp32, images stay near the fp32 ones."""
    model = tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    seeds = torch.tensor([3, 4])
    _, ref = model.generate(2, y=torch.tensor([1, 2]), forward_steps=2, seeds=seeds)
    half = model.to(torch.bfloat16)
    assert half.decoder.rope.dtype == torch.float32
    _, out = half.generate(2, y=torch.tensor([1, 2]), forward_steps=2, seeds=seeds)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05


def test_sampling_loop_checks_labels_once(monkeypatch):
    """The loop validates labels up front; the networks' per-call range check (a host sync) is skipped."""
    model = tiny()
    calls = []
    original = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: calls.append(1) or original(*a, **k))
    model.generate(2, y=torch.tensor([0, 1]), cfg=1.5, forward_steps=3)
    assert calls == [1]  # the check up front; none in the 5 network calls (3 decodes, 2 encodes)
    calls.clear()
    model.encoder(torch.rand(2, 3, 16, 16), torch.tensor([0, 1]))
    assert calls == [1]
    with pytest.raises(ValueError, match="labels must be in"):
        model.decoder(torch.rand(2, 16, 4), torch.tensor([0, 9]))


@pytest.mark.parametrize("num_classes", [5, 0], ids=["cond", "uncond"])
def test_precomputed_conditioning_gives_the_same_output(num_classes):
    model = perturb(tiny(num_classes=num_classes))
    y = torch.tensor([0, 4, 5]) if num_classes else None
    x, z = torch.rand(3, 3, 16, 16) * 2 - 1, torch.randn(3, 16, 4)
    for net, inp in ((model.encoder, x), (model.decoder, z)):
        assert torch.equal(net(inp, y, conditioning=net.conditioning(y)), net(inp, y))


def test_sampling_loop_computes_the_modulations_once_per_network():
    """They depend only on the labels: one AdaLN modulation per network for the whole loop, not one a pass."""
    model = perturb(tiny())
    calls = {"encoder": 0, "decoder": 0}
    for name in calls:
        getattr(model, name).blocks[1].adaLN_modulation.register_forward_hook(
            lambda *args, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    model.generate(2, y=torch.tensor([0, 1]), cfg=1.5, forward_steps=3)
    assert calls == {"encoder": 1, "decoder": 1}  # for 2 encoder and 3 decoder passes
    model.decoder(torch.randn(2, 16, 4), torch.tensor([0, 1]))
    assert calls["decoder"] == 2  # a plain forward computes its own


@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.skipif(
    b not in sphere_fast.available_backends("cpu"), reason=f"{b} unavailable")) for b in ("eager", "cpp")])
def test_compile_training_forward_fullgraph(backend):
    """torch.compile(model, fullgraph=True) over the training forward and its backward: no graph break
    from our ops or checks; the same outputs and gradients as eager (aot_eager: the traced graph, run as is)."""
    from tests.tiny import no_label_dropout, tiny_batch, tiny_model

    model = no_label_dropout(tiny_model()).train()
    x, y = tiny_batch(4)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")

    def run(fn):
        torch.manual_seed(0)  # the noise draws of the training forward
        images, _, u_big, z = fn(x, y)
        loss = images.square().mean() + u_big.square().mean()
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        return [images, u_big, z], grads

    with sphere_fast.use_backend(backend):
        outs, grads = run(compiled)
        ref_outs, ref_grads = run(model)
    for out, ref in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert (grad is None) == (ref is None)
        if ref is not None:
            torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-4)


def test_compile_training_forward_with_dynamic_batch():
    """The training forward compiled with dynamic=True: its noise levels' draws (torch.rand, randperm) take the
    symbolic batch, one graph serves every batch, and each gives what eager does (a last partial batch must not
    crash or recompile a compiled run). The batches differ from every other size of the inputs: dynamo gives equal
    sizes one symbol, so a batch of 3 is fixed by the shape check of the images' 3 channels."""
    from tests.tiny import no_label_dropout, tiny_batch, tiny_model

    model = no_label_dropout(tiny_model()).train()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch in (5, 7):
        x, y = tiny_batch(batch)
        outs = []
        for fn in (compiled, model):
            torch.manual_seed(0)
            with torch._dynamo.config.patch(error_on_recompile=batch != 5):
                outs.append(fn(x, y))
        for out, ref in zip(*outs, strict=True):
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_hooks_on_a_block_fire_and_count() -> None:
    """Each block is called as a module (the MLP's residual add runs in the next block, with its norm): a forward
    hook sees the block's output and can change it; the output is the same as without hooks."""
    model, g = tiny(), torch.Generator().manual_seed(1)
    latent, y = torch.randn(2, *model.latent_shape[1:], generator=g), torch.tensor([1, 2])
    with torch.no_grad():
        for p in model.parameters():  # not the zero-initialised gates and head of a new model
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        plain = model.decoder(latent, y)
        seen = []
        handles = [block.register_forward_hook(lambda module, args, out: seen.append(out[0].shape))
                   for block in model.decoder.blocks]
        assert torch.equal(model.decoder(latent, y), plain) and seen == [(2, 16, 32)] * 2
        handles.append(model.decoder.blocks[1].register_forward_hook(lambda m, args, out: (out[0] + 1, out[1])))
        assert not torch.allclose(model.decoder(latent, y), plain)  # what the hook returned went on
    for handle in handles:
        handle.remove()


class _CountedNorm(torch.nn.Module):
    """A module in a norm's place that runs the norm it wraps and counts its calls."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.norm, self.calls = norm, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.norm(x)


@pytest.mark.parametrize("backend", ["eager", "cpp"])
@pytest.mark.parametrize("num_classes", [5, 0])
def test_hooked_or_swapped_norms_and_head_modules_are_called(backend: str, num_classes: int) -> None:
    """The fused add + norm reads a plain RMSNorm's weight and eps instead of calling it: a hook on a norm would not
    fire, a module in its place would not run, a changed eps would be dropped. Those norms are called, as are the
    head's modules (``ffn``, the pixel head ``out``), with the plain model's output; what a hook returns goes on."""
    model, g = perturb(tiny(num_classes=num_classes)), torch.Generator().manual_seed(1)
    latent = torch.randn(2, *model.latent_shape[1:], generator=g)
    y = torch.tensor([1, 2]) if num_classes else None
    decoder = model.decoder
    fired = []
    with sphere_fast.use_backend(backend), torch.no_grad():
        plain = decoder(latent, y)
        modules = [decoder.blocks[0].norm1, decoder.blocks[1].norm2, decoder.ffn, decoder.out]
        if num_classes:
            modules.append(decoder.ffn.norm)
        handles = [m.register_forward_hook(lambda m, args, out, i=i: fired.append(i)) for i, m in enumerate(modules)]
        torch.testing.assert_close(decoder(latent, y), plain, rtol=1e-5, atol=1e-5)
        assert sorted(fired) == list(range(len(modules)))
        handles.append(decoder.blocks[1].norm1.register_forward_hook(lambda m, args, out: out * 2))
        assert not torch.allclose(decoder(latent, y), plain, atol=1e-3)
        for handle in handles:
            handle.remove()
        counted = decoder.blocks[0].norm2 = _CountedNorm(decoder.blocks[0].norm2)
        torch.testing.assert_close(decoder(latent, y), plain, rtol=1e-5, atol=1e-5)
        assert counted.calls == 1
        decoder.blocks[0].norm2 = torch.nn.LayerNorm(32, elementwise_affine=False)
        assert not torch.allclose(decoder(latent, y), plain, atol=1e-3)
        decoder.blocks[0].norm2 = counted.norm
        norms = [norm for block in decoder.blocks for norm in (block.norm1, block.norm2)]
        norms += [decoder.ffn.norm] if num_classes else []
        for norm in norms:
            norm.eps = 0.5
        wide_eps = decoder(latent, y)
        assert not torch.allclose(wide_eps, plain, atol=1e-3)
        for norm in norms:  # hooked: called, so RMSNorm.forward applies its own eps
            norm.register_forward_hook(lambda m, args, out: None)
        torch.testing.assert_close(decoder(latent, y), wide_eps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", ["linear", "conv"])
def test_a_decoder_saved_whole_before_unpatchify_loads_with_it(head: str) -> None:
    """A model saved whole with torch.save before the pixel head's first step was Unpatchify held an Identity
    there, which the forward would now pass the tokens through (a [B, N, C] 'image' or a convolution's error)."""
    import io

    model = perturb(tiny(pixel_head_type=head))
    latent = torch.randn(2, *model.latent_shape[1:], generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 2])
    with torch.no_grad():
        expected = model.decoder(latent, y)
    model.decoder.out[0] = torch.nn.Identity()  # as such a model was saved
    saved = io.BytesIO()
    torch.save(model, saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded.decoder(latent, y), expected)


def test_a_block_compiled_or_checkpoint_wrapped_alone_runs_so() -> None:
    """Regional compilation (``block.compile()``) compiles the blocks, and torch's checkpoint wrapper recomputes
    them in the backward: both give the plain model's outputs and gradients."""
    from torch._dynamo.utils import counters
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from sphere_fast.nn.layers import Block
    from tests.tiny import TWO_LAYERS, tiny_batch, tiny_model

    x, y = tiny_batch(2)

    def run(model) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = model.decoder(model.f(model.encoder(x, y)), y)
        return out, torch.autograd.grad(out.square().sum(), [p for p in model.parameters() if p.requires_grad])

    expected = run(tiny_model(**TWO_LAYERS))
    compiled = tiny_model(**TWO_LAYERS)
    for block in (*compiled.encoder.blocks, *compiled.decoder.blocks):
        block.compile(backend="eager", fullgraph=True)
    torch._dynamo.reset()
    counters.clear()
    torch.testing.assert_close(run(compiled), expected)
    assert counters["stats"]["unique_graphs"] >= 1
    wrapped = tiny_model(**TWO_LAYERS)
    apply_activation_checkpointing(wrapped, check_fn=lambda m: isinstance(m, Block))
    assert type(wrapped.decoder.blocks[0]) is not Block
    torch.testing.assert_close(run(wrapped), expected)
