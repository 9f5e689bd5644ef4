"""The backend registry: choice by argument, context and environment; clear errors; logged once."""

import logging

import pytest
import torch

import sphere_fast
from sphere_fast.backend import resolve_backend


def test_context_manager_nests_and_restores(monkeypatch):
    monkeypatch.delenv("SPHERE_FAST_BACKEND", raising=False)
    assert sphere_fast.active_backend() == "auto"
    with sphere_fast.use_backend("eager"):
        assert sphere_fast.active_backend() == "eager"
        with sphere_fast.use_backend("auto"):
            assert sphere_fast.active_backend() == "auto"
        assert sphere_fast.active_backend() == "eager"
    assert sphere_fast.active_backend() == "auto"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("SPHERE_FAST_BACKEND", "eager")
    assert sphere_fast.active_backend() == "eager"
    monkeypatch.setenv("SPHERE_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="SPHERE_FAST_BACKEND"):
        sphere_fast.active_backend()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        with sphere_fast.use_backend("cuda"):
            pass
    with pytest.raises(ValueError, match="backend must be one of"):
        sphere_fast.ops.spherify(torch.ones(2, 3), backend="numpy")


def test_auto_is_eager_on_cpu_and_argument_wins():
    cpu = torch.device("cpu")
    assert resolve_backend("unit_op", cpu, None, ("triton", "cpp", "eager")) == "eager"
    with sphere_fast.use_backend("triton"):
        assert resolve_backend("unit_op", cpu, "eager", ("triton",)) == "eager"


def test_unavailable_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="not available"):
        resolve_backend("unit_op", torch.device("cpu"), "triton", ("triton",))


def test_available_backends_lists_eager_first():
    names = sphere_fast.available_backends("cpu")
    assert names[0] == "eager" and set(names) <= {"eager", "triton", "cpp"}


def test_choice_is_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="sphere_fast"):
        for _ in range(3):
            resolve_backend("logged_op", torch.device("cpu"), "eager", ("eager",))
    assert sum("logged_op" in r.getMessage() for r in caplog.records) == 1
