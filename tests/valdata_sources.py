"""Validation data given as ``module:function`` (for the tests)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from tests.conftest import MODELS


def digits_loader() -> torch.utils.data.DataLoader:
    """The bundled digits validation set as a DataLoader of (pixels, labels) tuples."""
    with np.load(MODELS / "digits_resnet.val.npz") as data:
        dataset = torch.utils.data.TensorDataset(torch.from_numpy(data["pixels"]), torch.from_numpy(data["labels"]))
    return torch.utils.data.DataLoader(dataset, batch_size=50)


def digits_dicts() -> Iterator[dict[str, np.ndarray]]:
    """The same data as a generator of named batches."""
    with np.load(MODELS / "digits_resnet.val.npz") as data:
        pixels, labels = data["pixels"], data["labels"]
    for start in range(0, len(pixels), 100):
        yield {"pixels": pixels[start:start + 100], "labels": labels[start:start + 100]}


def nothing() -> list:
    """No batches at all."""
    return []


def broken() -> Iterator[dict[str, np.ndarray]]:
    """Fails while iterating."""
    raise OSError("the dataset's storage is unreachable")
