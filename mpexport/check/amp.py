"""The source model under the training autocast policy (the ``torch-amp`` backend).

CPU policies, and CUDA policies on a machine with a GPU, run real ``torch.autocast``. A CUDA policy without a
GPU is emulated on the CPU: the dtype every node produces under CUDA autocast is read from the installed
torch's CUDA autocast kernels (fake CUDA tensors, see :mod:`mpexport.precision.oracle`), then the captured graph runs
node by node on real CPU tensors with each node's floating inputs and outputs stored in that dtype and computed
in FP32, as CUDA's FP16/BF16 kernels accumulate and compute elementwise math (and 3x faster than running the
CPU's FP16 kernels, which made the emulated pass 5x a plain one).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mpexport.backends.torch import flatten_outputs
from mpexport.base.dtypes import PRECISIONS, torch_dtype
from mpexport.base.errors import first_line
from mpexport.base.specs import Batch
from mpexport.capture.fxfacts import WRAP_WITH_AUTOCAST, op_name
from mpexport.precision.oracle import observe_autocast
from mpexport.sources.model import LoadedModel


class TorchAmpRunner:
    """Runs the source model as training's autocast did (really, or emulated: see the module docstring)."""

    def __init__(self, loaded: LoadedModel, input_names: list[str], policy: str, example: Batch,
                 name: str = "torch-amp") -> None:
        self.name = name
        self.loaded = loaded
        self.input_names = input_names
        self.device, low = policy.split("-")
        self.dtype = torch_dtype(low)
        self.emulated = self.device == "cuda" and not torch.cuda.is_available()
        self.mode = ("emulated on CPU from the CUDA autocast kernels" if self.emulated
                     else f"torch.autocast('{self.device}')")
        if self.emulated:
            self.program = loaded.program or _capture(loaded, input_names, example)
            args, kwargs = _split(self.program, input_names, _tensors(example, input_names))
            self.dtypes = observe_autocast(self.program, args, kwargs, "cuda", self.dtype)
            self.module = self.program.module()
        else:
            self.model = loaded.callable()  # once: a .pt2's module() is rebuilt on every call of callable()
            if self.device == "cuda":
                self.model = self.model.to("cuda")

    def run(self, batch: Batch) -> list[np.ndarray]:
        tensors = _tensors(batch, self.input_names)
        with torch.no_grad():
            if self.emulated:
                args, kwargs = _split(self.program, self.input_names, tensors)
                result = _Emulator(self.module, self.dtypes).run(*args, *kwargs.values())
            else:
                model = self.model
                if self.device == "cuda":
                    tensors = {name: tensor.to("cuda") for name, tensor in tensors.items()}
                with torch.autocast(self.device, dtype=self.dtype):
                    try:
                        result = model(*tensors.values()) if self.loaded.positional else model(**tensors)
                    except RuntimeError as exc:
                        if self.device == "cpu" and "primitive descriptor" in str(exc):
                            raise _no_cpu_kernel(exc, self.dtype) from exc
                        raise
        return [leaf.detach().float().cpu().numpy() for leaf in flatten_outputs(result)]


def _no_cpu_kernel(exc: RuntimeError, dtype: torch.dtype) -> RuntimeError:
    """oneDNN's refusal of a low-precision op this CPU has no kernel for, said as what it means."""
    name = str(dtype).removeprefix("torch.")
    return RuntimeError(f"this CPU's oneDNN has no {name} kernel for an op of the model (low-precision LSTMs and some "
                        f"convolutions need AVX-512): real CPU autocast cannot run it here ({first_line(exc, 120)})")


def _tensors(batch: Batch, names: list[str]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.require(batch[name], requirements="C")) for name in names}


def _split(program: torch.export.ExportedProgram, names: list[str],
           tensors: dict[str, torch.Tensor]) -> tuple[tuple, dict]:
    """Inputs as the program takes them: keyword inputs by name, the rest positional, in its order."""
    in_spec = program.call_spec.in_spec
    children = list(in_spec.children()) if in_spec is not None and hasattr(in_spec, "children") else []
    keywords = list(children[1].context) if len(children) == 2 and children[1].context else []
    args = tuple(tensors[name] for name in names if name not in keywords)
    return args, {name: tensors[name] for name in keywords}


def _capture(loaded: LoadedModel, names: list[str], example: Batch) -> torch.export.ExportedProgram:
    tensors = _tensors(example, names)
    dynamic = {name: {0: torch.export.Dim.DYNAMIC} for name in names}
    if loaded.positional:
        return torch.export.export(loaded.callable(), tuple(tensors.values()),
                                   dynamic_shapes=tuple(dynamic.values()), strict=False)
    return torch.export.export(loaded.callable(), (), tensors, dynamic_shapes=dynamic, strict=False)


class _Emulator(torch.fx.Interpreter):
    """Runs each node with its floating tensors in the dtype CUDA autocast gave that node."""

    def __init__(self, module: torch.fx.GraphModule, dtypes: dict[str, str]) -> None:
        super().__init__(module)
        self.dtypes = dtypes

    def run_node(self, node: torch.fx.Node) -> Any:
        if node.op != "call_function":
            return super().run_node(node)
        if op_name(node.target).endswith(WRAP_WITH_AUTOCAST):
            args: Any = self.map_nodes_to_values(node.args, node)  # FX arguments: too wide a union to narrow
            region: Any = node.args[4]
            inner = self.fetch_attr(region.target)
            result = _Emulator(inner, self.dtypes).run(*args[5:])
            return tuple(result) if isinstance(result, (list, tuple)) else (result,)
        precision = self.dtypes.get(node.name, "")
        if precision not in PRECISIONS:
            return super().run_node(node)
        store = _caster(torch_dtype(precision))
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        function: Any = node.target  # a call_function node's target: the op (callable) itself
        # Inputs rounded to the node's type, computed in FP32, result rounded: what CUDA's kernels do for FP16
        # and BF16 (FP32 accumulation and opmath), and fast on a CPU whose FP16 kernels are slow or missing.
        compute = _caster(torch.float32)
        stored_args, stored_kwargs = torch.utils._pytree.tree_map(store, (args, kwargs))
        result = function(*torch.utils._pytree.tree_map(compute, stored_args),
                          **torch.utils._pytree.tree_map(compute, stored_kwargs))
        return torch.utils._pytree.tree_map(store, result)


def _caster(dtype: torch.dtype):
    def cast(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
            return value.to(dtype)
        return value

    return cast
