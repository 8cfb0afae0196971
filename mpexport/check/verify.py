"""Verify's passes: every deployable form side by side with the FP32 baseline on the validation set, gated and
localised, without writing anything (:mod:`mpexport.commands.verify` commits the result).

Backends (one interface, :class:`mpexport.backends.base.Runner`; registered in :mod:`mpexport.check.registry`):
``torch-fp32`` (the reference), ``torch-amp`` (the training policy, the noise floor), ``onnx-fp32``, and the
deployable forms: ``onnx-mixed`` (ONNX Runtime), ``strict-fp16``/``strict-bf16`` (the mixed model with true
low-precision storage, see :mod:`mpexport.graph.emulate`) and ``tensorrt`` where an engine and a GPU exist.

Each backend ends in one state: ``ran``, ``skipped`` with a reason from a closed list
(:data:`mpexport.check.registry.ALLOWED_SKIPS`), or ``failed`` (it could not be built or raised while running) with
the error. PASS needs every gated output within budget, ``onnx-fp32`` and the strict emulation to have run, and no
backend to have failed: a form that cannot be checked is never a silent pass.

Gate: the default budget comes from the training noise floor, the torch-amp error on the same data times
``budget_factor``, with absolute floors; explicit thresholds override. ``onnx-fp32`` must match FP32 within
1e-4 of each output's scale. A non-finite value where FP32 is finite fails. On failure the intermediate
tensors of the FP32 model and the strict emulation are compared to name the first nodes that leave budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx_ir as ir

from mpexport.backends.onnxruntime import OrtRunner
from mpexport.backends.torch import TorchRunner
from mpexport.base.errors import MpexportError, first_line
from mpexport.base.files import sha256_file
from mpexport.base.specs import Batch, TensorSpec
from mpexport.base.status import StageClock
from mpexport.bundle.names import FP32_ONNX
from mpexport.bundle.store import Bundle
from mpexport.check.amp import TorchAmpRunner
from mpexport.check.backends import AMP, ONNX_AMP, ONNX_FP32, Backends
from mpexport.check.forms import Forms, VerifyInputs, build_forms, model_batch_size, weight_bytes
from mpexport.check.localise import localise
from mpexport.check.registry import training_emulation
from mpexport.check.report import STAGE, ParityReport, VerifyOptions, trained_accuracy
from mpexport.check.tally import Tally
from mpexport.data.base import ValidationData, check_against
from mpexport.data.open import load_validation_data
from mpexport.graph.constants import ChangedConstant, changed_constants
from mpexport.graph.emulate import load_strict_emulation
from mpexport.graph.specs import graph_specs
from mpexport.sources.loading import load_model
from mpexport.sources.model import FORMAT_ONNX


def verify_forms(bundle: Bundle, inputs: VerifyInputs, options: VerifyOptions,
                 on_batch: Callable[[int, int | None], None] | None = None, *, mixed: Path | None = None,
                 plan: Any = None, clock: StageClock | None = None) -> ParityReport:
    """Every backend of ``bundle`` on ``inputs``, gated and localised, without writing anything. ``mixed`` and
    ``plan`` verify another mixed model and its plan against the bundle's FP32 model (``repair`` checks a
    candidate before it commits it); the bundle's engine then does not run (it was built from the old model)."""
    clock = clock or StageClock()
    with clock.stage("backends"):
        forms = build_forms(bundle, inputs, mixed=mixed, plan=plan)
    with clock.stage("passes"):
        tally = forms.tally(inputs)
        tally.fold(forms.backends, inputs.data.batches(options.batch_size, limit=options.max_samples,
                                                       inputs=inputs.specs),
                   on_batch=on_batch, total=expected_samples(inputs.data, options))
    return finish(bundle, forms, tally, options, inputs.data.describe(), inputs.example, clock=clock,
                  source=inputs.data)


