"""The output directory as one typed record: a :class:`Bundle` and its :class:`Manifest`.

``convert`` creates a bundle; ``inspect``, ``verify``, ``build``, ``package`` (and ``repair``) open one. This
module is the only code that reads or writes ``manifest.json``, and it treats the directory like a database file:

* **typed**: every manifest section is a dataclass; the plan is read back as a :class:`PrecisionPlan`;
* **checked on open**: the SHA-256 of every artifact a command will use is compared with the manifest, so a
  modified or missing file is a one-line error naming it (exit 2), never silently used;
* **atomic commits**: new artifacts are written into a temporary directory inside the bundle and moved into
  place, then ``manifest.json`` is replaced in one rename, under an exclusive lock, and only if no other command
  committed since this one opened the bundle (a revision counter); a failed or killed command changes nothing
  (its temporary directory is removed, or swept by the next command that opens the bundle);
* **verdicts cannot go stale silently**: the export check, lint, the engine check and verify each record the
  digests of the artifacts they covered; replacing an artifact marks every verdict that covered it stale, and a
  verdict counts only while everything it covered is unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from mpexport.errors import MpexportError
from mpexport.specs import TensorSpec

STAGE = "bundle"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
TEMP_PREFIX = ".mpexport-tmp-"
VERSIONED_PACKAGES = ("mpexport", "torch", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy")

FP32_ONNX, PROVENANCE, RANGES, PLAN = "fp32_onnx", "provenance", "ranges", "plan"
MIXED_ONNX, ENGINE, REPORT, REPORT_HTML, REPAIR = "mixed_onnx", "engine", "report", "report_html", "repair"
REPAIR_POLICY = "repair_policy"
FILE_NAMES = {FP32_ONNX: "model.fp32.onnx", PROVENANCE: "provenance.json", RANGES: "ranges.json", PLAN: "plan.json",
              MIXED_ONNX: "model.mixed.onnx", ENGINE: "model.plan", REPORT: "report.json", REPORT_HTML: "report.html",
              REPAIR: "repair.json", REPAIR_POLICY: "repair.policy.toml"}
"""Artifact key -> the file name mpexport writes it under."""
DESCRIPTIONS = {FP32_ONNX: "FP32 ONNX model", PROVENANCE: "provenance record", RANGES: "calibration statistics",
                PLAN: "precision plan", MIXED_ONNX: "mixed-precision model", ENGINE: "TensorRT engine",
                REPORT: "parity report", REPORT_HTML: "HTML parity report", REPAIR: "repair record",
                REPAIR_POLICY: "repair policy file"}
VERDICTS = ("export_check", "lint", "engine", "verify")
"""Manifest sections that certify artifacts (each records what it covered)."""


# -- records -------------------------------------------------------------------------------------------------
@dataclass
class Artifact:
    """One artifact: its main file and every file it consists of (external data, companions) with SHA-256."""

    file: str
    sha256: dict[str, str]
    written_by: str
    revision: int = 0

    @property
    def digest(self) -> str:
        """One hash over all the artifact's files: what a verdict records as covered."""
        text = "\n".join(f"{name}:{digest}" for name, digest in sorted(self.sha256.items()))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class SourceRecord:
    """The model file convert started from: absolute path (and relative to the bundle, for moved trees),
    format, SHA-256, the factory that builds it and where to import it from, its training record."""

    path: str
    format: str
    sha256: str
    relative_path: str | None = None
    factory: str | None = None
    import_path: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    task: str | None = None


@dataclass
class ValidationRecord:
    """The validation data convert checked the export on: a path (absolute, and relative to the bundle) or
    ``module:function`` with the directory it imports from."""

    source: str
    kind: str
    relative_path: str | None = None
    import_path: str | None = None
    samples: int | None = None
    columns: dict[str, str] = field(default_factory=dict)
    """Input (or ``labels``) -> column, for tables whose columns are named otherwise (``--columns``)."""


@dataclass
class ExportRecord:
    """How the FP32 ONNX was made: the strategy that worked, every attempt, seconds, opset, external data,
    the kind of provenance, and how many nodes were given unique names."""

    strategy: str
    attempts: list[dict[str, Any]]
    seconds: float
    opset: int | None
    external_data: bool
    provenance: str
    renamed_nodes: int = 0


