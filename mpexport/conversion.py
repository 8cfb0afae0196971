"""``convert``: model file -> a new bundle (output directory) with the FP32 ONNX and its provenance, the
precision plan, the mixed-precision ONNX, an engine where TensorRT exists, and the manifest.

Stages: load -> inputs -> export -> write (FP32 ONNX + provenance) -> data pass -> plan -> rewrite -> lint ->
engine. The data pass runs the validation samples once: PyTorch FP32 (on the GPU where one exists) against the
FP32 ONNX in ONNX Runtime with the range rule's probes attached, so one ONNX Runtime pass serves both the export
check and the calibration statistics. The PyTorch model is dropped after it; plan and rewrite read the FP32 ONNX
file back, weights memory-mapped one at a time, so a large model's weights are in memory once at most. Every
stage's seconds and peak memory land in the manifest (``timings.convert``).
"""

from __future__ import annotations

import gc
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from mpexport import artifacts, provenance
from mpexport.bundle import (
    FILE_NAMES,
    FP32_ONNX,
    MIXED_ONNX,
    PLAN,
    PROVENANCE,
    RANGES,
    Bundle,
    EngineRecord,
    ExportCheckRecord,
    ExportRecord,
    LintRecord,
    Manifest,
    PlanRecord,
    ValidationRecord,
    portable_paths,
)
from mpexport.dtypes import CANONICAL_NAMES, LOW_PRECISIONS
from mpexport.engine import (
    DEFAULT_WORKSPACE,
    ENGINE,
    PROFILE_BATCH,
    PROFILE_SAMPLES,
    TensorRTStatus,
    build_engine,
    derive_profiles,
    tensorrt_status,
)
from mpexport.errors import MpexportError, first_line
from mpexport.export import ExportRequest, ExportResult, export_onnx
from mpexport.inputs import example_inputs, resolve_inputs
from mpexport.lint import lint_model
from mpexport.loading import FORMAT_ONNX, LoadedModel, load_model
from mpexport.onnxfile import save_model
from mpexport.onnxinput import provenance_kind, read_fp32_onnx
from mpexport.parity import Comparison, batch_samples
from mpexport.plan import DEFAULT_POLICY, PlanOptions, PrecisionPlan, RangeStats, make_plan
from mpexport.ranges import ProbedRunner
from mpexport.rewrite import apply_plan
from mpexport.runners import Batch, TorchRunner, best_device, flatten_outputs, output_names
from mpexport.specs import TensorSpec, normalize_dtype
from mpexport.timing import StageClock
from mpexport.valdata import ValidationData, check_against, is_callable_spec, load_validation_data

BF16_MIN_OPSET = 22
"""ONNX admits bfloat16 for Conv, MatMul, Gemm and the norms from opset 22 on."""
CALIBRATION_SAMPLES = 256
CHECK_SAMPLES = 256
"""Samples of the data pass. The export check is a check of the exporter (verify covers the whole set); 256
samples cost one ONNX Runtime and one PyTorch pass over them (BERT-base, 64 tokens: ~35 s on 2 CPU cores)."""
EXTERNAL_DATA_THRESHOLD = 1536 << 20
"""Initializer bytes above which the mixed model's weights go to an external data file (protobuf caps files at
2 GB); below it the deployable is one file."""
FP32_EXTERNAL_DATA_THRESHOLD = 64 << 20
"""Initializer bytes above which the FP32 ONNX keeps its weights in an external data file. It is mpexport's
working copy: ONNX Runtime sessions of its variants (the data pass's probes, localisation) are then made from a
graph of a few MB whose weights are memory-mapped or shared with PyTorch, instead of serializing every weight
into one message (8 s and 3x the weights' memory for BERT-base)."""
CHECK_BATCH = 64
CHECK_OUTPUT_BUDGET = 256 << 20
"""Output bytes per backend that one data-pass batch may produce."""
SHAREABLE_TYPES = tuple(np.dtype(name) for name in ("float32", "float16", "float64", "int64", "int32"))
"""Weight types ONNX Runtime can use in place from numpy."""

StageCallback = Callable[[str], None]
ProgressCallback = Callable[[int, int | None], None]
"""Hears (samples done, samples in all or None) during the data pass."""


