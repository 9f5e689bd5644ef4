"""sphere_fast: a drop-in Sphere Encoder with fused Triton and C++/CUDA kernels under it."""

import importlib.metadata
from pathlib import Path

from sphere_fast._checkout import map_checkout_folders

map_checkout_folders(Path(__file__).resolve().parent)  # before any module imports the kernels

from sphere_fast import ops
from sphere_fast.backend import active_backend, available_backends, use_backend
from sphere_fast.model import MODEL_SIZES, PRESETS, SphereEncoder
from sphere_fast.sampling import Sampler

try:
    __version__ = importlib.metadata.version("sphere_fast")
except importlib.metadata.PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "unknown"

__all__ = ["MODEL_SIZES", "PRESETS", "Sampler", "SphereEncoder", "active_backend", "available_backends", "ops", "use_backend"]
