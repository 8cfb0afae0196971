"""Backends that run a model on a batch of named numpy arrays and return its outputs as numpy arrays.

Every runner has the same interface, so comparisons do not care which backend they compare.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils import _pytree as pytree

Batch = dict[str, np.ndarray]
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
"""ONNX Runtime's session setting: where a model loaded from bytes finds its external data."""


class Runner(Protocol):
    """Runs one model: ``run(batch)`` returns the flat list of outputs, in the model's output order."""

    name: str

    def run(self, batch: Batch) -> list[np.ndarray]:
        """Outputs for one batch of named inputs."""


class TorchRunner:
    """A PyTorch callable in FP32 on CPU, inputs passed by name (or by position for positional-only models)."""

    def __init__(self, model: Callable[..., Any], input_names: Sequence[str], *, positional: bool = False,
                 name: str = "torch-fp32") -> None:
        self.name = name
        self.model = model
        self.input_names = list(input_names)
        self.positional = positional

    def run(self, batch: Batch) -> list[np.ndarray]:
        tensors = [torch.from_numpy(np.ascontiguousarray(batch[name])) for name in self.input_names]
        with torch.no_grad():
            if self.positional:
                result = self.model(*tensors)
            else:
                result = self.model(**dict(zip(self.input_names, tensors, strict=True)))
        return [leaf.detach().float().numpy() if leaf.dtype == torch.bfloat16 else leaf.detach().numpy()
                for leaf in flatten_outputs(result)]


class OrtRunner:
    """An ONNX model in an ONNX Runtime session (CPU unless ``providers`` says otherwise)."""

    def __init__(self, path: str | Path, *, providers: Sequence[str] = ("CPUExecutionProvider",),
                 name: str = "onnx-fp32", shared_weights: Mapping[str, np.ndarray] | None = None) -> None:
        """``shared_weights``: see :func:`session_options`."""
        import onnxruntime as ort

        options, self._shared = session_options(shared_weights)
        self.name = name
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        self.input_names = [value.name for value in self.session.get_inputs()]
        self.output_names = [value.name for value in self.session.get_outputs()]

    def run(self, batch: Batch) -> list[np.ndarray]:
        feeds = {name: np.ascontiguousarray(batch[name]) for name in self.input_names}
        return list(self.session.run(None, feeds))


def session_options(shared_weights: Mapping[str, np.ndarray] | None = None) -> tuple[Any, list[Any]]:
    """Quiet ONNX Runtime session options, and the values a session made with them must keep alive.
    ``shared_weights``: initializers by name that the session uses in place instead of reading them from the
    file (no copy), e.g. the PyTorch parameters the model was exported from. Weight pre-packing is then off:
    a packed copy would duplicate them after all."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    values = [ort.OrtValue.ortvalue_from_numpy(array) for array in (shared_weights or {}).values()]
    for name, value in zip(shared_weights or {}, values, strict=True):
        options.add_initializer(name, value)
    if values:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options, values


def ir_session(model: Any, base_dir: str | Path, *, in_graph_order: bool = False,
               shared_weights: Mapping[str, np.ndarray] | None = None) -> Any:
    """An ONNX Runtime CPU session of an in-memory onnx-ir model; its external tensors (a model loaded from a
    file with external data) are read from ``base_dir``, so a model of any size loads without a copy on disk.
    ``in_graph_order``: run nodes in the graph's order where dependencies allow (ONNX Runtime's default order
    may run a node placed right after its input's producer much later, keeping that input alive meanwhile).
    ``shared_weights``: see :func:`session_options`."""
    import onnx_ir as ir
    import onnxruntime as ort

    options, shared = session_options(shared_weights)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(Path(base_dir).resolve()))
    if in_graph_order:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.shared_weights = shared  # ONNX Runtime reads them in place: they must live as long as the session
    return session


def flatten_outputs(result: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (tensor, tuple, dict, dataclass-like ModelOutput), in pytree order."""
    leaves, _ = pytree.tree_flatten(result)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def output_names(result: Any) -> list[str]:
    """Readable, unique names for a model's flattened outputs: ``output`` for a single tensor, dict keys and
    attribute names for structured outputs (``logits``, ``hidden_states_0``), ``output_0``... otherwise."""
    flat, _ = pytree.tree_flatten_with_path(result)
    tensors = [(path, leaf) for path, leaf in flat if isinstance(leaf, torch.Tensor)]
    if len(tensors) == 1 and not tensors[0][0]:
        return ["output"]
    names: list[str] = []
    for index, (path, _) in enumerate(tensors):
        parts = [_key_text(key) for key in path]
        name = re.sub(r"\W+", "_", "_".join(part for part in parts if part)).strip("_") or f"output_{index}"
        if name[0].isdigit():
            name = f"output_{name}"
        while name in names:
            name = f"{name}_{index}"
        names.append(name)
    return names


def _key_text(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)