@dataclass
class ConvertResult:
    """What ``convert`` wrote: the output directory, its manifest, and notes for the user."""

    out: Path
    manifest: Manifest
    notes: list[str] = field(default_factory=list)

    @property
    def export_check_passed(self) -> bool:
        """True when ONNX Runtime reproduced the PyTorch FP32 outputs within tolerance (or there was nothing to
        check: an ONNX input has no PyTorch model)."""
        return self.manifest.export_check is None or self.manifest.export_check.passed

    @property
    def lint_passed(self) -> bool:
        """True when the mixed-precision model passed every lint check."""
        return self.manifest.lint is not None and self.manifest.lint.ok


@dataclass
class EngineOptions:
    """TensorRT build settings: explicit profiles (``--shapes``), TF32, workspace bytes."""

    shapes: dict[str, Any] = field(default_factory=dict)
    allow_tf32: bool = False
    workspace: int = DEFAULT_WORKSPACE


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
    policy_file: str | Path | None = None,
    calibration_samples: int = CALIBRATION_SAMPLES,
    io_types: str = "fp32",
    engine: str = "auto",
    engine_options: EngineOptions | None = None,
    custom_translation_table: dict[Any, Any] | None = None,
    task: str | None = None,
    columns: dict[str, str] | None = None,
    on_stage: StageCallback | None = None,
    on_progress: ProgressCallback | None = None,
) -> ConvertResult:
    """Convert a trained model file into a new bundle at ``out``: FP32 ONNX with provenance, checked against
    PyTorch, the precision plan for the training autocast policy, and the mixed-precision model, linted.

    The plan's options are ``policy_file`` (TOML, see :meth:`PlanOptions.from_file`) with ``plan_options`` on
    top; the policy defaults to what the model file records about its training, else ``cuda-fp16``. The data
    pass compares PyTorch and ONNX Runtime on up to ``check_samples`` samples of ``val_data`` (the examples
    without it) and collects the range rule's statistics on up to ``calibration_samples``. ``io_types="native"``
    gives the mixed model inputs and outputs in the type their nodes compute in. ``engine``: ``auto`` builds a
    TensorRT engine where TensorRT and a GPU exist and records why not elsewhere, ``on`` requires one (exit 2 up
    front when it cannot), ``off`` skips it. ``custom_translation_table`` gives the exporter ONNX translations
    for ops it lacks. ``task`` picks the head of a Hugging Face model directory (:data:`mpexport.hf.TASKS`).
    ``columns`` maps model inputs (and ``labels``) to the columns of a Parquet/Arrow ``val_data``.

    Raises :class:`MpexportError` (nothing written, an existing ``out`` untouched) for bad input or an
    impossible export. A failed export check or lint does not raise: the result records it.
    """
    artifacts.check_output_dir(out, force=force)
    options = _requested_options(plan_options, policy_file)
    if io_types not in ("fp32", "native"):
        raise MpexportError(f"unknown io types '{io_types}'", stage="rewrite", hint="use fp32 or native")
    if columns and val_data is None:
        raise MpexportError("--columns maps the columns of --val-data, and there is none", stage="val-data",
                            hint="pass --val-data with --columns")
    engine_status = _engine_status(engine)
    request = _FP32Request(model, val_data, list(inputs), factory, trust_pickle, dynamic_batch, opset, check_samples,
                           options, calibration_samples, custom_translation_table, task, columns or {})
    clock = StageClock(on_stage)
    with artifacts.staged_output(out, force=force) as staging:
        bundle = Bundle.create(staging)
        fp32 = _fp32_stage(bundle, request, clock, on_progress)
        gc.collect()  # the PyTorch model and the in-memory export are gone from here on
        manifest = bundle.manifest
        if fp32.ranges is not None:
            artifacts.write_json(staging / FILE_NAMES[RANGES], fp32.ranges.to_json())
            bundle.record_artifact(RANGES, FILE_NAMES[RANGES], command="convert")
        with clock.stage("plan"):
            model_ir = ir.load(str(staging / FILE_NAMES[FP32_ONNX]))  # external weights memory-mapped
            plan = make_plan(model_ir, fp32.records, fp32.options, fp32.ranges)
            artifacts.write_json(staging / FILE_NAMES[PLAN], plan.to_json())
            bundle.record_artifact(PLAN, FILE_NAMES[PLAN], command="convert")
            manifest.plan = PlanRecord(plan.policy.name, plan.options.low, fp32.policy_source, plan.notes,
                                       {key: value for key, value in plan.summary().items()
                                        if key in ("precision", "rules", "macs")})
        with clock.stage("rewrite"):
            _write_mixed(bundle, model_ir, plan, io_types)
            del model_ir
        with clock.stage("lint"):
            result = lint_model(bundle.path(MIXED_ONNX), plan)
            manifest.lint = LintRecord(result.ok, result.to_json()["checks"], FILE_NAMES[MIXED_ONNX],
                                       bundle.digests(MIXED_ONNX, PLAN))
        with clock.stage("engine"):
            _engine(bundle, plan, engine_status, fp32.specs, fp32.data, engine_options or EngineOptions())
        manifest.timings["convert"] = clock.stages
        bundle.commit("convert")
    return ConvertResult(Path(out), bundle.manifest, _notes(fp32, plan, bundle.manifest))


