"""Tensor specs of an ONNX graph's inputs and outputs, as the manifest and the validation checks state them."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from mpexport.base.specs import UNKNOWN_DTYPE, TensorSpec, normalize_dtype


def graph_specs(values: Sequence[ir.Value]) -> list[TensorSpec]:
    """Specs of ONNX graph inputs or outputs: names, dtypes and dims (symbolic dims by name, unknown ``?``); a value
    the file and shape inference leave untyped has dtype :data:`mpexport.base.specs.UNKNOWN_DTYPE` (see
    :func:`typed_by_runtime`), never a guess."""
    specs = []
    for value in values:
        dtype = normalize_dtype(value.dtype.numpy().name) if value.dtype is not None else UNKNOWN_DTYPE
        shape = tuple(dim if isinstance(dim, int) else (str(dim) if dim is not None else "?")
                      for dim in (value.shape or ()))
        specs.append(TensorSpec(value.name or "", dtype, shape))
    return specs
