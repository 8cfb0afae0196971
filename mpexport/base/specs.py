"""Tensor specifications: the names, shapes (with symbolic dims) and dtypes of model inputs and outputs."""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

from mpexport.base.errors import MpexportError

Dim = int | str
"""A dimension: a fixed size, or the name of a symbolic (dynamic) size such as ``"batch"``."""

DTYPE_ALIASES = {
    "float": "float32",
    "fp32": "float32",
    "half": "float16",
    "fp16": "float16",
    "bf16": "bfloat16",
    "long": "int64",
    "int": "int32",
    "double": "float64",
}
SUPPORTED_DTYPES = (
    "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool",
)
_DIM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DEFAULT_EXAMPLE_SIZE = {"batch": 2}
FALLBACK_EXAMPLE_SIZE = 8
UNKNOWN_DTYPE = "unknown"
"""The dtype of a model output its file leaves untyped and nothing could infer (see
:func:`mpexport.commands.fp32.typed_by_runtime`): recorded as such, and compared by verify all the same."""
Batch = dict[str, np.ndarray]
"""One batch of named arrays: the model's inputs (and optionally ``labels``) as every source yields them."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one model input or output.

    ``shape`` holds ints for fixed sizes and names for symbolic sizes; ``example_sizes`` gives the size to use
    for a symbolic dim when an example tensor must be made without data (``--input ids:batch,seq=128:int64``).
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    example_sizes: dict[str, int] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict:
        """The spec as stored in ``manifest.json``: ``{"name", "dtype", "shape"}``."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @staticmethod
    def from_json(data: dict) -> TensorSpec:
        """Inverse of :meth:`to_json`."""
        return TensorSpec(data["name"], data["dtype"], tuple(data["shape"]))

    def dynamic_dims(self) -> dict[int, str]:
        """Axis index -> symbolic name for every dynamic axis."""
        return {axis: dim for axis, dim in enumerate(self.shape) if isinstance(dim, str)}

    def example_shape(self) -> tuple[int, ...]:
        """A concrete shape: symbolic dims take their example size (``batch`` 2, others 8 unless given)."""
        return tuple(
            dim if isinstance(dim, int)
            else self.example_sizes.get(dim, DEFAULT_EXAMPLE_SIZE.get(dim, FALLBACK_EXAMPLE_SIZE))
            for dim in self.shape
        )

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        """True when a concrete ``shape`` fits this spec (same rank, fixed dims equal)."""
        return len(shape) == len(self.shape) and all(
            isinstance(want, str) or want == got for want, got in zip(self.shape, shape, strict=False)
        )


def normalize_dtype(name: str) -> str:
    """Canonical dtype name (``float32``, ``int64``, ...) for a user-written or numpy/torch dtype name."""
    text = str(name).strip().lower().removeprefix("torch.")
    text = DTYPE_ALIASES.get(text, text)
    if text not in SUPPORTED_DTYPES:
        raise MpexportError(
            f"unknown dtype '{name}'", stage="inputs", hint=f"use one of {', '.join(SUPPORTED_DTYPES)}"
        )
    return text


def parse_input_option(text: str) -> TensorSpec:
    """Parse ``--input NAME:SHAPE:DTYPE``, e.g. ``pixels:batch,3,224,224:float32`` or ``ids:batch,seq=128:int64``.

    Dims are integers (fixed) or names (dynamic); ``name=N`` is a dynamic dim with example size N. The dtype
    may be omitted (``float32``).
    """
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise MpexportError(
            f"cannot read --input '{text}'", stage="inputs",
            hint="write NAME:SHAPE:DTYPE, e.g. pixels:batch,3,224,224:float32",
        )
    name, shape_text = parts[0].strip(), parts[1]
    dtype = normalize_dtype(parts[2]) if len(parts) == 3 else "float32"
    dims: list[Dim] = []
    examples: dict[str, int] = {}
    for token in (t.strip() for t in shape_text.split(",")):
        dim_name, _, size = token.partition("=")
        if token.isdigit():
            dims.append(int(token))
        elif _DIM_NAME.match(dim_name) and (not size or size.isdigit()):
            dims.append(dim_name)
            if size:
                examples[dim_name] = int(size)
        else:
            raise MpexportError(
                f"cannot read dim '{token}' in --input '{text}'", stage="inputs",
                hint="a dim is a size (224), a name (batch) or a name with an example size (seq=128)",
            )
    return TensorSpec(name, dtype, tuple(dims), examples)


