"""Opening validation data: a path or ``module:function`` to the source that reads it."""

from __future__ import annotations

from pathlib import Path

from mpexport.base.callables import is_callable_spec
from mpexport.base.errors import MpexportError
from mpexport.base.files import regular_file
from mpexport.data.base import STAGE, ValidationData, open_npz
from mpexport.data.callable import CallableValidationData
from mpexport.data.limits import shown
from mpexport.data.tables import is_table_source, open_table_data


def load_validation_data(path: str | Path, *, import_path: str | Path | None = None,
                         columns: dict[str, str] | None = None) -> ValidationData:
    """Open an ``.npz`` file, a directory of ``.npz`` shards, Parquet/Arrow files or a ``datasets`` directory
    (``columns`` maps input names to other column names: :mod:`mpexport.data.tables`), or ``module:function`` (see
    :class:`CallableValidationData`; imported from ``import_path``, default the working directory), checking
    that it is readable, non-empty and consistent. A path that is neither a directory nor a regular file (a FIFO,
    a device) is refused before anything opens it: one line, no hang."""
    text = str(path)
    if not Path(text).exists() and is_callable_spec(text):
        if columns:
            raise MpexportError("--columns maps the columns of Parquet/Arrow data", stage=STAGE,
                                hint="name the batches' entries after the inputs")
        return CallableValidationData.open(text, import_path)
    path = Path(path)
    if not path.exists():
        raise MpexportError(f"validation data '{shown(path)}' does not exist", stage=STAGE)
    if not path.is_dir():
        regular_file(path, "validation data", stage=STAGE)  # a FIFO or a device is refused before it is opened
    if is_table_source(path):
        return open_table_data(path, columns)
    if columns:
        raise MpexportError("--columns maps the columns of Parquet/Arrow data", stage=STAGE,
                            hint="name the .npz arrays after the inputs")
    return open_npz(path)


def parse_columns_option(text: str | tuple[str, ...] | list[str] | None) -> dict[str, str]:
    """``"pixels=image,labels=label"`` (or several such texts) -> ``{"pixels": "image", "labels": "label"}``: model
    input (or ``labels``) = column. One-line error for anything else."""
    texts = [text] if isinstance(text, str) else list(text or [])
    mapping: dict[str, str] = {}
    for item in (part.strip() for chunk in texts for part in chunk.split(",")):
        name, equals, column = item.partition("=")
        if not equals or not name.strip() or not column.strip():
            raise MpexportError(f"--columns takes INPUT=COLUMN pairs, not '{item}'", stage=STAGE,
                                hint="e.g. --columns pixels=image,labels=label")
        if name.strip() in mapping:
            raise MpexportError(f"--columns maps '{name.strip()}' twice", stage=STAGE)
        mapping[name.strip()] = column.strip()
    return mapping
