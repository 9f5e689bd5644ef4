"""The backend registry: choice by argument, context and environment; clear errors; logged once."""

import ast
import inspect
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sphere_fast
from sphere_fast import backend, ops
from sphere_fast.backend import constant_under_compile, resolve_backend
from sphere_fast.nn.layers import fused_mlp_enabled
from sphere_fast.ops._tuning import autotune_enabled


def test_constant_mark_is_torch_compilers_own() -> None:
    """constant_under_compile marks a function exactly as torch.compiler.assume_constant_result does (which
    imports torch._dynamo to do it); the fullgraph compile tests check that dynamo honours the mark."""

    def theirs() -> int:
        return 0

    def ours() -> int:
        return 0

    assert torch.compiler.assume_constant_result(theirs) is theirs
    assert constant_under_compile(ours) is ours
    assert ours.__dict__ == theirs.__dict__ != {}


SAMPLE_ON_TRITON = """
import sys, torch, sphere_fast
print('torch._dynamo' in sys.modules)
size = {"width": 32, "layers": 1, "heads": 2}
model = sphere_fast.SphereEncoder(input_size=16, patch_size=4, vit_enc_model_size=size, vit_dec_model_size=size,
                                  token_channels=4, num_classes=10).eval()
with sphere_fast.use_backend("triton"):
    sphere_fast.Sampler(model, 2, 2, cfg=1.4, dtype=torch.float32)(torch.tensor([1, 2]), torch.tensor([3, 4]))
print('torch._dynamo' in sys.modules)
"""


