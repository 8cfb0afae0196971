"""Option groups that several commands share, declared once: the validation data and the gate (verify, repair);
and ``--ray`` with its companions, checked together."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

Command = TypeVar("Command", bound=Callable[..., Any])

DATA_OPTIONS = (
    click.option("--val-data", type=click.Path(path_type=str),
                 help="Validation data (default: the data convert checked the export on)."),
    click.option("--columns", "columns", multiple=True, metavar="INPUT=COLUMN,...",
                 help="For Parquet/Arrow data: the column of each input (and labels), e.g. "
                 "pixels=image,labels=label."),
)
GATE_OPTIONS = (
    click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True,
                 help="Samples per batch; a model with a fixed batch size runs in batches of that size (noted)."),
    click.option("--max-samples", type=click.IntRange(1), help="Stop after this many samples."),
    click.option("--budget-factor", type=click.FloatRange(min=1.0), default=2.0, show_default=True,
                 help="Budget = this x the torch-amp (training) error, with absolute floors."),
    click.option("--atol", type=float, help="Explicit max abs error (overrides the budget)."),
    click.option("--min-cosine", type=float, help="Explicit minimum cosine similarity (overrides the budget)."),
    click.option("--max-top1-drop", type=float,
                 help="Explicit largest top-1 disagreement share (overrides the budget)."),
)


def gate_options(command: Command) -> Command:
    """Add the data and gate options to ``command``, which receives ``val_data`` and ``options`` (one
    :class:`mpexport.check.report.VerifyOptions` built from the gate options and ``--columns``) instead of them."""

    @functools.wraps(command)
    def with_options(*args: Any, columns: tuple[str, ...], batch_size: int, max_samples: int | None,
                     budget_factor: float, atol: float | None, min_cosine: float | None,
                     max_top1_drop: float | None, **kwargs: Any) -> Any:
        from mpexport.check.report import VerifyOptions
        from mpexport.data.open import parse_columns_option

        options = VerifyOptions(budget_factor=budget_factor, atol=atol, min_cosine=min_cosine,
                                max_top1_drop=max_top1_drop, batch_size=batch_size, max_samples=max_samples,
                                columns=parse_columns_option(columns))
        return command(*args, options=options, **kwargs)

    decorated: Any = with_options
    for option in reversed((*DATA_OPTIONS, *GATE_OPTIONS)):
        decorated = option(decorated)
    return decorated


def ray_options(address: str | None, workers: int | None, cpus_per_worker: int, gpus_per_worker: float | None,
                directory: str | None) -> Any:
    """``--ray`` and its companions as a :class:`mpexport.check.ray.RayOptions` (None without ``--ray``)."""
    if address is None:
        if workers is not None or cpus_per_worker != 1 or gpus_per_worker is not None:
            raise click.UsageError("--workers, --cpus-per-worker and --gpus-per-worker go with --ray")
        return None
    if not directory:
        if os.path.isdir(address):
            raise click.UsageError(f"put DIRECTORY before --ray (--ray takes an optional ADDRESS, here '{address}')")
        raise click.UsageError("--ray verifies a DIRECTORY (not --candidate)")
    from mpexport.check.ray import RayOptions

    return RayOptions(address=None if address == "local" else address, workers=workers,
                      cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker)
