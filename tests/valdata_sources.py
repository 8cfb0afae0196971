"""Validation data given as ``module:function`` (for the tests)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from tests.helpers import MODELS


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


def slow_digits() -> Iterator[dict[str, np.ndarray]]:
    """The transformer example's digits one at a time, slowly; from its third pass on (verify's backend passes:
    the first two read the first batch and an example) it creates the file ``$MPEXPORT_TEST_MARKER`` so a test
    knows when to interrupt."""
    import os
    import time
    from pathlib import Path

    marker = Path(os.environ["MPEXPORT_TEST_MARKER"])
    calls = marker.with_suffix(".calls")
    count = int(calls.read_text()) + 1 if calls.exists() else 1
    calls.write_text(str(count))
    with np.load(MODELS / "digits_transformer.val.npz") as data:
        pixels = data["pixels"]
    for index in range(len(pixels)):
        if count >= 3:
            marker.touch()
            time.sleep(0.05)
        yield {"pixels": pixels[index:index + 1]}
