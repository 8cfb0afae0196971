"""Load stage: read a trained model file, detected by content, into a torch object mpexport can export.

Formats, in order of preference:

* a ``torch.export`` archive (``torch.export.save``, usually ``.pt2``): code-free, records inputs;
* a TorchScript archive (``torch.jit.save``);
* a checkpoint (a state dict, or a dict holding one under ``state_dict``/``model``/...) plus a factory
  ``package.module:function`` that builds the ``nn.Module``;
* a Hugging Face model directory (``config.json`` and weights: :mod:`mpexport.hf`);
* a fully pickled ``nn.Module`` (``torch.save(model)``), only when the caller trusts the file: unpickling
  runs arbitrary code. Everything else is read with ``weights_only=True``; a checkpoint whose records hold other
  objects (timm's ``argparse.Namespace`` args, Lightning's hyper-parameters) reads them as inert data
  (:mod:`mpexport.records`), never by running the file's code.

The training precision the file's framework recorded (:mod:`mpexport.records`) is kept in ``training``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import pickle
import sys
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from mpexport.bundle import SourceRecord, portable_paths, sha256_file
from mpexport.errors import MpexportError, first_line
from mpexport.hf import FORMAT_HF, directory_digest, is_hf_directory, load_hf_directory
from mpexport.records import checkpoint_record, load_checkpoint_without_code, mpexport_record
from mpexport.specs import Dim, TensorSpec, normalize_dtype

STAGE = "load"
EXTRA_FILE = "mpexport.json"
"""Extra file in a ``.pt2`` archive where training scripts record how the model was trained (autocast)."""
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

FORMAT_EXPORT = "torch.export"
FORMAT_TORCHSCRIPT = "torchscript"
FORMAT_CHECKPOINT = "checkpoint"
FORMAT_PICKLE = "pickle"
FORMAT_ONNX = "onnx"


@dataclass
class LoadedModel:
    """A model ready for export, with what its file told about it.

    Exactly one of ``program`` (an ``ExportedProgram``) and ``module`` (an ``nn.Module`` or TorchScript module)
    is set, or neither for an ONNX file (``format == "onnx"``, read by :mod:`mpexport.onnxinput`).
    ``input_specs`` is filled when the file records its inputs (``.pt2``); ``input_names`` when only names are
    known (a ``forward`` signature), with ``suggested_specs`` when the model's config implies shapes (Hugging Face:
    which dims are dynamic, and examples without data); ``training`` holds what the file says about its training
    precision (:meth:`mpexport.records.TrainingRecord.to_training`: autocast device, dtype and enabled, the torch
    version, the evidence in words), empty if nothing.
    """

    format: str
    path: Path
    sha256: str
    program: torch.export.ExportedProgram | None = None
    module: torch.nn.Module | None = None
    input_names: list[str] | None = None
    input_specs: list[TensorSpec] | None = None
    accepts_any_kwargs: bool = False
    positional: bool = False
    """True when the model is called with positional inputs (TorchScript, archives exported with args)."""
    required_inputs: list[str] = field(default_factory=list)
    suggested_specs: list[TensorSpec] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    factory: str | None = None
    task: str | None = None
    """The head built for a Hugging Face directory (``--task``), None for the config's own architecture."""
    import_path: str | None = None
    """Where the factory's (or a pickled module's) code was imported from (None: the working directory)."""
    notes: list[str] = field(default_factory=list)

    def callable(self) -> torch.nn.Module:
        """The FP32 model as a function of its inputs: by name, or in input order when ``positional``. An ONNX
        input has none (one-line error)."""
        if self.program is not None:
            return self.program.module()
        if self.module is None:
            raise MpexportError(f"'{self.path}' is an ONNX model: there is no PyTorch model to run", stage=STAGE,
                                hint="pass the PyTorch model it was exported from (verify --reference)")
        return self.module

    def source_record(self, bundle_directory: Path) -> SourceRecord:
        """What the manifest records under ``source``: paths that work from any working directory."""
        absolute, relative = portable_paths(self.path, bundle_directory)
        import_path = str(Path(self.import_path or Path.cwd()).absolute()) if self.factory else None
        return SourceRecord(absolute, self.format, self.sha256, relative, self.factory, import_path,
                            dict(self.training), list(self.notes), self.task)


