"""Option groups that several commands share, declared once: the validation data and the gate (verify, repair)."""

from __future__ import annotations

import functools
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
    click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True),
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
