"""A test-only stand-in for the ``tensorrt`` package: exactly the part of TensorRT's Python API that mpexport calls
(``mpexport/deploy/tensorrt.py``, ``mpexport/backends/tensorrt.py``), with the names, enum values and parameter names
of TensorRT's binding sources (``tests/deploy/tensorrt_api.json``; ``tests/deploy/test_tensorrt_api.py`` checks that
nothing here is absent from them). Put on ``sys.path`` only by the tests that use it.

It is not TensorRT. "Building" writes an engine file that holds the parsed ONNX model itself (with a JSON header: the
version, the network flags, the profiles); "executing" runs that ONNX in ONNX Runtime on the CPU, reading and
writing the tensors through the addresses given to ``set_tensor_address`` (CPU memory: the module declares
``MPEXPORT_STAND_IN``, and mpexport then runs it on CPU tensors and labels its numbers as not TensorRT's). What it
models of TensorRT: the version it pretends to be (``MPEXPORT_STAND_IN_TENSORRT_VERSION``, default 11.0.0; 10.x and
11.x differ in ``NetworkDefinitionCreationFlag``'s values and in the inspector's JSON), strong typing (a 10.x network
without ``STRONGLY_TYPED`` is weakly typed and, with no FP16 builder flag, built in FP32; on 11.x the flag is
deprecated and ignored), profiles (inputs outside them are refused), timing caches (unreadable bytes give none,
another device's is refused), engines refused by another version, TF32 on by default, the
inspector's layer listing (one layer per ONNX node, ``[ONNX Layer: <node>]`` metadata; 11.x: ``DataType`` and
``I/O Tensors``; 10.x: ``Format/Datatype`` and ``Bindings``), and failures reported as TensorRT reports them (False
or None, and a message to the logger).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from enum import IntEnum
from typing import Any

import numpy as np
import onnx

__version__ = os.environ.get("MPEXPORT_STAND_IN_TENSORRT_VERSION", "11.0.0")
MPEXPORT_STAND_IN = "ONNX Runtime on CPU"
MPEXPORT_STAND_IN_COMPUTE_CAPABILITY = "9.0"
_MAJOR = int(__version__.split(".")[0])
_ENGINE_MAGIC = b"mpexport stand-in engine\n"
_CACHE_MAGIC = b"mpexport stand-in timing cache\n"


class DataType(IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    BF16 = 7
    INT64 = 8


class TensorIOMode(IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class BuilderFlag(IntEnum):
    TF32 = 6


NetworkDefinitionCreationFlag = IntEnum("NetworkDefinitionCreationFlag",
                                        {"STRONGLY_TYPED": 1 if _MAJOR < 11 else 0})
"""``kSTRONGLY_TYPED`` is 1 in 10.x (after ``kEXPLICIT_BATCH``), 0 in 11.x (deprecated, ignored)."""


class MemoryPoolType(IntEnum):
    WORKSPACE = 0


class ProfilingVerbosity(IntEnum):
    LAYER_NAMES_ONLY = 0  # the default
    DETAILED = 2


class LayerInformationFormat(IntEnum):
    JSON = 1


class ILogger:
    """The logger interface: subclasses implement ``log``."""

    class Severity(IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = Severity  # ``.export_values()``

    def __init__(self) -> None:
        pass

    def log(self, severity: ILogger.Severity, msg: str) -> None:
        raise RuntimeError('Tried to call pure virtual function "ILogger::log"')


class IHostMemory:
    """Serialized data (TensorRT's exposes the buffer protocol; ``bytes()`` reads it here too)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __bytes__(self) -> bytes:
        return self._data


class ITensor:
    """A network input."""

    def __init__(self, name: str) -> None:
        self._name = name

    @property
    def name(self) -> str:
        return self._name


class INetworkDefinition:
    """The network a parser fills (here: the ONNX model itself)."""

    def __init__(self, flags: int) -> None:
        self._flags = flags
        self._model: onnx.ModelProto | None = None

    @property
    def num_inputs(self) -> int:
        return len(_graph_inputs(self._model)) if self._model is not None else 0

    def get_input(self, index: int) -> ITensor:
        return ITensor(_graph_inputs(self._model)[index].name)


class ParserError:
    """One error of the ONNX parser."""

    def __init__(self, desc: str, node: int = -1, node_name: str = "") -> None:
        self._desc, self._node, self._node_name = desc, node, node_name

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return self._node

    def node_name(self) -> str:
        return self._node_name


class OnnxParser:
    """Fills a network from an ONNX file."""

    def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
        self._network, self._logger, self._errors = network, logger, []

    def parse_from_file(self, model: str) -> bool:
        try:
            proto = onnx.load(model)
        except Exception as exc:  # noqa: BLE001 - reported as the parser reports it
            self._errors.append(ParserError(f"Failed to parse ONNX model from file: {model}: {exc}"))
            return False
        for index, node in enumerate(proto.graph.node):
            if node.domain not in ("", "ai.onnx"):
                self._errors.append(ParserError(f"No importer registered for op: {node.op_type}", index, node.name))
        if self._errors:
            return False
        self._network._model = proto
        return True

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> ParserError:
        return self._errors[index]


class IOptimizationProfile:
    """Shapes (min, opt, max) per input."""

    def __init__(self) -> None:
        self._shapes: dict[str, list[list[int]]] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
        self._shapes[input] = [list(min), list(opt), list(max)]


class ITimingCache:
    """A timing cache. The stand-in times nothing: it records the "device" (here the version) it was made on, so
    that one from elsewhere is refused as TensorRT refuses another GPU's."""

    def __init__(self, device: str) -> None:
        self._device = device

    def serialize(self) -> IHostMemory:
        return IHostMemory(_CACHE_MAGIC + self._device.encode() + b"\n")


class IBuilderConfig:
    """Build settings."""

    def __init__(self, logger: ILogger) -> None:
        self._logger = logger
        self._flags = {BuilderFlag.TF32}
        self._pools: dict[int, int] = {}
        self._profiles: list[IOptimizationProfile] = []
        self._verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY
        self._cache: ITimingCache | None = None

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        self._pools[int(pool)] = int(pool_size)

    @property
    def profiling_verbosity(self) -> ProfilingVerbosity:
        return self._verbosity

    @profiling_verbosity.setter
    def profiling_verbosity(self, value: ProfilingVerbosity) -> None:
        self._verbosity = ProfilingVerbosity(value)

    def clear_flag(self, flag: BuilderFlag) -> None:
        self._flags.discard(BuilderFlag(flag))

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self._profiles.append(profile)
        return len(self._profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache | None:
        data = bytes(serialized_timing_cache)
        if not data:
            return ITimingCache(__version__)
        if not data.startswith(_CACHE_MAGIC):
            return _fail(self._logger, "IBuilderConfig::createTimingCache: Error Code 1: the timing cache is corrupt")
        return ITimingCache(data[len(_CACHE_MAGIC):].decode().strip())

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if cache._device != __version__ and not ignore_mismatch:
            _log(self._logger, ILogger.ERROR, "IBuilderConfig::setTimingCache: Error Code 3: the timing cache was "
                 f"made on another device ({cache._device})")
            return False
        self._cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self._cache


class Builder:
    """Builds serialized engines."""

    def __init__(self, logger: ILogger) -> None:
        self._logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(int(flags))

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig(self._logger)

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        model = network._model
        if model is None:
            return _fail(self._logger, "Network must have at least one output")
        strongly_typed = _strongly_typed(network._flags, self._logger)
        profiles = config._profiles[0]._shapes if config._profiles else {}
        problem = _profile_problem(model, profiles)
        if problem:
            return _fail(self._logger, problem)
        onnx_bytes = model.SerializeToString()
        header = {"tensorrt": __version__, "stand_in": MPEXPORT_STAND_IN, "strongly_typed": strongly_typed,
                  "tf32": BuilderFlag.TF32 in config._flags, "verbosity": config._verbosity.name,
                  "profiles": profiles, "workspace": config._pools.get(int(MemoryPoolType.WORKSPACE)),
                  "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest()}
        return IHostMemory(_ENGINE_MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + onnx_bytes)


class EngineInspector:
    """The engine's layer listing."""

    def __init__(self, engine: ICudaEngine) -> None:
        self._engine = engine

    def get_engine_information(self, format: LayerInformationFormat) -> str:
        engine = self._engine
        detailed = engine._header["verbosity"] == "DETAILED"
        layers = _layers(engine._model, detailed, engine._header["strongly_typed"])
        LayerInformationFormat(format)  # the only format mpexport asks for
        io = [{"Name": name, "IOMode": "Input" if mode == TensorIOMode.INPUT else "Output",
               "DataType": _TYPE_NAMES_11[dtype]} for name, mode, dtype, _ in engine._io]
        return json.dumps({"Layers": layers, "I/O Tensors" if _MAJOR >= 11 else "Bindings":
                           io if _MAJOR >= 11 else [entry["Name"] for entry in io]})


class IExecutionContext:
    """Runs the engine: shapes and addresses set per tensor, then ``execute_async_v3``."""

    def __init__(self, engine: ICudaEngine) -> None:
        self._engine = engine
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: Any) -> bool:
        shape = tuple(int(dim) for dim in shape)
        low, _, high = self._engine._header["profiles"][name]
        if len(shape) != len(low) or any(not lo <= dim <= hi for lo, dim, hi in zip(low, shape, high, strict=True)):
            _log(self._engine._logger, ILogger.ERROR, f"IExecutionContext::setInputShape: Error Code 3: API Usage "
                 f"Error (shape {shape} of '{name}' is outside the profile's {low} to {high})")
            return False
        self._shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self._shapes:
            return self._shapes[name]
        symbols = {}
        for input_name, input_mode, _, dims in self._engine._io:
            if input_mode == TensorIOMode.INPUT and input_name in self._shapes:
                symbols.update({dim: size for dim, size in zip(dims, self._shapes[input_name], strict=True)
                                if isinstance(dim, str)})
        dims = next(dims for io_name, _, _, dims in self._engine._io if io_name == name)
        return tuple(dim if isinstance(dim, int) else symbols.get(dim, -1) for dim in dims)

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self._addresses[name] = int(memory)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        engine = self._engine
        missing = [name for name, *_ in engine._io if name not in self._addresses]
        if missing:
            _fail(engine._logger, f"IExecutionContext::enqueueV3: Error Code 3: no address for {missing}")
            return False
        feeds = {name: _read(self._addresses[name], _NUMPY[dtype], self._shapes[name])
                 for name, mode, dtype, _ in engine._io if mode == TensorIOMode.INPUT}
        outputs = [(name, dtype) for name, mode, dtype, _ in engine._io if mode == TensorIOMode.OUTPUT]
        results = engine._session().run([name for name, _ in outputs], feeds)
        for (name, dtype), result in zip(outputs, results, strict=True):
            if tuple(result.shape) != self.get_tensor_shape(name):
                _fail(engine._logger, f"IExecutionContext::enqueueV3: output '{name}' has shape {result.shape}")
                return False
            array = np.ascontiguousarray(result, dtype=_NUMPY[dtype])
            ctypes.memmove(self._addresses[name], array.ctypes.data, array.nbytes)
        return True


class ICudaEngine:
    """A deserialized engine."""

    def __init__(self, header: dict[str, Any], model: onnx.ModelProto, logger: ILogger) -> None:
        self._header, self._model, self._logger = header, model, logger
        self._io = [(value.name, mode, _DTYPES[value.type.tensor_type.elem_type], _dims(value))
                    for mode, values in ((TensorIOMode.INPUT, _graph_inputs(model)),
                                         (TensorIOMode.OUTPUT, list(model.graph.output)))
                    for value in values]
        self._ort: Any = None

    def _session(self) -> Any:
        if self._ort is None:
            import onnxruntime

            self._ort = onnxruntime.InferenceSession(self._model.SerializeToString(),
                                                     providers=["CPUExecutionProvider"])
        return self._ort

    @property
    def num_io_tensors(self) -> int:
        return len(self._io)

    def get_tensor_name(self, index: int) -> str:
        return self._io[index][0]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return next((mode for io_name, mode, _, _ in self._io if io_name == name), TensorIOMode.NONE)

    def get_tensor_dtype(self, name: str) -> DataType:
        return next(dtype for io_name, _, dtype, _ in self._io if io_name == name)

    def create_execution_context(self, strategy: Any = None) -> IExecutionContext:
        return IExecutionContext(self)

    def create_engine_inspector(self) -> EngineInspector:
        return EngineInspector(self)


class Runtime:
    """Deserializes engines (only those of this version, as TensorRT does)."""

    def __init__(self, logger: ILogger) -> None:
        self._logger = logger

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
        data = bytes(serialized_engine)
        if not data.startswith(_ENGINE_MAGIC):
            return _fail(self._logger, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (the engine "
                         "is not a stand-in engine)")
        line, _, onnx_bytes = data[len(_ENGINE_MAGIC):].partition(b"\n")
        header = json.loads(line)
        if header["tensorrt"] != __version__:
            return _fail(self._logger, f"IRuntime::deserializeCudaEngine: Error Code 1: Serialization (the engine "
                         f"was built by TensorRT {header['tensorrt']}, this is {__version__})")
        if hashlib.sha256(onnx_bytes).hexdigest() != header["onnx_sha256"]:
            return _fail(self._logger, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (corrupt)")
        return ICudaEngine(header, onnx.load_from_string(onnx_bytes), self._logger)


# -- what the stand-in does (private) --------------------------------------------------------------------------
_DTYPES = {onnx.TensorProto.FLOAT: DataType.FLOAT, onnx.TensorProto.FLOAT16: DataType.HALF,
           onnx.TensorProto.BFLOAT16: DataType.BF16, onnx.TensorProto.INT8: DataType.INT8,
           onnx.TensorProto.INT32: DataType.INT32, onnx.TensorProto.INT64: DataType.INT64,
           onnx.TensorProto.BOOL: DataType.BOOL}
_NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
          DataType.INT64: np.int64, DataType.BOOL: np.bool_}
_TYPE_NAMES_11 = {DataType.FLOAT: "Float", DataType.HALF: "Half", DataType.BF16: "BFloat16", DataType.INT8: "Int8",
                  DataType.INT32: "Int32", DataType.INT64: "Int64", DataType.BOOL: "Bool"}
_TYPE_NAMES_10 = {DataType.FLOAT: "FP32", DataType.HALF: "FP16", DataType.BF16: "BF16", DataType.INT8: "Int8",
                  DataType.INT32: "Int32", DataType.INT64: "Int64", DataType.BOOL: "Bool"}


def _log(logger: ILogger, severity: ILogger.Severity, message: str) -> None:
    logger.log(severity, message)


def _fail(logger: ILogger, message: str) -> None:
    _log(logger, ILogger.ERROR, message)


def _graph_inputs(model: onnx.ModelProto | None) -> list[onnx.ValueInfoProto]:
    assert model is not None
    weights = {tensor.name for tensor in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in weights]


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [dim.dim_value if dim.HasField("dim_value") else dim.dim_param or "?"
            for dim in value.type.tensor_type.shape.dim]


def _strongly_typed(flags: int, logger: ILogger) -> bool:
    bit = 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if _MAJOR >= 11:
        if flags & bit:
            _log(logger, ILogger.WARNING, "NetworkDefinitionCreationFlag::kSTRONGLY_TYPED is deprecated and ignored")
        return True
    return flags & bit != 0


def _profile_problem(model: onnx.ModelProto, profiles: dict[str, list[list[int]]]) -> str | None:
    """Why TensorRT would refuse to build with these profiles (None: it would not)."""
    for value in _graph_inputs(model):
        dims = _dims(value)
        if value.name not in profiles:
            if all(isinstance(dim, int) for dim in dims):
                profiles[value.name] = [list(dims)] * 3
                continue
            return f"Error Code 4: API Usage Error (Network has dynamic or shape inputs, but no optimization " \
                   f"profile has been defined for '{value.name}')"
        low, opt, high = profiles[value.name]
        if not len(low) == len(opt) == len(high) == len(dims):
            return f"Error Code 4: profile for '{value.name}' has the wrong rank"
        for axis, dim in enumerate(dims):
            if not low[axis] <= opt[axis] <= high[axis] or (isinstance(dim, int) and low[axis] != dim != high[axis]):
                return f"Error Code 4: profile for '{value.name}' does not fit dim {axis}"
    return None


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {value.name: value.type.tensor_type.elem_type
             for value in (*graph.input, *graph.output, *graph.value_info)}
    types.update({tensor.name: tensor.data_type for tensor in graph.initializer})
    return types


def _layers(model: onnx.ModelProto, detailed: bool, strongly_typed: bool) -> list[Any]:
    """One layer per ONNX node (constants are weights, not layers), as the inspector lists them."""
    nodes = [node for node in model.graph.node if node.op_type != "Constant"]
    if not detailed:
        return [node.name for node in nodes]
    types = _value_types(model)
    layers = []
    for node in nodes:
        outputs = []
        for name in node.output:
            dtype = _DTYPES.get(types.get(name, 0))
            if dtype is None:
                outputs.append({"Name": name})
                continue
            if not strongly_typed and dtype in (DataType.HALF, DataType.BF16):
                dtype = DataType.FLOAT  # weakly typed without an FP16/BF16 builder flag: TensorRT builds FP32
            outputs.append({"Name": name, "DataType": _TYPE_NAMES_11[dtype], "Format": "Row major linear (kLINEAR)"}
                           if _MAJOR >= 11 else {"Name": name,
                                                 "Format/Datatype": f"Row major linear {_TYPE_NAMES_10[dtype]} format"})
        layers.append({"Name": node.name, "LayerType": node.op_type, "Inputs": [{"Name": name} for name in node.input],
                       "Outputs": outputs, "Metadata": f"[ONNX Layer: {node.name}]"})
    return layers


def _read(address: int, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape)) if shape else 1
    return np.frombuffer(ctypes.string_at(address, count * np.dtype(dtype).itemsize), dtype=dtype).reshape(shape)


float32 = DataType.FLOAT
float16 = DataType.HALF
bfloat16 = DataType.BF16
int8 = DataType.INT8
int32 = DataType.INT32
int64 = DataType.INT64
bool = DataType.BOOL  # TensorRT's name (shadows the builtin in this module, as in TensorRT's)
