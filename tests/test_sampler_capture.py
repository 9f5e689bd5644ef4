"""Sampler's CUDA-graph path (capture per GraphKey, static buffers, buckets, replay) run on CPU under the
emulator of tests/cuda_graph_emulator.py, against the un-captured path and ``generate``.

Tolerance: float32 on CPU, 1e-5 relative to the image range. The graph runs the padded bucket and the
plain path only the n samples, so GEMMs of other shapes may round differently; everything else is the same
CPU code."""

from __future__ import annotations

import copy
import importlib
import time
import warnings
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sphere_fast import SphereEncoder, active_backend, available_backends, sampling, use_backend
from sphere_fast.sampling import GraphKey, Sampler, bucket_for, guidance
from tests.cuda_graph_emulator import CaptureError, CudaGraphEmulator, emulated_cuda_graphs  # noqa: F401 (fixture)
from tests.helpers import FUSED, close
from tests.test_sampler import LABELS, SEEDS, tiny_model

TOL = 1e-5
Setting = tuple[int, float, str, bool, bool]  # steps, cfg, cfg_position, cache_noise, scheduler
SETTINGS: list[Setting] = [
    (1, 1.0, "combo", True, False),  # no CFG: a graph without the null branch
    (3, 1.4, "combo", True, False),
    (3, 1.6, "enc", False, True),  # fresh noise each step, scheduled scale
    (2, 1.4, "dec", True, False),
]


@pytest.fixture(scope="module")
def model() -> SphereEncoder:
    return tiny_model()


def samplers(model: SphereEncoder, batch_size: int, setting: Setting) -> tuple[Sampler, Sampler]:
    """(graphed, plain) samplers with the same settings, float32."""
    steps, cfg, position, cache, scheduler = setting
    kwargs = dict(cfg=cfg, cfg_position=position, cache_noise=cache, scheduler=scheduler, dtype=torch.float32)
    return Sampler(model, batch_size, steps, **kwargs), Sampler(model, batch_size, steps, cuda_graph=False, **kwargs)


# ------------------------------------------------------------------------------------------- the emulator


def test_emulator_replays_on_new_buffer_contents(emulated_cuda_graphs: CudaGraphEmulator) -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    idx = torch.tensor([3, 0])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=torch.cuda.graph_pool_handle()):
        low, high = x.view(2, 2).chunk(2)  # views, in a tuple result
        y = torch.cat([high, low]).flatten() * 2  # new memory
        y.add_(x[idx].sum())  # integer indexing (no sync), in place
    assert torch.isnan(y).all()  # like a real capture: nothing valid before a replay
    x.copy_(torch.tensor([10.0, 20.0, 30.0, 40.0]))
    idx.copy_(torch.tensor([1, 1]))
    for _ in range(2):  # the in-place add does not pile up
        graph.replay()
        assert torch.equal(y, torch.tensor([100.0, 120.0, 60.0, 80.0]))
    assert (emulated_cuda_graphs.captures, emulated_cuda_graphs.replays) == (1, 2)
    assert emulated_cuda_graphs.pools == emulated_cuda_graphs.handles


def test_emulator_refuses_a_replay_after_an_input_moved(emulated_cuda_graphs: CudaGraphEmulator) -> None:
    weight = torch.nn.Parameter(torch.ones(2))
    x = torch.tensor([1.0, 2.0])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = x * weight
    weight.data.mul_(3)  # in place: the graph reads the new values
    graph.replay()
    assert torch.equal(y, torch.tensor([3.0, 6.0]))
    weight.data = torch.ones(2)  # new memory: a real replay would read the old address
    with pytest.raises(CaptureError, match="moved since the capture"):
        graph.replay()


