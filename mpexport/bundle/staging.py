"""New output directories: staged in a hidden temporary directory beside the target and renamed into place only
when the whole run succeeded, so a failed run leaves nothing half-written and an existing directory is replaced
only with ``force``. (What is inside a bundle, and its manifest, is :mod:`mpexport.bundle`'s.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mpexport.base.errors import MpexportError
from mpexport.base.files import current_umask
from mpexport.bundle.names import MANIFEST

BUNDLE_MARKER = MANIFEST
"""A file every output directory mpexport writes holds: ``force`` replaces only directories that have it."""


def check_output_dir(out: str | Path, *, force: bool, marker: str = BUNDLE_MARKER) -> Path:
    """Refuse an existing ``out`` unless ``force``; even with ``force``, refuse a file, and a non-empty directory
    that mpexport did not write (no ``marker`` file in it): ``--force`` never deletes a user's own files."""
    out = Path(out)
    if out.exists() and not force:
        raise MpexportError(f"output directory '{out}' already exists", stage="output",
                            hint="pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise MpexportError(f"output path '{out}' exists and is not a directory", stage="output")
    if out.exists() and any(out.iterdir()) and not (out / marker).exists():
        raise MpexportError(f"'{out}' exists and was not written by mpexport; --force replaces only mpexport's own "
                            "output directories", stage="output", hint="choose another --out, or remove it yourself")
    return out


@contextlib.contextmanager
def staged_output(out: str | Path, *, force: bool, marker: str = BUNDLE_MARKER) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; on success rename it to ``out`` (replacing an old one
    only with ``force``, see :func:`check_output_dir`), on any failure delete it and leave ``out`` as it was."""
    out = check_output_dir(out, force=force, marker=marker).absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        staging.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would make the output private
    except OSError as exc:
        raise MpexportError(f"cannot create output directory next to '{out}': {exc.strerror}",
                            stage="output") from None
    try:
        yield staging
        _replace_dir(staging, out, force=force, marker=marker)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_dir(staging: Path, out: Path, *, force: bool, marker: str) -> None:
    if not out.exists():
        staging.rename(out)
        return
    check_output_dir(out, force=force, marker=marker)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)




