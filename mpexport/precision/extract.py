"""Read the autocast policy tables out of the installed torch (see :mod:`mpexport.precision.policy`).

Every op with an ``AutocastCPU``/``AutocastCUDA`` kernel is classified by calling its autocast wrapper: a
dispatch mode below autocast records the casts the wrapper makes and the call it redispatches, then aborts
before any kernel runs. CUDA wrappers run on fake CUDA tensors, so no GPU is needed.

    python -m mpexport.precision.extract     # writes mpexport/precision/policies/autocast-torch-<major.minor>.json
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import torch

from mpexport.precision.policy import (
    BANNED,
    DEVICE_KEYS,
    FP32,
    FP32_APPEND_DTYPE,
    FP32_SET_OPT_DTYPE,
    LOWER,
    PROMOTE,
    op_key,
    torch_minor,
)


class _Redispatched(Exception):
    """Raised by the recorder once the autocast wrapper has passed the call on."""


_PASSTHROUGH = (torch.ops.aten._to_copy.default, torch.ops.aten.empty.memory_format)
"""What an autocast wrapper itself calls (casts; device queries are ``prim`` ops) before it redispatches."""


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Sits below autocast: records the casts the wrapper makes, then the call it redispatches, and aborts."""

    def __init__(self) -> None:
        super().__init__()
        self.casts: list[torch.dtype] = []
        self.call: tuple[Any, list[torch.dtype], Any] | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") is not None:
            self.casts.append(kwargs["dtype"])
        if func.namespace == "prim" or func in _PASSTHROUGH:
            return func(*args, **kwargs)
        dtypes: list[torch.dtype] = []
        _collect_dtypes(list(args) + list(kwargs.values()), dtypes)
        self.call = (func, dtypes, kwargs.get("dtype", next((a for a in args if isinstance(a, torch.dtype)), None)))
        raise _Redispatched


def _collect_dtypes(values: list[Any], found: list[torch.dtype]) -> None:
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value.dtype)
        elif isinstance(value, (list, tuple)):
            _collect_dtypes(list(value), found)


def registered_ops(device: str) -> list[str]:
    """Names (``aten::op.overload``) of every op with an autocast kernel for ``device`` in the installed torch."""
    key = DEVICE_KEYS[device]
    found = []
    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("aten::"):
            continue
        try:
            if torch._C._dispatch_has_kernel_for_dispatch_key(name, key):
                found.append(name)
        except RuntimeError:
            continue
    return sorted(found)


def _overload(name: str) -> Any:
    op_name, _, overload = name.removeprefix("aten::").partition(".")
    return getattr(getattr(torch.ops.aten, op_name), overload or "default")


def _dummy_args(schema: Any, make_tensor: Any) -> tuple[list[Any], dict[str, Any]] | None:
    """Arguments that satisfy ``schema``'s types (values are never computed on). None if unsupported."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for argument in schema.arguments:
        value = _dummy_value(argument, make_tensor)
        if value is _UNSUPPORTED:
            return None
        if argument.kwarg_only:
            kwargs[argument.name] = value
        else:
            args.append(value)
    return args, kwargs


_UNSUPPORTED = object()


def _dummy_value(argument: Any, make_tensor: Any) -> Any:
    kind = str(argument.type)
    optional = kind.endswith("?")
    base = kind.rstrip("?")
    if base == "Tensor":
        return make_tensor()
    if base in ("Tensor[]", "List[Tensor]", "Tensor?[]", "List[Optional[Tensor]]"):
        return [make_tensor(), make_tensor()]
    if optional:
        return None
    if base in ("int", "SymInt"):
        return 1
    if base in ("int[]", "SymInt[]", "List[int]", "List[SymInt]") or base.startswith(("int[", "SymInt[")):
        return [1] * (argument.N or 1)
    if base == "float":
        return 1.0
    if base == "float[]":
        return [1.0]
    if base == "bool":
        return False
    if base.startswith("bool["):
        return [False, False, False]
    if base in ("Scalar", "number"):
        return 1.0
    if base in ("str",):
        return "mean" if argument.name == "reduction" else "fro"
    if base == "ScalarType":
        return torch.float32
    if argument.has_default_value():
        return argument.default_value
    return _UNSUPPORTED


@contextlib.contextmanager
def _autocast_on(device: str, low: torch.dtype) -> Iterator[Any]:
    """Autocast enabled for ``device`` (CUDA via the thread-local flags, which need no GPU) plus a tensor maker."""
    if device == "cpu":
        with torch.autocast("cpu", dtype=low):
            yield lambda dtype, shape: torch.zeros(shape, dtype=dtype)
        return
    from mpexport.precision.oracle import fake_cuda_autocast

    with fake_cuda_autocast(low) as to_fake_cuda:
        yield lambda dtype, shape: to_fake_cuda(torch.empty(shape, dtype=dtype, device="meta"))


PROBE_SHAPES = ((1, 1, 4, 4), (2, 2), (4,), (1, 2, 2), (1, 1, 2, 2, 2))
"""Tensor shapes tried in turn: composite ops check ranks before their wrapper's redispatch reaches the mode."""


