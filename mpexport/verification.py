"""``verify``: every deployable form side by side with the FP32 baseline on the validation set, gated.

Backends (one interface, :class:`mpexport.runners.Runner`): ``torch-fp32`` (the reference), ``torch-amp``
(the training policy, the noise floor), ``onnx-fp32``, and the deployable forms: ``onnx-mixed`` (ONNX Runtime),
``strict-fp16``/``strict-bf16`` (the mixed model with true low-precision storage, see :mod:`mpexport.emulate`)
and ``tensorrt`` where an engine and a GPU exist.

Each backend ends in one state: ``ran``, ``skipped`` with a reason from a closed list (:data:`ALLOWED_SKIPS`),
or ``failed`` (it could not be built or raised while running) with the error. PASS needs every gated output
within budget, ``onnx-fp32`` and the strict emulation to have run, and no backend to have failed: a form that
cannot be checked is never a silent pass.

Gate: the default budget comes from the training noise floor, the torch-amp error on the same data times
``budget_factor``, with absolute floors; explicit thresholds override. ``onnx-fp32`` must match FP32 within
1e-4 of each output's scale. A non-finite value where FP32 is finite fails. On failure the intermediate
tensors of the FP32 model and the strict emulation are compared to name the first nodes that leave budget.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx_ir as ir

from mpexport.amp import TorchAmpRunner
from mpexport.bundle import (
    ENGINE,
    FILE_NAMES,
    FP32_ONNX,
    MIXED_ONNX,
    PLAN,
    REPORT,
    REPORT_HTML,
    Bundle,
    SourceRecord,
    StageTiming,
    VerifyRecord,
)
from mpexport.dtypes import TYPE_MAX
from mpexport.emulate import ROUNDING, strict_emulation
from mpexport.errors import MpexportError, first_line
from mpexport.graphs import added_role
from mpexport.loading import FORMAT_ONNX, LoadedModel, load_model
from mpexport.metrics import CHUNK_ELEMENTS, OutputMetrics
from mpexport.parity import FP32_RTOL, Comparison, batch_samples
from mpexport.runners import Batch, OrtRunner, Runner, TorchRunner, mapped_weights, return_large_blocks
from mpexport.specs import TensorSpec
from mpexport.timing import StageClock
from mpexport.valdata import LABELS, ValidationData, check_against, load_validation_data

STAGE = "verify"
REFERENCE = "torch-fp32"
AMP = "torch-amp"
ONNX_AMP = "onnx-amp"
"""The noise floor without a PyTorch model: the training policy emulated strictly on the FP32 ONNX."""
NOISE_FLOORS = (AMP, ONNX_AMP)
ONNX_FP32 = "onnx-fp32"
ABS_FLOOR = 1e-3
"""Smallest max-abs budget, relative to the output's scale."""
COSINE_FLOOR = 1e-5
TOP1_FLOOR = 0.01
LOCALISE_RTOL = 0.05
RAN, SKIPPED, FAILED = "ran", "skipped", "failed"
ALLOWED_SKIPS = {
    "torch-amp": "no PyTorch model (an ONNX input without --reference): onnx-amp is the noise floor",
    "torch-cuda": "no CUDA GPU visible to torch, or the policy is a CUDA one (torch-amp then runs it), or no PyTorch "
                  "model",
    "onnx-mixed": "this ONNX Runtime build has no CPU kernel for the low type (BF16 Conv, for one); the strict "
                  "emulation still checks the mixed model",
    "tensorrt": "no engine in the bundle, or no TensorRT or GPU here",
}
"""The only backends verify may skip, and when. Any other backend that cannot run fails the verdict."""


LOW_MEMORY_WEIGHTS = 1 << 30
"""FP32 weight bytes from which the low-precision sessions trade speed for memory (:func:`session_options`)."""


@dataclass
class VerifyOptions:
    """Budget factor over the training noise floor, explicit thresholds (None: from the budget), batching."""

    budget_factor: float = 2.0
    atol: float | None = None
    min_cosine: float | None = None
    max_top1_drop: float | None = None
    batch_size: int = 64
    max_samples: int | None = None
    columns: dict[str, str] = field(default_factory=dict)
    """For a table given as ``val_data``: input (or ``labels``) -> column (``--columns``)."""


@dataclass
class ParityReport:
    """Metrics per backend and output, thresholds, verdict, failures, each backend's state, localisation."""

    verdict: str
    backends: dict[str, dict[str, Any]]
    metrics: dict[str, dict[str, OutputMetrics]]
    thresholds: dict[str, dict[str, Any]]
    failures: list[str]
    localisation: list[dict[str, Any]] = field(default_factory=list)
    samples: int = 0
    data: str = ""
    notes: list[str] = field(default_factory=list)
    timings: list[StageTiming] = field(default_factory=list)
    batches: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    worst: _WorstSample | None = None
    """The sample the strict emulation got most wrong (localisation runs on it)."""
    per_sample: dict[str, SampleStats] = field(default_factory=dict)
    """Per output of the strict emulation: each sample's own statistics (repair picks the failing samples)."""
    repair: dict[str, Any] | None = None
    """What ``repair`` changed, when this report confirms a repair."""
    reference: str = ""
    """The backend every other was compared with: ``torch-fp32``, or ``onnx-fp32`` without a PyTorch model."""

    def failing_samples(self, backend: str) -> list[int]:
        """The samples on which ``backend`` breaks its thresholds by themselves (non-finite values, error beyond
        ``atol``, cosine below the minimum) or disagrees on top-1 with FP32, in order."""
        failing: set[int] = set()
        for output, stats in self.per_sample.items():
            limits = self.thresholds.get(backend, {}).get(output)
            if limits is not None:
                failing.update(stats.failing(limits))
        return sorted(failing)

    @property
    def passed(self) -> bool:
        """True when the verdict is pass."""
        return self.verdict == "pass"

    def ran(self, backend: str) -> bool:
        """True when ``backend`` ran over the whole data."""
        return self.backends.get(backend, {}).get("state") == RAN

    def to_json(self) -> dict[str, Any]:
        """``report.json``: verdict, thresholds, metrics per backend and output, failures, localisation."""
        return {
            "verdict": self.verdict, "reference": self.reference, "samples": self.samples, "batches": self.batches,
            "data": self.data,
            "options": self.options, "failures": self.failures,
            "thresholds": self.thresholds, "backends": self.backends, "notes": self.notes,
            "metrics": {backend: {name: m.to_json() for name, m in outputs.items()}
                        for backend, outputs in self.metrics.items()},
            "localisation": self.localisation,
            "localised_on": self.worst.to_json() if self.worst is not None and self.localisation else None,
            "repair": self.repair,
            "timings": [{"stage": t.stage, "seconds": t.seconds, "peak_rss_mb": t.peak_rss_mb} for t in self.timings],
        }


