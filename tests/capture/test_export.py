"""The export stage on a small model built here: torchlib's function list is read once per process, and a second
export gives the same model as the first."""

from __future__ import annotations

import importlib
from pathlib import Path

import onnx_ir as ir
import torch

from mpexport.base.specs import parse_input_option
from mpexport.capture.export import ExportRequest, export_onnx, reuse_torchlib_functions
from mpexport.sources.model import FORMAT_PICKLE, module_model


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(x), dim=-1)


def test_torchlib_functions_are_read_once_and_exports_stay_the_same() -> None:
    from torch.onnx._internal import _lazy_import

    reuse_torchlib_functions()
    functions = importlib.import_module(_lazy_import.onnxscript_apis._name).get_torchlib_ops
    torch.manual_seed(0)
    model = Small().eval()
    loaded = module_model(FORMAT_PICKLE, Path("small.pt"), "0" * 64, model, factory=None)
    request = ExportRequest(loaded, [parse_input_option("x:batch,4:float32")], {"x": torch.randn(2, 4)}, ["y"])
    first = export_onnx(request)
    hits = functions.cache_info().hits
    second = export_onnx(request)
    assert functions.cache_info().hits > hits  # the second export reused the list
    assert ir.to_proto(first.model).SerializeToString() == ir.to_proto(second.model).SerializeToString()
