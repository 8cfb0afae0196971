"""``convert``: model file -> output directory with the FP32 ONNX and its provenance, the precision plan, the
mixed-precision ONNX, an engine where TensorRT exists, and ``manifest.json``.

Stages: load -> inputs -> export -> write (FP32 ONNX + provenance) -> export check (ONNX Runtime vs PyTorch FP32
on the validation data) -> calibration (the range rule's statistics) -> plan -> rewrite (+ lint) -> engine. The
PyTorch model is dropped after calibration; plan and rewrite read the FP32 ONNX file back, weights memory-mapped
one at a time, so a large model's weights are in memory once at most.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from mpexport import artifacts, provenance
from mpexport.engine import DEFAULT_WORKSPACE, ENGINE, TensorRTStatus, build_engine, derive_profiles, tensorrt_status
from mpexport.errors import MpexportError, first_line
from mpexport.export import ExportRequest, ExportResult, export_onnx
from mpexport.inputs import example_inputs, resolve_inputs
from mpexport.lint import lint_model
from mpexport.loading import LoadedModel, load_model
from mpexport.onnxfile import save_model
from mpexport.parity import Comparison, compare_runners
from mpexport.plan import DEFAULT_POLICY, PlanOptions, PrecisionPlan, RangeStats, make_plan
from mpexport.ranges import collect_ranges
from mpexport.rewrite import apply_plan
from mpexport.runners import OrtRunner, TorchRunner, flatten_outputs, output_names
from mpexport.specs import TensorSpec, normalize_dtype
from mpexport.valdata import ValidationData, load_validation_data

FP32_ONNX = "model.fp32.onnx"
PROVENANCE = "provenance.json"
PLAN = "plan.json"
MIXED_ONNX = "model.mixed.onnx"
BF16_MIN_OPSET = 22
"""ONNX admits bfloat16 for Conv, MatMul, Gemm and the norms from opset 22 on."""
CALIBRATION_SAMPLES = 256
EXTERNAL_DATA_THRESHOLD = 1536 << 20
"""Initializer bytes above which the ONNX weights go to an external data file (protobuf caps files at 2 GB)."""
CHECK_SAMPLES = 1024
CHECK_BATCH = 64
CHECK_OUTPUT_BUDGET = 256 << 20
"""Output bytes per backend that one export-check or calibration batch may produce."""
SHAREABLE_TYPES = tuple(np.dtype(name) for name in ("float32", "float16", "float64", "int64", "int32"))
"""Weight types ONNX Runtime can use in place from numpy."""

StageCallback = Callable[[str], None]


@dataclass
class ConvertResult:
    """What ``convert`` wrote: the output directory, its manifest, and notes for the user."""

    out: Path
    manifest: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def export_check_passed(self) -> bool:
        """True when ONNX Runtime reproduced the PyTorch FP32 outputs within tolerance."""
        return bool(self.manifest.get("export_check", {}).get("passed"))

    @property
    def lint_passed(self) -> bool:
        """True when the mixed-precision model passed every lint check."""
        return bool(self.manifest.get("lint", {}).get("ok"))


def convert(
    model: str | Path,
    *,
    out: str | Path,
    val_data: str | Path | None = None,
    inputs: Sequence[TensorSpec] = (),
    factory: str | None = None,
    trust_pickle: bool = False,
    force: bool = False,
    dynamic_batch: bool = True,
    opset: int | None = None,
    check_samples: int = CHECK_SAMPLES,
    plan_options: PlanOptions | None = None,
    calibration_samples: int = CALIBRATION_SAMPLES,
    io_types: str = "fp32",
    engine: str = "auto",
    engine_options: EngineOptions | None = None,
    on_stage: StageCallback | None = None,
) -> ConvertResult:
    """Convert a trained model file into ``out``: FP32 ONNX with provenance, checked against PyTorch, and the
    precision plan (``plan.json``) for the training autocast policy.

    ``plan_options.policy`` defaults to what the model file records about its training (a ``.pt2`` written
    by mpexport's examples), else ``cuda-fp16``. The range rule runs on up to ``calibration_samples`` samples
    of ``val_data`` when given. Raises :class:`MpexportError` (nothing written, an existing ``out`` untouched)
    for bad input or an impossible export. The plan is applied to write ``model.mixed.onnx`` (graph inputs and
    outputs FP32 unless ``io_types="native"``), which is linted. ``engine``: ``auto`` builds a TensorRT engine
    where TensorRT and a GPU exist and records why not elsewhere, ``on`` requires one (exit 2 up front when it
    cannot), ``off`` skips it. A failed export check or lint does not raise: the result records it.
    """
    stage = on_stage or (lambda _name: None)
    artifacts.check_output_dir(out, force=force)
    engine_status = _engine_status(engine)
    request = _FP32Request(model, val_data, list(inputs), factory, trust_pickle, dynamic_batch, opset, check_samples,
                           plan_options, calibration_samples)
    with artifacts.staged_output(out, force=force) as staging:
        fp32 = _fp32_stage(staging, request, stage)
        gc.collect()  # the PyTorch model and the in-memory export are gone from here on
        manifest, options, specs, data = fp32.manifest, fp32.options, fp32.specs, fp32.data
        stage("plan")
        model_ir = ir.load(str(staging / FP32_ONNX))  # external weights stay memory-mapped, read one at a time
        plan = make_plan(model_ir, fp32.records, options, fp32.ranges)
        artifacts.write_json(staging / PLAN, plan.to_json())
        artifacts.add_artifact(manifest, staging, "plan", PLAN)
        manifest["plan"] = {"policy": plan.policy.name, "target": plan.options.low,
                            "policy_source": fp32.policy_source, "notes": plan.notes,
                            "summary": {key: value for key, value in plan.summary().items()
                                        if key in ("precision", "rules", "macs")}}
        stage("rewrite")
        _write_mixed(staging, model_ir, plan, io_types, manifest)
        del model_ir
        stage("engine")
        _engine(staging, manifest, plan, engine_status, specs, data, engine_options or EngineOptions())
        artifacts.write_manifest(staging, manifest)
    notes = fp32.notes + plan.notes
    if not fp32.check.passed:
        notes.append(_check_failure_note(fp32.check))
    for failed in (c for c in manifest["lint"]["checks"] if c["status"] == "fail"):
        notes.append(f"lint FAILED: {failed['name']}: {failed['detail']} {'; '.join(failed['findings'][:3])}")
    return ConvertResult(Path(out), manifest, notes)


@dataclass
class _FP32Request:
    model: str | Path
    val_data: str | Path | None
    inputs: list[TensorSpec]
    factory: str | None
    trust_pickle: bool
    dynamic_batch: bool
    opset: int | None
    check_samples: int
    plan_options: PlanOptions | None
    calibration_samples: int


@dataclass
class _FP32Stage:
    """What the export stage leaves behind once the PyTorch model is dropped: no tensors, only records."""

    manifest: dict[str, Any]
    records: list[provenance.NodeProvenance]
    check: Comparison
    ranges: RangeStats | None
    options: PlanOptions
    policy_source: str
    specs: list[TensorSpec]
    data: ValidationData | None
    notes: list[str]


def _fp32_stage(staging: Path, request: _FP32Request, stage: StageCallback) -> _FP32Stage:
    """Load, export, write the FP32 ONNX with provenance, check it against PyTorch and collect the range rule's
    calibration statistics. ONNX Runtime runs the FP32 model on the PyTorch parameters in place, and everything
    holding the weights (the PyTorch module, the reference runner, the in-memory ONNX) dies with this frame:
    a large model's FP32 weights are in memory once, and not at all in the later stages."""
    stage("load")
    loaded = load_model(request.model, factory=request.factory, trust_pickle=request.trust_pickle)
    data = load_validation_data(request.val_data) if request.val_data is not None else None
    stage("inputs")
    specs = resolve_inputs(loaded, data, request.inputs, dynamic_batch=request.dynamic_batch)
    examples = example_inputs(specs, data)
    reference = _reference_runner(loaded, specs)
    names, output_bytes = _output_names(loaded, specs, examples)
    options = _plan_options(request.plan_options, loaded)
    opset = _opset_for(options, request.opset)
    stage("export")
    started = time.perf_counter()
    exported = export_onnx(ExportRequest(loaded, specs, examples, names, opset))
    export_seconds = time.perf_counter() - started
    stage("write")
    manifest, records = _write_fp32(staging, loaded, exported, export_seconds)
    stage("export check")
    batches = _check_batches(specs, data, examples, request.check_samples, output_bytes)
    weights = shareable_weights(exported.model)
    candidate = OrtRunner(staging / FP32_ONNX, shared_weights=weights)
    check = compare_runners(reference, candidate, batches, [spec["name"] for spec in manifest["outputs"]])
    manifest["export_check"] = _check_json(check, data)
    del candidate
    ranges = None
    if options.range_check and data is not None and request.calibration_samples > 0:
        stage("calibration")
        ranges = _calibrate(staging, specs, data, request.calibration_samples, output_bytes, weights)
    return _FP32Stage(manifest, records, check, ranges, options, options_source(request.plan_options, loaded), specs,
                      data, loaded.notes + exported.notes)


@dataclass
class EngineOptions:
    """TensorRT build settings: explicit profiles (``--shapes``), TF32, workspace bytes."""

    shapes: dict[str, Any] = field(default_factory=dict)
    allow_tf32: bool = False
    workspace: int = DEFAULT_WORKSPACE


def _engine_status(engine: str) -> TensorRTStatus | None:
    if engine not in ("auto", "on", "off"):
        raise MpexportError(f"--engine must be auto, on or off, not '{engine}'", stage="engine")
    if engine == "off":
        return None
    status = tensorrt_status()
    if engine == "on" and not status.available:
        raise MpexportError(f"--engine on, but no engine can be built here: {status.why}", stage="engine",
                            hint="use --engine auto to skip it, or run on a machine with TensorRT and a GPU")
    return status


def _engine(staging: Path, manifest: dict[str, Any], plan: PrecisionPlan, status: TensorRTStatus | None,
            specs: list[TensorSpec], data: ValidationData | None, options: EngineOptions) -> None:
    """Build the engine where possible (``status`` None: --engine off); otherwise record why it was skipped."""
    if status is None:
        manifest["skipped"]["engine"] = "disabled (--engine off)"
        return
    if not status.available:
        manifest["skipped"]["engine"] = status.why
        return
    observed = [{name: tuple(array.shape) for name, array in batch.items()}
                for batch in (data.batches(CHECK_BATCH, limit=CHECK_SAMPLES, inputs=specs) if data else [])]
    profiles = derive_profiles(manifest["inputs"], observed, options.shapes)
    result = build_engine(staging / MIXED_ONNX, staging, profiles, {n.name: n.precision for n in plan.nodes},
                          workspace=options.workspace, allow_tf32=options.allow_tf32,
                          module_of={n.name: n.module or "" for n in plan.nodes})
    artifacts.add_artifact(manifest, staging, "engine", ENGINE)
    manifest["engine"] = result.metadata


def _opset_for(options: PlanOptions, opset: int | None) -> int | None:
    if options.low != "bf16" or (opset is not None and opset >= BF16_MIN_OPSET):
        return opset
    if opset is not None:
        raise MpexportError(f"a BF16 target needs ONNX opset {BF16_MIN_OPSET} or newer, not {opset}",
                            stage="export", hint=f"drop --opset or pass --opset {BF16_MIN_OPSET}")
    return BF16_MIN_OPSET


def _write_mixed(staging: Path, model: ir.Model, plan: PrecisionPlan, io_types: str,
                 manifest: dict[str, Any]) -> None:
    """Apply the plan to the FP32 model as read back from its file, save, lint, and record both. Converted weights
    are computed while saving, one at a time, and a model whose FP32 form has external data keeps it."""
    precisions = {node.name: node.precision for node in plan.nodes}
    report = apply_plan(model, precisions, io_types=io_types)
    external = (staging / f"{FP32_ONNX}.data").exists() or _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_file = f"{MIXED_ONNX}.data"
    save_model(model, staging / MIXED_ONNX, external_data=data_file if external else None)
    artifacts.add_artifact(manifest, staging, "mixed_onnx", MIXED_ONNX, (data_file,) if external else ())
    manifest["rewrite"] = report.to_json()
    manifest["lint"] = lint_model(staging / MIXED_ONNX, precisions).to_json()
    manifest["lint"]["model"] = MIXED_ONNX


def training_policy(loaded: LoadedModel) -> str | None:
    """The autocast policy name a model file records for its training (``cpu-bf16``...), if any."""
    autocast = loaded.training.get("autocast") if loaded.training else None
    if not isinstance(autocast, dict):
        return None
    low = {"float16": "fp16", "bfloat16": "bf16"}.get(str(autocast.get("dtype")))
    device = autocast.get("device_type")
    return f"{device}-{low}" if device in ("cpu", "cuda") and low else None


def options_source(options: PlanOptions | None, loaded: LoadedModel) -> str:
    """Where the policy came from: the caller, the model file's training record, or the default."""
    if options is not None and options.policy:
        return "given"
    return "training record in the model file" if training_policy(loaded) else "default"


def _plan_options(options: PlanOptions | None, loaded: LoadedModel) -> PlanOptions:
    options = replace(options) if options is not None else PlanOptions()
    if not options.policy:
        options.policy = training_policy(loaded) or DEFAULT_POLICY
    if options.torch_version is None and loaded.training.get("torch"):
        options.torch_version = str(loaded.training["torch"])
    return options


def _calibrate(staging: Path, specs: list[TensorSpec], data: ValidationData, samples: int, output_bytes: int,
               weights: dict[str, np.ndarray]) -> RangeStats:
    fixed = next((spec.shape[0] for spec in specs if spec.shape and isinstance(spec.shape[0], int)), None)
    batches = data.batches(fixed or _batch_size(output_bytes), limit=samples, inputs=specs, exact=fixed is not None)
    return collect_ranges(staging / FP32_ONNX, batches, shared_weights=weights)


def _reference_runner(loaded: LoadedModel, specs: list[TensorSpec]) -> TorchRunner:
    return TorchRunner(loaded.callable(), [spec.name for spec in specs], positional=loaded.positional)


def _output_names(loaded: LoadedModel, specs: list[TensorSpec],
                  examples: dict[str, torch.Tensor]) -> tuple[list[str], int]:
    """Run the model once on the examples (it must work in FP32 before anything else); name its outputs and
    measure their bytes per sample."""
    model = loaded.callable()
    try:
        with torch.no_grad():
            result = model(*examples.values()) if loaded.positional else model(**examples)
    except Exception as exc:  # noqa: BLE001 - the user's model may fail in any way
        shapes = ", ".join(f"{name}{tuple(t.shape)}:{str(t.dtype).removeprefix('torch.')}"
                           for name, t in examples.items())
        raise MpexportError(f"the model fails on example inputs {shapes}: {first_line(exc)}", stage="inputs",
                            hint="check --input shapes and dtypes against what the model expects") from None
    tensors = flatten_outputs(result)
    if not tensors:
        raise MpexportError("the model returns no tensors", stage="inputs")
    first = next(iter(examples.values()), None)
    samples = len(first) if first is not None and first.ndim else 1
    return output_names(result), sum(tensor.nbytes for tensor in tensors) // max(1, samples)


def _write_fp32(staging: Path, loaded: LoadedModel, exported: ExportResult,
                seconds: float) -> tuple[dict[str, Any], list[provenance.NodeProvenance]]:
    model = exported.model
    external = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_file = f"{FP32_ONNX}.data"
    save_model(model, staging / FP32_ONNX, external_data=data_file if external else None)
    records = provenance.collect_provenance(model, exported.provenance_kind, exported.facts)
    artifacts.write_json(staging / PROVENANCE, provenance.to_json(records))
    manifest = artifacts.new_manifest()
    artifacts.add_artifact(manifest, staging, "fp32_onnx", FP32_ONNX, (data_file,) if external else ())
    artifacts.add_artifact(manifest, staging, "provenance", PROVENANCE)
    manifest["source"] = loaded.source_json()
    manifest["inputs"] = [spec.to_json() for spec in graph_specs(model.graph.inputs)]
    manifest["outputs"] = [spec.to_json() for spec in graph_specs(model.graph.outputs)]
    manifest["export"] = {
        "strategy": exported.strategy,
        "attempts": [attempt.to_json() for attempt in exported.attempts],
        "seconds": round(seconds, 2),
        "opset": model.opset_imports.get("", None),
        "external_data": external,
        "provenance": exported.provenance_kind,
    }
    manifest["provenance"] = provenance.summarize(records)
    return manifest, records


def shareable_weights(model: ir.Model) -> dict[str, np.ndarray]:
    """The in-memory model's initializers as arrays that view their data (the PyTorch parameters, for an export),
    for ONNX Runtime to use in place: checking a large export then holds its weights once, not twice."""
    shared = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or isinstance(tensor, ir.ExternalTensor) or value.dtype is None or tensor.nbytes < 1 << 20:
            continue
        array = tensor.numpy()
        if array.flags.c_contiguous and array.dtype in SHAREABLE_TYPES and array.dtype == value.dtype.numpy() \
                and array.shape == tuple(tensor.shape):
            shared[name] = array
    return shared


def _initializer_bytes(model: ir.Model) -> int:
    return sum(value.const_value.nbytes for value in model.graph.initializers.values()
               if value.const_value is not None)


def graph_specs(values: Sequence[ir.Value]) -> list[TensorSpec]:
    """Specs of ONNX graph inputs or outputs: names, dtypes and dims (symbolic dims by name, unknown ``?``)."""
    specs = []
    for value in values:
        dtype = normalize_dtype(value.dtype.numpy().name) if value.dtype is not None else "float32"
        shape = tuple(dim if isinstance(dim, int) else (str(dim) if dim is not None else "?")
                      for dim in (value.shape or ()))
        specs.append(TensorSpec(value.name or "", dtype, shape))
    return specs


def _check_batches(specs: list[TensorSpec], data: ValidationData | None, examples: dict[str, torch.Tensor],
                   limit: int, output_bytes: int):
    """Export-check batches: the model's fixed batch, else :func:`_batch_size`."""
    if data is None:
        return [{name: tensor.numpy() for name, tensor in examples.items()}]
    fixed = next((spec.shape[0] for spec in specs if spec.shape and isinstance(spec.shape[0], int)), None)
    return data.batches(fixed or _batch_size(output_bytes), limit=limit, inputs=specs, exact=fixed is not None)


def _batch_size(output_bytes: int) -> int:
    """Up to CHECK_BATCH samples whose outputs take about CHECK_OUTPUT_BUDGET (a language model's logits are
    ~25 MB per sample at 128 tokens: 10 samples a batch, not 64)."""
    return max(1, min(CHECK_BATCH, CHECK_OUTPUT_BUDGET // max(1, output_bytes)))


def _check_json(check: Comparison, data: ValidationData | None) -> dict[str, Any]:
    result = check.to_json()
    result["data"] = data.describe() if data is not None else "example inputs (no --val-data)"
    return result


def _check_failure_note(check: Comparison) -> str:
    worst = check.worst()
    if worst.name in check.mismatches:
        return f"export check FAILED: output '{worst.name}' shape {check.mismatches[worst.name]}"
    return (f"export check FAILED: output '{worst.name}' differs by {worst.max_abs:.3g} "
            f"({check.relative_error(worst):.2e} of its scale {worst.scale:.3g}; tolerance {check.rtol:g}), "
            f"{worst.nonfinite} non-finite values")