@pytest.mark.parametrize(
    "host_read",
    [
        lambda t: t.sum().item(),
        lambda t: bool(t.sum()),
        lambda t: int(t.sum()),
        lambda t: t.tolist(),
        lambda t: torch.equal(t, t),
        lambda t: t.nonzero(),
        lambda t: t[t > 1],
    ],
    ids=["item", "bool", "int", "tolist", "equal", "nonzero", "mask-index"],
)
def test_emulator_refuses_host_syncs_in_a_capture(emulated_cuda_graphs: CudaGraphEmulator, host_read) -> None:
    t = torch.tensor([1.0, 2.0])
    with pytest.raises(CaptureError, match="sync"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            host_read(t * 2)
    assert emulated_cuda_graphs.captures == 0 and not emulated_cuda_graphs.capturing
    assert t.tolist() == [1.0, 2.0] and t.sum().item() == 3.0  # fine outside a capture


# ------------------------------------------------------------------------------------------ the sampler


def check_capture_and_replay(
    model: SphereEncoder, emu: CudaGraphEmulator, batch_size: int, n: int, setting: Setting
) -> None:
    """First call captures and equals the plain path and generate; a call with new seeds, labels and CFG
    scale replays the same graph and equals the plain path for those inputs; a repeat is bit-identical."""
    steps, cfg, position, cache, scheduler = setting
    graphed, plain = samplers(model, batch_size, setting)
    labels, seeds = LABELS[:n], SEEDS[:n]
    first, final = graphed(labels, seeds, return_first=True)
    assert (emu.captures, emu.replays) == (1, 1)
    assert final.shape == (n, 3, 16, 16)
    ref = model.generate(
        n, y=labels, cfg=cfg, cfg_position=position, forward_steps=steps, use_sampling_scheduler=scheduler,
        cache_sampling_noise=cache, seeds=seeds, dtype=torch.float32,
    )
    for (ref_first, ref_final), what in ((plain(labels, seeds, return_first=True), "plain"), (ref, "generate")):
        close(first, ref_first, TOL, f"first vs {what}")
        close(final, ref_final, TOL, f"final vs {what}")

    labels, seeds = (labels + 3) % 10, seeds + 1000
    if cfg > 1:  # a new scale, same guide
        graphed.cfg = plain.cfg = cfg + 0.5
    again = graphed(labels, seeds)
    assert (emu.captures, emu.replays) == (1, 2)
    key = GraphKey(bucket_for(n, batch_size), steps, guidance(model, cfg, position), cache, scheduler, torch.float32, active_backend())
    assert graphed.graph_keys == (key,)
    close(again, plain(labels, seeds), TOL, "replay with new inputs vs plain")
    assert (again - final).abs().amax() > 1e-2  # the inputs did change the images
    assert torch.equal(graphed(labels, seeds), again)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(map(str, s)))
def test_captured_equals_uncaptured(
    model: SphereEncoder, emulated_cuda_graphs: CudaGraphEmulator, setting: Setting
) -> None:
    check_capture_and_replay(model, emulated_cuda_graphs, 8, 5, setting)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_backend_captured(
    model: SphereEncoder, emulated_cuda_graphs: CudaGraphEmulator, backend: str
) -> None:
    # Smaller than the eager cases, as the Triton interpreter is slow: still a padded bucket (3 of 4) and
    # seeded noise in the fused spherify; CFG runs the same fused ops, and its plumbing is checked above.
    with use_backend(backend):
        check_capture_and_replay(model, emulated_cuda_graphs, 4, 3, (2, 1.0, "combo", False, True))
    # the fused kernels are torch.library ops: on the tape as such, so a replay re-runs them
    assert any(op.namespace == "sphere_fast" for op in emulated_cuda_graphs.recorded_ops())


