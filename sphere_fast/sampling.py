"""Few-step sampling (spec section 6): decode a random point of the sphere, then refine with
encode -> noisy re-projection -> decode. Both CFG branches run as one batch of 2B.

``sample`` is the un-captured loop behind ``SphereEncoder.generate``. ``Sampler`` runs the same loop; on CUDA
it captures the whole loop as one CUDA graph per ``GraphKey`` (batch bucket, steps, guidance, cache_noise,
scheduler, dtype, backend, fused MLP) and replays it, with labels, seeds and the CFG weight read from static
device buffers."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal, NoReturn, TypeVar, overload

import torch

from sphere_fast import ops
from sphere_fast._checks import check_int
from sphere_fast._warn import warn
from sphere_fast.backend import active_backend, constant_under_compile, tracing
from sphere_fast.model import (
    Conditioning,
    SphereEncoder,
    check_eval_mode,
    check_flags,
    check_label_range,
    check_model,
    labels_checked,
    representative_blocks,
)
from sphere_fast.nn.layers import fused_mlp_enabled, padded_mlp_weights
from sphere_fast.ops._util import compile_pass, next_pow2
from sphere_fast.ops.labels import seeded_labels
from sphere_fast.ops.philox import check_seeds

logger = logging.getLogger("sphere_fast")
CFG_POSITIONS = ("enc", "dec", "combo")
SAMPLER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FLOAT32_MAX = torch.finfo(torch.float32).max


def check_sampling_args(
    model: SphereEncoder, batch_size: int, cfg: float, cfg_position: str, steps: int,
    steps_name: str = "forward_steps",
) -> None:
    check_int("batch_size", batch_size)
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)):
        raise TypeError(f"cfg must be a number in [1, float32's largest], got {cfg!r}")
    # NaN too; comparisons only, which torch.compile traces on a symbolic cfg. The weight is float32 on the device.
    if not 1 <= cfg <= _FLOAT32_MAX:
        raise ValueError(f"cfg must be a number in [1, float32's largest], got {cfg!r}")
    if cfg > 1 and model.num_classes == 0:  # as the official code: no null branch to guide against
        # the value stays out of the text: each distinct text would add an entry to the caller's warning registry
        warn("cfg > 1 on an unconditional model (num_classes=0) has no effect: it samples without guidance")
    if cfg_position not in CFG_POSITIONS:
        raise ValueError(f"cfg_position must be one of {CFG_POSITIONS}, got {cfg_position!r}")
    check_int(steps_name, steps)


def check_dtype(dtype: object, model: SphereEncoder, required: bool = False) -> None:
    """The dtype ``model``'s networks run in (autocast); None, where not ``required``, runs them as called: in
    their weights' dtype, or an enclosing autocast's. Autocast to one half type cannot run weights of the other."""
    if dtype not in SAMPLER_DTYPES and (required or dtype is not None):
        allowed = SAMPLER_DTYPES if required else (*SAMPLER_DTYPES, None)
        raise TypeError(f"dtype must be one of {allowed}, got {dtype!r}")
    halves = (torch.float16, torch.bfloat16)
    weights = next(model.parameters()).dtype
    if dtype in halves and weights in halves and weights != dtype:
        raise TypeError(f"dtype {dtype} cannot run a model with {weights} weights: pass dtype={weights}, or cast "
                        f"the model to {dtype} or float32")


def to_device_unsynced(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without draining the device's queue. A pageable host tensor is read at once (staged); a
    pinned one would be read when the queue reaches the copy, after the call returned, so that the caller's next
    in-place change of it (a reused buffer of seeds or labels) could reach the images: it is copied here first."""
    if t.device.type == "cpu" and device.type != "cpu" and t.is_pinned():
        t = t.clone()
    return t.to(device, non_blocking=True)


def seeds_on(seeds: object, batch_size: int, device: torch.device) -> torch.Tensor:
    """Per-sample seeds checked as the noise ops check them (int64, shape [batch_size]), on ``device``."""
    return to_device_unsynced(check_seeds(seeds, batch_size), device)


