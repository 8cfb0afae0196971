"""A Lightning callback that records range evidence during training.

    trainer = lightning.Trainer(..., callbacks=[RangeMonitorCallback(every=100)])

At every checkpoint save and at the end of training it writes ``mpexport_ranges.json`` into the checkpoint
directory (beside the ``.ckpt`` files ``mpexport convert ckpt --factory ...`` reads), and at the end prints one
line: how many ops exceeded the FP16 range, in which modules. ``lightning`` (or ``pytorch_lightning``) is imported
when the callback is created, not with this module.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from mpexport.sources.range_format import BESIDE_FILE
from mpexport.sources.range_monitor import DEFAULT_EVERY, RangeMonitor


def RangeMonitorCallback(every: int = DEFAULT_EVERY, *, report: bool = True) -> Any:
    """A Lightning ``Callback`` running a :class:`RangeMonitor` (one step in ``every``) on the LightningModule;
    ``report``: print the one-line summary at the end of training."""
    try:
        base: Any = importlib.import_module("lightning.pytorch").Callback
    except ImportError:
        base = importlib.import_module("pytorch_lightning").Callback

    class _Callback(base):
        def __init__(self) -> None:
            self.monitor: RangeMonitor | None = None
            self.summary = ""

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.monitor = RangeMonitor(pl_module, every=every).start()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if self.monitor is not None:
                self.monitor.step()

        def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Any) -> None:
            self._write(trainer)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self.monitor is None:
                return
            self.monitor.close()
            self._write(trainer)
            self.summary = self.monitor.summary()
            if report and trainer.is_global_zero:
                print(self.summary)

        def _write(self, trainer: Any) -> None:
            directory = _checkpoint_directory(trainer)
            if self.monitor is not None and directory is not None and trainer.is_global_zero:
                directory.mkdir(parents=True, exist_ok=True)
                self.monitor.save(directory / BESIDE_FILE)

    return _Callback()


def _checkpoint_directory(trainer: Any) -> Path | None:
    """Where the trainer's checkpoints go (its checkpoint callback's ``dirpath``), else its log directory."""
    callback = getattr(trainer, "checkpoint_callback", None)
    directory = getattr(callback, "dirpath", None) or getattr(trainer, "log_dir", None)
    return Path(directory) if directory else None
