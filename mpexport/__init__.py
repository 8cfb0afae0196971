"""mpexport: deploy a model trained with mixed precision without losing the precision it was trained with.

The Python API mirrors the CLI::

    import mpexport
    result = mpexport.convert("model.pt2", val_data="val.npz", out="build/m")
    report = mpexport.verify("build/m")
    mpexport.save(model, "model.pt2", (example,))   # the last line of a training script: FP32 .pt2 + its autocast
    bundle = mpexport.Bundle.open("build/m")       # the typed record every command reads and commits
    print(bundle.manifest.verify.verdict, bundle.plan().summary()["macs"])
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from mpexport.errors import MpexportError
from mpexport.specs import TensorSpec, parse_input_option

__version__ = "0.1.0"

_LAZY = {
    "Bundle": "mpexport.bundle", "Manifest": "mpexport.bundle",
    "PlanOptions": "mpexport.plan", "PrecisionPlan": "mpexport.plan", "Overrides": "mpexport.plan",
    "VerifyOptions": "mpexport.verification", "EngineOptions": "mpexport.conversion",
    "ConvertResult": "mpexport.conversion", "convert": "mpexport.conversion",
    "ExportRequest": "mpexport.export", "ExportResult": "mpexport.export", "export_onnx": "mpexport.export",
    "LoadedModel": "mpexport.loading", "load_model": "mpexport.loading",
    "ValidationData": "mpexport.valdata", "load_validation_data": "mpexport.valdata",
    "ParityReport": "mpexport.verification", "verify": "mpexport.verification",
    "verify_candidate": "mpexport.verification",
    "lint_model": "mpexport.lint", "inspect_plan": "mpexport.inspection",
    "save": "mpexport.saving", "TrainingRecord": "mpexport.records",
}


def __getattr__(name: str) -> Any:
    """Import the stages on first use: planning, rewriting and linting need no torch."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mpexport' has no attribute '{name}'")

__all__ = [
    "Bundle",
    "ConvertResult",
    "EngineOptions",
    "ExportRequest",
    "ExportResult",
    "LoadedModel",
    "Manifest",
    "MpexportError",
    "Overrides",
    "ParityReport",
    "PlanOptions",
    "PrecisionPlan",
    "TensorSpec",
    "TrainingRecord",
    "ValidationData",
    "VerifyOptions",
    "__version__",
    "convert",
    "export_onnx",
    "inspect_plan",
    "lint_model",
    "load_model",
    "load_validation_data",
    "parse_input_option",
    "save",
    "verify",
    "verify_candidate",
]
