"""The manifest's typed records: one dataclass per section, read back strictly (unknown fields refused), and the
upgrade of older manifests."""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from mpexport.base.errors import MpexportError
from mpexport.base.specs import TensorSpec
from mpexport.base.status import RAN, SKIPPED, StageStatus
from mpexport.bundle.names import (
    ENGINE,
    FILE_NAMES,
    FP32_ONNX,
    MANIFEST,
    MIXED_ONNX,
    PLAN,
    REPORT,
    REPORT_HTML,
    STAGE,
    artifact_files,
)

MANIFEST_VERSION = 3
MAX_MANIFEST_BYTES = 16 << 20
"""The largest ``manifest.json`` read: records are bounded, bulky evidence lives in artifacts of its own."""


VERSIONED_PACKAGES = ("mpexport", "torch", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy")


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
    sha256: str | None = None
    """The files' digest when convert read them (a ``module:function`` has none): the recorded data is used again only
    while it is unchanged."""


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
    """ONNX Runtime against PyTorch FP32 (the comparison as :class:`mpexport.check.compare.Comparison` writes it)."""

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
        """The record of a build from :func:`mpexport.deploy.tensorrt.build_engine`'s metadata."""
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
    bundle_id: str | None = None
    """A random identity given when convert creates the bundle: a directory replaced by another convert has another
    one, so a command that opened the old bundle cannot commit into the new one (revisions restart at 1)."""
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
    stages: dict[str, list[StageStatus]] = field(default_factory=dict)
    """Per command (convert, verify, build, repair): every stage it went through, ran / skipped / failed, with why,
    seconds and peak memory (the command's last run)."""
    history: list[Event] = field(default_factory=list)

    def skip_reason(self, stage: str) -> str | None:
        """Why ``stage`` was skipped, from the last command that recorded it (None when it ran, or no command did)."""
        found = None
        for statuses in self.stages.values():
            for status in statuses:
                if status.stage == stage:
                    found = status.why if status.status == SKIPPED else None
        return found

    def to_json(self) -> dict[str, Any]:
        """The manifest as written to ``manifest.json``."""
        data = asdict(self)
        data["inputs"] = [spec.to_json() for spec in self.inputs]
        data["outputs"] = [spec.to_json() for spec in self.outputs]
        data["stages"] = {command: [status.to_json() for status in statuses]
                          for command, statuses in self.stages.items()}
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> Manifest:
        """A manifest as :meth:`to_json` wrote it (raises ``KeyError``/``TypeError``/``ValueError`` when it is
        not one)."""
        unknown = sorted(set(data) - {item.name for item in fields(Manifest)})
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}")
        return Manifest(
            manifest_version=int(data["manifest_version"]), revision=int(data["revision"]),
            bundle_id=_optional_text(data.get("bundle_id")),
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
            stages={command: [_record(StageStatus, item) for item in statuses]
                    for command, statuses in data.get("stages", {}).items()},
            history=[_record(Event, item) for item in data.get("history", [])],
        )


Record = TypeVar("Record")


def _optional_text(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def check_artifacts(manifest: Manifest) -> None:
    """Raise ``ValueError`` unless every artifact names only the files mpexport writes for its key
    (:func:`mpexport.bundle.names.artifact_files`), its main file among its hashed ones: a manifest cannot point a
    command at another file of the bundle, or outside it, and every file used is one whose hash is checked."""
    for key, artifact in manifest.artifacts.items():
        if key not in FILE_NAMES:
            raise ValueError(f"unknown artifact '{key}'")
        allowed = artifact_files(key)
        if artifact.file != FILE_NAMES[key]:
            raise ValueError(f"artifact '{key}' names the file '{artifact.file}' (mpexport writes it as "
                             f"'{FILE_NAMES[key]}')")
        if not isinstance(artifact.sha256, dict) or artifact.file not in artifact.sha256:
            raise ValueError(f"artifact '{key}' does not record the hash of its file '{artifact.file}'")
        strays = sorted(name for name in artifact.sha256 if name not in allowed)
        if strays:
            raise ValueError(f"artifact '{key}' lists files mpexport does not write for it ({', '.join(strays)})")


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


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that shape the outputs."""
    found = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def read_manifest(directory: Path) -> Manifest:
    """The manifest of ``directory``, checked and upgraded to the current version in memory; a one-line error
    for a missing, invalid, damaged or newer manifest."""
    path = directory / MANIFEST
    if not path.is_file():
        raise MpexportError(f"'{directory}' is not an mpexport output directory (no {MANIFEST})", stage=STAGE)
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise MpexportError(f"'{path}' is {path.stat().st_size >> 20} MiB: mpexport writes manifests of kilobytes "
                            f"(at most {MAX_MANIFEST_BYTES >> 20} MiB are read)", stage=STAGE, hint="convert again")
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
        if version == 1:
            data = _upgrade_v1(data)
        if data["manifest_version"] == 2:
            data = _upgrade_v2(data)
        manifest = Manifest.from_json(data)
        check_artifacts(manifest)
        return manifest
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MpexportError(f"'{path}' is damaged: {type(exc).__name__}: {exc}", stage=STAGE,
                            hint="convert again") from None


def _upgrade_v2(data: dict[str, Any]) -> dict[str, Any]:
    """A version-2 manifest in version-3 form: its per-command ``timings`` and its ``skipped`` stages become one
    status record per stage (``stages``); timed stages ran (version 2 recorded no failed stage), skipped ones
    belong to convert (the only command that skipped any) and replace its timed record of the same stage (version 2
    timed the engine stage also when it skipped the build)."""
    upgraded = {key: value for key, value in data.items() if key not in ("timings", "skipped")}
    stages: dict[str, list[dict[str, Any]]] = {
        command: [{"stage": item["stage"], "status": RAN, "seconds": item.get("seconds", 0.0),
                   "peak_rss_mb": item.get("peak_rss_mb")} for item in items]
        for command, items in data.get("timings", {}).items()}
    for stage, why in data.get("skipped", {}).items():
        convert = stages.setdefault("convert", [])
        skipped = {"stage": stage, "status": SKIPPED, "why": why}
        timed = next((index for index, item in enumerate(convert) if item["stage"] == stage), None)
        if timed is None:
            convert.append(skipped)
        else:
            convert[timed] = {**skipped, "seconds": convert[timed]["seconds"],
                              "peak_rss_mb": convert[timed]["peak_rss_mb"]}
    upgraded.update(manifest_version=3, stages=stages)
    return upgraded


def _upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 manifest in version-2 form (then upgraded as a version-2 one). Version 1 recorded no coverage:
    the convert-time verdicts (export check, lint, engine) are taken to cover the artifacts as hashed then; a verify
    verdict is kept but stale, since version 1 let artifacts change under it."""
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
        "manifest_version": 2, "revision": 0, "versions": data.get("versions", {}),
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
    from mpexport.base.callables import is_callable_spec

    return "callable" if not Path(source).exists() and is_callable_spec(source) else "files"
