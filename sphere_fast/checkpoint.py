"""Checkpoints: one folder per save, written atomically.

    <dir>/step-00000500/model.safetensors   live weights, official key names, config in the metadata
                        ema.safetensors     EMA weights (training checkpoints)
                        trainer_state.pt    step, optimiser state, every process's RNG state
                        config.json         model constructor arguments (+ the run config)
                        manifest.json       format tag, step and the SHA-256 of every file above
    <dir>/latest                            name of the newest complete checkpoint

A save writes a hidden temporary folder, fsyncs it, renames it into place and only then repoints
``latest`` (write + os.replace), so a process killed during a save leaves the previous checkpoint
intact. Loading checks the manifest's hashes and the model config before touching any weights."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sphere_fast._checks import check_int
from sphere_fast._files import replaced_atomically
from sphere_fast._warn import warn
from sphere_fast.model import ROPE_BUFFERS, WRAPPER_PREFIXES, SphereEncoder, check_model, resolve_model_size
from sphere_fast.training import Trainer  # a real import, not for type checkers only: get_type_hints reads it

# the public API (the rest is the library's own)
__all__ = [
    "checkpoint_to_official", "latest_checkpoint", "load_checkpoint", "official_to_checkpoint", "read_official",
    "resolve_checkpoint", "save_checkpoint", "verify_checkpoint", "weights_sha256",
]

FORMAT = "sphere_fast-checkpoint/1"
MODEL_FILE, EMA_FILE, STATE_FILE, CONFIG_FILE, MANIFEST_FILE = (
    "model.safetensors", "ema.safetensors", "trainer_state.pt", "config.json", "manifest.json",
)
LATEST = "latest"
CHECKPOINT_FILES = (MODEL_FILE, EMA_FILE, STATE_FILE, CONFIG_FILE)  # what a manifest lists, and a load reads


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_safetensors(state: Mapping[str, torch.Tensor], path: Path, config: Mapping[str, Any]) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"format": FORMAT, "config": json.dumps(config)})


def replace_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a temporary file in the same folder, fsynced, then os.replace, so a
    process killed meanwhile leaves the old content whole."""
    with replaced_atomically(path) as tmp:
        tmp.write_text(text)
        _fsync(tmp)


