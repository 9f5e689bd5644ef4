import pytest
import torch

import sphere_fast
from sphere_fast import SphereEncoder

TOL = 5e-5


@pytest.fixture(scope="module")
def golden(reference):
    return torch.load(reference / "golden" / "tiny_cond_linear.pt", weights_only=True)


@pytest.fixture(scope="module")
def model(golden):
    m = SphereEncoder(**golden["config"]).eval()
    m.load_state_dict(golden["state_dict"], strict=True)
    return m


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_init_position_embeddings_are_the_official(golden):
    """The golden state_dict keeps the official fixed sin-cos embeddings (frozen, never perturbed): a model built
    from the same config must start with them exactly."""
    fresh = SphereEncoder(**golden["config"])
    for key in ("encoder.pos_embed", "decoder.pos_embed"):
        assert torch.equal(fresh.state_dict()[key], golden["state_dict"][key]), key


def test_forward_parity(model, golden):
    c = golden["cases"]["forward"]
    with torch.no_grad():
        z = model.encoder(c["x"], c["y"])
        assert max_err(z, c["z"]) < TOL
        v = model.f(c["z"])
        assert max_err(v, c["v"]) < TOL
        noisy = torch.where(c["r"] == 0, c["v"], model.f(c["v"] + c["r"] * c["sigma"] * c["e"]))
        assert max_err(noisy, c["v_noisy"]) < TOL
        x = model.decoder(c["v_noisy"], c["y"])
        assert max_err(x, c["x_dec"]) < TOL


@pytest.mark.parametrize("route", ["to_empty", "assign"])
def test_a_model_built_on_meta_loads_the_golden_weights(golden, route):
    """The route to big checkpoints without two copies in memory: build on the meta device, then to_empty +
    load_state_dict, or load_state_dict(assign=True). No checkpoint holds the RoPE table: it must be rebuilt (it was
    left uninitialised, or on meta)."""
    with torch.device("meta"):
        m = SphereEncoder(**golden["config"]).eval()
    if route == "to_empty":
        m.to_empty(device="cpu").load_state_dict(golden["state_dict"])
    else:
        m.load_state_dict(golden["state_dict"], assign=True)
    reference = SphereEncoder(**golden["config"])
    for vit, expected in ((m.encoder, reference.encoder), (m.decoder, reference.decoder)):
        assert vit.rope.device.type == "cpu" and torch.equal(vit.rope, expected.rope)
    c = golden["cases"]["forward"]
    with torch.no_grad():
        assert max_err(m.encoder(c["x"], c["y"]), c["z"]) < TOL
        assert max_err(m.decoder(c["v_noisy"], c["y"]), c["x_dec"]) < TOL


def test_reconstruct_parity(model, golden):
    c = golden["cases"]["reconstruct"]
    assert max_err(model.reconstruct(c["x"]), c["out"]) < TOL


def test_generate_parity(model, golden):
    for case in golden["cases"]["generate"]:
        first, out = model.generate(
            case["y"].shape[0], y=case["y"], cfg=case["cfg"], cfg_position=case["cfg_position"],
            forward_steps=case["steps"], cache_sampling_noise=case["cache_noise"], noise=case["noise_draws"],
        )
        label = {k: case[k] for k in ("steps", "cfg_position", "cache_noise")}
        assert max_err(first, case["first"]) < TOL, label
        assert max_err(out, case["out"]) < TOL, label


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_forward_parity_on_fused_backends(model, golden, backend):
    """The same weights through the fused kernels (C++ CPU implementation; Triton in the interpreter)."""
    if backend not in sphere_fast.available_backends("cpu"):
        pytest.skip(f"{backend} backend not available on this machine")
    c = golden["cases"]["forward"]
    with sphere_fast.use_backend(backend), torch.no_grad():
        assert max_err(model.encoder(c["x"], c["y"]), c["z"]) < TOL
        assert max_err(model.decoder(c["v_noisy"], c["y"]), c["x_dec"]) < TOL


def test_generate_parity_on_cpp_backend(model, golden):
    if "cpp" not in sphere_fast.available_backends("cpu"):
        pytest.skip("cpp backend not available on this machine")
    case = golden["cases"]["generate"][-1]
    with sphere_fast.use_backend("cpp"):
        first, out = model.generate(
            case["y"].shape[0], y=case["y"], cfg=case["cfg"], cfg_position=case["cfg_position"],
            forward_steps=case["steps"], cache_sampling_noise=case["cache_noise"], noise=case["noise_draws"],
        )
    assert max_err(first, case["first"]) < TOL
    assert max_err(out, case["out"]) < TOL
