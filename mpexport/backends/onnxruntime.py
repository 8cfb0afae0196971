"""The ONNX Runtime runner and its sessions: options for large models (weights shared in place or memory-mapped,
no arena), threads, sessions of in-memory onnx-ir models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mpexport.base.dtypes import BF16, NUMPY_TYPES
from mpexport.base.specs import Batch, TensorSpec

ORT_FLOAT_TYPES: dict[str, np.dtype] = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
                   "tensor(double)": np.dtype(np.float64), "tensor(bfloat16)": NUMPY_TYPES[BF16]}
"""ONNX Runtime's names of the floating-point input types, as numpy dtypes."""
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
"""ONNX Runtime's session setting: where a model loaded from bytes finds its external data."""


class OrtRunner:
    """An ONNX model in an ONNX Runtime session (CPU unless ``providers`` says otherwise)."""

    def __init__(self, path: str | Path, *, providers: Sequence[str] = ("CPUExecutionProvider",),
                 name: str = "onnx-fp32", shared_weights: Mapping[str, np.ndarray] | None = None,
                 low_memory: bool = False) -> None:
        """``shared_weights`` and ``low_memory``: see :func:`session_options`."""
        import onnxruntime as ort

        options, self._shared = session_options(shared_weights, low_memory=low_memory)
        self.name = name
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        self._describe_session()

    def _describe_session(self) -> None:
        self.input_names = [value.name for value in self.session.get_inputs()]
        self.output_names = [value.name for value in self.session.get_outputs()]
        self.float_inputs = {value.name: ORT_FLOAT_TYPES[value.type] for value in self.session.get_inputs()
                             if value.type in ORT_FLOAT_TYPES}

    @classmethod
    def from_model(cls, model: Any, base_dir: str | Path, *, name: str, low_memory: bool = False,
                   shared_weights: Mapping[str, np.ndarray] | None = None) -> OrtRunner:
        """A runner of an in-memory onnx-ir model (a variant of a model file, e.g. its strict emulation): no
        file is written; external weights are read from ``base_dir`` (see :func:`ir_session`)."""
        runner = cls.__new__(cls)
        runner.name = name
        runner._shared = []
        runner.session = ir_session(model, base_dir, optimization="all", low_memory=low_memory,
                                    shared_weights=shared_weights)
        runner._describe_session()
        return runner

    def run(self, batch: Batch) -> list[np.ndarray]:
        """Outputs for ``batch``; float inputs are cast to the type the model takes (FP16 for a model with
        native low-precision inputs), so callers always feed the FP32 data they validate with. ONNX Runtime's
        errors are raised as :class:`OrtRunError`, their whole text on one line (see :func:`one_line`)."""
        feeds = {}
        for name in self.input_names:
            array = batch[name]
            wanted = self.float_inputs.get(name)
            if wanted is not None and array.dtype.kind == "f" and array.dtype != wanted:
                array = array.astype(wanted)
            feeds[name] = np.require(array, requirements="C")  # a rank-0 input stays rank 0
        try:
            return list(self.session.run(None, feeds))
        except Exception as exc:
            raise OrtRunError(f"{self.name}: {one_line(str(exc))}") from exc


class OrtRunError(RuntimeError):
    """ONNX Runtime refused or failed a run; the message is its error on one line."""


ORT_BOILERPLATE = ("Please fix either the inputs/outputs or the model.",)
"""Sentences of ONNX Runtime's errors that say nothing about the case at hand."""


def one_line(text: str) -> str:
    """ONNX Runtime's error text on one line: its lines joined (the first says what, the next ones where: ``index: 0
    Got: 64 Expected: 1``), the ``[ONNXRuntimeError] : N :`` prefix and the generic advice left out."""
    import re

    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : ", "", text.strip())
    lines = [line.strip() for line in text.splitlines()]
    return " ".join(line for line in lines if line and line not in ORT_BOILERPLATE)


ORT_TYPE_NAMES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
                  "tensor(bfloat16)": "bfloat16", "tensor(int64)": "int64", "tensor(int32)": "int32",
                  "tensor(int16)": "int16", "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}
"""ONNX Runtime's names of the tensor types mpexport records, as its dtype names."""


def runtime_output_specs(path: str | Path) -> dict[str, TensorSpec]:
    """The outputs of the model at ``path`` as ONNX Runtime types them (its own inference, contrib ops included), by
    name; an output of a type mpexport does not record is left out. Unknown dims are ``?``."""
    import onnxruntime as ort

    options, _ = session_options()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return {value.name: TensorSpec(value.name, ORT_TYPE_NAMES[value.type],
                                   tuple(dim if isinstance(dim, (int, str)) else "?" for dim in value.shape or ()))
            for value in session.get_outputs() if value.type in ORT_TYPE_NAMES}


SESSION_THREADS: int | None = None
"""Threads of every ONNX Runtime session this process builds (None: ONNX Runtime's default, one per core); see
:func:`limit_threads`."""