def finish(bundle: Bundle, forms: Forms, tally: Tally, options: VerifyOptions, data: str, example: Batch, *,
           clock: StageClock, source: ValidationData | None = None) -> ParityReport:
    """The report of a finished tally over ``data`` (its description): gated, with notes, the training record's
    accuracy beside the reference's (``source``: the data, whose SHA-256 tells whether the record measured the same
    data), and localised on the worst sample (or ``example``) when it fails."""
    if tally.samples == 0:
        raise MpexportError("the validation data gave no batches", stage=STAGE)
    report = tally.report(forms.backends.states, options, data, gated=forms.gated,
                          required=forms.required)
    _compare_trained_accuracy(bundle, report, source)
    strict, low = forms.strict, forms.low
    if forms.low_memory and (report.ran("onnx-mixed") or report.ran(strict)):
        report.notes.append(f"{weight_bytes(bundle) / 2**30:.1f} GiB of FP32 weights: onnx-mixed and {strict} ran "
                            "without graph optimizations or a memory arena (weights cast per run, not held in FP32)")
    if not report.passed and report.ran(strict):
        with clock.stage("localisation"):
            nodes = {node.name: node.to_json() for node in forms.plan.nodes} if forms.plan is not None else {}
            batch = report.worst.batch if report.worst is not None and report.worst.batch is not None \
                else example
            report.localisation, note = localise(bundle.path(FP32_ONNX), forms.mixed, batch, nodes, low=low)
            if note:
                report.notes.append(note)
    return report


def _compare_trained_accuracy(bundle: Bundle, report: ParityReport, source: ValidationData | None) -> None:
    """Set the accuracy the source model's training record reports beside the reference's (a note when they differ
    on the same data); nothing when the record reports none."""
    record = bundle.manifest.source.training if bundle.manifest.source is not None else {}
    recorded = record.get("validation") if isinstance(record, dict) else None
    if not isinstance(recorded, dict):
        return
    digest = None
    if recorded.get("data_sha256") and source is not None and source.path.is_file():
        digest = sha256_file(source.path)
    measured = report.backends.get(report.reference, {}).get("accuracy")
    report.trained, note = trained_accuracy(recorded, report.reference, measured, digest)
    if note:
        report.notes.append(note)


def expected_samples(data: ValidationData, options: VerifyOptions) -> int | None:
    """How many samples a verify of ``data`` covers (None when the data does not say: a ``module:function``)."""
    if not data.num_samples:
        return None
    return min(data.num_samples, options.max_samples or data.num_samples)


