"""mpexport: deploy a model trained with mixed precision without losing the precision it was trained with.

The Python API mirrors the CLI::

    import mpexport
    result = mpexport.convert("model.pt2", val_data="val.npz", out="build/m")
    print(result.manifest["artifacts"])
"""

from mpexport.convert import ConvertResult, convert
from mpexport.errors import MpexportError
from mpexport.export import ExportRequest, ExportResult, export_onnx
from mpexport.loading import LoadedModel, load_model
from mpexport.specs import TensorSpec, parse_input_option
from mpexport.valdata import ValidationData, load_validation_data

__version__ = "0.1.0"

__all__ = [
    "ConvertResult",
    "ExportRequest",
    "ExportResult",
    "LoadedModel",
    "MpexportError",
    "TensorSpec",
    "ValidationData",
    "__version__",
    "convert",
    "export_onnx",
    "load_model",
    "load_validation_data",
    "parse_input_option",
]