def test_the_warm_up_runs_every_op_the_capture_records(
    model: SphereEncoder, emulated_cuda_graphs: CudaGraphEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the captured loop launches ran before, in the representative loop of the warm-up (where Triton
    compiles and tunes, cuBLAS and lazy initialisations happen): the decoder, and the encoder with its noise."""
    warmed: set[torch._ops.OpOverload] = set()

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            warmed.add(func)
            return func(*args, **(kwargs or {}))

    representative = sampling._representative_loop

    def recorded(*args, **kwargs) -> None:
        with Ops():
            representative(*args, **kwargs)

    monkeypatch.setattr(sampling, "_representative_loop", recorded)
    graphed, _ = samplers(model, 4, (3, 1.4, "combo", False, True))
    graphed(LABELS[:4], SEEDS[:4])
    captured = {op for op in emulated_cuda_graphs.recorded_ops() if not op.is_view}  # views launch nothing
    assert captured and captured <= warmed, sorted(map(str, captured - warmed))


@pytest.mark.parametrize("backend", FUSED)
def test_the_warm_up_compiles_the_seeded_label_kernel(
    model: SphereEncoder, emulated_cuda_graphs: CudaGraphEmulator, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """A seeded call without labels draws them with one kernel before its replay: launched once at the capture (where
    Triton compiles it), not first in that call; the call's labels are the seeds' own."""
    labels_module = importlib.import_module("sphere_fast.ops.labels")
    drawn: list[torch.Tensor] = []
    kernel = labels_module._seeded_labels
    monkeypatch.setattr(labels_module, "_seeded_labels", lambda *args: drawn.append(kernel(*args)) or drawn[-1])
    with use_backend(backend):
        graphed, plain = samplers(model, 4, (2, 1.4, "combo", True, False))
        graphed.prepare()
        assert len(drawn) == 1 and emulated_cuda_graphs.captures == 1
        close(graphed(seeds=SEEDS[:4]), plain(labels_module.seeded_labels_reference(SEEDS[:4], 10), SEEDS[:4]), TOL,
              "seeded labels")
    assert len(drawn) == 2


def test_every_static_input_is_read_at_replay(model: SphereEncoder, emulated_cuda_graphs: CudaGraphEmulator) -> None:
    graphed, plain = samplers(model, 8, (2, 1.4, "combo", True, False))
    labels, seeds = LABELS, SEEDS
    previous = graphed(labels, seeds)
    for change in ("seeds", "labels", "cfg"):
        if change == "seeds":
            seeds = seeds + 1000
        elif change == "labels":
            labels = (labels + 3) % 10
        else:
            graphed.cfg = plain.cfg = 2.0
        out = graphed(labels, seeds)
        close(out, plain(labels, seeds), TOL, f"after a change of {change}")
        assert (out - previous).abs().flatten(1).amax(1).min() > 1e-3, f"{change}: some sample did not change"
        previous = out
    assert (emulated_cuda_graphs.captures, emulated_cuda_graphs.replays) == (1, 4)


def test_buckets(model: SphereEncoder, emulated_cuda_graphs: CudaGraphEmulator) -> None:
    emu = emulated_cuda_graphs
    graphed, plain = samplers(model, 8, (2, 1.4, "combo", True, False))
    labels = torch.tensor([1, 4, 7, 2, 9, 0, 5, 3])
    seeds = torch.arange(100, 108, dtype=torch.int64)
    counts = []  # (n, captures, replays) after each call
    for n, start in ((3, 0), (4, 3), (5, 0), (3, 5)):  # the last call leaves stale rows in bucket 4's padding
        out = graphed(labels[start : start + n], seeds[start : start + n])
        assert out.shape == (n, 3, 16, 16)
        close(out, plain(labels[start : start + n], seeds[start : start + n]), TOL, f"{n} samples")
        counts.append((n, emu.captures, emu.replays))
    assert counts == [(3, 1, 1), (4, 1, 2), (5, 2, 3), (3, 2, 4)]
    assert graphed.graph_keys == tuple(GraphKey(b, 2, "combo", True, False, torch.float32, "auto") for b in (4, 8))
    assert len(emu.handles) == 1 and all(pool is emu.handles[0] for pool in emu.pools)
    # each loop is captured on the sampler's own stream of the model's device, not torch's default capture stream
    assert all(stream is not None and stream.device == torch.device("cpu") for stream in emu.streams)


def test_returned_images_are_copies(model: SphereEncoder, emulated_cuda_graphs: CudaGraphEmulator) -> None:
    graphed, _ = samplers(model, 8, (2, 1.4, "combo", True, False))
    first, final = graphed(LABELS, SEEDS, return_first=True)
    kept = first.clone(), final.clone()
    later = graphed((LABELS + 1) % 10, SEEDS + 1)  # the same graph rewrites its static outputs
    assert emulated_cuda_graphs.replays == 2 and (later - final).abs().amax() > 1e-2
    assert torch.equal(first, kept[0]) and torch.equal(final, kept[1])


def test_views_without_clone(model: SphereEncoder, emulated_cuda_graphs: CudaGraphEmulator) -> None:
    graphed, _ = samplers(model, 8, (2, 1.4, "combo", True, False))
    copy = graphed(LABELS, SEEDS)
    view = graphed(LABELS, SEEDS, clone=False)
    assert torch.equal(view, copy)
    graphed((LABELS + 1) % 10, SEEDS + 1)  # the same graph replays: the view now shows the new images
    assert not torch.equal(view, copy)
    with pytest.raises(TypeError, match="clone"):
        graphed(LABELS, SEEDS, clone="no")


def test_backend_change_captures_its_own_graph(model: SphereEncoder, emulated_cuda_graphs: CudaGraphEmulator) -> None:
    # a graph holds the kernels it captured: under another backend the sampler must not replay it
    graphed, _ = samplers(model, 4, (1, 1.0, "combo", True, False))
    auto = graphed(LABELS[:4], SEEDS[:4])
    with use_backend("cpp"):
        cpp = graphed(LABELS[:4], SEEDS[:4])
    assert [key.backend for key in graphed.graph_keys] == ["auto", "cpp"]
    close(cpp, auto, TOL, "cpp vs auto (eager on CPU)")
    assert emulated_cuda_graphs.captures == 2


def test_fused_mlp_setting_captures_its_own_graph(
    model: SphereEncoder, emulated_cuda_graphs: CudaGraphEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SPHERE_FAST_FUSED_MLP changes the kernels a pass runs: a graph captured without it must not be replayed
    if "triton" not in available_backends("cpu"):
        pytest.skip("triton backend not available")
    monkeypatch.delenv("SPHERE_FAST_FUSED_MLP", raising=False)
    graphed = Sampler(copy.deepcopy(model).to(torch.bfloat16), 2, 1, dtype=torch.bfloat16)
    with use_backend("triton"):
        unfused = graphed(LABELS[:2], SEEDS[:2])
        monkeypatch.setenv("SPHERE_FAST_FUSED_MLP", "1")
        fused = graphed(LABELS[:2], SEEDS[:2])
    assert [key.fused_mlp for key in graphed.graph_keys] == [False, True] and emulated_cuda_graphs.captures == 2
    assert "swiglu_linear_triton" in {op.name().split("::")[-1] for op in emulated_cuda_graphs.recorded_ops()}
    assert (fused.float() - unfused.float()).abs().mean() < 2e-3


def test_unconditional_model_captured(emulated_cuda_graphs: CudaGraphEmulator) -> None:
    graphed, plain = samplers(tiny_model(num_classes=0), 4, (2, 1.4, "combo", True, False))  # nothing to guide
    for seeds in (SEEDS[:3], SEEDS[:3] + 1000):  # no labels buffer: the seeds alone
        close(graphed(seeds=seeds), plain(seeds=seeds), TOL, "unconditional")
    assert graphed.graph_keys == (GraphKey(4, 2, None, True, False, torch.float32, "auto"),)
    assert (emulated_cuda_graphs.captures, emulated_cuda_graphs.replays) == (1, 2)


def test_dtype_change_captures_its_own_graph(model: SphereEncoder, emulated_cuda_graphs: CudaGraphEmulator) -> None:
    graphed, plain = samplers(model, 8, (2, 1.4, "combo", True, False))
    fp32 = graphed(LABELS, SEEDS)
    graphed.dtype = plain.dtype = torch.bfloat16  # autocast is part of the captured loop
    with pytest.warns(UserWarning, match=r"float32 and the Sampler runs torch.bfloat16: .*model.to\(torch.bfloat16\)"):
        bf16 = graphed(LABELS, SEEDS)
    assert [k.dtype for k in graphed.graph_keys] == [torch.float32, torch.bfloat16]
    close(bf16, plain(LABELS, SEEDS), TOL, "bf16 graph vs plain bf16")
    assert (bf16 - fp32).abs().amax() > 1e-4  # a replay of the fp32 graph would have returned fp32's images


def test_a_model_cast_to_the_sampler_s_dtype_captures_without_a_warning(
    model: SphereEncoder, emulated_cuda_graphs: CudaGraphEmulator
) -> None:
    graphed = Sampler(copy.deepcopy(model).to(torch.bfloat16), 4, 2, cfg=1.4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graphed.prepare()
    assert emulated_cuda_graphs.captures == 1


def test_a_capture_inside_the_caller_s_autocast_keeps_the_sampler_s_dtype(
    model: SphereEncoder, emulated_cuda_graphs: CudaGraphEmulator
) -> None:
    """The graph's key says float32: captured inside the caller's bf16 autocast, it still computes float32, so
    its replays outside match the plain float32 path (a bf16 capture would differ by ~5e-3)."""
    graphed, plain = samplers(model, 8, (2, 1.4, "combo", True, False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        graphed(LABELS, SEEDS)
    close(graphed(LABELS, SEEDS), plain(LABELS, SEEDS), TOL, "fp32 graph captured inside autocast vs plain fp32")
    assert (emulated_cuda_graphs.captures, emulated_cuda_graphs.replays) == (1, 2)


def test_clear_drops_the_captured_loops(model: SphereEncoder, emulated_cuda_graphs: CudaGraphEmulator) -> None:
    """``clear`` lets the loops and their buffers go (nothing else holds them); the next call captures again."""
    emu = emulated_cuda_graphs
    graphed, plain = samplers(model, 8, (2, 1.4, "combo", True, False))
    graphed(LABELS[:3], SEEDS[:3])
    graphed(LABELS, SEEDS)
    loops = [weakref.ref(loop) for loop in graphed._graphs.values()]
    assert len(loops) == 2 and emu.captures == 2
    graphed.clear()
    assert graphed.graph_keys == () and all(loop() is None for loop in loops)
    close(graphed(LABELS[:3], SEEDS[:3]), plain(LABELS[:3], SEEDS[:3]), TOL, "captured again")
    assert emu.captures == 3 and len(graphed.graph_keys) == 1


def test_prepare_captures_ahead_of_the_first_call(model: SphereEncoder, emulated_cuda_graphs: CudaGraphEmulator) -> None:
    emu = emulated_cuda_graphs
    graphed, plain = samplers(model, 8, (2, 1.4, "combo", True, False))
    assert graphed.prepare(3) == GraphKey(4, 2, "combo", True, False, torch.float32, "auto")
    assert graphed.prepare() == GraphKey(8, 2, "combo", True, False, torch.float32, "auto")
    assert graphed.prepare(8) == graphed.graph_keys[-1] and (emu.captures, emu.replays) == (2, 0)
    close(graphed(LABELS[:3], SEEDS[:3]), plain(LABELS[:3], SEEDS[:3]), TOL, "prepared bucket 4")
    assert (emu.captures, emu.replays) == (2, 1)
    assert plain.prepare() is None  # the un-captured path has nothing to prepare
    for bad in (0, 9):
        with pytest.raises(ValueError):
            graphed.prepare(bad)


def test_capture_logs_where_its_time_went(
    model: SphereEncoder, emulated_cuda_graphs: CudaGraphEmulator, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each capture logs its phases' seconds (``capture_seconds``); the compile pass, on the first capture only,
    gets the time spent in it."""
    compile_ahead = sampling._compile_ahead

    def slow_compile_ahead(*args: object) -> None:
        time.sleep(0.2)
        compile_ahead(*args)

    monkeypatch.setattr(sampling, "_compile_ahead", slow_compile_ahead)
    graphed, _ = samplers(model, 8, (2, 1.4, "combo", True, False))
    with caplog.at_level("INFO", logger="sphere_fast"):
        graphed.prepare(3)
        graphed.prepare(8)
    phases = [r.capture_seconds for r in caplog.records if hasattr(r, "capture_seconds")]
    assert [list(p) for p in phases] == [["compile pass", "warm-up", "capture"], ["warm-up", "capture"]]
    assert phases[0]["compile pass"] >= 0.2
    assert all(s >= 0 for p in phases for s in p.values())


def test_moved_parameters_are_captured_again(model: SphereEncoder, emulated_cuda_graphs: CudaGraphEmulator) -> None:
    """A graph reads the parameters where they were at its capture. Moved since (``.data`` replaced, as
    ``module.to`` does), every graph is captured again; in-place updates are read by the replay as they are."""
    emu = emulated_cuda_graphs
    model = copy.deepcopy(model)
    graphed, plain = samplers(model, 8, (2, 1.4, "combo", True, False))
    # new parameter objects before the first call: the capture notes the tensors the model holds then
    model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)
    graphed(LABELS[:3], SEEDS[:3])
    graphed(LABELS, SEEDS)
    assert emu.captures == 2
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)  # in place
    close(graphed(LABELS, SEEDS), plain(LABELS, SEEDS), TOL, "after an in-place update")
    assert emu.captures == 2
    for p in model.parameters():
        p.data = p.data * 0.99  # new memory
    after = graphed(LABELS, SEEDS)
    assert emu.captures == 3 and len(graphed.graph_keys) == 1, "the stale graphs must go, the new one captured"
    close(after, plain(LABELS, SEEDS), TOL, "after the parameters moved")



