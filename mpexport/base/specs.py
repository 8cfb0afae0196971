"""Tensor specifications: the names, shapes (with symbolic dims) and dtypes of model inputs and outputs."""

from __future__ import annotations

import re
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
