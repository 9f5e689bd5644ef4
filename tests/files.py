"""Writers of the data files tests read: gzipped IDX files (a small Fashion-MNIST install), and a checkpoint's
manifest hashes after a test edited its files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from sphere_fast.checkpoint import sha256_file


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> None:
    """An IDX file as the Fashion-MNIST ones are laid out: 0, 0, type, ndim, big-endian int32 dims, data."""
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(root: Path, n: int = 12) -> None:
    """A small Fashion-MNIST install (train split only): n random 28 px images, labels 0..9 in turn."""
    root.mkdir(parents=True, exist_ok=True)
    write_idx(root / "train-images-idx3-ubyte.gz", np.random.default_rng(0).integers(0, 256, (n, 28, 28)))
    write_idx(root / "train-labels-idx1-ubyte.gz", np.arange(n) % 10)


def rehash(path: Path) -> None:
    """The manifest's hashes after a test edited the checkpoint's files, as a save of that content writes them."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {name: sha256_file(path / name) for name in manifest["files"]}
    (path / "manifest.json").write_text(json.dumps(manifest))
