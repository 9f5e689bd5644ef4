"""sphere_fast: a drop-in Sphere Encoder with fused Triton and C++/CUDA kernels under it."""

from sphere_fast import ops
from sphere_fast.backend import active_backend, available_backends, use_backend

__all__ = ["active_backend", "available_backends", "ops", "use_backend"]