def _requested_options(plan_options: PlanOptions | None, policy_file: str | Path | None) -> PlanOptions | None:
    """The plan options the caller asked for: the policy file's, with ``plan_options`` on top."""
    if policy_file is None:
        return plan_options
    return PlanOptions.from_file(policy_file).overlaid(plan_options)


def _notes(fp32: _FP32Stage, plan: PrecisionPlan, manifest: Manifest) -> list[str]:
    notes = fp32.notes + plan.notes
    if fp32.check is not None and not fp32.check.passed:
        notes.append(_check_failure_note(fp32.check))
    lint = manifest.lint
    for failed in (check for check in (lint.checks if lint else []) if check["status"] == "fail"):
        notes.append(f"lint FAILED: {failed['name']}: {failed['detail']} {'; '.join(failed['findings'][:3])}")
    return notes


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
    custom_translation_table: dict[Any, Any] | None
    task: str | None = None
    columns: dict[str, str] = field(default_factory=dict)


@dataclass
class _FP32Stage:
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


def _fp32_stage(bundle: Bundle, request: _FP32Request, clock: StageClock,
                on_progress: ProgressCallback | None) -> _FP32Stage:
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
        options = _plan_options(request.plan_options, loaded)
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
                                                shareable_weights(exported.model), calibrate, on_progress)
        bundle.manifest.export_check = ExportCheckRecord(check.passed, check.to_json(), _data_description(data),
                                                         bundle.digests(FP32_ONNX))
    notes = loaded.notes + _record_notes(request.plan_options, loaded) + exported.notes + \
        ([device_note] if device_note else [])
    return _FP32Stage(records, check, ranges, options, options_source(request.plan_options, loaded), specs,
                      data, notes)


def _onnx_stage(bundle: Bundle, request: _FP32Request, clock: StageClock, loaded: LoadedModel,
                data: ValidationData | None, on_progress: ProgressCallback | None) -> _FP32Stage:
    """An FP32 ONNX as the input (:mod:`mpexport.onnxinput`): checked, written into the bundle as its FP32 working
    copy with what provenance it carries, and calibrated on the validation data. No export check: there is no
    PyTorch model (verify uses onnx-fp32 as the reference; ``verify --reference`` adds the PyTorch backends)."""
    with clock.stage("inputs"):
        model = read_fp32_onnx(loaded.path)
        if request.inputs:
            raise MpexportError("--input describes a PyTorch model's inputs; an ONNX model declares its own",
                                stage="inputs", hint="drop --input")
        specs = _named_dims(graph_specs(model.graph.inputs))
        if data is not None:
            check_against(data, specs)
        options = _plan_options(request.plan_options, loaded)
        opset = model.opset_imports.get("", 0)
        if options.low == "bf16" and opset < BF16_MIN_OPSET:
            raise MpexportError(f"a BF16 target needs ONNX opset {BF16_MIN_OPSET} or newer; this model is opset "
                                f"{opset}", stage="export", hint="deploy as --target fp16, or re-export the model")
        notes = [f"--opset {request.opset} ignored: the ONNX model keeps its opset {opset}"] \
            if request.opset not in (None, opset) else []
    with clock.stage("write"):
        kind = provenance_kind(model)
        records = provenance.collect_provenance(model, "exporter" if kind == "exporter" else "scope")
        external = _initializer_bytes(model) > min(FP32_EXTERNAL_DATA_THRESHOLD, EXTERNAL_DATA_THRESHOLD)
        name = FILE_NAMES[FP32_ONNX]
        save_model(model, bundle.directory / name, external_data=f"{name}.data" if external else None)
        artifacts.write_json(bundle.directory / FILE_NAMES[PROVENANCE], provenance.to_json(records))
        bundle.record_artifact(FP32_ONNX, name, (f"{name}.data",) if external else (), command="convert")
        bundle.record_artifact(PROVENANCE, FILE_NAMES[PROVENANCE], command="convert")
        manifest = bundle.manifest
        manifest.source = loaded.source_record(bundle.directory)
        manifest.validation = _validation_record(request.val_data, data, bundle.directory, request.columns)
        manifest.inputs, manifest.outputs = specs, graph_specs(model.graph.outputs)
        manifest.export = ExportRecord("onnx-input", [], 0.0, opset, external, f"onnx ({kind})")
        manifest.provenance = provenance.summarize(records)
        manifest.skipped["export check"] = "the model came as ONNX: there is no PyTorch model to check it against " \
            "(verify uses onnx-fp32 as the reference; verify --reference MODEL adds the PyTorch backends)"
        del model
    ranges = None
    if options.range_check and data is not None and request.calibration_samples > 0:
        with clock.stage("data pass"):
            ranges = _calibrate_onnx(bundle, specs, data, request.calibration_samples, on_progress)
    source = options_source(request.plan_options, loaded)
    if kind != "exporter":
        notes.append("the ONNX model records no aten ops: the plan infers them from op types and recognises the "
                     "policy's patterns (attention, normalisations), and every such reason says so")
    return _FP32Stage(records, None, ranges, options, source, specs, data, notes)