def spec_from_array(name: str, array: np.ndarray, batch_dim: str | None = "batch") -> TensorSpec:
    """A spec for validation data: the array's dtype and shape, with axis 0 named ``batch_dim`` (dynamic)."""
    shape: list[Dim] = list(array.shape)
    if batch_dim and shape:
        shape[0] = batch_dim
    return TensorSpec(name, normalize_dtype(array.dtype.name), tuple(shape))


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype for a canonical dtype name (``bfloat16`` maps to ml_dtypes' bfloat16)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def fixed_batch(specs: list[TensorSpec], unbatched: Collection[str] = ()) -> int | None:
    """The batch size the model fixes: axis 0 of its inputs when every input that has an axis 0 fixes it (the first
    one's size); None when any input's axis 0 is dynamic (then a fixed-size input is not batched) or none has one
    (rank-0 inputs, and the ``unbatched`` ones the data gives no batch axis, have none)."""
    batched = [spec.shape[0] for spec in specs if spec.shape and spec.name not in unbatched]
    if not batched or any(isinstance(dim, str) for dim in batched):
        return None
    first = batched[0]
    return first if isinstance(first, int) else None


class PaddedBatch(dict[str, np.ndarray]):
    """A batch filled up to a model's fixed batch size by repeating its samples: every per-sample array holds
    :attr:`size` rows, of which only the first :attr:`samples` are real (count and measure only those: see
    :func:`batch_samples` and :func:`real_rows`)."""

    def __init__(self, arrays: Batch, samples: int, size: int) -> None:
        super().__init__(arrays)
        self.samples = samples
        self.size = size


class OneSample(PaddedBatch):
    """One sample run alone: an input without a batch axis holds a value per sample, so no two samples share a run.
    Its arrays are whole (inputs without a batch axis hold the sample's value in the input's own shape), and every
    output is this one sample's, whatever its shape (:func:`real_rows` gives each a sample axis)."""

    def __init__(self, arrays: Batch, samples: int = 1, size: int = 1) -> None:
        super().__init__(arrays, samples, size)


def batch_samples(batch: Batch) -> int:
    """The number of real samples in a batch: a :class:`PaddedBatch`'s own count, else the first axis of its first
    array that has one (rank-0 arrays, one value for the whole batch, have none); 1 when every array is a scalar."""
    if isinstance(batch, PaddedBatch):
        return batch.samples
    return next((len(array) for array in batch.values() if np.ndim(array)), 1)


def sample_rows(batch: Batch, start: int, stop: int) -> Batch:
    """Samples ``start`` to ``stop`` of ``batch``: its per-sample arrays sliced on axis 0, its rank-0 arrays (one
    value for every sample) kept whole; a :class:`OneSample` is its own only sample."""
    if isinstance(batch, OneSample):
        return batch
    return {name: array[start:stop] if np.ndim(array) else array for name, array in batch.items()}


def pad_batch(batch: Batch, size: int, unbatched: Collection[str] = ()) -> Batch:
    """``batch`` filled up to ``size`` samples by repeating its samples in order (a model with a fixed batch size
    takes no shorter batch): a :class:`PaddedBatch` saying how many are real; ``batch`` itself when it is full. The
    ``unbatched`` arrays (one value for the batch, whatever their length) are kept as they are."""
    samples = batch_samples(batch)
    if samples >= size:
        return batch
    rows = np.arange(size) % samples
    return PaddedBatch({name: array[rows] if np.ndim(array) and len(array) == samples and name not in unbatched
                        else array
                        for name, array in batch.items()}, samples, size)


def real_rows(arrays: list[np.ndarray], batch: Batch) -> list[np.ndarray]:
    """A model's outputs on ``batch`` without the rows of its padding (outputs whose axis 0 is the padded size are
    cut to the real samples; other outputs, and every output of an unpadded batch, are returned as they are). A
    :class:`OneSample`'s outputs are its sample's: one that does not start with an axis of 1 gets one."""
    if isinstance(batch, OneSample):
        return [array if np.ndim(array) and len(array) == 1 else np.asarray(array)[None] for array in arrays]
    if not isinstance(batch, PaddedBatch):
        return arrays
    return [array[:batch.samples] if np.ndim(array) and len(array) == batch.size else array for array in arrays]
