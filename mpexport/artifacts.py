"""The output directory and its ``manifest.json``: what every stage wrote, with hashes and versions.

Outputs are staged in a hidden temporary directory beside the target and renamed into place only when the
whole run succeeded, so a failed run leaves nothing half-written and an existing directory is replaced only
with ``force``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from mpexport.errors import MpexportError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
VERSIONED_PACKAGES = ("mpexport", "torch", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy")


def check_output_dir(out: str | Path, *, force: bool) -> Path:
    """Refuse an existing ``out`` unless ``force``, and a ``out`` whose parent cannot be created."""
    out = Path(out)
    if out.exists() and not force:
        raise MpexportError(f"output directory '{out}' already exists", stage="output",
                            hint="pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise MpexportError(f"output path '{out}' exists and is not a directory", stage="output")
    return out


@contextlib.contextmanager
def staged_output(out: str | Path, *, force: bool) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; on success rename it to ``out`` (replacing an old one
    only with ``force``), on any failure delete it and leave ``out`` as it was."""
    out = check_output_dir(out, force=force).absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as exc:
        raise MpexportError(f"cannot create output directory next to '{out}': {exc.strerror}",
                            stage="output") from None
    try:
        yield staging
        _replace_dir(staging, out, force=force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_dir(staging: Path, out: Path, *, force: bool) -> None:
    if not out.exists():
        staging.rename(out)
        return
    check_output_dir(out, force=force)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that shape the outputs."""
    found = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def new_manifest() -> dict[str, Any]:
    """An empty manifest with the keys every stage relies on."""
    return {"manifest_version": MANIFEST_VERSION, "artifacts": {}, "hashes": {}, "inputs": [], "outputs": [],
            "source": {}, "versions": versions(), "skipped": {}}


def add_artifact(manifest: dict[str, Any], directory: Path, key: str, filename: str,
                 extra_files: tuple[str, ...] = ()) -> None:
    """Record ``filename`` (relative to ``directory``) under ``artifacts[key]`` with its and its companion
    files' SHA-256."""
    manifest["artifacts"][key] = filename
    for name in (filename, *extra_files):
        manifest["hashes"][name] = sha256_file(directory / name)


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` (sorted keys, stable formatting) into ``directory``."""
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON with a trailing newline (stable formatting for diffs)."""
    path.write_text(json.dumps(data, indent=2) + "\n")


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read ``DIR/manifest.json``; one-line error when the directory is not an mpexport output."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise MpexportError(f"'{directory}' is not an mpexport output directory (no {MANIFEST})", stage="manifest")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MpexportError(f"'{path}' is not valid JSON: {exc}", stage="manifest") from None
    if not isinstance(manifest, dict) or "artifacts" not in manifest:
        raise MpexportError(f"'{path}' is not an mpexport manifest", stage="manifest")
    return manifest
