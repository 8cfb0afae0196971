"""Decide the model's inputs (names, dtypes, shapes with dynamic dims) and make example tensors for export.

Sources, most authoritative first: what the model file records (a ``.pt2`` archive), ``--input`` options,
the validation data (its dims made dynamic where the model's config says so: a Hugging Face model's sequence),
the shapes the model's config implies, the ``forward`` signature (names only). Contradictions are one-line
errors. Also the validation data a bundle recorded, opened again (:func:`recorded_validation_data`).
"""

from __future__ import annotations

import numpy as np
import torch

from mpexport.base.errors import MpexportError
from mpexport.base.specs import TensorSpec, fixed_batch
from mpexport.bundle.store import Bundle
from mpexport.data.base import ValidationData, check_against
from mpexport.data.open import load_validation_data
from mpexport.sources.model import LoadedModel

STAGE = "inputs"
EXAMPLE_BATCH = 2


def resolve_inputs(model: LoadedModel, data: ValidationData | None, given: list[TensorSpec],
                   *, dynamic_batch: bool = True) -> list[TensorSpec]:
    """The model's input specs. A ``.pt2`` archive's own specs win and ``given``/``data`` must agree with them;
    otherwise ``given`` specs, then the data's arrays (axis 0 a dynamic ``batch``), named and ordered by the
    ``forward`` signature. ``dynamic_batch=False`` fixes ``batch`` to the example size."""
    _check_unique(given)
    if model.input_specs is not None:
        specs = _check_recorded(model.input_specs, given)
    else:
        specs = _from_signature(model, data, given)
    if data is not None:
        check_against(data, specs)
    if not dynamic_batch:
        specs = [_fix_batch(spec) for spec in specs]
    return specs


def _check_unique(given: list[TensorSpec]) -> None:
    names = [spec.name for spec in given]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise MpexportError(f"--input names {', '.join(duplicates)} more than once", stage=STAGE)


def _check_recorded(recorded: list[TensorSpec], given: list[TensorSpec]) -> list[TensorSpec]:
    by_name = {spec.name: spec for spec in recorded}
    for spec in given:
        have = by_name.get(spec.name)
        if have is None:
            raise MpexportError(
                f"--input '{spec.name}' is not an input of the model (inputs: {', '.join(by_name)})", stage=STAGE
            )
        if have.dtype != spec.dtype:
            raise MpexportError(f"--input '{spec.name}' says {spec.dtype}, the model records {have.dtype}",
                                stage=STAGE)
        if not _same_layout(have, spec):
            raise MpexportError(
                f"--input '{spec.name}' says shape {_text(spec)}, the model records {_text(have)}", stage=STAGE,
                hint="a torch.export archive fixes its shapes; re-export it with other dynamic_shapes to change them",
            )
    return list(recorded)


def _same_layout(recorded: TensorSpec, given: TensorSpec) -> bool:
    if len(recorded.shape) != len(given.shape):
        return False
    return all(isinstance(a, str) == isinstance(b, str) and (isinstance(a, str) or a == b)
               for a, b in zip(recorded.shape, given.shape, strict=False))


def _from_signature(model: LoadedModel, data: ValidationData | None, given: list[TensorSpec]) -> list[TensorSpec]:
    by_name = {spec.name: spec for spec in data.input_specs()} if data is not None else {}
    suggested = {spec.name: spec for spec in model.suggested_specs or []}
    by_name = {name: _with_dynamic_dims(spec, suggested.get(name)) for name, spec in by_name.items()}
    signature = model.input_names or []
    if data is not None and data.ignores_extra_columns and signature and not model.accepts_any_kwargs:
        by_name = {name: spec for name, spec in by_name.items() if name in signature}  # a table's other columns
    by_name.update({spec.name: spec for spec in given})
    if not by_name and suggested:
        by_name = {name: spec for name, spec in suggested.items()
                   if name in model.required_inputs or name == "attention_mask"}
    if not by_name:
        required = model.required_inputs
        raise MpexportError(
            "cannot tell the model's input shapes" + (f" (forward takes {', '.join(required)})" if required else ""),
            stage=STAGE, hint="pass --val-data PATH or --input NAME:SHAPE:DTYPE, e.g. pixels:batch,3,224,224:float32",
        )
    for name in by_name:
        if signature and name not in signature and not model.accepts_any_kwargs:
            raise MpexportError(
                f"'{name}' is not an input of the model (forward takes {', '.join(signature)})", stage=STAGE
            )
    missing = [name for name in model.required_inputs if name not in by_name]
    if missing:
        raise MpexportError(f"no shape for required input(s) {', '.join(missing)}", stage=STAGE,
                            hint="add them to the validation data or pass --input")
    ordered = [name for name in signature if name in by_name] + [n for n in by_name if n not in signature]
    return [by_name[name] for name in ordered]


