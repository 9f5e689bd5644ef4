"""The compile pass (``sphere_fast.ops._util.compile_pass``): code run inside compiles the ops' Triton kernels, all
at once, and launches none; the sampler runs its loop once inside before the warm-up of its first capture.

The pass's compiles are checked for sm_90a in a child process (interpreter off, tests/sm90.py's stand-in driver,
which cannot launch, so a launch inside the pass would fail there): after one pass over a tiny model's loop,
every kernel the loop launches is compiled for the arguments of its launches (a second pass compiles nothing).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from pathlib import Path
from unittest import mock

import pytest
import torch

from sphere_fast import ops, use_backend
from sphere_fast.model import representative_blocks
from sphere_fast.ops import _tuning, _util
from sphere_fast.ops._tuning import pick_config
from sphere_fast.ops._util import compile_pass, compiling_only
from sphere_fast.sampling import GraphKey, Sampler, guidance
from tests import sm90
from tests.cuda_graph_emulator import CudaGraphEmulator, emulated_cuda_graphs  # noqa: F401 (fixture)
from tests.helpers import close, off_16_byte_boundaries
from tests.test_sampler import tiny_model

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OP_MODULES = ("adaln", "attention", "rope", "spherify", "swiglu", "swiglu_linear")


pytestmark = pytest.mark.usefixtures("fresh_tuning")


@pytest.mark.cuda_capable
def test_inside_a_compile_pass_an_op_only_compiles() -> None:
    """The same op call launches its kernel outside a pass and only warms it up (compiles) inside one."""
    from sphere_fast.kernels.swiglu import swiglu_fwd_kernel

    kernel_class = type(swiglu_fwd_kernel)  # JITFunction, or InterpretedFunction under the interpreter
    run = kernel_class.run
    warmups: list[bool] = []

    def recording_run(self, *args, warmup, **kwargs):
        warmups.append(warmup)
        return run(self, *args, warmup=warmup, **kwargs)

    h = torch.randn(4, 64, device=DEVICE)
    with mock.patch.object(kernel_class, "run", recording_run):
        ops.swiglu(h, backend="triton")
        with compile_pass():
            assert compiling_only()
            ops.swiglu(h, backend="triton")
    assert warmups == [False, True]
    assert not compiling_only()


def test_inside_a_compile_pass_every_candidate_compiles_and_none_is_timed() -> None:
    """The tuning joins the pass: each candidate compiles in the pass's AsyncCompileMode, the default is
    returned, nothing is timed or remembered; the first real call tunes."""
    from triton.runtime._async_compile import active_mode

    compiled: list[tuple[str, bool]] = []
    timed: list[str] = []

    def precompile(config: str) -> None:
        compiled.append((config, active_mode.get() is not None))

    def timer(launch) -> float:
        config = launch()
        timed.append(config)
        return {"a": 2.0, "b": 1.0}[config]

    with compile_pass():
        mode = active_mode.get()
        assert pick_config("k", ["a", "b"], lambda c: c, timer=timer, precompile=precompile) == "a"
        assert active_mode.get() is mode, "the tuning must not leave the pass's compile mode"
    assert compiled == [("a", True), ("b", True)]
    assert timed == [] and not _tuning._chosen
    assert pick_config("k", ["a", "b"], lambda c: c, timer=timer, precompile=precompile) == "b"
    assert timed == ["a", "b"]


def test_a_key_met_again_in_a_pass_compiles_nothing_more() -> None:
    """A loop repeats its launches: a key's candidates compile at its first launch in a pass, its
    later launches there take the default without compiling or looking for a stored choice; the next pass
    starts afresh."""
    compiled: list[str] = []
    pick = functools.partial(pick_config, candidates=["a", "b"], launch=lambda c: c, precompile=compiled.append)
    with mock.patch.object(_tuning, "_stored_choice", wraps=_tuning._stored_choice) as stored:
        with compile_pass():
            assert [pick("k"), pick("k"), pick("other"), pick("k")] == ["a"] * 4
        assert compiled == ["a", "b", "a", "b"] and stored.call_count == 2
        with compile_pass():
            pick("k")
        assert compiled[4:] == ["a", "b"]


def test_a_representative_run_takes_each_networks_first_and_last_blocks() -> None:
    """The blocks between launch the first one's kernels: the compile pass and the warm-up skip them (the
    sm_90a check below shows the full loop then compiles nothing more); elsewhere, and with one or two blocks,
    every block runs once."""
    models = [tiny_model(layers=layers) for layers in (4, 2, 1)]
    index = {id(block): i for model in models for i, block in enumerate(model.decoder.blocks)}
    ran: list[int] = []
    forward = type(models[0].decoder.blocks[0]).forward

    def recording_forward(self, *args):
        ran.append(index[id(self)])
        return forward(self, *args)

    model = models[0]
    latent = torch.randn(1, *model.latent_shape[1:])
    with mock.patch.object(type(model.decoder.blocks[0]), "forward", recording_forward), torch.no_grad():
        model.decoder(latent, torch.tensor([1]))
        with representative_blocks():
            for each in models:
                each.decoder(latent, torch.tensor([1]))
    assert ran == [0, 1, 2, 3, 0, 3, 0, 1, 0]
    # a block whose weight sits off a 16-byte boundary may launch other kernel specialisations: all blocks run
    weight = model.decoder.blocks[2].attn.proj.weight
    weight.data = off_16_byte_boundaries(weight.data)
    ran.clear()
    with mock.patch.object(type(model.decoder.blocks[0]), "forward", recording_forward), torch.no_grad(), \
            representative_blocks():
        model.decoder(latent, torch.tensor([1]))
    assert ran == [0, 1, 2, 3]


def test_a_nested_pass_joins_the_outer_one() -> None:
    from triton.runtime._async_compile import active_mode

    with compile_pass():
        outer = active_mode.get()
        with compile_pass():
            assert active_mode.get() is outer and compiling_only()
        assert compiling_only()
    assert active_mode.get() is None and not compiling_only()


def test_a_pass_interrupted_while_it_waits_leaves_no_compile_mode_behind() -> None:
    """Triton's mode waits for the compiles at its exit and, interrupted there (a Ctrl-C, here a compile's
    KeyboardInterrupt), stayed active in the thread: every later pass refused to start ("Another AsyncCompileMode
    is already active") and every later compile went to its shut-down pool."""
    from triton.runtime._async_compile import active_mode

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with compile_pass():
            active_mode.get().submit("interrupted", interrupted, lambda kernel: None)
    assert active_mode.get() is None and not compiling_only()
    with compile_pass():
        assert active_mode.get() is not None


@pytest.mark.parametrize(("backend", "passes"), [("triton", True), ("auto", True), ("cpp", False), ("eager", False)])
def test_the_sampler_compiles_its_loop_before_its_first_capture(
    emulated_cuda_graphs: CudaGraphEmulator, backend: str, passes: bool  # noqa: F811
) -> None:
    """Before the warm-up of its first graph, with a backend that may run Triton kernels, the sampler runs its
    loop once inside a compile pass; the pass and each warm-up run the representative loop (two steps: the
    decoder, then the encoder and the noise; each network's first and last blocks), the capture the whole
    loop. A replay and the capture of another bucket have no pass. The images are the un-captured path's."""
    model = tiny_model(layers=3)
    loops: list[tuple[int, int, bool, tuple[int, ...]]] = []
    loop = Sampler.loop

    def recording_loop(self, key, *args, **kwargs):
        loops.append((key.bucket, key.steps, compiling_only(), tuple(model.decoder.blocks_run())))
        return loop(self, key, *args, **kwargs)

    labels, seeds = torch.tensor([1, 2]), torch.tensor([5, 6])
    with use_backend(backend):
        with mock.patch.object(Sampler, "loop", recording_loop):
            sampler = Sampler(model, 2, 3, cfg=1.4, dtype=torch.float32)
            assert sampler.use_graphs
            images = sampler(labels, seeds)
            sampler(torch.tensor([3, 4]), torch.tensor([7, 8]))  # a replay
            sampler(torch.tensor([3]), torch.tensor([7]))  # bucket 1: a warm-up and a capture
        if backend != "triton":  # the same capture logic; the interpreter would take half a minute more
            expected = Sampler(model, 2, 3, cfg=1.4, dtype=torch.float32, cuda_graph=False)(labels, seeds)
            close(images, expected, 1e-5, "captured against un-captured")
    first_last, every = (0, 2), (0, 1, 2)
    compiled = [(2, 2, True, first_last)] if passes else []
    assert loops == compiled + [(2, 2, False, first_last), (2, 3, False, every), (1, 2, False, first_last),
                                (1, 3, False, every)]


@pytest.mark.gpu
def test_a_pass_over_the_sampler_loop_launches_no_triton_kernel_on_cuda() -> None:
    """On a GPU: the pass's CUDA kernels are torch's own (GEMMs, copies); none of ours runs."""
    from torch.profiler import ProfilerActivity, profile

    model = tiny_model("cuda").to(torch.bfloat16).eval()
    sampler = Sampler(model, 2, 2, cfg=1.4, dtype=torch.bfloat16, cuda_graph=False)
    key = GraphKey(2, 2, guidance(model, 1.4, "combo"), True, False, torch.bfloat16, "triton")
    inputs = (torch.tensor([1, 2], device="cuda"), torch.tensor([5, 6], device="cuda"), torch.ones((), device="cuda"))
    with use_backend("triton"), torch.no_grad():
        sampler.loop(key, *inputs, capture=True)  # compiled and tuned: the pass below only finds its kernels
        with profile(activities=[ProfilerActivity.CUDA]) as prof, compile_pass():
            sampler.loop(key, *inputs, capture=True)
        torch.cuda.synchronize()
    ran = {event.name for event in prof.events() if event.device_type.name == "CUDA"}
    assert ran and not ran & triton_kernel_names(), sorted(ran & triton_kernel_names())


def triton_kernel_names() -> set[str]:
    """The names of sphere_fast's Triton kernels (a compiled kernel launches under its function's name)."""
    modules = [importlib.import_module(f"sphere_fast.kernels.{name}") for name in OP_MODULES]
    return {name for module in modules for name, value in vars(module).items() if hasattr(value, "warmup")}


def test_triton_kernel_names() -> None:
    assert {"attention_fwd_kernel", "adaln_fwd_kernel", "sphere_noise_kernel"} <= triton_kernel_names()


def test_a_failing_pass_only_warns(
    emulated_cuda_graphs: CudaGraphEmulator, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    """The pass is only a speed-up: if it fails, the warm-up compiles the kernels and the images are the same."""
    from sphere_fast import sampling

    model = tiny_model()
    labels, seeds = torch.tensor([1, 2]), torch.tensor([5, 6])
    expected = Sampler(model, 2, 2, cfg=1.4, dtype=torch.float32)(labels, seeds)

    @contextlib.contextmanager
    def broken_pass():
        raise RuntimeError("AsyncCompileMode is not there")
        yield

    with mock.patch.object(sampling, "compile_pass", broken_pass), caplog.at_level("WARNING", logger="sphere_fast"):
        images = Sampler(model, 2, 2, cfg=1.4, dtype=torch.float32)(labels, seeds)
    assert torch.equal(images, expected)
    assert "compiling the sampling loop's kernels ahead failed" in caplog.text


# --------------------------------------------------------------------------------- sm_90a, in a child process


def loop_compiles() -> dict:
    """Run in a child process (interpreter off, the stand-in driver): a tiny bf16 model's sampler loop (2 steps,
    CFG, three blocks a network) inside a compile pass, running the first and last blocks as the sampler's does,
    then once more with every block, its launches compiling only. Returns the names of the kernels each run
    asked to compile, how many kernels the first compiled (one per specialization) and the names of the
    launchers it built."""
    from triton.runtime.jit import JITFunction

    launchers: list[str] = []

    class RecordedLauncher:  # stands in for the C launcher a GPU driver builds with gcc
        def __init__(self, src, metadata) -> None:
            launchers.append(src.fn.__name__)

    sm90.compile_ops_on_cpu(RecordedLauncher)
    compiled: list[str] = []  # a call per launch in the pass (the compiles are shared by Triton's cache key)
    kernels: set[JITFunction] = set()
    compile_ = JITFunction._do_compile

    def recording_compile(self, *args, **kwargs):
        compiled.append(self.__name__)
        kernels.add(self)
        return compile_(self, *args, **kwargs)

    model = tiny_model(layers=3).to(torch.bfloat16).eval()
    sampler = Sampler(model, 2, 2, cfg=1.4, dtype=torch.bfloat16, cuda_graph=False)
    key = GraphKey(2, 2, guidance(model, 1.4, "combo"), True, False, torch.bfloat16, "triton")
    inputs = (torch.tensor([1, 2]), torch.tensor([5, 6]), torch.ones(()))
    with mock.patch.object(JITFunction, "_do_compile", recording_compile), use_backend("triton"):
        with compile_pass(), representative_blocks():
            sampler.loop(key, *inputs, capture=True)
        first = list(compiled)
        specializations = sum(len(kernel.device_caches[0][0]) for kernel in kernels)
        with _util.launches_compile_only():  # outside a pass: every block runs
            sampler.loop(key, *inputs, capture=True)
    return {"first": first, "again": compiled[len(first):], "specializations": specializations, "launchers": launchers}


def launched_kernels() -> set[str]:
    """The names of the kernels the same loop launches, run here (under the interpreter on CPU)."""
    names: set[str] = set()
    runner = _util.kernel_runner

    def recording_runner(kernel, grid, compile_only=False):
        names.add(kernel.fn.__name__)
        return runner(kernel, grid, compile_only)

    model = tiny_model().to(torch.bfloat16).eval()
    sampler = Sampler(model, 2, 2, cfg=1.4, dtype=torch.bfloat16, cuda_graph=False)
    with contextlib.ExitStack() as stack, use_backend("triton"):
        for name in OP_MODULES:
            module = importlib.import_module(f"sphere_fast.ops.{name}")
            stack.enter_context(mock.patch.object(module, "kernel_runner", recording_runner))
        sampler(torch.tensor([1, 2]), torch.tensor([5, 6]))
    return names


@pytest.mark.skipif(DEVICE != "cpu", reason="the stand-in driver replaces CUDA's")
def test_one_pass_compiles_every_kernel_of_the_sampler_loop_for_sm90(tmp_path: Path) -> None:
    result = sm90.call_in_compile_child("tests.test_compile_pass:loop_compiles", tmp_path)
    assert result["again"] == [], "the full loop compiled again: the pass missed what its launches look up"
    assert set(result["first"]) == launched_kernels()
    assert set(result["launchers"]) == set(result["first"])
    assert len(result["launchers"]) == result["specializations"], "each kernel compiled gets its launcher built"
