"""The autocast oracle: the dtype every node of a captured program produces when it really runs under
``torch.autocast``. It is the reference the precision plan is tested against, node by node.

CPU autocast runs here as it is. CUDA autocast runs the installed torch's own ``AutocastCUDA`` kernels on
fake CUDA tensors (shapes and dtypes, no data), so the CUDA policy is checked without a GPU; a GPU machine
repeats it with real tensors (``scripts/gpu_check.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from mpexport.base.dtypes import precision_of_torch
from mpexport.capture.fxfacts import WRAP_WITH_AUTOCAST, op_name
from mpexport.precision.standins import CUDNN_RNN, dispatched


def observe_autocast(program: torch.export.ExportedProgram, args: tuple[Any, ...], kwargs: dict[str, Any],
                     device: str, dtype: torch.dtype) -> dict[str, str]:
    """Run ``program`` under ``torch.autocast(device, dtype)`` and return, per FX node name, the dtype of its
    (first floating-point) output: ``fp32``/``fp16``/``bf16``/``fp64``, ``none`` for non-float outputs.

    Regions the model opens itself (``torch.autocast(..., enabled=False)``) are honoured; their inner nodes
    are reported under their own names.
    """
    module = program.module()
    observed: dict[str, str] = {}
    with _autocast(device, dtype) as convert:
        flat = [convert(value) for value in (*args, *kwargs.values())]
        _params_to(module, convert)
        _Observer(module, observed, convert, on_cuda=device == "cuda").run(*flat)
    return observed


def _params_to(module: torch.nn.Module, convert: Any) -> None:
    for name, parameter in list(module.named_parameters()):
        _set(module, name, torch.nn.Parameter(convert(parameter), requires_grad=False))
    for name, buffer in list(module.named_buffers()):
        _set(module, name, convert(buffer))
    for name, value in list(vars(module).items()):
        if isinstance(value, torch.Tensor):
            setattr(module, name, convert(value))


def _set(module: torch.nn.Module, dotted: str, value: Any) -> None:
    *path, leaf = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    if isinstance(value, torch.nn.Parameter):
        module._parameters[leaf] = value
    else:
        module._buffers[leaf] = value


@contextlib.contextmanager
def _autocast(device: str, dtype: torch.dtype) -> Iterator[Any]:
    if device == "cpu":
        with torch.autocast("cpu", dtype=dtype), torch.no_grad():
            yield lambda t: t
        return
    if torch.cuda.is_available():
        with torch.autocast("cuda", dtype=dtype), torch.no_grad():
            yield lambda t: t.to("cuda") if isinstance(t, torch.Tensor) else t
        return
    with fake_cuda_autocast(dtype) as to_fake_cuda, torch.no_grad():
        yield to_fake_cuda


@contextlib.contextmanager
def fake_cuda_autocast(dtype: torch.dtype) -> Iterator[Any]:
    """CUDA autocast without a GPU: the thread-local autocast flags set directly (the context manager refuses
    without CUDA) inside a fake-tensor mode; yields a converter that turns any tensor into a fake CUDA tensor of
    the same shape, stride and dtype, so the installed torch's ``AutocastCUDA`` kernels run on it."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def to_fake_cuda(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or (isinstance(value, FakeTensor) and value.is_cuda):
            return value
        with unset_fake_temporarily():
            meta = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
        return FakeTensor(mode, meta, torch.device("cuda"))

    with _region_flags("cuda", dtype, True), mode:
        yield to_fake_cuda


class _Observer(torch.fx.Interpreter):
    """Runs a graph node by node through the dispatcher (so autocast applies) and records output dtypes."""

    def __init__(self, module: torch.fx.GraphModule, observed: dict[str, str], convert: Any,
                 on_cuda: bool = False) -> None:
        super().__init__(module)
        self.observed = observed
        self.convert = convert
        self._on_cuda = on_cuda

    def run_node(self, node: torch.fx.Node) -> Any:
        if node.op == "call_function" and op_name(node.target).endswith(WRAP_WITH_AUTOCAST):
            result = self._run_region(node)
        else:
            result = super().run_node(node)
        if node.op == "call_function":
            self.observed[node.name] = _dtype_of(result)
        return result

    def fetch_attr(self, target: str) -> Any:
        return self.convert(super().fetch_attr(target))

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if self.on_cuda:
            if target is torch.ops.aten._assert_tensor_metadata.default:
                return None
            if target is torch.ops.aten.to.device:  # x.to("cpu", dtype): keep the (fake CUDA) device
                return torch.ops.aten.to.dtype(args[0], *args[2:], **kwargs)
            # Device arguments written for CPU at export: drop them, and move what factories make to CUDA.
            kwargs = {key: value for key, value in kwargs.items() if key != "device"}
            kernel = dispatched(op_name(target), "cuda")
            fake = kernel is not None and kernel.op == CUDNN_RNN and not torch.cuda.is_available()
            result = _cudnn_rnn_on_meta(target, args, kwargs) if fake else super().call_function(target, args, kwargs)
            return torch.utils._pytree.tree_map(self.convert, result)
        return super().call_function(target, args, kwargs)

    @property
    def on_cuda(self) -> bool:
        """True when the graph runs on (fake or real) CUDA tensors: device arguments written for CPU move."""
        return self._on_cuda

    def _run_region(self, node: torch.fx.Node) -> Any:
        values: Any = self.map_nodes_to_values(node.args, node)  # FX arguments: too wide a union to narrow
        device, dtype, enabled, cache_enabled, submodule, *operands = values
        region: Any = node.args[4]
        inner = submodule if isinstance(submodule, torch.fx.GraphModule) else self.fetch_attr(region.target)
        with torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled) \
                if device == "cpu" or torch.cuda.is_available() else _region_flags(device, dtype, enabled):
            return tuple(_as_list(_Observer(inner, self.observed, self.convert, self._on_cuda).run(*operands)))