def save_checkpoint(
    directory: str | Path,
    model: SphereEncoder,
    *,
    trainer: Trainer | None = None,
    run_config: Mapping[str, Any] | None = None,
    name: str | None = None,
    keep: int = 2,
    ema_weights: Mapping[str, torch.Tensor] | None = None,
) -> Path | None:
    """Save under ``directory/name`` (default ``step-<step>``) and point ``latest`` at it; keep the
    newest ``keep`` checkpoints. Under torchrun every process must call it (RNG states are gathered);
    rank 0 writes and returns the path, the others return None. ``ema_weights``: EMA weights to keep beside the
    model's in a checkpoint without a trainer (a converted official file); a trainer saves its own."""
    # checked before anything is written: a compiled or DDP-wrapped model's state_dict keys carry its wrapper's
    # prefix, which no load would match
    check_model(model)
    check_int("keep", keep)
    if name is not None and (not isinstance(name, str) or name in ("", LATEST) or name.startswith(".") or "/" in name):
        raise ValueError(f"name must be a folder name other than {LATEST!r} (no '/', no leading '.'), got {name!r}")
    if ema_weights is not None and trainer is not None:
        raise ValueError("give ema_weights only without a trainer (a trainer's checkpoint holds its own EMA)")
    if ema_weights is not None:
        _check_fits(model.config, ema_weights, "ema_weights")
    directory = Path(directory)
    state = trainer.state_dict() if trainer is not None else None
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    if state is not None:
        rngs = [state["rng"]]
        if distributed:
            rngs = [None] * dist.get_world_size()
            dist.all_gather_object(rngs, state["rng"])
        state["rng"] = rngs
    if rank != 0:
        dist.barrier()
        return None
    step = trainer.step if trainer is not None else 0
    name = name or f"step-{step:08d}"
    final = directory / name
    tmp = directory / f".tmp-{name}-{os.getpid()}"
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".tmp-*"):  # left by a save that was killed (only rank 0 writes here)
        shutil.rmtree(stale, ignore_errors=True)
    for aside in directory.glob(".old-*"):  # a re-save killed between its renames: drop it, or put it back
        saved_as = directory / aside.name.removeprefix(".old-").rsplit("-", 1)[0]
        if saved_as.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(aside, saved_as)
    tmp.mkdir()
    try:
        config = {"model": model.config, "run": dict(run_config) if run_config is not None else None}
        _write_safetensors(model.state_dict(), tmp / MODEL_FILE, model.config)
        files = [MODEL_FILE, CONFIG_FILE]
        if state is not None:
            ema_weights = state.pop("ema")
            torch.save(state, tmp / STATE_FILE)
            files.append(STATE_FILE)
        if ema_weights is not None:
            _write_safetensors(ema_weights, tmp / EMA_FILE, model.config)
            files.append(EMA_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        for f in files:
            _fsync(tmp / f)
        manifest = {"format": FORMAT, "step": step, "files": {f: sha256_file(tmp / f) for f in files}}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / MANIFEST_FILE)
        if final.exists():  # re-saving the same name: move the old one aside first
            old = directory / f".old-{name}-{os.getpid()}"
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:  # the old one back under its name, which latest may name
                os.rename(old, final)
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
    except BaseException:  # a failed write (a full disk) leaves no partial checkpoint taking its space
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(directory)
    replace_text(directory / LATEST, name + "\n")
    _prune(directory, keep, current=name)
    if distributed:
        dist.barrier()
    return final


def _prune(directory: Path, keep: int, current: str) -> None:
    saved = sorted(p for p in directory.glob("step-*") if (p / MANIFEST_FILE).exists())
    for p in saved[: max(0, len(saved) - keep)]:
        if p.name != current:
            shutil.rmtree(p)