def _probe(name: str, device: str, low: torch.dtype, input_dtype: torch.dtype) -> tuple[Any, list, Any] | str:
    overload = _overload(name)
    outcome = "unsupported-signature"
    for shape in PROBE_SHAPES:
        with _autocast_on(device, low) as tensor:
            prepared = _dummy_args(overload._schema, lambda: tensor(input_dtype, shape))  # noqa: B023
            if prepared is None:
                return "unsupported-signature"
            args, kwargs = prepared
            recorder = _Recorder()
            try:
                with recorder:
                    overload(*args, **kwargs)
            except _Redispatched:
                func, _, dtype_arg = recorder.call  # type: ignore[misc]
                return func, recorder.casts, dtype_arg
            except Exception as exc:  # noqa: BLE001 - a refusing wrapper (banned op) is a finding
                if "unsafe to autocast" in str(exc):
                    return BANNED
                outcome = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return outcome


def classify(name: str, device: str, low: torch.dtype = torch.float16) -> str:
    """The cast class of op ``name`` under ``device`` autocast, read by calling its autocast wrapper: which
    casts it makes on FP32 inputs, then on low-precision inputs, and which dtype argument it passes on."""
    on_fp32 = _probe(name, device, low, torch.float32)
    if isinstance(on_fp32, str):
        return on_fp32
    _, casts, _ = on_fp32
    if low in casts:
        return LOWER
    on_low = _probe(name, device, low, low)
    if isinstance(on_low, str):
        return on_low
    func, casts, dtype_arg = on_low
    if dtype_arg == torch.float32:
        return FP32_APPEND_DTYPE if func.name() != _overload(name).name() else FP32_SET_OPT_DTYPE
    if func.name() in _HALF_TO_FLOAT:
        return FP32_SET_OPT_DTYPE  # softmax(dtype=float) on a CUDA half tensor becomes _softmax(half_to_float)
    if torch.float32 in casts:
        return FP32
    return PROMOTE


_HALF_TO_FLOAT = ("aten::_softmax", "aten::_log_softmax")

KNOWN_CLASSES: dict[str, dict[str, str]] = {
    # Ops whose wrapper cannot be probed with placeholder arguments (their composite checks shapes or
    # argument values before redispatching); classes as listed in ATen's autocast_mode.h / .cpp.
    "cuda": {
        "aten._convolution": LOWER, "aten._convolution.deprecated": LOWER, "aten.convolution": LOWER,
        "aten.prelu": LOWER, "aten.einsum": LOWER, "aten.lstm_cell": LOWER, "aten.gru_cell": LOWER,
        "aten.native_layer_norm": FP32, "aten.rms_norm": FP32, "aten.cosine_embedding_loss": FP32,
        "aten.nuclear_norm.dim": FP32,
        "aten.linalg_matrix_norm": FP32_SET_OPT_DTYPE, "aten.linalg_matrix_norm.str_ord": FP32_SET_OPT_DTYPE,
        "aten.sum.dim_IntList": FP32_SET_OPT_DTYPE, "aten.norm.ScalarOpt_dim": FP32_APPEND_DTYPE,
        "aten.cross": PROMOTE,
        # CUDA builds: the wrapper asks the driver which SDPA kernel to use before it redispatches.
        "aten.scaled_dot_product_attention": LOWER,
        # CUDA builds: registered as _cudnn_rnn_cast_reflatten (casts inputs and weights to the low type).
        "aten._cudnn_rnn": LOWER,
    },
    "cpu": {
        "aten._convolution.deprecated": LOWER, "aten.prelu": LOWER,
        "aten.cosine_embedding_loss": FP32, "aten.cross_entropy_loss": FP32, "aten.linalg_tensorsolve": FP32,
        "aten.quantile": FP32, "aten.nanquantile": FP32, "aten.stft": FP32, "aten.stft.center": FP32,
    },
}
CLASSES = (LOWER, FP32, FP32_SET_OPT_DTYPE, FP32_APPEND_DTYPE, PROMOTE, BANNED)


