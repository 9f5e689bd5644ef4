"""Sample sets for evaluation (FID, IS, precision / recall): ``num`` images written as one PNG per index, and
optionally packed into one .npz in the layout the ADM evaluation suite reads (``arr_0`` uint8 [N, H, W, 3],
``arr_1`` the labels).

Image i has the seed ``seed * 2**32 + i`` and the label ``i % num_classes`` (every class equally often; none for
an unconditional model). A sample's image depends only on its seed, label, steps and cfg (the sphere_fast noise
convention), so the set is the same for any batch size and any number of processes: under torchrun each process
runs every world_size-th batch of indices. Each file is written atomically and a rerun skips the indices
already on disk, so an interrupted job resumes where it stopped; ``sample_set.json`` keeps the options (steps,
cfg, seed, dtype, model config, and a name of the weights when given: the CLI gives their SHA-256) and a rerun with
others is refused, as is a folder holding images but no ``sample_set.json`` (another tool's: it is written before
any image).
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sphere_fast._checks import check_int
from sphere_fast._files import replaced_atomically
from sphere_fast.model import SphereEncoder
from sphere_fast.sampling import Sampler

# the public API (the rest is the library's own)
__all__ = [
    "image_labels", "image_seeds", "pack_npz", "to_uint8", "write_sample_set",
]

MAX_SEED = 2**31  # seed * 2**32 + index stays below 2**63
MAX_NUM = 2**32
PNG_WRITERS = 4  # threads encoding PNGs while the device samples the next batch
# Batches whose PNGs may still be queued: bounds host memory when the device outruns the writers, and
# surfaces a failed write (a full disk) within a few batches rather than after the whole set is sampled.
BATCHES_IN_FLIGHT = 2
OPTIONS_FILE = "sample_set.json"  # the options the folder's images were made with
IMAGE_NAME = re.compile(r"[0-9]+\.png")  # the names image_path gives


def image_seeds(seed: int, indices: Sequence[int]) -> torch.Tensor:
    """The int64 seeds of images ``indices`` of the set with base ``seed``."""
    check_int("seed", seed, 0, MAX_SEED)
    return torch.tensor([seed * 2**32 + i for i in indices], dtype=torch.int64)


def image_labels(num_classes: int, indices: Sequence[int]) -> torch.Tensor | None:
    """The labels of images ``indices``: i % num_classes, or None for an unconditional model (0 classes)."""
    check_int("num_classes", num_classes, 0)
    return torch.tensor([i % num_classes for i in indices], dtype=torch.long) if num_classes else None


def batches_of(num: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[range]:
    """The index batches process ``rank`` of ``world_size`` runs: batch k is [k * batch_size, ...) and goes to
    process k % world_size."""
    for start in range(rank * batch_size, num, world_size * batch_size):
        yield range(start, min(start + batch_size, num))


def image_path(folder: Path, index: int, num: int) -> Path:
    return folder / f"{index:0{max(6, len(str(num - 1)))}d}.png"


def _write_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    with replaced_atomically(path) as partial:  # a killed job leaves no truncated image behind
        Image.fromarray(image).save(partial, format="PNG")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> [B, H, W, 3] uint8 (rounded), as image files store them."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _check_or_write_options(folder: Path, options: dict, rank: int) -> None:
    """A rerun fills in the images its folder lacks: with other options than the folder's (``OPTIONS_FILE``,
    written by rank 0 at the first run) it would mix two sets, so it is refused, naming the differences. An option
    the folder's file lacks (the weights' name, which older versions did not keep) is not compared. A folder with
    images but no options file is refused: its images are not this set's, and a rerun would keep them as its own."""
    path = folder / OPTIONS_FILE
    options = json.loads(json.dumps(options))  # as JSON keeps them: tuples become lists
    if path.exists():
        saved = json.loads(path.read_text())
        changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in options.items() if k in saved and saved[k] != v]
        if changed:
            raise ValueError(f"{folder} holds a sample set made with other options ({', '.join(changed)}): "
                             "finish it with those, or write to another folder")
    # listed only without the options file (a set's folder holds up to 50k images); no process of this job writes
    # an image before every one has made this check (write_sample_set's barrier)
    elif (image := next((p.name for p in folder.iterdir() if IMAGE_NAME.fullmatch(p.name)), None)) is not None:
        raise ValueError(f"{folder} holds images ({image}) but no {OPTIONS_FILE}: not a set this command started "
                         "(its images would be kept as the set's); write to an empty folder")
    elif rank == 0:
        with replaced_atomically(path) as partial:
            partial.write_text(json.dumps(options, indent=1))


