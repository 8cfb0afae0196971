"""The output directory as one typed record: a :class:`Bundle` and its
:class:`~mpexport.bundle.records.Manifest`.

``convert`` creates a bundle; ``inspect``, ``verify``, ``build``, ``package`` (and ``repair``) open one. This
module and :mod:`mpexport.bundle.records` are the only code that reads or writes ``manifest.json``, and they treat
the directory like a database file:

* **typed**: every manifest section is a dataclass (:mod:`mpexport.bundle.records`); the plan, provenance and
  ranges are read back by their own stages (:func:`mpexport.precision.plan.read_plan`...);
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
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mpexport.base.errors import MpexportError
from mpexport.base.files import sha256_file, sha256_tree
from mpexport.bundle.names import DESCRIPTIONS, MANIFEST, STAGE, TEMP_PREFIX, VERDICTS
from mpexport.bundle.records import Artifact, Event, Manifest, read_manifest, versions


# -- the bundle ----------------------------------------------------------------------------------------------
class Bundle:
    """An mpexport output directory. :meth:`create` makes a new one (``convert``, in its staging directory),
    :meth:`open` reads an existing one and checks the artifacts a command uses; changes are made inside
    :meth:`transaction` (or :meth:`commit` for record-only changes) and land atomically."""

    def __init__(self, directory: Path, manifest: Manifest, loaded_revision: int | None) -> None:
        self.directory = directory
        self.manifest = manifest
        self._loaded_revision = loaded_revision
        self._loaded_identity = manifest.bundle_id if loaded_revision is not None else None
        self._written: set[str] = set()

    # -- opening -------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str | Path) -> Bundle:
        """A new, empty bundle in ``directory`` (which exists and holds no manifest yet)."""
        return cls(Path(directory), Manifest(versions=versions(), bundle_id=uuid.uuid4().hex), None)

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
        manifest = read_manifest(directory)
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

    # -- recorded paths --------------------------------------------------------------------------------------
    def source_path(self) -> Path:
        """The source model file: where convert read it, else the same place relative to the bundle (a project
        tree that moved); a one-line error when neither exists."""
        source = self.manifest.source
        if source is None:
            raise MpexportError(f"'{self.directory}' records no source model", stage=STAGE)
        return _existing(source.path, source.relative_path, self.directory, "the source model")

    def validation_source(self) -> str | None:
        """The validation data convert used, as a path that exists from here; None when convert had none. One-line
        errors when it is gone, when it changed since convert (its SHA-256), and when it was a ``module:function``:
        a manifest never decides what code runs, so the command line must name that function again."""
        record = self.manifest.validation
        if record is None:
            return None
        if record.kind == "callable":
            raise MpexportError(f"the validation data convert used came from code, '{record.source}'; mpexport runs "
                                "code only when the command line names it", stage=STAGE,
                                hint=f"pass --val-data {record.source}")
        path = _existing(record.source, record.relative_path, self.directory, "the validation data")
        if record.sha256 is not None and sha256_tree(path) != record.sha256:
            raise MpexportError(f"the validation data convert used, '{path}', changed since convert (its SHA-256 "
                                "differs)", stage=STAGE, hint="pass --val-data to verify on the data as it is now")
        return str(path)

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
        with locked(self.directory):
            identity, on_disk = _identity_on_disk(self.directory)
            if (identity, on_disk) != (self._loaded_identity, self._loaded_revision):
                change = (f"revision {self._loaded_revision} when opened, {on_disk} now"
                          if identity == self._loaded_identity else "it was replaced by another convert")
                raise MpexportError(
                    f"'{self.directory}' was changed by another mpexport command while this one ran ({change}); "
                    "nothing was written", stage=STAGE, hint="run the command again")
            self.manifest.bundle_id = self.manifest.bundle_id or uuid.uuid4().hex
            self.manifest.revision += 1
            self.manifest.history.append(Event(self.manifest.revision, command, _now(), sorted(self._written)))
            text = json.dumps(self.manifest.to_json(), indent=2) + "\n"
            try:
                _land(self.directory, moves, text)
            except BaseException:
                self.manifest.revision -= 1
                self.manifest.history.pop()
                raise
            self._loaded_identity = self.manifest.bundle_id
            self._loaded_revision = self.manifest.revision
            self._written.clear()

    # -- reading out -----------------------------------------------------------------------------------------
    def copy_file(self, key: str, name: str, target: Path) -> None:
        """Copy the file ``name`` of artifact ``key`` to ``target``, hashing the bytes as they are copied: a
        one-line error (and no ``target``) unless they are exactly the bytes the manifest recorded. What leaves the
        bundle is what its verdicts covered, even if the file changed after the bundle was opened."""
        artifact = self.manifest.artifacts.get(key)
        expected = artifact.sha256.get(name) if artifact is not None else None
        if expected is None:
            raise MpexportError(f"internal: '{name}' is not a file of the {DESCRIPTIONS.get(key, key)}", stage=STAGE)
        digest = hashlib.sha256()
        with (self.directory / name).open("rb") as source, target.open("wb") as copy:
            while block := source.read(1 << 20):
                digest.update(block)
                copy.write(block)
        if digest.hexdigest() != expected:
            target.unlink()
            raise MpexportError(f"'{self.directory / name}' changed while it was copied (its SHA-256 differs from the "
                                "manifest); nothing unverified is shipped", stage=STAGE, hint="run the command again")
        shutil.copystat(self.directory / name, target)


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
        self.file(file).write_text(text, encoding="utf-8", errors="backslashreplace")  # names that are not UTF-8
        return self.put(key, file)


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


def _identity_on_disk(directory: Path) -> tuple[str | None, int | None]:
    """The bundle identity and revision of the manifest on disk now (``(None, None)`` without one)."""
    path = directory / MANIFEST
    if not path.exists():
        return None, None
    try:
        data = json.loads(path.read_text())
        return data.get("bundle_id"), int(data.get("revision", 0))
    except (OSError, ValueError, AttributeError, TypeError):
        return None, -1


def _land(directory: Path, moves: list[tuple[Path, Path]], manifest_text: str) -> None:
    """Move the new files into place and replace the manifest, all or nothing: each replaced file is first set aside
    beside its new version (inside the transaction's directory), and put back if any step fails."""
    for _, target in moves:
        if target.is_dir() and not target.is_symlink():
            raise MpexportError(f"'{target}' is a directory where mpexport writes a file; nothing was written",
                                stage=STAGE, hint="remove or rename it and run the command again")
    landed: list[tuple[Path, Path | None]] = []
    try:
        for source, target in moves:
            backup = source.with_name(f"{source.name}.previous") if os.path.lexists(target) else None
            if backup is not None:
                os.replace(target, backup)
            landed.append((target, backup))
            os.replace(source, target)
        _write_atomically(directory / MANIFEST, manifest_text)
    except BaseException as exc:
        for target, backup in reversed(landed):
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, target)
                else:
                    target.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            where = exc.filename or directory
            raise MpexportError(f"cannot write '{where}': {exc.strerror}; the bundle was left as it was",
                                stage=STAGE) from None
        raise


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one rename (fsynced first): readers see the old or the new file."""
    temporary = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        with temporary.open("w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on the directory itself (waits for another holder to finish); no lock file is left behind.
    Commits hold it, and so does ``convert --force`` while it swaps a bundle for its replacement: when the path was
    swapped while this waited, a one-line error says so (the lock belonged to the old directory)."""
    handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        held, now = os.fstat(handle), os.stat(directory)
        if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):
            raise MpexportError(f"'{directory}' was replaced by another mpexport command while this one ran; "
                                "nothing was written", stage=STAGE, hint="run the command again")
        yield
    finally:
        os.close(handle)  # releases the lock


_TEMP_PID = re.compile(rf"^{re.escape(TEMP_PREFIX)}(\d+)-")


def _sweep_temporaries(directory: Path) -> None:
    """Remove temporary files and directories of mpexport commands that died (killed before they could)."""
    for entry in directory.iterdir():
        match = _TEMP_PID.match(entry.name)
        if match is None or alive(int(match.group(1))):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    """True while process ``pid`` runs (this process included)."""
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
