"""``package``: a Triton Inference Server model repository from a verified output directory.

One model per deployable form: ``<name>`` (``onnxruntime_onnx``, the mixed-precision ONNX; a ``model.onnx/``
directory when the model has external data) and ``<name>_trt`` (``tensorrt_plan``, the engine named per GPU
compute capability through ``cc_model_filenames``, when an engine was built). Each ``config.pbtxt`` states
the model's exact input/output names, data types and dims, with dynamic batching when the batch dimension is
dynamic; the precision plan and the parity report are copied beside it for the record.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from mpexport import artifacts
from mpexport.errors import MpexportError

STAGE = "package"
TRITON_TYPES = {
    ir.DataType.FLOAT: "TYPE_FP32", ir.DataType.FLOAT16: "TYPE_FP16", ir.DataType.BFLOAT16: "TYPE_BF16",
    ir.DataType.DOUBLE: "TYPE_FP64", ir.DataType.INT64: "TYPE_INT64", ir.DataType.INT32: "TYPE_INT32",
    ir.DataType.INT16: "TYPE_INT16", ir.DataType.INT8: "TYPE_INT8", ir.DataType.UINT8: "TYPE_UINT8",
    ir.DataType.BOOL: "TYPE_BOOL",
}
DEFAULT_MAX_BATCH = 64


@dataclass
class PackageResult:
    """The repository written and the models in it (name -> platform)."""

    out: Path
    models: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def package_triton(directory: str | Path, out: str | Path, *, name: str | None = None,
                   max_batch_size: int | None = None, allow_unverified: bool = False,
                   force: bool = False) -> PackageResult:
    """Write a Triton model repository for ``directory`` into ``out`` (atomically; an existing ``out`` only
    with ``force``). Refuses a directory whose last ``verify`` did not pass unless ``allow_unverified``."""
    directory = Path(directory)
    manifest = artifacts.read_manifest(directory)
    verdict = manifest.get("verify", {}).get("verdict")
    if verdict != "pass" and not allow_unverified:
        state = "was never verified" if verdict is None else "failed verify"
        raise MpexportError(f"'{directory}' {state}", stage=STAGE,
                            hint="run mpexport verify first, or pass --allow-unverified")
    mixed = manifest["artifacts"].get("mixed_onnx")
    if not mixed:
        raise MpexportError(f"'{directory}' has no mixed-precision model to package", stage=STAGE)
    name = name or _model_name(manifest)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise MpexportError(f"model name '{name}' is not valid for Triton", stage=STAGE,
                            hint="use letters, digits, '_', '.', '-'")
    result = PackageResult(Path(out))
    with artifacts.staged_output(out, force=force) as staging:
        model = ir.load(str(directory / mixed))
        target = staging / name
        version = target / "1"
        version.mkdir(parents=True)
        external = sorted(p.name for p in directory.glob(f"{mixed}.data*"))
        if external:
            folder = version / "model.onnx"
            folder.mkdir()
            shutil.copy2(directory / mixed, folder / "model.onnx")
            for data in external:
                shutil.copy2(directory / data, folder / data)
        else:
            shutil.copy2(directory / mixed, version / "model.onnx")
        batch = _batch_size(model, max_batch_size, result)
        (target / "config.pbtxt").write_text(onnx_config(name, model, batch))
        _copy_records(directory, manifest, target)
        result.models[name] = "onnxruntime_onnx"
        if manifest["artifacts"].get("engine"):
            _package_engine(directory, manifest, staging / f"{name}_trt", f"{name}_trt", model, batch)
            result.models[f"{name}_trt"] = "tensorrt_plan"
    return result


def _package_engine(directory: Path, manifest: dict[str, Any], target: Path, name: str, model: ir.Model,
                    max_batch_size: int) -> None:
    """A ``tensorrt_plan`` model: the engine under ``1/`` named by compute capability (plans only run on the
    GPU architecture and TensorRT version they were built for), with the same I/O as the ONNX model."""
    engine = manifest["engine"]
    capability = engine.get("compute_capability")
    if not capability:
        raise MpexportError("the engine's compute capability is not recorded; rebuild it with mpexport build",
                            stage=STAGE)
    filename = f"model_sm{capability.replace('.', '')}.plan"
    version = target / "1"
    version.mkdir(parents=True)
    shutil.copy2(directory / manifest["artifacts"]["engine"], version / filename)
    config = onnx_config(name, model, max_batch_size).replace('platform: "onnxruntime_onnx"',
                                                              'platform: "tensorrt_plan"')
    config += f'cc_model_filenames [\n  {{\n    key: "{capability}"\n    value: "{filename}"\n  }}\n]\n'
    trt_version = engine.get("tensorrt", "")
    config += f'parameters {{\n  key: "tensorrt_version"\n  value: {{ string_value: "{trt_version}" }}\n}}\n'
    (target / "config.pbtxt").write_text(config)
    _copy_records(directory, manifest, target)


def _model_name(manifest: dict[str, Any]) -> str:
    stem = Path(manifest["source"]["path"]).stem
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem) or "model"


def _batch_size(model: ir.Model, requested: int | None, result: PackageResult) -> int:
    """max_batch_size for the config: 0 (no batching) unless every input and output has a dynamic axis 0."""
    values = [*model.graph.inputs, *model.graph.outputs]
    dynamic = all(value.shape is not None and len(value.shape) > 0 and not isinstance(value.shape[0], int)
                  for value in values)
    if not dynamic:
        if requested:
            result.notes.append("the model's batch dimension is fixed: max_batch_size set to 0")
        return 0
    return requested or DEFAULT_MAX_BATCH


def onnx_config(name: str, model: ir.Model, max_batch_size: int) -> str:
    """The ``config.pbtxt`` text for an ``onnxruntime_onnx`` model (dims without the batch axis when batching)."""
    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch_size}"]
    for kind, values in (("input", model.graph.inputs), ("output", model.graph.outputs)):
        entries = [_tensor_entry(value, max_batch_size > 0) for value in values]
        lines.append(f"{kind} [\n" + ",\n".join(entries) + "\n]")
    if max_batch_size > 0:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def _tensor_entry(value: ir.Value, batched: bool) -> str:
    if value.dtype not in TRITON_TYPES:
        raise MpexportError(f"tensor '{value.name}' has type {value.dtype}, which Triton configs cannot state",
                            stage=STAGE)
    shape = list(value.shape) if value.shape is not None else []
    dims = [dim if isinstance(dim, int) else -1 for dim in (shape[1:] if batched else shape)]
    return (f'  {{\n    name: "{value.name}"\n    data_type: {TRITON_TYPES[value.dtype]}\n'
            f"    dims: [ {', '.join(str(d) for d in dims) or ''} ]\n  }}")


def _copy_records(directory: Path, manifest: dict[str, Any], target: Path) -> None:
    for key in ("plan", "report", "report_html"):
        name = manifest["artifacts"].get(key)
        if name and (directory / name).exists():
            shutil.copy2(directory / name, target / name)