def write_sample_set(
    model: SphereEncoder,
    out: str | Path,
    num: int,
    *,
    batch_size: int = 64,
    steps: int = 4,
    cfg: float = 1.0,
    cfg_position: str = "combo",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    weights: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> int:
    """Write this process's share of the ``num``-image set into the folder ``out`` (see the module docstring);
    returns how many images it wrote (indices already on disk are skipped). Sampling runs on
    ``sphere_fast.Sampler`` (a CUDA graph per batch bucket on a GPU) in ``dtype`` (default: the model's).
    ``weights`` names the model's weights (e.g. ``checkpoint.weights_sha256``) and is kept with the options, so
    that a rerun with other weights (the live ones after the EMA's) is refused; None keeps no name."""
    check_int("num", num, 1, MAX_NUM + 1)
    check_int("world_size", world_size)
    check_int("rank", rank, 0, world_size)
    check_int("seed", seed, 0, MAX_SEED)
    dtype = dtype if dtype is not None else next(model.parameters()).dtype
    # checks batch_size, steps, cfg and the model's mode before anything is written
    sampler = Sampler(model, batch_size, steps, cfg=cfg, cfg_position=cfg_position, dtype=dtype)
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"out must be a folder, got the file {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    options = {"steps": steps, "cfg": cfg, "cfg_position": cfg_position, "seed": seed, "dtype": str(dtype),
               "model": model.config}
    _check_or_write_options(folder, options if weights is None else {**options, "weights": weights}, rank)
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        # every process checks the folder before any writes an image: else a process that started writing before
        # rank 0 made its check would have its images taken for another tool's (processes run as separate jobs,
        # without a group, start rank 0 first)
        dist.barrier()
    todo = [[i for i in batch if not image_path(folder, i, num).exists()]
            for batch in batches_of(num, batch_size, rank, world_size)]
    todo = [indices for indices in todo if indices]

    from tqdm import tqdm

    total = sum(map(len, todo))
    with ThreadPoolExecutor(PNG_WRITERS) as writers, tqdm(
        total=total, desc=f"samples (process {rank})", disable=not progress, dynamic_ncols=True
    ) as bar:
        pending: deque[list[Future]] = deque()  # each batch's write jobs still in flight, oldest first
        for indices in todo:
            labels = image_labels(model.num_classes, indices)
            images = to_uint8(sampler(labels=labels, seeds=image_seeds(seed, indices)))
            pending.append([writers.submit(_write_png, image, image_path(folder, i, num))
                            for i, image in zip(indices, images)])
            while len(pending) > BATCHES_IN_FLIGHT:
                bar.update(_wait(pending.popleft()))
        while pending:
            bar.update(_wait(pending.popleft()))
    return total  # every write finished: a failed one raised above


def _wait(jobs: list[Future]) -> int:
    for job in jobs:
        job.result()  # re-raises a failed write
    return len(jobs)


def _recorded_num_classes(folder: Path, num_classes: int | None) -> int:
    """The labels' class count: the one the folder's ``OPTIONS_FILE`` records, which a given ``num_classes`` must
    equal (other labels would mislabel its images); the given one for a folder without that file."""
    if num_classes is not None:
        check_int("num_classes", num_classes, 0)
    path = folder / OPTIONS_FILE
    if not path.exists():
        if num_classes is None:
            raise ValueError(f"{folder} has no {OPTIONS_FILE} (write_sample_set writes it) to read the labels' "
                             "num_classes from: give num_classes")
        return num_classes
    recorded = json.loads(path.read_text())["model"]["num_classes"]
    if num_classes is not None and num_classes != recorded:
        raise ValueError(f"num_classes {num_classes} differs from the {recorded} the set in {folder} was sampled "
                         f"with ({OPTIONS_FILE}): its labels are i % {recorded}")
    return recorded


def pack_npz(folder: str | Path, num: int, path: str | Path | None = None, num_classes: int | None = None) -> Path:
    """Pack images 0 .. num-1 of ``folder`` into ``path`` (default ``folder/samples.npz``): ``arr_0`` uint8
    [num, H, W, 3] and, for a conditional model, ``arr_1`` their labels. ``num_classes`` (default: the one
    ``sample_set.json`` records, which a given value must equal) sets the labels, i % num_classes. The set is
    held in memory (50k images of 256 px: 9.8 GB)."""
    from PIL import Image

    check_int("num", num, 1, MAX_NUM + 1)
    folder = Path(folder)
    missing = [i for i in range(num) if not image_path(folder, i, num).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {num} images are missing from {folder} (first: index {missing[0]})")
    num_classes = _recorded_num_classes(folder, num_classes)  # before the images are read
    with Image.open(image_path(folder, 0, num)) as img:
        shape = (img.height, img.width, 3)
    images = np.empty((num, *shape), dtype=np.uint8)
    for i in range(num):
        with Image.open(image_path(folder, i, num)) as img:
            pixels = np.asarray(img.convert("RGB"))
        if pixels.shape != shape:  # an image from elsewhere: named, not numpy's broadcast error
            raise ValueError(f"{image_path(folder, i, num)} is {pixels.shape[1]}x{pixels.shape[0]} px where image 0 "
                             f"is {shape[1]}x{shape[0]}: the images of one set have one size")
        images[i] = pixels
    arrays = {"arr_0": images}
    labels = image_labels(num_classes, range(num))
    if labels is not None:
        arrays["arr_1"] = labels.numpy()
    path = Path(path) if path is not None else folder / "samples.npz"
    with replaced_atomically(path, suffix=".npz") as partial:  # np.savez names a file without it *.npz
        np.savez(partial, **arrays)
    return path
