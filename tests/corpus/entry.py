"""What a corpus entry is: where its graph comes from, how it is built, and what ``convert`` and ``verify`` must say
about it.

Nothing here imports mpexport: the corpus is the outside world's models, and the benchmark
(``benchmarks/peer_corpus.py``) runs it against whichever mpexport is on the path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

# Commits the graphs were rebuilt from (read with the repositories' own files; see tests/corpus/README.md).
OCC = "microsoft/onnxconverter-common"
OCC_COMMIT = "28b00d4c0617ae181b06dfe16272fca44988fe5c"
MODELOPT = "NVIDIA/Model-Optimizer"
MODELOPT_COMMIT = "a2fbac7bad8ab446d3f8783dadb0c3366eb0ad73"
ORT = "microsoft/onnxruntime"
ORT_COMMIT = "d930f6ec54e5be1fdd4afbc39c6e5f3906a7dd73"
HERE = "mpexport (this repository)"

SAMPLES = 16  # validation samples per entry: enough for the gate's statistics, small enough for the suite


@dataclass(frozen=True)
class Origin:
    """Where a graph comes from: repository, file, commit and licence, and what was changed when rebuilding it."""

    repository: str
    path: str
    commit: str
    licence: str
    changes: str = ""


@dataclass(frozen=True)
class Planned:
    """What the plan must give the nodes of one op type: ``precision`` ("fp16", "fp32") for ``every`` node of that
    type, or for at least one (``every=False``)."""

    op_type: str
    precision: str
    every: bool = True

    def describe(self) -> str:
        """``LSTM fp16`` / ``some MatMul fp32``."""
        return f"{'' if self.every else 'some '}{self.op_type} {self.precision}"


@dataclass(frozen=True)
class Expect:
    """What mpexport must do with the entry with no option beyond ``--val-data``.

    ``convert`` is ``"ok"`` (exit 0, lint passed) or ``"refused"`` (exit 2, one line naming every ``refusal``
    fragment). ``verify`` is ``"pass"`` or ``"refused"`` (``refusal`` names why). Every converted entry is also held
    to the rules every model is: no floating-point node planned "not floating point", every multiply-accumulate node
    counted in the MAC share, verify covering every sample of the set.
    """

    convert: str = "ok"
    verify: str = "pass"
    refusal: tuple[str, ...] = ()
    planned: tuple[Planned, ...] = ()
    min_low_mac_share: float | None = None
    xfail: str | None = None  # "issue #24 item N: why", while the fix is not in place


@dataclass(frozen=True)
class Built:
    """The files a builder wrote."""

    model: Path
    val: Path


@dataclass(frozen=True)
class Entry:
    """One corpus model."""

    name: str
    origin: Origin
    tests: str
    build: Callable[[Path], Built] = field(repr=False)
    expect: Expect = Expect()


def write(directory: Path, model: onnx.ModelProto, arrays: dict[str, np.ndarray], *, check: bool = True) -> Built:
    """Save ``model.onnx`` and ``val.npz`` into ``directory``; the ONNX checker runs first unless the graph is one
    ONNX Runtime accepts and the checker does not (``check=False``: contrib ops, opset-16 LayerNormalization)."""
    directory.mkdir(parents=True, exist_ok=True)
    if check:
        onnx.checker.check_model(model)
    onnx.save(model, directory / "model.onnx")
    np.savez(directory / "val.npz", **arrays)
    return Built(directory / "model.onnx", directory / "val.npz")


def rng(seed: int = 0) -> np.random.Generator:
    """The generator every builder draws weights and data from (seeded: the corpus is the same on every run)."""
    return np.random.default_rng(seed)


def normal(generator: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    """FP32 normal values of the given scale."""
    return (generator.standard_normal(shape) * scale).astype(np.float32)


def token_batch(generator: np.random.Generator, vocab: int, samples: int = SAMPLES,
                seq: int = 16) -> dict[str, np.ndarray]:
    """``input_ids`` within the vocabulary (0 is padding) and an ``attention_mask`` of 0/1 with right padding on
    every third sequence, as a tokenizer pads a batch."""
    ids = generator.integers(1, vocab, (samples, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    for row in range(0, samples, 3):
        keep = int(generator.integers(seq // 2, seq))
        mask[row, keep:] = 0
        ids[row, keep:] = 0
    return {"input_ids": ids, "attention_mask": mask}