def test_import_and_fused_sampling_do_not_load_dynamo() -> None:
    """Importing torch._dynamo takes seconds: neither the import nor a first sampler call through the fused
    ops (Triton, in the interpreter here) may pull it in, or every cold start pays it."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", SAMPLE_ON_TRITON], capture_output=True, text=True, timeout=300,
                         env=env, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_context_manager_nests_and_restores(monkeypatch):
    monkeypatch.delenv("SPHERE_FAST_BACKEND", raising=False)
    assert sphere_fast.active_backend() == "auto"
    with sphere_fast.use_backend("eager"):
        assert sphere_fast.active_backend() == "eager"
        with sphere_fast.use_backend("auto"):
            assert sphere_fast.active_backend() == "auto"
        assert sphere_fast.active_backend() == "eager"
    assert sphere_fast.active_backend() == "auto"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("SPHERE_FAST_BACKEND", "eager")
    assert sphere_fast.active_backend() == "eager"
    monkeypatch.setenv("SPHERE_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="SPHERE_FAST_BACKEND"):
        sphere_fast.active_backend()


@pytest.mark.parametrize("name, read, default", [
    ("SPHERE_FAST_AUTOTUNE", autotune_enabled, True), ("SPHERE_FAST_FUSED_MLP", fused_mlp_enabled, False),
], ids=["autotune", "fused-mlp"])
def test_on_off_switches_take_0_or_1(monkeypatch, name, read, default):
    """Unset or empty keeps the default, 0 and 1 set it; a spelling such as ``true`` is refused by name instead
    of leaving the default in force."""
    monkeypatch.delenv(name, raising=False)
    assert read() is default
    for value, expected in (("", default), ("0", False), ("1", True)):
        monkeypatch.setenv(name, value)
        assert read() is expected
    for typo in ("true", "off", " 1", "2"):
        monkeypatch.setenv(name, typo)
        with pytest.raises(ValueError, match=re.escape(f"{name} must be 0 or 1 (or unset), got {typo!r}")):
            read()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        with sphere_fast.use_backend("cuda"):
            pass
    with pytest.raises(ValueError, match="backend must be one of"):
        sphere_fast.ops.spherify(torch.ones(2, 3), backend="numpy")


def test_auto_is_eager_on_cpu_and_argument_wins():
    cpu = torch.device("cpu")
    assert resolve_backend("unit_op", cpu, None, ("triton", "cpp", "eager")) == "eager"
    with sphere_fast.use_backend("triton"):
        assert resolve_backend("unit_op", cpu, "eager", ("triton",)) == "eager"


def test_unavailable_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="not available"):
        resolve_backend("unit_op", torch.device("cpu"), "triton", ("triton",))


def test_the_interpreter_flag_is_read_at_each_resolution(monkeypatch):
    """The memoized resolution is keyed on TRITON_INTERPRET: turning it off in a process makes triton on CPU
    unavailable again instead of answering from the cache."""
    if not backend.triton_importable():
        pytest.skip("triton is not installed")
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("flag_op", cpu, "triton", ("triton",)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="not available"):
        resolve_backend("flag_op", cpu, "triton", ("triton",))


def test_available_backends_lists_eager_first():
    names = sphere_fast.available_backends("cpu")
    assert names[0] == "eager" and set(names) <= {"eager", "triton", "cpp"}


def test_triton_runs_on_cuda_unless_interpreting_and_on_cpu_only_then(monkeypatch):
    monkeypatch.setattr(backend, "triton_importable", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not backend.triton_interpreting()
    assert backend.triton_usable(torch.device("cuda")) and not backend.triton_usable(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not backend.triton_usable(torch.device("cuda")) and backend.triton_usable(torch.device("cpu"))


def test_triton_needs_triton(monkeypatch):
    monkeypatch.setattr(backend, "triton_importable", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not backend.triton_usable(torch.device("cpu")) and not backend.triton_usable(torch.device("cuda"))


def test_cpp_needs_a_cpp_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert backend.cpp_missing.__wrapped__() == "its C++ compiler 'no-such-compiler-here' is not on PATH (set CXX)"


def test_cpp_needs_ninja(monkeypatch):
    def no_ninja() -> None:
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr("torch.utils.cpp_extension.verify_ninja_availability", no_ninja)
    assert backend.cpp_missing.__wrapped__() == "ninja, which it builds with, is not on PATH (pip install ninja)"


def test_a_cpp_backend_not_available_says_what_it_lacks(monkeypatch):
    monkeypatch.setattr(backend, "cpp_missing", lambda: "its C++ compiler 'cc' is not on PATH (set CXX)")
    backend._resolve.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"not available for lacking_op on cpu \(available: \['eager'.*\]; .*; "
                                               r"cpp: its C\+\+ compiler 'cc' is not on PATH \(set CXX\)\)"):
            resolve_backend("lacking_op", torch.device("cpu"), "cpp", ("cpp",))
    finally:
        backend._resolve.cache_clear()


def test_the_pip_ninja_is_put_on_path_when_path_has_none(monkeypatch, tmp_path):
    """A venv's python run by its full path has the venv's bin folder, where pip put ninja, off PATH: the cpp
    backend was dropped for want of a ninja it had."""
    import shutil

    import ninja

    monkeypatch.setenv("CXX", shutil.which("c++"))  # by its full path: PATH here holds an empty folder only
    monkeypatch.setenv("PATH", str(tmp_path))
    backend.put_pip_ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep) == [ninja.BIN_DIR, str(tmp_path)]
    assert backend.cpp_missing.__wrapped__() is None


def test_cpp_runs_on_cuda_only_where_its_cuda_kernels_build(monkeypatch):
    """A CUDA torch without nvcc builds the extension for the CPU: asking for cpp on CUDA must then say that
    cpp is not available there, not fail in the dispatcher at the first call."""
    monkeypatch.setattr(backend, "cpp_buildable", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for buildable in (False, True):
        monkeypatch.setattr(backend, "cuda_build_possible", lambda: buildable)
        assert ("cpp" in sphere_fast.available_backends("cuda")) is buildable
        assert "cpp" in sphere_fast.available_backends("cpu")


def test_no_gpu_backend_is_listed_for_cuda_without_a_gpu(monkeypatch):
    """Without a visible GPU nothing runs on CUDA but the reference, even where triton imports and the cpp CUDA
    kernels would build (TORCH_CUDA_ARCH_LIST); triton still runs on CPU tensors in the interpreter."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(backend, "triton_importable", lambda: True)
    monkeypatch.setattr(backend, "cpp_buildable", lambda: True)
    monkeypatch.setattr(backend, "cuda_build_possible", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert sphere_fast.available_backends("cuda") == ["eager"] and not backend.triton_usable(torch.device("cuda"))
    with pytest.raises(RuntimeError, match=r"not available for no_gpu_op on cuda \(available: \['eager'\]"):
        resolve_backend("no_gpu_op", torch.device("cuda"), "cpp", ("cpp",))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert sphere_fast.available_backends("cuda") == ["eager"]
    assert sphere_fast.available_backends("cpu") == sphere_fast.available_backends() == ["eager", "triton", "cpp"]


def test_choice_is_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="sphere_fast"):
        for _ in range(3):
            resolve_backend("logged_op", torch.device("cpu"), "eager", ("eager",))
    assert sum("logged_op" in r.getMessage() for r in caplog.records) == 1


