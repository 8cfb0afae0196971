"""Validation data: the :class:`ValidationData` every source is (batches of arrays named after the model's inputs,
optional ``labels``), read from ``.npz`` files or a directory of ``.npz`` shards shard by shard, and checked against
the model's input specs. Tables are :mod:`mpexport.data.tables`, ``module:function`` batches
:mod:`mpexport.data.callable`; :func:`mpexport.data.open.load_validation_data` opens any of them.

Every problem (missing file, wrong names, shapes or dtypes, NaN/Inf, no samples) is a one-line
:class:`MpexportError` (exit 2).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from mpexport.base.errors import MpexportError, first_line
from mpexport.base.specs import Batch, TensorSpec, numpy_dtype, spec_from_array

STAGE = "val-data"
LABELS = "labels"


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

    def bind(self, inputs: list[TensorSpec]) -> None:
        """Name the batches' arrays after ``inputs`` where the source does not name them itself (nothing to do
        for named arrays)."""

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
                    yield prepare_batch({name: array[start:stop] for name, array in arrays.items()}, inputs, source,
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


def prepare_batch(batch: Batch, inputs: list[TensorSpec] | None, shard: Path, start: int) -> Batch:
    """One batch as every source yields it: NaN/Inf refused (one line naming the array, the shard and the first
    sample), arrays cast to the inputs' dtypes where ``inputs`` are given."""
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



def open_npz(path: Path) -> ValidationData:
    """An ``.npz`` file or a directory of ``.npz`` shards (read shard by shard), checked readable, non-empty and
    consistent; one-line errors otherwise."""
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
