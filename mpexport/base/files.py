"""Files: SHA-256 digests, JSON written the one way mpexport writes it, the process's umask."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


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