@dataclass
class ExportCheckRecord:
    """ONNX Runtime against PyTorch FP32 (the comparison as :class:`mpexport.parity.Comparison` writes it)."""

    passed: bool
    comparison: dict[str, Any]
    data: str
    covers: dict[str, str] = field(default_factory=dict)
    stale: str | None = None


@dataclass
class PlanRecord:
    """The plan's policy, target, where the policy came from, notes and summary."""

    policy: str
    target: str
    policy_source: str
    notes: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class LintRecord:
    """Lint of the mixed model against the plan."""

    ok: bool
    checks: list[dict[str, Any]]
    model: str
    covers: dict[str, str] = field(default_factory=dict)
    stale: str | None = None


@dataclass
class EngineRecord:
    """The TensorRT engine: versions, GPU, profiles and flags (``details``), and its check against the plan."""

    tensorrt: str
    compute_capability: str | None
    check: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)
    covers: dict[str, str] = field(default_factory=dict)
    stale: str | None = None

    @staticmethod
    def from_build(metadata: dict[str, Any], covers: dict[str, str]) -> EngineRecord:
        """The record of a build from :func:`mpexport.engine.build_engine`'s metadata."""
        details = dict(metadata)
        return EngineRecord(str(details.pop("tensorrt", "")), details.pop("compute_capability", None),
                            details.pop("check", {}), details, covers)


@dataclass
class VerifyRecord:
    """The last verify: verdict, samples, data, failures, each deployable form's state, what it covered."""

    verdict: str
    samples: int
    data: str
    failures: list[str] = field(default_factory=list)
    forms: dict[str, dict[str, Any]] = field(default_factory=dict)
    covers: dict[str, str] = field(default_factory=dict)
    stale: str | None = None


@dataclass
class StageTiming:
    """Seconds and peak resident memory of one stage of a command."""

    stage: str
    seconds: float
    peak_rss_mb: float | None = None


@dataclass
class Event:
    """One commit: the revision it made, the command, when, and the keys of the artifacts it wrote."""

    revision: int
    command: str
    at: str
    artifacts: list[str] = field(default_factory=list)


@dataclass
class Manifest:
    """``manifest.json``: everything the commands know about one converted model."""

    manifest_version: int = MANIFEST_VERSION
    revision: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    source: SourceRecord | None = None
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    validation: ValidationRecord | None = None
    export: ExportRecord | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    export_check: ExportCheckRecord | None = None
    plan: PlanRecord | None = None
    rewrite: dict[str, Any] = field(default_factory=dict)
    lint: LintRecord | None = None
    engine: EngineRecord | None = None
    verify: VerifyRecord | None = None
    repair: dict[str, Any] | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    timings: dict[str, list[StageTiming]] = field(default_factory=dict)
    history: list[Event] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The manifest as written to ``manifest.json``."""
        data = asdict(self)
        data["inputs"] = [spec.to_json() for spec in self.inputs]
        data["outputs"] = [spec.to_json() for spec in self.outputs]
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> Manifest:
        """A manifest as :meth:`to_json` wrote it (raises ``KeyError``/``TypeError``/``ValueError`` when it is
        not one)."""
        return Manifest(
            manifest_version=int(data["manifest_version"]), revision=int(data["revision"]),
            versions=dict(data.get("versions", {})), source=_optional(SourceRecord, data.get("source")),
            inputs=[TensorSpec.from_json(spec) for spec in data.get("inputs", [])],
            outputs=[TensorSpec.from_json(spec) for spec in data.get("outputs", [])],
            artifacts={key: _record(Artifact, value) for key, value in data.get("artifacts", {}).items()},
            validation=_optional(ValidationRecord, data.get("validation")),
            export=_optional(ExportRecord, data.get("export")), provenance=dict(data.get("provenance", {})),
            export_check=_optional(ExportCheckRecord, data.get("export_check")),
            plan=_optional(PlanRecord, data.get("plan")), rewrite=dict(data.get("rewrite", {})),
            lint=_optional(LintRecord, data.get("lint")), engine=_optional(EngineRecord, data.get("engine")),
            verify=_optional(VerifyRecord, data.get("verify")), repair=data.get("repair"),
            skipped=dict(data.get("skipped", {})),
            timings={command: [_record(StageTiming, item) for item in stages]
                     for command, stages in data.get("timings", {}).items()},
            history=[_record(Event, item) for item in data.get("history", [])],
        )


Record = TypeVar("Record")


def _record(cls: type[Record], data: Any) -> Record:
    """A record dataclass from its JSON object: unknown keys are refused, missing optional ones defaulted."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    names = {item.name for item in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    return cls(**data)


