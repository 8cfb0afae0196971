"""Load stage: read a trained model file, detected by content, into a torch object mpexport can export.

Formats, in order of preference:

* a ``torch.export`` archive (``torch.export.save``, usually ``.pt2``): records inputs; code-free unless it asks
  torch to unpickle a payload with full trust or to evaluate code, which is refused without ``trust_pickle``
  (:mod:`mpexport.sources.archives`, :mod:`mpexport.sources.guard`);
* a TorchScript archive (``torch.jit.save``);
* a checkpoint (a state dict, or a dict holding one under ``state_dict``/``model``/...) plus a factory
  ``package.module:function`` that builds the ``nn.Module``;
* a Hugging Face model directory (``config.json`` and weights: :mod:`mpexport.sources.hf`);
* a fully pickled ``nn.Module`` (``torch.save(model)``), only when the caller trusts the file: unpickling
  runs arbitrary code. Everything else is read with ``weights_only=True``; a checkpoint whose records hold other
  objects (timm's ``argparse.Namespace`` args, Lightning's hyper-parameters) reads them as inert data
  (:mod:`mpexport.sources.records`), never by running the file's code.

Every zip-based file has each entry's CRC checked before torch reads it (torch does not). The training precision
the file's framework recorded (:mod:`mpexport.sources.records`) and the validation accuracy it reports
(:mod:`mpexport.sources.accuracy`) are kept in ``training``, bounded (:mod:`mpexport.sources.bounds`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mpexport.base.errors import MpexportError, first_line
from mpexport.base.files import regular_file, sha256_file
from mpexport.base.specs import Dim, TensorSpec, normalize_dtype
from mpexport.sources.archives import archive_refusals, check_zip_integrity, refuse_untrusted
from mpexport.sources.bounds import bounded_training, read_training_json
from mpexport.sources.checkpoints import load_pickled
from mpexport.sources.detect import detect_format
from mpexport.sources.guard import no_code_from_file
from mpexport.sources.hf import FORMAT_HF, directory_digest, is_hf_directory, load_hf_directory
from mpexport.sources.model import EXTRA_FILE, FORMAT_EXPORT, FORMAT_ONNX, FORMAT_TORCHSCRIPT, STAGE, LoadedModel
from mpexport.sources.records import mpexport_record


def load_model(
    path: str | Path, *, factory: str | None = None, trust_pickle: bool = False,
    import_path: str | Path | None = None, task: str | None = None,
) -> LoadedModel:
    """Load ``path`` by its content (not its extension) into a :class:`LoadedModel`, in eval mode, on CPU.

    Raises :class:`MpexportError` with one line for a missing, unreadable, corrupt or unsupported file, for an
    untrusted pickle (unless ``trust_pickle``), for a checkpoint without ``factory`` (or timm), and for a factory
    that does not import or whose model does not accept the checkpoint. ``import_path``: where the factory's or a
    pickled module's code is imported from (default: the working directory). ``task``: the head to build for a
    Hugging Face directory (:data:`mpexport.sources.hf.TASKS`; default: the config's architecture).
    """
    path = Path(path)
    if path.is_dir():
        if is_hf_directory(path):
            return _load_hf(path, task)
        raise MpexportError(f"'{path}' is a directory without a config.json, not a model", stage=STAGE,
                            hint="pass a model file, or a Hugging Face model directory (save_pretrained)")
    regular_file(path, "model file", stage=STAGE)
    try:
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise MpexportError(f"cannot read '{path}': {exc.strerror}", stage=STAGE) from None
    kind = detect_format(path, head)
    if head.startswith(b"PK\x03\x04"):
        check_zip_integrity(path)
    digest = sha256_file(path)
    if kind == FORMAT_ONNX:
        return LoadedModel(format=FORMAT_ONNX, path=path, sha256=digest)
    try:
        loaded = _load_file(path, digest, kind, factory=factory, trust_pickle=trust_pickle, import_path=import_path)
    except (RecursionError, MemoryError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else "too large for this machine's memory"
        raise MpexportError(f"'{path}' cannot be read: what it holds is {why} ({type(exc).__name__})",
                            stage=STAGE, hint="a model file holds tensors and small records") from None
    loaded.import_path = str(import_path) if import_path is not None else None
    if task is not None:
        loaded.notes.append("--task ignored: it chooses the head of a Hugging Face model directory")
    if factory and loaded.format in (FORMAT_EXPORT, FORMAT_TORCHSCRIPT):
        loaded.notes.append(f"--factory ignored: a {loaded.format} archive carries its own code")
    loaded.training, dropped = bounded_training(loaded.training)
    loaded.notes += dropped
    return loaded


def _load_file(path: Path, digest: str, kind: str, *, factory: str | None, trust_pickle: bool,
               import_path: str | Path | None) -> LoadedModel:
    if kind == FORMAT_EXPORT:
        return _load_exported_program(path, digest, trust_pickle)
    if kind == FORMAT_TORCHSCRIPT:
        return _load_torchscript(path, digest)
    return load_pickled(path, digest, factory=factory, trust_pickle=trust_pickle, import_path=import_path)


def _load_hf(path: Path, task: str | None) -> LoadedModel:
    built = load_hf_directory(path, task)
    return LoadedModel(format=FORMAT_HF, path=path, sha256=directory_digest(path), module=built.module,
                       input_names=built.input_names, required_inputs=built.required_inputs,
                       suggested_specs=built.suggested_specs, training=built.training, task=task, notes=built.notes)


def _load_exported_program(path: Path, digest: str, trust_pickle: bool) -> LoadedModel:
    """A ``torch.export`` archive. Unless ``trust_pickle``: refused by name when it would unpickle with full trust
    or run code (:func:`mpexport.sources.archives.archive_refusals`), and read by torch under
    :func:`mpexport.sources.guard.no_code_from_file`, which refuses whatever that scan missed."""
    if not trust_pickle:
        refuse_untrusted(path, archive_refusals(path))
    extra = {EXTRA_FILE: ""}
    try:
        with _logged_errors("torch.export") as logged, no_code_from_file(trust_pickle) as refused:
            with path.open("rb") as handle:  # a file object: torch's reader takes no name that is not UTF-8
                program = torch.export.load(handle, extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - any failure to read the archive is bad input
        refuse_untrusted(path, refused)
        cause = logged[-1] if logged else first_line(exc)
        raise MpexportError(f"'{path}' is a torch.export archive that cannot be loaded: {cause}", stage=STAGE,
                            hint=_archive_hint(cause)) from None
    refuse_untrusted(path, refused)
    training, notes = read_training_json(extra.get(EXTRA_FILE, ""), f"{EXTRA_FILE} in {path.name}")
    record = mpexport_record(training, f"{EXTRA_FILE} in {path.name}")
    if record is not None:
        training = {**training, "evidence": record.evidence}
    return LoadedModel(
        format=FORMAT_EXPORT, path=path, sha256=digest, program=program,
        input_specs=exported_program_inputs(program), training=training, positional=not _takes_kwargs(program),
        notes=notes,
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
