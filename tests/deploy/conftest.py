"""The stand-in ``tensorrt`` module (``tests/stand_ins/tensorrt``), importable only inside the tests that ask for it."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from types import ModuleType

import pytest

from tests.helpers import REPO

STAND_INS = REPO / "tests" / "stand_ins"
VERSION_VARIABLE = "MPEXPORT_STAND_IN_TENSORRT_VERSION"


@pytest.fixture
def stand_in_tensorrt(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], ModuleType]]:
    """A function that makes ``import tensorrt`` give the stand-in pretending to be TensorRT ``version`` (called
    again, it swaps the version); afterwards ``tensorrt`` is gone from ``sys.modules`` and ``sys.path`` again."""
    monkeypatch.syspath_prepend(str(STAND_INS))
    previous = sys.modules.pop("tensorrt", None)

    def load(version: str) -> ModuleType:
        monkeypatch.setenv(VERSION_VARIABLE, version)
        sys.modules.pop("tensorrt", None)
        module = importlib.import_module("tensorrt")
        assert module.__file__ and module.__file__.startswith(str(STAND_INS))
        return module

    yield load
    sys.modules.pop("tensorrt", None)
    if previous is not None:
        sys.modules["tensorrt"] = previous
