"""Labels: class indices, checked where they are read (every batch of every source) and against the model's number
of classes where that is known.

Labels with one value per sample (shape ``(N,)``, or ``(N, 1)``, taken as ``(N,)``) are the class of each sample:
whole numbers (a float array of whole numbers is taken), from 0. Labels with more values per sample (a label per
token) must be whole numbers too, but may be negative: ``-100`` marks a position to ignore (PyTorch's
``ignore_index``); they do not count towards accuracy, which compares one label with one row of scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mpexport.base.errors import MpexportError
from mpexport.data.limits import shown

STAGE = "val-data"
HINT = "labels are class indices: whole numbers from 0 to the number of classes - 1"


def per_sample(labels: np.ndarray) -> np.ndarray:
    """``(N, 1)`` labels as ``(N,)`` (so that they compare with one predicted class per sample); others unchanged."""
    return labels.reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels


def check_labels(labels: np.ndarray, source: str | Path, start: int | None = None) -> None:
    """Promise: ``labels`` are numbers, whole (no fraction, NaN or Inf), and not negative where there is one per
    sample. One line naming ``source`` (and the first sample of the batch, ``start``) and the first bad value
    otherwise."""
    where = f"'{shown(source)}'" + (f" (samples from {start})" if start is not None else "")
    if labels.dtype.kind not in "biuf":
        raise MpexportError(f"labels in {where} have dtype {labels.dtype}, not a number type", stage=STAGE,
                            hint=HINT)
    if labels.dtype.kind == "f":
        finite = np.isfinite(labels)
        if not finite.all():
            raise MpexportError(f"labels in {where} hold {_count(int((~finite).sum()), 'NaN/Inf value')}", stage=STAGE,
                                hint=HINT)
        fractional = labels != np.floor(labels)
        if fractional.any():
            raise MpexportError(f"labels in {where} hold {_count(int(fractional.sum()), 'fractional value')} (e.g. "
                                f"{labels[fractional].flat[0].item()!r}), not class indices", stage=STAGE, hint=HINT)
    labels = per_sample(labels)
    if labels.ndim <= 1 and labels.dtype.kind in "if" and labels.size and labels.min() < 0:
        raise MpexportError(f"labels in {where} hold negative values (e.g. {labels.min().item()!r}), not class indices",
                            stage=STAGE, hint=HINT)


def check_label_classes(labels: np.ndarray, classes: int, source: str | Path | None = None) -> None:
    """Promise: labels with one value per sample are below ``classes`` (the model's scores per sample, the last
    dimension of a ``(batch, classes)`` output); one line naming the largest label and ``source`` (default: "the
    validation data") otherwise. Labels with more values per sample are not compared with scores, and not
    checked."""
    labels = per_sample(np.asarray(labels))
    if labels.ndim != 1 or not labels.size:
        return
    largest = labels.max().item()
    if largest >= classes:
        where = f"'{shown(source)}'" if source is not None else "the validation data"
        raise MpexportError(f"labels in {where} go up to {largest!r}, the model scores {classes} classes "
                            f"(0 to {classes - 1})", stage=STAGE, hint=HINT)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")
