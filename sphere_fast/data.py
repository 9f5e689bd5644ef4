"""Training data: image folders, the official JSON-lines lists, Fashion-MNIST from Debian's files and a
synthetic set, as [3, S, S] images with int labels: uint8 pixels, but the synthetic set's float images in
[-1, 1]; the trainer converts pixels on the device (``pixels_to_images``).

Preprocessing follows spec section 4: resize the short side (bicubic; nearest at <= 64 px) then center
crop. The random horizontal flip is applied per batch by the trainer (``random_hflip``) from the
training RNG, so a resumed run sees the same flips and worker processes stay deterministic."""

from __future__ import annotations

import gzip
import json
import math
import multiprocessing
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from sphere_fast._checks import check_int
from sphere_fast._random import derive_seed, generator_kwargs
from sphere_fast._warn import warn

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def to_pixels(img: Image.Image) -> torch.Tensor:
    """PIL image -> [3, H, W] uint8. The datasets give pixels, a quarter of float32's bytes through the workers'
    shared memory, the pinned buffers and the copy to the device; ``pixels_to_images`` converts them there."""
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()  # np.asarray's is read-only


def pixels_to_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 images in [-1, 1] (mean 0.5, std 0.5), the model's input range."""
    # A divisor on the device, not a Python number: CUDA divides by a host scalar as a product with its reciprocal,
    # 1 ulp off the quotient for 111 of the 256 values; this is the quotient, as on the host.
    return x.float() / torch.full((), 127.5, device=x.device) - 1.0


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """RGB, the short side resized to ``size`` (bicubic, nearest for <= 64 px), then center cropped."""
    check_int("size", size)
    # RGB first, as the official loader: Pillow resizes palette and 1-bit images with nearest whatever the filter
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    new = (round(w * scale), round(h * scale))  # the short side comes out exactly size
    img = img.resize(new, Image.Resampling.NEAREST if size <= 64 else Image.Resampling.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image of [B, C, H, W] left-right with probability 1/2."""
    if x.ndim != 4:  # one image [C, H, W] would broadcast against a flag per channel
        raise ValueError(f"random_hflip takes a batch [B, C, H, W], got shape {tuple(x.shape)}")
    flip = torch.rand(x.shape[0], device=x.device, **generator_kwargs(generator)) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


class FileListDataset(Dataset):
    """Images from a list of (path, class_id) with a class-name table, as uint8 pixels [3, S, S] (``to_pixels``)."""

    # a 16-bit or float image seen: warned once (in each worker process); a class default, so that a dataset
    # pickled by an older version (without the attribute) reads its images
    _warned_mode = False

    def __init__(self, items: Sequence[tuple[Path, int]], class_names: Sequence[str], image_size: int):
        if not items:
            raise ValueError("the dataset holds no images")
        # Packed in arrays, not a list of (Path, int): ImageNet's 1.28M paths as Python objects are about 460 MiB
        # in every worker, seconds to pickle to each (spawn, forkserver: Python 3.14's default), and copied page by
        # page under fork as their reference counts change.
        paths = [os.fsencode(path) for path, _ in items]
        self._path_bytes = np.frombuffer(b"".join(paths), dtype=np.uint8)
        self._path_ends = np.cumsum([len(p) for p in paths], dtype=np.int64)
        self._labels = np.array([label for _, label in items], dtype=np.int64)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.image_size = check_int("image_size", image_size)

    def __len__(self) -> int:
        return len(self._labels)

    def item(self, i: int) -> tuple[Path, int]:
        """The ``i``-th (path, class_id)."""
        i = range(len(self))[i]  # a negative index counts from the end; out of range raises IndexError
        start = self._path_ends[i - 1] if i > 0 else 0
        return Path(os.fsdecode(self._path_bytes[start : self._path_ends[i]].tobytes())), int(self._labels[i])

    @property
    def items(self) -> list[tuple[Path, int]]:
        """Every (path, class_id), in order (built on each access)."""
        return [self.item(i) for i in range(len(self))]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.item(i)
        try:
            with Image.open(path) as img:
                # convert("RGB") clips these modes' values at 255 rather than scaling them (a 16-bit mid-grey turns
                # white); kept, as the official loader does the same, but said
                if not self._warned_mode and (img.mode in ("I", "F") or img.mode.startswith("I;16")):
                    self._warned_mode = True
                    warn(f"{path} has mode {img.mode}: its values are clipped to [0, 255] as 8-bit ones (as the "
                         "official loader does): most of a 16-bit image turns white, a float one in [0, 1] black; "
                         "convert the data set to 8 bits")
                return to_pixels(resize_center_crop(img, self.image_size)), label
        except OSError as err:  # a truncated or unreadable file: which of the many it is (a worker hides the index)
            if str(path) in str(err):  # a missing file's error, or Pillow's for an unknown format, names it
                raise
            raise OSError(f"{path}: {err}") from err
        # not OSErrors, so named here too: Pillow's refusal of an image over twice PIL.Image.MAX_IMAGE_PIXELS (a
        # decompression bomb, or a huge image: raise the limit), and a decoder's ValueError ("Tile cannot extend
        # outside image")
        except Image.DecompressionBombError as err:
            raise Image.DecompressionBombError(f"{path}: {err}") from err
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err


def _is_data(name: str) -> bool:
    # dot-entries (.ipynb_checkpoints, macOS ._name AppleDouble files) and macOS archives' __MACOSX are not data
    return not name.startswith(".") and name != "__MACOSX"


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _class_images(folder: Path, root: Path) -> list[Path]:
    """The image files under class ``folder`` of data ``root``, symlinked sub-folders followed (``Path.rglob``
    skips them before 3.13), each real file once; a link to the root or above it, or into another class's
    folder, is not followed (its images would be this class's)."""
    own, top = os.path.realpath(folder), os.path.realpath(root)
    found, walked, files_seen = [], set(), set()
    for parent, dirs, files in os.walk(folder, followlinks=True):
        walked.add(os.path.realpath(parent))
        kept = []
        for d in dirs:
            real = os.path.realpath(os.path.join(parent, d))
            # walked already (a link back up would loop), the root or above, or another class's folder
            foreign = _within(top, real) or (_within(real, top) and not _within(real, own))
            if _is_data(d) and real not in walked and not foreign:
                kept.append(d)
        dirs[:] = sorted(kept)  # walked in order: of two links to one folder, the first by name keeps its images
        for f in sorted(files):
            path = Path(parent) / f
            if _is_data(f) and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                real = os.path.realpath(path)
                if real not in files_seen:  # a folder linked twice gives its images once
                    files_seen.add(real)
                    found.append(path)
    return sorted(found)


def image_folder(root: str | Path, image_size: int) -> FileListDataset:
    """``root/<class name>/<image>``: classes in sorted order get ids 0..K-1. Hidden entries and ``__MACOSX``
    are skipped; a class folder without images is refused (its id would never be trained)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and _is_data(d.name))
    images = {name: _class_images(root / name, root) for name in classes}
    empty = [name for name in classes if not images[name]]
    if empty:
        raise ValueError(f"class folders of {root} hold no images ({', '.join(IMAGE_EXTENSIONS)}): {empty}")
    items = [(p, k) for k, name in enumerate(classes) for p in images[name]]
    if not items:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class subfolders of {root}")
    return FileListDataset(items, classes, image_size)


def _class_id(value: object) -> int | None:
    """A list's class_id as the official reader's ``int()`` takes it: an int, or a string of digits."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]+", value):
        return int(value)
    # a bool is an int to Python, but true would be label 1 and collate to a bool tensor
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# the largest class table a list with gaps in its ids may give, whatever its number of classes (see jsonl_list)
MAX_SPARSE_CLASS_IDS = 1024


def jsonl_list(list_file: str | Path, image_size: int, root: str | Path | None = None) -> FileListDataset:
    """The official list format: one JSON object a line with class_id, class_name, image_path and optionally
    is_absolute_path (default false); relative paths are taken from ``root`` (default: the list file's folder).
    Class ids number the classes 0..K-1, with gaps allowed (a missing id is named by its number) while K is at most
    ``MAX_SPARSE_CLASS_IDS`` or twice the classes listed: a subset of ImageNet's classes keeps its ids."""
    list_file = Path(list_file)
    base = Path(root) if root is not None else list_file.parent
    items, names = [], {}
    with open(list_file) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                cid, name, path = (rec[k] for k in ("class_id", "class_name", "image_path"))
                absolute = rec.get("is_absolute_path", False)
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{list_file}:{n}: expected a JSON object with class_id, class_name, image_path (and optionally "
                    f"is_absolute_path), got {line.strip()[:120]!r} ({err})"
                ) from None
            if not isinstance(path, str) or not isinstance(name, str):
                raise ValueError(f"{list_file}:{n}: image_path and class_name must be strings, got {path!r} and "
                                 f"{name!r}")
            if (label := _class_id(cid)) is None or label < 0:
                raise ValueError(f"{list_file}:{n}: class_id must be an int >= 0 (or a string of digits), got {cid!r}")
            # a string such as "false" would be truthy: the relative path taken as an absolute one
            if not isinstance(absolute, bool):
                raise ValueError(f"{list_file}:{n}: is_absolute_path must be true or false, got {absolute!r}")
            if names.setdefault(label, name) != name:
                raise ValueError(f"{list_file}:{n}: class_id {label} named both {names[label]!r} and {name!r}")
            items.append((Path(path) if absolute else base / path, label))
    if not items:
        raise ValueError(f"{list_file} lists no images")
    num_classes = max(names) + 1
    # the class table gets a row per id up to the largest, as the model's label embedding would: a sparse numbering
    # (WordNet offsets such as "01440764") would build millions of rows before any check
    if num_classes > max(MAX_SPARSE_CLASS_IDS, 2 * len(names)):
        raise ValueError(f"{list_file}: class ids must number the classes 0..K-1 (gaps allowed up to "
                         f"{MAX_SPARSE_CLASS_IDS} or twice the classes): the largest is {num_classes - 1} with only "
                         f"{len(names)} classes")
    _check_some_exist(items, list_file)
    return FileListDataset(items, [names.get(k, str(k)) for k in range(num_classes)], image_size)


# images of a list checked when it is opened: a wrong root (the usual cause) misses all of them, and a run would
# otherwise stop at its first batch, or hours in; all 1.28M files would cost minutes on network storage
LIST_FILES_CHECKED = 64


def _check_some_exist(items: list[tuple[Path, int]], list_file: Path) -> None:
    """Refuse a list whose evenly spaced sample of images holds a missing file, naming the first."""
    step = max(1, len(items) // LIST_FILES_CHECKED)
    for path, _ in items[::step][:LIST_FILES_CHECKED]:
        if not path.is_file():
            raise FileNotFoundError(f"{list_file} lists {path}, which is not a file (relative paths are taken from "
                                    "the list's folder or the root given)")


def _read_idx(path: Path) -> np.ndarray:
    """The array of a gzipped unsigned-byte IDX file, its size checked against its header."""
    with gzip.open(path, "rb") as fh:
        head = fh.read(4)
        if len(head) < 4:
            raise ValueError(f"{path}: {len(head)} bytes, too short for an IDX file (a truncated download?)")
        if head[2] != 0x08:
            raise ValueError(f"{path}: expected an unsigned-byte IDX file, got type code {head[2]:#x}")
        ndim = head[3]
        head += fh.read(4 * ndim)
        dims = [int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
        size = math.prod(dims)
        # Up to one byte past the size the header gives, 16 MiB at a time: a stream that inflates to far more (a
        # gzip bomb) is refused without inflating it all, and a header giving far more allocates nothing up front.
        data = bytearray()
        while len(data) <= size and (chunk := fh.read(min(1 << 24, size + 1 - len(data)))):
            data += chunk
    needed = 4 + 4 * ndim + size
    if len(data) > size:
        raise ValueError(f"{path}: more bytes than the {needed} its header {dims} gives (a damaged file?)")
    if len(head) + len(data) != needed:
        raise ValueError(f"{path}: {len(head) + len(data)} bytes where its header {dims} needs {needed} (a truncated "
                         "download?)")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


class FashionMNIST(Dataset):
    """Fashion-MNIST read from the IDX files of Debian's ``dataset-fashion-mnist``. The 28 px images are
    centred on a black canvas of ``image_size`` (padding keeps the garments undistorted); smaller sizes
    are resized (nearest). Grey is repeated over 3 channels; uint8 pixels, as ``to_pixels`` gives."""

    class_names = list(FASHION_MNIST_CLASSES)
    num_classes = 10

    def __init__(self, image_size: int = 32, split: str = "train", root: str | Path | None = None):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        prefix = "train" if split == "train" else "t10k"
        root = Path(root) if root is not None else FASHION_MNIST_DIR
        images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
        if not images.exists() or not labels.exists():
            raise FileNotFoundError(
                f"Fashion-MNIST files not found in {root}: install the Debian package {FASHION_MNIST_PACKAGE} "
                f"(apt-get install {FASHION_MNIST_PACKAGE}) or use the synthetic data set"
            )
        self.image_size = check_int("image_size", image_size)
        pixels, classes = _read_idx(images), _read_idx(labels)
        # a truncated file, or one of the other split, would pair images with wrong labels
        if pixels.ndim != 3 or classes.ndim != 1:
            raise ValueError(f"{images} must hold [N, H, W] images and {labels} [N] labels, got shapes "
                             f"{pixels.shape} and {classes.shape}")
        if len(pixels) != len(classes):
            raise ValueError(f"{images} holds {len(pixels)} images but {labels} {len(classes)} labels: the files "
                             "must be of the same split")
        self.images = torch.from_numpy(pixels.copy())
        self.labels = torch.from_numpy(classes.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]  # uint8, as to_pixels gives
        s = self.image_size
        if s >= img.shape[-1]:
            lo = (s - img.shape[-1]) // 2
            img = torch.nn.functional.pad(img, (lo, s - img.shape[-1] - lo, lo, s - img.shape[-2] - lo), value=0)
        else:
            img = torch.nn.functional.interpolate(img[None, None], size=(s, s), mode="nearest")[0, 0]
        return img.expand(3, s, s).contiguous(), int(self.labels[i])


class SyntheticShapes(Dataset):
    """Deterministic coloured shapes, one shape kind and colour per class, jittered per index: learnable
    in minutes, for tests and as the fallback when no real data is installed. Float images in [-1, 1]: the
    colours are not whole pixel values."""

    KINDS = ("square", "disc", "bar", "cross", "ring")
    COLOURS = ((1.0, 0.3, 0.2), (0.2, 0.6, 1.0), (0.3, 0.9, 0.3), (1.0, 0.9, 0.2))
    # Dark grey, not black: on a black background (about 80% of each image) the demo's model turned black
    # everywhere within 30 steps, its tanh saturated at -1, and never left it (black sample grids).
    BACKGROUND = -0.6

    def __init__(self, size: int = 1024, image_size: int = 32, num_classes: int = 10, seed: int = 0):
        # image i's generator is seeded seed * 1_000_003 + i: a larger size would draw the next seed's images
        self.size, self.image_size = check_int("size", size, 1, 1_000_003), check_int("image_size", image_size)
        # beyond kinds x colours a class would draw exactly as an earlier one: labels no model could learn
        self.num_classes = check_int("num_classes", num_classes, 1, len(self.KINDS) * len(self.COLOURS) + 1)
        self.seed = check_int("seed", seed, 0, 2**32)  # its generators' seeds, seed * 1_000_003 + i, fit 64 bits
        self.class_names = [f"shape-{k}" for k in range(num_classes)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = i % self.num_classes
        s = self.image_size
        cy, cx = (torch.rand(2, generator=g) * 0.3 + 0.35).tolist()
        radius = float(torch.rand((), generator=g)) * 0.1 + 0.2
        yy, xx = torch.meshgrid(torch.linspace(0, 1, s), torch.linspace(0, 1, s), indexing="ij")
        dy, dx = (yy - cy).abs(), (xx - cx).abs()
        dist = (dy.square() + dx.square()).sqrt()
        kind = self.KINDS[label % len(self.KINDS)]
        mask = {
            "square": torch.maximum(dy, dx) < radius,
            "disc": dist < radius,
            "bar": (dx < radius * 0.35) & (dy < radius * 1.3),
            "cross": ((dx < radius * 0.3) | (dy < radius * 0.3)) & (torch.maximum(dy, dx) < radius * 1.2),
            "ring": (dist < radius * 1.1) & (dist > radius * 0.6),
        }[kind]
        colour = torch.tensor(self.COLOURS[(label // len(self.KINDS)) % len(self.COLOURS)]).view(3, 1, 1)
        return torch.where(mask, colour * 2 - 1, torch.full((3, 1, 1), self.BACKGROUND)), label


def open_dataset(spec: str, image_size: int, *, synthetic_fallback: bool = False, list_root: str | None = None) -> Dataset:
    """``fashion-mnist``, ``synthetic``, a ``.jsonl`` list file or an image folder. With
    ``synthetic_fallback`` a missing Fashion-MNIST install falls back to synthetic data with a warning."""
    if spec == "synthetic":
        return SyntheticShapes(size=4096, image_size=image_size)
    if spec == "fashion-mnist":
        try:
            return FashionMNIST(image_size)
        except FileNotFoundError as err:
            if not synthetic_fallback:
                raise
            warn(f"{err}; falling back to synthetic shapes")
            return SyntheticShapes(size=4096, image_size=image_size)
    if spec.lower().endswith((".jsonl", ".json")):
        return jsonl_list(spec, image_size, root=list_root)
    return image_folder(spec, image_size)


class StepBatchSampler(Sampler[list[int]]):
    """Endless batches of one rank: epoch e shuffles with ``derive_seed(seed, "epoch", e)``, cuts global batches
    (dropping the tail), and rank r takes rows [r*b, (r+1)*b) of each. It starts at global step ``start_step``, so a
    resumed run reads exactly the batches an uninterrupted run would have read."""

    def __init__(self, n: int, batch_per_rank: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, start_step: int = 0):
        check_int("n", n, 0)
        check_int("seed", seed, 0)
        check_int("batch_per_rank", batch_per_rank)
        check_int("world_size", world_size)
        check_int("rank", rank, 0)
        check_int("start_step", start_step, 0)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
        self.global_batch = batch_per_rank * world_size
        if n < self.global_batch:
            raise ValueError(f"the dataset has {n} images, fewer than one global batch ({self.global_batch})")
        self.n, self.b, self.rank, self.seed, self.start_step = n, batch_per_rank, rank, seed, start_step
        self.steps_per_epoch = n // self.global_batch

    def __iter__(self) -> Iterator[list[int]]:
        epoch, step = divmod(self.start_step, self.steps_per_epoch)
        while True:
            shuffle = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            perm = torch.randperm(self.n, generator=shuffle)
            for s in range(step, self.steps_per_epoch):
                lo = s * self.global_batch + self.rank * self.b
                yield perm[lo : lo + self.b].tolist()
            epoch, step = epoch + 1, 0


def check_start_method(name: str | None) -> None:
    """None (Python's default) or a start method this platform has."""
    if name is not None and name not in multiprocessing.get_all_start_methods():
        raise ValueError(f"start_method must be None or one of {multiprocessing.get_all_start_methods()}, got {name!r}")


def make_loader(
    dataset: Dataset,
    batch_per_rank: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    start_step: int = 0,
    workers: int = 0,
    pin_memory: bool = False,
    worker_seed: int | None = None,
    start_method: str | None = None,
) -> DataLoader:
    """A DataLoader over ``StepBatchSampler``; its own generator, seeded with ``worker_seed`` (default ``seed``;
    ``fit`` gives each process and resume its own), seeds the workers off the global RNG. A dataset's random
    transforms in the workers draw from their seeds: the same for the same ``worker_seed`` and number of workers,
    other draws with another number; without workers they draw from the global RNG. (The library's datasets draw
    nothing: ``fit`` flips the batches from the training RNG.) ``pin_memory`` (for a GPU) lets the batch's copy to
    the device run without the host waiting for it. ``start_method`` starts the workers by ``fork``, ``forkserver``
    or ``spawn`` (default: Python's, forkserver on Linux from Python 3.14, spawn on macOS and Windows)."""
    check_int("workers", workers, 0)  # else refused only at the first batch
    check_start_method(start_method)
    sampler = StepBatchSampler(len(dataset), batch_per_rank, rank=rank, world_size=world_size, seed=seed, start_step=start_step)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        multiprocessing_context=start_method if workers > 0 else None,  # torch refuses one without workers
        generator=torch.Generator().manual_seed(seed if worker_seed is None else worker_seed),
    )
