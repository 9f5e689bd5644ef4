"""The public API: each module's ``__all__`` names what it defines for users, and each of those is documented."""

import importlib
import inspect
import typing

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


def public_callables(module):
    """The module's public functions and classes, and the classes' own public methods (and ``__init__``/
    ``__call__``)."""
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            yield f"{module.__name__}.{name}", obj
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if inspect.isfunction(member) and (not attr.startswith("_") or attr in ("__init__", "__call__")):
                    yield f"{module.__name__}.{name}.{attr}", member


@pytest.mark.parametrize("name", MODULES)
def test_every_public_type_hint_resolves_at_runtime(name):
    """The modules postpone their annotations (``from __future__ import annotations``): a name imported only for
    type checkers then breaks ``typing.get_type_hints``, which pydantic's ``validate_call``, CLI builders and
    ``inspect.signature(eval_str=True)`` call."""
    unresolved = {}
    for qualname, obj in public_callables(importlib.import_module(name)):
        try:
            typing.get_type_hints(obj)
        except NameError as err:
            unresolved[qualname] = str(err)
    assert not unresolved