def _optional(cls: type[Record], data: Any) -> Record | None:
    return None if data is None else _record(cls, data)


# -- the bundle ----------------------------------------------------------------------------------------------
class Bundle:
    """An mpexport output directory. :meth:`create` makes a new one (``convert``, in its staging directory),
    :meth:`open` reads an existing one and checks the artifacts a command uses; changes are made inside
    :meth:`transaction` (or :meth:`commit` for record-only changes) and land atomically."""

    def __init__(self, directory: Path, manifest: Manifest, loaded_revision: int | None) -> None:
        self.directory = directory
        self.manifest = manifest
        self._loaded_revision = loaded_revision
        self._written: set[str] = set()

    # -- opening -------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str | Path) -> Bundle:
        """A new, empty bundle in ``directory`` (which exists and holds no manifest yet)."""
        return cls(Path(directory), Manifest(versions=versions()), None)

    @classmethod
    def open(cls, directory: str | Path, *, uses: Iterable[str] = ()) -> Bundle:
        """Open the bundle in ``directory``: read and check ``manifest.json`` (an older manifest version is
        upgraded in memory, a newer one refused), remove temporary files that dead commands left, and check the
        SHA-256 of every artifact in ``uses`` that the bundle has. Every problem is a one-line
        :class:`MpexportError` (exit 2) naming the file."""
        directory = Path(directory)
        if not directory.is_dir():
            why = "it is a file" if directory.exists() else "no such directory"
            raise MpexportError(f"'{directory}' is not an mpexport output directory ({why})", stage=STAGE,
                                hint="give the output directory of mpexport convert")
        manifest = _read_manifest(directory)
        bundle = cls(directory, manifest, manifest.revision)
        _sweep_temporaries(directory)
        bundle.check(*uses)
        return bundle

    # -- artifacts -----------------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        """True when the bundle holds the artifact ``key``."""
        return key in self.manifest.artifacts

    def path(self, key: str) -> Path:
        """The main file of artifact ``key``; a one-line error when the bundle has none."""
        artifact = self.manifest.artifacts.get(key)
        if artifact is None:
            raise MpexportError(f"'{self.directory}' has no {DESCRIPTIONS.get(key, key)} ({key})", stage=STAGE,
                                hint="convert again with this version of mpexport")
        return self.directory / artifact.file

    def check(self, *keys: str) -> None:
        """Compare the files of each artifact in ``keys`` (those the bundle has) with their recorded SHA-256:
        a missing or modified file is a one-line error naming it."""
        for key in keys:
            artifact = self.manifest.artifacts.get(key)
            if artifact is None:
                continue
            for name, expected in sorted(artifact.sha256.items()):
                path = self.directory / name
                if not path.is_file():
                    raise MpexportError(f"'{path}' is missing: the manifest records it as part of the "
                                        f"{DESCRIPTIONS.get(key, key)}", stage=STAGE,
                                        hint="restore the file or convert again")
                if sha256_file(path) != expected:
                    raise MpexportError(f"'{path}' was modified after mpexport {artifact.written_by} wrote it "
                                        "(its SHA-256 differs from the manifest)", stage=STAGE,
                                        hint=f"restore it or run mpexport {artifact.written_by} again; mpexport "
                                        "does not use files it did not write")

    def integrity(self) -> dict[str, str | None]:
        """Every artifact's state on disk: None when its files match the manifest, else what is wrong (for
        ``inspect``, which reports rather than refuses)."""
        states: dict[str, str | None] = {}
        for key in self.manifest.artifacts:
            try:
                self.check(key)
                states[key] = None
            except MpexportError as exc:
                states[key] = exc.message
        return states

    def record_artifact(self, key: str, file: str, companions: Iterable[str] = (), *,
                        command: str) -> Artifact:
        """Record files that already lie in the bundle directory (``convert`` writes into a fresh staging
        directory) as artifact ``key``, with their hashes. Verdicts covering an older form turn stale."""
        return self._put(key, file, [file, *companions], self.directory, command)

    def digests(self, *keys: str) -> dict[str, str]:
        """What a verdict covers: the digest of each artifact in ``keys`` that the bundle has."""
        return {key: self.manifest.artifacts[key].digest for key in keys if key in self.manifest.artifacts}

    def staleness(self, record: Any) -> str | None:
        """Why a verdict no longer holds (None while it does): marked stale, or an artifact it covered changed
        or is gone."""
        if record is None:
            return "no such verdict"
        if record.stale:
            return str(record.stale)
        for key, digest in record.covers.items():
            artifact = self.manifest.artifacts.get(key)
            if artifact is None:
                return f"the {DESCRIPTIONS.get(key, key)} it covered is gone"
            if artifact.digest != digest:
                return f"{artifact.file} changed after it"
        return None

    def covered(self, record: Any, key: str) -> bool:
        """True when ``record`` is a current verdict that covered artifact ``key`` as it is now."""
        return record is not None and key in record.covers and self.staleness(record) is None

    def _put(self, key: str, file: str, files: list[str], where: Path, command: str) -> Artifact:
        artifact = Artifact(file, {name: sha256_file(where / name) for name in files}, command,
                            self.manifest.revision + 1)
        old = self.manifest.artifacts.get(key)
        self.manifest.artifacts[key] = artifact
        self._written.add(key)
        if old is not None and old.digest != artifact.digest:
            for section in VERDICTS:
                record = getattr(self.manifest, section)
                if record is not None and record.covers.get(key) == old.digest and not record.stale:
                    record.stale = f"{file} was rewritten by mpexport {command} after this verdict"
        return artifact

    # -- reading records -----------------------------------------------------------------------------------
    def plan(self) -> Any:
        """The precision plan, read back as a :class:`mpexport.plan.PrecisionPlan`."""
        from mpexport.plan import PrecisionPlan

        return PrecisionPlan.load(self.path(PLAN))

    def ranges(self) -> Any:
        """The range rule's calibration statistics (:class:`mpexport.plan.RangeStats`), or None without them."""
        from mpexport.plan import RangeStats

        return RangeStats.from_json(json.loads(self.path(RANGES).read_text())) if self.has(RANGES) else None

    def provenance(self) -> list[Any]:
        """The per-node provenance records (:class:`mpexport.provenance.NodeProvenance`)."""
        from mpexport.provenance import from_json

        return from_json(json.loads(self.path(PROVENANCE).read_text()))

    def source_path(self) -> Path:
        """The source model file: where convert read it, else the same place relative to the bundle (a project
        tree that moved); a one-line error when neither exists."""
        source = self.manifest.source
        if source is None:
            raise MpexportError(f"'{self.directory}' records no source model", stage=STAGE)
        return _existing(source.path, source.relative_path, self.directory, "the source model")

    def recorded_validation_data(self) -> Any:
        """The validation data convert used, opened (a :class:`mpexport.valdata.ValidationData`), with its
        import path and column mapping; None when convert had none."""
        from mpexport.valdata import load_validation_data

        source, record = self.validation_source(), self.manifest.validation
        if source is None or record is None:
            return None
        return load_validation_data(source, import_path=record.import_path, columns=record.columns or None)

    def validation_source(self) -> str | None:
        """The validation data convert used, as a path that exists from here or a ``module:function``; None
        when convert had none."""
        record = self.manifest.validation
        if record is None:
            return None
        if record.kind == "callable":
            return record.source
        return str(_existing(record.source, record.relative_path, self.directory, "the validation data"))

    # -- committing ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self, command: str) -> Iterator[Transaction]:
        """Change the bundle: write new artifacts with :meth:`Transaction.file` and :meth:`Transaction.put`,
        change records on ``self.manifest``; on a normal exit everything lands atomically (see :meth:`commit`),
        on an exception nothing does and the in-memory manifest is restored. The temporary directory is always
        removed."""
        snapshot = copy.deepcopy(self.manifest)
        written = set(self._written)
        staging = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=self.directory))
        transaction = Transaction(self, staging, command)
        try:
            yield transaction
            self._commit(command, transaction.moves)
        except BaseException:
            self.manifest = snapshot
            self._written = written
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def commit(self, command: str) -> None:
        """Write the manifest's record changes (no new files) atomically."""
        self._commit(command, [])

    def _commit(self, command: str, moves: list[tuple[Path, Path]]) -> None:
        with _locked(self.directory):
            on_disk = _revision_on_disk(self.directory)
            if on_disk != self._loaded_revision:
                raise MpexportError(
                    f"'{self.directory}' was changed by another mpexport command while this one ran (revision "
                    f"{self._loaded_revision} when opened, {on_disk} now); nothing was written", stage=STAGE,
                    hint="run the command again")
            for source, target in moves:
                os.replace(source, target)
            self.manifest.revision += 1
            self.manifest.history.append(Event(self.manifest.revision, command, _now(), sorted(self._written)))
            _write_atomically(self.directory / MANIFEST, json.dumps(self.manifest.to_json(), indent=2) + "\n")
            self._loaded_revision = self.manifest.revision
            self._written.clear()


