"""Engine stage: a strongly typed TensorRT engine built from the mixed-precision ONNX, checked against the plan.

TensorRT 11 builds strongly typed networks only; 10.12-10.x need the ``STRONGLY_TYPED`` network flag. Either way
the ONNX tensor types are the precision contract, so the engine runs what the plan says. TF32 is cleared unless
allowed, so the FP32 keep-list really runs FP32. The engine inspector's layer listing (detailed profiling
verbosity) is read back and compared with the plan: the silent-FP32 failure and the opposite.

Everything that needs no GPU (availability, version handling, flags, profiles, the plan-vs-engine comparison) is plain
Python and tested here; the build and the runner (:mod:`mpexport.backends.tensorrt`) need TensorRT and an NVIDIA GPU and
have not run on this project's machines yet. The tests run them end to end against a stand-in ``tensorrt`` module
(``tests/stand_ins/tensorrt``: the API mpexport calls, as TensorRT's binding sources declare it, executing the mixed
ONNX in ONNX Runtime on the CPU); such a module declares ``MPEXPORT_STAND_IN``, and the status, the engine record and
verify's ``tensorrt`` backend then say what stood in.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpexport.backends.tensorrt import logger as trt_logger
from mpexport.backends.tensorrt import stand_in
from mpexport.base.errors import MpexportError
from mpexport.bundle.names import ENGINE, ENGINE_COMPANIONS, ENGINE_LAYERS, FILE_NAMES, TIMING_CACHE

STAGE = "engine"
MIN_VERSION = (10, 12)
STRONGLY_TYPED_BUILTIN = (11, 0)
ENGINE_FILE = FILE_NAMES[ENGINE]
DEFAULT_WORKSPACE = 4 << 30
PROFILE_BATCH = 64
PROFILE_SAMPLES = 1024
"""Validation batches and samples read to derive optimization profiles when no ``--shapes`` are given."""

Profile = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
"""(min, opt, max) shapes of one input."""


@dataclass
class TensorRTStatus:
    """Whether engines can be built here, and why not."""

    available: bool
    version: str | None = None
    gpu: str | None = None
    compute_capability: str | None = None
    why: str | None = None
    stand_in: str | None = None
    """What runs instead of TensorRT (a test stand-in module, see :func:`tensorrt_status`); None for TensorRT."""

    def to_json(self) -> dict[str, Any]:
        """As recorded in the manifest and printed by ``doctor``."""
        return {key: value for key, value in self.__dict__.items() if value is not None}


def version_tuple(version: str) -> tuple[int, ...]:
    """``10.13.0.35`` -> ``(10, 13, 0, 35)`` (non-numeric parts ignored)."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:4])


def tensorrt_status() -> TensorRTStatus:
    """TensorRT's version and the GPU, or the reason engines cannot be built on this machine."""
    try:
        import tensorrt
    except ImportError:
        return TensorRTStatus(False, why="TensorRT is not installed (pip install 'mpexport[tensorrt]' on a machine "
                                         "with an NVIDIA GPU)")
    version = str(tensorrt.__version__)
    if version_tuple(version)[:2] < MIN_VERSION:
        return TensorRTStatus(False, version, why=f"TensorRT {version} is older than "
                              f"{'.'.join(map(str, MIN_VERSION))}, the first with strongly typed builds mpexport uses")
    substitute = stand_in(tensorrt)
    if substitute:  # the test suite's stand-in: no GPU involved, and the status says so
        return TensorRTStatus(True, version, f"no GPU (stand-in: {substitute})",
                              str(tensorrt.MPEXPORT_STAND_IN_COMPUTE_CAPABILITY), stand_in=substitute)
    import torch

    if not torch.cuda.is_available():
        return TensorRTStatus(False, version, why=f"no CUDA GPU visible to torch {torch.__version__}")
    major, minor = torch.cuda.get_device_capability(0)
    return TensorRTStatus(True, version, torch.cuda.get_device_name(0), f"{major}.{minor}")


def network_flags(version: str) -> list[str]:
    """Names of the ``NetworkDefinitionCreationFlag`` values to set for a TensorRT version."""
    parsed = version_tuple(version)[:2]
    if parsed < MIN_VERSION:
        raise MpexportError(f"TensorRT {version} is too old: strongly typed builds need 10.12 or newer", stage=STAGE)
    if parsed >= STRONGLY_TYPED_BUILTIN:
        return []  # strongly typed is the only mode; the flag is gone
    return ["STRONGLY_TYPED"]