def test_replaced_tensors_and_a_new_noise_level_are_captured_again(
    model: SphereEncoder, emulated_cuda_graphs: CudaGraphEmulator
) -> None:
    """Parameters replaced by new objects after the capture (``load_state_dict(assign=True)``) and the noise
    level (a constant of the captured loop) are read from the model at each call."""
    emu = emulated_cuda_graphs
    model = copy.deepcopy(model)
    graphed, plain = samplers(model, 8, (2, 1.4, "combo", True, False))
    graphed(LABELS, SEEDS)
    model.load_state_dict({k: v * 0.99 for k, v in model.state_dict().items()}, assign=True)
    close(graphed(LABELS, SEEDS), plain(LABELS, SEEDS), TOL, "after load_state_dict(assign=True)")
    assert emu.captures == 2
    model.noise_sigma_max_angle = 60
    close(graphed(LABELS, SEEDS), plain(LABELS, SEEDS), TOL, "after a change of the noise level")
    assert emu.captures == 3 and len(graphed.graph_keys) == 1


def test_a_capture_under_inference_mode_serves_later_calls(
    model: SphereEncoder, emulated_cuda_graphs: CudaGraphEmulator
) -> None:
    """A server that warms up under torch.inference_mode and samples outside it (or the other way round)."""
    graphed, plain = samplers(model, 8, (2, 1.4, "combo", True, False))
    with torch.inference_mode():
        graphed.prepare()
    close(graphed(LABELS, SEEDS), plain(LABELS, SEEDS), TOL, "outside inference_mode")
    with torch.inference_mode():
        close(graphed(LABELS[:2], SEEDS[:2]), plain(LABELS[:2], SEEDS[:2]), TOL, "inside inference_mode")
    assert emulated_cuda_graphs.captures == 2