class _Backends:
    """The runners being built, and every backend's state (ran / skipped with the reason / failed with the
    error)."""

    def __init__(self) -> None:
        self.runners: list[Runner] = []
        self.states: dict[str, dict[str, Any]] = {}

    def add(self, name: str, make: Callable[[], Runner], skip_if: Callable[[str], str | None] | None = None) -> None:
        """Build a backend; a failure is a skip only when ``skip_if`` names an allowed reason for it."""
        try:
            runner = make()
        except MpexportError:
            raise
        except Exception as exc:  # noqa: BLE001 - a backend that cannot be built is recorded, then judged
            error = first_line(exc, 300)
            reason = skip_if(error) if skip_if else None
            if reason:
                self.skip(name, reason)
            else:
                self.states[name] = {"state": FAILED, "ran": False, "why": f"could not be built: {error}"}
            return
        self.runners.append(runner)
        self.states[name] = {"state": RAN, "ran": True}

    def skip(self, name: str, why: str) -> None:
        """Record an allowed skip."""
        if name not in ALLOWED_SKIPS:
            raise AssertionError(f"internal: {name} may not be skipped")
        self.states[name] = {"state": SKIPPED, "ran": False, "why": why}


@dataclass
class VerifyInputs:
    """What a bundle is verified with: the validation data, the source model, the model's input specs and a first
    batch (the example some backends are built from)."""

    data: ValidationData
    loaded: LoadedModel | None
    """None when there is no PyTorch model (an ONNX input without ``--reference``): onnx-fp32 is the reference."""
    specs: list[TensorSpec]
    example: Batch

    def reference_runner(self, bundle: Bundle) -> Runner:
        """The FP32 reference: the PyTorch model, else the bundle's FP32 ONNX."""
        if self.loaded is None:
            return OrtRunner(bundle.path(FP32_ONNX), name=ONNX_FP32)
        names = [spec.name for spec in self.specs]
        return TorchRunner(self.loaded.callable(), names, positional=self.loaded.positional)


def load_inputs(bundle: Bundle, *, val_data: str | Path | None = None, trust_pickle: bool = False,
                batch_size: int = 64, reference: str | Path | None = None,
                columns: dict[str, str] | None = None) -> VerifyInputs:
    """The validation data (``val_data``, else what convert recorded) checked against the model's inputs, and the
    source model (its SHA-256 checked against convert's), or ``reference`` (a PyTorch model file, e.g. the one an
    ONNX input was exported from); for an ONNX input without ``reference`` there is no PyTorch model. One-line
    errors otherwise. ``columns`` maps the columns of a table given as ``val_data``."""
    data = validation_data_for(bundle, val_data, columns)
    specs = bundle.manifest.inputs
    check_against(data, specs)
    loaded: LoadedModel | None
    if reference is not None:
        loaded = load_model(reference, trust_pickle=trust_pickle)
        if loaded.format == FORMAT_ONNX:
            raise MpexportError("--reference takes the PyTorch model (an ONNX file is what verify checks)",
                                stage=STAGE)
    else:
        loaded = _source_model(bundle, trust_pickle)
    example = next(data.batches(batch_size, limit=batch_size, inputs=specs))
    return VerifyInputs(data, loaded, specs, example)


def verify(directory: str | Path, *, val_data: str | Path | None = None, options: VerifyOptions | None = None,
           trust_pickle: bool = False, on_batch: Callable[[int, int | None], None] | None = None,
           write: bool = True, reference: str | Path | None = None, ray: Any = None,
           on_shard: Callable[[int, int], None] | None = None) -> ParityReport:
    """Verify a bundle (the output directory of ``convert``): check its artifacts' hashes, run every backend on
    the validation data, gate, localise, and (``write``) store ``report.json``/``report.html`` and the verdict in
    the bundle, recording which artifacts the verdict covers. ``reference``: a PyTorch model to compare with (for
    a bundle converted from ONNX, which otherwise uses its FP32 ONNX as the reference). ``ray``: a
    :class:`mpexport.cluster.RayOptions` to run the batches on a Ray cluster (``on_shard`` hears shards done) for
    the same report."""
    options = options or VerifyOptions()
    if ray is not None:
        from mpexport.cluster import verify_on_ray

        report, bundle = verify_on_ray(directory, ray, val_data=val_data, options=options, trust_pickle=trust_pickle,
                                       reference=reference, on_shard=on_shard)
    else:
        clock = StageClock()
        with clock.stage("open"):
            bundle = Bundle.open(directory, uses=(FP32_ONNX, MIXED_ONNX, PLAN, ENGINE))
        with clock.stage("load"):
            inputs = load_inputs(bundle, val_data=val_data, trust_pickle=trust_pickle, batch_size=options.batch_size,
                                 reference=reference, columns=options.columns or None)
        report = verify_forms(bundle, inputs, options, on_batch, clock=clock)
        report.timings = clock.stages
    if write:
        _write_reports(bundle, report)
    return report


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
    return finish(bundle, forms, tally, options, inputs.data.describe(), inputs.example, clock=clock)