def _named_dims(specs: list[TensorSpec]) -> list[TensorSpec]:
    """Unknown dims (``?``) named after their input and axis, so data shapes can be checked against them."""
    return [TensorSpec(spec.name, spec.dtype, tuple(f"{spec.name}_dim{axis}" if dim == "?" else dim
                                                      for axis, dim in enumerate(spec.shape))) for spec in specs]


def _calibrate_onnx(bundle: Bundle, specs: list[TensorSpec], data: ValidationData, samples: int,
                    on_progress: ProgressCallback | None) -> RangeStats:
    """The range rule's statistics of an ONNX input: its FP32 model in ONNX Runtime with the probes attached."""
    runner = ProbedRunner(bundle.path(FP32_ONNX))
    fixed = _fixed_batch(specs)
    total = min(samples, data.num_samples) if data.num_samples else None
    for batch in data.batches(fixed or CHECK_BATCH, limit=samples, inputs=specs, exact=fixed is not None):
        runner.run(batch)
        if on_progress:
            on_progress(runner.stats.samples, total)
    return runner.stats


def _data_pass(bundle: Bundle, loaded: LoadedModel, specs: list[TensorSpec], data: ValidationData | None,
               examples: dict[str, torch.Tensor], request: _FP32Request, output_bytes: int,
               weights: dict[str, np.ndarray], calibrate: bool,
               on_progress: ProgressCallback | None) -> tuple[Comparison, RangeStats | None, str | None]:
    """One pass over the validation samples: PyTorch FP32 against the FP32 ONNX in ONNX Runtime on the first
    ``check_samples``, the range probes folded on the first ``calibration_samples`` (a batch that straddles either
    limit is split there; a model with a fixed batch size counts whole batches)."""
    reference = TorchRunner(loaded.callable(), [spec.name for spec in specs], positional=loaded.positional,
                            device=best_device())
    candidate = ProbedRunner(bundle.path(FP32_ONNX), shared_weights=weights, probe=calibrate)
    comparison = Comparison.of("torch-fp32", "onnx-fp32", candidate.output_names)
    check_limit = request.check_samples if data is not None else None
    calibration_limit = request.calibration_samples if calibrate else 0
    batches, total = _data_batches(specs, data, examples, max(check_limit or 0, calibration_limit), output_bytes)
    limits = [limit for limit in (check_limit, calibration_limit) if limit] if _fixed_batch(specs) is None else []
    done = 0
    for whole in batches:
        for batch in _split_at(whole, [limit - done for limit in limits]):
            samples = batch_samples(batch)
            candidate.calibrating = calibrate and done < calibration_limit
            compare = check_limit is None or done < check_limit
            if compare or candidate.calibrating:
                actual = candidate.run(batch)
                if compare:
                    comparison.fold(reference.run(batch), actual, samples=samples)
            done += samples
        if on_progress:
            on_progress(done, total)
    comparison.reference = f"torch-fp32 ({reference.device})"
    return comparison, candidate.stats if calibrate else None, reference.note


