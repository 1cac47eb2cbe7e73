"""The backend registry: every backend a config may name is registered, names are unique, and
an unknown one is a clear error."""

from __future__ import annotations

from typing import get_args

import pytest

from ensemble.config import Backend as BackendName
from ensemble.control import backends
from ensemble.errors import EnsembleError


def test_every_config_backend_is_registered() -> None:
    assert backends.names() == sorted(get_args(BackendName))


def test_an_unknown_backend_names_the_registered_ones() -> None:
    with pytest.raises(EnsembleError, match="unknown backend 'tpu'; registered: inprocess"):
        backends.backend("tpu")


def test_a_backend_registers_once() -> None:
    with pytest.raises(ValueError, match="already registered"):
        backends.register(backends.backend("ray"))