def test_each_op_has_a_reference_taking_its_arguments():
    """``ops.<op>_reference`` beside each op, taking the op's positional arguments in the op's order (so that a
    test or a user can swap one for the other); the pair's reference is the single op's at each scale."""
    not_computations = {"attention_impl", "attention_impls", "philox_randn"}

    def positional(fn) -> list[str]:
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds]

    for name in sorted(set(ops.__all__) - not_computations):
        if name.endswith("_reference") or name == "spherify_noise_pair":
            continue
        reference = getattr(ops, f"{name}_reference", None)
        assert reference is not None, f"ops.{name} has no ops.{name}_reference"
        op_args = positional(getattr(ops, name))
        assert positional(reference)[: len(op_args)] == op_args, name


def test_public_names_have_docstrings_and_the_package_ships_py_typed():
    """``help()`` explains every public function and class (the references' dtype rules differ from the fused ops'
    in small ways), and the PEP 561 marker ships, so type checkers read the installed package's hints."""
    for module in (sphere_fast, ops):
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):  # __doc__: a class's is not inherited
                assert (obj.__doc__ or "").strip(), f"{module.__name__}.{name} has no docstring"
    assert (Path(sphere_fast.__file__).parent / "py.typed").is_file()
    setup = ast.parse((Path(__file__).resolve().parents[1] / "setup.py").read_text())
    call = next(n for n in ast.walk(setup) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    package_data = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "package_data"))
    assert "py.typed" in package_data["sphere_fast"]


def test_another_threads_compile_leaves_this_threads_checks_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compiler.is_compiling() is one flag for the whole process, up while any thread compiles: with it up
    as another thread's compile leaves it, this thread still checks values (a label out of range, a NaN scale),
    and under a non-strict export (fake tensors in this thread) it traces."""
    from tests.tiny import tiny_batch, tiny_model

    monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True)
    assert torch.compiler.is_compiling() and not backend.tracing()
    x, _ = tiny_batch(2)
    with pytest.raises(ValueError, match="labels must be in"):
        tiny_model().encoder(x, torch.tensor([0, 99]))
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.spherify_noise(torch.randn(2, 8), torch.tensor([0.5, float("nan")]), seeds=torch.tensor([1, 2]))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        assert backend.tracing()


def test_beyond_first_order_reverse_tells_forward_mode_and_nested_gradients() -> None:
    """Attention takes SDPA's math kernel (scores kept: memory) only where it must: forward mode or nested gradients;
    one torch.func.grad keeps the flash kernel, whose first-order backward it can use."""
    import torch.autograd.forward_ad as fwad

    from sphere_fast.backend import beyond_first_order_reverse

    seen: dict[str, bool] = {}

    def probe(name: str):
        def f(t: torch.Tensor) -> torch.Tensor:
            seen[name] = beyond_first_order_reverse()
            return t.sin().sum()
        return f

    t = torch.ones(3)
    probe("plain")(t)
    torch.func.grad(probe("grad"))(t)
    torch.func.vmap(probe("vmap"))(t.reshape(3, 1))
    torch.func.grad(lambda u: torch.func.grad(probe("grad of grad"))(u).sum())(t)
    torch.func.jvp(probe("jvp"), (t,), (t,))
    torch.func.hessian(probe("hessian"))(t)
    with fwad.dual_level():
        probe("dual level")(fwad.make_dual(t, t))
    assert seen == {"plain": False, "grad": False, "vmap": False, "grad of grad": True, "jvp": True,
                    "hessian": True, "dual level": True}
