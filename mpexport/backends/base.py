"""The one interface every backend has: ``run(batch)`` returns the model's outputs as numpy arrays, in order."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from mpexport.base.specs import Batch


class Runner(Protocol):
    """Runs one model: ``run(batch)`` returns the flat list of outputs, in the model's output order."""

    name: str

    def run(self, batch: Batch) -> list[np.ndarray]:
        """Outputs for one batch of named inputs."""
