"""The perceptual loss networks: torchvision/lpips checkpoint layouts, LPIPS behaviour, strict file loading."""

import math

import pytest
import torch
import torch.nn.functional as F
from tests.tiny import no_label_dropout, tiny_batch, tiny_model

from sphere_fast.ops import spherify_noise_reference
from sphere_fast.perceptual import (
    LPIPS,
    VGG16_TAPS,
    ConvNeXt,
    LayerNorm2d,
    LPIPSLinear,
    VGG16Features,
    load_state_dict_file,
)
from sphere_fast.training import PerceptualLoss, SphereLoss, loss_weights


def small_convnext() -> ConvNeXt:
    return ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=10)


def images(b: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth structured images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 2 * math.pi, size)
    phase = torch.rand(b, 3, 1, 1, generator=g) * 6
    return 0.5 + 0.4 * torch.sin(t.view(1, 1, -1, 1) + phase) * torch.cos(t.view(1, 1, 1, -1) * 2 - phase)


def nparams(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def classifier_logits(convnext: ConvNeXt, img: torch.Tensor, antialias: bool = True) -> torch.Tensor:
    """Logits of images in [0, 1] as the ConvNeXt term takes them: a bilinear resize to 224 px, then the ImageNet
    normalisation."""
    img = F.interpolate(img, size=(224, 224), mode="bilinear", antialias=antialias)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return convnext((img - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))


@pytest.fixture(scope="module")
def full_nets() -> tuple[VGG16Features, ConvNeXt]:
    torch.manual_seed(0)
    return VGG16Features(), ConvNeXt()


def test_vgg16_matches_torchvision_layout(full_nets):
    sd = full_nets[0].state_dict()
    convs = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
    assert set(sd) == {f"features.{i}.{p}" for i in convs for p in ("weight", "bias")}
    assert sd["features.0.weight"].shape == (64, 3, 3, 3)
    assert sd["features.7.weight"].shape == (128, 128, 3, 3)
    assert sd["features.28.weight"].shape == (512, 512, 3, 3) and sd["features.28.bias"].shape == (512,)
    assert nparams(full_nets[0]) == 14_714_688  # torchvision vgg16 minus its classifier


def test_convnext_small_matches_torchvision_layout(full_nets):
    net = full_nets[1]
    sd = net.state_dict()
    expected = {
        "features.0.0.weight": (96, 3, 4, 4),
        "features.0.1.weight": (96,),
        "features.1.0.block.0.weight": (96, 1, 7, 7),
        "features.1.0.block.2.bias": (96,),
        "features.1.0.block.3.weight": (384, 96),
        "features.1.0.block.5.weight": (96, 384),
        "features.1.2.layer_scale": (96, 1, 1),
        "features.2.0.weight": (96,),
        "features.2.1.weight": (192, 96, 2, 2),
        "features.5.26.block.3.bias": (1536,),
        "features.6.1.weight": (768, 384, 2, 2),
        "features.7.2.layer_scale": (768, 1, 1),
        "classifier.0.weight": (768,),
        "classifier.2.weight": (1000, 768),
        "classifier.2.bias": (1000,),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert len(sd) == 344 and not any(k.startswith(("features.8", "features.5.27")) for k in sd)
    assert nparams(net) == 50_223_688  # torchvision's ConvNeXt_Small_Weights num_params
    with torch.no_grad():
        assert net(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def convnext_reference(sd: dict, x: torch.Tensor, depths: tuple[int, ...]) -> torch.Tensor:
    """torchvision's ConvNeXt forward written out with functional ops on its state_dict."""
    def norm(t, prefix):  # LayerNorm over the channels of NCHW, eps 1e-6
        t = F.layer_norm(t.permute(0, 2, 3, 1), (t.shape[1],), sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], 1e-6)
        return t.permute(0, 3, 1, 2)

    x = norm(F.conv2d(x, sd["features.0.0.weight"], sd["features.0.0.bias"], stride=4), "features.0.1")
    for stage, depth in enumerate(depths):
        for j in range(depth):
            p = f"features.{2 * stage + 1}.{j}"
            h = F.conv2d(x, sd[f"{p}.block.0.weight"], sd[f"{p}.block.0.bias"], padding=3, groups=x.shape[1])
            h = norm(h, f"{p}.block.2").permute(0, 2, 3, 1)
            h = F.gelu(F.linear(h, sd[f"{p}.block.3.weight"], sd[f"{p}.block.3.bias"]))
            h = F.linear(h, sd[f"{p}.block.5.weight"], sd[f"{p}.block.5.bias"]).permute(0, 3, 1, 2)
            x = x + sd[f"{p}.layer_scale"] * h
        if stage + 1 < len(depths):
            p = f"features.{2 * stage + 2}"
            x = F.conv2d(norm(x, f"{p}.0"), sd[f"{p}.1.weight"], sd[f"{p}.1.bias"], stride=2)
    pooled = norm(x.mean((2, 3), keepdim=True), "classifier.0").flatten(1)
    return F.linear(pooled, sd["classifier.2.weight"], sd["classifier.2.bias"])


def test_convnext_forward_matches_the_written_out_reference():
    net = small_convnext()
    assert all(torch.equal(b.layer_scale, torch.full_like(b.layer_scale, 1e-6)) for b in net.modules()
               if hasattr(b, "layer_scale"))  # torchvision's initial layer scale
    # eps 1e-6 in every norm: too small a change for the forward's tolerance to see
    assert {m.eps for m in net.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}
    with torch.no_grad():
        for p in net.parameters():  # every parameter random, so every path counts
            p.copy_(torch.randn_like(p) * 0.3)
        x = torch.randn(2, 3, 64, 48)
        torch.testing.assert_close(net(x), convnext_reference(net.state_dict(), x, (1, 1, 1, 1)), rtol=1e-4, atol=1e-5)


def test_lpips_linear_layers_match_the_lpips_vgg_pth():
    sd = LPIPSLinear().state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))
    }


