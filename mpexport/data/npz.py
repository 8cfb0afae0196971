"""Reading ``.npz`` files that may be hostile: every array's ``.npy`` header (shape, dtype) is read and checked
before anything is decompressed, so that a damaged or lying header, Python objects, a member that is not an array,
or a file that would not fit in memory (:func:`mpexport.data.limits.memory_limit`) is a one-line
:class:`MpexportError` naming the array and the file, never a hang, a traceback, or gigabytes allocated."""

from __future__ import annotations

import math
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from numpy.lib import format as npy

from mpexport.base.errors import MpexportError, first_line
from mpexport.base.files import regular_file
from mpexport.data.limits import LIMIT_HINT, memory_limit, shown, size_text

STAGE = "val-data"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
SAVEZ_HINT = "save numeric arrays with numpy.savez(path, name=array, ..., labels=labels)"
_READ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, RuntimeError, NotImplementedError, zipfile.LargeZipFile)


@dataclass(frozen=True)
class ArrayHeader:
    """One array of an ``.npz`` file as its header declares it (checked against the archive member's size)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int


def npz_headers(path: Path, what: str = "validation data") -> dict[str, ArrayHeader]:
    """The arrays of the ``.npz`` file ``path``, in archive order, from their headers only (nothing is
    decompressed beyond them). Promises: ``path`` is a regular file (a FIFO or device is refused before it is
    opened) holding a zip archive of at least one ``.npy`` member, each with a sound header, a numeric dtype, no
    negative dimension, a size that agrees with the member's declared size, and each array and all of them together
    within :func:`~mpexport.data.limits.memory_limit`. One-line :class:`MpexportError` otherwise."""
    with _open_archive(path, what) as archive:
        headers: dict[str, ArrayHeader] = {}
        for info in archive.infolist():
            header = _member_header(archive, info, path)
            if header.name in headers:
                raise MpexportError(f"'{shown(path)}' holds two arrays named '{header.name}'", stage=STAGE,
                                    hint=SAVEZ_HINT)
            headers[header.name] = header
    if not headers:
        raise MpexportError(f"'{shown(path)}' holds no arrays", stage=STAGE, hint=SAVEZ_HINT)
    _check_total(path, headers)
    return headers


def read_npz(path: Path, names: list[str] | None = None, what: str = "validation data", *,
             headers: dict[str, ArrayHeader] | None = None) -> dict[str, np.ndarray]:
    """The arrays ``names`` (default: all) of the ``.npz`` file ``path``, read only after :func:`npz_headers`
    has accepted the file (``headers``: what it said, when already asked); a missing name, a member that does not
    match its header, a corrupt member (CRC) or memory running out is one line naming the array and the file."""
    headers = headers if headers is not None else npz_headers(path, what)
    wanted = list(headers) if names is None else names
    arrays: dict[str, np.ndarray] = {}
    with _open_archive(path, what) as archive:
        for name in wanted:
            if name not in headers:
                raise MpexportError(f"'{shown(path)}' has no array '{name}'", stage=STAGE)
            arrays[name] = _read_member(archive, headers[name], path)
    return arrays


def _open_archive(path: Path, what: str) -> zipfile.ZipFile:
    regular_file(path, what, stage=STAGE, hint=SAVEZ_HINT)
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise MpexportError(f"cannot read '{shown(path)}': {exc.strerror}", stage=STAGE) from None
    if magic not in ZIP_MAGICS:
        raise MpexportError(f"'{shown(path)}' is not a readable .npz file (no zip archive inside)", stage=STAGE,
                            hint=SAVEZ_HINT)
    try:
        return zipfile.ZipFile(path)
    except (*_READ_ERRORS, ValueError, MemoryError) as exc:
        raise MpexportError(f"'{shown(path)}' is not a readable .npz file ({first_line(exc)})", stage=STAGE) from None


def _member_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> ArrayHeader:
    if info.is_dir() or not info.filename.endswith(".npy"):
        raise MpexportError(f"'{shown(path)}' holds '{shown(info.filename)}', which is not a .npy array",
                            stage=STAGE, hint=SAVEZ_HINT)
    name = info.filename[: -len(".npy")]
    where = f"array '{shown(name)}' in '{shown(path)}'"
    try:
        with archive.open(info) as stream:
            shape, dtype, offset = _read_header(stream)
    except (ValueError, SyntaxError, TypeError, KeyError, RecursionError, MemoryError, EOFError) as exc:
        raise MpexportError(f"{where} has a damaged header ({first_line(exc, 160)})", stage=STAGE,
                            hint=SAVEZ_HINT) from None
    except _READ_ERRORS as exc:
        raise MpexportError(f"'{shown(path)}' is not a readable .npz file ({first_line(exc)})", stage=STAGE) from None
    except Exception:  # noqa: BLE001 - numpy's header parser raises whatever its tokenizer raises
        raise MpexportError(f"{where} has a damaged header (its dict does not parse)", stage=STAGE,
                            hint=SAVEZ_HINT) from None
    header = ArrayHeader(name, shape, dtype, math.prod(shape) * dtype.itemsize)
    _check_header(header, info.file_size - offset, where)
    return header


def _read_header(stream: IO[bytes]) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, bytes before the data) of a ``.npy`` stream, its header only read."""
    version = npy.read_magic(stream)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "created on Python 2": the header is still read
        if version == (1, 0):
            shape, _, dtype = npy.read_array_header_1_0(stream)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = npy.read_array_header_2_0(stream)
        else:
            raise ValueError(f".npy format version {version[0]}.{version[1]} is unknown")
    return tuple(shape), dtype, stream.tell()


