"""Sampling benchmark (issue 6): latency and images/s of the whole few-step loop, and time to first image.

Models sphere-l-imagenet and sphere-xl-imagenet (random weights under which the label matters, cast to bf16) at
batch 1, 8, 64, 256, steps 1, 2, 4, without CFG and with combo CFG 1.4, for five implementations of the same loop
and seeds, each gated against the eager loop's images first (check_images):
  eager       the official generate() loop on sphere_fast's "eager" backend (its noise one kernel a draw; as
              sphere_fast runs it, each network's AdaLN modulations once a loop, not once a pass)
  compile     that loop under torch.compile(mode="max-autotune", fullgraph=True) (inductor's own CUDA graphs)
  compile_networks
              the eager loop with each network's forward under torch.compile(mode="max-autotune", fullgraph=True),
              as most users apply it: a graph per network (two to compile; the whole 4-step loop has seven passes)
  uncaptured  sphere_fast.Sampler(cuda_graph=False) on the best backend
  graph       sphere_fast.Sampler: the loop captured as one CUDA graph per bucket and replayed
Each row's model FLOP utilisation (% of matmul) divides the spec's FLOPs (decoder / encoder pass per image at
batch 1: L 671 / 623 GFLOP, XL 977 / 918 GFLOP; T*D + (T-1)*E passes, doubled by combo CFG) by the time,
against the bf16 matmul rate measured in the same run. The spec's FLOPs are the matmuls with weights and the
convolutions: the attention's two products (4 N^2 W a layer, 103 GFLOP a Sphere-L pass, 135 for XL) are not
counted, as the issue defines the utilisation (tests/test_benchmark_harness.py checks the counts).
Time to first image runs each implementation in a fresh process (start-up and imports, CUDA initialisation,
model build on the device, first call, synchronize) from the parent's clock, and records each stage (the
imports of torch and sphere_fast from -X importtime; for the graph, the phases of its capture in the first
call: compile pass, warm-up, capture). It runs with Triton's and inductor's on-disk kernel caches and
sphere_fast's stored tuning choices in a folder of its own, either empty (a machine's first run: every kernel
compiles) or warm (filled by an untimed run first: every later process), and for the graph also warm without
stored choices (every tuned kernel timed again).
Smoke mode (CPU): a tiny float32 model, batch 1 and 2, one call per case.

The full grid takes long on a GPU (every compile case is a max-autotune compile); select rows with -k,
e.g. ``-k "graph and b64"``. The compile and cold-start rows are marked slow.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from benchmarks import grids
from benchmarks.harness import (
    DEVICE,
    SMOKE,
    PeakMemory,
    Timing,
    compile_counts,
    counts_grown,
    cuda_time_ms,
    pick,
    record,
    timed_with_clocks,
)
from sphere_fast import SphereEncoder, ops, sampling, use_backend
from sphere_fast.nn.layers import xavier_uniform_flat_
from sphere_fast.sampling import GraphKey, Sampler, guidance, guidance_weight

ROOT = Path(__file__).resolve().parents[1]
MODELS = pick(real=list(grids.SAMPLER_MODELS), smoke=["tiny"])
BATCHES = pick(real=list(grids.SAMPLER_BATCHES), smoke=[2])
STEPS = pick(real=list(grids.SAMPLER_STEPS), smoke=[1, 4])  # smoke: 4 steps draw refinement noise three times
CFGS = list(grids.SAMPLER_CFGS)
IMPLS = ("eager", "compile", "compile_networks", "uncaptured", "graph")
DTYPE = pick(real=torch.bfloat16, smoke=torch.float32)
# the consistency losses on, as the presets have them, so that bench_training's smoke step runs every term
TINY = {
    "input_size": 16, "patch_size": 4, "vit_enc_model_size": {"width": 32, "layers": 1, "heads": 2},
    "vit_dec_model_size": {"width": 32, "layers": 1, "heads": 2}, "token_channels": 4, "num_classes": 10,
    "use_pixel_consistency": True, "use_latent_consistency": True,
}
# GFLOP of one (decoder, encoder) pass per image at batch 1 (spec section 6)
PASS_GFLOP = {"sphere-l-imagenet": (671, 623), "sphere-xl-imagenet": (977, 918)}
TARGET_TIMED_MS = 2000  # timed calls per case: about this long in all (timed_calls)
# The gate (check_images), on the mean |diff| of [0, 1] images from the eager loop's. Measured on CPU under
# label_dependent weights (2026-12-01; Sphere-L and XL widths, 2 to 24 blocks, 4 steps): image std 0.27-0.29; CFG 1.4
# moves images by 4.3-4.9e-2, one step less or another seed by 0.10-0.16; eager fp32 against eager bf16 by
# 2.3-3.9e-3 (24 blocks: 3.9e-3). That proxy rounds weights too: under the old weights it was 4.3e-4 at 24 blocks
# where the GPU's eager and graph differed by 2.3e-4, so about 2e-3 is expected here (not measured on a GPU yet).
MAX_DIFF = 2e-2  # bf16 on the GPU: 5x the proxy, 1/5 of the nearest wrong image (smoke, float32, same loop: 1e-5)
# Also under this share of what CFG changes: a sampler that skips CFG, or the decoder's, fails. Skipping only the
# encoder's moves images by 4-5% of it (its latent is 9% of the re-noised one), within bf16 rounding: only the
# float32 smoke run catches that.
CFG_SHARE = 0.25
MIN_CFG_EFFECT = 1e-2  # weights under which CFG moves images less fail the case (old weights: 2.5e-4; tiny: 2.5e-2)
GATE_SAMPLES = 4  # the first samples of a CFG case are also run without CFG (independent of the batch)
COLD_TIMEOUT_S = 1800


def flops_per_image(name: str, steps: int, cfg: float) -> int | None:
    """T decoder and T-1 encoder passes, both doubled by combo CFG; None for models without spec FLOPs."""
    if name not in PASS_GFLOP:
        return None
    dec, enc = PASS_GFLOP[name]
    return int((steps * dec + (steps - 1) * enc) * 1e9 * (2 if cfg > 1 else 1))


def random_model(name: str) -> SphereEncoder:
    """fp32, built on the device with random weights (zeros would make the matmuls unrealistically fast)."""
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = SphereEncoder(**TINY) if name == "tiny" else SphereEncoder.from_preset(name)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.02)
    return model


@torch.no_grad()
def label_dependent(model: SphereEncoder) -> SphereEncoder:
    """``model`` (random_model's) with weights under which images vary and depend on the label, so that the gate
    can tell a wrong sampler from a right one. random_model leaves the class embeddings and AdaLN modulations near
    zero and the output conv at gain 0.01: images of std 0.03 that CFG moves by 2e-4, less than bf16 kernel
    rounding. Here the embeddings are N(0, 1) and the modulation Linears N(0, 1/W) (each shift, scale and gate
    about N(0, 0.6^2)), the heads xavier and the output conv xavier at gain 0.3 (few pixels saturate): images of
    std 0.2-0.3 that CFG 1.4 moves by 2.5-4.9e-2 (measured on CPU, 2026-12-01). Still dense random weights."""
    for vit in (model.encoder, model.decoder):
        if vit.y_embedder is not None:
            vit.y_embedder.embedding_table.weight.normal_()
            modulations = [block.adaLN_modulation[1] for block in vit.blocks] + [vit.ffn.adaLN_modulation[1]]
            for linear in modulations:
                linear.weight.normal_(std=linear.in_features**-0.5)
        torch.nn.init.xavier_uniform_(vit.ffn.linear.weight)
    for m in model.decoder.out:
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            xavier_uniform_flat_(m.weight, gain=0.3)
    return model


def build_model(name: str) -> SphereEncoder:
    """The sampling benchmarks' model: random label-dependent weights, cast to DTYPE, in eval mode."""
    return label_dependent(random_model(name)).to(DTYPE).eval()


cached_model = functools.cache(build_model)


def case_inputs(batch: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and seeds on the host, as a caller would hand them over."""
    return torch.arange(batch) % num_classes, torch.arange(batch, dtype=torch.int64) + 1000


def make_runner(
    impl: str, model: SphereEncoder, batch: int, steps: int, cfg: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A callable (labels, seeds) -> final images for one implementation of the loop."""
    if impl in ("uncaptured", "graph"):
        sampler = Sampler(model, batch, steps, cfg=cfg, dtype=DTYPE, cuda_graph=impl == "graph")
        return lambda labels, seeds: sampler(labels, seeds)
    if impl == "eager":
        return official_loop(model, batch, steps, cfg)
    # Each compile row starts as a fresh process would: otherwise dynamo's recompile limit (8 a function) would
    # count the grid's other batch sizes, and inductor's CUDA graphs of earlier rows would keep their memory.
    torch._dynamo.reset()
    # On CPU (smoke) dynamo traces the graphs without minutes of C++ compilation, as the harness does.
    options = {"backend": "eager"} if DEVICE.type == "cpu" else {"mode": "max-autotune"}
    if impl == "compile_networks":
        forwards = {name: compiled_forward(getattr(model, name), options) for name in ("encoder", "decoder")}
        eager = official_loop(model, batch, steps, cfg)

        def compile_networks_run(labels: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
            with forwards_replaced(model, forwards):
                return eager(labels, seeds)

        return compile_networks_run
    reference = Sampler(model, batch, steps, cfg=cfg, dtype=DTYPE, cuda_graph=False)
    key = GraphKey(batch, steps, guidance(model, cfg, "combo"), True, False, DTYPE, "eager")
    weight = torch.tensor(guidance_weight(cfg, "combo"), dtype=torch.float32, device=DEVICE) if key.guide else None
    compiled = torch.compile(reference.loop, fullgraph=True, dynamic=False, **options)

    def compile_run(labels: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        with use_backend("eager"), torch.no_grad():
            return compiled(key, to_device(labels), to_device(seeds), weight)[1]

    return compile_run


def to_device(t: torch.Tensor) -> torch.Tensor:
    """A host input on the device as the Sampler stages it (no stream sync): a blocking copy would sync each timed
    call of the baselines, and those alone."""
    return sampling.to_device_unsynced(t, DEVICE)


def official_loop(
    model: SphereEncoder, batch: int, steps: int, cfg: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The official generate() loop on sphere_fast's "eager" backend (labels, seeds) -> final images."""
    shape = model.latent_shape[1:]

    def eager(labels: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        # Its draws (initial point, and from step 2 the cached refinement noise) are one kernel each, as the
        # official torch.randn draws are; the seed convention's pure-torch Philox (about 200 small kernels a draw)
        # would slow this baseline for no reason an eager user has. The draws are the seeds' own, so the images
        # match the other implementations.
        seeds = to_device(seeds)
        draws = [ops.sphere_noise(seeds, shape, stream=k, backend="auto") for k in range(min(steps, 2))]
        with use_backend("eager"):
            return model.generate(
                batch, y=to_device(labels), cfg=cfg, cfg_position="combo", forward_steps=steps,
                cache_sampling_noise=True, noise=draws, dtype=DTYPE,
            )[1]

    return eager


def compiled_forward(net: torch.nn.Module, options: dict) -> Callable[..., torch.Tensor]:
    """``net.forward`` under torch.compile; each output copied out, as inductor's CUDA graphs hand out a buffer
    that the network's next replay overwrites while the loop still holds it (the first step's image)."""
    compiled = torch.compile(net.forward, fullgraph=True, dynamic=False, **options)
    return lambda *args, **kwargs: compiled(*args, **kwargs).clone()


@contextlib.contextmanager
def forwards_replaced(model: SphereEncoder, forwards: dict[str, Callable[..., torch.Tensor]]) -> Iterator[None]:
    """Model's networks call ``forwards[name]`` inside the block; the cached model is shared by every case."""
    for name, forward in forwards.items():
        getattr(model, name).forward = forward
    try:
        yield
    finally:
        for name in forwards:
            del getattr(model, name).forward


# calls a compile row may take after its gate call until torch.compile's CUDA-graph trees replay: the first call of
# a tree's function runs eager to warm up, the next records (a network called several times a loop may take more)
SETTLING_CALLS = 3


def settled_probe(call: Callable[[], object]) -> Timing:
    """One timed ``call``, repeated until one records no CUDA-graph tree (at most SETTLING_CALLS), so that the
    timed calls after it replay (a row whose timed calls still recorded says so: ``graph_recordings``)."""
    for _ in range(SETTLING_CALLS):
        probe = cuda_time_ms(call, warmup=0, rep=1, flush_l2=False)
        if not probe.graph_recordings:
            break
    return probe


def timed_calls(probe_ms: float) -> int:
    """How many calls a case times after a probe call of ``probe_ms``: about TARGET_TIMED_MS in all, 3 to 20."""
    return max(3, min(20, int(TARGET_TIMED_MS / probe_ms)))


def impl_params() -> list:
    compiles = ("compile", "compile_networks")
    return [pytest.param(i, id=i, marks=[pytest.mark.slow] if i in compiles and not SMOKE else []) for i in IMPLS]


# The eager loop's images of each case, kept on the host: on the device the whole grid's would hold about 3 GB for
# the rest of the session, less memory for the later rows
_reference_images: dict[tuple, torch.Tensor] = {}


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: f"cfg{c}")
@pytest.mark.parametrize("steps", STEPS, ids=lambda t: f"t{t}")
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("impl", impl_params())
def test_sampling(benchmark, ceilings, impl: str, name: str, batch: int, steps: int, cfg: float) -> None:
    time_sampler(benchmark, ceilings, impl, name, batch, steps, cfg)


@pytest.mark.parametrize("batch", pick(real=[1, 64], smoke=[2]), ids=lambda b: f"b{b}")
def test_sampling_fused_mlp(benchmark, ceilings, monkeypatch: pytest.MonkeyPatch, batch: int) -> None:
    """The graphed sampler with SPHERE_FAST_FUSED_MLP=1 (each MLP's first GEMM and activation as one kernel),
    Sphere-L, 4 steps, combo CFG 1.4: against the ``graph`` row, whether that should be the default."""
    monkeypatch.setenv("SPHERE_FAST_FUSED_MLP", "1")
    time_sampler(benchmark, ceilings, "graph", MODELS[0], batch, STEPS[-1], CFGS[-1], label="graph_fused_mlp")


def time_sampler(
    benchmark, ceilings, impl: str, name: str, batch: int, steps: int, cfg: float, label: str | None = None
) -> None:
    """Gate one implementation's images against the eager loop's, then time it; recorded as ``label`` (default:
    the implementation)."""
    model = cached_model(name)
    labels, seeds = case_inputs(batch, model.num_classes)
    ref_key = (name, batch, steps, cfg)
    if ref_key not in _reference_images and impl != "eager":  # the eager row (first in each case) is its own
        _reference_images[ref_key] = make_runner("eager", model, batch, steps, cfg)(labels, seeds).cpu()
    unguided = unguided_images(name, model, steps, min(batch, GATE_SAMPLES)) if cfg > 1 else None
    memory = PeakMemory()  # from the runner's making to its last timed call
    counts = compile_counts()  # ... and what inductor counted meanwhile
    run = make_runner(impl, model, batch, steps, cfg)
    started = time.perf_counter()
    images = run(labels, seeds).clone()  # first call: capture / compile / autotune, and the correctness gate
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    first_call_s = time.perf_counter() - started
    _reference_images.setdefault(ref_key, images.cpu())
    assert images.shape == (batch, 3, model.input_size, model.input_size) and bool(images.isfinite().all())
    diff, cfg_effect = check_images(impl, images, _reference_images[ref_key].to(images.device), unguided)
    # the gate call above compiled / captured / autotuned, and the probe warms the rest: no more warmup calls (a
    # compile in the probe, a second call's, fails it as one in the timed calls would)
    probe = settled_probe(lambda: run(labels, seeds))
    ms, clocks = timed_with_clocks(lambda: cuda_time_ms(lambda: run(labels, seeds), warmup=0,
                                                        rep=timed_calls(probe), flush_l2=False))
    flops = flops_per_image(name, steps, cfg)
    # max-autotune captures CUDA graphs where it can: where it could not, the row ran without them
    skips = counts_grown(counts, ("inductor",)).get("inductor", {}).get("cudagraph_skips", 0)
    record(benchmark, op=f"sample {name}", impl=label or impl, shape=grids.sampler_case(batch, steps, cfg),
           dtype=DTYPE, ms=ms, flops=flops * batch if flops else None, ceilings=ceilings,
           extra={"images_per_s": batch / (ms * 1e-3), "mean_abs_diff_vs_eager": diff, "peak_gb": memory.gb(),
                  "first_call_s": first_call_s, **({"eager_cfg_effect": cfg_effect} if cfg_effect is not None else {}),
                  **({"cudagraph_skips": skips} if impl.startswith("compile") else {}),
                  **({"clocks_while_timed": clocks} if clocks else {})})


_unguided_images: dict[tuple, torch.Tensor] = {}


def unguided_images(name: str, model: SphereEncoder, steps: int, samples: int) -> torch.Tensor:
    """The eager loop's images of a case's first ``samples`` samples without CFG (a sample's image depends on its
    seed and label only: one computation serves every batch size)."""
    key = (name, steps, samples)
    if key not in _unguided_images:
        labels, seeds = case_inputs(samples, model.num_classes)
        _unguided_images[key] = make_runner("eager", model, samples, steps, 1.0)(labels, seeds).clone()
    return _unguided_images[key]


def check_images(
    impl: str, images: torch.Tensor, reference: torch.Tensor, unguided: torch.Tensor | None
) -> tuple[float, float | None]:
    """Fail unless ``images`` are the eager loop's ``reference`` up to rounding: mean |diff| under MAX_DIFF (1e-5
    in smoke mode: float32, the same loop) and, with CFG, under CFG_SHARE of what CFG changes on the first samples
    (``unguided``: theirs without CFG), which must be at least MIN_CFG_EFFECT. Returns (mean |diff|, CFG's)."""
    diff = (images - reference).abs().mean().item()
    max_diff = 1e-5 if SMOKE else MAX_DIFF  # read here: tests hold smoke runs to the GPU's bound
    assert diff < max_diff, f"{impl} differs from eager by {diff} on average (bound {max_diff})"
    if unguided is None:
        return diff, None
    n = unguided.shape[0]
    effect = (reference[:n] - unguided).abs().mean().item()
    # weights under which CFG barely moves the images would pass a sampler that skips it
    assert effect >= MIN_CFG_EFFECT, f"CFG moves the eager images by only {effect}: too little to check {impl}"
    near = (images[:n] - reference[:n]).abs().mean().item()
    assert near < CFG_SHARE * effect, (
        f"{impl} differs from eager by {near} on its first {n} samples, not under {CFG_SHARE} of what CFG changes "
        f"({effect}): CFG skipped or partial?"
    )
    return diff, effect


# ------------------------------------------------------------------------------------- time to first image

COLD_CASE = pick(real=(1, 4, 1.4), smoke=(1, 2, 1.4))  # batch, steps, cfg: one image, the paper's best setting


IMPORTS_TIMED = ("torch", "sphere_fast")
# The on-disk caches a cold process finds: "empty" on a machine's first run, "warm" on every later one (Triton's
# and inductor's kernels and sphere_fast's stored tuning choices), "warm-untuned" the kernels without the stored
# choices (SPHERE_FAST_TUNING_CACHE=0: what the store saves a warm start).
CACHE_STATES = ("warm", "empty", "warm-untuned")


@contextlib.contextmanager
def capture_phases() -> Iterator[dict[str, float]]:
    """Seconds per phase of the sampler's captures inside the block (summed over captures), keyed
    ``capture_<phase>_s``: what its INFO log records carry in ``capture_seconds``."""
    phases: dict[str, float] = {}

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            for phase, seconds in getattr(record, "capture_seconds", {}).items():
                key = f"capture_{phase.replace(' ', '_').replace('-', '_')}_s"
                phases[key] = phases.get(key, 0.0) + seconds

    sphere_log = logging.getLogger("sphere_fast")
    handler, level = Collect(logging.INFO), sphere_log.level
    sphere_log.addHandler(handler)
    sphere_log.setLevel(logging.INFO)
    try:
        yield phases
    finally:
        sphere_log.removeHandler(handler)
        sphere_log.setLevel(level)


def cold_start(name: str, impl: str, batch: int, steps: int, cfg: float) -> dict[str, float]:
    """Run in a fresh process, after its imports: initialise CUDA, build the model, make the sampler, first
    images ready on the host; with the phases of the graph's capture, part of the first call."""
    start = time.time()
    if DEVICE.type == "cuda":
        torch.zeros(1, device=DEVICE)  # the CUDA context, timed apart from the model's build
        torch.cuda.synchronize()
    ready = time.time()
    model = build_model(name)
    built = time.time()
    with capture_phases() as phases:
        images = make_runner(impl, model, batch, steps, cfg)(*case_inputs(batch, model.num_classes)).cpu()
    assert bool(images.isfinite().all())
    done = time.time()
    return {"done_at": done, "cuda_init_s": ready - start, "build_s": built - ready, "first_call_s": done - built,
            **phases}


def import_seconds(importtime_log: str, modules: tuple[str, ...] = IMPORTS_TIMED) -> dict[str, float]:
    """Seconds each of ``modules`` took to import, with what it imported first (cumulative), from the stderr
    of ``python -X importtime``; a module imported after another already loaded its dependencies counts
    only what was left (sphere_fast after torch: sphere_fast's own cost)."""
    found: dict[str, float] = {}
    for line in importtime_log.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if len(fields) != 3 or not fields[1].strip().isdigit():
            continue
        module = fields[2].strip()
        if module in modules and module not in found:
            found[module] = int(fields[1]) / 1e6
    return found


def kernel_cache_env(folder: Path, store_tuning: bool = True) -> dict[str, str]:
    """This process's environment with Triton's and inductor's on-disk caches and sphere_fast's stored tuning
    choices moved into ``folder`` (or, without ``store_tuning``, the choices kept in memory only)."""
    caches = {"TRITON_CACHE_DIR": str(folder / "triton"), "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"),
              "SPHERE_FAST_TUNING_CACHE": str(folder / "tuning") if store_tuning else "0"}
    return {**os.environ, **caches}


def first_image_process(name: str, impl: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A fresh process that imports (under -X importtime) and runs cold_start; fails the test if it fails."""
    batch, steps, cfg = COLD_CASE
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "benchmarks.bench_sampling", name, impl, str(batch), str(steps),
         str(cfg)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=COLD_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("caches", CACHE_STATES)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("impl", [pytest.param(i, id=i, marks=[] if SMOKE else [pytest.mark.slow]) for i in IMPLS])
def test_time_to_first_image(benchmark, tmp_path: Path, impl: str, name: str, caches: str) -> None:
    if caches == "warm-untuned" and impl != "graph":
        pytest.skip("the stored tuning choices are compared on the graph's first call only")
    seconds, extra = time_first_image(name, impl, caches, tmp_path)
    record(benchmark, op=f"first image {name}", impl=impl, shape=f"{grids.sampler_case(*COLD_CASE)}, {caches} caches",
           dtype=DTYPE, ms=seconds * 1e3, extra=extra)


def time_first_image(name: str, impl: str, caches: str, folder: Path) -> tuple[float, dict[str, object]]:
    """Seconds from spawning a fresh process to its first images on the host, with kernel caches in ``folder`` in
    the state ``caches`` names, and the row's extra: the stages and capture phases the child timed, the imports,
    and the start-up (what the stages leave: the interpreter and its imports)."""
    env = kernel_cache_env(folder, store_tuning=caches != "warm-untuned")
    if caches.startswith("warm"):
        first_image_process(name, impl, env)  # compiles into the caches, untimed
    spawned = time.time()
    proc = first_image_process(name, impl, env)
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    seconds = child["done_at"] - spawned
    stages = {key: child[key] for key in ("cuda_init_s", "build_s", "first_call_s")}
    phases = {key: value for key, value in child.items() if key.startswith("capture_")}
    imports = {f"import_{module}_s": s for module, s in import_seconds(proc.stderr).items()}
    return seconds, {"kernel_caches": caches, "startup_s": seconds - sum(stages.values()), **imports, **stages,
                     **phases}


if __name__ == "__main__":
    model_name, impl_name, b, t, w = sys.argv[1:]
    print(json.dumps(cold_start(model_name, impl_name, int(b), int(t), float(w))))
