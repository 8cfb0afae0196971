"""Zip-based model files (``.pt2``, TorchScript, zip checkpoints) checked before torch reads them.

* :func:`check_zip_integrity`: every entry read once and its CRC-32 checked. torch's zip reader never checks CRCs,
  so flipped bytes inside a stored weight would otherwise load as a silently different model.
* :func:`archive_refusals`: what a ``torch.export`` archive would make torch run, found without running it:
  weights and constants its payload configs mark ``use_pickle`` (torch unpickles them with
  ``torch.load(weights_only=False)``), torchbind custom objects (``torch._C._pickle_load_obj``) and opaque objects
  (``pickle.loads``), sample inputs that only a full-trust unpickling reads (torch falls back to
  ``weights_only=False`` when ``weights_only=True`` fails), symbolic shapes that are not plain sympy expressions
  (torch parses them with ``sympy.sympify``, which evaluates Python), and AOTInductor libraries (loaded as native
  code). :mod:`mpexport.sources.guard` makes the same loads raise while torch reads the archive, in case this scan
  misses one.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mpexport.base.errors import MpexportError, first_line
from mpexport.sources.guard import unsafe_expression
from mpexport.sources.model import STAGE

CHUNK = 1 << 20
MAX_EXPANSION = 1000
"""Most an entry may expand (uncompressed / compressed size) beyond :data:`EXPANSION_FLOOR`: a zip bomb is refused."""
EXPANSION_FLOOR = 64 << 20
TRUST_HINT = "pass --trust-pickle only if you trust the file and where it came from"
PAYLOAD_CONFIG = re.compile(r"data/(weights|constants)/(.+)_(weights|constants)_config\.json")
SAMPLE_INPUTS = re.compile(r"data/sample_inputs/[^/]+\.pt")
MODEL_JSON = re.compile(r"models/[^/]+\.json")
AOTI_DIR = "data/aotinductor/"


def check_zip_integrity(path: Path) -> None:
    """Read every entry of the zip at ``path`` once and check its CRC-32 (and that it expands no more than
    :data:`MAX_EXPANSION` times past :data:`EXPANSION_FLOOR`). One-line :class:`MpexportError` naming the first
    damaged entry; nothing is kept in memory but one chunk."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                _check_entry(path, archive, info)
    except zipfile.BadZipFile as exc:
        raise MpexportError(f"'{path}' is not a readable zip archive: {first_line(exc)}", stage=STAGE,
                            hint="the file may be truncated or corrupt") from None
    except OSError as exc:
        raise MpexportError(f"cannot read '{path}': {exc.strerror or first_line(exc)}", stage=STAGE) from None


def _check_entry(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    if info.compress_size and info.file_size > max(EXPANSION_FLOOR, MAX_EXPANSION * info.compress_size):
        raise MpexportError(f"'{path}' entry '{info.filename}' expands {info.compress_size} bytes to "
                            f"{info.file_size}: a zip bomb, not a model file", stage=STAGE)
    try:
        with archive.open(info) as entry:
            while entry.read(CHUNK):
                pass
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
        raise MpexportError(
            f"'{path}' is damaged: entry '{info.filename}' fails its check ({first_line(exc)})", stage=STAGE,
            hint="copy the file again from where training saved it; torch itself would load the damaged bytes "
            "without a word") from None


def local_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where the data of the zip entry ``info`` starts in the file at ``path`` (after its local header, whose extra
    field may differ from the central directory's)."""
    with path.open("rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


def archive_refusals(path: Path) -> list[str]:
    """Every payload of the ``torch.export`` archive at ``path`` that loading it would run or unpickle with full
    trust, each named with the file that asks for it; empty when loading it runs nothing from the file. Reads the
    payload configs, model graphs and sample inputs, never unpickling with trust."""
    found: list[str] = []
    with zipfile.ZipFile(path) as archive:
        for info, leaf in _entries(archive):
            if leaf.startswith(AOTI_DIR):
                found.append(f"AOTInductor compiled code ({leaf}), which torch loads as a native library")
            elif match := PAYLOAD_CONFIG.fullmatch(leaf):
                found += _pickled_payloads(archive.read(info), leaf, constants=match.group(1) == "constants")
            elif SAMPLE_INPUTS.fullmatch(leaf):
                found += _unsafe_sample_inputs(archive.read(info), leaf)
            elif MODEL_JSON.fullmatch(leaf):
                found += _unsafe_expressions(archive.read(info), leaf)
    return _unique(found)


def _entries(archive: zipfile.ZipFile) -> Iterator[tuple[zipfile.ZipInfo, str]]:
    """Every entry (duplicates included) with its name inside the archive's root folder: torch reads the records
    under the first entry's folder, so every folder is read as if it were that one."""
    for info in archive.infolist():
        yield info, info.filename.split("/", 1)[-1]


def _pickled_payloads(data: bytes, leaf: str, *, constants: bool) -> list[str]:
    """The weights or constants a payload config makes torch unpickle (``use_pickle`` anything true, or a
    constant stored as a custom or opaque object)."""
    try:
        config = json.loads(data)
        entries = config["config"]
        items = list(entries.items())
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return [f"a payload config that is not torch's ({leaf})"]
    kind = "constant" if constants else "weight"
    found = []
    for name, meta in items:
        path_name = str(meta.get("path_name", "")) if isinstance(meta, dict) else ""
        if not isinstance(meta, dict):
            found.append(f"{kind} '{name}' with a malformed entry in {leaf}")
        elif constants and path_name.startswith(("custom_obj_", "opaque_obj_")):
            found.append(f"constant '{name}' ({path_name} in {leaf}), a pickled Python object")
        elif meta.get("use_pickle"):
            found.append(f"{kind} '{name}' (use_pickle in {leaf}), which torch unpickles with full trust")
    return found


def _unsafe_sample_inputs(data: bytes, leaf: str) -> list[str]:
    """The sample inputs, when ``weights_only`` unpickling refuses them (torch would then retry with full trust)."""
    import pickle

    import torch

    if not data:
        return []
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        return [f"sample inputs {leaf} that only full-trust unpickling reads ({first_line(exc, 120)})"]
    return []


def _unsafe_expressions(data: bytes, leaf: str) -> list[str]:
    """Symbolic shapes (``expr_str``) in a model graph that are not plain sympy expressions."""
    found: list[str] = []

    def hook(obj: dict[str, Any]) -> dict[str, Any]:
        text = obj.get("expr_str")
        if isinstance(text, str) and unsafe_expression(text) and len(found) < 3:
            found.append(f"a symbolic shape in {leaf} that is Python code, not an expression ({text[:60]!r})")
        return obj

    try:
        json.loads(data, object_hook=hook)
    except RecursionError:
        return [f"a model graph nested too deeply to read ({leaf})"]
    except ValueError:
        return []  # not JSON: torch refuses it without running anything
    return found


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def refuse_untrusted(path: Path, found: list[str]) -> None:
    """Raise the one-line refusal for an archive whose loading would run ``found`` (nothing when empty)."""
    if not found:
        return
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    raise MpexportError(f"'{path}' holds {found[0]}{more}: loading it would run code from the file; nothing was run",
                        stage=STAGE, hint=TRUST_HINT)
