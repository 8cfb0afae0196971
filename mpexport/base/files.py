"""Files: SHA-256 digests, JSON written the one way mpexport writes it, the process's umask, and the check that a
user's path is a regular file before it is opened."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from mpexport.base.errors import MpexportError


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON with a trailing newline (stable formatting for diffs)."""
    path.write_text(json.dumps(data, indent=2) + "\n")


def current_umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def regular_file(path: str | Path, what: str, *, stage: str, hint: str | None = None) -> Path:
    """``path`` when it names a regular file (links followed); a one-line :class:`MpexportError` for a missing path,
    a directory, or anything that is not a file (a FIFO, a device, a socket): mpexport never opens what could block
    forever or never end. ``what`` names the file in the message ("validation data", "model file")."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise MpexportError(f"{what} '{path}' does not exist", stage=stage, hint=hint) from None
    except OSError as exc:
        raise MpexportError(f"cannot read {what} '{path}': {exc.strerror}", stage=stage, hint=hint) from None
    if stat.S_ISDIR(mode):
        raise MpexportError(f"{what} '{path}' is a directory, not a file", stage=stage, hint=hint)
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise MpexportError(f"{what} '{path}' is {kind}, not a regular file; mpexport reads files only",
                            stage=stage, hint=hint)
    return path


def sha256_tree(path: Path) -> str:
    """SHA-256 of a file, or of a directory's regular files (recursively, by relative name and content, in name
    order): the same data gives the same digest wherever it lies."""
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(item for item in path.rglob("*") if item.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}:{sha256_file(file)}\n".encode())
    return digest.hexdigest()
