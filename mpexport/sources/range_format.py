"""The range record's form, shared by the monitor that writes it in the training process
(:mod:`mpexport.sources.range_monitor`) and the reader that checks it (:mod:`mpexport.sources.training_ranges`).
Standard library only: the monitor imports it beside torch."""

from __future__ import annotations

FORMAT = "mpexport.training_ranges"
VERSION = 1
FP16_OVERFLOW = 65520.0
"""The smallest magnitude that rounds to infinity in FP16 (round to nearest even; the FP16 max is 65504)."""
MAX_OPS = 20_000
"""Most op records one monitor keeps (an unrolled loop can make many): more are counted in ``dropped_ops``."""
ARCHIVE_FILE = "training_ranges.json"
"""The extra file of a ``.pt2`` written by ``mpexport.save(..., ranges=monitor)`` that holds the record."""
BESIDE_FILE = "mpexport_ranges.json"
"""The file beside a checkpoint (or in a model directory) that holds the record (the training callbacks')."""