def limit_threads(threads: int) -> None:
    """Make this process's backends use ``threads`` threads: PyTorch's intra-op pool and every ONNX Runtime session
    built from now on (a worker that shares a machine with others, e.g. one Ray actor per core)."""
    import torch

    global SESSION_THREADS
    SESSION_THREADS = threads
    torch.set_num_threads(threads)


M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter: the allocation size from which malloc maps memory of its own."""


def return_large_blocks() -> bool:
    """Make this process's allocations of 128 KiB and up their own mappings, returned to the system when freed
    (glibc only; process-wide). glibc otherwise raises that threshold to 32 MiB after the first large free, and
    a first ONNX Runtime run's freed FP32 casts of FP16 weights stay in the heap (GPT-2-large's mixed session,
    8 x 128 tokens: first-run peak 4.2 -> 2.4 GB). True when set."""
    import ctypes

    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 * 1024))
    except (OSError, AttributeError):  # not glibc
        return False


def mapped_weights(path: str | Path, *, smallest: int = 1 << 20) -> dict[str, np.ndarray]:
    """The FP32 and FP16 initializers of the ONNX file ``path`` kept in its external data (``smallest`` bytes and
    up), as arrays memory-mapped from that file (copy-on-write: nothing is read until used, and the pages are the
    file's): sessions given them as shared weights hold one copy between them instead of one each."""
    import onnx_ir as ir

    model = ir.load(str(path))
    kinds = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}
    files: dict[Path, np.memmap] = {}
    mapped = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor) or value.dtype not in kinds or tensor.nbytes < smallest:
            continue
        kind = np.dtype(kinds[value.dtype])
        offset = tensor.offset or 0
        if offset % kind.itemsize:
            continue
        file = Path(tensor.path)
        if file not in files:
            files[file] = np.memmap(file, dtype=np.uint8, mode="c")
        raw = files[file][offset:offset + tensor.nbytes]
        mapped[name] = raw.view(kind).reshape(tuple(int(dim) for dim in tensor.shape.numpy()))
    return mapped


def session_options(shared_weights: Mapping[str, np.ndarray] | None = None, *,
                    low_memory: bool = False) -> tuple[Any, list[Any]]:
    """Quiet ONNX Runtime session options, and the values a session made with them must keep alive.
    ``shared_weights``: initializers by name that the session uses in place instead of reading them from the
    file (no copy), e.g. the PyTorch parameters the model was exported from. Weight pre-packing is then off:
    a packed copy would duplicate them after all. ``low_memory``: no graph optimizations and no memory arena,
    for a large low-precision model on the CPU: constant folding would keep an FP32 copy of every weight the CPU
    kernels need cast, and the arena would keep each run's casts (GPT-2-large: 2.0 GB instead of 4.1 GB per
    session, about 25% slower); nodes run in priority order (see below)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if low_memory:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.enable_cpu_mem_arena = False
        # ONNX Runtime's default order runs the casts of FP16 weights to FP32 that the CPU kernels need early,
        # holding many at once; the priority-based order runs each closer to its consumer (GPT-2-large, 8 x 128
        # tokens: run peak 5.0 -> 4.0 GB)
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.log_severity_level = 3
    if SESSION_THREADS:
        options.intra_op_num_threads = SESSION_THREADS
    # ONNX Runtime's worker threads spin after each run by default: with several sessions beside PyTorch on a
    # few cores, the spinning starves the next backend (a one-sample PyTorch call measured 125 ms instead of 5).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    values = [ort.OrtValue.ortvalue_from_numpy(array) for array in (shared_weights or {}).values()]
    for name, value in zip(shared_weights or {}, values, strict=True):
        options.add_initializer(name, value)
    if values:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options, values


def ir_session(model: Any, base_dir: str | Path, *, in_graph_order: bool = False,
               shared_weights: Mapping[str, np.ndarray] | None = None, optimization: str = "basic",
               low_memory: bool = False) -> Any:
    """An ONNX Runtime CPU session of an in-memory onnx-ir model; its external tensors (a model loaded from a
    file with external data) are read from ``base_dir``, so a model of any size loads without a copy on disk.
    ``in_graph_order``: run nodes in the graph's order where dependencies allow (ONNX Runtime's default order
    may run a node placed right after its input's producer much later, keeping that input alive meanwhile).
    ``shared_weights``, ``low_memory``: see :func:`session_options`. ``optimization``: ONNX Runtime's graph
    optimizations unless ``low_memory``, ``basic`` (constant folding and the like: the graph's own numerics) or
    ``all`` (its default, fusions too)."""
    import onnx_ir as ir
    import onnxruntime as ort

    options, shared = session_options(shared_weights, low_memory=low_memory)
    if not low_memory:  # low memory runs unoptimized (session_options)
        options.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
    options.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(Path(base_dir).resolve()))
    if in_graph_order:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.shared_weights = shared  # ONNX Runtime reads them in place: they must live as long as the session
    return session






