"""Seconds to compile a sampler loop's Triton kernels and build their C launchers with empty caches, on this
machine's CPU: one by one, as the first launches of a first call do it, and in the compile pass that the
``Sampler`` runs before its first capture (``sphere_fast.ops._util.compile_pass``); then that pass again in a
later process, on the cache the first filled (what a warm start's pass costs the host).

    python -m benchmarks.compile_times [--model sphere-l-imagenet] [--layers 2] [--rounds 3]

No GPU is used. Each way runs in a fresh process (the three alternate, ``--rounds`` times), the first two with
an empty Triton cache: the loop (batch 1, 2 steps, CFG 1.4, bf16, backend triton) runs on CPU tensors with
Triton's driver replaced by ``tests/sm90.py``'s stand-in, so each kernel compiles for sm_90a, for the arguments of
its launch; each launcher is built with gcc against a stub libcuda made here, whose driver functions all fail,
and loads (nothing is launched). The warm pass leaves out what a GPU adds: loading the kernels onto it, and the
first use of torch's own CUDA kernels and libraries.
The model keeps the preset's widths and heads with ``--layers`` blocks a network: every block runs the same
kernels. A process's time is that of the loop with the compiles less that of the same loop run again (the
compiles then cached in memory). Prints one line per run and the median of each way. "One by one" compiles a
tuned kernel's candidates one by one too, where a first call without the pass compiled them side by side
(``_tuning.compile_ahead``): for those kernels it overstates that first call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD_MODES = ("one by one", "compile pass")
# each way: its child's mode and the Triton cache folder it runs on; the warm pass runs right after the cold pass
# of its round, on the cache that one filled
WAYS = {"one by one": ("one by one", "one-by-one"), "compile pass": ("compile pass", "pass"),
        "compile pass, warm cache": ("compile pass", "pass")}


# The driver functions a Triton 3.6 launcher imports (`nm -D --undefined-only` of the built modules): with them
# the stub lets a launcher load, as on a GPU machine, so a warm cache's launchers are loaded, not built again.
DRIVER_SYMBOLS = ("cuCtxGetCurrent", "cuCtxSetCurrent", "cuDeviceGet", "cuDevicePrimaryCtxRetain",
                  "cuFuncSetAttribute", "cuGetErrorString", "cuPointerGetAttribute")
CUDA_ERROR_NOT_SUPPORTED = 801


def stub_libcuda(folder: Path) -> Path:
    """A libcuda.so whose driver functions all fail, enough for gcc to link Triton's launchers and for them to
    load where no driver is installed (nothing is launched)."""
    source = folder / "stub.c"
    failing = (f"int {name}(void) {{ return {CUDA_ERROR_NOT_SUPPORTED}; }}\n" for name in DRIVER_SYMBOLS)
    source.write_text("".join(failing))
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(folder / "libcuda.so.1"), str(source)], check=True)
    (folder / "libcuda.so").symlink_to("libcuda.so.1")
    return folder


def child(way: str, model_name: str, layers: int) -> dict[str, float]:
    """In a fresh process (interpreter off): the loop with its compiles, then again; seconds, kernel count and the
    launchers gcc built."""
    import torch
    from triton.backends.nvidia.driver import CudaLauncher
    from triton.runtime import build as triton_build
    from triton.runtime.jit import JITFunction

    from sphere_fast import MODEL_SIZES, PRESETS, SphereEncoder, use_backend
    from sphere_fast.model import representative_blocks
    from sphere_fast.ops import _util
    from sphere_fast.sampling import GraphKey, Sampler, guidance
    from tests import sm90

    sm90.compile_ops_on_cpu(CudaLauncher)
    compiled: set[JITFunction] = set()
    compile_ = JITFunction._do_compile

    def recording_compile(self, *args, **kwargs):
        compiled.add(self)
        kernel = compile_(self, *args, **kwargs)
        if way == "one by one":  # its launcher is built right after its compile, as its first launch does
            _util._build_launcher(kernel)
        return kernel

    JITFunction._do_compile = recording_compile
    builds = []  # a launcher's C module compiled by gcc: none when the cache holds every one and each loads
    build_ = triton_build._build
    triton_build._build = lambda *args, **kwargs: builds.append(args[0]) or build_(*args, **kwargs)
    config = dict(PRESETS[model_name]["config"])
    for network in ("vit_enc_model_size", "vit_dec_model_size"):
        config[network] = {**MODEL_SIZES[config[network]], "layers": layers}
    torch.manual_seed(0)
    model = SphereEncoder(**config).to(torch.bfloat16).eval()
    sampler = Sampler(model, 1, 2, cfg=1.4, dtype=torch.bfloat16, cuda_graph=False)
    key = GraphKey(1, 2, guidance(model, 1.4, "combo"), True, False, torch.bfloat16, "triton")
    inputs = (torch.tensor([1]), torch.tensor([5]), torch.ones(()))

    def run(in_pass: bool) -> float:
        start = time.perf_counter()
        with use_backend("triton"), torch.no_grad():
            if in_pass:  # as the sampler's: each network's first and last blocks
                with _util.compile_pass(), representative_blocks():
                    sampler.loop(key, *inputs, capture=True)
            else:  # launches only compile (the stand-in driver cannot launch), each in this thread when reached
                with _util.launches_compile_only():
                    sampler.loop(key, *inputs, capture=True)
        return time.perf_counter() - start

    first = run(way == "compile pass")
    again = run(way == "compile pass")
    kernels = sum(len(kernel.device_caches[0][0]) for kernel in compiled)
    return {"seconds": first - again, "loop_seconds": again, "kernels": kernels, "launcher_builds": len(builds)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sphere-l-imagenet")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=CHILD_MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.model, args.layers)))
        return
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        libcuda = stub_libcuda(Path(tmp))
        # where a launcher, loading, finds the stub
        library_path = os.pathsep.join(filter(None, (str(libcuda), os.environ.get("LD_LIBRARY_PATH"))))
        for round_ in range(args.rounds):
            for way, (mode, folder) in WAYS.items():
                cache = Path(tmp) / f"triton-{round_}-{folder}"
                env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(cache),
                       "TRITON_LIBCUDA_PATH": str(libcuda),
                       "LD_LIBRARY_PATH": library_path}
                proc = subprocess.run(
                    [sys.executable, "-m", "benchmarks.compile_times", "--child", mode, "--model", args.model,
                     "--layers", str(args.layers)],
                    cwd=ROOT, env=env, capture_output=True, text=True,
                )
                if proc.returncode != 0:
                    raise SystemExit(f"{way}: the child process failed:\n{proc.stderr[-4000:]}")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                seconds[way].append(result["seconds"])
                print(f"round {round_ + 1}, {way}: {result['seconds']:.2f} s for {result['kernels']} kernels, "
                      f"{result['launcher_builds']} launchers built (the loop itself {result['loop_seconds']:.2f} s)",
                      flush=True)
    print(", ".join(f"{way}: median {statistics.median(s):.2f} s" for way, s in seconds.items()))


if __name__ == "__main__":
    main()
