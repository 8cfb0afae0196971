"""The TensorRT runner: a serialized engine on torch CUDA tensors (no pycuda), the same interface as every runner.

A ``tensorrt`` module that declares ``MPEXPORT_STAND_IN`` (the test suite's stand-in, ``tests/stand_ins/tensorrt``,
which runs the engine's ONNX in ONNX Runtime on the CPU) is run on CPU tensors instead, and the runner's ``mode``
says so: its numbers are never presented as TensorRT's. With TensorRT itself nothing here differs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

STAND_IN = "MPEXPORT_STAND_IN"
"""The attribute by which a ``tensorrt`` module says it stands in for TensorRT (and what runs instead)."""
_SEVERITIES = ("internal error", "error", "warning", "info", "verbose")
_LOGGERS: dict[int, Any] = {}


def stand_in(trt: Any) -> str | None:
    """What runs instead of TensorRT when ``trt`` is a stand-in module, in words; None for TensorRT itself."""
    value = getattr(trt, STAND_IN, None)
    return str(value) if value else None


def logger(trt: Any) -> Any:
    """The process's TensorRT logger: warnings and errors to stderr, one line each. TensorRT's own ``trt.Logger``
    prints to stdout, where it would corrupt ``--json`` output; and TensorRT keeps one logger per process (a second
    one draws a warning), so builder, parser and runtimes share this one."""
    key = id(trt)
    if key not in _LOGGERS:

        class StderrLogger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                level = int(severity)
                if level <= int(trt.ILogger.WARNING):
                    print(f"[TensorRT] {_SEVERITIES[level]}: {msg}", file=sys.stderr)

        _LOGGERS[key] = StderrLogger()
    return _LOGGERS[key]


class TensorRTRunner:
    """Runs an engine on torch CUDA tensors (no pycuda): ``run(batch)`` like every other backend."""

    name = "tensorrt"
    mode: str | None = None
    """How it ran, where that is not TensorRT on the GPU (a stand-in); None for TensorRT itself."""

    def __init__(self, engine_path: Path) -> None:
        import tensorrt as trt
        import torch

        self.torch = torch
        substitute = stand_in(trt)
        self.device = "cpu" if substitute else "cuda"
        if substitute:
            self.mode = f"stand-in: {substitute}, not TensorRT's numerics"
        self.logger = logger(trt)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine (built by another TensorRT version or for "
                               "another GPU? see its log above); rebuild it with mpexport build")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _torch_dtype(self.engine.get_tensor_dtype(n), torch) for n in self.names}

    def run(self, batch: dict[str, Any]) -> list[Any]:
        torch = self.torch
        stream = torch.cuda.current_stream() if self.device == "cuda" else None
        keep = []
        for name in self.inputs:
            tensor = torch.from_numpy(batch[name]).to(self.device, self.dtypes[name]).contiguous()
            keep.append(tensor)
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise RuntimeError(f"input '{name}' of shape {tuple(tensor.shape)} is outside the engine's "
                                   "optimization profile (rebuild it with mpexport build --shapes, or verify with "
                                   "a smaller --batch-size)")
            self.context.set_tensor_address(name, tensor.data_ptr())
        results = []
        for name in self.outputs:
            tensor = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name],
                                 device=self.device)
            results.append(tensor)
            self.context.set_tensor_address(name, tensor.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream if stream is not None else 0):
            raise RuntimeError("TensorRT execution failed")
        if stream is not None:
            stream.synchronize()
        return [tensor.float().cpu().numpy() for tensor in results]


def _torch_dtype(dtype: Any, torch: Any) -> Any:
    import tensorrt as trt

    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
            trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool, trt.int8: torch.int8}[dtype]