@dataclass
class Forms:
    """The backends of one verify, built, and what judging them needs: the output names, which backends are
    gated and which a verdict requires, the strict backend's name, the plan's policy and low type."""

    backends: _Backends
    outputs: list[str]
    gated: tuple[str, ...]
    required: tuple[str, ...]
    strict: str
    policy: str
    low: str
    plan: Any
    mixed: Path
    low_memory: bool

    def tally(self, inputs: VerifyInputs) -> Tally:
        """An empty tally of these backends' outputs against the reference (the first runner)."""
        return Tally.start([runner.name for runner in self.backends.runners], self.outputs, inputs.specs,
                           watch=self.strict)


def judging_forms(bundle: Bundle, *, has_model: bool, mixed: Path | None = None, plan: Any = None) -> Forms:
    """What judging the forms of ``bundle`` needs (gated and required backends, the strict one, the plan), with no
    backend built yet: ``has_model`` says whether a PyTorch model is the reference."""
    mixed = mixed or bundle.path(MIXED_ONNX)
    plan = plan if plan is not None else (bundle.plan() if bundle.has(PLAN) else None)
    policy = plan.policy.name if plan is not None else "cuda-fp16"
    low = plan.options.low if plan is not None else "fp16"
    strict = f"strict-{low}"
    required = (ONNX_FP32, strict) if has_model else (strict,)
    return Forms(_Backends(), [spec.name for spec in bundle.manifest.outputs],
                 (ONNX_FP32, "onnx-mixed", strict, "tensorrt"), required, strict, policy, low, plan, mixed,
                 _weight_bytes(bundle) >= LOW_MEMORY_WEIGHTS)


def build_forms(bundle: Bundle, inputs: VerifyInputs, *, mixed: Path | None = None, plan: Any = None) -> Forms:
    """Build every backend of ``bundle`` (see :func:`verify_forms` for ``mixed`` and ``plan``); a backend that
    cannot be built is recorded as skipped (an allowed reason) or failed, never raised."""
    loaded, example = inputs.loaded, inputs.example
    forms = judging_forms(bundle, has_model=loaded is not None, mixed=mixed, plan=plan)
    backends, policy, low, strict, mixed_path = forms.backends, forms.policy, forms.low, forms.strict, forms.mixed
    names = [spec.name for spec in inputs.specs]
    reference = inputs.reference_runner(bundle)
    backends.runners.append(reference)
    backends.states[reference.name] = {"state": RAN, "ran": True}
    if loaded is not None:
        backends.add(AMP, lambda: TorchAmpRunner(loaded, names, policy, example))
        _add_torch_cuda(backends, loaded, names, policy, low, example)
        shared = _shared_parameters(getattr(reference, "model", None), bundle.path(FP32_ONNX))
        backends.add(ONNX_FP32, lambda: OrtRunner(bundle.path(FP32_ONNX), name=ONNX_FP32, shared_weights=shared))
    else:
        for name in (AMP, "torch-cuda"):
            backends.skip(name, "no PyTorch model (an ONNX input; verify --reference adds it)")
        backends.add(ONNX_AMP, lambda: _training_emulation(bundle, forms.plan))
    # a large model: its low-precision weights one memory-mapped copy that both sessions use in place, and freed
    # run buffers returned to the system
    low_weights = _mapped_if_readable(mixed_path) if forms.low_memory else {}
    if forms.low_memory:
        return_large_blocks()
    backends.add("onnx-mixed", lambda: OrtRunner(mixed_path, name="onnx-mixed", low_memory=forms.low_memory,
                                                 shared_weights=low_weights), skip_if=_missing_kernel)
    backends.add(strict, lambda: OrtRunner.from_model(_strict_model(mixed_path), mixed_path.parent, name=strict,
                                                      low_memory=forms.low_memory, shared_weights=low_weights))
    if mixed is not None and bundle.has(ENGINE):
        backends.skip("tensorrt", "the bundle's engine was built from the model this one replaces")
    else:
        _add_tensorrt(backends, bundle)
    if AMP in backends.states and backends.states[AMP]["state"] == RAN:
        backends.states[AMP]["mode"] = next(r for r in backends.runners if r.name == AMP).mode  # type: ignore[attr-defined]
    if ONNX_AMP in backends.states:
        backends.states[ONNX_AMP]["mode"] = f"the {policy} plan in {policy.split('-')[1].upper()}, emulated " \
            "strictly on the FP32 ONNX (no PyTorch model)"
    return forms


def _mapped_if_readable(mixed: Path) -> dict[str, np.ndarray]:
    """The mixed model's weights memory-mapped (:func:`mapped_weights`); none when they cannot be (the sessions
    then read the file themselves, and report what is wrong with it)."""
    try:
        return mapped_weights(mixed)
    except Exception:  # noqa: BLE001 - only an optimization; the backends report an unreadable model
        return {}