def fresh_seeds(batch_size: int, device: torch.device) -> torch.Tensor:
    """Seeds from torch's generator on ``device`` (so torch.manual_seed makes a run repeatable)."""
    return torch.randint(0, 2**62, (batch_size,), dtype=torch.int64, device=device)


def sample_labels(
    model: SphereEncoder,
    batch_size: int,
    y: torch.Tensor | None,
    device: torch.device,
    name: str = "y",
    seeds: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Given labels (checked; reads them on the host) or uniform random ones: drawn from ``seeds`` ([B] on
    ``device``) when given (``ops.labels.seeded_labels``: one kernel on the fused backends), so that a seed alone
    decides its sample, else from torch's generator. None for an unconditional model. The null label ``num_classes`` is
    taken, as the networks take it: that sample is unconditional (its CFG branches are the same), as a
    CFG-trained model's unconditional samples are drawn."""
    if model.num_classes == 0:
        if y is not None:
            given = name if name == "labels" else f"{name} (labels)"
            raise ValueError(f"{given} given to an unconditional model (num_classes=0)")
        return None
    if y is None:
        if seeds is not None:
            return seeded_labels(seeds, model.num_classes)
        return torch.randint(0, model.num_classes, (batch_size,), device=device)
    if not isinstance(y, torch.Tensor) or y.dtype != torch.long or y.shape != (batch_size,):
        got = f"{y.dtype} of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else _type_name(y)
        wrong_type = not isinstance(y, torch.Tensor) or y.dtype != torch.long
        raise (TypeError if wrong_type else ValueError)(
            f"{name} must be a 1-D int64 tensor of {batch_size} labels, got {got}"
        )
    if not tracing():  # a host read: a graph break under torch.compile (the networks skip it there too)
        check_label_range(y, model.num_classes, name)
    return to_device_unsynced(y, device)


def _type_name(value: object) -> str:
    """A non-tensor's type as an error names it: numpy.int64, not int64 (which reads as the dtype asked for)."""
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def guidance(model: SphereEncoder, cfg: float, cfg_position: str) -> str | None:
    """Where CFG acts: ``cfg_position``, or None when it is off (scale 1 or an unconditional model)."""
    return cfg_position if cfg > 1 and model.num_classes > 0 else None


Weight = TypeVar("Weight", float, torch.Tensor)


def guidance_weight(cfg: Weight, cfg_position: str) -> Weight:
    """The lerp weight of one guided network: a float, or a float64 tensor (the same value, correctly rounded)."""
    # combo guides in both places with sqrt(w) each, to avoid double dipping
    if cfg_position != "combo":
        return cfg
    return cfg.sqrt() if isinstance(cfg, torch.Tensor) else math.sqrt(cfg)


class GuidedNetworks:
    """E and D with classifier-free guidance: the conditional and null branches run as one 2B batch.

    ``guide`` is "enc", "dec", "combo" or None (no CFG); ``weight`` the lerp weight as a float32 device tensor,
    so a captured graph reads it from memory and the scale can change between replays. Each network's AdaLN
    modulations depend only on the labels: they are computed at its first pass and reused by the later ones
    (one object lives for one loop, so weights changed between loops are seen)."""

    def __init__(
        self, model: SphereEncoder, y: torch.Tensor | None, guide: str | None, weight: torch.Tensor | None = None
    ):
        if guide is not None and (y is None or weight is None):
            raise ValueError("CFG needs labels y and a weight tensor")
        self.model = model
        self.y = y
        self.weight = weight
        self.enc_cfg = guide in ("enc", "combo")
        self.dec_cfg = guide in ("dec", "combo")
        self.y2 = torch.cat([y, torch.full_like(y, model.num_classes)]) if guide is not None else None
        self.conditionings: dict[str, Conditioning] = {}

    @classmethod
    def from_scale(
        cls, model: SphereEncoder, y: torch.Tensor | None, cfg: float, cfg_position: str
    ) -> GuidedNetworks:
        guide = guidance(model, cfg, cfg_position)
        weight = None
        if guide is not None:
            # filled on the device (torch.tensor would copy from the host and wait for the queue), in float64 as
            # the Sampler's Python weight; a product, not torch.full: torch.compile keeps a symbolic cfg (a later
            # cfg value then reuses the graph) where it specialised a filled value
            weight = guidance_weight(torch.ones((), dtype=torch.float64, device=y.device) * float(cfg), cfg_position)
            weight = weight.to(torch.float32)
        return cls(model, y, guide, weight)

    def _run(self, name: str, inp: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        net = getattr(self.model, name)
        if name not in self.conditionings:
            self.conditionings[name] = net.conditioning(y)
        return net(inp, y, conditioning=self.conditionings[name])

    def _guided(self, name: str, inp: torch.Tensor) -> torch.Tensor:
        cond, uncond = self._run(name, torch.cat([inp, inp]), self.y2).chunk(2)
        # in float32 (float64 in float64) like torch.lerp with a Python-float weight (opmath), rounded once to the
        # network's dtype
        opmath = torch.promote_types(cond.dtype, torch.float32)
        return torch.lerp(uncond.to(opmath), cond.to(opmath), self.weight).to(cond.dtype)

    def decode(self, v: torch.Tensor) -> torch.Tensor:
        if not self.dec_cfg:
            return self._run("decoder", v, self.y)
        return self._guided("decoder", v).clamp(-1, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enc_cfg:
            return self._run("encoder", x, self.y)
        return self._guided("encoder", x)


class SeededNoise:
    """Noise by the sphere_fast convention: sample b's draws depend only on seeds[b] and the stream
    (0 the initial point, 1 the cached refinement noise, t step t's fresh noise)."""

    def __init__(self, seeds: torch.Tensor, shape: Sequence[int]):
        self.seeds = seeds
        self.shape = tuple(shape)

    def draw(self, stream: int) -> torch.Tensor:
        return ops.sphere_noise(self.seeds, self.shape, stream=stream)

    def perturb(self, z: torch.Tensor, scale: float, stream: int) -> torch.Tensor:
        # the seeds go to the op, so a fused kernel makes the noise in registers
        return ops.spherify_noise(z, scale, seeds=self.seeds, stream=stream)


class DrawnNoise:
    """Explicit draws: ``make(stream)`` runs on a stream's first use and its draw is kept, so the cached
    refinement noise is one draw and draws are made in the order the loop first needs them."""

    def __init__(self, make: Callable[[int], torch.Tensor]):
        self.make = make
        self.draws: dict[int, torch.Tensor] = {}

    def draw(self, stream: int) -> torch.Tensor:
        if stream not in self.draws:
            self.draws[stream] = self.make(stream)
        return self.draws[stream]

    def perturb(self, z: torch.Tensor, scale: float, stream: int) -> torch.Tensor:
        return ops.spherify_noise(z, scale, noise=self.draw(stream).to(z.dtype))


def noise_stream(
    model: SphereEncoder, batch_size: int, device: torch.device, noise: Sequence[torch.Tensor] | None
) -> Iterator[torch.Tensor]:
    """N(0, I) latents [B, N, C]: the recorded draws in order (checked here), else torch's global generator (the
    official order: the initial point drawn on the CPU generator, refinements on the device)."""
    shape = (batch_size, *model.latent_shape[1:])
    if noise is not None:
        return iter(_recorded_draws(noise, shape, device))
    return _generated_draws(shape, device)


def _recorded_draws(noise: Sequence[torch.Tensor], shape: tuple[int, ...], device: torch.device) -> list[torch.Tensor]:
    draws = []
    for i, e in enumerate(noise):
        if not isinstance(e, torch.Tensor) or not e.is_floating_point():
            got = e.dtype if isinstance(e, torch.Tensor) else type(e).__name__
            raise TypeError(f"noise[{i}] must be a floating tensor of N(0, I) draws, got {got}")
        if tuple(e.shape) != shape:
            raise ValueError(f"noise[{i}] must have shape {shape}, got {tuple(e.shape)}")
        draws.append(e.to(device=device, dtype=torch.float32))
    # One host read for all draws, before the loop (a read between network passes waits for the device each
    # time), and of what the loop takes: a float64 value past float32's range is infinite there.
    if draws and not tracing() and not bool(torch.stack([d.isfinite().all() for d in draws]).all()):
        first = next(i for i, d in enumerate(draws) if not bool(d.isfinite().all()))
        raise ValueError(f"noise[{first}] holds NaN or infinite values")
    return draws


def _generated_draws(shape: tuple[int, ...], device: torch.device) -> Iterator[torch.Tensor]:
    yield torch.randn(shape).to(device)
    while True:
        yield torch.randn(shape, device=device)


@constant_under_compile
def _has_autocast(device_type: str) -> bool:
    # a constant under torch.compile: torch 2.11's dynamo cannot trace torch.amp.is_autocast_available
    return torch.amp.is_autocast_available(device_type)


def autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype``; float32 turns off an enclosing autocast (its images, and a graph captured under it,
    would otherwise be the enclosing dtype's), None keeps it. A graph capture needs ``cache=False``: cached
    weight casts would be freed when the context exits while the graph still points at them."""
    if dtype is None or not _has_autocast(device.type):  # no autocast on "meta", say
        return contextlib.nullcontext()
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] -> float32 image in [0, 1]."""
    return (x.float() * 0.5 + 0.5).clamp(0, 1)


def refine(
    model: SphereEncoder,
    nets: GuidedNetworks,
    x: torch.Tensor,
    noise: SeededNoise | DrawnNoise,
    steps: int,
    *,
    scheduler: bool,
    cache_noise: bool,
    noise_scaler: float = 1.0,
) -> Iterator[torch.Tensor]:
    """Steps 1 .. steps-1 from the image x in [-1, 1]: z = E(x), v = f(f(z) + s*r*sigma*e), x = D(v);
    yields each step's image in [-1, 1]."""
    sigma = noise_scaler * model.sigma_max
    for t in range(1, steps):
        r = 1 - t / steps if scheduler else 1.0
        x = nets.decode(noise.perturb(nets.encode(x), r * sigma, stream=1 if cache_noise else t))
        yield x


def run_loop(
    model: SphereEncoder,
    nets: GuidedNetworks,
    noise: SeededNoise | DrawnNoise,
    steps: int,
    *,
    scheduler: bool,
    cache_noise: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling loop from the initial draw; (first-step image, final image) in [0, 1]. The labels were
    checked once by the caller, so the networks skip their per-call check (a host sync each); the padded MLP
    weights of the fused backends are built once for all steps instead of at every network pass. Under
    torch.compile the check is skipped anyway and the context managers are left out of the trace."""
    if tracing():
        return _loop(model, nets, noise, steps, scheduler, cache_noise)
    with labels_checked(), padded_mlp_weights():
        return _loop(model, nets, noise, steps, scheduler, cache_noise)


def _loop(
    model: SphereEncoder, nets: GuidedNetworks, noise: SeededNoise | DrawnNoise, steps: int, scheduler: bool,
    cache_noise: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    # spherify the fp32 draw, then feed the decoder in its weights' dtype (bf16 weights take bf16 input)
    weight_dtype = next(model.decoder.parameters()).dtype
    first = x = nets.decode(model.f(noise.draw(0)).to(weight_dtype))
    for x in refine(model, nets, first, noise, steps, scheduler=scheduler, cache_noise=cache_noise):
        pass
    return to_unit(first), to_unit(x)


@torch.no_grad()
def sample(
    model: SphereEncoder,
    batch_size: int,
    *,
    y: torch.Tensor | None = None,
    cfg: float = 1.0,
    cfg_position: str = "combo",
    steps: int = 1,
    scheduler: bool = False,
    cache_noise: bool = False,
    device: torch.device | str | None = None,
    noise: Sequence[torch.Tensor] | None = None,
    seeds: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The un-captured sampling loop; returns (first-step image, final image) in [0, 1]."""
    check_sampling_args(model, batch_size, cfg, cfg_position, steps)
    check_dtype(dtype, model)
    check_flags(cache_noise=cache_noise, scheduler=scheduler)
    check_eval_mode(model)
    if noise is not None and seeds is not None:
        raise ValueError("give at most one of noise and seeds")
    if noise is not None:
        # the initial point, then one refinement draw a step, or one for all when cached
        needed = 1 + (0 if steps == 1 else 1 if cache_noise else steps - 1)
        if len(noise) != needed:
            raise ValueError(f"noise holds {len(noise)} draws; {steps} steps with cache_noise={cache_noise} take "
                             f"{needed} (the initial point, then the refinement draws)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if seeds is not None:
        seeds = seeds_on(seeds, batch_size, device)
        source: SeededNoise | DrawnNoise = SeededNoise(seeds, model.latent_shape[1:])
    else:
        draws = noise_stream(model, batch_size, device, noise)
        source = DrawnNoise(lambda stream: next(draws))
        source.draw(0)  # the initial point before the random labels, in the official order of draws
    y = sample_labels(model, batch_size, y, device, seeds=seeds)
    nets = GuidedNetworks.from_scale(model, y, cfg, cfg_position)
    with autocast(device, dtype):
        return run_loop(model, nets, source, steps, scheduler=scheduler, cache_noise=cache_noise)


def bucket_for(n: int, batch_size: int) -> int:
    """The padded batch a batch of n runs in: the next power of two, capped at batch_size."""
    if not 1 <= n <= batch_size:
        raise ValueError(f"batch must hold 1 to batch_size={batch_size} samples, got {n}")
    return min(batch_size, next_pow2(n))


def cuda_graphs_usable(device: torch.device) -> bool:
    """Whether the sampling loop can be captured on ``device``: CUDA only (tests/cuda_graph_emulator.py swaps
    this out to run the capture path on CPU)."""
    return device.type == "cuda"


@dataclass(frozen=True)
class GraphKey:
    """What a captured loop is specialised on (everything else is read from its static buffers)."""

    bucket: int
    steps: int
    guide: str | None
    cache_noise: bool
    scheduler: bool
    dtype: torch.dtype
    backend: str  # the requested backend (sphere_fast.use_backend): a graph holds the kernels it captured
    fused_mlp: bool = False  # nn.layers.fused_mlp_enabled(), for the same reason


def _representative_loop(
    sampler: Sampler, key: GraphKey, labels: torch.Tensor | None, seeds: torch.Tensor, weight: torch.Tensor | None
) -> None:
    """The loop at two steps (the decoder, then the encoder and the noise), each network running its first and
    last blocks: every kernel launch of the whole loop, for arguments like its own, at a fraction of its cost."""
    with representative_blocks():
        sampler.loop(replace(key, steps=min(key.steps, 2)), labels, seeds, weight, capture=True)


def _compile_ahead(
    sampler: Sampler, key: GraphKey, labels: torch.Tensor | None, seeds: torch.Tensor, weight: torch.Tensor | None
) -> None:
    """The loop once in a compile pass, which builds all its Triton kernels at once: with empty kernel caches
    they would otherwise compile one after another as the warm-up reaches them. Only a speed-up: if the pass
    fails, the warm-up compiles the kernels (and raises any error of the loop's)."""
    try:
        with compile_pass():
            _representative_loop(sampler, key, labels, seeds, weight)
    except Exception as exc:
        logger.warning("sphere_fast: compiling the sampling loop's kernels ahead failed (%r); they compile at "
                       "their first launches", exc)


class _PhaseClock:
    """Seconds of the phases of a capture, each ended by ``lap(name)``, which waits for ``stream``'s queued
    work first so that the GPU's share lands in the phase that queued it (work queued before: in none)."""

    def __init__(self, stream: torch.cuda.Stream):
        self.stream = stream
        self.seconds: dict[str, float] = {}
        stream.synchronize()
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        self.stream.synchronize()
        now = time.perf_counter()
        self.seconds[name] = now - self._last
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{name} {s:.2f} s" for name, s in self.seconds.items())


class _CapturedLoop:
    """One sampling loop captured as a CUDA graph, with static labels, seeds and CFG weight in and the
    (first, final) images of its whole bucket out. Where its capture's time went is logged (INFO), with the
    seconds per phase in the record's ``capture_seconds``."""

    def __init__(self, sampler: Sampler, key: GraphKey, pool: torch.cuda._POOL_HANDLE | None, compile_first: bool):
        device = sampler.device
        # Normal tensors even under torch.inference_mode: each call writes them, in that mode or out of it.
        with torch.inference_mode(False):
            conditional = sampler.model.num_classes > 0
            self.labels = torch.zeros(key.bucket, dtype=torch.long, device=device) if conditional else None
            self.seeds = torch.zeros(key.bucket, dtype=torch.int64, device=device)
            self.weight = torch.ones((), dtype=torch.float32, device=device)
        weight = self.weight if key.guide is not None else None
        # Warm-up on a side stream, of the representative loop (every launch of the loop, a fraction of its
        # work): Triton autotuning, lazy initialisation and cuBLAS workspaces happen here, not in the capture.
        # The capture runs on that stream too: torch's default capture stream belongs to whichever device was
        # current when it was first made.
        with torch.cuda.device(device):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream())
            clock = _PhaseClock(side)
            with torch.cuda.stream(side):
                if compile_first:
                    _compile_ahead(sampler, key, self.labels, self.seeds, weight)
                    clock.lap("compile pass")
                _representative_loop(sampler, key, self.labels, self.seeds, weight)
                if conditional:  # the kernel a seeded call without labels runs before its replay: compiled here
                    seeded_labels(self.seeds, sampler.model.num_classes)
                clock.lap("warm-up")
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool, stream=side):
                self.first, self.final = sampler.loop(key, self.labels, self.seeds, weight, capture=True)
            clock.lap("capture")
        logger.info("sphere_fast: captured the sampling loop %s: %s", key, clock,
                    extra={"capture_seconds": clock.seconds})

    def __call__(
        self, labels: torch.Tensor | None, seeds: torch.Tensor, weight: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the static outputs: the next replay of any graph in the shared pool may rewrite them."""
        # Rows past n keep earlier valid values: each sample is computed independently, so they only pad.
        n = seeds.shape[0]
        self.seeds[:n].copy_(seeds, non_blocking=True)
        if labels is not None:
            self.labels[:n].copy_(labels, non_blocking=True)
        self.weight.fill_(weight)
        self.graph.replay()
        return self.first[:n], self.final[:n]


class Sampler:
    """Batch sampler: ``sampler(labels=None, seeds=None, return_first=False)`` gives the final images
    [B, 3, H, W] in [0, 1] (and, with ``return_first``, ``(first, final)`` like ``generate``).

    Seeds None means fresh ones; labels None means uniform random ones, drawn from the seeds where seeds are given
    (so that the same seeds give the same images; one kernel on the fused backends), else from torch's generator
    as the fresh seeds are; B is the length of labels or seeds, else ``batch_size``; labels on the device are
    range-checked on the host (one sync). A sample's image
    depends only on its seed, label and the options (steps, cfg, cfg_position, cache_noise, scheduler, dtype),
    up to float rounding (the sphere_fast noise convention). The defaults are the paper's evaluation's: cached
    noise and bf16 (``generate``'s are the official ``generate``'s: fresh draws, the weights' dtype; its names
    for the same options: ``y`` for labels, ``forward_steps``, ``cache_sampling_noise``, ``use_sampling_scheduler``,
    the edits use the Sampler's). ``steps``,
    ``cfg``, ``cfg_position``, ``cache_noise``, ``scheduler`` and ``dtype`` may be changed between calls. On CUDA with
    ``cuda_graph`` the loop is captured once per ``GraphKey`` (batches padded to power-of-two buckets, all
    graphs in one memory pool) and replayed; elsewhere it runs un-captured. ``prepare(n)`` captures ahead
    of the first call. For speed pass a model already cast to ``dtype`` (a capture of float32 weights in a half
    dtype warns: the graph casts them at each network pass). A graph reads the model's parameters
    and buffers where they were at its capture: in-place updates (``load_state_dict``, an optimizer step)
    reach the next replay; tensors moved or replaced since (``model.to(...)``, ``p.data = ...``,
    ``load_state_dict(assign=True)``) and a changed ``noise_sigma_max_angle`` are found at the next call, which
    captures again. Submodules replaced by new objects are not found: make a new Sampler then."""

    model: SphereEncoder
    use_graphs: bool

    def __init__(
        self,
        model: SphereEncoder,
        batch_size: int,
        steps: int,
        cfg: float = 1.0,
        cfg_position: str = "combo",
        cache_noise: bool = True,
        scheduler: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        cuda_graph: bool = True,
    ):
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {cuda_graph!r}")
        self.model = check_model(model)
        self.cuda_graph = cuda_graph
        self.batch_size = batch_size
        self.steps = steps
        self.cfg = cfg
        self.cfg_position = cfg_position
        self.cache_noise = cache_noise
        self.scheduler = scheduler
        self.dtype = dtype
        self.device: torch.device | None = None
        self._graphs: dict[GraphKey, _CapturedLoop] = {}
        # one capture or replay at a time: the graphs' input and output buffers are the Sampler's, shared by threads
        self._lock = threading.Lock()
        # the model's parameter and buffer slots, and what the graphs read from the model outside their key
        self._slots: list[dict[str, torch.Tensor | None]] = []
        self._captured_state: tuple[float, list[int]] | None = None
        self._check_settings()

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("a Sampler cannot be copied or pickled: it holds captured CUDA graphs, their memory pool and "
                        "a lock. Make a new Sampler(model, ...), of a copy of the model if need be")

    def _check_settings(self) -> None:
        """The settings and the model, checked at construction and at each call (they may change in between);
        a model moved to another device takes the sampler with it."""
        check_sampling_args(self.model, self.batch_size, self.cfg, self.cfg_position, self.steps, steps_name="steps")
        check_dtype(self.dtype, self.model, required=True)
        check_flags(cache_noise=self.cache_noise, scheduler=self.scheduler)
        check_eval_mode(self.model)
        device = next(self.model.parameters()).device
        if device != self.device:
            self.device = device
            self.use_graphs = self.cuda_graph and cuda_graphs_usable(device)
            self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
            self._graphs.clear()

    def _model_state(self) -> tuple[float, list[int]]:
        """What the graphs read from the model outside their key: its noise level (a constant of the loop) and
        where each parameter and buffer is, looked up in its modules' slots so that a tensor replaced by a new
        object is found too (~0.2 us a tensor)."""
        return self.model.sigma_max, [t.data_ptr() for slots in self._slots for t in slots.values() if t is not None]

    @property
    def graph_keys(self) -> tuple[GraphKey, ...]:
        """The loops captured so far, in capture order."""
        return tuple(self._graphs)

    def clear(self) -> None:
        """Drop the captured loops and the memory they hold (each keeps its bucket's float32 first-step and final
        images, 1.5 MiB a sample at 256 px, and its graph) for torch's allocator (``torch.cuda.empty_cache()``
        returns it to the device); a later call captures again. A Sampler keeps one loop per bucket and settings
        it has run (``GraphKey``: steps, cfg on or off, its position, cached noise, scheduler, dtype, backend,
        fused MLP)."""
        with self._lock:
            self._graphs.clear()

    def loop(
        self,
        key: GraphKey,
        labels: torch.Tensor | None,
        seeds: torch.Tensor,
        weight: torch.Tensor | None,
        capture: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loop for ``key`` on device tensors: the body of every graph and the un-captured path."""
        nets = GuidedNetworks(self.model, labels, key.guide, weight)
        noise = SeededNoise(seeds, self.model.latent_shape[1:])
        with autocast(self.device, key.dtype, cache=not capture):
            return run_loop(self.model, nets, noise, key.steps, scheduler=key.scheduler, cache_noise=key.cache_noise)

    def _batch_length(self, labels: object, seeds: object) -> int:
        given = (("labels", labels), ("seeds", seeds))
        sizes = {name: t.shape[0] for name, t in given if isinstance(t, torch.Tensor) and t.ndim >= 1}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"labels and seeds must have the same length, got {sizes}")
        n = next(iter(sizes.values()), self.batch_size)
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"labels/seeds must hold 1 to batch_size={self.batch_size} samples, got {n}")
        return n

    def _key(self, n: int) -> GraphKey:
        guide = guidance(self.model, self.cfg, self.cfg_position)
        bucket = bucket_for(n, self.batch_size) if self.use_graphs else n
        return GraphKey(bucket, self.steps, guide, self.cache_noise, self.scheduler, self.dtype, active_backend(),
                        fused_mlp_enabled())

    def _captured(self, key: GraphKey) -> _CapturedLoop:
        if self._graphs and self._model_state() != self._captured_state:
            logger.info("sphere_fast: the model's tensors or noise level changed since the capture: capturing its "
                        "loops again")
            self._graphs.clear()
        if not self._graphs:  # the first capture, or the graphs were dropped: the model as it is now
            self._slots = [slots for module in self.model.modules() for slots in (module._parameters, module._buffers)
                           if slots]
            self._captured_state = self._model_state()
        if key not in self._graphs:
            weights = next(self.model.parameters()).dtype
            if weights == torch.float32 and key.dtype != torch.float32:
                warn(f"the model's weights are float32 and the Sampler runs {key.dtype}: a captured loop casts every "
                     "weight again at each network pass (autocast keeps no cast copies in a CUDA graph); for speed "
                     f"cast the model once, model.to({key.dtype})")
            # The sampler's first capture compiles its kernels first; later buckets share nearly all of them.
            compile_first = not self._graphs and key.backend in ("auto", "triton")
            self._graphs[key] = _CapturedLoop(self, key, self._pool, compile_first)
        return self._graphs[key]

    @torch.no_grad()
    def prepare(self, n: int | None = None) -> GraphKey | None:
        """Capture now the loop a call with ``n`` samples (default ``batch_size``) and the current settings
        will replay, so that the first such call is fast (a server warms up this way). Returns its key, or
        None where the loop runs un-captured (CPU, or ``cuda_graph=False``)."""
        self._check_settings()
        n = self.batch_size if n is None else n
        check_int("n", n)
        bucket_for(n, self.batch_size)  # refuses n > batch_size also where nothing is captured
        if not self.use_graphs:
            return None
        key = self._key(n)
        with self._lock:
            self._captured(key)
        return key

    # The result's type follows return_first, so that a type checker takes plain calls' images as a Tensor.
    @overload
    def __call__(self, labels: torch.Tensor | None = None, seeds: torch.Tensor | None = None,
                 return_first: Literal[False] = False, clone: bool = True) -> torch.Tensor: ...

    @overload
    def __call__(self, labels: torch.Tensor | None, seeds: torch.Tensor | None, return_first: Literal[True],
                 clone: bool = True) -> tuple[torch.Tensor, torch.Tensor]: ...

    @overload
    def __call__(self, labels: torch.Tensor | None = None, seeds: torch.Tensor | None = None, *,
                 return_first: Literal[True], clone: bool = True) -> tuple[torch.Tensor, torch.Tensor]: ...

    @overload
    def __call__(self, labels: torch.Tensor | None = None, seeds: torch.Tensor | None = None,
                 return_first: bool = False, clone: bool = True
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...

    @torch.no_grad()
    def __call__(
        self,
        labels: torch.Tensor | None = None,
        seeds: torch.Tensor | None = None,
        return_first: bool = False,
        clone: bool = True,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Images for ``labels`` / ``seeds`` (see the class docstring). ``clone=False`` returns views of a
        captured graph's output buffers instead of copies: no copy, but valid only until the next call (of any
        thread: threads may share a Sampler, whose captures and replays take turns)."""
        check_flags(return_first=return_first, clone=clone)
        self._check_settings()
        n = self._batch_length(labels, seeds)
        seeds = None if seeds is None else seeds_on(seeds, n, self.device)
        labels = sample_labels(self.model, n, labels, self.device, name="labels", seeds=seeds)
        seeds = fresh_seeds(n, self.device) if seeds is None else seeds
        key = self._key(n)
        weight = guidance_weight(self.cfg, self.cfg_position)
        if not self.use_graphs:
            w = torch.full((), weight, dtype=torch.float32, device=self.device) if key.guide is not None else None
            first, final = self.loop(key, labels, seeds, w)
            return (first, final) if return_first else final
        with self._lock:
            first, final = self._captured(key)(labels, seeds, weight)
            if clone:  # copy only what is returned
                final = final.clone()
                first = first.clone() if return_first else first
        return (first, final) if return_first else final