def verify_candidate(reference: str | Path, candidate: str | Path, val_data: str | Path, *,
                     factory: str | None = None, trust_pickle: bool = False, policy: str = "cuda-fp16",
                     low: str = "fp16", options: VerifyOptions | None = None,
                     on_batch: Callable[[int, int | None], None] | None = None) -> ParityReport:
    """Judge any converter's ONNX ``candidate`` against the FP32 baseline of ``reference`` with the same gate and
    report as a bundle's verify: ``onnx-candidate`` (the candidate in ONNX Runtime) and ``strict-<low>`` (its strict
    emulation) are gated. ``reference`` is a PyTorch model (its FP32 run the baseline, ``torch-amp`` under
    ``policy`` the noise floor) or the FP32 ONNX the candidate was converted from (``onnx-fp32`` the baseline,
    ``onnx-amp``, the ``policy`` plan emulated strictly on it, the noise floor)."""
    options = options or VerifyOptions()
    loaded = load_model(reference, factory=factory, trust_pickle=trust_pickle)
    data = load_validation_data(val_data, columns=options.columns or None)
    candidate = Path(candidate)
    try:
        candidate_model = ir.load(str(candidate))
    except Exception as exc:  # noqa: BLE001 - an unreadable candidate is bad input
        raise MpexportError(f"'{candidate}' is not a readable ONNX model: {first_line(exc)}", stage=STAGE) from None
    graph = candidate_model.graph
    # the candidate's inputs (an IR-3 model lists its weights as inputs too) with its shapes, fed in the data's types
    weights = set(graph.initializers)
    shapes = {spec.name: spec.shape for spec in graph_specs(graph.inputs) if spec.name not in weights}
    specs = [replace(spec, shape=shapes[spec.name]) for spec in data.input_specs() if spec.name in shapes]
    check_against(data, specs)
    options, batch_note = model_batch_size(options, specs, data)
    names = [spec.name for spec in specs]
    example = next(data.batches(options.batch_size, limit=options.batch_size, inputs=specs))
    backends = Backends()
    changed = []
    if loaded.format == FORMAT_ONNX:
        changed = changed_constants(_onnx_reference(backends, loaded.path, policy), candidate_model)
    else:
        backends.reference(TorchRunner(loaded.callable(), names, positional=loaded.positional))
        backends.add(AMP, lambda: TorchAmpRunner(loaded, names, policy, example))
    backends.add("onnx-candidate", lambda: OrtRunner(candidate, name="onnx-candidate"))
    strict = f"strict-{low}"
    backends.add(strict, lambda: OrtRunner.from_model(load_strict_emulation(candidate), candidate.parent, name=strict))
    report = _run(backends, data, specs, [value.name or "" for value in graph.outputs], options, on_batch,
                  gated=("onnx-candidate", strict), required=("onnx-candidate", strict), watch=strict)
    if batch_note:
        report.notes.append(batch_note)
    if changed:
        report.notes.append(_changed_note(changed))
    if not report.passed and report.ran(strict):
        batch = report.worst.batch if report.worst is not None and report.worst.batch is not None else example
        report.localisation, note = localise(None, candidate, batch, {}, low=low)
        if note:
            report.notes.append(note)
    return report


def _changed_note(changed: list[ChangedConstant]) -> str:
    """The note on constants the converter changed beyond rounding (:mod:`mpexport.graph.constants`)."""
    shown = "; ".join(item.describe() for item in changed[:4])
    more = f"; and {len(changed) - 4} more" if len(changed) > 4 else ""
    return (f"{len(changed)} of the candidate's constants are not the reference's rounded to their type (a clamped "
            f"or rewritten value changes what the model computes, which this data may not show): {shown}{more}")


def _onnx_reference(backends: Backends, path: Path, policy: str) -> ir.Model:
    """An FP32 ONNX as the reference (``onnx-fp32``) and its training emulation (``onnx-amp``) as the noise floor;
    a one-line error when it is not an FP32 model ONNX Runtime can run. Returns the model read."""
    from mpexport.capture.onnxinput import drop_initializer_inputs, provenance_kind, read_fp32_onnx
    from mpexport.capture.provenance import collect_provenance

    model = read_fp32_onnx(path)
    drop_initializer_inputs(model)
    kind = provenance_kind(model)
    records = collect_provenance(model, "exporter" if kind == "exporter" else "scope")
    backends.reference(OrtRunner(path, name=ONNX_FP32))
    backends.add(ONNX_AMP, lambda: training_emulation(model, path.parent, records, policy))
    return model


def _run(backends: Backends, data: ValidationData, specs: list[TensorSpec], names: list[str],
         options: VerifyOptions, on_batch: Callable[[int, int | None], None] | None, *, gated: tuple[str, ...],
         required: tuple[str, ...], watch: str | None = None) -> ParityReport:
    """Every backend on every batch against the reference (the first runner), then the gate. For the backend
    ``watch`` the worst sample is remembered (for localisation)."""
    tally = Tally.start([runner.name for runner in backends.runners], names, whole_batches=data.whole_batches(specs),
                        watch=watch)
    tally.fold(backends, data.batches(options.batch_size, limit=options.max_samples, inputs=specs),
               on_batch=on_batch, total=expected_samples(data, options))
    if tally.samples == 0:
        raise MpexportError("the validation data gave no batches", stage=STAGE)
    return tally.report(backends.states, options, data.describe(), gated=gated, required=required)
