"""mpexport: deploy a model trained with mixed precision without losing the precision it was trained with.

The Python API mirrors the CLI::

    import mpexport
    result = mpexport.convert("model.pt2", val_data="val.npz", out="build/m")
    report = mpexport.verify("build/m")
    mpexport.save(model, "model.pt2", (example,))   # the last line of a training script: FP32 .pt2 + its autocast
    bundle = mpexport.Bundle.open("build/m")       # the typed record every command reads and commits
    print(bundle.manifest.verify.verdict, mpexport.read_plan(bundle).summary()["macs"])
    mpexport.repair("build/m")                      # and build, package, inspect: every command is a function

Layout: ``mpexport/`` holds one folder per stage, each importing only the folders of earlier stages (README, "Layout").
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from mpexport.base.errors import MpexportError
from mpexport.base.specs import TensorSpec, parse_input_option

__version__ = "0.1.0"

_LAZY = {
    # the commands, one public function each
    "convert": "mpexport.commands.convert", "verify": "mpexport.commands.verify",
    "repair": "mpexport.commands.repair", "build": "mpexport.commands.build",
    "package": "mpexport.commands.package", "inspect": "mpexport.commands.inspect",
    # their options and results
    "ConvertResult": "mpexport.commands.convert", "EngineOptions": "mpexport.commands.convert",
    "VerifyOptions": "mpexport.check.report", "ParityReport": "mpexport.check.report",
    "RepairResult": "mpexport.commands.repair", "PackageResult": "mpexport.deploy.triton",
    "InspectReport": "mpexport.commands.inspect", "RayOptions": "mpexport.check.ray",
    # the stages, for Python users who run one alone
    "Bundle": "mpexport.bundle.store", "Manifest": "mpexport.bundle.records",
    "LoadedModel": "mpexport.sources.model", "load_model": "mpexport.sources.loading",
    "save": "mpexport.sources.saving", "TrainingRecord": "mpexport.sources.records",
    "RangeMonitor": "mpexport.sources.range_monitor",
    "ValidationData": "mpexport.data.base", "load_validation_data": "mpexport.data.open",
    "ExportRequest": "mpexport.capture.export", "ExportResult": "mpexport.capture.export",
    "export_onnx": "mpexport.capture.export",
    "PlanOptions": "mpexport.precision.options", "PrecisionPlan": "mpexport.precision.plan",
    "Overrides": "mpexport.precision.options", "read_plan": "mpexport.precision.plan",
    "lint_model": "mpexport.graph.lint", "verify_candidate": "mpexport.check.verify",
    "inspect_plan": "mpexport.commands.inspect:inspect",  # its earlier name
}


def __getattr__(name: str) -> Any:
    """Import the stages on first use: planning, rewriting and linting need no torch."""
    if name in _LAZY:
        module, _, attribute = _LAZY[name].partition(":")
        return getattr(import_module(module), attribute or name)
    raise AttributeError(f"module 'mpexport' has no attribute '{name}'")

__all__ = [
    "Bundle",
    "ConvertResult",
    "EngineOptions",
    "ExportRequest",
    "ExportResult",
    "InspectReport",
    "LoadedModel",
    "Manifest",
    "MpexportError",
    "Overrides",
    "PackageResult",
    "ParityReport",
    "PlanOptions",
    "PrecisionPlan",
    "RangeMonitor",
    "RayOptions",
    "RepairResult",
    "TensorSpec",
    "TrainingRecord",
    "ValidationData",
    "VerifyOptions",
    "__version__",
    "build",
    "convert",
    "export_onnx",
    "inspect",
    "inspect_plan",
    "lint_model",
    "load_model",
    "load_validation_data",
    "package",
    "parse_input_option",
    "read_plan",
    "repair",
    "save",
    "verify",
    "verify_candidate",
]
