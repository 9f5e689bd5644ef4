"""Launch configs picked by timing: on a GPU, each candidate is timed once per key and the fastest is kept.

A kernel's candidates are meant to compute the same result (the same sums in the same order), so that the
choice, which can differ between processes, machines and batch sizes, changes the speed and never the output;
the tuning checks it, bit for bit, on the call it tunes. The attention kernels' candidates differ only in
warps, pipeline stages and the tile of the dimension a program owns. ``SPHERE_FAST_AUTOTUNE=0`` turns timing
off: the first (default) candidate always runs.

Each choice is also written to disk (a JSON file per key, in ``sphere_fast_tuning`` beside Triton's kernel
cache, or in ``$SPHERE_FAST_TUNING_CACHE``; ``0`` there keeps choices in memory only), so that a later process
on the same kind of GPU, with the same kernels, Triton and torch, launches the choice without compiling and
timing every candidate again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from sphere_fast._env import env_switch
from sphere_fast._files import replaced_atomically
from sphere_fast._once import ForkSafeLock
from sphere_fast.ops._util import compile_pass, compiling_only, first_in_pass

C = TypeVar("C", bound=Hashable)
TIMED_LAUNCHES = 5
QUEUE_AHEAD_CYCLES = 1_000_000  # about 0.5 ms of GPU wait: long enough to queue the timed launches behind it

logger = logging.getLogger("sphere_fast")
_chosen: dict[Hashable, Hashable] = {}
# Tuning takes turns in a process: two threads timing at once on one GPU would each time the other's kernels as
# well as its own, and would tune a key they both missed twice.
_tuning_turns = ForkSafeLock()


def autotune_enabled() -> bool:
    return env_switch("SPHERE_FAST_AUTOTUNE", default=True)


def stored_choices_folder() -> Path | None:
    """Where choices are written for later processes; None when SPHERE_FAST_TUNING_CACHE is 0."""
    folder = os.environ.get("SPHERE_FAST_TUNING_CACHE")
    if folder == "0":
        return None
    if folder:
        return Path(folder)
    try:
        from triton import knobs

        triton_cache = Path(knobs.cache.dir)
    except ImportError:  # no Triton: its default folder
        triton_cache = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    return triton_cache / "sphere_fast_tuning"


@functools.cache
def _code_id() -> str:
    """The kernels and launchers a choice was timed with: sphere_fast's ops and kernels sources, Triton's and
    torch's versions."""
    import triton

    import sphere_fast.kernels

    digest = hashlib.sha256(f"{triton.__version__} {torch.__version__} {torch.version.cuda}".encode())
    for folder in (Path(__file__).parent, Path(sphere_fast.kernels.__file__).parent):
        for source in sorted(folder.glob("*.py")):
            digest.update(source.read_bytes())
    return digest.hexdigest()


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _portable(key: Any) -> Any:
    """The key with each device replaced by its model's name: a choice holds for every GPU of that model."""
    if isinstance(key, torch.device):
        return _device_name(key)
    if isinstance(key, tuple):
        return tuple(_portable(part) for part in key)
    return key


def _stored_choice_path(key: Hashable) -> Path | None:
    folder = stored_choices_folder()
    if folder is None:
        return None
    name = hashlib.sha256(f"{_code_id()} {_portable(key)!r}".encode()).hexdigest()[:40]
    return folder / f"{name}.json"


def _as_tuples(value: Any) -> Any:
    # JSON writes a tuple as a list: back to the candidates' tuples
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def _stored_choice(key: Hashable, candidates: Sequence[C]) -> C | None:
    """The candidate an earlier process wrote for ``key`` (the candidate itself: JSON keeps only its values), if it
    is still one of them."""
    try:
        path = _stored_choice_path(key)
        if path is None or not path.exists():
            return None
        config = _as_tuples(json.loads(path.read_text())["config"])
    except Exception as exc:  # unreadable or written by another version: tune again
        logger.info("sphere_fast: %s: no stored launch config read (%r)", key, exc)
        return None
    # the launchers read a NamedTuple's fields and type, which a tuple of its values equals but lacks
    return next((candidate for candidate in candidates if candidate == config), None)


