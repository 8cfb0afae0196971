"""Reading weights without keeping them: the plan and the writer touch every initializer of a model once, and
a large model's initializers are memory-mapped from its external data file. Each read here unmaps the file
again, so the pages read are dropped from this process instead of accumulating to the whole model."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, cast

import numpy as np
import onnx_ir as ir

Result = TypeVar("Result")


def reduce_tensor(tensor: ir.TensorProtocol, reduce: Callable[[np.ndarray], Result]) -> Result:
    """``reduce(tensor.numpy())``; an external tensor is released (unmapped) afterwards. ``reduce`` must return
    something that does not view its argument (a number, a converted copy)."""
    try:
        return reduce(tensor.numpy())
    finally:
        if isinstance(tensor, ir.ExternalTensor):
            try:
                tensor.release()
            except BufferError:  # a view is still alive (an exception traceback holds it): leave it mapped
                pass


def max_abs(array: np.ndarray) -> float:
    """Largest |value| of ``array`` in one pass without temporaries (0 for an empty array; NaN propagates)."""
    return float(max(array.max(), -array.min())) if array.size else 0.0


def converted(tensor: ir.TensorProtocol, target: ir.DataType) -> ir.TensorProtocol:
    """``tensor`` converted to ``target``, computed when it is serialized and not kept: saving a model with
    external data then holds one converted weight at a time (values must already fit ``target``)."""
    numpy_type = target.numpy()

    def compute() -> ir.TensorProtocol:
        return ir.tensor(reduce_tensor(tensor, lambda array: array.astype(numpy_type)), name=tensor.name)

    return ir.LazyTensor(compute, dtype=target, shape=cast(ir.Shape, tensor.shape), name=tensor.name)