def parse_shapes_option(texts: list[str] | tuple[str, ...]) -> dict[str, Profile]:
    """``--shapes NAME:MIN,OPT,MAX`` with shapes written ``1x3x224x224``; one option per input."""
    profiles: dict[str, Profile] = {}
    for text in texts:
        name, _, rest = text.partition(":")
        shapes = rest.split(",")
        if not name or len(shapes) != 3:
            raise MpexportError(f"cannot read --shapes '{text}'", stage=STAGE,
                                hint="write NAME:MIN,OPT,MAX, e.g. pixels:1x1x8x8,32x1x8x8,64x1x8x8")
        try:
            parsed = tuple(tuple(int(dim) for dim in shape.lower().split("x")) for shape in shapes)
        except ValueError:
            raise MpexportError(f"cannot read --shapes '{text}': dims must be integers", stage=STAGE) from None
        low, opt, high = parsed
        if not (len(low) == len(opt) == len(high)) or any(not a <= b <= c for a, b, c in zip(low, opt, high,
                                                                                                   strict=True)):
            raise MpexportError(f"--shapes '{text}': need min <= opt <= max in every dim", stage=STAGE)
        profiles[name] = (low, opt, high)
    return profiles


def derive_profiles(inputs: list[dict[str, Any]], observed: list[dict[str, tuple[int, ...]]],
                    given: dict[str, Profile] | None = None) -> dict[str, Profile]:
    """One optimization profile per input: given ``--shapes`` win; otherwise fixed dims stay, dynamic dims span
    what the validation batches showed (min, the most common, max), the batch axis from 1."""
    given = given or {}
    profiles: dict[str, Profile] = {}
    for spec in inputs:
        name, shape = spec["name"], spec["shape"]
        if name in given:
            _check_rank(name, shape, given[name])
            profiles[name] = given[name]
            continue
        seen = [batch[name] for batch in observed if name in batch]
        low, opt, high = [], [], []
        for axis, dim in enumerate(shape):
            if isinstance(dim, int):
                low.append(dim)
                opt.append(dim)
                high.append(dim)
                continue
            sizes = [s[axis] for s in seen if len(s) == len(shape)]
            if not sizes:
                raise MpexportError(f"no shapes seen for dynamic dim '{dim}' of input '{name}'", stage=STAGE,
                                    hint="pass --val-data or --shapes NAME:MIN,OPT,MAX")
            common = Counter(sizes).most_common(1)[0][0]
            low.append(1 if axis == 0 else min(sizes))
            opt.append(common)
            high.append(max(sizes))
        profiles[name] = (tuple(low), tuple(opt), tuple(high))
    return profiles


def _check_rank(name: str, shape: list[Any], profile: Profile) -> None:
    if len(profile[0]) != len(shape):
        raise MpexportError(f"--shapes for '{name}' has rank {len(profile[0])}, the input has rank {len(shape)}",
                            stage=STAGE)
    for axis, dim in enumerate(shape):
        if isinstance(dim, int) and any(p[axis] != dim for p in profile):
            raise MpexportError(f"--shapes for '{name}' changes fixed dim {axis} ({dim})", stage=STAGE)


# -- plan vs engine ------------------------------------------------------------------------------------------
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
_TYPE_WORDS = (("bf16", ("bf16", "bfloat16")), ("fp16", ("fp16", "half")), ("fp32", ("fp32", "float")),
               ("int", (r"u?int\d*", "bool")))
"""Type words of the inspector's output types (regular expressions): ``Int64``/``INT32``/``UInt8`` are integers."""


@dataclass
class EngineCheck:
    """Layers compared with the plan, and the disagreements (``silent-fp32``: planned low, runs FP32;
    ``lost-precision``: planned FP32, runs low)."""

    compared: int = 0
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    unmapped: int = 0

    def to_json(self) -> dict[str, Any]:
        """As recorded in the manifest."""
        return {"compared": self.compared, "unmapped_layers": self.unmapped, "ok": not self.mismatches,
                "mismatches": self.mismatches[:50]}


def engine_layers(info: str | dict[str, Any]) -> list[dict[str, Any]]:
    """The layers of an engine inspector listing (``LayerInformationFormat.JSON``), TensorRT 10.x or 11.x."""
    data = json.loads(info) if isinstance(info, str) else info
    layers = data.get("Layers", [])
    return [layer if isinstance(layer, dict) else {"Name": str(layer)} for layer in layers]


def output_precision(layer: dict[str, Any]) -> str | None:
    """``fp16``/``bf16``/``fp32``/``int`` of a layer's first output, from the 10.x ``Format/Datatype`` text or the
    11.x ``DataType`` field; None without detailed verbosity."""
    outputs = layer.get("Outputs") or []
    if not outputs or not isinstance(outputs[0], dict):
        return None
    text = str(outputs[0].get("DataType") or outputs[0].get("Format/Datatype") or "").lower()
    for name, words in _TYPE_WORDS:
        if any(re.search(rf"\b{word}\b", text) for word in words):
            return name
    return None