def _check_header(header: ArrayHeader, stored: int, where: str) -> None:
    """Refuse what the header says before anything is allocated for it."""
    if any(dim < 0 for dim in header.shape):
        raise MpexportError(f"{where} has a damaged header: it declares a negative dimension (shape "
                            f"{header.shape})", stage=STAGE, hint=SAVEZ_HINT)
    if header.dtype.hasobject:
        raise MpexportError(f"{where} holds Python objects, not plain arrays (dtype {header.dtype})", stage=STAGE,
                            hint=SAVEZ_HINT)
    if header.dtype.kind not in "biuf":
        raise MpexportError(f"{where} has dtype {header.dtype}, not a number type", stage=STAGE, hint=SAVEZ_HINT)
    if stored != header.nbytes:
        raise MpexportError(f"{where} is damaged: its header declares shape {header.shape} {header.dtype} "
                            f"({size_text(header.nbytes)}), the archive holds {size_text(max(stored, 0))} of data",
                            stage=STAGE, hint=SAVEZ_HINT)
    limit = memory_limit()
    if header.nbytes > limit.bytes:
        raise MpexportError(f"{where} would take {size_text(header.nbytes)} in memory (shape {header.shape} "
                            f"{header.dtype}), over the limit of {limit.text()}", stage=STAGE, hint=LIMIT_HINT)


def _check_total(path: Path, headers: dict[str, ArrayHeader]) -> None:
    """The whole file is read at once: its arrays together must fit the limit too."""
    total = sum(header.nbytes for header in headers.values())
    limit = memory_limit()
    if total > limit.bytes:
        raise MpexportError(f"'{shown(path)}' would take {size_text(total)} in memory ({len(headers)} arrays "
                            f"together), over the limit of {limit.text()}", stage=STAGE, hint=LIMIT_HINT)


def _read_member(archive: zipfile.ZipFile, header: ArrayHeader, path: Path) -> np.ndarray:
    where = f"array '{shown(header.name)}' in '{shown(path)}'"
    try:
        info = archive.getinfo(f"{header.name}.npy")
    except KeyError:
        raise MpexportError(f"{where} is gone: the file changed while it was read", stage=STAGE) from None
    if _member_header(archive, info, path) != header:
        raise MpexportError(f"{where} changed while it was read", stage=STAGE)
    try:
        with archive.open(info) as stream:
            array = npy.read_array(stream, allow_pickle=False)
    except MemoryError:
        raise MpexportError(f"{where} ({size_text(header.nbytes)}) does not fit in the memory left", stage=STAGE,
                            hint=LIMIT_HINT) from None
    except (ValueError, EOFError) as exc:
        raise MpexportError(f"{where} is damaged ({first_line(exc, 160)})", stage=STAGE, hint=SAVEZ_HINT) from None
    except _READ_ERRORS as exc:
        raise MpexportError(f"'{shown(path)}' is not a readable .npz file ({first_line(exc)})", stage=STAGE) from None
    if array.shape != header.shape or array.dtype != header.dtype:
        raise MpexportError(f"{where} changed while it was read", stage=STAGE)
    return array
