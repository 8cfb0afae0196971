"""``convert``: model file -> a new bundle (output directory) with the FP32 ONNX and its provenance, the
precision plan, the mixed-precision ONNX, an engine where TensorRT exists, and the manifest.

Stages: load -> inputs -> export -> write (FP32 ONNX + provenance) -> data pass -> plan -> rewrite -> lint ->
engine. The data pass runs the validation samples once: PyTorch FP32 (on the GPU where one exists) against the
FP32 ONNX in ONNX Runtime with the range rule's probes attached, so one ONNX Runtime pass serves both the export
check and the calibration statistics. The PyTorch model is dropped after it; plan and rewrite read the FP32 ONNX
file back, weights memory-mapped one at a time, so a large model's weights are in memory once at most. Every
stage's status, seconds and peak memory land in the manifest (``stages.convert``).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from mpexport.base.errors import MpexportError
from mpexport.base.files import write_json
from mpexport.base.specs import TensorSpec
from mpexport.base.status import StageClock
from mpexport.bundle import staging as artifacts
from mpexport.bundle.names import ENGINE, FILE_NAMES, FP32_ONNX, MIXED_ONNX, PLAN, RANGES, TRAINING_RANGES
from mpexport.bundle.records import EngineRecord, Manifest
from mpexport.bundle.store import Bundle
from mpexport.commands import fp32 as fp32_module
from mpexport.commands.fp32 import (
    CALIBRATION_SAMPLES,
    CHECK_SAMPLES,
    FP32Request,
    FP32Stage,
    ProgressCallback,
    check_failure_note,
    fp32_stage,
    initializer_bytes,
)
from mpexport.commands.records import lint_record, plan_record
from mpexport.data.base import ValidationData
from mpexport.deploy.tensorrt import (
    DEFAULT_WORKSPACE,
    PROFILE_BATCH,
    PROFILE_SAMPLES,
    TensorRTStatus,
    build_engine,
    derive_profiles,
    tensorrt_status,
)
from mpexport.graph.lint import lint_model
from mpexport.graph.onnxfile import save_model
from mpexport.graph.rewrite import apply_plan
from mpexport.precision.options import PlanOptions
from mpexport.precision.plan import PrecisionPlan
from mpexport.precision.planner import make_plan
from mpexport.precision.training_ranges import TrainingEvidence, join_ranges
from mpexport.sources.training_ranges import find_training_ranges

StageCallback = Callable[[str], None]


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
    for ops it lacks. ``task`` picks the head of a Hugging Face model directory (:data:`mpexport.sources.hf.TASKS`).
    ``columns`` maps model inputs (and ``labels``) to the columns of a Parquet/Arrow ``val_data``.

    Raises :class:`MpexportError` (nothing written, an existing ``out`` untouched) for bad input or an
    impossible export. A failed export check or lint does not raise: the result records it.
    """
    own_inputs = [path for path in (model, val_data, policy_file) if path is not None and Path(path).exists()]
    artifacts.check_output_dir(out, force=force, inputs=own_inputs)
    swept = artifacts.sweep_leftovers(out)
    options = _requested_options(plan_options, policy_file)
    if io_types not in ("fp32", "native"):
        raise MpexportError(f"unknown io types '{io_types}'", stage="rewrite", hint="use fp32 or native")
    if columns and val_data is None:
        raise MpexportError("--columns maps the columns of --val-data, and there is none", stage="val-data",
                            hint="pass --val-data with --columns")
    engine_status = _engine_status(engine)
    request = FP32Request(model, val_data, list(inputs), factory, trust_pickle, dynamic_batch, opset, check_samples,
                           options, calibration_samples, custom_translation_table, task, columns or {})
    clock = StageClock(on_stage)
    with artifacts.staged_output(out, force=force, inputs=own_inputs) as staging:
        bundle = Bundle.create(staging)
        fp32 = fp32_stage(bundle, request, clock, on_progress)
        gc.collect()  # the PyTorch model and the in-memory export are gone from here on
        manifest = bundle.manifest
        if fp32.ranges is not None:
            write_json(staging / FILE_NAMES[RANGES], fp32.ranges.to_json())
            bundle.record_artifact(RANGES, FILE_NAMES[RANGES], command="convert")
        with clock.stage("plan"):
            training, training_notes = _training_evidence(bundle, model, fp32)
            model_ir = ir.load(str(staging / FILE_NAMES[FP32_ONNX]))  # external weights memory-mapped
            plan = make_plan(model_ir, fp32.records, fp32.options, fp32.ranges, training)
            plan.notes += training_notes
            write_json(staging / FILE_NAMES[PLAN], plan.to_json())
            bundle.record_artifact(PLAN, FILE_NAMES[PLAN], command="convert")
            manifest.plan = plan_record(plan, fp32.policy_source)
        with clock.stage("rewrite"):
            _write_mixed(bundle, model_ir, plan, io_types)
            del model_ir
        with clock.stage("lint"):
            manifest.lint = lint_record(lint_model(bundle.path(MIXED_ONNX), plan), bundle)
        skipped = _engine_skip(engine_status)
        if skipped:
            clock.skip("engine", skipped)
        else:
            with clock.stage("engine"):
                _engine(bundle, plan, fp32.specs, fp32.data, engine_options or EngineOptions())
        manifest.stages["convert"] = clock.stages
        bundle.commit("convert")
    notes = _notes(fp32, plan, bundle.manifest)
    if swept:
        notes.append(f"removed what killed runs left beside --out: {', '.join(swept)}")
    return ConvertResult(Path(out), bundle.manifest, notes)


