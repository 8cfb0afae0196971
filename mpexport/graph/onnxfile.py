"""Writing ONNX files with bounded memory.

A model with external data is written by onnx-ir, which streams its weights tensor by tensor. A model saved as
one file is one protobuf message, and serializing it whole costs about three times its size at once (the
encoder's growing buffer, then the copy into Python bytes). Here its initializers are serialized one at a time
and the file is assembled from the pieces, which protobuf defines to be the same message: a message's encoding
is the concatenation of its fields' encodings, in any order.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from mpexport.graph.weights import reduce_tensor

GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
INITIALIZER_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_LENGTH_DELIMITED = 2


def save_model(model: ir.Model, path: str | Path, *, external_data: str | None = None) -> None:
    """Save ``model`` to ``path``: with its weights in ``external_data`` (a file name beside ``path``) when given,
    streamed; else as one self-contained file (weights read from another model's external data are copied in),
    holding the serialized weights once plus one tensor's encoding at a time."""
    if external_data is not None:
        ir.save(model, path, external_data=external_data)
        return
    values = [value for value in model.graph.initializers.values() if value.const_value is not None]
    head = model_without_initializers(model, values)
    graph = head.graph.SerializeToString()
    head.ClearField("graph")
    pieces = []
    for value in values:
        assert value.const_value is not None  # kept only initializers with a tensor above
        source = value.const_value
        tensor = reduce_tensor(source, _inline_proto) if isinstance(source, ir.ExternalTensor) else \
            ir.serde.serialize_tensor(source)
        tensor.name = value.name or ""
        pieces.append(tensor.SerializeToString())
    graph_length = len(graph) + sum(len(_field_header(INITIALIZER_FIELD, len(piece))) + len(piece)
                                    for piece in pieces)
    with open(path, "wb") as file:
        file.write(head.SerializeToString())
        file.write(_field_header(GRAPH_FIELD, graph_length))
        file.write(graph)
        for piece in pieces:
            file.write(_field_header(INITIALIZER_FIELD, len(piece)))
            file.write(piece)


def model_without_initializers(model: ir.Model, values: list[ir.Value]) -> onnx.ModelProto:
    """The model's proto without the main graph's initializers in ``values`` (their value infos stay): the graph
    and the other weights, for a tool that needs no weight data (the checker, shape inference). ``model`` is left as
    it was."""
    tensors = [value.const_value for value in values]
    logger = logging.getLogger(ir.serde.__name__)
    level = logger.level
    logger.setLevel(logging.ERROR)  # onnx-ir warns about each initializer without data
    try:
        for value in values:
            value.const_value = None
        return ir.serde.serialize_model(model)
    finally:
        logger.setLevel(level)
        for value, tensor in zip(values, tensors, strict=True):
            value.const_value = tensor


def _inline_proto(array: np.ndarray) -> onnx.TensorProto:
    """The proto of a tensor read from another model's external data file, with its data inline."""
    return ir.serde.serialize_tensor(ir.tensor(array))


def _field_header(number: int, length: int) -> bytes:
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(length)


def _varint(number: int) -> bytes:
    encoded = bytearray()
    while True:
        byte, number = number & 0x7F, number >> 7
        encoded.append(byte | (0x80 if number else 0))
        if not number:
            return bytes(encoded)