def load_model(
    path: str | Path, *, factory: str | None = None, trust_pickle: bool = False,
    import_path: str | Path | None = None, task: str | None = None,
) -> LoadedModel:
    """Load ``path`` by its content (not its extension) into a :class:`LoadedModel`, in eval mode, on CPU.

    Raises :class:`MpexportError` with one line for a missing, unreadable, corrupt or unsupported file, for an
    untrusted pickle (unless ``trust_pickle``), for a checkpoint without ``factory`` (or timm), and for a factory
    that does not import or whose model does not accept the checkpoint. ``import_path``: where the factory's or a
    pickled module's code is imported from (default: the working directory). ``task``: the head to build for a
    Hugging Face directory (:data:`mpexport.hf.TASKS`; default: the config's architecture).
    """
    path = Path(path)
    if not path.exists():
        raise MpexportError(f"model file '{path}' does not exist", stage=STAGE)
    if path.is_dir():
        if is_hf_directory(path):
            return _load_hf(path, task)
        raise MpexportError(f"'{path}' is a directory without a config.json, not a model", stage=STAGE,
                            hint="pass a model file, or a Hugging Face model directory (save_pretrained)")
    try:
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise MpexportError(f"cannot read '{path}': {exc.strerror}", stage=STAGE) from None
    digest = sha256_file(path)
    kind = _detect_format(path, head)
    if kind == FORMAT_ONNX:
        return LoadedModel(format=FORMAT_ONNX, path=path, sha256=digest)
    if kind == FORMAT_EXPORT:
        loaded = _load_exported_program(path, digest)
    elif kind == FORMAT_TORCHSCRIPT:
        loaded = _load_torchscript(path, digest)
    else:
        loaded = _load_pickled(path, digest, factory=factory, trust_pickle=trust_pickle, import_path=import_path)
    loaded.import_path = str(import_path) if import_path is not None else None
    if task is not None:
        loaded.notes.append("--task ignored: it chooses the head of a Hugging Face model directory")
    if factory and loaded.format in (FORMAT_EXPORT, FORMAT_TORCHSCRIPT):
        loaded.notes.append(f"--factory ignored: a {loaded.format} archive carries its own code")
    return loaded


def _load_hf(path: Path, task: str | None) -> LoadedModel:
    built = load_hf_directory(path, task)
    return LoadedModel(format=FORMAT_HF, path=path, sha256=directory_digest(path), module=built.module,
                       input_names=built.input_names, required_inputs=built.required_inputs,
                       suggested_specs=built.suggested_specs, training=built.training, task=task, notes=built.notes)


def _detect_format(path: Path, head: bytes) -> str:
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