def _split_at(batch: Batch, cuts: list[int]) -> list[Batch]:
    """``batch`` cut into pieces at the sample positions in ``cuts`` that fall inside it."""
    size = batch_samples(batch)
    points = sorted({cut for cut in cuts if 0 < cut < size})
    bounds = [0, *points, size]
    return [{name: array[start:stop] for name, array in batch.items()} for start, stop in itertools.pairwise(bounds)]


def _data_batches(specs: list[TensorSpec], data: ValidationData | None, examples: dict[str, torch.Tensor],
                  limit: int, output_bytes: int) -> tuple[Any, int | None]:
    """The data pass's batches (the model's fixed batch size, else :func:`_batch_size`) and how many samples
    they hold in all (None when the data does not say)."""
    if data is None:
        batch = {name: tensor.numpy() for name, tensor in examples.items()}
        return [batch], batch_samples(batch)
    fixed = _fixed_batch(specs)
    total = min(limit, data.num_samples) if data.num_samples else None
    return data.batches(fixed or _batch_size(output_bytes), limit=limit, inputs=specs, exact=fixed is not None), total


def _fixed_batch(specs: list[TensorSpec]) -> int | None:
    return next((spec.shape[0] for spec in specs if spec.shape and isinstance(spec.shape[0], int)), None)


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


def _engine(bundle: Bundle, plan: PrecisionPlan, status: TensorRTStatus | None, specs: list[TensorSpec],
            data: ValidationData | None, options: EngineOptions) -> None:
    """Build the engine where possible (``status`` None: --engine off); otherwise record why it was skipped."""
    manifest = bundle.manifest
    if status is None:
        manifest.skipped["engine"] = "disabled (--engine off)"
        return
    if not status.available:
        manifest.skipped["engine"] = status.why or "TensorRT is not available"
        return
    observed = [{name: tuple(array.shape) for name, array in batch.items()}
                for batch in (data.batches(PROFILE_BATCH, limit=PROFILE_SAMPLES, inputs=specs) if data else [])]
    profiles = derive_profiles([spec.to_json() for spec in manifest.inputs], observed, options.shapes)
    result = build_engine(bundle.path(MIXED_ONNX), bundle.directory, profiles, plan.precisions(),
                          workspace=options.workspace, allow_tf32=options.allow_tf32,
                          module_of={n.name: n.module or "" for n in plan.nodes})
    bundle.record_artifact(ENGINE, result.path.name, result.companions, command="convert")
    manifest.engine = EngineRecord.from_build(result.metadata, bundle.digests(ENGINE, PLAN))


def _opset_for(options: PlanOptions, opset: int | None) -> int | None:
    if options.low != "bf16" or (opset is not None and opset >= BF16_MIN_OPSET):
        return opset
    if opset is not None:
        raise MpexportError(f"a BF16 target needs ONNX opset {BF16_MIN_OPSET} or newer, not {opset}",
                            stage="export", hint=f"drop --opset or pass --opset {BF16_MIN_OPSET}")
    return BF16_MIN_OPSET


def _write_mixed(bundle: Bundle, model: ir.Model, plan: PrecisionPlan, io_types: str) -> None:
    """Apply the plan to the FP32 model as read back from its file, save, and record it. Converted weights are
    computed while saving, one at a time; the model has external data above :data:`EXTERNAL_DATA_THRESHOLD`."""
    staging = bundle.directory
    report = apply_plan(model, plan.precisions(), io_types=io_types)
    name = FILE_NAMES[MIXED_ONNX]
    external = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD  # converted weights count at their new size
    data_file = f"{name}.data"
    save_model(model, staging / name, external_data=data_file if external else None)
    bundle.record_artifact(MIXED_ONNX, name, (data_file,) if external else (), command="convert")
    bundle.manifest.rewrite = report.to_json()


