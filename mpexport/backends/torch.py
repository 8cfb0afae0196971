"""The PyTorch runner: a module on a batch of numpy arrays, in true FP32 (no TF32), outputs flattened in order."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from mpexport.base.specs import Batch


class TorchRunner:
    """A PyTorch callable in FP32, inputs passed by name (or by position for positional-only models).

    ``device="cuda"`` runs it on the GPU in true FP32 (TF32 off for matmuls and convolutions); the module is
    moved there on the first batch, and if that fails (a model with CPU-only constants, no memory) the runner
    goes back to the CPU for good and says why in :attr:`note`."""

    def __init__(self, model: Callable[..., Any], input_names: Sequence[str], *, positional: bool = False,
                 name: str = "torch-fp32", device: str = "cpu") -> None:
        self.name = name
        self.model = model
        self.input_names = list(input_names)
        self.positional = positional
        self.device = device
        self.note: str | None = None
        self._moved = device == "cpu"

    def run(self, batch: Batch) -> list[np.ndarray]:
        if self.device != "cpu":
            try:
                return self._run(batch)
            except Exception as exc:  # noqa: BLE001 - any failure on the GPU falls back to the CPU
                self.note = f"{self.name} ran on the CPU: on {self.device} it failed ({type(exc).__name__}: " \
                    f"{str(exc).splitlines()[0] if str(exc) else ''})"
                self.device = "cpu"
                self._to(self.device)
        return self._run(batch)

    def _run(self, batch: Batch) -> list[np.ndarray]:
        if not self._moved:
            self._to(self.device)
            self._moved = True
        tensors = [torch.from_numpy(np.require(batch[name], requirements="C")).to(self.device)  # rank 0 stays rank 0
                   for name in self.input_names]
        with torch.no_grad(), _true_fp32():
            if self.positional:
                result = self.model(*tensors)
            else:
                result = self.model(**dict(zip(self.input_names, tensors, strict=True)))
        return [leaf.detach().float().cpu().numpy() if leaf.dtype == torch.bfloat16 else leaf.detach().cpu().numpy()
                for leaf in flatten_outputs(result)]

    def _to(self, device: str) -> None:
        to = getattr(self.model, "to", None)
        if callable(to):
            to(device)


@contextlib.contextmanager
def _true_fp32() -> Iterator[None]:
    """FP32 matmuls and convolutions without TF32 on GPUs that have it (the CPU is unaffected)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def best_device() -> str:
    """``cuda`` where torch sees a GPU, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def flatten_outputs(result: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (tensor, tuple, dict, dataclass-like ModelOutput), in pytree order."""
    leaves, _ = pytree.tree_flatten(result)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def output_names(result: Any) -> list[str]:
    """Readable, unique names for a model's flattened outputs: ``output`` for a single tensor, dict keys and
    attribute names for structured outputs (``logits``, ``hidden_states_0``), ``output_0``... otherwise."""
    flat, _ = pytree.tree_flatten_with_path(result)
    tensors = [(path, leaf) for path, leaf in flat if isinstance(leaf, torch.Tensor)]
    if len(tensors) == 1 and not tensors[0][0]:
        return ["output"]
    names: list[str] = []
    for index, (path, _) in enumerate(tensors):
        parts = [_key_text(key) for key in path]
        name = re.sub(r"\W+", "_", "_".join(part for part in parts if part)).strip("_") or f"output_{index}"
        if name[0].isdigit():
            name = f"output_{name}"
        while name in names:
            name = f"{name}_{index}"
        names.append(name)
    return names


def _key_text(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)