def _store_choice(key: Hashable, config: Hashable) -> None:
    """Write the choice for later processes (atomically: a reader sees the whole file or none). Only a
    speed-up: a failure is logged."""
    try:
        path = _stored_choice_path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(path) as partial:
            partial.write_text(json.dumps({"key": repr(_portable(key)), "config": config}))
    except Exception as exc:
        logger.info("sphere_fast: %s: the launch config was not stored (%r)", key, exc)


def time_launch_ms(launch: Callable[[], object]) -> float:
    """Mean milliseconds of ``launch()`` over TIMED_LAUNCHES back-to-back launches, after one untimed launch
    (which compiles the kernel). The GPU first waits while the launches are queued, so their host cost (which
    a CUDA graph does not pay) stays out of the time of small kernels."""
    launch()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(QUEUE_AHEAD_CYCLES)
    start.record()
    for _ in range(TIMED_LAUNCHES):
        launch()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / TIMED_LAUNCHES


def _out_of_resources() -> type[Exception]:
    from triton.runtime.errors import OutOfResources

    return OutOfResources


def compile_ahead(key: Hashable, candidates: Sequence[C], precompile: Callable[[C], object]) -> None:
    """``precompile(config)`` for every candidate at once (``compile_pass``), so tuning waits about as long as
    the slowest compile rather than their sum. Only a speed-up: a candidate whose compile fails here compiles
    again at its first launch, which raises its error, and any failure of the mechanism itself is logged and
    ignored."""
    try:
        with compile_pass():
            for config in candidates:
                precompile(config)
    except Exception as exc:  # the candidates then compile one by one, as they are timed
        logger.warning("sphere_fast: %s: compiling the candidates ahead failed (%r); each compiles at its launch",
                       key, exc)


def _compiled(key: Hashable, candidates: Sequence[C], precompile: Callable[[C], object]) -> list[C]:
    """The candidates that compile: each is compiled again (a cache hit after compile_ahead), and one whose
    compile fails while the default's succeeds (a Triton version that no longer compiles a variant) is dropped
    with a warning. If the default does not compile this way either, all are kept: each then compiles at its
    timed launch, which raises the default's own error."""
    try:
        precompile(candidates[0])
    except Exception:
        return list(candidates)
    kept = [candidates[0]]
    for config in candidates[1:]:
        try:
            precompile(config)
        except Exception as exc:
            logger.warning("sphere_fast: %s: config %s does not compile (%s); not used", key, config,
                           _error_summary(exc))
            continue
        kept.append(config)
    return kept