def training_policy(loaded: LoadedModel) -> str | None:
    """The autocast policy name a model's training record settles (``cpu-bf16``...), if any: None when there is
    no record, the record says the run used no autocast, or it names a device or type autocast policies lack."""
    autocast = loaded.training.get("autocast") if loaded.training else None
    if not isinstance(autocast, dict) or autocast.get("enabled") is False:
        return None
    low = CANONICAL_NAMES.get(str(autocast.get("dtype")).removeprefix("torch."))
    device = autocast.get("device_type")
    return f"{device}-{low}" if device in ("cpu", "cuda") and low in LOW_PRECISIONS else None


def options_source(options: PlanOptions | None, loaded: LoadedModel) -> str:
    """Where the policy came from, in words: the training record's evidence (file and fields), the caller's
    choice (and the record it contradicts, if any), or the default (and why the record did not settle it)."""
    record = training_policy(loaded)
    evidence = str(loaded.training.get("evidence") or "training record in the model file")
    if options is not None and options.policy:
        contradicted = _contradicted_record(options, loaded)
        return f"given: --amp-policy {options.policy} contradicts the training record ({contradicted}: {evidence})" \
            if contradicted else "given"
    if record is not None:
        return evidence
    if loaded.training.get("evidence"):
        autocast = loaded.training.get("autocast")
        why = "trained without autocast" if isinstance(autocast, dict) and autocast.get("enabled") is False \
            else "does not settle the training precision"
        return f"default ({DEFAULT_POLICY}): the record {why} ({evidence})"
    return "default"


def _record_notes(options: PlanOptions | None, loaded: LoadedModel) -> list[str]:
    """What the manifest and CLI say about the training record: a contradicting --amp-policy, and what the
    record's reader assumed rather than read."""
    notes = [f"training record: {assumption}" for assumption in loaded.training.get("assumptions", [])]
    contradicted = _contradicted_record(options, loaded)
    if options is not None and contradicted:
        notes.append(f"--amp-policy {options.policy} contradicts the training record, which says {contradicted} "
                     f"({loaded.training.get('evidence', 'in the model file')}): planned with {options.policy}")
    return notes


def _contradicted_record(options: PlanOptions | None, loaded: LoadedModel) -> str | None:
    """The policy the training record settles, when the caller's ``--amp-policy`` says another one."""
    record = training_policy(loaded)
    given = options.policy if options is not None else ""
    return record if given and record is not None and record != given else None


def _plan_options(options: PlanOptions | None, loaded: LoadedModel) -> PlanOptions:
    options = replace(options) if options is not None else PlanOptions()
    if not options.policy:
        options.policy = training_policy(loaded) or DEFAULT_POLICY
    if options.torch_version is None and loaded.training.get("torch"):
        options.torch_version = str(loaded.training["torch"])
    return options


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
                request: _FP32Request, data: ValidationData | None) -> list[provenance.NodeProvenance]:
    """Save the FP32 ONNX and its provenance into the bundle and fill the manifest's source, validation, I/O
    and export records."""
    staging = bundle.directory
    model = exported.model
    external = _initializer_bytes(model) > min(FP32_EXTERNAL_DATA_THRESHOLD, EXTERNAL_DATA_THRESHOLD)
    name = FILE_NAMES[FP32_ONNX]
    data_file = f"{name}.data"
    save_model(model, staging / name, external_data=data_file if external else None)
    records = provenance.collect_provenance(model, exported.provenance_kind, exported.facts)
    artifacts.write_json(staging / FILE_NAMES[PROVENANCE], provenance.to_json(records))
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
    return ValidationRecord(absolute, "files", relative, samples=data.num_samples or None, columns=dict(columns))


def _data_description(data: ValidationData | None) -> str:
    return data.describe() if data is not None else "example inputs (no --val-data)"


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


def _batch_size(output_bytes: int) -> int:
    """Up to CHECK_BATCH samples whose outputs take about CHECK_OUTPUT_BUDGET (a language model's logits are
    ~25 MB per sample at 128 tokens: 10 samples a batch, not 64)."""
    return max(1, min(CHECK_BATCH, CHECK_OUTPUT_BUDGET // max(1, output_bytes)))


def _check_failure_note(check: Comparison) -> str:
    worst = check.worst()
    if worst.name in check.mismatches:
        return f"export check FAILED: output '{worst.name}' {check.mismatches[worst.name]}"
    return (f"export check FAILED: output '{worst.name}' differs by {worst.max_abs:.3g} "
            f"({check.relative_error(worst):.2e} of its scale {worst.scale:.3g}; tolerance {check.rtol:g}), "
            f"{worst.nonfinite} non-finite values")

