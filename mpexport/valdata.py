"""Validation data: ``.npz`` files (arrays named after the model inputs, optional ``labels``), a directory
of ``.npz`` shards read shard by shard, Parquet/Arrow files or a ``datasets`` directory (:mod:`mpexport.tabledata`),
or ``module:function`` returning an iterable of batches (e.g. a torch DataLoader), all checked against the model's
input specs.

Every problem (missing file, wrong names, shapes or dtypes, NaN/Inf, no samples) is a one-line
:class:`MpexportError` (exit 2).
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mpexport.errors import MpexportError, first_line
from mpexport.specs import TensorSpec, numpy_dtype, spec_from_array

STAGE = "val-data"
LABELS = "labels"
Batch = dict[str, np.ndarray]


@dataclass
class ValidationData:
    """A validation set on disk: its shards, the array names and sample count (read from headers only)."""

    path: Path
    shards: list[Path]
    names: list[str]
    has_labels: bool
    num_samples: int
    first_arrays: dict[str, np.ndarray]
    lengths: list[int] = field(default_factory=list)
    """Samples per shard (file), in order; empty when the source does not say (``module:function``)."""

    ignores_extra_columns: ClassVar[bool] = False
    """True for tables, which carry columns the model does not read (they are left out, not refused)."""

    def input_specs(self) -> list[TensorSpec]:
        """One spec per input array (``labels`` excluded), axis 0 a dynamic ``batch``."""
        return [spec_from_array(name, self.first_arrays[name]) for name in self.names]

    def describe(self) -> str:
        """Where the data comes from, for reports."""
        return str(self.path)

    def select(self, names: list[str]) -> None:
        """Keep only these inputs (tables, see :attr:`ignores_extra_columns`); files keep every array."""

    def batches(self, batch_size: int, *, limit: int | None = None, inputs: list[TensorSpec] | None = None,
                exact: bool = False, skip: int = 0) -> Iterator[Batch]:
        """Yield batches of at most ``batch_size`` samples (``exact``: only full batches), at most ``limit``
        samples in all, arrays cast to ``inputs``' dtypes when given. Raises on NaN/Inf in an input. ``skip``:
        leave out the first ``skip`` batches (unread where the shard sizes say which files hold them), so that
        a shard of the data is its batches ``skip`` onwards, the same batches a whole pass yields."""
        produced = index = 0
        for source, length, load in self._sources():
            if length is not None and index + -(-length // batch_size) <= skip:
                index += -(-length // batch_size)
                produced += length
                continue
            arrays = load()
            count = len(next(iter(arrays.values())))
            for start in range(0, count, batch_size):
                stop = min(start + batch_size, count)
                if limit is not None:
                    stop = min(stop, start + limit - produced)
                if stop <= start or (exact and stop - start < batch_size):
                    return
                if index >= skip:
                    yield _prepare({name: array[start:stop] for name, array in arrays.items()}, inputs, source,
                                   start)
                index += 1
                produced += stop - start

    def batch_count(self, batch_size: int, limit: int | None = None) -> int | None:
        """How many batches :meth:`batches` yields (None when the source does not say)."""
        if not self.lengths:
            return None
        count, left = 0, limit
        for length in self.lengths:
            length = length if left is None else min(length, left)
            count += -(-length // batch_size)
            if left is not None:
                left -= length
        return count

    def samples_before(self, batch_size: int, batch: int, limit: int | None = None) -> int:
        """The number of samples in the batches before batch number ``batch`` (the source must say its sizes: see
        :meth:`batch_count`)."""
        if not self.lengths:
            raise ValueError(f"'{self.describe()}' does not say how many samples it holds")
        produced, index, left = 0, 0, limit
        for length in self.lengths:
            length = length if left is None else min(length, left)
            batches = -(-length // batch_size)
            if index + batches > batch:
                return produced + (batch - index) * batch_size
            index, produced = index + batches, produced + length
            if left is not None:
                left -= length
        return produced

    def _sources(self) -> Iterator[tuple[Path, int | None, Callable[[], dict[str, np.ndarray]]]]:
        """(where, samples, a reader of its named arrays) per shard; a shard is read only when asked."""
        arrays = [*self.names, LABELS] if self.has_labels else list(self.names)
        for shard, length in zip(self.shards, self.lengths, strict=True):
            if shard == self.shards[0]:
                yield shard, length, lambda: self.first_arrays
            else:
                yield shard, length, lambda shard=shard: _read_shard(shard, arrays)  # type: ignore[misc]


def load_validation_data(path: str | Path, *, import_path: str | Path | None = None,
                         columns: dict[str, str] | None = None) -> ValidationData:
    """Open an ``.npz`` file, a directory of ``.npz`` shards, Parquet/Arrow files or a ``datasets`` directory
    (``columns`` maps input names to other column names: :mod:`mpexport.tabledata`), or ``module:function`` (see
    :class:`CallableValidationData`; imported from ``import_path``, default the working directory), checking
    that it is readable, non-empty and consistent."""
    text = str(path)
    if not Path(text).exists() and is_callable_spec(text):
        if columns:
            raise MpexportError("--columns maps the columns of Parquet/Arrow data", stage=STAGE,
                                hint="name the batches' entries after the inputs")
        return CallableValidationData.open(text, import_path)
    path = Path(path)
    if not path.exists():
        raise MpexportError(f"validation data '{path}' does not exist", stage=STAGE)
    from mpexport.tabledata import is_table_source, open_table_data

    if is_table_source(path):
        return open_table_data(path, columns)
    if columns:
        raise MpexportError("--columns maps the columns of Parquet/Arrow data", stage=STAGE,
                            hint="name the .npz arrays after the inputs")
    shards = sorted(path.glob("*.npz")) if path.is_dir() else [path]
    if not shards:
        raise MpexportError(f"validation data directory '{path}' holds no .npz files", stage=STAGE)
    first = _read_shard(shards[0], None)
    names = [name for name in first if name != LABELS]
    if not names:
        raise MpexportError(f"validation data '{path}' holds no input arrays", stage=STAGE)
    lengths = [_shard_length(shard, first if shard == shards[0] else None, list(first)) for shard in shards]
    if sum(lengths) == 0:
        raise MpexportError(f"validation data '{path}' holds no samples", stage=STAGE)
    return ValidationData(path, shards, names, LABELS in first, sum(lengths), first, lengths)


def parse_columns_option(text: str | tuple[str, ...] | list[str] | None) -> dict[str, str]:
    """``"pixels=image,labels=label"`` (or several such texts) -> ``{"pixels": "image", "labels": "label"}``: model
    input (or ``labels``) = column. One-line error for anything else."""
    texts = [text] if isinstance(text, str) else list(text or [])
    mapping: dict[str, str] = {}
    for item in (part.strip() for chunk in texts for part in chunk.split(",")):
        name, equals, column = item.partition("=")
        if not equals or not name.strip() or not column.strip():
            raise MpexportError(f"--columns takes INPUT=COLUMN pairs, not '{item}'", stage=STAGE,
                                hint="e.g. --columns pixels=image,labels=label")
        if name.strip() in mapping:
            raise MpexportError(f"--columns maps '{name.strip()}' twice", stage=STAGE)
        mapping[name.strip()] = column.strip()
    return mapping


_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_callable_spec(text: str) -> bool:
    """True for ``package.module:function`` (a validation-data source to import, not a path)."""
    return bool(_CALLABLE.match(text))


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
        from mpexport.loading import import_callable

        function = import_callable(spec, what="--val-data", stage=STAGE, import_path=import_path)
        first = next(cls._raw_batches(function, spec, import_path), None)
        if first is None:
            raise MpexportError(f"validation data '{spec}' yielded no batches", stage=STAGE)
        return cls(spec, function, first, import_path)

    @staticmethod
    def _raw_batches(function: Any, spec: str,
                     import_path: str | Path | None) -> Iterator[dict[str, np.ndarray] | list[np.ndarray]]:
        from mpexport.loading import importable_from

        try:
            with importable_from(import_path):
                source = function()
                for item in source:
                    yield _to_numpy(item, spec)
        except MpexportError:
            raise
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


def _read_shard(shard: Path, names: list[str] | None) -> dict[str, np.ndarray]:
    try:
        with shard.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise MpexportError(f"cannot read '{shard}': {exc.strerror}", stage=STAGE) from None
    if magic != b"PK\x03\x04":
        raise MpexportError(f"'{shard}' is not a readable .npz file (no zip archive inside)", stage=STAGE,
                            hint="save arrays with numpy.savez(path, name=array, ..., labels=labels)")
    try:
        with np.load(shard, allow_pickle=False) as archive:
            found = list(archive.files)
            if names is not None and sorted(found) != sorted(names):
                raise MpexportError(
                    f"shard '{shard.name}' holds arrays {sorted(found)}, the first shard {sorted(names)}",
                    stage=STAGE,
                )
            arrays = {name: archive[name] for name in (names or found)}
    except MpexportError:
        raise
    except ValueError as exc:
        raise MpexportError(f"'{shard}' holds Python objects, not plain arrays ({first_line(exc)})",
                            stage=STAGE, hint="save numeric arrays with numpy.savez") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise MpexportError(f"'{shard}' is not a readable .npz file ({first_line(exc)})", stage=STAGE) from None
    if not arrays:
        raise MpexportError(f"'{shard}' holds no arrays", stage=STAGE)
    return arrays


def _shard_length(shard: Path, arrays: dict[str, np.ndarray] | None, names: list[str]) -> int:
    arrays = arrays if arrays is not None else _read_shard(shard, names)
    lengths = {name: (array.shape[0] if array.ndim else -1) for name, array in arrays.items()}
    if len(set(lengths.values())) != 1 or -1 in lengths.values():
        detail = ", ".join(f"{name}: {length}" for name, length in lengths.items())
        raise MpexportError(f"arrays in '{shard.name}' disagree on the number of samples ({detail})", stage=STAGE)
    for name, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise MpexportError(f"array '{name}' in '{shard.name}' has dtype {array.dtype}, not a number type",
                                stage=STAGE)
    return next(iter(lengths.values()))


def check_against(data: ValidationData, inputs: list[TensorSpec]) -> None:
    """Check that the data's arrays are exactly the model's inputs (plus optional ``labels``), with shapes
    the inputs accept and dtypes of the same kind (float for float inputs, integer for integer inputs)."""
    if isinstance(data, CallableValidationData):
        data.bind(inputs)
    wanted = [spec.name for spec in inputs]
    if data.ignores_extra_columns:
        data.select(wanted)
    missing = [name for name in wanted if name not in data.names]
    extra = [name for name in data.names if name not in wanted]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unknown {', '.join(extra)}")
        raise MpexportError(
            f"validation data arrays do not match the model inputs ({'; '.join(parts)}); model inputs: "
            f"{', '.join(wanted)}", stage=STAGE, hint=f"name the arrays after the inputs, plus optional '{LABELS}'",
        )
    for spec in inputs:
        array = data.first_arrays[spec.name]
        if not spec.accepts_shape(tuple(array.shape)) and not _accepts_batch_of_any_size(spec, array.shape):
            raise MpexportError(
                f"validation array '{spec.name}' has shape {tuple(array.shape)}, the model expects "
                f"{_shape_text(spec)}", stage=STAGE,
            )
        if not _same_kind(array.dtype, spec.dtype):
            raise MpexportError(
                f"validation array '{spec.name}' has dtype {array.dtype}, the model expects {spec.dtype}",
                stage=STAGE,
            )


def _accepts_batch_of_any_size(spec: TensorSpec, shape: tuple[int, ...]) -> bool:
    """A static-batch model still takes the data in batches of its size: only axes after 0 must match."""
    if not spec.shape or not isinstance(spec.shape[0], int) or len(shape) != len(spec.shape):
        return False
    return spec.accepts_shape((spec.shape[0], *shape[1:]))


def _shape_text(spec: TensorSpec) -> str:
    return "(" + ", ".join(str(dim) for dim in spec.shape) + ")"


def _same_kind(dtype: np.dtype, wanted: str) -> bool:
    if wanted == "bool":
        return dtype.kind == "b"
    if wanted in ("float32", "float16", "bfloat16", "float64"):
        return dtype.kind == "f" or dtype.name == "bfloat16"
    return dtype.kind in "iu"


def _prepare(batch: Batch, inputs: list[TensorSpec] | None, shard: Path, start: int) -> Batch:
    for name, array in batch.items():
        if name != LABELS and array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise MpexportError(
                f"validation array '{name}' holds {bad} NaN/Inf values (shard '{shard.name}', samples from {start})",
                stage=STAGE,
            )
    if inputs:
        for spec in inputs:
            if batch[spec.name].dtype.name != spec.dtype:
                batch[spec.name] = batch[spec.name].astype(numpy_dtype(spec.dtype))
    return batch