def test_training_mode_after_the_capture_refused(model: SphereEncoder, emulated_cuda_graphs: CudaGraphEmulator) -> None:
    """Label dropout would make the plain path depend on torch's generator while a graph replays eval mode."""
    model = copy.deepcopy(model)
    graphed, _ = samplers(model, 8, (2, 1.4, "combo", True, False))
    graphed(LABELS, SEEDS)
    model.train()
    for call in (lambda: graphed(LABELS, SEEDS), graphed.prepare):
        with pytest.raises(ValueError, match="training mode"):
            call()
    model.eval()
    graphed(LABELS, SEEDS)
    assert (emulated_cuda_graphs.captures, emulated_cuda_graphs.replays) == (1, 2)


def test_threads_sharing_a_sampler_get_their_own_images(
    model: SphereEncoder, emulated_cuda_graphs: CudaGraphEmulator
) -> None:
    """Two threads calling one Sampler (one graph, the same bucket): each gets its own images, as alone. The copy of
    its inputs into the graph's buffers, the replay and the copy out take turns; interleaved, a review saw 11-20 of
    60 calls return the other thread's images and 15-34 a mix."""
    import sys
    import threading

    sampler = Sampler(model, 4, 2, cfg=1.4, dtype=torch.float32)
    jobs = [(torch.tensor([0, 1, 2, 3]), torch.arange(4) + 100), (torch.tensor([9, 8, 7, 6]), torch.arange(4) + 7)]
    alone = [sampler(labels, seeds) for labels, seeds in jobs]
    results: list[list[bool]] = [[], []]
    start = threading.Barrier(2)

    def call(j: int) -> None:
        start.wait()
        results[j] += [torch.equal(sampler(*jobs[j]), alone[j]) for _ in range(10)]

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often
    try:
        threads = [threading.Thread(target=call, args=(j,)) for j in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert results == [[True] * 10, [True] * 10]
