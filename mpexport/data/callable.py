"""Validation data from ``module:function``: batches a user's function yields (a DataLoader, a generator), named
after the inputs or bound to them in order."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mpexport.base.errors import MpexportError, first_line
from mpexport.base.specs import TensorSpec
from mpexport.data.base import LABELS, STAGE, ValidationData


class CallableValidationData(ValidationData):
    """Batches from ``module:function()`` (called anew for every pass, so a DataLoader or a generator function
    works). A batch is a dict of arrays/tensors named after the inputs (plus optional ``labels``), or a
    tuple/list with the inputs in the model's order and optionally the labels last."""

    def __init__(self, spec: str, function: Any, first: dict[str, np.ndarray] | list[np.ndarray],
                 import_path: str | Path | None = None) -> None:
        self.spec = spec
        self.function = function
        self.import_path = str(Path(import_path or Path.cwd()).absolute())
        self.first_raw = first
        named = first if isinstance(first, dict) else {f"input_{i}": a for i, a in enumerate(first)}
        super().__init__(Path(spec), [], [n for n in named if n != LABELS], LABELS in named, 0, dict(named))

    @classmethod
    def open(cls, spec: str, import_path: str | Path | None = None) -> CallableValidationData:
        """Import ``module:function`` from ``import_path`` (default: the working directory) and read its first
        batch."""
        from mpexport.base.callables import import_callable

        function = import_callable(spec, what="--val-data", stage=STAGE, import_path=import_path)
        first = next(cls._raw_batches(function, spec, import_path), None)
        if first is None:
            raise MpexportError(f"validation data '{spec}' yielded no batches", stage=STAGE)
        return cls(spec, function, first, import_path)

    @staticmethod
    def _raw_batches(function: Any, spec: str,
                     import_path: str | Path | None) -> Iterator[dict[str, np.ndarray] | list[np.ndarray]]:
        from mpexport.base.callables import importable_from

        try:
            with importable_from(import_path):
                source = function()
                for item in source:
                    yield _to_numpy(item, spec)
        except MpexportError:
            raise
        except SystemExit as exc:
            raise MpexportError(f"validation data '{spec}' called sys.exit({exc.code!r})", stage=STAGE) from None
        except RecursionError:
            raise MpexportError(f"validation data '{spec}' failed: it recursed too deeply (a batch nested too "
                                "deep, or a function that calls itself)", stage=STAGE,
                                hint="yield dicts or tuples of arrays") from None
        except MemoryError:
            raise MpexportError(f"validation data '{spec}' ran out of memory", stage=STAGE,
                                hint="yield smaller batches") from None
        except Exception as exc:  # noqa: BLE001 - user code may fail in any way
            raise MpexportError(f"validation data '{spec}' failed: {first_line(exc)}", stage=STAGE) from None

    def describe(self) -> str:
        return self.spec

    def input_specs(self) -> list[TensorSpec]:
        if not isinstance(self.first_raw, dict):
            raise MpexportError(f"'{self.spec}' yields tuples; the model must name its inputs", stage=STAGE,
                                hint="yield dicts named after the inputs, or pass --input")
        return super().input_specs()

    def bind(self, inputs: list[TensorSpec]) -> None:
        """Name tuple batches after ``inputs`` (in order; one extra trailing element is the labels)."""
        if isinstance(self.first_raw, dict):
            return
        names = [spec.name for spec in inputs]
        if len(self.first_raw) not in (len(names), len(names) + 1):
            raise MpexportError(f"'{self.spec}' yields {len(self.first_raw)} arrays per batch; the model takes "
                                f"{len(names)} inputs ({', '.join(names)})", stage=STAGE)
        self.names = names
        self.has_labels = len(self.first_raw) == len(names) + 1
        self.first_arrays = self._named(self.first_raw)

    def _named(self, raw: dict[str, np.ndarray] | list[np.ndarray]) -> dict[str, np.ndarray]:
        if isinstance(raw, dict):
            return raw
        named = dict(zip(self.names, raw, strict=False))
        if len(raw) == len(self.names) + 1:
            named[LABELS] = raw[-1]
        return named

    def _sources(self) -> Iterator[tuple[Path, int | None, Callable[[], dict[str, np.ndarray]]]]:
        for raw in self._raw_batches(self.function, self.spec, self.import_path):
            yield Path(self.spec), None, lambda raw=raw: self._named(raw)  # type: ignore[misc]


def _to_numpy(item: Any, spec: str) -> dict[str, np.ndarray] | list[np.ndarray]:
    def array(value: Any) -> np.ndarray:
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        result = np.asarray(value)
        if result.dtype.kind not in "biuf":
            raise MpexportError(f"validation data '{spec}' yields a {result.dtype} array, not numbers", stage=STAGE)
        return result

    if isinstance(item, dict):
        return {str(name): array(value) for name, value in item.items()}
    if isinstance(item, (list, tuple)):
        return [array(value) for value in item]
    return [array(item)]