def vgg16_taps_reference(sd: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """torchvision's VGG16 features written out on its state_dict: blocks of 2, 2, 3, 3, 3 conv-ReLUs with a 2x2
    max-pool before each block but the first; the last ReLU of each block is a tap."""
    convs = iter(sorted({int(k.split(".")[1]) for k in sd}))
    taps = []
    for block, n in enumerate((2, 2, 3, 3, 3)):
        x = F.max_pool2d(x, 2) if block else x
        for _ in range(n):
            i = next(convs)
            x = F.relu(F.conv2d(x, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1))
        taps.append(x)
    return taps


def test_vgg_taps_are_relu1_2_to_relu5_3():
    torch.manual_seed(0)
    net = VGG16Features()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        taps = net(x)
        assert [tuple(t.shape[1:]) for t in taps] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]
        assert all(isinstance(net.features[i], torch.nn.ReLU) for i in VGG16_TAPS)
        for t, expected in zip(taps, vgg16_taps_reference(net.state_dict(), x)):
            torch.testing.assert_close(t, expected, rtol=1e-4, atol=1e-5)


def test_layer_norm_2d_normalises_each_pixel_over_the_channels_with_its_eps():
    x = torch.randn(2, 4, 3, 3) * 1e-3  # a variance near eps, so eps shows
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (4,), eps=1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(LayerNorm2d(4, eps=1e-6)(x), expected)


def test_lpips_follows_the_v0_1_formula():
    torch.manual_seed(0)
    lp = LPIPS()
    with torch.no_grad():
        for k in range(5):  # distinct positive channel weights, as trained
            getattr(lp.lin, f"lin{k}").model[1].weight.uniform_(0, 1)
        a, b = images(2, seed=1) * 2 - 1, images(2, seed=2) * 2 - 1
        shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        expected = torch.zeros(2)
        for k, f in enumerate(lp.net((torch.cat([a, b]) - shift) / scale)):
            f = f / (f.norm(dim=1, keepdim=True) + 1e-10)
            w = getattr(lp.lin, f"lin{k}").model[1].weight.view(1, -1, 1, 1)
            expected += ((f[:2] - f[2:]).square() * w).sum(1).mean((1, 2))
        torch.testing.assert_close(lp(a, b), expected)


def test_lpips_is_zero_for_identical_images_symmetric_and_grows_with_corruption():
    torch.manual_seed(0)
    lp = LPIPS().eval().requires_grad_(False)
    x = images(2) * 2 - 1
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    levels = (0.0, 0.05, 0.2, 0.6)
    d = lp(x.repeat(4, 1, 1, 1), torch.cat([x + s * noise for s in levels])).view(4, 2)  # one batched call
    assert torch.all(d[0].abs() < 1e-6)
    assert torch.all(d[1] > 0) and torch.all(d[1] < d[2]) and torch.all(d[2] < d[3])
    swapped = lp(torch.cat([x + noise, x]), torch.cat([x, x + noise])).view(2, 2)
    torch.testing.assert_close(swapped[0], swapped[1])