def remove_checkpoints(directory: str | Path) -> None:
    """Delete the ``step-*`` checkpoints in ``directory`` and its ``latest``, for a run that starts afresh there:
    pruning would otherwise keep the old run's higher steps over the new run's, and a resume pick the old run."""
    directory = Path(directory)
    (directory / LATEST).unlink(missing_ok=True)  # first: a half-cleared folder is never resumed from
    for path in directory.glob("step-*"):
        shutil.rmtree(path)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint ``directory/latest`` names, or None when there is none yet."""
    pointer = Path(directory) / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if name in ("", ".", "..") or name != Path(name).name:  # a checkpoint beside it: never a path elsewhere
        raise ValueError(f"{pointer} is corrupt: it names {name!r}, not a checkpoint folder beside it")
    path = Path(directory) / name
    if not (path / MANIFEST_FILE).exists():
        raise ValueError(f"{pointer} names {path.name}, which is not a complete checkpoint (no {MANIFEST_FILE})")
    return path


def resume_point(directory: str | Path) -> tuple[int, dict[str, Any]]:
    """The step and the run config (``model``, ``train``, ...; {} if saved without one) of the checkpoint a run
    resumes from in ``directory`` (``latest``), read without loading it: (0, {}) when there is none."""
    last = latest_checkpoint(directory)
    if last is None:
        return 0, {}
    try:
        step = json.loads((last / MANIFEST_FILE).read_text())["step"]
        run = json.loads((last / CONFIG_FILE).read_text())["run"] or {}  # None: saved without a run config
    except (json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"checkpoint {last} is corrupt: {err!r}") from None
    return step, run


def verify_checkpoint(path: str | Path, *, files: Collection[str] | None = None) -> dict[str, Any]:
    """The manifest of a checkpoint folder after checking its format and the SHA-256 of ``files`` (default: every
    file; ``()``: the manifest's form only). The manifest must list the files a load reads, and only those. A load
    hashes the files it reads: sampling from the EMA weights of a training checkpoint, a quarter of its bytes."""
    if isinstance(files, str) or not set(files or ()) <= set(CHECKPOINT_FILES):
        raise ValueError(f"files must be a collection of {CHECKPOINT_FILES}, got {files!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_dir():  # most likely an official .pth, the other format this package reads
        raise ValueError(f"{path} is a file, not a sphere_fast checkpoint folder: convert an official .pth with "
                         "`sphere-fast convert` (official_to_checkpoint) or read its state_dict with read_official")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.exists():
        raise ValueError(f"{path} is not a sphere_fast checkpoint: no {MANIFEST_FILE} (an interrupted save leaves none)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{manifest_path} is corrupt: {err}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{manifest_path} is corrupt: not an object with a 'files' object")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {manifest.get('format')!r}, expected {FORMAT!r}")
    # The manifest says what is checked: it must list the files a load reads, and only those (a name such as
    # ../x or /dev/zero would be read from elsewhere, and an empty list would check nothing).
    listed = set(manifest["files"])
    if listed - set(CHECKPOINT_FILES):
        raise ValueError(f"checkpoint {path} is corrupt: its manifest lists {sorted(listed - set(CHECKPOINT_FILES))}, "
                         f"not checkpoint files ({', '.join(CHECKPOINT_FILES)})")
    required = [f for f in CHECKPOINT_FILES if f in (MODEL_FILE, CONFIG_FILE) or (path / f).exists()]
    unlisted = [f for f in required if f not in listed]
    if unlisted:
        raise ValueError(f"checkpoint {path} is corrupt: its manifest does not list {unlisted}")
    if files is not None and set(files) - listed:
        raise ValueError(f"checkpoint {path} holds no {sorted(set(files) - listed)}")
    for f, digest in manifest["files"].items():
        if not (path / f).is_file():
            raise ValueError(f"checkpoint {path} is incomplete: {f} is missing")
        if files is not None and f not in files:
            continue
        actual = sha256_file(path / f)
        if actual != digest:
            raise ValueError(f"checkpoint {path} is corrupt: {f} has SHA-256 {actual[:16]}..., the manifest says {digest[:16]}...")
    return manifest


SIZE_ARGUMENTS = ("vit_enc_model_size", "vit_dec_model_size")


def _size_or_none(size: Any, argument: str) -> dict[str, int] | None:
    try:
        return resolve_model_size(size, argument)
    except ValueError:
        return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as it is; a folder of checkpoints holding ``latest``, or a run folder holding such a
    ``checkpoints`` folder: the checkpoint ``latest`` names."""
    path = Path(path)
    if (path / "checkpoints" / LATEST).exists():
        path = path / "checkpoints"
    return latest_checkpoint(path) or path


def weights_sha256(path: str | Path, *, ema: bool = False) -> str:
    """The SHA-256 of a checkpoint's weights (its EMA weights with ``ema``) as its manifest records it, which names
    the weights without reading them; ``path`` as ``load_checkpoint`` takes it (which checks the hashes)."""
    path = resolve_checkpoint(path)
    try:
        return json.loads((path / MANIFEST_FILE).read_text())["files"][EMA_FILE if ema else MODEL_FILE]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{path} holds no manifest naming its {'EMA ' if ema else ''}weights ({err!r})") from None


def _check_config(model: SphereEncoder, saved: Mapping[str, Any], where: Path) -> None:
    # a size by name is the same config as its dict ("tiny" is {"width": 64, "layers": 2, "heads": 2})
    saved = {**saved, **{k: model.config[k] for k in SIZE_ARGUMENTS if k in saved and k in model.config
                         and _size_or_none(saved[k], k) == resolve_model_size(model.config[k], k)}}
    diff = {k: (saved.get(k), v) for k, v in model.config.items() if saved.get(k) != v}
    if diff or set(saved) - set(model.config):
        detail = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"checkpoint {where} was saved for a different model config ({detail or sorted(set(saved) - set(model.config))})")


