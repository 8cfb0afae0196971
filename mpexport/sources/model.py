"""A loaded model (:class:`LoadedModel`): the module or exported program, its format, inputs and outputs as far
as the file knows them, and what it says about its training precision."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mpexport.base.errors import MpexportError
from mpexport.base.specs import TensorSpec
from mpexport.bundle.records import SourceRecord
from mpexport.bundle.store import portable_paths

STAGE = "load"


EXTRA_FILE = "mpexport.json"
"""Extra file in a ``.pt2`` archive where training scripts record how the model was trained (autocast)."""


FORMAT_EXPORT = "torch.export"


FORMAT_TORCHSCRIPT = "torchscript"


FORMAT_CHECKPOINT = "checkpoint"


FORMAT_PICKLE = "pickle"


FORMAT_ONNX = "onnx"


@dataclass
class LoadedModel:
    """A model ready for export, with what its file told about it.

    Exactly one of ``program`` (an ``ExportedProgram``) and ``module`` (an ``nn.Module`` or TorchScript module)
    is set, or neither for an ONNX file (``format == "onnx"``, read by :mod:`mpexport.capture.onnxinput`).
    ``input_specs`` is filled when the file records its inputs (``.pt2``); ``input_names`` when only names are
    known (a ``forward`` signature), with ``suggested_specs`` when the model's config implies shapes (Hugging Face:
    which dims are dynamic, and examples without data); ``training`` holds what the file says about its training
    precision (:meth:`mpexport.sources.records.TrainingRecord.to_training`: autocast device, dtype and enabled, the
    torch version, the evidence in words), empty if nothing.
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


def module_model(kind: str, path: Path, digest: str, module: torch.nn.Module, *, factory: str | None) -> LoadedModel:
    """A loaded ``nn.Module`` (in eval mode, on the CPU) with the input names its ``forward`` signature gives."""
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
