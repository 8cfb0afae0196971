"""Validation data: the :class:`ValidationData` every source is (batches of arrays named after the model's inputs,
optional ``labels``), read from ``.npz`` files or a directory of ``.npz`` shards shard by shard, and checked against
the model's input specs. Tables are :mod:`mpexport.data.tables`, ``module:function`` batches
:mod:`mpexport.data.callable`; :func:`mpexport.data.open.load_validation_data` opens any of them.

Every problem (missing file, wrong names, shapes or dtypes, NaN/Inf, no samples, labels that are not class indices,
a damaged header, a file over the memory limit: :mod:`mpexport.data.npz`) is a one-line :class:`MpexportError`
(exit 2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from mpexport.base.errors import MpexportError
from mpexport.base.specs import (
    Batch,
    OneSample,
    TensorSpec,
    fixed_batch,
    numpy_dtype,
    pad_batch,
    spec_from_array,
)
from mpexport.data.labels import check_labels, per_sample
from mpexport.data.limits import shown
from mpexport.data.npz import ArrayHeader, npz_headers, read_npz

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
    unbatched: tuple[str, ...] = ()
    """The inputs without a batch axis (rank 0, or data of one more axis than the input: a value per sample), set by
    :func:`check_against`."""
    one_sample_runs: str | None = None
    """Why every run takes one sample (an input without a batch axis holds different values per sample: see
    :func:`check_against`); None when samples share runs."""

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

    def run_batch(self, inputs: list[TensorSpec]) -> int | None:
        """The batch size every run of a model with ``inputs`` must take on this data: 1 when an input without a
        batch axis holds a value per sample (:attr:`one_sample_runs`), else the batch size the model fixes
        (:func:`mpexport.base.specs.fixed_batch`), None when any size runs."""
        return 1 if self.one_sample_runs else fixed_batch(inputs, self.unbatched)

    def whole_batches(self, inputs: list[TensorSpec]) -> bool:
        """Whether this data's batches must run whole, never cut into samples: the batch size is fixed
        (:meth:`run_batch`), or an input with axes but no batch axis is fed one value for the batch (a cut would
        slice it as if it had one)."""
        return self.run_batch(inputs) is not None or any(spec.shape for spec in inputs if spec.name in self.unbatched)

    def run_size(self, batch_size: int) -> int:
        """``batch_size``, or 1 where every run takes one sample (:attr:`one_sample_runs`)."""
        return 1 if self.one_sample_runs else batch_size

    def batches(self, batch_size: int, *, limit: int | None = None, inputs: list[TensorSpec] | None = None,
                exact: bool = False, skip: int = 0) -> Iterator[Batch]:
        """Yield batches of at most ``batch_size`` samples (``exact``: only full batches), at most ``limit``
        samples in all, arrays cast to ``inputs``' dtypes when given. Raises on NaN/Inf in an input. ``skip``:
        leave out the first ``skip`` batches (unread where the shard sizes say which files hold them), so that
        a shard of the data is its batches ``skip`` onwards, the same batches a whole pass yields. When ``inputs``
        fix the batch size at ``batch_size`` (:func:`mpexport.base.specs.fixed_batch`), a short batch (the last of
        the set, of a shard or of ``limit``) is padded to it by repeating its samples
        (:func:`mpexport.base.specs.pad_batch`: it says how many samples are real), so no sample is left out.
        Arrays of one value (a rank-0 input's) go whole into every batch (see :func:`prepare_batch`); where every run
        takes one sample (:attr:`one_sample_runs`) each batch is a :class:`mpexport.base.specs.OneSample`, whatever
        ``batch_size`` says (:meth:`batch_count` and :meth:`samples_before` count the same way)."""
        batch_size = self.run_size(batch_size)
        pad = inputs is not None and self.run_batch(inputs) == batch_size
        produced = index = 0
        for source, length, load in self._sources():
            if length is not None and index + -(-length // batch_size) <= skip:
                index += -(-length // batch_size)
                produced += length
                continue
            arrays = load()
            count = length if length is not None else per_sample_count(arrays)
            for start in range(0, count, batch_size):
                stop = min(start + batch_size, count)
                if limit is not None:
                    stop = min(stop, start + limit - produced)
                if stop <= start or (exact and stop - start < batch_size):
                    return
                if index >= skip:
                    batch = prepare_batch(_rows(arrays, start, stop, count), inputs, source, start)
                    yield self.runnable(batch, batch_size, pad)
                index += 1
                produced += stop - start

    def runnable(self, batch: Batch, batch_size: int, pad: bool) -> Batch:
        """A prepared batch as a run takes it: a :class:`mpexport.base.specs.OneSample` where every run takes one
        sample, padded to ``batch_size`` when ``pad`` (a model that fixes its batch size), else itself."""
        if self.one_sample_runs:
            return OneSample(batch)
        return pad_batch(batch, batch_size, self.unbatched) if pad else batch

    def batch_count(self, batch_size: int, limit: int | None = None) -> int | None:
        """How many batches :meth:`batches` yields (None when the source does not say)."""
        if not self.lengths:
            return None
        batch_size = self.run_size(batch_size)
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
        batch_size = self.run_size(batch_size)
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
    """A later shard's arrays, its headers checked (and its names compared with the first shard's) before reading."""
    headers = npz_headers(shard, "validation shard")
    if names is not None and sorted(headers) != sorted(names):
        raise MpexportError(f"shard '{shown(shard.name)}' holds arrays {sorted(headers)}, the first shard "
                            f"{sorted(names)}", stage=STAGE)
    return read_npz(shard, names, "validation shard", headers=headers)


def _shard_length(shard: Path, headers: dict[str, ArrayHeader], first: dict[str, ArrayHeader]) -> int:
    """Samples in one shard, from its headers: the first shard's arrays, one number of samples, the same sample
    shapes as the first shard. An input array of one value (shape ``()``, or one row) may stand beside arrays of more
    samples: it is one value for every sample, which only an input without a batch axis takes
    (:func:`check_against` says so of any other)."""
    if sorted(headers) != sorted(first):
        raise MpexportError(f"shard '{shown(shard.name)}' holds arrays {sorted(headers)}, the first shard "
                            f"{sorted(first)}", stage=STAGE)
    lengths = {name: (header.shape[0] if header.shape else 1) for name, header in headers.items()}
    per_sample = {name: length for name, length in lengths.items()
                  if name == LABELS or (headers[name].shape and headers[name].shape[0] != 1)}
    if len(set(per_sample.values())) > 1 or (LABELS in headers and not headers[LABELS].shape):
        detail = ", ".join(f"{name}: {length}" for name, length in lengths.items())
        raise MpexportError(f"arrays in '{shown(shard.name)}' disagree on the number of samples ({detail})",
                            stage=STAGE)
    for name, header in headers.items():
        if header.shape[1:] != first[name].shape[1:]:
            raise MpexportError(f"array '{name}' in shard '{shown(shard.name)}' has samples of shape "
                                f"{header.shape[1:]}, the first shard {first[name].shape[1:]}", stage=STAGE)
    return next(iter(per_sample.values()), 1)


def per_sample_count(arrays: Batch) -> int:
    """The number of samples in a group of arrays: the longest first axis (arrays of one value, rank 0 or one row,
    stand for every sample); 1 when every array is rank 0."""
    return max((len(array) for array in arrays.values() if np.ndim(array)), default=1)


def _rows(arrays: Batch, start: int, stop: int, count: int) -> Batch:
    """Samples ``start`` to ``stop`` of arrays holding ``count`` samples; an array of one value for every sample
    (rank 0, or one row of ``count`` > 1) goes whole."""
    return {name: array[start:stop] if np.ndim(array) and len(array) == count else array
            for name, array in arrays.items()}


def check_against(data: ValidationData, inputs: list[TensorSpec]) -> None:
    """Check that the data's arrays are exactly the model's inputs (plus optional ``labels``), with shapes
    the inputs accept and dtypes of the same kind (float for float inputs, integer for integer inputs). An input
    with a batch axis takes one row per sample. One without (rank 0, or given one more axis than it has: see
    :func:`has_no_batch_axis`) takes one value for every sample, or a value per sample: then, where those values
    differ, every run takes one sample (``data.one_sample_runs`` says why; the model's batched inputs must take a
    batch of one). Sets ``data.unbatched``."""
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
    count = per_sample_count({name: data.first_arrays[name] for name in wanted})
    unbatched = [spec for spec in inputs if has_no_batch_axis(spec, data.first_arrays[spec.name])]
    for spec in inputs:
        array = data.first_arrays[spec.name]
        if spec in unbatched:
            check_unbatched(spec, array, count)
        elif not np.ndim(array) or len(array) != count:
            raise MpexportError(
                f"validation array '{spec.name}' has shape {tuple(array.shape)}, one value beside {count} samples; "
                f"the model expects {_shape_text(spec)}, one row per sample", stage=STAGE, hint=UNBATCHED_HINT,
            )
        elif not spec.accepts_shape(tuple(array.shape)) and not _accepts_batch_of_any_size(spec, array.shape):
            raise MpexportError(
                f"validation array '{spec.name}' has shape {tuple(array.shape)}, the model expects "
                f"{_shape_text(spec)}", stage=STAGE,
            )
        if not _same_kind(array.dtype, spec.dtype):
            raise MpexportError(
                f"validation array '{spec.name}' has dtype {array.dtype}, the model expects {spec.dtype}",
                stage=STAGE,
            )
    data.unbatched = tuple(spec.name for spec in unbatched)
    data.one_sample_runs = _one_sample_runs(inputs, unbatched, data.first_arrays)


UNBATCHED_HINT = ("an input without a batch axis takes one value for every sample (one row, or a 0-d array for a "
                  "scalar) or a value per sample (N rows); every other input takes one row per sample")


def has_no_batch_axis(spec: TensorSpec, array: np.ndarray) -> bool:
    """Whether ``array`` feeds ``spec`` as an input without a batch axis: the input is rank 0, or its axis 0 is a
    fixed size and the array has one axis more than the input (a value per sample, or one row standing for every
    sample). An input whose axis 0 is dynamic is batched: data of another rank is refused for it."""
    return not spec.shape or (isinstance(spec.shape[0], int) and np.ndim(array) == len(spec.shape) + 1)


def check_unbatched(spec: TensorSpec, array: np.ndarray, count: int) -> None:
    """An input without a batch axis takes one value (a rank-0 input: a 0-d array) or rows of its own shape: one
    for every sample, or one per sample (``count``); anything else is a one-line error saying why."""
    if np.ndim(array) > len(spec.shape) + 1:
        raise MpexportError(f"validation array '{spec.name}' has shape {tuple(array.shape)}; the model input is "
                            f"{_described(spec)}", stage=STAGE, hint=UNBATCHED_HINT)
    if np.ndim(array) == len(spec.shape):
        return  # a rank-0 input's one value
    if len(array) == 0:
        raise MpexportError(f"validation array '{spec.name}' is empty; the model input is {_described(spec)}",
                            stage=STAGE, hint=UNBATCHED_HINT)
    if len(array) not in (1, count):
        raise MpexportError(f"validation array '{spec.name}' holds {len(array)} values beside {count} samples; the "
                            f"model input is {_described(spec)}", stage=STAGE, hint=UNBATCHED_HINT)
    if not spec.accepts_shape(tuple(array.shape[1:])):
        raise MpexportError(f"validation array '{spec.name}' has values of shape {tuple(array.shape[1:])}, the "
                            f"model input is {_described(spec)}", stage=STAGE, hint=UNBATCHED_HINT)


def _described(spec: TensorSpec) -> str:
    """``a scalar (shape ()), with no batch axis`` / ``of shape (4), with no batch axis``."""
    return f"{'a scalar (shape ())' if not spec.shape else 'of shape ' + _shape_text(spec)}, with no batch axis"


def _one_sample_runs(inputs: list[TensorSpec], unbatched: list[TensorSpec],
                     arrays: dict[str, np.ndarray]) -> str | None:
    """Why every run must take one sample (inputs without a batch axis whose per-sample values differ, or no input
    with a batch axis at all: then a run's outputs are one sample's), checked possible (the batched inputs take a
    batch of one); None when samples can share runs."""
    varying = [spec.name for spec in unbatched if _rows_differ(arrays[spec.name])]
    if not varying:
        return "no input has a batch axis: each run takes one sample" if len(unbatched) == len(inputs) else None
    fixed = [spec for spec in inputs if spec not in unbatched and isinstance(spec.shape[0], int) and
             spec.shape[0] != 1]
    names = ", ".join(f"'{name}'" for name in varying)
    what = (f"input {names} has no batch axis and holds" if len(varying) == 1 else
            f"inputs {names} have no batch axis and hold") + " a different value per sample"
    if fixed:
        raise MpexportError(f"{what}, so each run takes one sample, but input '{fixed[0].name}' fixes the batch at "
                            f"{fixed[0].shape[0]}", stage=STAGE,
                            hint="give one value for every sample, or export the model with a dynamic batch")
    return f"{what}: each run takes one sample"


def _rows_differ(array: np.ndarray) -> bool:
    """Whether the rows of ``array`` (axis 0) are not all equal (NaN rows differ: they are refused later)."""
    return np.ndim(array) > 0 and len(array) > 1 and not bool((array == array[:1]).all())


def _one_row(spec: TensorSpec, array: np.ndarray, where: str) -> np.ndarray:
    """The value an input without a batch axis is fed from ``array``: itself when it has the input's rank (a
    rank-0 input's one value), else its one row (all its rows equal: one value for every sample, or the sample's
    own where a run takes one); a one-line error naming two different values otherwise."""
    if np.ndim(array) == len(spec.shape):
        return np.asarray(array)
    if _rows_differ(array):
        row = int(np.flatnonzero((array != array[:1]).reshape(len(array), -1).any(axis=1))[0])
        shown_values = f"row 0 and row {row}" if spec.shape else f"{array[0]} and {array[row]}"
        raise MpexportError(f"validation array '{spec.name}' holds different values ({shown_values}{where}); the "
                            f"model input is {_described(spec)}, and these samples share a run", stage=STAGE,
                            hint="values per sample must differ in the first shard already (then every run takes "
                                 "one sample), or be equal throughout")
    return np.asarray(array[0])


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
    sample), labels checked (:func:`mpexport.data.labels.check_labels`; ``(N, 1)`` labels become ``(N,)``), arrays
    cast to the inputs' dtypes where ``inputs`` are given. An input without a batch axis gets the one value its array
    holds for these samples, in its own shape, placed after the per-sample arrays (:func:`check_unbatched`)."""
    if LABELS in batch:
        check_labels(batch[LABELS], shard, start)
        batch[LABELS] = per_sample(batch[LABELS])
    for name, array in batch.items():
        if name != LABELS and array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise MpexportError(
                f"validation array '{name}' holds {bad} NaN/Inf values (shard '{shown(shard.name)}', samples from "
                f"{start})",
                stage=STAGE,
            )
    for spec in [spec for spec in inputs or [] if has_no_batch_axis(spec, batch[spec.name])]:  # after the others
        batch[spec.name] = _one_row(spec, batch.pop(spec.name),
                                    f" in one batch: shard '{shown(shard.name)}', samples from {start}")
    for spec in inputs or []:
        if batch[spec.name].dtype.name != spec.dtype:
            try:
                batch[spec.name] = batch[spec.name].astype(numpy_dtype(spec.dtype))
            except MemoryError:
                raise MpexportError(f"a batch of '{shown(shard)}' (samples from {start}) does not fit in memory "
                                    f"as {spec.dtype}", stage=STAGE, hint="use a smaller --batch-size") from None
    return batch



