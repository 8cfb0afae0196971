"""A Triton Inference Server model repository from a verified output directory (``mpexport package``,
:mod:`mpexport.commands.package`).

One model per deployable form: ``<name>`` (``onnxruntime_onnx``, the mixed-precision ONNX; a ``model.onnx/``
directory when the model has external data) and ``<name>_trt`` (``tensorrt_plan``, the engine named per GPU
compute capability through ``cc_model_filenames``, when an engine was built). Each ``config.pbtxt`` states
the model's exact input/output names, data types and dims, with dynamic batching when the batch dimension is
dynamic; the precision plan and the parity report are copied beside it for the record.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from mpexport.base.errors import MpexportError
from mpexport.bundle import staging as artifacts
from mpexport.bundle.names import ENGINE, MIXED_ONNX, PLAN, REPORT, REPORT_HTML, REPOSITORY_MARKER
from mpexport.bundle.store import Bundle

STAGE = "package"
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
"""A model's name in the repository: its directory there, so never '.', '..' or hidden."""
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
    """Write a Triton model repository for the bundle ``directory`` into ``out`` (atomically; an existing ``out``
    only with ``force``). The files copied are checked against the manifest first. Refuses, unless
    ``allow_unverified``, a bundle whose last verify did not pass or is stale (an artifact it covered changed
    since), and an engine that verify did not cover."""
    bundle = Bundle.open(directory, uses=(MIXED_ONNX, PLAN, REPORT, REPORT_HTML, ENGINE))
    result = PackageResult(Path(out))
    problem = unverified(bundle)
    if problem and not allow_unverified:
        raise MpexportError(f"'{bundle.directory}' {problem}", stage=STAGE,
                            hint="run mpexport verify first, or pass --allow-unverified")
    if problem:
        result.notes.append(f"packaged although the bundle {problem} (--allow-unverified)")
    changed = source_changed(bundle)
    if changed:
        result.notes.append(f"{changed}: the verdict shipped covers the model convert read then")
    mixed = bundle.path(MIXED_ONNX)
    name = name or _model_name(bundle)
    if not MODEL_NAME.fullmatch(name):
        raise MpexportError(f"model name '{name}' is not valid for Triton", stage=STAGE,
                            hint="use letters, digits, '_', '.', '-', starting with a letter, digit or '_'")
    if artifacts.inside(Path(out), bundle.directory):
        raise MpexportError(f"--out '{out}' is inside the bundle '{bundle.directory}'", stage=STAGE,
                            hint="write the repository elsewhere")
    swept = artifacts.sweep_leftovers(out)
    if swept:
        result.notes.append(f"removed what killed runs left beside --out: {', '.join(swept)}")
    entries = [name, f"{name}_trt"] if bundle.has(ENGINE) else [name]
    with artifacts.staged_output(out, force=force, ownership=repository_ownership,
                                 inputs=[bundle.directory]) as staging:
        marker = {"written_by": "mpexport", "bundle": str(bundle.directory.absolute()), "entries": entries}
        (staging / REPOSITORY_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        model = ir.load(str(mixed))
        target = staging / name
        version = target / "1"
        version.mkdir(parents=True)
        files = sorted(bundle.manifest.artifacts[MIXED_ONNX].sha256)
        folder = version / "model.onnx" if len(files) > 1 else version
        folder.mkdir(exist_ok=True)
        for file in files:
            bundle.copy_file(MIXED_ONNX, file, folder / ("model.onnx" if file == mixed.name else file))
        batch = _batch_size(model, max_batch_size, result)
        (target / "config.pbtxt").write_text(onnx_config(name, model, batch))
        _copy_records(bundle, target)
        result.models[name] = "onnxruntime_onnx"
        if bundle.has(ENGINE):
            _package_engine(bundle, staging / f"{name}_trt", f"{name}_trt", model, batch)
            result.models[f"{name}_trt"] = "tensorrt_plan"
    return result


def unverified(bundle: Bundle) -> str | None:
    """Why the bundle's deployable forms are not verified as they are now (None when they are): never verified,
    verify failed, its verdict is stale, or the engine was not covered by it."""
    record = bundle.manifest.verify
    if record is None:
        return "was never verified"
    stale = bundle.staleness(record)
    if stale:
        return f"has a stale verify verdict: {stale}"
    if record.verdict != "pass":
        return "failed verify"
    if bundle.has(ENGINE) and not bundle.covered(record, ENGINE):
        why = record.forms.get("tensorrt", {}).get("why", "the tensorrt backend did not run")
        return f"has an engine that verify did not check ({why})"
    return None


def _package_engine(bundle: Bundle, target: Path, name: str, model: ir.Model, max_batch_size: int) -> None:
    """A ``tensorrt_plan`` model: the engine under ``1/`` named by compute capability (plans only run on the
    GPU architecture and TensorRT version they were built for), with the same I/O as the ONNX model."""
    engine = bundle.manifest.engine
    capability = engine.compute_capability if engine else None
    if engine is None or not capability:
        raise MpexportError("the engine's compute capability is not recorded; rebuild it with mpexport build",
                            stage=STAGE)
    filename = f"model_sm{capability.replace('.', '')}.plan"
    version = target / "1"
    version.mkdir(parents=True)
    bundle.copy_file(ENGINE, bundle.path(ENGINE).name, version / filename)
    config = onnx_config(name, model, max_batch_size).replace('platform: "onnxruntime_onnx"',
                                                              'platform: "tensorrt_plan"')
    config += f'cc_model_filenames [\n  {{\n    key: "{capability}"\n    value: "{filename}"\n  }}\n]\n'
    config += f'parameters {{\n  key: "tensorrt_version"\n  value: {{ string_value: "{engine.tensorrt}" }}\n}}\n'
    (target / "config.pbtxt").write_text(config)
    _copy_records(bundle, target)


def _model_name(bundle: Bundle) -> str:
    source = bundle.manifest.source
    stem = Path(source.path).stem if source else "model"
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


def _copy_records(bundle: Bundle, target: Path) -> None:
    for key in (PLAN, REPORT, REPORT_HTML):
        if bundle.has(key):
            name = bundle.path(key).name
            bundle.copy_file(key, name, target / name)


def repository_ownership(directory: Path) -> str | None:
    """None when ``directory`` is provably a repository ``package`` wrote (its marker lists every other entry in
    it); else why not."""
    try:
        marker = json.loads((directory / REPOSITORY_MARKER).read_text())
        entries = [str(entry) for entry in marker["entries"]]
    except (OSError, ValueError, KeyError, TypeError):
        return f"it has no {REPOSITORY_MARKER} listing what mpexport wrote"
    return artifacts.owned_entries(directory, [REPOSITORY_MARKER, *entries])


def source_changed(bundle: Bundle) -> str | None:
    """In words, how the source model differs from what convert read (gone, or another SHA-256); None when it is
    the same or the bundle records none."""
    from mpexport.base.files import sha256_file
    from mpexport.sources.hf import directory_digest

    source = bundle.manifest.source
    if source is None:
        return None
    try:
        path = bundle.source_path()
    except MpexportError:
        return f"the source model '{source.path}' is gone"
    digest = directory_digest(path) if path.is_dir() else sha256_file(path)
    return None if digest == source.sha256 else f"the source model '{path}' changed since convert"
