"""New output directories: staged in a hidden temporary directory beside the target and renamed into place only
when the whole run succeeded, so a failed run leaves nothing half-written and an existing directory is replaced
only with ``force``, and only when it is provably mpexport's own and holds none of the command's inputs. (What is
inside a bundle, and its manifest, is :mod:`mpexport.bundle.store`'s.)

A staging directory is named ``.<out>.<pid>-<random>.partial`` and a directory being replaced ``.<out>.old-<pid>``:
what a killed command left is recognised by its process id and removed by the next command writing the same
``--out`` (:func:`sweep_leftovers`), never while that process lives.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from mpexport.base.errors import MpexportError
from mpexport.base.files import current_umask
from mpexport.bundle.names import MANIFEST, TEMP_PREFIX
from mpexport.bundle.records import read_manifest
from mpexport.bundle.store import alive, locked

STAGE = "output"

Ownership = Callable[[Path], str | None]
"""Says why a non-empty directory is not provably one a command may replace (None when it is)."""


def bundle_ownership(directory: Path) -> str | None:
    """None when ``directory`` is provably an mpexport bundle: its manifest reads as ours (our schema, artifacts
    confined to their file names) and every entry in it is the manifest, a file of a recorded artifact, or a
    temporary file of a command; else why not."""
    try:
        manifest = read_manifest(directory)
    except MpexportError:
        return f"it has no {MANIFEST} that mpexport wrote" if not (directory / MANIFEST).exists() else \
            f"its {MANIFEST} is not one mpexport wrote"
    ours = {MANIFEST, *(name for artifact in manifest.artifacts.values() for name in artifact.sha256)}
    return owned_entries(directory, ours)


def check_output_dir(out: str | Path, *, force: bool, ownership: Ownership = bundle_ownership,
                     inputs: Iterable[str | Path] = ()) -> Path:
    """``out`` (through a symbolic link: the directory it points to) when the command may write it: a one-line error
    for an existing ``out`` without ``force``, a file, a non-empty directory that is not provably mpexport's own
    (``ownership``), and one that holds any of the command's ``inputs`` (``--force`` would delete them)."""
    out = _real(Path(out))
    if out.exists() and not force:
        raise MpexportError(f"output directory '{out}' already exists", stage=STAGE, hint="pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise MpexportError(f"output path '{out}' exists and is not a directory", stage=STAGE)
    for item in inputs:
        if inside(Path(item), out):
            raise MpexportError(f"--out '{out}' holds this command's own input '{item}'; writing it would delete that",
                                stage=STAGE, hint="choose another --out, or move the input out of it")
    if out.is_dir() and any(out.iterdir()):
        why = ownership(out)
        if why is not None:
            raise MpexportError(f"'{out}' exists and is not an output directory mpexport wrote ({why}); --force "
                                "replaces only mpexport's own", stage=STAGE,
                                hint="choose another --out, or remove it yourself")
    return out


def sweep_leftovers(out: str | Path) -> list[str]:
    """Remove what killed commands left beside ``out`` (their staging directories and directories being replaced,
    recognised by name and a process id that no longer runs); returns the names removed."""
    out = _real(Path(out))
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:(\d+)-[^/]*\.partial|old-(\d+))$")
    removed = []
    for entry in out.parent.iterdir():
        match = pattern.match(entry.name)
        if match is None or alive(int(match.group(1) or match.group(2))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return sorted(removed)


@contextlib.contextmanager
def staged_output(out: str | Path, *, force: bool, ownership: Ownership = bundle_ownership,
                  inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; on success rename it to ``out`` (replacing an old one only
    as :func:`check_output_dir` allows, checked again at the swap), on any failure delete it and leave ``out`` as it
    was."""
    inputs = list(inputs)
    out = check_output_dir(out, force=force, ownership=ownership, inputs=inputs).absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}-", suffix=".partial", dir=out.parent))
        staging.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would make the output private
    except OSError as exc:
        raise MpexportError(f"cannot create output directory next to '{out}': {exc.strerror}", stage=STAGE) from None
    try:
        yield staging
        _replace_dir(staging, out, force=force, ownership=ownership, inputs=inputs)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_dir(staging: Path, out: Path, *, force: bool, ownership: Ownership, inputs: list[str | Path]) -> None:
    if not out.exists():
        staging.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    with locked(out):  # a commit into the old bundle finishes first, or finds it replaced
        check_output_dir(out, force=force, ownership=ownership, inputs=inputs)
        out.rename(old)
        staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def owned_entries(directory: Path, ours: Iterable[str]) -> str | None:
    """None when every entry of ``directory`` is named in ``ours`` (or is a command's temporary file); else which
    are not, in words (for an :data:`Ownership` of another kind of output directory)."""
    ours = set(ours)
    strays = sorted(entry.name for entry in directory.iterdir()
                    if entry.name not in ours and not entry.name.startswith(TEMP_PREFIX))
    if not strays:
        return None
    shown = ", ".join(strays[:3]) + (f" and {len(strays) - 3} more" if len(strays) > 3 else "")
    return f"it holds files mpexport did not write: {shown}"


def _real(path: Path) -> Path:
    """``path`` with a final symbolic link followed (the directory it points to is the one replaced)."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def inside(path: Path, directory: Path) -> bool:
    """True when ``path`` is ``directory`` or lies inside it (links resolved on both)."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(directory))
