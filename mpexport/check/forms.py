"""The forms one verify runs: the inputs (data, source model), the backends built for a bundle, and what judging
them needs (gated and required backends, the strict one, the plan)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mpexport.backends.base import Runner
from mpexport.backends.onnxruntime import OrtRunner, return_large_blocks
from mpexport.backends.torch import TorchRunner
from mpexport.base.errors import MpexportError
from mpexport.base.files import sha256_file
from mpexport.base.policies import DEFAULT_POLICY
from mpexport.base.specs import Batch, TensorSpec
from mpexport.base.status import RAN
from mpexport.bundle.names import FP32_ONNX, MIXED_ONNX, PLAN
from mpexport.bundle.records import SourceRecord
from mpexport.bundle.store import Bundle
from mpexport.check.backends import ONNX_FP32, Backends
from mpexport.check.registry import (
    ALLOWED_SKIPS,
    BACKENDS,
    NO_MODEL,
    Backend,
    Build,
    gated,
    mapped_if_readable,
    required,
)
from mpexport.check.report import STAGE, VerifyOptions
from mpexport.check.tally import Tally
from mpexport.data.base import ValidationData, check_against
from mpexport.data.open import load_validation_data
from mpexport.precision.plan import read_plan
from mpexport.sources.hf import directory_digest
from mpexport.sources.inputs import recorded_validation_data
from mpexport.sources.loading import load_model
from mpexport.sources.model import FORMAT_ONNX, LoadedModel

LOW_MEMORY_WEIGHTS = 1 << 30
"""FP32 weight bytes from which the low-precision sessions trade speed for memory
(:func:`mpexport.backends.onnxruntime.session_options`)."""


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
                columns: dict[str, str] | None = None, factory: str | None = None,
                import_path: str | Path | None = None) -> VerifyInputs:
    """The validation data (``val_data``, else what convert recorded) checked against the model's inputs, and the
    source model (its SHA-256 checked against convert's), or ``reference`` (a PyTorch model file, e.g. the one an
    ONNX input was exported from); for an ONNX input without ``reference`` there is no PyTorch model. One-line
    errors otherwise. ``columns`` maps the columns of a table given as ``val_data``. Code runs only as the caller
    says: ``factory`` builds a checkpoint's model (the one convert recorded is not used on its own, see
    :func:`source_to_load`; imported from ``import_path``, default the working directory), ``trust_pickle`` allows
    a pickled module."""
    data = validation_data_for(bundle, val_data, columns)
    specs = bundle.manifest.inputs
    check_against(data, specs)
    loaded: LoadedModel | None
    if reference is not None:
        loaded = load_model(reference, factory=factory, trust_pickle=trust_pickle, import_path=import_path)
        if loaded.format == FORMAT_ONNX:
            raise MpexportError("--reference takes the PyTorch model (an ONNX file is what verify checks)",
                                stage=STAGE)
    else:
        loaded = _source_model(bundle, trust_pickle, factory, import_path)
    size = data.run_batch(specs) or batch_size
    example = next(data.batches(size, limit=size, inputs=specs))
    return VerifyInputs(data, loaded, specs, example)


def model_batch_size(options: VerifyOptions, specs: list[TensorSpec],
                     data: ValidationData) -> tuple[VerifyOptions, str | None]:
    """``options`` with the batch size the model takes: where its inputs fix the batch size
    (:func:`mpexport.base.specs.fixed_batch`, e.g. a model exported with batch 1) that size, whatever
    ``options.batch_size`` says, and a note saying so when they differ; otherwise ``options`` as they are. The batch
    size only groups samples (every metric is per sample, a short last batch is padded and counts its real samples
    only), so running the size the model takes changes no verdict, where refusing would fail every fixed-batch
    model verified with one command line for many. Where an input without a batch axis holds a value per sample,
    every run takes one sample (``data.one_sample_runs``) and the note says so."""
    fixed = data.run_batch(specs)
    if fixed is None or fixed == options.batch_size:
        return options, None
    if data.one_sample_runs:
        return replace(options, batch_size=1), f"{data.one_sample_runs} (not --batch-size {options.batch_size})"
    note = (f"the model fixes its batch size at {fixed}: verified in batches of {fixed} (not --batch-size "
            f"{options.batch_size}); a short last batch is padded with repeats of its samples, counted once")
    return replace(options, batch_size=fixed), note


@dataclass
class Forms:
    """The backends of one verify, built, and what judging them needs: the output names, which backends are
    gated and which a verdict requires, the strict backend's name, the plan's policy and low type."""

    backends: Backends
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
        return Tally.start([runner.name for runner in self.backends.runners], self.outputs,
                           whole_batches=inputs.data.whole_batches(inputs.specs),
                           watch=self.strict)


def judging_forms(bundle: Bundle, *, has_model: bool, mixed: Path | None = None, plan: Any = None) -> Forms:
    """What judging the forms of ``bundle`` needs (gated and required backends, the strict one, the plan), with no
    backend built yet: ``has_model`` says whether a PyTorch model is the reference."""
    mixed = mixed or bundle.path(MIXED_ONNX)
    plan = plan if plan is not None else (read_plan(bundle) if bundle.has(PLAN) else None)
    policy = plan.policy.name if plan is not None else DEFAULT_POLICY
    low = plan.options.low if plan is not None else "fp16"
    return Forms(Backends(ALLOWED_SKIPS), [spec.name for spec in bundle.manifest.outputs], gated(low),
                 required(low, has_model=has_model), f"strict-{low}", policy, low, plan, mixed,
                 weight_bytes(bundle) >= LOW_MEMORY_WEIGHTS)


def build_forms(bundle: Bundle, inputs: VerifyInputs, *, mixed: Path | None = None, plan: Any = None) -> Forms:
    """Build the reference and every registered backend (:data:`mpexport.check.registry.BACKENDS`) for ``bundle``
    (see :func:`mpexport.check.verify.verify_forms` for ``mixed`` and ``plan``); a backend that cannot be built is
    recorded as skipped (a reason its entry allows) or failed, never raised."""
    forms = judging_forms(bundle, has_model=inputs.loaded is not None, mixed=mixed, plan=plan)
    reference = inputs.reference_runner(bundle)
    forms.backends.reference(reference)
    # a large model: its low-precision weights one memory-mapped copy that both sessions use in place, and freed
    # run buffers returned to the system
    low_weights = mapped_if_readable(forms.mixed) if forms.low_memory else {}
    if forms.low_memory:
        return_large_blocks()
    build = Build(bundle, inputs.loaded, [spec.name for spec in inputs.specs], inputs.example, forms.policy,
                  forms.low, forms.plan, forms.mixed, mixed is not None, forms.low_memory, reference, low_weights)
    for entry in BACKENDS:
        _add(forms.backends, entry, build)
    return forms


def _add(backends: Backends, entry: Backend, build: Build) -> None:
    """Build one registered backend into ``backends``, or record why it did not run."""
    name = entry.named(build.low)
    if entry.model is not None and entry.model != (build.loaded is not None):
        if entry.model and entry.may_skip:
            backends.skip(name, NO_MODEL)
        return  # onnx-fp32 without a PyTorch model is the reference; onnx-amp with one is not needed
    backends.add(name, lambda: entry.build(build), skip_if=entry.skip_on_error)
    state = backends.states[name]
    runner = next((runner for runner in backends.runners if runner.name == name), None)
    mode = getattr(runner, "mode", None) or (entry.mode(build) if entry.mode and runner is not None else None)
    if state["state"] == RAN and mode:
        state["mode"] = mode


def weight_bytes(bundle: Bundle) -> int:
    """Bytes of the FP32 ONNX's external weights (0 for a model small enough to hold them inline)."""
    data = bundle.path(FP32_ONNX).with_name(bundle.path(FP32_ONNX).name + ".data")
    return data.stat().st_size if data.is_file() else 0