def open_npz(path: Path) -> ValidationData:
    """An ``.npz`` file or a directory of ``.npz`` shards (read shard by shard), checked readable, non-empty and
    consistent from every shard's headers (see :func:`mpexport.data.npz.npz_headers`: nothing over the memory
    limit is decompressed), the first shard read; one-line errors otherwise."""
    shards = sorted(path.glob("*.npz")) if path.is_dir() else [path]
    if not shards:
        raise MpexportError(f"validation data directory '{shown(path)}' holds no .npz files", stage=STAGE)
    headers = [npz_headers(shard, "validation shard" if path.is_dir() else "validation data") for shard in shards]
    names = [name for name in headers[0] if name != LABELS]
    if not names:
        raise MpexportError(f"validation data '{shown(path)}' holds no input arrays", stage=STAGE)
    lengths = [_shard_length(shard, header, headers[0]) for shard, header in zip(shards, headers, strict=True)]
    if sum(lengths) == 0:
        raise MpexportError(f"validation data '{shown(path)}' holds no samples", stage=STAGE)
    first = read_npz(shards[0], list(headers[0]), headers=headers[0])
    if LABELS in first:
        check_labels(first[LABELS], shards[0])
    return ValidationData(path, shards, names, LABELS in first, sum(lengths), first, lengths)