def _training_evidence(bundle: Bundle, model: str | Path, fp32: FP32Stage) -> tuple[TrainingEvidence | None,
                                                                                    list[str]]:
    """The range evidence training left for ``model`` (:func:`mpexport.sources.training_ranges.find_training_ranges`),
    kept as the bundle's ``training_ranges`` artifact and joined to the graph's nodes, and the notes saying what was
    used, what did not join, or why none of it is used. Nothing is read when the options turn it off."""
    options = fp32.options
    if not (options.range_check and options.training_ranges):
        return None, []
    ranges, notes = find_training_ranges(model)
    if ranges is None:
        return None, notes
    write_json(bundle.directory / FILE_NAMES[TRAINING_RANGES], ranges.to_json())
    bundle.record_artifact(TRAINING_RANGES, FILE_NAMES[TRAINING_RANGES], command="convert")
    evidence, refused = join_ranges(fp32.records, ranges)
    if evidence is None:
        return None, notes + refused
    return evidence, [*notes, evidence.summary(), *evidence.notes]


def _requested_options(plan_options: PlanOptions | None, policy_file: str | Path | None) -> PlanOptions | None:
    """The plan options the caller asked for: the policy file's, with ``plan_options`` on top."""
    if policy_file is None:
        return plan_options
    return PlanOptions.from_file(policy_file).overlaid(plan_options)


def _notes(fp32: FP32Stage, plan: PrecisionPlan, manifest: Manifest) -> list[str]:
    notes = fp32.notes + plan.notes
    if fp32.check is not None and not fp32.check.passed:
        notes.append(check_failure_note(fp32.check))
    lint = manifest.lint
    for failed in (check for check in (lint.checks if lint else []) if check["status"] == "fail"):
        notes.append(f"lint FAILED: {failed['name']}: {failed['detail']} {'; '.join(failed['findings'][:3])}")
    return notes


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


def _engine_skip(status: TensorRTStatus | None) -> str | None:
    """Why convert builds no engine (``status`` None: --engine off); None when it builds one."""
    if status is None:
        return "disabled (--engine off)"
    if not status.available:
        return status.why or "TensorRT is not available"
    return None


def _engine(bundle: Bundle, plan: PrecisionPlan, specs: list[TensorSpec], data: ValidationData | None,
            options: EngineOptions) -> None:
    """Build the engine from the mixed model and record it."""
    manifest = bundle.manifest
    observed = [{name: tuple(array.shape) for name, array in batch.items()}
                for batch in (data.batches(PROFILE_BATCH, limit=PROFILE_SAMPLES, inputs=specs) if data else [])]
    profiles = derive_profiles([spec.to_json() for spec in manifest.inputs], observed, options.shapes)
    result = build_engine(bundle.path(MIXED_ONNX), bundle.directory, profiles, plan.precisions(),
                          workspace=options.workspace, allow_tf32=options.allow_tf32,
                          module_of={n.name: n.module or "" for n in plan.nodes})
    bundle.record_artifact(ENGINE, result.path.name, result.companions, command="convert")
    manifest.engine = EngineRecord.from_build(result.metadata, bundle.digests(ENGINE, PLAN))


def _write_mixed(bundle: Bundle, model: ir.Model, plan: PrecisionPlan, io_types: str) -> None:
    """Apply the plan to the FP32 model as read back from its file, save, and record it. Converted weights are
    computed while saving, one at a time; the model has external data above
    :data:`mpexport.commands.fp32.MIXED_EXTERNAL_DATA_THRESHOLD`."""
    staging = bundle.directory
    report = apply_plan(model, plan.precisions(), io_types=io_types)
    name = FILE_NAMES[MIXED_ONNX]
    # converted weights count at their new size
    external = initializer_bytes(model) > fp32_module.MIXED_EXTERNAL_DATA_THRESHOLD
    data_file = f"{name}.data"
    save_model(model, staging / name, external_data=data_file if external else None)
    bundle.record_artifact(MIXED_ONNX, name, (data_file,) if external else (), command="convert")
    bundle.manifest.rewrite = report.to_json()





























