"""The two frozen networks of the perceptual loss (spec section 4), in plain torch with the parameter names
of the public checkpoints, so their state_dicts load as they are:

- ``VGG16Features``: torchvision's ``vgg16().features`` (keys ``features.{i}.weight/bias``);
- ``LPIPSLinear``: the ``lpips`` package's (v0.1) per-tap 1x1 weights, its ``vgg.pth`` (``lin{k}.model.1.weight``);
- ``LPIPS``: the LPIPS-VGG16 distance built from the two;
- ``ConvNeXt``: torchvision's ``convnext_small`` (keys ``features.*``, ``classifier.*``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# torchvision's VGG16 configuration "D": conv widths, "M" a 2x2 max-pool
_VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# indices in ``features`` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: the LPIPS taps
VGG16_TAPS: tuple[int, ...] = (3, 8, 15, 22, 29)
LPIPS_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)


class VGG16Features(nn.Module):
    """torchvision's ``vgg16().features``; forward returns the five LPIPS taps."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                c_in = int(v)
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.features[: VGG16_TAPS[-1] + 1]):  # the last max-pool is unused
            x = layer(x)
            if i in VGG16_TAPS:
                taps.append(x)
        return taps


class _NetLin(nn.Module):
    """lpips's NetLinLayer: ``model.0`` is its dropout (inactive in eval, a placeholder here), ``model.1``
    the 1x1 conv without bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))
        # ones until loaded: the uncalibrated LPIPS baseline (plain channel sum), a non-negative distance
        nn.init.ones_(self.model[1].weight)


class LPIPSLinear(nn.Module):
    """The learned per-tap channel weights ``lin{k}.model.1.weight`` [1, C_k, 1, 1]: lpips's ``vgg.pth``."""

    def __init__(self) -> None:
        super().__init__()
        for k, c in enumerate(LPIPS_CHANNELS):
            self.add_module(f"lin{k}", _NetLin(c))

    def forward(self, k: int, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"lin{k}").model(x)


class LPIPS(nn.Module):
    """LPIPS-VGG16 v0.1 distance [B] between images in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.net = VGG16Features()
        self.lin = LPIPSLinear()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def forward(self, in0: torch.Tensor, in1: torch.Tensor) -> torch.Tensor:
        b = in0.shape[0]
        taps = self.net((torch.cat([in0, in1]) - self.shift) / self.scale)  # one pass over both images
        dist = in0.new_zeros(b)
        for k, f in enumerate(taps):
            # unit length over channels; vector_norm's gradient is 0, not NaN, where a tap is all zero
            f = f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + 1e-10)
            dist = dist + self.lin(k, (f[:b] - f[b:]).square()).mean((1, 2, 3))
        return dist


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _Permute(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class CNBlock(nn.Module):
    """ConvNeXt block: x + layer_scale * (dwconv 7x7 -> LayerNorm -> Linear 4C -> GELU -> Linear C); the
    ``block`` indices match torchvision's (1 and 6 are the permutes). No stochastic depth: eval only."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim),
            _Permute(0, 2, 3, 1),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            _Permute(0, 3, 1, 2),
        )
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * self.block(x)


class ConvNeXt(nn.Module):
    """torchvision's ConvNeXt classifier; the defaults are ``convnext_small`` (50,223,688 parameters).
    Takes ImageNet-normalised images, returns logits [B, num_classes]."""

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 27, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))]
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            layers.append(nn.Sequential(*[CNBlock(dim) for _ in range(depth)]))
            if i + 1 < len(dims):  # downsample between stages
                layers.append(nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, dims[i + 1], 2, stride=2)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3), keepdim=True))


def load_state_dict_file(
    module: nn.Module, path: str | os.PathLike, what: str, ignore_prefixes: tuple[str, ...] = ()
) -> None:
    """Load ``path`` into ``module`` strictly, keys starting with ``ignore_prefixes`` dropped first; a
    ValueError names the file and the missing, unexpected or mis-shaped keys."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{what} weights {path}: not a loadable state_dict ({e})") from e
    if not isinstance(state, Mapping):
        raise ValueError(f"{what} weights {path}: expected a state_dict, got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {_shape(state[k])} != {_shape(v)}"
        for k, v in expected.items()
        if k in state and _shape(state[k]) != _shape(v)
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{what} weights {path} do not match the expected {what} state_dict: missing keys {_few(missing)}, "
            f"unexpected keys {_few(unexpected)}, shape mismatches {_few(shapes)}"
        )
    module.load_state_dict(state)


def _shape(t: object) -> tuple[int, ...] | str:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _few(keys: list[str]) -> str:
    return f"{keys[:8]}" + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