def extract_policy_table() -> dict[str, Any]:
    """Classify every op with an autocast kernel, per device, from the installed torch: by probing its
    wrapper, else from :data:`KNOWN_CLASSES` (listed under ``from_source``), else, for a named-tensor overload,
    by probing its integer-dim sibling (listed under ``from_sibling``); ops none of these resolves are listed
    under ``unresolved`` (none for the shipped tables)."""
    devices: dict[str, dict[str, str]] = {}
    from_source: dict[str, list[str]] = {}
    from_sibling: dict[str, dict[str, str]] = {}
    unresolved: dict[str, dict[str, str]] = {}
    for device in DEVICE_KEYS:
        low = torch.float16 if device == "cuda" else torch.bfloat16
        table: dict[str, str] = {}
        for name in registered_ops(device):
            key = op_key(name)
            found = classify(name, device, low)
            if found not in CLASSES and key in KNOWN_CLASSES[device]:
                from_source.setdefault(device, []).append(key)
                found = KNOWN_CLASSES[device][key]
            sibling = _named_tensor_sibling(name) if found not in CLASSES else None
            if sibling is not None:
                from_sibling.setdefault(device, {})[key] = op_key(sibling)
                found = _probed_or_known(sibling, device, low)
            if found not in CLASSES:
                unresolved.setdefault(device, {})[key] = found
                continue
            table[key] = found
        devices[device] = table
    return {"torch": torch_minor(torch.__version__), "method": "probe of the autocast kernels registered in torch",
            "from_source": from_source, "from_sibling": from_sibling, "unresolved": unresolved, "devices": devices}


def _probed_or_known(name: str, device: str, low: torch.dtype) -> str:
    """The class :func:`classify` reads from the wrapper, else the one :data:`KNOWN_CLASSES` lists (else the
    probe's outcome)."""
    found = classify(name, device, low)
    return KNOWN_CLASSES[device].get(op_key(name), found) if found not in CLASSES else found


def _named_tensor_sibling(name: str) -> str | None:
    """For a named-tensor overload (a ``Dimname`` argument, which placeholder arguments cannot fill: torch up to
    2.12 registers autocast kernels for them), the overload of the same op whose arguments have the same names with
    integer dims: ATen lists both under one policy. None for other ops."""
    schema = _overload(name)._schema
    if not _is_named_tensor_overload(schema):
        return None
    op_name = name.removeprefix("aten::").partition(".")[0]
    packet = getattr(torch.ops.aten, op_name)
    wanted = [argument.name for argument in schema.arguments]
    for overload in packet.overloads():
        candidate = getattr(packet, overload)._schema
        if not _is_named_tensor_overload(candidate) and [argument.name for argument in candidate.arguments] == wanted:
            return f"aten::{op_name}" + (f".{overload}" if overload != "default" else "")
    return None


def _is_named_tensor_overload(schema: Any) -> bool:
    """Older torch prints a ``Dimname`` argument's type as ``str``: the overload name tells as well."""
    overload = schema.overload_name.lower()
    return "dimname" in overload or overload.startswith("names") or \
        any("Dimname" in str(argument.type) for argument in schema.arguments)


def main() -> None:
    """Write the table for the installed torch into ``mpexport/precision/policies/``."""
    import warnings
    from pathlib import Path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = extract_policy_table()
    path = Path(__file__).parent / "policies" / f"autocast-torch-{table['torch']}.json"
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}: " + ", ".join(f"{d} {len(t)} ops" for d, t in table["devices"].items())
          + (f"; unresolved {table['unresolved']}" if table["unresolved"] else ""))


if __name__ == "__main__":
    main()