def _cudnn_rnn_on_meta(target: Any, args: Any, kwargs: Any) -> Any:
    """A recurrent layer as CUDA runs it, ``aten._cudnn_rnn``, computed on meta tensors (shapes and dtypes): every
    floating-point input in the autocast type where autocast is on (the class the policy table gives it), as they
    are where it is off. cuDNN's kernel itself cannot run on fake CUDA tensors in a torch built without CUDA."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    low = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None

    def to_meta(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        dtype = low if low is not None and value.dtype.is_floating_point else value.dtype
        return torch.empty_strided(value.shape, value.stride(), dtype=dtype, device="meta")

    with unset_fake_temporarily():
        meta_args, meta_kwargs = torch.utils._pytree.tree_map(to_meta, (args, kwargs))
        return target(*meta_args, **meta_kwargs)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


@contextlib.contextmanager
def _region_flags(device: str, dtype: torch.dtype | None, enabled: bool) -> Iterator[None]:
    """Autocast state for ``device`` set through the thread-local flags (what works on fake CUDA tensors),
    restored on exit."""
    was_enabled, was_dtype = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    torch.set_autocast_enabled(device, enabled)
    if dtype is not None:
        torch.set_autocast_dtype(device, dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled(device, was_enabled)
        torch.set_autocast_dtype(device, was_dtype)


def _dtype_of(result: Any) -> str:
    for leaf in torch.utils._pytree.tree_leaves(result):
        if isinstance(leaf, torch.Tensor) and leaf.dtype.is_floating_point:
            return precision_of_torch(leaf.dtype) or str(leaf.dtype)
    return "none"


def compare_with_plan(plan: Any, observed: dict[str, str]) -> dict[str, Any]:
    """Node-by-node agreement of a plan with observed autocast dtypes.

    Every floating-point node is compared with the dtype its origin (the op autocast intercepted) produced,
    low precision meaning the policy's training type. Nodes the plan keeps FP32 inside a fused kernel are
    internal to an op whose output autocast shows; they are counted apart. Returns counts and mismatches.
    """
    training_low = plan.policy.low
    checked, agreed, internal, unobserved = 0, 0, 0, []
    mismatches = []
    for node in plan.nodes:
        if node.precision == "none" or node.rule == "subgraph":
            continue
        if node.rule == "kernel":
            internal += 1
            continue
        want = observed.get(node.origin or "")
        if want is None or want == "none":
            unobserved.append(node.name)
            continue
        have = training_low if node.precision == plan.options.low else node.precision
        checked += 1
        if have == want:
            agreed += 1
        else:
            mismatches.append({"node": node.name, "op_type": node.op_type, "origin": node.origin,
                               "plan": have, "observed": want, "reason": node.reason})
    return {"checked": checked, "agreed": agreed, "kernel_internal": internal, "unobserved": unobserved,
            "mismatches": mismatches}


def observe_module_outputs(module: torch.nn.Module, args: tuple[Any, ...], device: str,
                           dtype: torch.dtype) -> dict[str, str]:
    """Run an eager ``module`` under real ``torch.autocast(device, dtype)`` and return, per submodule path (``""``
    for the module itself), the dtype of its output. The oracle for graphs whose nodes record module scopes but no
    aten ops (the TorchScript exporter's); ``device="cuda"`` needs a GPU (eager code may branch on values, so fake
    tensors cannot stand in)."""
    observed: dict[str, str] = {}
    hooks = [child.register_forward_hook(
        lambda _module, _inputs, output, path=path: observed.__setitem__(path, _dtype_of(output)))
        for path, child in module.named_modules()]
    try:
        with torch.no_grad(), torch.autocast(device, dtype=dtype):
            module(*args)
    finally:
        for hook in hooks:
            hook.remove()
    return observed


def compare_modules_with_plan(plan: Any, observed: dict[str, str]) -> dict[str, Any]:
    """Module-by-module agreement of a plan with observed autocast output dtypes: a module's output is taken to be
    made by the last floating-point node in graph order of the module or its submodules (the plan's type for low
    precision read as the policy's training type). Modules without nodes in the plan (inlined by the exporter) are
    listed as unobserved. Returns counts and mismatches, as :func:`compare_with_plan`."""
    nodes = [node for node in plan.nodes if node.precision != "none" and node.module is not None
             and node.rule != "subgraph"]
    training_low = plan.policy.low
    checked, agreed, mismatches, unobserved = 0, 0, [], []
    for module, want in observed.items():
        inside = [node for node in nodes if module == "" or node.module == module
                  or node.module.startswith(f"{module}.")]
        if not inside or want == "none":
            unobserved.append(module)
            continue
        node = inside[-1]
        have = training_low if node.precision == plan.options.low else node.precision
        checked += 1
        if have == want:
            agreed += 1
        else:
            mismatches.append({"module": module, "node": node.name, "plan": have, "observed": want,
                               "reason": node.reason})
    return {"checked": checked, "agreed": agreed, "unobserved": unobserved, "mismatches": mismatches}