def _with_dynamic_dims(spec: TensorSpec, suggested: TensorSpec | None) -> TensorSpec:
    """The data's spec with the dims the model's config calls dynamic (a sequence) named as it names them; the
    data's sizes stay the example sizes. Unchanged when the ranks differ."""
    if suggested is None or len(suggested.shape) != len(spec.shape):
        return spec
    example = spec.example_shape()
    shape = tuple(want if isinstance(want, str) else have for want, have in zip(suggested.shape, spec.shape,
                                                                                strict=True))
    sizes = {dim: example[axis] for axis, dim in enumerate(shape) if isinstance(dim, str)}
    return TensorSpec(spec.name, spec.dtype, shape, sizes)


def _fix_batch(spec: TensorSpec) -> TensorSpec:
    example = spec.example_shape()
    shape = tuple(example[axis] if axis == 0 and isinstance(dim, str) else dim for axis, dim in enumerate(spec.shape))
    return TensorSpec(spec.name, spec.dtype, shape, spec.example_sizes)


def _text(spec: TensorSpec) -> str:
    return "(" + ", ".join(str(dim) for dim in spec.shape) + ")"


def example_inputs(specs: list[TensorSpec], data: ValidationData | None) -> dict[str, torch.Tensor]:
    """Example tensors by name: the first samples of the data (as many as a fixed batch needs, else 2, repeated where
    the data gives fewer: a batch of one would fix a dynamic batch at 1 in the export; inputs without a batch axis
    their first value), or, without data, deterministic tensors of each spec's example shape (normal floats, ones for
    integers)."""
    if data is not None:
        batched = [spec for spec in specs if spec.name not in data.unbatched]
        size = fixed_batch(specs, data.unbatched) or _example_batch(batched)
        batch = next(data.batches(size, limit=size, inputs=specs))
        return {spec.name: torch.from_numpy(batch[spec.name] if spec.name in data.unbatched
                                            else _tile(batch[spec.name], size)) for spec in specs}
    generator = torch.Generator().manual_seed(0)
    examples = {}
    for spec in specs:
        dtype = getattr(torch, spec.dtype)
        shape = spec.example_shape()
        if dtype.is_floating_point:
            examples[spec.name] = torch.randn(shape, generator=generator).to(dtype)
        else:
            examples[spec.name] = torch.ones(shape, dtype=dtype)
    return examples


def _example_batch(specs: list[TensorSpec]) -> int:
    for spec in specs:
        if spec.shape and isinstance(spec.shape[0], int):
            return spec.shape[0]
    return EXAMPLE_BATCH


def _tile(array: np.ndarray, size: int) -> np.ndarray:
    """Repeat samples until there are ``size`` of them (a 1-sample set still gives a batch of 2); a rank-0 array
    (a scalar input's one value) is returned as it is."""
    if not array.ndim:
        return array
    if len(array) >= size:
        return np.ascontiguousarray(array[:size])
    repeats = -(-size // len(array))
    return np.ascontiguousarray(np.concatenate([array] * repeats)[:size])


def recorded_validation_data(bundle: Bundle) -> ValidationData | None:
    """The validation data convert used, opened with its import path and column mapping; None when convert had
    none (a one-line error when it is gone)."""
    source, record = bundle.validation_source(), bundle.manifest.validation
    if source is None or record is None:
        return None
    return load_validation_data(source, import_path=record.import_path, columns=record.columns or None)
