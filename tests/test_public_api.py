"""The public API: each module's ``__all__`` names what it defines for users, and each of those is documented."""

import importlib

import pytest

MODULES = ["sphere_fast", "sphere_fast.ops", "sphere_fast.editing", "sphere_fast.training", "sphere_fast.checkpoint",
           "sphere_fast.sample_set"]


@pytest.mark.parametrize("name", MODULES)
def test_every_public_name_exists_and_is_documented(name):
    module = importlib.import_module(name)
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    # a dataclass without a docstring gets its signature as one: "TrainConfig(global_batch: int = 256, ...)"
    docs = {n: (getattr(module, n).__doc__ or "").strip() for n in module.__all__
            if callable(getattr(module, n, None))}
    undocumented = [n for n, doc in docs.items() if not doc or doc.startswith(f"{n}(")]
    assert not missing and not undocumented, (missing, undocumented)
