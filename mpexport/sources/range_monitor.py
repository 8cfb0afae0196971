"""``mpexport.RangeMonitor``: range evidence from the training loop, for the plan's range rule.

It runs in the user's training process and imports only torch and the standard library. On one step in
``every`` (steps 0, N, 2N...) it records, during the monitored model's forward passes only (not the loss, the
backward or the optimizer), the output of every floating-point torch function the model calls, as autocast
computed it: the largest |x|, how many values were not finite, and how many overflow FP16 (|x| >= 65520 rounds to
infinity). Between sampled steps nothing is installed: no hook, no mode, no work.

**Keys** (the join with the exported graph, :mod:`mpexport.precision.training_ranges`): ``(module, op, index)``:
the dotted path of the innermost module whose ``forward`` called the op (``""`` for the model's own forward), the
op's name as the torch function names it (``linear``, ``conv2d``, ``layer_norm``, ``add`` for ``x + y``), and its
call order among the calls of that op in that module during one forward pass of the model (the counters restart
with every forward pass, so micro-batches of one step fold into the same keys). The ops are seen with a
``TorchFunctionMode``, i.e. at the level where autocast intercepts them (``linear``, not the ``addmm`` it
dispatches to): the same level the exported program's nodes keep as their origin op (``aten.linear.default``). A
``TorchDispatchMode`` would see the decomposed kernels, which the exported graph does not name; forward hooks see
module outputs only, not every op. Nested calls inside a torch function (``F.layer_norm`` calling
``torch.layer_norm``) are one op: the mode is off inside its own handler.

**Memory** is one small record per key (at most :data:`MAX_OPS`; more are counted, not kept). **GradScaler**: pass
``scaler=``: a sampled step after which the scale decreased (the scaler skipped ``optimizer.step()`` on non-finite
gradients) is counted in ``skipped_steps`` and its values are dropped, not used as evidence.

Use::

    with mpexport.RangeMonitor(model, every=100) as monitor:     # arms step 0
        for batch in loader:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(batch).loss
            loss.backward(); optimizer.step(); optimizer.zero_grad()
            monitor.step()                                      # ends this step, arms the next
    mpexport.save(model, "model.pt2", example, ranges=monitor)

or without ``with``: ``monitor.start()``, ``monitor.step()`` per step, ``monitor.close()``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from mpexport.sources.range_format import BESIDE_FILE, FORMAT, FP16_OVERFLOW, MAX_OPS, VERSION

DEFAULT_EVERY = 100
SKIPPED_FUNCTIONS = frozenset({
    "view", "reshape", "flatten", "unflatten", "transpose", "permute", "t", "unsqueeze", "squeeze", "expand",
    "expand_as", "contiguous", "detach", "clone", "size", "dim", "numel", "__getitem__", "split", "chunk",
    "unbind", "view_as", "reshape_as", "narrow", "select", "float", "half", "bfloat16", "double", "to", "type",
    "type_as", "cpu", "cuda", "__get__", "__set__", "__setitem__", "requires_grad_", "__len__", "__iter__",
    "__format__", "__repr__", "__bool__", "__index__", "item", "tolist", "data_ptr", "stride", "storage_offset",
    "is_floating_point", "is_contiguous", "new_empty", "new_zeros", "new_ones", "new_full", "movedim", "moveaxis",
})
"""Functions not recorded: data movement, casts and queries (their values are another op's)."""


@dataclass
class OpRange:
    """What one key's outputs reached over the sampled steps that count (see the module docstring)."""

    max_abs: float = 0.0
    nonfinite: int = 0
    over_fp16: int = 0
    steps_over: int = 0
    """Sampled steps on which some output overflowed FP16."""
    steps: int = 0
    """Sampled steps on which the op ran."""

    def to_json(self, key: tuple[str, str, int]) -> dict[str, Any]:
        """One entry of the record's ``ops`` list (a non-finite peak written as a string)."""
        peak: float | str = self.max_abs if math.isfinite(self.max_abs) else "inf"
        return {"module": key[0], "op": key[1], "index": key[2], "max_abs": peak, "nonfinite": self.nonfinite,
                "over_fp16": self.over_fp16, "steps_over": self.steps_over, "steps": self.steps}


def function_name(func: Any) -> str:
    """The op name a torch function is recorded under: ``F.linear`` -> ``linear``, ``Tensor.__add__`` and
    ``__radd__`` -> ``add``, ``__matmul__`` -> ``matmul``, ``__truediv__`` -> ``div``, ``add_`` -> ``add_``."""
    name = str(getattr(func, "__name__", func))
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name.startswith(("r", "i")) and name[1:] in _DUNDER_OPS:
            name = name[1:]
        name = _DUNDER_OPS.get(name, name)
    return name


_DUNDER_OPS = {"add": "add", "sub": "sub", "mul": "mul", "truediv": "div", "matmul": "matmul", "pow": "pow",
               "neg": "neg", "floordiv": "floor_divide", "mod": "remainder", "abs": "abs"}


class _Recorder(TorchFunctionMode):
    """The function mode active during a sampled forward pass: records every floating-point output."""

    def __init__(self, monitor: RangeMonitor) -> None:
        super().__init__()
        self.monitor = monitor

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        result = func(*args, **(kwargs or {}))
        name = function_name(func)
        if name not in SKIPPED_FUNCTIONS:
            self.monitor.observe(name, result)
        return result


class RangeMonitor:
    """Records the range of every op's output on one training step in ``every`` (see the module docstring).
    ``scaler``: the run's ``torch.amp.GradScaler``, whose skipped steps are not evidence."""

    def __init__(self, model: torch.nn.Module, every: int = DEFAULT_EVERY, *,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a whole number >= 1, not {every!r}")
        self.model = model
        self.every = every
        self.scaler = scaler
        self.steps = 0
        self.sampled_steps = 0
        self.skipped_steps = 0
        self.dropped_ops = 0
        self.ops: dict[tuple[str, str, int], OpRange] = {}
        self._paths = {module: name for name, module in model.named_modules()}
        self._step_peaks: dict[tuple[str, str, int], tuple[float, int, int]] = {}
        self._stack: list[str] = []
        self._counters: dict[tuple[str, str], int] = {}
        self._handles: list[Any] = []
        self._mode: _Recorder | None = None
        self._scale: float | None = None
        self._open = False

    # -- the training loop's side ------------------------------------------------------------------------
    def __enter__(self) -> RangeMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> RangeMonitor:
        """Arm the first step (step 0 is sampled). Returns the monitor."""
        self._open = True
        self._arm()
        return self

    def step(self) -> None:
        """End the current training step (call it after ``optimizer.step()``/``scaler.update()``): fold a sampled
        step's values into the record, and arm the next step if it is sampled. Nothing else runs."""
        if not self._open:
            raise RuntimeError("RangeMonitor.step() outside the monitor: use `with monitor:` or monitor.start()")
        if self._handles:
            self._disarm()
            self._fold()
        self.steps += 1
        self._arm()

    def close(self) -> None:
        """Stop monitoring; a step begun but not ended by :meth:`step` is not counted."""
        self._disarm()
        self._step_peaks = {}
        self._open = False

    # -- what is recorded --------------------------------------------------------------------------------
    def exceeded(self) -> dict[str, list[str]]:
        """Module -> the ops (``op#index``) whose outputs overflowed FP16 on some sampled step."""
        found: dict[str, list[str]] = {}
        for (module, op, index), record in sorted(self.ops.items()):
            if record.over_fp16 or record.steps_over:
                found.setdefault(module, []).append(f"{op}#{index}")
        return found

    def summary(self) -> str:
        """One line for the end of training: how many ops overflowed FP16 and in which modules."""
        exceeded = self.exceeded()
        count = sum(len(ops) for ops in exceeded.values())
        skipped = f", {self.skipped_steps} skipped by the GradScaler" if self.skipped_steps else ""
        head = f"mpexport ranges: {self.sampled_steps} sampled steps of {self.steps}{skipped}, {len(self.ops)} ops"
        if not count:
            return f"{head}: none exceeded the FP16 range"
        modules = ", ".join(module or "<root>" for module in list(exceeded)[:8])
        more = f" and {len(exceeded) - 8} more" if len(exceeded) > 8 else ""
        return f"{head}: {count} exceeded the FP16 range (max 65504), in {modules}{more}"

    def to_json(self) -> dict[str, Any]:
        """The record as ``training_ranges.json`` / ``mpexport_ranges.json`` holds it."""
        return {"format": FORMAT, "version": VERSION, "torch": torch.__version__, "every": self.every,
                "steps": self.steps, "sampled_steps": self.sampled_steps, "skipped_steps": self.skipped_steps,
                "dropped_ops": self.dropped_ops, "modules": sorted(self._paths.values()),
                "ops": [record.to_json(key) for key, record in sorted(self.ops.items())]}

    def save(self, path: str | Path) -> Path:
        """Write the record to ``path`` atomically (a directory: ``mpexport_ranges.json`` in it). Returns it."""
        path = Path(path)
        if path.is_dir():
            path = path / BESIDE_FILE
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        with os.fdopen(handle, "w") as stream:
            json.dump(self.to_json(), stream, sort_keys=True)
        os.replace(temporary, path)
        return path

    # -- internals ---------------------------------------------------------------------------------------
    def _arm(self) -> None:
        if self.steps % self.every:
            return
        if self.scaler is not None and self.scaler.is_enabled():
            self._scale = float(self.scaler.get_scale())
        self._step_peaks = {}
        for module in self._paths:
            self._handles.append(module.register_forward_pre_hook(self._enter_module))
            self._handles.append(module.register_forward_hook(self._leave_module, always_call=True))

    def _disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._mode is not None:  # a forward that never returned
            self._mode.__exit__(None, None, None)
            self._mode = None
        self._stack = []

    def _enter_module(self, module: torch.nn.Module, args: Any) -> None:
        if not self._stack:
            self._counters = {}
            self._mode = _Recorder(self)
            self._mode.__enter__()
        self._stack.append(self._paths.get(module, "?"))

    def _leave_module(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._stack:
            self._stack.pop()
        if not self._stack and self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    def observe(self, name: str, result: Any) -> None:
        """Fold one op's output into the current step (called by the function mode)."""
        tensors = [result] if isinstance(result, torch.Tensor) else \
            [item for item in result if isinstance(item, torch.Tensor)] if isinstance(result, (tuple, list)) else []
        floats = [tensor for tensor in tensors if tensor.is_floating_point() and tensor.numel()]
        if not floats or not self._stack:
            return
        module = self._stack[-1]
        index = self._counters.get((module, name), 0)
        self._counters[(module, name)] = index + 1
        key = (module, name, index)
        with torch.no_grad():
            peak, nonfinite, over = 0.0, 0, 0
            for tensor in floats:
                value = float(torch.linalg.vector_norm(tensor.detach(), math.inf))
                if not math.isfinite(value) or value >= FP16_OVERFLOW:
                    nonfinite, over = _counts(tensor, nonfinite, over)
                peak = max(peak, math.inf if math.isnan(value) else value)  # a NaN counts as unbounded
        before = self._step_peaks.get(key)
        if before is not None:
            peak, nonfinite, over = max(peak, before[0]), nonfinite + before[1], over + before[2]
        self._step_peaks[key] = (peak, nonfinite, over)

    def _fold(self) -> None:
        peaks, self._step_peaks = self._step_peaks, {}
        if self._scaler_skipped():
            self.skipped_steps += 1
            return
        self.sampled_steps += 1
        for key, (peak, nonfinite, over) in peaks.items():
            record = self.ops.get(key)
            if record is None:
                if len(self.ops) >= MAX_OPS:
                    self.dropped_ops += 1
                    continue
                record = self.ops[key] = OpRange()
            record.max_abs = max(record.max_abs, peak)
            record.nonfinite += nonfinite
            record.over_fp16 += over
            record.steps_over += bool(over or not math.isfinite(peak) or peak >= FP16_OVERFLOW)
            record.steps += 1

    def _scaler_skipped(self) -> bool:
        """True when the GradScaler's scale went down since the step began: it skipped this step."""
        if self.scaler is None or not self.scaler.is_enabled() or self._scale is None:
            return False
        return float(self.scaler.get_scale()) < self._scale


def _counts(tensor: torch.Tensor, nonfinite: int, over: int) -> tuple[int, int]:
    """``nonfinite`` and ``over`` plus this tensor's non-finite values and finite values that overflow FP16 (the
    rare path: only for outputs whose peak is out of range)."""
    values = tensor.detach().float().abs()
    finite = torch.isfinite(values)
    return (nonfinite + int(values.numel() - int(finite.sum())),
            over + int(((values >= FP16_OVERFLOW) & finite).sum()))