def test_perceptual_loss_combines_lpips_and_convnext_logits():
    torch.manual_seed(0)
    lpips_only = PerceptualLoss(LPIPS(), small_convnext())
    convnext_only = PerceptualLoss(LPIPS(), small_convnext())
    with torch.no_grad():
        lpips_only.convnext.classifier[2].weight.zero_()  # constant logits
        for p in convnext_only.lpips_vgg.lin.parameters():
            p.zero_()  # LPIPS 0
    pred, target = images(3, seed=4), images(3, seed=5)
    both = (torch.cat([pred, target]), torch.cat([target, target]))
    out_lpips, out_convnext = lpips_only(*both), convnext_only(*both)
    assert out_lpips.shape == out_convnext.shape == (6,)
    assert torch.all(out_lpips[3:].abs() < 1e-6) and torch.all(out_convnext[3:].abs() < 1e-9)
    with torch.no_grad():
        torch.testing.assert_close(out_lpips[:3], lpips_only.lpips_vgg(pred * 2 - 1, target * 2 - 1) / 1.1)

        def logits(img: torch.Tensor) -> torch.Tensor:  # one image at a time
            return classifier_logits(convnext_only.convnext, img[None])[0]

        mse = torch.stack([(logits(p) - logits(t)).square().mean() for p, t in zip(pred, target)])
    assert torch.all(mse > 0)
    torch.testing.assert_close(out_convnext[:3], 0.1 * mse / 1.1, rtol=1e-4, atol=0)


def test_convnext_term_downsamples_with_antialiasing():
    """Images larger than 224 px (the paper's are 256) are shrunk for the classifier with antialiasing (the
    bilinear filter widened to the shrink), as PerceptualLoss resizes; a plain bilinear shrink, which
    skips pixels, gives other logits."""
    torch.manual_seed(0)
    loss = PerceptualLoss(LPIPS(), small_convnext())
    with torch.no_grad():
        for p in loss.lpips_vgg.lin.parameters():
            p.zero_()  # LPIPS 0: the ConvNeXt term alone
    g = torch.Generator().manual_seed(6)
    pred, target = torch.rand(1, 3, 240, 240, generator=g), torch.rand(1, 3, 240, 240, generator=g)

    def term(antialias: bool) -> torch.Tensor:
        logits = classifier_logits(loss.convnext, torch.cat([pred, target]), antialias)
        return 0.1 * (logits[0] - logits[1]).square().mean() / 1.1

    with torch.no_grad():
        out = loss(pred, target)
        torch.testing.assert_close(out, term(antialias=True).view(1), rtol=1e-4, atol=0)
        assert not torch.allclose(out, term(antialias=False).view(1), rtol=1e-3, atol=0)


def test_perceptual_gradients_reach_the_input_not_the_frozen_weights():
    torch.manual_seed(0)
    pl = PerceptualLoss(LPIPS(), small_convnext())
    assert not pl.lpips_vgg.training and not pl.convnext.training
    pred = images(2, seed=6).requires_grad_(True)
    pl(pred, images(2, seed=7)).sum().backward()
    assert pred.grad is not None and pred.grad.isfinite().all() and pred.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in pl.parameters())


def test_sphere_loss_uses_the_perceptual_term():
    torch.manual_seed(0)
    pl = PerceptualLoss(LPIPS(), small_convnext())
    x, y = tiny_batch()
    scales = (torch.full((6,), 0.3), torch.full((6,), 0.1))
    noise = torch.randn(6, 16, 4, generator=torch.Generator().manual_seed(2))
    model = tiny_model()
    total, terms = SphereLoss(model, loss_weights("cifar10"), pl)(x, y, *scales, noise=noise)
    assert terms["recon_perc"] > 0 and terms["pix_con_perc"] > 0
    total.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.decoder.parameters() if p.requires_grad)