def load_checkpoint(
    path: str | Path, model: SphereEncoder | None = None, *, trainer: Trainer | None = None, ema: bool = False
) -> tuple[SphereEncoder, dict[str, Any]]:
    """Load weights (``ema`` picks the EMA weights) into ``model`` (built from the saved config when
    None, and then returned in eval mode, ready to sample; a model given keeps its mode) and, with ``trainer``,
    its optimiser, EMA, step and RNG state. Returns (model, config.json). The saved config must be the model's
    (a size by name equals its dict).
    A trainer on another number of processes than the checkpoint's resumes with fresh per-process RNG
    seeds (``training.process_seed``) and a warning: its run is no longer bit-identical to an uninterrupted one."""
    path = resolve_checkpoint(path)
    listed = verify_checkpoint(path, files=())["files"]  # the manifest's form: what the checkpoint holds
    if ema and EMA_FILE not in listed:
        raise ValueError(f"checkpoint {path} holds no EMA weights")
    if trainer is not None:  # checked before any weight is replaced
        if ema:
            raise ValueError("ema=True with a trainer would resume training from the EMA weights: load the EMA "
                             "weights into a model of their own")
        if STATE_FILE not in listed:
            raise ValueError(f"checkpoint {path} holds weights only (no trainer state): it cannot resume training")
    weights = path / (EMA_FILE if ema else MODEL_FILE)
    verify_checkpoint(path, files=[CONFIG_FILE, weights.name, *([STATE_FILE, EMA_FILE] if trainer is not None else [])])
    config = json.loads((path / CONFIG_FILE).read_text())
    if trainer is not None:
        model = trainer.model
    if model is None:
        try:
            # on the meta device: nothing is allocated (a config may ask for any size) or initialised before the
            # weights are checked against it
            with torch.device("meta"):
                model = SphereEncoder(**config["model"]).eval()
        except TypeError as err:  # a key this version does not know, e.g. from a newer sphere_fast
            raise ValueError(f"checkpoint {path} holds a model config this sphere_fast cannot build: {err}") from None
    _check_config(model, config["model"], path)
    _check_fits(model.config, _header_tensors(weights), str(weights))
    state = None if trainer is None else _trainer_state(path, trainer)  # read and checked before any change
    if any(p.is_meta for p in model.parameters()):
        # Made on the CPU, in its own dtype, and the weights copied in: tensors assigned from load_file would be
        # views of the file's mapping, changed by a later write to the file and a crash (SIGBUS) once it is cut.
        model.to_empty(device="cpu")
    model.load_state_dict(load_file(str(weights)))
    if state is not None:
        state["ema"] = load_file(str(path / EMA_FILE))  # after the model's weights: the two are not held at once
        trainer.load_state_dict(state)
    return model, config