class Transaction:
    """New artifacts of one :meth:`Bundle.transaction`: written into its temporary directory, moved into the
    bundle when it commits."""

    def __init__(self, bundle: Bundle, staging: Path, command: str) -> None:
        self.bundle = bundle
        self.staging = staging
        self.command = command
        self.moves: list[tuple[Path, Path]] = []

    def file(self, name: str) -> Path:
        """Where to write the file ``name`` (it lands as ``bundle/name`` on commit)."""
        return self.staging / name

    def put(self, key: str, file: str, companions: Iterable[str] = ()) -> Artifact:
        """Record the written ``file`` (and its companions) as artifact ``key``: hashed now, moved on commit;
        verdicts that covered the artifact's previous form turn stale."""
        files = [file, *companions]
        for name in files:
            if not (self.staging / name).is_file():
                raise MpexportError(f"internal: '{name}' was not written before it was recorded", stage=STAGE)
            self.moves.append((self.staging / name, self.bundle.directory / name))
        return self.bundle._put(key, file, files, self.staging, self.command)

    def write_text(self, key: str, file: str, text: str) -> Artifact:
        """Write a text artifact and record it (see :meth:`put`)."""
        self.file(file).write_text(text)
        return self.put(key, file)


# -- files ---------------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that shape the outputs."""
    found = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def portable_paths(path: Path, bundle_directory: Path) -> tuple[str, str | None]:
    """``path`` as recorded in a manifest: absolute, and relative to the bundle directory where one exists
    (so a project tree moved as a whole still resolves)."""
    absolute = Path(os.path.abspath(path))
    try:
        relative = os.path.relpath(absolute, Path(os.path.abspath(bundle_directory)))
    except ValueError:  # another drive (Windows)
        relative = None
    return str(absolute), relative