def finish(bundle: Bundle, forms: Forms, tally: Tally, options: VerifyOptions, data: str, example: Batch, *,
           clock: StageClock) -> ParityReport:
    """The report of a finished tally over ``data`` (its description): gated, with notes, and localised on the
    worst sample (or ``example``) when it fails."""
    if tally.samples == 0:
        raise MpexportError("the validation data gave no batches", stage=STAGE)
    report = tally.report(forms.backends.states, options, data, gated=forms.gated,
                          required=forms.required)
    strict, low = forms.strict, forms.low
    if forms.low_memory and (report.ran("onnx-mixed") or report.ran(strict)):
        report.notes.append(f"{_weight_bytes(bundle) / 2**30:.1f} GiB of FP32 weights: onnx-mixed and {strict} ran "
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


def expected_samples(data: ValidationData, options: VerifyOptions) -> int | None:
    """How many samples a verify of ``data`` covers (None when the data does not say: a ``module:function``)."""
    if not data.num_samples:
        return None
    return min(data.num_samples, options.max_samples or data.num_samples)


def verify_candidate(reference: str | Path, candidate: str | Path, val_data: str | Path, *,
                     factory: str | None = None, trust_pickle: bool = False, policy: str = "cuda-fp16",
                     low: str = "fp16", options: VerifyOptions | None = None,
                     on_batch: Callable[[int, int | None], None] | None = None) -> ParityReport:
    """Check any ONNX file against the PyTorch FP32 baseline of ``reference`` with the same backends and gate
    (``onnx-candidate`` in ONNX Runtime and its strict emulation)."""
    options = options or VerifyOptions()
    loaded = load_model(reference, factory=factory, trust_pickle=trust_pickle)
    data = load_validation_data(val_data, columns=options.columns or None)
    candidate = Path(candidate)
    try:
        graph = ir.load(str(candidate)).graph
    except Exception as exc:  # noqa: BLE001 - an unreadable candidate is bad input
        raise MpexportError(f"'{candidate}' is not a readable ONNX model: {first_line(exc)}", stage=STAGE) from None
    graph_inputs = [value.name for value in graph.inputs]
    specs = [spec for spec in data.input_specs() if spec.name in graph_inputs]
    check_against(data, specs)
    names = [spec.name for spec in specs]
    example = next(data.batches(options.batch_size, limit=options.batch_size, inputs=specs))
    backends = _Backends()
    backends.runners.append(TorchRunner(loaded.callable(), names, positional=loaded.positional))
    backends.states[REFERENCE] = {"state": RAN, "ran": True}
    backends.add(AMP, lambda: TorchAmpRunner(loaded, names, policy, example))
    backends.add("onnx-candidate", lambda: OrtRunner(candidate, name="onnx-candidate"))
    strict = f"strict-{low}"
    backends.add(strict, lambda: OrtRunner.from_model(_strict_model(candidate), candidate.parent, name=strict))
    report = _run(backends, data, specs, [value.name or "" for value in graph.outputs], options, on_batch,
                  gated=("onnx-candidate", strict), required=("onnx-candidate", strict), watch=strict)
    if not report.passed and report.ran(strict):
        batch = report.worst.batch if report.worst is not None and report.worst.batch is not None else example
        report.localisation, note = localise(None, candidate, batch, {}, low=low)
        if note:
            report.notes.append(note)
    return report


def _missing_kernel(error: str) -> str | None:
    if "NOT_IMPLEMENTED" in error:
        return f"this ONNX Runtime build has no CPU kernel for a type the model uses: {error}"
    return None


def _add_torch_cuda(backends: _Backends, loaded: LoadedModel, names: list[str], policy: str, low: str,
                    example: Batch) -> None:
    """``torch-cuda``: the model under real CUDA autocast where a GPU exists (the training numerics themselves)."""
    import torch

    if not torch.cuda.is_available():
        backends.skip("torch-cuda", "no CUDA GPU visible to torch")
    elif policy.startswith("cuda"):
        backends.skip("torch-cuda", "torch-amp already runs the model under real CUDA autocast")
    else:
        backends.add("torch-cuda", lambda: TorchAmpRunner(loaded, names, f"cuda-{low}", example, name="torch-cuda"))


def _weight_bytes(bundle: Bundle) -> int:
    """Bytes of the FP32 ONNX's external weights (0 for a model small enough to hold them inline)."""
    data = bundle.path(FP32_ONNX).with_name(bundle.path(FP32_ONNX).name + ".data")
    return data.stat().st_size if data.is_file() else 0


def _shared_parameters(model: Any, fp32_onnx: Path) -> dict[str, np.ndarray]:
    """The PyTorch model's FP32 parameters and buffers (1 MB and up) that the FP32 ONNX holds under the same name and
    shape, as arrays viewing the tensors: ONNX Runtime runs ``onnx-fp32`` on them in place instead of loading a
    second copy of the weights. Weights the exporter transformed (a folded transpose) are read from the file."""
    import onnx
    import torch

    if not isinstance(model, torch.nn.Module):
        return {}
    proto = onnx.load(str(fp32_onnx), load_external_data=False)
    wanted = {tensor.name: tuple(tensor.dims) for tensor in proto.graph.initializer
              if tensor.data_type == onnx.TensorProto.FLOAT}
    del proto
    shared = {}
    for name, tensor in model.state_dict().items():
        if name in wanted and tensor.dtype == torch.float32 and tuple(tensor.shape) == wanted[name] \
                and tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.nbytes >= 1 << 20:
            shared[name] = tensor.detach().numpy()
    return shared


def _add_tensorrt(backends: _Backends, bundle: Bundle) -> None:
    """``tensorrt``: the engine, where the bundle has one and this machine can run it."""
    if not bundle.has(ENGINE):
        backends.skip("tensorrt", bundle.manifest.skipped.get("engine", "no engine in this bundle"))
        return
    from mpexport.engine import TensorRTRunner, tensorrt_status

    status = tensorrt_status()
    if not status.available:
        backends.skip("tensorrt", f"the bundle has an engine, but it cannot run here: {status.why}")
        return
    backends.add("tensorrt", lambda: TensorRTRunner(bundle.path(ENGINE)))


def validation_data_for(bundle: Bundle, val_data: str | Path | None,
                        columns: dict[str, str] | None) -> ValidationData:
    """``val_data`` opened with ``columns`` (``--columns``), else the data convert recorded with the mapping it
    recorded; one-line errors when there is none, or for ``columns`` without ``val_data`` (it would be ignored)."""
    if val_data is not None:
        return load_validation_data(val_data, columns=columns)
    if columns:
        raise MpexportError("--columns maps the columns of --val-data; the data convert recorded is read with the "
                            "mapping convert recorded", stage=STAGE, hint="pass --val-data with --columns")
    data = bundle.recorded_validation_data()
    if data is None:
        raise MpexportError("no validation data given, and convert had none to record", stage=STAGE,
                            hint="pass --val-data PATH")
    return cast(ValidationData, data)


def source_to_load(bundle: Bundle, trust_pickle: bool) -> tuple[SourceRecord, Path] | None:
    """The source model convert recorded and where it is now, after the checks that need no loading (a record, a
    trusted pickle); None for an ONNX input (no PyTorch model). One-line errors otherwise."""
    source = bundle.manifest.source
    if source is None:
        raise MpexportError(f"'{bundle.directory}' records no source model", stage=STAGE)
    if source.format == FORMAT_ONNX:
        return None
    if source.format == "pickle" and not trust_pickle:
        raise MpexportError("the source model is a pickled module; loading it runs code from the file",
                            stage=STAGE, hint="pass --trust-pickle if you trust it")
    return source, bundle.source_path()


def check_unchanged(source: SourceRecord, path: Path, digest: str) -> None:
    """A one-line error when ``digest`` (of the model at ``path``) is not the SHA-256 convert recorded."""
    if digest != source.sha256:
        raise MpexportError(f"the source model '{path}' changed since convert (SHA-256 differs)",
                            stage=STAGE, hint="convert again")


def _source_model(bundle: Bundle, trust_pickle: bool) -> LoadedModel | None:
    found = source_to_load(bundle, trust_pickle)
    if found is None:
        return None
    source, path = found
    loaded = load_model(path, factory=source.factory, trust_pickle=trust_pickle, import_path=source.import_path,
                        task=source.task)
    check_unchanged(source, path, loaded.sha256)
    return loaded


def _training_emulation(bundle: Bundle, plan: Any) -> OrtRunner:
    """``onnx-amp``, the noise floor without PyTorch: the plan of the training policy alone (no deployment overrides,
    no range rule) in the training's low type, applied to the FP32 ONNX and emulated strictly. It stands for what
    training computed, as closely as the plan reproduces autocast (node by node, tested against real autocast)."""
    from mpexport.plan import Overrides, PlanOptions, make_plan
    from mpexport.rewrite import apply_plan

    model = ir.load(str(bundle.path(FP32_ONNX)))
    options = PlanOptions(policy=plan.policy.name, target=plan.policy.low, torch_version=plan.policy.torch_version,
                          overrides=Overrides(), range_check=False)
    training = make_plan(model, bundle.provenance(), options)
    apply_plan(model, training.precisions())
    return OrtRunner.from_model(strict_emulation(model), bundle.path(FP32_ONNX).parent, name=ONNX_AMP)


def _strict_model(mixed: Path) -> ir.Model:
    """The strict emulation of a mixed model file (in memory; its external weights stay in their file)."""
    return strict_emulation(ir.load(str(mixed)))


def _run(backends: _Backends, data: ValidationData, specs: list[TensorSpec], names: list[str],
         options: VerifyOptions, on_batch: Callable[[int, int | None], None] | None, *, gated: tuple[str, ...],
         required: tuple[str, ...], watch: str | None = None) -> ParityReport:
    """Every backend on every batch against the reference (the first runner), then the gate. For the backend
    ``watch`` the worst sample is remembered (for localisation)."""
    tally = Tally.start([runner.name for runner in backends.runners], names, specs, watch=watch)
    tally.fold(backends, data.batches(options.batch_size, limit=options.max_samples, inputs=specs),
               on_batch=on_batch, total=expected_samples(data, options))
    if tally.samples == 0:
        raise MpexportError("the validation data gave no batches", stage=STAGE)
    return tally.report(backends.states, options, data.describe(), gated=gated, required=required)


@dataclass
class Tally:
    """What verify folds in per batch: each backend's comparison with the reference, the reference's accuracy,
    the watched backend's worst sample and per-sample statistics, counts, run times and mid-run failures.
    Tallies over disjoint runs of batches (folded with their global batch indices) join exactly with
    :meth:`merge`, in batch order: a verify split across machines reports what one pass would."""

    reference: str
    comparisons: dict[str, Comparison]
    reference_accuracy: OutputMetrics
    worst: _WorstSample
    watch: str | None
    per_sample: dict[str, SampleStats] = field(default_factory=dict)
    samples: int = 0
    batches: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    """Backends that raised while running: name -> why."""
    offset: int = 0
    """Samples in the batches before this tally's first (a shard of the data): sample indices are global."""

    @staticmethod
    def start(runners: list[str], outputs: list[str], specs: list[TensorSpec], *, watch: str | None) -> Tally:
        """An empty tally of ``runners[1:]`` against ``runners[0]`` on the named outputs."""
        reference, others = runners[0], runners[1:]
        return Tally(reference, {name: Comparison.of(reference, name, outputs) for name in others},
                     OutputMetrics("reference"),
                     _WorstSample(fixed_batch=any(spec.shape and isinstance(spec.shape[0], int) for spec in specs)),
                     watch, seconds=dict.fromkeys(runners, 0.0))

    def fold(self, backends: _Backends, batches: Iterable[Batch], *, first: int = 0,
             on_batch: Callable[[int, int | None], None] | None = None, total: int | None = None) -> None:
        """Run every backend that is still running on each batch (``first``: the global index of the first one)
        and fold the outputs in; a backend that raises is marked failed and runs no more."""
        timed = [_Timed(runner) for runner in backends.runners]
        reference, others = timed[0], timed[1:]
        outputs = [metrics.name for metrics in next(iter(self.comparisons.values())).outputs] \
            if self.comparisons else []
        try:
            for index, batch in enumerate(batches, start=first):
                self._fold_batch(index, batch, reference, others, backends, outputs)
                if on_batch:
                    on_batch(self.samples, total)
        finally:
            for runner in timed:
                self.seconds[runner.name] = self.seconds.get(runner.name, 0.0) + runner.seconds

    def _fold_batch(self, index: int, batch: Batch, reference: _Timed, others: list[_Timed], backends: _Backends,
                    outputs: list[str]) -> None:
        expected = reference.run(batch)
        labels = batch.get(LABELS)
        count = batch_samples(batch)
        if labels is not None:
            self.reference_accuracy.update(expected[0], expected[0], labels, batch=index)
        for runner in [runner for runner in others if backends.states[runner.name]["state"] == RAN]:
            try:
                actual = runner.run(batch)
            except Exception as exc:  # noqa: BLE001 - a backend that breaks mid-run fails, it is not skipped
                why = f"failed while running: {first_line(exc, 300)}"
                backends.states[runner.name] = {"state": FAILED, "ran": False, "why": why}
                self.failed.setdefault(runner.name, why)
                continue
            self.comparisons[runner.name].fold(expected, actual, samples=count, labels=labels, batch=index)
            if runner.name == self.watch:
                self.worst.consider(batch, expected, actual, self.offset + self.samples)
                for name, want, have in zip(outputs, expected, actual, strict=False):
                    if np.shape(want) == np.shape(have) and np.ndim(want) and len(want) == count:
                        self.per_sample.setdefault(name, SampleStats()).add(np.asarray(want), np.asarray(have))
        self.samples += count
        self.batches += 1

    def merge(self, other: Tally) -> None:
        """Fold in ``other``, a tally of the batches right after this one's: the result equals one pass."""
        for name, comparison in other.comparisons.items():
            self.comparisons[name].merge(comparison)
        self.reference_accuracy.merge(other.reference_accuracy)
        self.worst.merge(other.worst)
        for name, stats in other.per_sample.items():
            self.per_sample.setdefault(name, SampleStats()).extend(stats)
        self.samples += other.samples
        self.batches += other.batches
        for name, seconds in other.seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.failed = {**other.failed, **self.failed}

    def report(self, states: dict[str, dict[str, Any]], options: VerifyOptions, data: str, *,
               gated: tuple[str, ...], required: tuple[str, ...]) -> ParityReport:
        """Gate the tally: thresholds, failures (backends that failed while running, required ones that did not
        run, outputs beyond budget) and the verdict. ``states``: each backend's state when it was built."""
        states = {name: dict(state) for name, state in states.items()}
        for name, why in self.failed.items():
            states[name] = {"state": FAILED, "ran": False, "why": why}
        metrics = {name: comparison.by_name() for name, comparison in self.comparisons.items()
                   if states[name]["state"] == RAN}
        thresholds, failures = gate(metrics, options)
        failures = _mismatches(self.comparisons, states) + _unchecked(states, gated, required) + failures
        for name, seconds in self.seconds.items():
            states[name]["seconds"] = round(seconds, 3)
        if self.reference_accuracy.accuracy is not None:
            states[self.reference]["accuracy"] = self.reference_accuracy.accuracy
        return ParityReport("pass" if not failures else "fail", states, metrics, thresholds, failures,
                            samples=self.samples, data=data, batches=self.batches, options=asdict(options),
                            worst=self.worst if self.worst.batch is not None else None, per_sample=self.per_sample,
                            reference=self.reference)


@dataclass
class SampleStats:
    """One output's per-sample statistics against the reference, in sample order."""

    nonfinite: list[int] = field(default_factory=list)
    max_abs: list[float] = field(default_factory=list)
    cosine: list[float] = field(default_factory=list)
    top1_match: list[bool] = field(default_factory=list)

    def add(self, want: np.ndarray, have: np.ndarray) -> None:
        """Fold one batch in (first axis the samples; a large output in slices of samples, so the float64
        temporaries stay small)."""
        for part in _row_slices(want):
            self._add(want[part], have[part])
        if want.ndim == 2 and want.shape[1] > 1:
            self.top1_match += (want.argmax(axis=1) == have.argmax(axis=1)).tolist()

    def _add(self, want: np.ndarray, have: np.ndarray) -> None:
        count = len(want)
        want64, have64 = want.astype(np.float64).reshape(count, -1), have.astype(np.float64).reshape(count, -1)
        finite = np.isfinite(want64)
        usable = finite & np.isfinite(have64)
        self.nonfinite += (finite & ~np.isfinite(have64)).sum(axis=1).tolist()
        self.max_abs += np.abs(np.where(usable, want64 - have64, 0)).max(axis=1, initial=0.0).tolist()
        a, b = np.where(finite, want64, 0), np.where(np.isfinite(have64), have64, 0)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        self.cosine += np.where(norms > 0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1), 1.0).tolist()

    def failing(self, limits: dict[str, Any]) -> list[int]:
        """Samples that break ``limits`` (a gate's thresholds for this output) by themselves."""
        found = [index for index, (broken, error, cosine) in enumerate(zip(self.nonfinite, self.max_abs, self.cosine,
                                                                          strict=True))
                 if broken or error > limits["atol"] or cosine < limits.get("min_cosine", -1.0)]
        if "min_top1_agreement" in limits:
            found += [index for index, match in enumerate(self.top1_match) if not match]
        return found

    def extend(self, other: SampleStats) -> None:
        """Append the statistics of the samples right after these."""
        self.nonfinite += other.nonfinite
        self.max_abs += other.max_abs
        self.cosine += other.cosine
        self.top1_match += other.top1_match