def _load_exported_program(path: Path, digest: str) -> LoadedModel:
    extra = {EXTRA_FILE: ""}
    try:
        with _logged_errors("torch.export") as logged:
            program = torch.export.load(path, extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - any failure to read the archive is bad input
        cause = logged[-1] if logged else first_line(exc)
        raise MpexportError(f"'{path}' is a torch.export archive that cannot be loaded: {cause}", stage=STAGE,
                            hint=_archive_hint(cause)) from None
    training = _read_training_record(extra.get(EXTRA_FILE, ""))
    record = mpexport_record(training, f"{EXTRA_FILE} in {path.name}")
    if record is not None:
        training = {**training, "evidence": record.evidence}
    return LoadedModel(
        format=FORMAT_EXPORT, path=path, sha256=digest, program=program,
        input_specs=exported_program_inputs(program), training=training, positional=not _takes_kwargs(program),
    )


def _archive_hint(cause: str) -> str:
    if "in pytree is not registered" in cause:
        return "the model returns a structured output type torch cannot read back (e.g. transformers' ModelOutput): " \
            "export it returning plain tensors (return_dict=False, or a wrapper returning a tuple/dict)"
    return "the archive may be truncated or written by an incompatible torch version"


@contextlib.contextmanager
def _logged_errors(logger_name: str) -> Iterator[list[str]]:
    """Collect what ``logger_name`` logs with an exception attached (the last line of each exception), and keep
    its records off stderr unless ``MPEXPORT_DEBUG`` is set: torch logs the real cause of a failed load as a
    warning with a traceback, then raises a generic error."""
    import logging
    import os

    found: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info and record.exc_info[1] is not None:
                error = record.exc_info[1]
                found.append(f"{type(error).__name__}: {first_line(error)}")

    logger = logging.getLogger(logger_name)
    handlers, propagate = list(logger.handlers), logger.propagate
    debug = bool(os.environ.get("MPEXPORT_DEBUG"))
    logger.handlers = [*(handlers if debug else []), _Collect()]  # torch attaches its own printing handlers
    logger.propagate = propagate and debug
    try:
        yield found
    finally:
        logger.handlers = handlers
        logger.propagate = propagate


def _takes_kwargs(program: torch.export.ExportedProgram) -> bool:
    """True when the program was exported with keyword inputs (its module must be called by name)."""
    in_spec = program.call_spec.in_spec
    if in_spec is None:
        return False
    children = list(in_spec.children()) if hasattr(in_spec, "children") else in_spec.children_specs
    return len(children) == 2 and bool(children[1].context)


def _read_training_record(text: str | bytes) -> dict[str, Any]:
    if not text:
        return {}
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return record.get("training", {}) if isinstance(record, dict) else {}


def exported_program_inputs(program: torch.export.ExportedProgram) -> list[TensorSpec]:
    """Input specs of an ExportedProgram: user-input names, dtypes and shapes with symbolic dims named.

    A symbolic size that first appears on axis 0 is called ``batch``; others ``dim0``, ``dim1``, ...;
    the same symbol keeps the same name across inputs.
    """
    user_inputs = set(program.graph_signature.user_inputs)
    names: dict[str, str] = {}
    specs: list[TensorSpec] = []
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise MpexportError(
                f"input '{node.name}' of the exported program is not a tensor", stage=STAGE,
                hint="mpexport exports models whose inputs are tensors",
            )
        dims: list[Dim] = []
        for axis, size in enumerate(value.shape):
            if isinstance(size, int):
                dims.append(size)
                continue
            symbol = str(size)
            if symbol not in names:
                names[symbol] = "batch" if axis == 0 and "batch" not in names.values() else f"dim{len(names)}"
            dims.append(names[symbol])
        specs.append(TensorSpec(node.name, normalize_dtype(str(value.dtype)), tuple(dims)))
    return specs


def _load_torchscript(path: Path, digest: str) -> LoadedModel:
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure to read the archive is bad input
        raise MpexportError(
            f"'{path}' is a TorchScript archive that cannot be loaded: {first_line(exc)}", stage=STAGE
        ) from None
    module.eval()
    names, required, any_kwargs = _torchscript_signature(module)
    return LoadedModel(
        format=FORMAT_TORCHSCRIPT, path=path, sha256=digest, module=module,
        input_names=names, required_inputs=required, accepts_any_kwargs=any_kwargs, positional=True,
    )


def _torchscript_signature(module: torch.jit.ScriptModule) -> tuple[list[str], list[str], bool]:
    try:
        forward: Any = module.forward  # a ScriptMethod: torch's stubs type it as a plain callable
        arguments = forward.schema.arguments[1:]
    except (AttributeError, RuntimeError):
        return [], [], True
    names = [arg.name for arg in arguments]
    required = [arg.name for arg in arguments if not arg.has_default_value()]
    return names, required, False


def _load_pickled(path: Path, digest: str, *, factory: str | None, trust_pickle: bool,
                  import_path: str | Path | None) -> LoadedModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        obj = _checkpoint_with_records(path) if not trust_pickle else None
        if obj is None and not trust_pickle:
            raise MpexportError(
                f"'{path}' holds pickled Python objects beyond tensors ({_unsafe_global(exc)}); loading it "
                "would run arbitrary code", stage=STAGE,
                hint="pass --trust-pickle only if you trust where the file came from, "
                "or save a state dict and use --factory",
            ) from None
        if obj is None:
            with importable_from(import_path):
                obj = _load_trusted_pickle(path)
    except Exception as exc:  # noqa: BLE001 - any failure to read the file is bad input
        raise MpexportError(f"'{path}' cannot be read as a PyTorch file: {first_line(exc)}", stage=STAGE,
                            hint="the file may be truncated or corrupt") from None
    module = _find_module(obj)
    if module is not None:
        return _module_model(FORMAT_PICKLE, path, digest, module, factory=None)
    state_dict = _find_state_dict(obj)
    if state_dict is None:
        raise MpexportError(f"'{path}' holds neither a model nor a state dict ({_describe_object(obj)})",
                            stage=STAGE)
    arch = obj.get("arch") if isinstance(obj, Mapping) and isinstance(obj.get("arch"), str) else None
    if factory:
        module = build_from_factory(factory, import_path)
    elif arch is not None:
        module = _timm_model(path, arch)
    else:
        raise MpexportError(
            f"'{path}' is a checkpoint ({len(state_dict)} tensors) and needs the code that builds the model",
            stage=STAGE, hint="pass --factory package.module:function returning the nn.Module",
        )
    _load_state_dict(module, state_dict, factory or f"timm.create_model('{arch}')")
    model = _module_model(FORMAT_CHECKPOINT, path, digest, module, factory=factory)
    record = checkpoint_record(obj, path)
    if record is not None:
        model.training = record.to_training()
    return model


def _checkpoint_with_records(path: Path) -> Any:
    """A zip checkpoint whose non-tensor objects are read as inert records; None when the file is not one (a
    pickled module, a legacy-format file): those need trust."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        obj = load_checkpoint_without_code(path)
    except MpexportError:
        raise
    except Exception:  # noqa: BLE001 - not readable this way: the caller's message stands
        return None
    return obj if _find_state_dict(obj) is not None else None


def _timm_model(path: Path, arch: str) -> torch.nn.Module:
    try:
        import timm  # type: ignore[import-not-found]
    except ImportError:
        raise MpexportError(f"'{path}' is a timm checkpoint of '{arch}', and timm is not installed", stage=STAGE,
                            hint="pass --factory package.module:function building the model, or install timm") from None
    try:
        return timm.create_model(arch, pretrained=False)
    except Exception as exc:  # noqa: BLE001 - an unknown architecture is bad input
        raise MpexportError(f"timm cannot build '{arch}': {first_line(exc)}", stage=STAGE,
                            hint="pass --factory package.module:function building the model") from None


def _unsafe_global(exc: pickle.UnpicklingError) -> str:
    import re

    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    return f"e.g. {match.group(1)}" if match else "not a plain state dict"


def _load_trusted_pickle(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise MpexportError(
            f"'{path}' is a pickled model whose code cannot be found: {first_line(exc)}", stage=STAGE,
            hint="run from the directory that holds the model's package, or put it on PYTHONPATH",
        ) from None
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle is bad input
        raise MpexportError(f"'{path}' cannot be unpickled: {first_line(exc)}", stage=STAGE) from None


def _find_module(obj: Any) -> torch.nn.Module | None:
    if isinstance(obj, torch.nn.Module):
        return obj
    if isinstance(obj, Mapping):
        for key in ("model", "module", "net", "network"):
            if isinstance(obj.get(key), torch.nn.Module):
                return obj[key]
    return None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in obj.items()
    )


def _find_state_dict(obj: Any) -> Mapping[str, torch.Tensor] | None:
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if _is_state_dict(obj.get(key)):
                return obj[key]
    return None


def _describe_object(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = ", ".join(map(str, list(obj)[:6]))
        return f"a dict with keys {keys}" if keys else "an empty dict"
    return f"a {type(obj).__name__}"


@contextlib.contextmanager
def importable_from(directory: str | Path | None) -> Iterator[None]:
    """Make ``directory`` (default: the working directory) importable for the body; ``sys.path`` is restored
    afterwards, so importing a user's factory or data function leaves no trace on the interpreter's path."""
    entry = str(Path(directory) if directory is not None else Path.cwd())
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def import_callable(spec: str, *, what: str = "--factory", stage: str = STAGE,
                    import_path: str | Path | None = None) -> Any:
    """Import ``package.module:function`` from ``import_path`` (default: the working directory) and return the
    function (``sys.path`` restored afterwards, see :func:`importable_from`).

    Raises :class:`MpexportError` when the spec is malformed, the module does not import or lacks the name.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise MpexportError(f"{what} '{spec}' is not of the form package.module:function", stage=stage)
    try:
        with importable_from(import_path):
            target: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - user code may fail in any way on import
        raise MpexportError(f"{what} module '{module_name}' does not import: {first_line(exc)}",
                            stage=stage) from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise MpexportError(f"{what}: '{module_name}' has no attribute '{attr}'", stage=stage)
        target = getattr(target, part)
    return target


def build_from_factory(factory: str, import_path: str | Path | None = None) -> torch.nn.Module:
    """Import ``package.module:function`` from ``import_path`` (see :func:`import_callable`) and call it with no
    arguments.

    Raises :class:`MpexportError` when the function cannot be imported or fails, or returns something other
    than an ``nn.Module``.
    """
    target = import_callable(factory, import_path=import_path)
    try:
        with importable_from(import_path):
            module = target()
    except Exception as exc:  # noqa: BLE001 - user code may fail in any way
        raise MpexportError(f"--factory '{factory}' failed: {first_line(exc)}", stage=STAGE) from None
    if not isinstance(module, torch.nn.Module):
        raise MpexportError(
            f"--factory '{factory}' returned a {type(module).__name__}, not a torch.nn.Module", stage=STAGE
        )
    return module


def _load_state_dict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], factory: str) -> None:
    state_dict = _strip_owner_prefix(_strip_wrapper_prefixes(state_dict), set(module.state_dict()))
    result = module.load_state_dict(state_dict, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise MpexportError(
            f"the checkpoint does not fit the model built by --factory '{factory}': {'; '.join(detail)} keys",
            stage=STAGE,
        )


def _strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Remove the prefix DataParallel (``module.``) or torch.compile (``_orig_mod.``) put on every key."""
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def _strip_owner_prefix(state_dict: Mapping[str, torch.Tensor], wanted: set[str]) -> Mapping[str, torch.Tensor]:
    """Remove the attribute name a training wrapper (a LightningModule's ``self.model``) put before every key,
    when the factory builds the inner model and the stripped keys are exactly the model's."""
    if set(state_dict) == wanted or not state_dict:
        return state_dict
    heads = {key.split(".", 1)[0] for key in state_dict}
    if len(heads) == 1 and all("." in key for key in state_dict):
        stripped = {key.split(".", 1)[1]: value for key, value in state_dict.items()}
        if set(stripped) == wanted:
            return stripped
    return state_dict


def _module_model(kind: str, path: Path, digest: str, module: torch.nn.Module, *, factory: str | None) -> LoadedModel:
    module.eval()
    module.to("cpu")
    names, required, any_kwargs = _forward_signature(module)
    return LoadedModel(
        format=kind, path=path, sha256=digest, module=module, input_names=names,
        required_inputs=required, accepts_any_kwargs=any_kwargs, factory=factory,
    )


def _forward_signature(module: torch.nn.Module) -> tuple[list[str], list[str], bool]:
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return [], [], True
    names, required, any_kwargs = [], [], False
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            any_kwargs = True
        elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
            names.append(parameter.name)
            if parameter.default is inspect.Parameter.empty:
                required.append(parameter.name)
    return names, required, any_kwargs