def _existing(absolute: str, relative: str | None, directory: Path, what: str) -> Path:
    candidates = [Path(absolute)]
    if relative is not None:
        candidates.append(directory / relative)
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise MpexportError(f"{what} recorded at convert time, '{absolute}', does not exist", stage=STAGE,
                        hint="restore it, or pass it explicitly")


def _read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    if not path.is_file():
        raise MpexportError(f"'{directory}' is not an mpexport output directory (no {MANIFEST})", stage=STAGE)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MpexportError(f"'{path}' is not valid JSON: {exc}", stage=STAGE) from None
    if not isinstance(data, dict) or "manifest_version" not in data or "artifacts" not in data:
        raise MpexportError(f"'{path}' is not an mpexport manifest", stage=STAGE)
    version = data["manifest_version"]
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise MpexportError(f"'{path}' was written by a newer mpexport (manifest version {version}; this one "
                            f"reads up to {MANIFEST_VERSION})", stage=STAGE, hint="upgrade mpexport")
    try:
        return Manifest.from_json(_upgrade_v1(data) if version == 1 else data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MpexportError(f"'{path}' is damaged: {type(exc).__name__}: {exc}", stage=STAGE,
                            hint="convert again") from None


def _upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 manifest in version-2 form. Version 1 recorded no coverage: the convert-time verdicts
    (export check, lint, engine) are taken to cover the artifacts as hashed then; a verify verdict is kept
    but stale, since version 1 let artifacts change under it."""
    hashes: dict[str, str] = data.get("hashes", {})
    artifacts = {}
    for key, file in data.get("artifacts", {}).items():
        files = {name: digest for name, digest in hashes.items()
                 if name == file or name.startswith(f"{file}.data")}
        writer = "verify" if key in (REPORT, REPORT_HTML) else "build" if key == ENGINE else "convert"
        artifacts[key] = {"file": file, "sha256": files, "written_by": writer, "revision": 0}
    digests = {key: Artifact(**value).digest for key, value in artifacts.items()}

    def covering(*keys: str) -> dict[str, str]:
        return {key: digests[key] for key in keys if key in digests}

    source = data.get("source") or None
    check = data.get("export_check")
    upgraded: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION, "revision": 0, "versions": data.get("versions", {}),
        "source": {key: source[key] for key in ("path", "format", "sha256", "factory", "training", "notes")
                   if key in source} if source else None,
        "inputs": data.get("inputs", []), "outputs": data.get("outputs", []), "artifacts": artifacts,
        "provenance": data.get("provenance", {}), "rewrite": data.get("rewrite", {}),
        "skipped": data.get("skipped", {}),
    }
    if data.get("export"):
        upgraded["export"] = {key: data["export"][key] for key in
                              ("strategy", "attempts", "seconds", "opset", "external_data", "provenance")}
    if check:
        upgraded["export_check"] = {"passed": bool(check.get("passed")), "data": str(check.get("data", "")),
                                    "comparison": {k: v for k, v in check.items() if k != "data"},
                                    "covers": covering(FP32_ONNX)}
        if check.get("data") and not str(check["data"]).startswith("example inputs"):
            upgraded["validation"] = {"source": str(check["data"]), "kind": _data_kind(str(check["data"]))}
    if data.get("plan"):
        upgraded["plan"] = {key: data["plan"][key] for key in ("policy", "target", "policy_source", "notes", "summary")
                            if key in data["plan"]}
    if data.get("lint"):
        lint = data["lint"]
        upgraded["lint"] = {"ok": bool(lint.get("ok")), "checks": lint.get("checks", []),
                            "model": str(lint.get("model", "")), "covers": covering(MIXED_ONNX, PLAN)}
    if data.get("engine"):
        engine = dict(data["engine"])
        upgraded["engine"] = {"tensorrt": str(engine.pop("tensorrt", "")),
                              "compute_capability": engine.pop("compute_capability", None),
                              "check": engine.pop("check", {}), "details": engine, "covers": covering(ENGINE, PLAN)}
    if data.get("verify"):
        verify = data["verify"]
        upgraded["verify"] = {"verdict": verify.get("verdict", "fail"), "samples": int(verify.get("samples", 0)),
                              "data": str(verify.get("data", "")), "failures": verify.get("failures", []),
                              "stale": "recorded by an mpexport that did not record what it covered: verify again"}
    return upgraded


def _data_kind(source: str) -> str:
    from mpexport.valdata import is_callable_spec

    return "callable" if not Path(source).exists() and is_callable_spec(source) else "files"


def _revision_on_disk(directory: Path) -> int | None:
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        return int(json.loads(path.read_text()).get("revision", 0))
    except (OSError, ValueError, AttributeError):
        return -1


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one rename (fsynced first): readers see the old or the new file."""
    temporary = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}")
    with temporary.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on the bundle directory itself for the length of one commit (waits for another commit to
    finish); no lock file is left behind."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


_TEMP_PID = re.compile(rf"^{re.escape(TEMP_PREFIX)}(\d+)-")


def _sweep_temporaries(directory: Path) -> None:
    """Remove temporary files and directories of mpexport commands that died (killed before they could)."""
    for entry in directory.iterdir():
        match = _TEMP_PID.match(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
