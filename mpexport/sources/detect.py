"""A model file's format, from its content (never its name): zip archives told apart by their entries, ONNX by a
walk over the protobuf header, other formats named in the refusal."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import BinaryIO

from mpexport.base.errors import MpexportError, first_line
from mpexport.sources.model import FORMAT_EXPORT, FORMAT_ONNX, FORMAT_TORCHSCRIPT, STAGE


def detect_format(path: Path, head: bytes) -> str:
    """Return the format of a model file from its bytes, or raise with what the file looks like instead."""
    if not head:
        raise MpexportError(f"'{path}' is empty", stage=STAGE)
    if head.startswith(b"PK\x03\x04"):
        return _detect_zip_format(path)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "legacy-pickle"
    if head[:1] == b"\x08" and _is_onnx(path):
        return FORMAT_ONNX
    raise MpexportError(f"'{path}' is not a model file mpexport reads ({_describe_foreign(head)})", stage=STAGE,
                        hint="give a torch.export .pt2, a TorchScript file, a checkpoint with --factory, "
                        "a pickled module with --trust-pickle, or an FP32 ONNX model")


def _detect_zip_format(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise MpexportError(f"'{path}' is corrupt or truncated ({first_line(exc)})", stage=STAGE) from None
    leaves = {name.split("/", 1)[-1] for name in names}
    if "archive_format" in leaves or any(name.startswith("models/") for name in leaves):
        return FORMAT_EXPORT
    if "constants.pkl" in leaves and any(name.startswith("code/") for name in leaves):
        return FORMAT_TORCHSCRIPT
    if "data.pkl" in leaves:
        return "zip-pickle"
    raise MpexportError(f"'{path}' is a zip archive but not a PyTorch model file", stage=STAGE)


def _describe_foreign(head: bytes) -> str:
    if len(head) >= 10 and head[8:10] == b'{"':
        return "it looks like a safetensors file, which mpexport does not read yet; save a state dict with torch.save"
    try:
        head.decode("utf-8")
        return "it looks like a text file"
    except UnicodeDecodeError:
        return "unknown binary content"


ONNX_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
"""ModelProto's field numbers and their protobuf wire types (0 varint, 2 length-delimited)."""


def _is_onnx(path: Path) -> bool:
    """Whether the file starts as a serialized ``ModelProto`` does: ``ir_version`` first, then ModelProto fields
    with their wire types, lengths within the file. Reads a few bytes and seeks past the payloads (the whole model
    is parsed once, later, when it is read)."""
    size = path.stat().st_size
    with path.open("rb") as file:
        fields = 0
        while file.tell() < size and fields < 16:
            tag = _varint(file)
            if tag is None or ONNX_MODEL_FIELDS.get(tag >> 3) != tag & 7 or (fields == 0 and tag != 0x08):
                return False
            value = _varint(file)
            if value is None or (fields == 0 and not 1 <= value <= 64):  # ir_version
                return False
            if tag & 7 == 2:
                if file.tell() + value > size:
                    return True  # ir_version, then a truncated field: reading the model says so
                file.seek(value, 1)
            fields += 1
    return fields >= 2


def _varint(file: BinaryIO) -> int | None:
    value = shift = 0
    for _ in range(10):
        byte = file.read(1)
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
    return None