def _error_summary(exc: Exception) -> str:
    """The error's type and last line: Triton's CompilationError puts its message after a source excerpt."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1].strip()}" if lines else type(exc).__name__


def pick_config(
    key: Hashable,
    candidates: Sequence[C],
    launch: Callable[[C], object],
    outputs: Sequence[torch.Tensor] = (),
    timer: Callable[[Callable[[], object]], float] | None = None,
    precompile: Callable[[C], object] | None = None,
) -> C:
    """The config to launch with for ``key``: the fastest of ``candidates`` that computes the same bits.

    ``launch(config)`` runs the kernel on the call's own tensors and writes only ``outputs``. On the first call
    with a new key each candidate is timed (``timer``, default time_launch_ms) and the choice is remembered. A
    remembered choice that is not among this call's candidates (attention's forward leaves out the configs that do
    not apply to a call's memory layout, which its key does not hold) is not launched: the key is tuned again
    among them, and their choice replaces it.
    The first candidate that runs sets the expected result: a later one whose ``outputs`` differ in any bit is
    dropped with a warning (the choice may change the speed, never the result; this holds a copy of the
    outputs while tuning, and a call whose outputs are not all finite decides nothing). A candidate that does
    not fit the GPU (Triton's OutOfResources: shared memory, registers) is skipped. ``precompile(config)``, if
    given, compiles a candidate without launching it: then all are compiled at once first (compile_ahead), and
    a candidate other than the default that does not compile is skipped (``_compiled``).
    Without timing (one candidate, SPHERE_FAST_AUTOTUNE=0, inside a CUDA-graph capture, where the
    synchronization would break the capture, or inside a ``compile_pass``, which compiles every candidate at
    the key's first launch in the pass) the first candidate is returned and nothing is remembered. A choice
    stored by an earlier process (module docstring) is taken as it is, inside a pass too (which then compiles
    it alone)."""
    if len(candidates) == 1 or not autotune_enabled():
        return candidates[0]
    chosen = _chosen.get(key)
    if chosen is not None and chosen in candidates:
        return chosen  # type: ignore[return-value]
    with _tuning_turns:
        return _pick_unchosen(key, candidates, launch, outputs, timer, precompile)


def _pick_unchosen(
    key: Hashable,
    candidates: Sequence[C],
    launch: Callable[[C], object],
    outputs: Sequence[torch.Tensor],
    timer: Callable[[Callable[[], object]], float] | None,
    precompile: Callable[[C], object] | None,
) -> C:
    chosen = _chosen.get(key)  # by a thread this one waited for
    if chosen is not None and chosen in candidates:
        return chosen  # type: ignore[return-value]
    if compiling_only() and not first_in_pass(key):
        return candidates[0]  # its candidates were compiled at the key's first launch in this pass
    stored = _stored_choice(key, candidates)
    if stored is not None:
        _chosen[key] = stored
        logger.info("sphere_fast: %s uses %s, as tuned by an earlier process", key, stored)
        return stored
    if compiling_only():  # a compile pass: every candidate compiles with the pass's kernels, timed at the real call
        compile_ahead(key, candidates, precompile or launch)
        return candidates[0]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return candidates[0]
    if precompile is not None:
        compile_ahead(key, candidates, precompile)
        candidates = _compiled(key, candidates, precompile)
    timer = timer or time_launch_ms
    times: dict[C, float] = {}
    expected: list[torch.Tensor] | None = None
    for config in candidates:
        try:
            ms = timer(lambda: launch(config))
        except _out_of_resources() as exc:
            logger.info("sphere_fast: %s: config %s does not fit (%s)", key, config, exc)
            continue
        if expected is None:
            expected = [t.clone() for t in outputs]
            if not all(bool(t.isfinite().all()) for t in expected):
                return candidates[0]  # inf / nan outputs cannot tell a changed result: decide on another call
        elif not all(torch.equal(t, e) for t, e in zip(outputs, expected)):
            logger.warning("sphere_fast: %s: config %s changes the result's bits; not used", key, config)
            continue
        times[config] = ms
    if not times:
        raise RuntimeError(f"sphere_fast: no launch config of {key} fits this GPU: {list(candidates)}")
    best = min(times, key=times.__getitem__)  # ties keep the earlier (default) candidate
    _chosen[key] = best
    _store_choice(key, best)
    logger.info(
        "sphere_fast: %s tuned to %s (%s)", key, best, ", ".join(f"{c}: {ms:.3f} ms" for c, ms in times.items())
    )
    return best


def launch_tuned(
    key: Hashable, candidates: Sequence[C], launch: Callable[..., object], outputs: Sequence[torch.Tensor]
) -> None:
    """How the ops launch a tuned kernel: ``launch(config)`` with pick_config's choice, where
    ``launch(config, compile_only=True)`` compiles a candidate without launching it (its precompile)."""
    launch(pick_config(key, candidates, launch, outputs, precompile=functools.partial(launch, compile_only=True)))


def tuned_configs() -> dict[str, str]:
    """The launch configs this process tuned or read so far, by key (both as text): what its kernels ran."""
    return {str(key): str(config) for key, config in _chosen.items()}


def forget_tuned_configs() -> None:
    """Drop every choice this process remembers (the next call of each key reads a stored choice, or with
    SPHERE_FAST_TUNING_CACHE=0 times its candidates again)."""
    _chosen.clear()