def test_sphere_loss_perceptual_terms_match_hand_computation():
    """Both perceptual terms with their own weights; the consistency term's target (the small-noise image) is
    detached, as in the distance term."""
    torch.manual_seed(0)
    pl = PerceptualLoss(LPIPS(), small_convnext())
    x, y = tiny_batch(4)
    big, small = torch.tensor([0.3, 0.9, 1.5, 0.0]), torch.tensor([0.1, 0.0, 0.4, 0.2])
    e = torch.randn(4, 16, 4, generator=torch.Generator().manual_seed(2))
    weights = {"recon_dist": 0.0, "recon_perc": 1.5, "con_dist": 0.0, "con_perc": 0.7, "latent": 0.0}
    hand_model, model = (no_label_dropout(tiny_model(use_latent_consistency=False)) for _ in range(2))
    z = hand_model.encoder(x, y)
    v_big, v_small = (spherify_noise_reference(z, scale, e) for scale in (big, small))
    x_big, x_small = (hand_model.decoder(torch.cat([v_big, v_small]), torch.cat([y, y])) * 0.5 + 0.5).chunk(2)
    hand = 1.5 * pl(x_small, x * 0.5 + 0.5).mean() + 0.7 * pl(x_big, x_small.detach()).mean()
    hand.backward()
    total, terms = SphereLoss(model, loss_weights(weights), pl)(x, y, big, small, e)
    total.backward()
    torch.testing.assert_close(total, hand, rtol=1e-5, atol=1e-7)
    assert set(terms) == {"recon", "pix_con", "recon_perc", "pix_con_perc"}
    for (name, p), hand_p in zip(model.named_parameters(), hand_model.parameters()):
        if hand_p.grad is not None:
            torch.testing.assert_close(p.grad, hand_p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_perceptual_term_runs_in_fp32_under_autocast(monkeypatch):
    # spec: the losses are computed in fp32, so bf16 autocast must not reach the perceptual networks
    pl = PerceptualLoss(LPIPS(), small_convnext())
    seen = []
    forward = PerceptualLoss.forward

    def recording(self, pred, target):
        out = forward(self, pred, target)
        seen.append((torch.is_autocast_enabled("cpu"), pred.dtype, target.dtype, out.dtype))
        return out

    monkeypatch.setattr(PerceptualLoss, "forward", recording)
    x, y = tiny_batch()
    scales = (torch.full((6,), 0.3), torch.full((6,), 0.1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        SphereLoss(tiny_model(), loss_weights("cifar10"), pl)(x, y, *scales, seeds=torch.arange(6))
    assert seen == [(False, torch.float32, torch.float32, torch.float32)] * 2


def test_from_files_round_trips_and_freezes(full_nets, tmp_path):
    vgg, convnext = full_nets
    lin = LPIPSLinear()
    with torch.no_grad():
        for p in lin.parameters():
            p.uniform_(0, 1)
    # a full torchvision vgg16 state_dict also holds the (unused) classifier
    torch.save({**vgg.state_dict(), "classifier.0.weight": torch.zeros(4, 4)}, tmp_path / "vgg16.pth")
    torch.save(lin.state_dict(), tmp_path / "vgg.pth")
    torch.save(convnext.state_dict(), tmp_path / "convnext_small.pth")
    paths = {"vgg16": str(tmp_path / "vgg16.pth"), "lpips": tmp_path / "vgg.pth", "convnext_small": tmp_path / "convnext_small.pth"}
    # a keyword takes precedence over the mapping's entry
    pl = PerceptualLoss.from_files({**paths, "vgg16": tmp_path / "absent.pth"}, vgg16=paths["vgg16"])
    for saved, loaded in ((vgg, pl.lpips_vgg.net), (lin, pl.lpips_vgg.lin), (convnext, pl.convnext)):
        want = saved.state_dict()
        assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items()) and len(want) == len(loaded.state_dict())
    assert all(not p.requires_grad for p in pl.parameters())
    assert not any(m.training for m in pl.train().modules())


def test_from_files_errors_name_the_file_and_keys(tmp_path):
    with pytest.raises(ValueError, match="local weight files"):
        PerceptualLoss.from_files()
    with pytest.raises(ValueError, match="missing \\['convnext_small'\\]"):
        PerceptualLoss.from_files(vgg16="a", lpips="b")
    sd = VGG16Features().state_dict()
    sd["features.1.weight"] = sd.pop("features.0.weight")  # a wrong key
    torch.save(sd, tmp_path / "bad_vgg.pth")
    torch.save(LPIPSLinear().state_dict(), tmp_path / "vgg.pth")
    (tmp_path / "c.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"bad_vgg\.pth.*features\.0\.weight.*features\.1\.weight"):
        PerceptualLoss.from_files(vgg16=tmp_path / "bad_vgg.pth", lpips=tmp_path / "vgg.pth", convnext_small=tmp_path / "c.pth")


def test_load_state_dict_file_rejects_wrong_shapes_and_non_state_dicts(tmp_path):
    net = small_convnext()
    sd = net.state_dict()
    sd["classifier.2.weight"] = torch.zeros(10, 3)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"shape\.pth.*classifier\.2\.weight \(10, 3\) != \(10, 64\)"):
        load_state_dict_file(net, tmp_path / "shape.pth", "convnext")
    torch.save({}, tmp_path / "empty.pth")  # a long key list is cut to its first eight
    cut = r"missing keys \['classifier.0.bias', .*\] and \d+ more, unexpected keys \[\]"
    with pytest.raises(ValueError, match=cut):
        load_state_dict_file(net, tmp_path / "empty.pth", "convnext")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth: expected a state_dict"):
        load_state_dict_file(net, tmp_path / "list.pth", "convnext")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth: not a loadable state_dict"):
        load_state_dict_file(net, tmp_path / "junk.pth", "convnext")