def _header_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as meta tensors of their stored shapes, read from its header alone."""
    with safe_open(str(file), framework="pt") as stored:
        return {name: torch.empty(stored.get_slice(name).get_shape(), device="meta") for name in stored.keys()}


def _check_fits(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """``tensors`` must be the weights of the model ``config`` builds, by name and shape (checked on a meta model:
    without a second copy of the weights)."""
    with torch.device("meta"):
        check = SphereEncoder(**config)
    try:
        check.load_state_dict(tensors, assign=True)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


def _trainer_state(path: Path, trainer: Trainer) -> dict[str, Any]:
    """The checkpoint's trainer state for this trainer, checked against it (``Trainer.check_state``): the EMA
    weights as meta tensors of their stored shapes (read from the file's header) and this process's RNG state
    (rank 0 warns where the process count differs)."""
    # mapped, not read: the checks read shapes only, and the model's weights load before the state is copied in
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    state["ema"] = _header_tensors(path / EMA_FILE)
    trainer.check_state(state)
    rngs = state["rng"]
    if len(rngs) == trainer.dist.world_size:
        state["rng"] = rngs[trainer.dist.rank]
    else:  # the global batches stay the same; only the per-process random streams cannot carry over
        if trainer.dist.rank == 0:
            warn(
                f"checkpoint {path} was written by {len(rngs)} processes and resumes on "
                f"{trainer.dist.world_size}: weights, optimiser, EMA, step and the data order carry over, but each "
                "process's RNG (noise, flips, label dropout) is seeded afresh, so the run no longer matches an "
                "uninterrupted one bit for bit"
            )
        state["rng"] = None
    return state


# ---- official .pth checkpoints ------------------------------------------------------------------


# The official training checkpoint: {"model": state_dict, "ema_model": SimpleEMA.state_dict(), "epoch", optimizer
# ...}. The EMA dict holds every parameter and buffer by name, the RoPE tables ([1, N, 2 * head_dim]) included,
# which state_dicts leave out (non-persistent); the official loader reads it strictly.
OFFICIAL_EMA_KEY = "ema_model"
CONVERTED = "converted"  # the checkpoint a conversion writes


def _load_official(path: str | Path | IO[bytes]) -> Any:
    # torch.load would raise a bare IsADirectoryError (a buffer, which torch.load reads too, is no folder)
    if isinstance(path, (str, os.PathLike)) and Path(path).is_dir():
        raise ValueError(f"{path} is a folder, not an official .pth: read a sphere_fast checkpoint folder with "
                         "load_checkpoint")
    # Mapped, not read: an official training checkpoint also holds the optimiser's moments (twice the weights).
    # torch.save's legacy format (not a zip) cannot be mapped, nor a file object.
    mapped = isinstance(path, (str, os.PathLike)) and zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0]
        raise ValueError(
            f"{path} holds objects other than tensors and plain containers, which torch.load(weights_only=True) "
            f"refuses ({reason}); if you trust the file, load it with torch.load(path, weights_only=False) and give "
            "its state_dict to SphereEncoder.load_state_dict"
        ) from None


def _state_under(obj: Any, key: str, path: object) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
        obj = obj[key]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = f"keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise ValueError(f"{path} is neither a state_dict nor a dict with a state_dict under {key!r} (it holds "
                         f"{found})")
    state = dict(obj)
    # saved from DDP / torch.compile wrappers, nested either way (torch.compile(DDP(model)): "_orig_mod.module.")
    while prefix := next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _official_rope_tables(model: SphereEncoder) -> dict[str, torch.Tensor]:
    """The RoPE tables as an official EMA dict holds them: [1, N, 2 * head_dim] under ``ROPE_BUFFERS``."""
    return {name: vit.rope_table("cpu").unsqueeze(0) for name, vit in zip(ROPE_BUFFERS, (model.encoder, model.decoder))}


def _without_rope(state: dict[str, torch.Tensor], model: SphereEncoder | None, path: object) -> dict[str, Any]:
    """``state`` less the RoPE tables an official EMA dict holds (a function of the config: no state_dict has them);
    with a ``model``, each is first compared with the model's, the one place a file states its RoPE convention."""
    if model is not None:
        for name, ours in _official_rope_tables(model).items():
            table = state.get(name)
            if table is not None and (table.shape != ours.shape or not torch.allclose(table.float(), ours, atol=1e-6)):
                raise ValueError(f"{path}: its {name} table differs from this model's RoPE table {tuple(ours.shape)} "
                                 f"(got {tuple(table.shape)}): another config or another RoPE convention")
    return {k: v for k, v in state.items() if k not in ROPE_BUFFERS}


def read_official(path: str | Path | IO[bytes], key: str = "model") -> dict[str, torch.Tensor]:
    """The state_dict of an official ``.pth`` (a path or a file object, as ``torch.load`` reads): a plain
    state_dict or a dict holding it under ``key`` (``"model"``, or ``"ema_model"`` for the EMA weights of an
    official training checkpoint). Its tensors are copies, not the file's mapped pages (which a later write to that
    file would change under them)."""
    state = _without_rope(_state_under(_load_official(path), key, path), None, path)
    return {name: tensor.clone() for name, tensor in state.items()}


def official_to_checkpoint(pth: str | Path, out: str | Path, model_config: Mapping[str, Any], key: str = "model") -> Path:
    """Convert an official ``.pth`` to a weights-only sphere_fast checkpoint folder under ``out``: the weights under
    ``key``, and with the default key the file's EMA weights (``ema_model``) too, where it holds them."""
    _check_not_a_run(Path(out))
    obj = _load_official(pth)
    state = _state_under(obj, key, pth)
    with torch.device("meta"):  # it takes the file's tensors (mapped) as they are: no second set of weights
        model = SphereEncoder(**model_config)
    model.load_state_dict(_without_rope(state, model, pth), assign=True)
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    # the file's dtype (bf16, say) kept, not widened to float32; mixed ones become the default dtype
    model.to(dtypes.pop() if len(dtypes) == 1 else torch.get_default_dtype())
    ema = None
    official_ema = obj.get(OFFICIAL_EMA_KEY) if key == "model" and isinstance(obj, Mapping) else None
    if isinstance(official_ema, Mapping):
        if all(isinstance(v, torch.Tensor) for v in official_ema.values()):
            ema = _without_rope(_state_under(obj, OFFICIAL_EMA_KEY, pth), model, pth)
        else:  # the EMA is a bonus here: its layout does not block the weights asked for
            warn(f"{pth}: {OFFICIAL_EMA_KEY!r} holds other objects than tensors; the weights under {key!r} are "
                 "converted without EMA weights")
    path = save_checkpoint(out, model, name=CONVERTED, ema_weights=ema)
    assert path is not None
    return path


def _check_not_a_run(out: Path) -> None:
    """A conversion's folder must hold no checkpoints but an earlier conversion's: saving one there would point
    ``latest`` at weights without trainer state (a resume refuses them) and prune the run's checkpoints."""
    others = sorted(p.name for p in out.glob("step-*"))
    if (out / LATEST).exists() and (out / LATEST).read_text().strip() != CONVERTED:
        others.append(LATEST)
    if others:
        raise ValueError(f"{out} holds a run's checkpoints ({', '.join(others)}): convert into a folder of its own")


def checkpoint_to_official(path: str | Path, out: str | Path) -> Path:
    """Write ``{"model": state_dict[, "ema_model": EMA weights]}`` with official keys, as the official training
    saves them (its loader takes the EMA weights, RoPE tables included, from ``ema_model``)."""
    path = resolve_checkpoint(path)
    verify_checkpoint(path, files=[CONFIG_FILE, MODEL_FILE, *([EMA_FILE] if (path / EMA_FILE).exists() else [])])
    with torch.device("meta"):  # the official key order (safetensors stores keys sorted) and the tables' shapes
        model = SphereEncoder(**json.loads((path / CONFIG_FILE).read_text())["model"])
    order = list(model.state_dict())
    state = {}
    for key, f in (("model", MODEL_FILE), (OFFICIAL_EMA_KEY, EMA_FILE)):
        if (path / f).exists():
            tensors = load_file(str(path / f))
            state[key] = {k: tensors[k] for k in order}
    if OFFICIAL_EMA_KEY in state:
        state[OFFICIAL_EMA_KEY].update(_official_rope_tables(model))
    out = Path(out)
    with replaced_atomically(out) as tmp:  # a full-size file is not left beside out if it fails (out a folder, say)
        torch.save(state, tmp)
    return out
