"""Precisions: their names, their types in ONNX, numpy and torch, and the largest finite value of each.

This is the one table the plan, the writer, lint, the emulations and the reports read; nothing else spells a
type's range or maps one type system to another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np
import onnx_ir as ir

if TYPE_CHECKING:
    import torch

FP16, BF16, FP32, FP64 = "fp16", "bf16", "fp32", "fp64"
NONE = "none"
"""The precision of a node that computes no floating-point values."""
LOW_PRECISIONS = (FP16, BF16)
PRECISIONS = (FP16, BF16, FP32, FP64)

ONNX_TYPES: dict[str, ir.DataType] = {FP16: ir.DataType.FLOAT16, BF16: ir.DataType.BFLOAT16, FP32: ir.DataType.FLOAT,
                                      FP64: ir.DataType.DOUBLE}
PRECISION_OF_ONNX: dict[ir.DataType, str] = {dtype: name for name, dtype in ONNX_TYPES.items()}
FLOAT_ONNX_TYPES = frozenset(ONNX_TYPES.values())
LOW_ONNX_TYPES = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)

NUMPY_TYPES: dict[str, np.dtype] = {FP16: np.dtype(np.float16), BF16: np.dtype(ml_dtypes.bfloat16),
                                    FP32: np.dtype(np.float32), FP64: np.dtype(np.float64)}
TYPE_MAX: dict[str, float] = {name: float(ml_dtypes.finfo(dtype).max) for name, dtype in NUMPY_TYPES.items()}
"""Largest finite value per precision (FP16 65504, BF16 3.3895e38)."""
WIDTH = {FP16: 1, BF16: 1, FP32: 2, FP64: 3}
"""Promotion order: the wider of two inputs decides (FP16 and BF16 promote to FP32 together)."""

CANONICAL_NAMES = {"float16": FP16, "bfloat16": BF16, "float32": FP32, "float64": FP64}
"""numpy/torch dtype names (``torch.float16`` without the prefix) -> precision."""
MASK_SENTINEL = 1e38
"""|values| at or beyond this (finfo(float32).min/max, infinities) are masking sentinels, not magnitudes."""


def onnx_type(precision: str) -> ir.DataType | None:
    """The ONNX type of a precision name; None for ``none`` or an unknown name."""
    return ONNX_TYPES.get(precision)


def precision_of(dtype: ir.DataType | None) -> str | None:
    """The precision name of an ONNX type; None when it is not floating point (or unknown)."""
    return PRECISION_OF_ONNX.get(dtype) if dtype is not None else None


def type_max(dtype: ir.DataType) -> float | None:
    """Largest finite value of a floating-point ONNX type; None for other types."""
    name = precision_of(dtype)
    return TYPE_MAX[name] if name else None


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a precision name (imports torch: only the stages that run torch call this)."""
    import torch

    return {FP16: torch.float16, BF16: torch.bfloat16, FP32: torch.float32, FP64: torch.float64}[precision]


def precision_of_torch(dtype: torch.dtype) -> str | None:
    """The precision name of a torch dtype; None when it is not floating point."""
    return CANONICAL_NAMES.get(str(dtype).removeprefix("torch."))
