"""Convert's first half: the model loaded and exported (or an FP32 ONNX read), written into the bundle with its
provenance, then one data pass that checks the export against PyTorch and collects the range rule's statistics."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from mpexport.backends.onnxruntime import runtime_output_specs
from mpexport.backends.torch import TorchRunner, best_device, flatten_outputs, output_names
from mpexport.base.callables import is_callable_spec
from mpexport.base.errors import MpexportError, first_line
from mpexport.base.files import sha256_tree, write_json
from mpexport.base.specs import UNKNOWN_DTYPE, Batch, TensorSpec, fixed_batch, real_rows, sample_rows
from mpexport.base.status import StageClock
from mpexport.bundle.names import FILE_NAMES, FP32_ONNX, PROVENANCE
from mpexport.bundle.records import ExportCheckRecord, ExportRecord, ValidationRecord
from mpexport.bundle.store import Bundle, portable_paths
from mpexport.capture import provenance
from mpexport.capture.export import ExportRequest, ExportResult, export_onnx
from mpexport.capture.onnxinput import drop_initializer_inputs, provenance_kind, read_fp32_onnx
from mpexport.check.compare import Comparison, batch_samples
from mpexport.data.base import ValidationData, check_against
from mpexport.data.open import load_validation_data
from mpexport.graph.onnxfile import save_model
from mpexport.graph.specs import graph_specs
from mpexport.precision.evidence import options_source, plan_options_for, record_notes
from mpexport.precision.options import PlanOptions
from mpexport.precision.plan import RangeStats
from mpexport.precision.ranges import ProbedRunner
from mpexport.sources.inputs import example_inputs, resolve_inputs
from mpexport.sources.loading import load_model
from mpexport.sources.model import FORMAT_ONNX, LoadedModel

CALIBRATION_SAMPLES = 256

MIXED_EXTERNAL_DATA_THRESHOLD = 1536 << 20
"""Initializer bytes above which the mixed model's weights go to an external data file (protobuf caps files at
2 GB); below it the deployable is one file."""
FP32_EXTERNAL_DATA_THRESHOLD = 64 << 20
"""Initializer bytes above which the FP32 ONNX keeps its weights in an external data file. It is mpexport's
working copy: ONNX Runtime sessions of its variants (the data pass's probes, localisation) are then made from a
graph of a few MB whose weights are memory-mapped or shared with PyTorch, instead of serializing every weight
into one message (8 s and 3x the weights' memory for BERT-base)."""

ProgressCallback = Callable[[int, int | None], None]
"""Hears (samples done, samples in all or None) during the data pass."""



CHECK_SAMPLES = 256
"""Samples of the data pass. The export check is a check of the exporter (verify covers the whole set); 256
samples cost one ONNX Runtime and one PyTorch pass over them (BERT-base, 64 tokens: ~35 s on 2 CPU cores)."""


CHECK_BATCH = 64


CHECK_OUTPUT_BUDGET = 256 << 20
"""Output bytes per backend that one data-pass batch may produce."""


SHAREABLE_TYPES = tuple(np.dtype(name) for name in ("float32", "float16", "float64", "int64", "int32"))
"""Weight types ONNX Runtime can use in place from numpy."""


@dataclass
class FP32Request:
    """What the FP32 stage is asked to do: the model and how to load it, the data and how much of it to use, the
    export options and the plan options requested."""

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
    custom_translation_table: dict[Any, Any] | None
    task: str | None = None
    columns: dict[str, str] = field(default_factory=dict)


@dataclass
class FP32Stage:
    """What the export stage leaves behind once the PyTorch model is dropped: no tensors, only records."""

    records: list[provenance.NodeProvenance]
    check: Comparison | None
    """None for an ONNX input: there is no PyTorch model to check the ONNX against."""
    ranges: RangeStats | None
    options: PlanOptions
    policy_source: str
    specs: list[TensorSpec]
    data: ValidationData | None
    notes: list[str]


def fp32_stage(bundle: Bundle, request: FP32Request, clock: StageClock,
                on_progress: ProgressCallback | None) -> FP32Stage:
    """Load, export, write the FP32 ONNX with provenance, and run the data pass (export check + calibration).
    ONNX Runtime runs the FP32 model on the PyTorch parameters in place, and everything holding the weights (the
    PyTorch module, the reference runner, the in-memory ONNX) dies with this frame: a large model's FP32 weights
    are in memory once, and not at all in the later stages."""
    with clock.stage("load"):
        loaded = load_model(request.model, factory=request.factory, trust_pickle=request.trust_pickle,
                            task=request.task)
        data = load_validation_data(request.val_data, columns=request.columns or None) \
            if request.val_data is not None else None
    if loaded.format == FORMAT_ONNX:
        return _onnx_stage(bundle, request, clock, loaded, data, on_progress)
    with clock.stage("inputs"):
        specs = resolve_inputs(loaded, data, request.inputs, dynamic_batch=request.dynamic_batch)
        examples = example_inputs(specs, data)
        names, output_bytes = _output_names(loaded, specs, examples)
        options = plan_options_for(request.plan_options, loaded)
        opset = _opset_for(options, request.opset)
    with clock.stage("export"):
        started = time.perf_counter()
        exported = export_onnx(ExportRequest(loaded, specs, examples, names, opset,
                                             request.custom_translation_table))
        export_seconds = time.perf_counter() - started
    with clock.stage("write"):
        records = _write_fp32(bundle, loaded, exported, export_seconds, request, data)
    calibrate = options.range_check and data is not None and request.calibration_samples > 0
    with clock.stage("data pass"):
        check, ranges, device_note = _data_pass(bundle, loaded, specs, data, examples, request, output_bytes,
                                                _shareable_weights(exported.model), calibrate, on_progress)
        bundle.manifest.export_check = ExportCheckRecord(check.passed, check.to_json(), _data_description(data),
                                                         bundle.digests(FP32_ONNX))
    notes = loaded.notes + record_notes(request.plan_options, loaded) + exported.notes + \
        ([device_note] if device_note else []) + ([data.one_sample_runs] if data and data.one_sample_runs else [])
    return FP32Stage(records, check, ranges, options, options_source(request.plan_options, loaded), specs,
                      data, notes)


def _onnx_stage(bundle: Bundle, request: FP32Request, clock: StageClock, loaded: LoadedModel,
                data: ValidationData | None, on_progress: ProgressCallback | None) -> FP32Stage:
    """An FP32 ONNX as the input (:mod:`mpexport.capture.onnxinput`): checked, written into the bundle as its FP32
    working copy with what provenance it carries, and calibrated on the validation data. No export check: there is no
    PyTorch model (verify uses onnx-fp32 as the reference; ``verify --reference`` adds the PyTorch backends)."""
    with clock.stage("inputs"):
        read_notes: list[str] = []
        model = read_fp32_onnx(loaded.path, read_notes)
        weights_as_inputs = drop_initializer_inputs(model)
        if request.inputs:
            raise MpexportError("--input describes a PyTorch model's inputs; an ONNX model declares its own",
                                stage="inputs", hint="drop --input")
        specs = _named_dims(graph_specs(model.graph.inputs))
        if data is not None:
            check_against(data, specs)
        options = plan_options_for(request.plan_options, loaded)
        opset = model.opset_imports.get("", 0)
        if options.low == "bf16" and opset < BF16_MIN_OPSET:
            raise MpexportError(f"a BF16 target needs ONNX opset {BF16_MIN_OPSET} or newer; this model is opset "
                                f"{opset}", stage="export", hint="deploy as --target fp16, or re-export the model")
        notes = read_notes + ([f"--opset {request.opset} ignored: the ONNX model keeps its opset {opset}"]
                              if request.opset not in (None, opset) else [])
        if data is not None and data.one_sample_runs:
            notes.append(data.one_sample_runs)
        if weights_as_inputs:
            notes.append(f"{len(weights_as_inputs)} graph inputs are initializers (weights listed as inputs, as IR "
                         "version 3 requires): they are read as weights, not inputs to feed")
    with clock.stage("write"):
        kind = provenance_kind(model)
        records = provenance.collect_provenance(model, "exporter" if kind == "exporter" else "scope")
        external = initializer_bytes(model) > min(FP32_EXTERNAL_DATA_THRESHOLD, MIXED_EXTERNAL_DATA_THRESHOLD)
        name = FILE_NAMES[FP32_ONNX]
        save_model(model, bundle.directory / name, external_data=f"{name}.data" if external else None)
        write_json(bundle.directory / FILE_NAMES[PROVENANCE], provenance.to_json(records))
        bundle.record_artifact(FP32_ONNX, name, (f"{name}.data",) if external else (), command="convert")
        bundle.record_artifact(PROVENANCE, FILE_NAMES[PROVENANCE], command="convert")
        manifest = bundle.manifest
        manifest.source = loaded.source_record(bundle.directory)
        manifest.validation = _validation_record(request.val_data, data, bundle.directory, request.columns)
        manifest.inputs, manifest.outputs = specs, typed_by_runtime(graph_specs(model.graph.outputs),
                                                                    bundle.path(FP32_ONNX))
        manifest.export = ExportRecord("onnx-input", [], 0.0, opset, external, f"onnx ({kind})")
        manifest.provenance = provenance.summarize(records)
        clock.skip("export check", "the model came as ONNX: there is no PyTorch model to check it against (verify "
                   "uses onnx-fp32 as the reference; verify --reference MODEL adds the PyTorch backends)")
        del model
    ranges = None
    if options.range_check and data is not None and request.calibration_samples > 0:
        with clock.stage("data pass"):
            ranges = _calibrate_onnx(bundle, specs, data, request.calibration_samples, on_progress)
    source = options_source(request.plan_options, loaded)
    if kind != "exporter":
        notes.append("the ONNX model records no aten ops: the plan infers them from op types and recognises the "
                     "policy's patterns (attention, normalisations), and every such reason says so")
    return FP32Stage(records, None, ranges, options, source, specs, data, notes)


def _named_dims(specs: list[TensorSpec]) -> list[TensorSpec]:
    """Unknown dims (``?``) named after their input and axis, so data shapes can be checked against them."""
    return [TensorSpec(spec.name, spec.dtype, tuple(f"{spec.name}_dim{axis}" if dim == "?" else dim
                                                      for axis, dim in enumerate(spec.shape))) for spec in specs]


def _calibrate_onnx(bundle: Bundle, specs: list[TensorSpec], data: ValidationData, samples: int,
                    on_progress: ProgressCallback | None) -> RangeStats:
    """The range rule's statistics of an ONNX input: its FP32 model in ONNX Runtime with the probes attached, on
    the first ``samples`` samples, every one of them (a model with a fixed batch size gets a short last batch padded
    with repeats of its samples: the peaks are the real samples', and the statistics count the real samples once)."""
    runner = ProbedRunner(bundle.path(FP32_ONNX))
    total = min(samples, data.num_samples) if data.num_samples else None
    seen = 0
    for batch in data.batches(data.run_batch(specs) or CHECK_BATCH, limit=samples, inputs=specs):
        runner.run(batch)
        seen += batch_samples(batch)
        if on_progress:
            on_progress(seen, total)
    runner.stats.samples = seen
    return runner.stats


def _data_pass(bundle: Bundle, loaded: LoadedModel, specs: list[TensorSpec], data: ValidationData | None,
               examples: dict[str, torch.Tensor], request: FP32Request, output_bytes: int,
               weights: dict[str, np.ndarray], calibrate: bool,
               on_progress: ProgressCallback | None) -> tuple[Comparison, RangeStats | None, str | None]:
    """One pass over the validation samples: PyTorch FP32 against the FP32 ONNX in ONNX Runtime on the first
    ``check_samples``, the range probes folded on the first ``calibration_samples`` (a batch that straddles either
    limit is split there; a model with a fixed batch size counts whole batches, a short last one padded with repeats
    of its samples: compared and counted as its real samples only)."""
    reference = TorchRunner(loaded.callable(), [spec.name for spec in specs], positional=loaded.positional,
                            device=best_device())
    candidate = ProbedRunner(bundle.path(FP32_ONNX), shared_weights=weights, probe=calibrate)
    comparison = Comparison.of("torch-fp32", "onnx-fp32", candidate.output_names)
    check_limit = request.check_samples if data is not None else None
    calibration_limit = request.calibration_samples if calibrate else 0
    batches, total = _data_batches(specs, data, examples, max(check_limit or 0, calibration_limit), output_bytes)
    limits = [limit for limit in (check_limit, calibration_limit) if limit] if not _whole_batches(data, specs) else []
    done = calibrated = 0
    for whole in batches:
        for batch in _split_at(whole, [limit - done for limit in limits]):
            samples = batch_samples(batch)
            candidate.calibrating = calibrate and done < calibration_limit
            compare = check_limit is None or done < check_limit
            if compare or candidate.calibrating:
                actual = real_rows(candidate.run(batch), batch)
                if compare:
                    comparison.fold(real_rows(reference.run(batch), batch), actual, samples=samples)
            calibrated += samples if candidate.calibrating else 0
            done += samples
        if on_progress:
            on_progress(done, total)
    comparison.reference = f"torch-fp32 ({reference.device})"
    candidate.stats.samples = calibrated  # the real samples (a padded batch's repeats are not samples)
    return comparison, candidate.stats if calibrate else None, reference.note


def _whole_batches(data: ValidationData | None, specs: list[TensorSpec]) -> bool:
    """Whether the data pass's batches run only whole (see :meth:`ValidationData.whole_batches`; the examples
    without data: when the model fixes its batch)."""
    return data.whole_batches(specs) if data is not None else fixed_batch(specs) is not None


def _split_at(batch: Batch, cuts: list[int]) -> list[Batch]:
    """``batch`` cut into pieces at the sample positions in ``cuts`` that fall inside it (itself when none does)."""
    size = batch_samples(batch)
    points = sorted({cut for cut in cuts if 0 < cut < size})
    if not points:
        return [batch]
    bounds = [0, *points, size]
    return [sample_rows(batch, start, stop) for start, stop in itertools.pairwise(bounds)]


def _data_batches(specs: list[TensorSpec], data: ValidationData | None, examples: dict[str, torch.Tensor],
                  limit: int, output_bytes: int) -> tuple[Any, int | None]:
    """The data pass's batches (the model's fixed batch size, a short last batch padded, else :func:`_batch_size`)
    and how many samples they hold in all (None when the data does not say)."""
    if data is None:
        batch = {name: tensor.numpy() for name, tensor in examples.items()}
        return [batch], batch_samples(batch)
    total = min(limit, data.num_samples) if data.num_samples else None
    return data.batches(data.run_batch(specs) or _batch_size(output_bytes), limit=limit, inputs=specs), total


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


def _write_fp32(bundle: Bundle, loaded: LoadedModel, exported: ExportResult, seconds: float,
                request: FP32Request, data: ValidationData | None) -> list[provenance.NodeProvenance]:
    """Save the FP32 ONNX and its provenance into the bundle and fill the manifest's source, validation, I/O
    and export records."""
    staging = bundle.directory
    model = exported.model
    external = initializer_bytes(model) > min(FP32_EXTERNAL_DATA_THRESHOLD, MIXED_EXTERNAL_DATA_THRESHOLD)
    name = FILE_NAMES[FP32_ONNX]
    data_file = f"{name}.data"
    save_model(model, staging / name, external_data=data_file if external else None)
    records = provenance.collect_provenance(model, exported.provenance_kind, exported.facts)
    write_json(staging / FILE_NAMES[PROVENANCE], provenance.to_json(records))
    bundle.record_artifact(FP32_ONNX, name, (data_file,) if external else (), command="convert")
    bundle.record_artifact(PROVENANCE, FILE_NAMES[PROVENANCE], command="convert")
    manifest = bundle.manifest
    manifest.source = loaded.source_record(staging)
    manifest.validation = _validation_record(request.val_data, data, staging, request.columns)
    manifest.inputs = graph_specs(model.graph.inputs)
    manifest.outputs = graph_specs(model.graph.outputs)
    manifest.export = ExportRecord(exported.strategy, [attempt.to_json() for attempt in exported.attempts],
                                   round(seconds, 2), model.opset_imports.get("", None), external,
                                   exported.provenance_kind, exported.renamed_nodes)
    manifest.provenance = provenance.summarize(records)
    return records


def _validation_record(val_data: str | Path | None, data: ValidationData | None, bundle_directory: Path,
                       columns: dict[str, str]) -> ValidationRecord | None:
    """Where the validation data is (and how its columns map), recorded so that ``verify`` finds it from any
    working directory."""
    if val_data is None or data is None:
        return None
    if not Path(val_data).exists() and is_callable_spec(str(val_data)):
        return ValidationRecord(str(val_data), "callable", import_path=getattr(data, "import_path", None))
    absolute, relative = portable_paths(Path(val_data), bundle_directory)
    return ValidationRecord(absolute, "files", relative, samples=data.num_samples or None, columns=dict(columns),
                            sha256=sha256_tree(Path(val_data)))


def _data_description(data: ValidationData | None) -> str:
    return data.describe() if data is not None else "example inputs (no --val-data)"


def _shareable_weights(model: ir.Model) -> dict[str, np.ndarray]:
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


def initializer_bytes(model: ir.Model) -> int:
    """Bytes of the main graph's initializers (the size that decides external data)."""
    return sum(value.const_value.nbytes for value in model.graph.initializers.values()
               if value.const_value is not None)


def typed_by_runtime(specs: list[TensorSpec], path: Path) -> list[TensorSpec]:
    """``specs`` of the model at ``path`` with every untyped one (:data:`UNKNOWN_DTYPE`: a graph output the file
    declares without a type, which ONNX Runtime still runs) given the type and shape ONNX Runtime infers for it; one it
    cannot type either stays unknown (verify compares outputs by name, whatever their type)."""
    if all(spec.dtype != UNKNOWN_DTYPE for spec in specs):
        return specs
    runtime = runtime_output_specs(path)
    return [runtime.get(spec.name, spec) if spec.dtype == UNKNOWN_DTYPE else spec for spec in specs]


def _batch_size(output_bytes: int) -> int:
    """Up to CHECK_BATCH samples whose outputs take about CHECK_OUTPUT_BUDGET (a language model's logits are
    ~25 MB per sample at 128 tokens: 10 samples a batch, not 64)."""
    return max(1, min(CHECK_BATCH, CHECK_OUTPUT_BUDGET // max(1, output_bytes)))


def check_failure_note(check: Comparison) -> str:
    """One line on a failed export check: the worst output and by how much it missed."""
    worst = check.worst()
    if worst.name in check.mismatches:
        return f"export check FAILED: output '{worst.name}' {check.mismatches[worst.name]}"
    return (f"export check FAILED: output '{worst.name}' differs by {worst.max_abs:.3g} "
            f"({check.relative_error(worst):.2e} of its scale {worst.scale:.3g}; tolerance {check.rtol:g}), "
            f"{worst.nonfinite} non-finite values")


BF16_MIN_OPSET = 22
"""ONNX admits bfloat16 for Conv, MatMul, Gemm and the norms from opset 22 on."""


def _opset_for(options: PlanOptions, opset: int | None) -> int | None:
    if options.low != "bf16" or (opset is not None and opset >= BF16_MIN_OPSET):
        return opset
    if opset is not None:
        raise MpexportError(f"a BF16 target needs ONNX opset {BF16_MIN_OPSET} or newer, not {opset}",
                            stage="export", hint=f"drop --opset or pass --opset {BF16_MIN_OPSET}")
    return BF16_MIN_OPSET
