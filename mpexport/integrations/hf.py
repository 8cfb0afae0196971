"""A Hugging Face ``Trainer`` callback that records range evidence during training.

    trainer = Trainer(model=model, args=args, ..., callbacks=[RangeMonitorCallback(every=100)])

On each save it writes ``mpexport_ranges.json`` into the ``checkpoint-N`` directory, and at the end of training
into ``output_dir`` (where ``save_pretrained``/``save_model`` puts the model ``mpexport convert DIR`` reads), and
prints one line: how many ops exceeded the FP16 range, in which modules. ``transformers`` is imported when the
callback is created, not with this module.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from mpexport.sources.range_format import BESIDE_FILE
from mpexport.sources.range_monitor import DEFAULT_EVERY, RangeMonitor


def RangeMonitorCallback(every: int = DEFAULT_EVERY, *, report: bool = True) -> Any:
    """A ``transformers.TrainerCallback`` running a :class:`RangeMonitor` (one step in ``every``) on the Trainer's
    model; ``report``: print the one-line summary at the end of training."""
    base: Any = importlib.import_module("transformers").TrainerCallback

    class _Callback(base):
        def __init__(self) -> None:
            self.monitor: RangeMonitor | None = None
            self.summary = ""

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            self.monitor = RangeMonitor(model, every=every).start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.monitor is not None:
                self.monitor.step()

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if self.monitor is not None and checkpoint.is_dir() and state.is_world_process_zero:
                self.monitor.save(checkpoint / BESIDE_FILE)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.monitor is None:
                return
            self.monitor.close()
            if state.is_world_process_zero:
                Path(args.output_dir).mkdir(parents=True, exist_ok=True)
                self.monitor.save(Path(args.output_dir) / BESIDE_FILE)
                self.summary = self.monitor.summary()
                if report:
                    print(self.summary)

    return _Callback()