def compare_engine_with_plan(layers: list[dict[str, Any]], plan: dict[str, str]) -> EngineCheck:
    """Compare each layer's realised output type with the planned precision of the ONNX node that produces it
    (the last one named in the layer's ``Metadata``; fused layers name all theirs). Layers TensorRT added
    (reformats, casts it inserted) carry no ONNX name and are counted as unmapped."""
    check = EngineCheck()
    for layer in layers:
        names = _ONNX_LAYER.findall(str(layer.get("Metadata", "")))
        realised = output_precision(layer)
        if not names or realised is None:
            check.unmapped += 1
            continue
        planned = plan.get(names[-1])
        if planned in (None, "none") or realised == "int":
            continue
        check.compared += 1
        if planned != realised:
            kind = "silent-fp32" if realised == "fp32" else "lost-precision" if planned == "fp32" else "other-type"
            check.mismatches.append({"layer": layer.get("Name"), "onnx_nodes": names, "planned": planned,
                                     "realised": realised, "kind": kind})
    return check


# -- build (needs TensorRT and a GPU) -----------------------------------------------------------------------
@dataclass
class EngineResult:
    """The built engine: file, the files written beside it, metadata for the manifest, and the plan check."""

    path: Path
    metadata: dict[str, Any]
    check: EngineCheck
    companions: tuple[str, ...] = ENGINE_COMPANIONS


def build_engine(onnx_path: Path, out_dir: Path, profiles: dict[str, Profile], plan: dict[str, str], *,
                 workspace: int = DEFAULT_WORKSPACE, allow_tf32: bool = False,
                 timing_cache: Path | None = None, module_of: dict[str, str] | None = None) -> EngineResult:
    """Build a strongly typed engine from ``onnx_path`` into ``out_dir/model.plan`` (timing cache beside it;
    ``timing_cache``, else the one in ``out_dir``, is reused when present), read its layers back and compare them
    with ``plan``. A one-line error where TensorRT or a GPU is missing."""
    status = tensorrt_status()
    if not status.available:
        raise MpexportError(f"cannot build a TensorRT engine here: {status.why}", stage=STAGE)
    import tensorrt as trt

    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    for name in network_flags(trt.__version__):
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise MpexportError(_parser_errors(parser, module_of or {}), stage=STAGE)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if not allow_tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        if tensor.name not in profiles:
            raise MpexportError(f"no optimization profile for input '{tensor.name}'", stage=STAGE)
        low, opt, high = profiles[tensor.name]
        profile.set_shape(tensor.name, low, opt, high)
    config.add_optimization_profile(profile)
    cache = _attach_timing_cache(config, timing_cache or out_dir / TIMING_CACHE)
    cache_path = out_dir / TIMING_CACHE
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise MpexportError("TensorRT could not build the engine (see its log above)", stage=STAGE)
    engine_path = out_dir / ENGINE_FILE
    engine_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(cache.serialize()))
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(bytes(serialized))
    if engine is None:
        raise MpexportError("TensorRT could not load the engine it built (see its log above)", stage=STAGE)
    inspector = engine.create_engine_inspector()
    listing = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    (out_dir / ENGINE_LAYERS).write_text(listing)
    check = compare_engine_with_plan(engine_layers(listing), plan)
    metadata = {"tensorrt": trt.__version__, "gpu": status.gpu, "compute_capability": status.compute_capability,
                "profiles": {name: [list(shape) for shape in shapes] for name, shapes in profiles.items()},
                "network_flags": network_flags(trt.__version__), "tf32": allow_tf32, "workspace": workspace,
                "check": check.to_json(), **({"stand_in": status.stand_in} if status.stand_in else {})}
    return EngineResult(engine_path, metadata, check)


def _attach_timing_cache(config: Any, previous: Path) -> Any:
    """Attach the timing cache at ``previous`` where TensorRT accepts it, else a fresh one: TensorRT returns no cache
    for bytes it cannot read and refuses (``set_timing_cache`` is False) one from another GPU, and the build must not
    then go on without one. Returns the cache (it must outlive the build)."""
    data = previous.read_bytes() if previous.exists() else b""
    cache = config.create_timing_cache(data) if data else None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _parser_errors(parser: Any, module_of: dict[str, str]) -> str:
    """The ONNX parser's errors, one per node, with the node's module path."""
    parts = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node = error.node_name() if hasattr(error, "node_name") else str(error.node())
        module = module_of.get(node)
        parts.append(f"{node}{f' (module {module})' if module else ''}: {error.desc()}")
    return "TensorRT's ONNX parser failed: " + "; ".join(parts[:5])




