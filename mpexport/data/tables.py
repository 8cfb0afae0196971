"""Validation data as tables: Parquet files (or a directory of them), Arrow IPC files (file or stream format), and a
Hugging Face ``datasets`` directory (``save_to_disk``), read with pyarrow.

Columns are named after the model inputs (plus optional ``labels``), or mapped with ``columns`` (``{"pixels":
"image"}``: the input ``pixels`` is the column ``image``). A column holds numbers, fixed-shape nested lists of
numbers, a fixed-shape tensor (``arrow.fixed_shape_tensor``), or a ``datasets`` ``ArrayND`` feature; each sample
becomes one row of the array. Columns of other types (text, ids as strings) are not inputs and are left out, and
so are numeric columns the model does not take (a tokenized set's ``idx``): tables carry more than the model
reads. Rows are streamed: at most :data:`ROWS_PER_PIECE` rows of the selected columns are in memory at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mpexport.base.errors import MpexportError, first_line
from mpexport.base.files import regular_file
from mpexport.base.specs import Batch, TensorSpec
from mpexport.data.base import LABELS, STAGE, ValidationData, prepare_batch
from mpexport.data.limits import MAX_ARRAY_BYTES_ENV, memory_limit, shown, size_text

ROWS_PER_PIECE = 1024
PARQUET_MAGIC = b"PAR1"
ARROW_FILE_MAGIC = b"ARROW1"
ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"
TABLE_SUFFIXES = (".parquet", ".arrow", ".feather", ".ipc")
MAX_JSON_BYTES = 64 * 1024**2
TABLE_LIMIT_HINT = (f"write fewer values per row (or smaller row groups), or set {MAX_ARRAY_BYTES_ENV} (bytes, e.g. "
                    "16G) if this machine has the memory")
_PHYSICAL_WIDTHS = {"BOOLEAN": 1, "INT32": 4, "FLOAT": 4, "INT64": 8, "DOUBLE": 8, "INT96": 12}


def is_table_source(path: Path) -> bool:
    """True for a Parquet or Arrow file, a directory of them, or a ``datasets`` ``save_to_disk`` directory."""
    if path.is_dir():
        return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file() or \
            any(any(path.glob(f"*{suffix}")) for suffix in TABLE_SUFFIXES)
    if not path.is_file():
        return False  # a FIFO or a device: never opened (reading it could block forever)
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError:
        return False
    return head.startswith((PARQUET_MAGIC, ARROW_FILE_MAGIC, ARROW_STREAM_MAGIC))


class TableValidationData(ValidationData):
    """A validation set in Parquet/Arrow files, streamed in pieces of :data:`ROWS_PER_PIECE` rows."""

    ignores_extra_columns = True

    def __init__(self, path: Path, files: list[tuple[Path, str]], columns: dict[str, str]) -> None:
        self.files = files
        self.columns = dict(columns)
        schema = _schema(files[0])
        self.column_of = self._column_names(path, schema)
        first_piece = next(self._pieces(limit=2), None)
        if first_piece is None:
            raise MpexportError(f"validation data '{path}' holds no samples", stage=STAGE)
        names = [name for name in self.column_of if name != LABELS]
        if not names:
            raise MpexportError(f"validation data '{path}' holds no numeric columns", stage=STAGE,
                                hint="store the model inputs as numbers or fixed-shape lists of numbers")
        lengths = [_row_count(file, kind) for file, kind in files]
        super().__init__(path, [file for file, _ in files], names, LABELS in self.column_of, sum(lengths), first_piece,
                         lengths)

    def describe(self) -> str:
        """Where the data comes from, with the column mapping if any."""
        mapped = ", ".join(f"{name}={column}" for name, column in self.columns.items())
        return f"{self.path}" + (f" (columns {mapped})" if mapped else "")

    def select(self, names: list[str]) -> None:
        """Read only these inputs (plus labels): the other numeric columns are not the model's."""
        self.names = [name for name in self.names if name in names]
        keep = set(self.names) | {LABELS}
        self.column_of = {name: column for name, column in self.column_of.items() if name in keep}
        self.first_arrays = {name: array for name, array in self.first_arrays.items() if name in keep}

    def _column_names(self, path: Path, schema: Any) -> dict[str, str]:
        """Input name -> column name, for the numeric columns (mapped ones first)."""
        present = {field.name: field for field in schema}
        missing = [column for column in self.columns.values() if column not in present]
        if missing:
            raise MpexportError(f"validation data '{path}' has no column {', '.join(missing)} "
                                f"(columns: {', '.join(present)})", stage=STAGE)
        renamed = {column: name for name, column in self.columns.items()}
        column_of: dict[str, str] = {}
        for column, field in present.items():
            name = renamed.get(column, column)
            if column not in renamed and column in self.columns:
                continue  # a column name taken by a mapping to another input
            if _is_numeric(field.type):
                column_of[name] = column
            elif column in renamed:
                raise MpexportError(f"column '{column}' holds {field.type}, not numbers", stage=STAGE)
        return column_of

    def batches(self, batch_size: int, *, limit: int | None = None, inputs: list[TensorSpec] | None = None,
                exact: bool = False, skip: int = 0) -> Iterator[Batch]:
        """As :meth:`ValidationData.batches`, with batches spanning pieces and files: only the set's last batch
        may be short (``exact`` drops it; a model that fixes the batch size gets it padded). Skipped batches are not
        read: whole files and Parquet row groups before them are passed over by their metadata."""
        batch_size = self.run_size(batch_size)
        pad = inputs is not None and self.run_batch(inputs) == batch_size
        pending: list[Batch] = []
        held, produced = 0, skip * batch_size
        for piece in self._pieces(skip=produced):
            pending.append(piece)
            held += _rows(piece)
            while held >= batch_size and (limit is None or produced < limit):
                wanted = batch_size if limit is None else min(batch_size, limit - produced)
                batch, pending, held = _take(pending, wanted, self.path)
                prepared = prepare_batch(batch, inputs, self.path, produced)
                produced += _rows(batch)
                yield self.runnable(prepared, batch_size, pad)
            if limit is not None and produced >= limit:
                return
        if pending and not exact and held:
            batch, _, _ = _take(pending, held if limit is None else min(held, limit - produced), self.path)
            if _rows(batch):
                prepared = prepare_batch(batch, inputs, self.path, produced)
                yield self.runnable(prepared, batch_size, pad)

    def batch_count(self, batch_size: int, limit: int | None = None) -> int | None:
        """How many batches :meth:`batches` yields."""
        batch_size = self.run_size(batch_size)
        return -(-min(self.num_samples, limit or self.num_samples) // batch_size)

    def samples_before(self, batch_size: int, batch: int, limit: int | None = None) -> int:
        """The number of samples in the batches before batch number ``batch``."""
        return min(batch * self.run_size(batch_size), self.num_samples, limit or self.num_samples)

    def _pieces(self, limit: int | None = None, skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """The rows from row ``skip`` on, in pieces of at most :data:`ROWS_PER_PIECE` rows (checked)."""
        produced = 0
        for (file, kind), rows in zip(self.files, getattr(self, "lengths", None) or [None] * len(self.files),
                                      strict=True):
            if rows is not None and skip >= rows:
                skip -= rows
                continue
            start, skip = skip, 0
            try:
                for batch in _record_batches(file, kind, list(self.column_of.values()), start):
                    for start in range(0, batch.num_rows, ROWS_PER_PIECE):
                        piece = batch.slice(start, ROWS_PER_PIECE)
                        yield self._checked({name: column_to_numpy(piece.column(column), column, file)
                                             for name, column in self.column_of.items()}, file)
                        produced += piece.num_rows
                        if limit is not None and produced >= limit:
                            return
            except MpexportError:
                raise
            except MemoryError:
                raise MpexportError(f"'{shown(file)}': {ROWS_PER_PIECE} rows do not fit in the memory left",
                                    stage=STAGE, hint=TABLE_LIMIT_HINT) from None
            except Exception as exc:  # noqa: BLE001 - a later file that does not read as the first one did
                raise MpexportError(f"'{file}' does not read like the first file of '{self.path}': "
                                    f"{first_line(exc)}", stage=STAGE) from None

    def _checked(self, piece: dict[str, np.ndarray], file: Path) -> dict[str, np.ndarray]:
        """A piece whose samples have the first piece's shapes (one line naming the column otherwise)."""
        for name, array in piece.items():
            first = getattr(self, "first_arrays", {}).get(name)
            if first is not None and array.shape[1:] != first.shape[1:]:
                raise MpexportError(f"column '{self.column_of[name]}' in '{file.name}' has samples of shape "
                                    f"{array.shape[1:]}, the first rows {first.shape[1:]}", stage=STAGE)
        return piece


def open_table_data(path: Path, columns: dict[str, str] | None = None) -> TableValidationData:
    """Open a Parquet/Arrow/``datasets`` validation set (see the module docstring). One-line errors for a missing
    pyarrow, an unreadable file, a ``DatasetDict`` without a split chosen, unknown mapped columns, no rows."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise MpexportError(f"'{path}' is a Parquet/Arrow validation set, and pyarrow is not installed",
                            stage=STAGE, hint="pip install 'mpexport[data]'") from None
    try:
        return TableValidationData(path, _table_files(path), columns or {})
    except MpexportError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable table is bad input
        raise MpexportError(f"'{path}' is not a readable Parquet/Arrow validation set: {first_line(exc)}",
                            stage=STAGE) from None


def _table_files(path: Path) -> list[tuple[Path, str]]:
    """(file, kind) in reading order; kind is ``parquet``, ``arrow-file`` or ``arrow-stream``."""
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = _json_object(path / "dataset_dict.json").get("splits", [])
            shown_splits = ", ".join(map(str, splits)) if isinstance(splits, list) else "see dataset_dict.json"
            raise MpexportError(f"'{path}' is a datasets DatasetDict: choose a split", stage=STAGE,
                                hint=f"pass {path}/SPLIT, one of {shown_splits}")
        if (path / "state.json").is_file():
            state = _json_object(path / "state.json")
            names = [str(entry["filename"]) for entry in state.get("_data_files", [])]
            candidates = [path / name for name in names] or sorted(path.glob("*.arrow"))
        else:
            candidates = sorted(file for suffix in TABLE_SUFFIXES for file in path.glob(f"*{suffix}"))
    else:
        candidates = [path]
    files = [(file, _kind(file)) for file in candidates]
    if not files:
        raise MpexportError(f"'{path}' holds no Parquet or Arrow files", stage=STAGE)
    return files


def _json_object(file: Path) -> dict[str, Any]:
    """A ``datasets`` metadata file (at most :data:`MAX_JSON_BYTES`) as a dict; one line when it is too large, not
    JSON, not an object, or nested deeper than Python recurses."""
    regular_file(file, "datasets metadata", stage=STAGE)
    try:
        if file.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"larger than {MAX_JSON_BYTES // 1024**2} MiB")
        data = json.loads(file.read_bytes())
    except OSError as exc:
        raise MpexportError(f"cannot read '{file}': {exc.strerror}", stage=STAGE) from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise MpexportError(f"'{file}' is not readable datasets metadata ({first_line(exc, 160)})",
                            stage=STAGE) from None
    if not isinstance(data, dict):
        raise MpexportError(f"'{file}' is not readable datasets metadata (not a JSON object)", stage=STAGE)
    return data


def _kind(file: Path) -> str:
    regular_file(file, "validation data", stage=STAGE)  # a FIFO in the directory would block the read below
    try:
        with file.open("rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise MpexportError(f"cannot read '{file}': {exc.strerror}", stage=STAGE) from None
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    if head.startswith(ARROW_FILE_MAGIC):
        return "arrow-file"
    if head.startswith(ARROW_STREAM_MAGIC):
        return "arrow-stream"
    raise MpexportError(f"'{file}' is neither Parquet nor Arrow IPC", stage=STAGE)


def _schema(entry: tuple[Path, str]) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    file, kind = entry
    if kind == "parquet":
        return pq.ParquetFile(file).schema_arrow
    with pa.memory_map(str(file)) as source:
        reader = pa.ipc.open_file(source) if kind == "arrow-file" else pa.ipc.open_stream(source)
        return reader.schema


def _record_batches(file: Path, kind: str, columns: list[str], skip: int = 0) -> Iterator[Any]:
    """The file's record batches from row ``skip`` on (Parquet row groups before it are not read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "parquet":
        parquet = pq.ParquetFile(file)
        groups = list(range(parquet.metadata.num_row_groups))
        while groups and skip >= parquet.metadata.row_group(groups[0]).num_rows:
            skip -= parquet.metadata.row_group(groups.pop(0)).num_rows
        for group in groups:
            _check_piece_size(parquet.metadata.row_group(group), columns, file)
        yield from _from_row(parquet.iter_batches(batch_size=ROWS_PER_PIECE, columns=columns, row_groups=groups),
                             skip)
        return
    with pa.memory_map(str(file)) as source:
        if kind == "arrow-file":
            reader = pa.ipc.open_file(source)
            batches: Iterator[Any] = (reader.get_batch(index) for index in range(reader.num_record_batches))
        else:
            batches = iter(pa.ipc.open_stream(source))
        yield from _from_row((batch.select(columns) for batch in batches), skip)


def _check_piece_size(group: Any, columns: list[str], file: Path) -> None:
    """Refuse a row group whose pieces of :data:`ROWS_PER_PIECE` rows would take more than the memory limit once
    decoded, from its metadata alone (rows x values per row x value width): a few kilobytes of run-length-encoded
    zeros can decode to gigabytes. Values per row are the row group's average."""
    rows = max(1, int(group.num_rows))
    total = 0
    for index in range(group.num_columns):
        chunk = group.column(index)
        if chunk.path_in_schema.split(".")[0] in columns:
            width = _PHYSICAL_WIDTHS.get(chunk.physical_type, 8)
            total += -(-int(chunk.num_values) * min(rows, ROWS_PER_PIECE) // rows) * width
    limit = memory_limit()
    if total > limit.bytes:
        raise MpexportError(f"'{shown(file)}' would take {size_text(total)} in memory per {ROWS_PER_PIECE} rows "
                            f"once decoded, over the limit of {limit.text()}", stage=STAGE, hint=TABLE_LIMIT_HINT)


def _from_row(batches: Iterator[Any], skip: int) -> Iterator[Any]:
    """Record batches with their first ``skip`` rows left out."""
    for batch in batches:
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        yield batch.slice(skip) if skip else batch
        skip = 0


def _row_count(file: Path, kind: str) -> int:
    """Rows in a file, from metadata (Parquet) or batch headers (Arrow, memory-mapped: no column is read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "parquet":
        return int(pq.ParquetFile(file).metadata.num_rows)
    with pa.memory_map(str(file)) as source:
        if kind == "arrow-file":
            reader = pa.ipc.open_file(source)
            return sum(reader.get_batch(index).num_rows for index in range(reader.num_record_batches))
        return sum(batch.num_rows for batch in pa.ipc.open_stream(source))


def _rows(batch: Batch) -> int:
    return len(next(iter(batch.values())))


def _take(pending: list[Batch], count: int, path: Path) -> tuple[Batch, list[Batch], int]:
    """The first ``count`` rows of the pending pieces as one batch, the rest, and how many rows remain (one line
    naming ``path`` when they do not fit in memory)."""
    try:
        joined = {name: np.concatenate([piece[name] for piece in pending]) if len(pending) > 1 else pending[0][name]
                  for name in pending[0]}
    except MemoryError:
        raise MpexportError(f"a batch of '{shown(path)}' ({count} rows) does not fit in the memory left",
                            stage=STAGE, hint="use a smaller --batch-size") from None
    batch = {name: array[:count] for name, array in joined.items()}
    rest = {name: array[count:] for name, array in joined.items()}
    remaining = _rows(rest)
    return batch, ([rest] if remaining else []), remaining


def _is_numeric(data_type: Any) -> bool:
    import pyarrow as pa

    while True:
        if isinstance(data_type, pa.BaseExtensionType):
            data_type = data_type.storage_type
        elif pa.types.is_list(data_type) or pa.types.is_large_list(data_type) or \
                pa.types.is_fixed_size_list(data_type):
            data_type = data_type.value_type
        else:
            return pa.types.is_integer(data_type) or pa.types.is_floating(data_type) or pa.types.is_boolean(data_type)


def column_to_numpy(column: Any, name: str, file: Path) -> np.ndarray:
    """One column of rows as an array of shape ``(rows, *sample_shape)``: nested lists must have the same length
    at every level (one line naming the column otherwise); nulls are refused."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column.type, pa.FixedShapeTensorType):
        if column.null_count:
            raise MpexportError(f"column '{name}' in '{file.name}' has missing values", stage=STAGE)
        tensor = column.to_numpy_ndarray()
        return tensor if tensor.flags.writeable else tensor.copy()
    if isinstance(column, pa.ExtensionArray):
        column = column.storage
    shape = [len(column)]
    values = column
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or \
            pa.types.is_fixed_size_list(values.type):
        if values.null_count:
            raise MpexportError(f"column '{name}' in '{file.name}' has missing values", stage=STAGE)
        if pa.types.is_fixed_size_list(values.type):
            size = values.type.list_size
        else:
            lengths = pc.unique(pc.list_value_length(values)).to_pylist()
            if len(lengths) > 1:
                shown = ", ".join(map(str, sorted(lengths)[:4]))
                raise MpexportError(f"column '{name}' in '{file.name}' holds lists of different lengths ({shown}): "
                                    "samples must have one shape", stage=STAGE, hint="pad the sequences to one length")
            size = lengths[0] if lengths else 0
        shape.append(size)
        values = values.flatten()
    if values.null_count:
        raise MpexportError(f"column '{name}' in '{file.name}' has missing values", stage=STAGE)
    array = values.to_numpy(zero_copy_only=False).reshape(shape)
    return array if array.flags.writeable else array.copy()  # Arrow's buffers are read-only; torch wants to own