def validation_data_for(bundle: Bundle, val_data: str | Path | None,
                        columns: dict[str, str] | None) -> ValidationData:
    """``val_data`` opened with ``columns`` (``--columns``), else the data convert recorded with the mapping it
    recorded; one-line errors when there is none, or for ``columns`` without ``val_data`` (it would be ignored)."""
    if val_data is not None:
        return load_validation_data(val_data, columns=columns)
    if columns:
        raise MpexportError("--columns maps the columns of --val-data; the data convert recorded is read with the "
                            "mapping convert recorded", stage=STAGE, hint="pass --val-data with --columns")
    data = recorded_validation_data(bundle)
    if data is None:
        raise MpexportError("no validation data given, and convert had none to record", stage=STAGE,
                            hint="pass --val-data PATH")
    return data


def source_to_load(bundle: Bundle, trust_pickle: bool, factory: str | None = None) -> tuple[SourceRecord, Path] | None:
    """The source model convert recorded and where it is now, after the checks that need no loading (a record, a
    trusted pickle, a factory named by the caller where convert used one: the manifest's record of it is never run
    on its own); None for an ONNX input (no PyTorch model). One-line errors otherwise."""
    source = bundle.manifest.source
    if source is None:
        raise MpexportError(f"'{bundle.directory}' records no source model", stage=STAGE)
    if source.format == FORMAT_ONNX:
        return None
    if source.format == "pickle" and not trust_pickle:
        raise MpexportError("the source model is a pickled module; loading it runs code from the file",
                            stage=STAGE, hint="pass --trust-pickle if you trust it")
    if source.factory and not factory:
        raise MpexportError(f"the source model is a checkpoint built by code (convert ran --factory {source.factory}); "
                            "mpexport runs code only when the command line names it", stage=STAGE,
                            hint=f"pass --factory {source.factory}")
    return source, bundle.source_path()


def check_unchanged(source: SourceRecord, path: Path, digest: str | None = None) -> None:
    """A one-line error when ``digest`` (of the model at ``path``; computed from the file or directory when None)
    is not the SHA-256 convert recorded."""
    if digest is None:
        digest = directory_digest(path) if path.is_dir() else sha256_file(path)
    if digest != source.sha256:
        raise MpexportError(f"the source model '{path}' changed since convert (SHA-256 differs)",
                            stage=STAGE, hint="convert again")


def _source_model(bundle: Bundle, trust_pickle: bool, factory: str | None,
                  import_path: str | Path | None) -> LoadedModel | None:
    found = source_to_load(bundle, trust_pickle, factory)
    if found is None:
        return None
    source, path = found
    # before it is read: a manifest pointing at another file must not get that file loaded (with --trust-pickle, run)
    check_unchanged(source, path)
    loaded = load_model(path, factory=factory if source.factory else None, trust_pickle=trust_pickle,
                        import_path=import_path, task=source.task)
    check_unchanged(source, path, loaded.sha256)
    return loaded
