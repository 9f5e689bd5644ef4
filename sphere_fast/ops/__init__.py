"""Fused ops of sphere_fast. Each op has an eager reference beside it and runs on the backend chosen by
``sphere_fast.use_backend`` / ``backend=`` (see ``sphere_fast.backend``)."""

from sphere_fast.ops.adaln import (
    adaln_modulate,
    adaln_modulate_reference,
    gated_residual_adaln,
    gated_residual_adaln_reference,
)
from sphere_fast.ops.attention import (
    attention,
    attention_impl,
    attention_impls,
    attention_reference,
)
from sphere_fast.ops.labels import seeded_labels, seeded_labels_reference
from sphere_fast.ops.philox import philox_randn, sphere_noise_reference
from sphere_fast.ops.rope import apply_rope, apply_rope_reference
from sphere_fast.ops.spherify import (
    sphere_noise,
    spherify,
    spherify_noise,
    spherify_noise_pair,
    spherify_noise_reference,
    spherify_reference,
)
from sphere_fast.ops.swiglu import swiglu, swiglu_reference
from sphere_fast.ops.swiglu_linear import swiglu_linear, swiglu_linear_reference

__all__ = [
    "adaln_modulate",
    "adaln_modulate_reference",
    "apply_rope",
    "apply_rope_reference",
    "attention",
    "attention_impl",
    "attention_impls",
    "attention_reference",
    "gated_residual_adaln",
    "gated_residual_adaln_reference",
    "philox_randn",
    "seeded_labels",
    "seeded_labels_reference",
    "sphere_noise",
    "sphere_noise_reference",
    "spherify",
    "spherify_noise",
    "spherify_noise_pair",
    "spherify_noise_reference",
    "spherify_reference",
    "swiglu",
    "swiglu_linear",
    "swiglu_linear_reference",
    "swiglu_reference",
]
