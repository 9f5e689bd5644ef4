"""A plain, unfused transcription of spec section 5 as functions of a state_dict.

It shares no code with sphere_fast: it checks the fused op chain of sphere_fast's model on configs the
golden data does not cover (unconditional, conv head, no mixer, affine-free mixer, spherified blocks,
other resolutions). The golden data itself checks this file's linear-head conditional path."""

import math

import torch
import torch.nn.functional as F


def rms(x, w=None, eps=1e-6):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def lin(sd, name, x):
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def mixer(sd, p, x, depth):
    for i in range(depth):
        b = f"{p}.blocks.{i}"
        t = rms(x, sd[b + ".norm1.weight"]).transpose(1, 2)
        t = lin(sd, b + ".tok_mixer.mix.2", F.silu(lin(sd, b + ".tok_mixer.mix.0", t))).transpose(1, 2)
        x = x + sd[b + ".alpha1"] * t
        c = lin(sd, b + ".chn_mixer.mix.2", F.silu(lin(sd, b + ".chn_mixer.mix.0", rms(x, sd[b + ".norm2.weight"]))))
        x = x + sd[b + ".alpha2"] * c
    return rms(x, sd.get(p + ".norm.weight"))


def rope_table(d, g):
    half = d // 2
    fr = 1.0 / 10000 ** (torch.arange(0, half, 2).float() / half)
    fr = torch.stack([fr, fr], -1).flatten()
    rows = torch.arange(g).float().repeat_interleave(g)
    cols = torch.arange(g).float().repeat(g)
    ang = torch.cat([rows[:, None] * fr, cols[:, None] * fr], -1)
    return ang.cos(), ang.sin()


def rope(x, cos, sin):
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rot = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(x.shape)
    return x * cos + rot * sin


def vit(sd, p, kind, cfg, x, y, heads, layers, spherify_blocks=False):
    mix_depth = cfg["vit_enc_latent_mlp_mixer_depth" if kind == "encoder" else "vit_dec_latent_mlp_mixer_depth"]
    cond = cfg["num_classes"] > 0
    c = sd[p + ".y_embedder.embedding_table.weight"][y][:, None] if cond else None
    if kind == "encoder":
        x = F.conv2d(x, sd[p + ".x_embedder.0.weight"], stride=cfg["patch_size"])
        x = F.conv2d(x, sd[p + ".x_embedder.1.weight"], sd[p + ".x_embedder.1.bias"]).flatten(2).transpose(1, 2)
    elif mix_depth:
        x = mixer(sd, p + ".x_embedder.1", lin(sd, p + ".x_embedder.0", x), mix_depth)
    else:
        x = lin(sd, p + ".x_embedder", x)
    x = x + sd[p + ".pos_embed"]
    B, N, W = x.shape
    d = W // heads
    cos, sin = rope_table(d, int(math.isqrt(N)))
    for i in range(layers):
        b = f"{p}.blocks.{i}"
        if cond:
            s1, c1, g1, s2, c2, g2 = lin(sd, b + ".adaLN_modulation.1", F.silu(c)).chunk(6, -1)
        else:
            s1 = c1 = s2 = c2 = torch.zeros(())
            g1 = g2 = torch.ones(())
        h = rms(x, sd[b + ".norm1.weight"]) * (1 + c1) + s1
        q, k, v = lin(sd, b + ".attn.qkv", h).reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4)
        att = torch.softmax(rope(q, cos, sin) @ rope(k, cos, sin).transpose(-1, -2) / math.sqrt(d), -1) @ v
        x = x + g1 * lin(sd, b + ".attn.proj", att.transpose(1, 2).reshape(B, N, W))
        h = lin(sd, b + ".mlp.w12", rms(x, sd[b + ".norm2.weight"]) * (1 + c2) + s2)
        a, gate_in = h.chunk(2, -1)
        x = x + g2 * lin(sd, b + ".mlp.w3", F.silu(a) * gate_in)
        if spherify_blocks and i < layers - 1:
            x = x * torch.rsqrt(x.pow(2).mean((1, 2), keepdim=True) + 1e-6)
    if cond:
        sh, sc = lin(sd, p + ".ffn.adaLN_modulation.1", F.silu(c)).chunk(2, -1)
        x = rms(x, sd[p + ".ffn.norm.weight"]) * (1 + sc) + sh
    x = lin(sd, p + ".ffn.linear", x)
    if kind == "encoder":
        return mixer(sd, p + ".out", x, mix_depth) if mix_depth else x
    g, P = int(math.isqrt(N)), cfg["patch_size"]
    if cfg["pixel_head_type"] == "linear":
        img = x.reshape(B, g, g, 3, P, P).permute(0, 3, 1, 4, 2, 5).reshape(B, 3, g * P, g * P)
        img = F.conv2d(F.pad(img, (1, 1, 1, 1), mode="reflect"), sd[p + ".out.2.weight"], sd[p + ".out.2.bias"])
    else:
        img = x.transpose(1, 2).reshape(B, 32, g, g)
        img = F.conv2d(F.pad(img, (1, 1, 1, 1), mode="reflect"), sd[p + ".out.2.weight"], sd[p + ".out.2.bias"])
        img = F.conv_transpose2d(F.silu(img), sd[p + ".out.4.weight"], sd[p + ".out.4.bias"], stride=P, padding=1)
    return torch.tanh(img)