@dataclass
class _WorstSample:
    """The sample whose outputs a backend got most wrong so far: the most non-finite values where the reference
    is finite, then the largest error relative to the reference's magnitude. Localisation runs on it (on its
    whole batch for a model with a fixed batch size)."""

    fixed_batch: bool
    batch: Batch | None = None
    index: int | None = None
    score: tuple[int, float] = (-1, -1.0)

    def consider(self, batch: Batch, expected: list[np.ndarray], actual: list[np.ndarray], first: int) -> None:
        """Fold one batch's outputs in; ``first`` is the global index of its first sample."""
        count = batch_samples(batch)
        broken = np.zeros(count, np.int64)
        error = np.zeros(count)
        for want, have in zip(expected, actual, strict=False):
            want, have = np.asarray(want), np.asarray(have)
            if want.shape != have.shape or want.ndim == 0 or len(want) != count:
                continue
            parts = _row_slices(want)
            scale = max(_finite_max(want[part]) for part in parts) or 1.0
            for part in parts:
                want32, have32 = want[part].astype(np.float32), have[part].astype(np.float32)
                rows = len(want32)
                finite = np.isfinite(want32)
                usable = finite & np.isfinite(have32)
                broken[part] += (finite & ~np.isfinite(have32)).reshape(rows, -1).sum(axis=1)
                worst = np.abs(np.where(usable, want32 - have32, 0)).reshape(rows, -1).max(axis=1) / scale
                error[part] = np.maximum(error[part], worst)
        top = broken == broken.max()
        position = int(np.flatnonzero(top & (error == error[top].max()))[0])  # ties: the first, as across batches
        score = (int(broken[position]), float(error[position]))
        if score > self.score:
            self.score, self.index = score, first + position
            self.batch = {name: np.array(array) if self.fixed_batch else np.array(array[position:position + 1])
                          for name, array in batch.items()}

    def merge(self, other: _WorstSample) -> None:
        """Take ``other``'s sample if it is worse (``other`` covers later samples: a tie keeps the earlier one)."""
        if other.batch is not None and other.score > self.score:
            self.score, self.index, self.batch = other.score, other.index, other.batch

    def to_json(self) -> dict[str, Any]:
        """Which sample localisation ran on, and why."""
        return {"sample": self.index, "nonfinite": self.score[0], "relative_error": float(f"{self.score[1]:.3g}"),
                "whole_batch": self.fixed_batch}


