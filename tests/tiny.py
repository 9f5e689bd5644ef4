"""Shared tiny configuration for the training, checkpoint, CLI and distributed tests."""

from __future__ import annotations

from typing import Any

import torch

from sphere_fast import SphereEncoder
from sphere_fast.cli import TRAIN_PRESETS

TINY_SIZE = {"width": 32, "layers": 1, "heads": 2}
# the tiny model with two blocks a network: a block between the first and the head (FSDP per block, block wrappers)
TWO_LAYERS = {"vit_enc_model_size": {**TINY_SIZE, "layers": 2}, "vit_dec_model_size": {**TINY_SIZE, "layers": 2}}
# The README demo's model (every loss term and head type on), shrunk to 16 px and one layer per network.
TINY_CONFIG: dict[str, Any] = {
    **TRAIN_PRESETS["fashion-mnist-demo"]["model"],
    "input_size": 16,
    "vit_enc_model_size": TINY_SIZE,
    "vit_dec_model_size": TINY_SIZE,
    "vit_enc_latent_mlp_mixer_depth": 1,
    "vit_dec_latent_mlp_mixer_depth": 1,
}
NO_PERCEPTUAL = {"recon_dist": 2.0, "recon_perc": 0.0, "con_dist": 3.0, "con_perc": 0.0, "latent": 0.7}


def tiny_model(seed: int = 0, **overrides: Any) -> SphereEncoder:
    """A tiny model whose zero-initialised layers are perturbed, so every path carries gradient."""
    torch.manual_seed(seed)
    model = SphereEncoder(**{**TINY_CONFIG, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return model


def tiny_batch(batch: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, 16, 16, generator=g) * 2 - 1, torch.randint(0, 10, (batch,), generator=g)


def no_label_dropout(model: SphereEncoder) -> SphereEncoder:
    """Label dropout draws from the global RNG per call; tests comparing runs switch it off."""
    for vit in (model.encoder, model.decoder):
        if vit.y_embedder is not None:
            vit.y_embedder.dropout_prob = 0.0
    return model
