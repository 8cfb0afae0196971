"""Constants a converter changed: a model's floating-point constants compared with those of the FP32 model it was
converted from.

Converting a constant to FP16 rounds it; that is what the candidate's precision means, and verify measures its
effect. Some converters also *replace* values that FP16 cannot hold: onnxconverter-common clamps every constant into
[1e-7, 1e4] in magnitude, so an attention mask's -3.4e38 becomes -1e4 and a LayerNorm epsilon of 1e-12 becomes 1e-7
(1.19e-7 as FP16 holds it).
That changes what the model computes (a mask that no longer masks on long inputs, a normalisation that divides
differently), which the validation data may or may not show. :func:`changed_constants` names each such constant
(a converter that folds other values into a weight and keeps its name is named too: the note says the values differ,
not why).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

from mpexport.base.dtypes import FLOAT_ONNX_TYPES


@dataclass(frozen=True)
class ChangedConstant:
    """A constant of the candidate that is not the reference's value rounded to the candidate's type: ``count`` of
    its elements differ, the first of them ``reference`` in the reference and ``candidate`` in the candidate."""

    name: str
    count: int
    reference: float
    candidate: float

    def describe(self) -> str:
        """``'mask' -3.4e+38 -> -1e+04 (12 values)``."""
        values = f" ({self.count} values)" if self.count > 1 else ""
        return f"'{self.name}' {self.reference:.3g} -> {self.candidate:.3g}{values}"


def changed_constants(reference: ir.Model, candidate: ir.Model) -> list[ChangedConstant]:
    """Every floating-point constant of ``candidate``'s main graph (initializers, Constant nodes' values) that has a
    constant of the same name and shape in ``reference`` and differs from that constant rounded to the candidate's
    type (FP16 overflow rounds to infinity and underflow to zero: a converter that wrote anything else changed the
    value; the largest finite value, as mpexport writes an attention mask's sentinel, is rounding too), in the
    candidate's order. Constants without a counterpart (renamed, added) are not compared."""
    theirs = _constants(reference)
    changed = []
    for name, tensor in _constants(candidate).items():
        original = theirs.get(name)
        if original is None or tuple(original.shape) != tuple(tensor.shape):
            continue
        found = _first_change(original.numpy(), tensor.numpy())
        if found is not None:
            changed.append(ChangedConstant(name, *found))
    return changed


def _constants(model: ir.Model) -> dict[str, ir.TensorProtocol]:
    """The main graph's floating-point constants by value name."""
    found: dict[str, ir.TensorProtocol] = {}
    for name, value in model.graph.initializers.items():
        if value.const_value is not None and value.const_value.dtype in FLOAT_ONNX_TYPES:
            found[name] = value.const_value
    for node in model.graph:
        attribute = node.attributes.get("value") if node.op_type == "Constant" and node.domain == "" else None
        tensor = attribute.value if attribute is not None else None
        if isinstance(tensor, ir.TensorProtocol) and tensor.dtype in FLOAT_ONNX_TYPES and node.outputs[0].name:
            found[node.outputs[0].name] = tensor
    return found


def _first_change(reference: np.ndarray, candidate: np.ndarray) -> tuple[int, float, float] | None:
    """(how many elements differ, the first one's reference and candidate values), or None when ``candidate`` is
    ``reference`` rounded to its type (NaN equal to NaN)."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        rounded = reference.astype(candidate.dtype)
        wide, narrow = reference.astype(np.float64), candidate.astype(np.float64)
    both_nan = np.isnan(wide) & np.isnan(narrow)
    largest = float(ml_dtypes.finfo(candidate.dtype).max)
    saturated = (np.abs(wide) > largest) & (narrow == np.sign(wide) * largest)  # overflow to the largest finite
    different = (rounded != candidate) & ~both_nan & ~saturated
    if not different.any():
        return None
    first = int(np.flatnonzero(different.reshape(-1))[0])
    return int(different.sum()), float(reference.reshape(-1)[first]), float(candidate.reshape(-1)[first])