def _row_slices(array: np.ndarray) -> list[slice]:
    """Slices of the first axis of about :data:`mpexport.metrics.CHUNK_ELEMENTS` elements each (at least a row)."""
    rows = max(1, CHUNK_ELEMENTS // max(1, array[0].size))
    return [slice(start, start + rows) for start in range(0, len(array), rows)]


def _finite_max(array: np.ndarray) -> float:
    """The largest finite |value| (0 when there is none)."""
    magnitude = np.abs(array.astype(np.float32))
    return float(magnitude[np.isfinite(magnitude)].max(initial=0.0))


def _mismatches(comparisons: dict[str, Comparison], states: dict[str, dict[str, Any]]) -> list[str]:
    return [f"{name}: output '{output}' {why}" for name, comparison in comparisons.items()
            if states[name]["state"] == RAN for output, why in comparison.mismatches.items()]


def _unchecked(states: dict[str, dict[str, Any]], gated: tuple[str, ...], required: tuple[str, ...]) -> list[str]:
    """Failures for gated backends that failed, and for required ones that did not run."""
    found = []
    for name in gated:
        state = states.get(name)
        if state is None:
            continue
        if state["state"] == FAILED:
            found.append(f"{name}: {state['why']}")
        elif name in required and state["state"] != RAN:
            found.append(f"{name}: did not run ({state.get('why', 'no reason')}); a verdict needs it")
    return found


class _Timed:
    """A runner wrapper that accumulates its run time."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.name = runner.name
        self.seconds = 0.0

    def run(self, batch: Batch) -> list[np.ndarray]:
        start = time.perf_counter()
        try:
            return self.runner.run(batch)
        finally:
            self.seconds += time.perf_counter() - start


def gate(metrics: dict[str, dict[str, OutputMetrics]], options: VerifyOptions) -> tuple[dict, list[str]]:
    """Thresholds per gated backend and output, and the failures (one line each, with the numbers)."""
    thresholds: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    noise = next((name for name in NOISE_FLOORS if name in metrics), AMP)
    amp = metrics.get(noise, {})
    for backend, outputs in metrics.items():
        if backend in NOISE_FLOORS:
            continue
        for name, m in outputs.items():
            limits = _limits(backend, m, amp.get(name), options, noise)
            thresholds.setdefault(backend, {})[name] = limits
            if m.nonfinite:
                failures.append(f"{backend}: output '{name}' has {m.nonfinite} non-finite values where FP32 is finite")
            if m.max_abs > limits["atol"]:
                failures.append(f"{backend}: output '{name}' max abs error {m.max_abs:.3g} > {limits['atol']:.3g} "
                                f"({limits['source']})")
            if "min_cosine" in limits and m.min_cosine < limits["min_cosine"]:
                failures.append(f"{backend}: output '{name}' min cosine {m.min_cosine:.6f} < "
                                f"{limits['min_cosine']:.6f} ({limits['source']})")
            if "min_top1_agreement" in limits and m.top1_agreement is not None and \
                    m.top1_agreement < limits["min_top1_agreement"]:
                failures.append(f"{backend}: output '{name}' top-1 agreement {m.top1_agreement:.4f} < "
                                f"{limits['min_top1_agreement']:.4f} ({limits['source']})")
    return thresholds, failures


def _limits(backend: str, m: OutputMetrics, amp: OutputMetrics | None, options: VerifyOptions,
            noise: str = AMP) -> dict[str, Any]:
    scale = max(m.scale, 1e-12)
    if backend == ONNX_FP32:
        return {"atol": FP32_RTOL * scale, "source": f"FP32 export: {FP32_RTOL:g} of the output scale {scale:.3g}"}
    factor = options.budget_factor
    floor = ABS_FLOOR * scale
    if amp is not None:
        limits: dict[str, Any] = {
            "atol": max(factor * amp.max_abs, floor),
            "min_cosine": 1 - max(factor * (1 - amp.min_cosine), COSINE_FLOOR),
            "source": f"{factor:g} x the {noise} noise floor",
        }
        if amp.top1_agreement is not None:
            limits["min_top1_agreement"] = 1 - max(factor * (1 - amp.top1_agreement), TOP1_FLOOR)
    else:
        limits = {"atol": 1e-2 * scale, "min_cosine": 0.999, "source": "fixed budget (no torch-amp noise floor)"}
        if m.classifier:
            limits["min_top1_agreement"] = 1 - TOP1_FLOOR
    if options.atol is not None:
        limits["atol"] = options.atol
    if options.min_cosine is not None:
        limits["min_cosine"] = options.min_cosine
    if options.max_top1_drop is not None and m.classifier:
        limits["min_top1_agreement"] = 1 - options.max_top1_drop
    if options.atol is not None or options.min_cosine is not None or options.max_top1_drop is not None:
        limits["source"] += ", explicit thresholds override"
    return limits


# -- localisation --------------------------------------------------------------------------------------------
def localise(fp32_path: Path | None, mixed_path: Path | ir.Model, batch: Batch, plan_nodes: dict[str, dict[str, Any]],
             *, low: str = "fp16", limit: int = 5, base_dir: Path | None = None
             ) -> tuple[list[dict[str, Any]], str | None]:
    """The first nodes (graph order) of the strict emulation of ``mixed_path`` (a file, or an in-memory model whose
    external weights lie in ``base_dir``) whose output leaves budget
    against FP32 (``fp32_path``, or the emulation with its rounding undone): a non-finite value where FP32 is
    finite, or an error beyond 5% of the FP32 tensor's scale. Compared on one batch, by value name (the
    emulation keeps the FP32 model's names for rounded values). Returns the rows and, when nothing could be
    named, why. Each row names the node, its op, module, planned precision and plan reason, and what was observed
    (e.g. ``output reached 1.1e+05 > 65504, the FP16 max``)."""
    try:
        if isinstance(mixed_path, Path):
            strict_model, base = _strict_model(mixed_path), mixed_path.parent
        else:  # an in-memory mixed model (a repair trial), changed in place; its weights are read from base_dir
            strict_model, base = strict_emulation(mixed_path), base_dir or Path(".")
        strict = _all_values(strict_model, base, batch)
        if fp32_path is not None:
            fp32 = _all_values(ir.load(str(fp32_path)), fp32_path.parent, batch)
        elif isinstance(mixed_path, Path):
            fp32 = _all_values(_without_rounding(_strict_model(mixed_path)), mixed_path.parent, batch)
        else:
            raise ValueError("an in-memory model needs the FP32 model to compare with")
    except Exception as exc:  # noqa: BLE001 - the verdict stands; localisation says why it could not help
        return [], f"localisation could not run: {first_line(exc, 200)}"
    by_name = {node.name: node for node in strict_model.graph}
    found: list[dict[str, Any]] = []
    for node in strict_model.graph:
        origin = (node.name or "").split("__")[0]
        if any(row["node"] == origin for row in found) or added_role(by_name.get(origin, node)) == "cast":
            continue  # a cast the writer added carries its producer's values: the producer is the finding
        for output in node.outputs:
            name = output.name
            if name not in strict or name not in fp32 or strict[name].shape != fp32[name].shape:
                continue
            broken, error, scale = _compare(fp32[name], strict[name])
            if broken or error > LOCALISE_RTOL:
                found.append(_located(origin, by_name.get(origin, node), plan_nodes.get(origin, {}), name,
                                      broken, error, scale, low))
                break
        if len(found) >= limit:
            break
    note = None if found else "localisation found no single node out of budget on the worst sample (the error " \
        "builds up below the per-node threshold of 5% of each tensor's scale)"
    return found, note


def _compare(want: np.ndarray, have: np.ndarray) -> tuple[int, float, float]:
    """Non-finite count where FP32 is finite, max error relative to FP32's scale, and that scale."""
    want, have = want.astype(np.float64), have.astype(np.float64)
    finite = np.isfinite(want)
    usable = finite & np.isfinite(have)
    broken = int((finite & ~np.isfinite(have)).sum())
    scale = float(np.abs(np.where(finite, want, 0)).max(initial=0.0)) or 1.0
    error = float(np.abs(np.where(usable, want, 0) - np.where(usable, have, 0)).max(initial=0.0)) / scale
    return broken, error, scale


def _located(origin: str, node: ir.Node, info: dict[str, Any], value: str, broken: int, error: float,
             scale: float, low: str) -> dict[str, Any]:
    from mpexport.provenance import NAME_SCOPES, _parse_list

    scopes = _parse_list(node.metadata_props.get(NAME_SCOPES))
    module = info.get("module", scopes[-2] if len(scopes) >= 2 else None)
    return {"node": origin, "op_type": info.get("op_type", node.op_type), "module": module,
            "precision": info.get("precision"), "reason": info.get("reason"), "value": value,
            "observed": _observed(broken, error, scale, low), "nonfinite": broken,
            "relative_error": float(f"{error:.3g}"), "fp32_max_abs": float(f"{scale:.4g}")}


def _observed(broken: int, error: float, scale: float, low: str) -> str:
    """What left budget, in words: the FP32 value beyond the low type's range, the non-finite values, or the error."""
    limit = TYPE_MAX.get(low)
    if limit is not None and scale > limit:
        return f"output reached {scale:.3g} > {limit:.6g}, the {low.upper()} max"
    if broken:
        return f"{broken} values became non-finite in {low.upper()} (FP32 reaches {scale:.3g})"
    return f"error {error:.1%} of the output's scale {scale:.3g}"


def _all_values(model: ir.Model, base_dir: Path, batch: Batch) -> dict[str, np.ndarray]:
    """Every floating-point intermediate of ``model`` on ``batch``, by value name."""
    from mpexport.ranges import intermediates_session

    session, names = intermediates_session(model, base_dir)
    feeds = {value.name: batch[value.name].astype(np.float32) if batch[value.name].dtype.kind == "f"
             else batch[value.name] for value in session.get_inputs()}
    return dict(zip(names, session.run(names, feeds), strict=True))


def _without_rounding(strict: ir.Model) -> ir.Model:
    """For a candidate without an FP32 ONNX: its strict emulation with every rounding to the low type (outputs and
    the pessimistic sums) made an identity."""
    for node in list(strict.graph):
        if added_role(node) == ROUNDING:
            node.attributes["to"] = ir.AttrInt64("to", ir.DataType.FLOAT)
            node.outputs[0].dtype = ir.DataType.FLOAT
    return strict


# -- reports -------------------------------------------------------------------------------------------------
def _write_reports(bundle: Bundle, report: ParityReport) -> None:
    """The reports and the verdict land in one commit; the verdict covers the artifacts the backends that ran
    used (the engine only when the tensorrt backend ran)."""
    from mpexport.report_html import render_html

    covered = [FP32_ONNX, MIXED_ONNX, PLAN] + ([ENGINE] if report.ran("tensorrt") else [])
    with bundle.transaction("verify") as transaction:
        transaction.write_text(REPORT, FILE_NAMES[REPORT], json.dumps(report.to_json(), indent=2) + "\n")
        transaction.write_text(REPORT_HTML, FILE_NAMES[REPORT_HTML], render_html(report))
        bundle.manifest.verify = VerifyRecord(report.verdict, report.samples, report.data, report.failures[:10],
                                              {name: {key: value for key, value in state.items() if key != "ran"}
                                               for name, state in report.backends.items()},
                                              bundle.digests(*covered))
        bundle.manifest.timings["verify"] = report.timings

