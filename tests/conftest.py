"""Shared fixtures: the bundled examples converted once per session, the CLI run in-process, small models and
data (helpers that are not fixtures live in :mod:`tests.helpers`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mpexport.cli import main
from tests.helpers import DIGITS_VAL, MODELS, REPO, CliResult


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist every worker is one of the machine's cores: one thread each for PyTorch, ONNX Runtime and
    the subprocesses the tests start (two workers of two threads each on two cores made the suite no faster)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        from mpexport.backends.onnxruntime import limit_threads

        os.environ["OMP_NUM_THREADS"] = "1"
        limit_threads(1)


LONGEST_FIRST = ("tests/check/test_scale.py", "tests/commands/test_convert.py", "tests/precision/test_plan.py",
                 "tests/graph/test_rewrite.py", "tests/check/test_verify.py", "tests/sources/test_training_records.py",
                 "tests/deploy/test_package.py", "tests/corpus/test_corpus.py")
"""The files that take longest (``--durations=0``, summed per file): under ``--dist loadfile`` a worker takes a whole
file, in collection order, so the longest go first and the short ones fill in behind them (a long file taken last
would leave the other worker idle at the end)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files of :data:`LONGEST_FIRST` first, in that order; every file's tests keep their order."""
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """The bundled digits validation set: pixels (N x 1 x 8 x 8) and labels."""
    with np.load(DIGITS_VAL) as data:
        return {"pixels": data["pixels"], "labels": data["labels"]}


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled digits ResNet converted with its validation set (shared: tests read it, or copy it to change it)."""
    import mpexport

    out = tmp_path_factory.mktemp("bundle") / "resnet"
    mpexport.convert(MODELS / "digits_resnet.pt2", out=out, val_data=DIGITS_VAL)
    return out


@pytest.fixture(scope="session")
def verified(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled transformer, converted and verified (shared: copy it before changing it)."""
    out = tmp_path_factory.mktemp("verified") / "transformer"
    runner = CliRunner()
    assert runner.invoke(main, ["convert", str(MODELS / "digits_transformer.pt2"), "--val-data",
                                str(MODELS / "digits_transformer.val.npz"), "--out", str(out)]).exit_code == 0
    assert runner.invoke(main, ["verify", str(out)]).exit_code == 0
    return out


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch):
    """Run ``mpexport ARGS...`` in this process from the repository root; returns a :class:`CliResult`."""
    monkeypatch.chdir(REPO)

    def run(*args: str) -> CliResult:
        result = CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run


@pytest.fixture
def digits_val() -> Path:
    """The bundled ResNet example's validation set."""
    return MODELS / "digits_resnet.val.npz"


@pytest.fixture
def cnn_checkpoint(tmp_path: Path) -> Path:
    """``ckpt.pt``: a state-dict checkpoint of ``tests.toy_models:build_cnn`` (load it with that factory)."""
    from tests.toy_models import build_cnn

    path = tmp_path / "ckpt.pt"
    torch.save(build_cnn().state_dict(), path)
    return path


@pytest.fixture
def pixels_npz(tmp_path: Path) -> Path:
    """A small validation set for 1x8x8 models: the first 24 bundled digits."""
    with np.load(MODELS / "digits_resnet.val.npz") as data:
        path = tmp_path / "val.npz"
        np.savez(path, pixels=data["pixels"][:24], labels=data["labels"][:24])
    return path


def _save_text_model(root: Path, name: str, model: torch.nn.Module, vocab: int) -> dict[str, Path]:
    """Export a token model with dynamic batch and sequence to .pt2, plus a checkpoint and validation data."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (12, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[::3, 7:] = 0
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=64)
    program = torch.export.export(model, (), {"input_ids": ids[:4], "attention_mask": mask[:4]},
                                  dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                  "attention_mask": {0: batch, 1: seq}})
    torch.export.save(program, root / f"{name}.pt2")
    torch.save({"state_dict": model.state_dict()}, root / f"{name}.ckpt")
    np.savez(root / f"{name}.npz", input_ids=ids.numpy(), attention_mask=mask.numpy(), labels=np.arange(12) % 3)
    return {"pt2": root / f"{name}.pt2", "ckpt": root / f"{name}.ckpt", "val": root / f"{name}.npz"}


@pytest.fixture(scope="session")
def bert_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny transformers BERT classifier (SDPA attention, LayerNorm) as .pt2 and checkpoint, with data."""
    from tests.toy_models import build_bert

    return _save_text_model(tmp_path_factory.mktemp("bert"), "bert", build_bert(), 200)


@pytest.fixture(scope="session")
def llama_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny transformers Llama (RMSNorm with explicit FP32 casts, rotary embeddings, SDPA, SiLU MLP)."""
    from tests.toy_models import build_llama

    return _save_text_model(tmp_path_factory.mktemp("llama"), "llama", build_llama(), 100)
