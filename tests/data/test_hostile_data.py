"""Hostile validation files and careless commands (issue #22): zip bombs and lying ``.npy`` headers, FIFOs and
devices, damaged headers, bad labels, file names that are not UTF-8, user functions that recurse or run out of
memory. Each is one line (an :class:`MpexportError`, exit 2 from the CLI), read from real files; nothing large is
ever allocated."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mpexport.base.errors import MpexportError
from mpexport.data.labels import check_label_classes
from mpexport.data.limits import MAX_ARRAY_BYTES_ENV, memory_limit, shown
from mpexport.data.npz import npz_headers
from mpexport.data.open import load_validation_data
from tests.helpers import DIGITS_VAL, MODELS, REPO, assert_bad_input

PIXELS = np.zeros((4, 1, 8, 8), np.float32)


def npy(header: str, payload: bytes = b"") -> bytes:
    """A ``.npy`` file (format 1.0) with the header dict ``header`` as written, then ``payload``."""
    text = header.encode("latin1")
    pad = -(10 + len(text) + 1) % 64
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text) + pad + 1) + text + b" " * pad + b"\n" + payload


def saved(array: np.ndarray) -> bytes:
    """``array`` as ``numpy.save`` writes it."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def zip_of(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    """An ``.npz`` written member by member (no zip64 fields: sizes are 32-bit and can be patched)."""
    with zipfile.ZipFile(path, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def declare_size(path: Path, size: int) -> None:
    """Make the (only) member claim ``size`` uncompressed bytes, in its local and its central header."""
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 22, size)
    struct.pack_into("<I", data, data.index(b"PK\x01\x02") + 24, size)
    path.write_bytes(bytes(data))


def refused(path: Path | str, *fragments: str, **kwargs: object) -> str:
    """Loading ``path`` raises one line holding every fragment; returns it."""
    with pytest.raises(MpexportError) as caught:
        data = load_validation_data(path, **kwargs)  # type: ignore[arg-type]
        list(data.batches(64))
    line = caught.value.one_line()
    assert "\n" not in line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


# 1. Bound what is read before it is read


def test_bomb_whose_header_claims_a_terabyte_is_damaged_not_allocated(tmp_path: Path) -> None:
    """10^12 float32 declared, 64 bytes of zeros stored: the header lies about the member."""
    bomb = zip_of(tmp_path / "bomb.npz", {"pixels.npy": npy(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }", bytes(64))})
    refused(bomb, "array 'pixels' in", "bomb.npz", "is damaged", "(1000000000000,)", "3.6 TiB", "64 B of data")


def test_bomb_with_consistent_sizes_over_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Header and zip agree on 2 GiB (the payload is not there: nothing may read it)."""
    header = npy("{'descr': '<f8', 'fortran_order': False, 'shape': (268435456,), }")
    bomb = zip_of(tmp_path / "bomb.npz", {"pixels.npy": header + bytes(64)})
    declare_size(bomb, len(header) + 2**31)
    monkeypatch.setenv(MAX_ARRAY_BYTES_ENV, "1G")
    refused(bomb, "array 'pixels'", "would take 2.0 GiB", "over the limit of 1.0 GiB", MAX_ARRAY_BYTES_ENV)


def test_compressible_array_under_a_lowered_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "zeros.npz"
    np.savez_compressed(path, pixels=np.zeros((2048, 1, 8, 8), np.float32), labels=np.zeros(2048, np.int64))
    assert path.stat().st_size < 20_000
    monkeypatch.setenv(MAX_ARRAY_BYTES_ENV, "256K")
    refused(path, "array 'pixels'", "512.0 KiB", "over the limit of 256.0 KiB", "shards")
    monkeypatch.setenv(MAX_ARRAY_BYTES_ENV, "530000")  # each array fits, the two together do not
    refused(path, "'", "zeros.npz' would take", "2 arrays together")
    monkeypatch.setenv(MAX_ARRAY_BYTES_ENV, "1M")
    assert load_validation_data(path).num_samples == 2048


def test_every_shard_is_bounded_before_the_first_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    np.savez(shards / "a.npz", pixels=PIXELS)
    np.savez_compressed(shards / "b.npz", pixels=np.zeros((4096, 1, 8, 8), np.float32))
    monkeypatch.setenv(MAX_ARRAY_BYTES_ENV, "64K")
    refused(shards, "array 'pixels'", "b.npz", "over the limit")


@pytest.mark.parametrize("value", ["lots", "0", "-5", "1.5G"])
def test_limit_that_is_not_a_size(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MAX_ARRAY_BYTES_ENV, value)
    refused(DIGITS_VAL, MAX_ARRAY_BYTES_ENV, "is not a size in bytes")


def test_default_limit_is_at_most_four_gib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MAX_ARRAY_BYTES_ENV, raising=False)
    limit = memory_limit()
    assert 0 < limit.bytes <= 4 * 1024**3 and MAX_ARRAY_BYTES_ENV in limit.text()


# 2. FIFOs, devices and directories are refused before they are opened


def _load_in_child(path: Path | str) -> subprocess.CompletedProcess[str]:
    """Open ``path`` as validation data in a child process that is killed after a minute (a hang fails the test)."""
    code = textwrap.dedent("""
        import sys
        from mpexport.base.errors import MpexportError
        from mpexport.data.open import load_validation_data
        try:
            load_validation_data(sys.argv[1])
        except MpexportError as exc:
            print(exc.one_line())
            sys.exit(2)
    """)
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("kind", ["fifo", "device", "fifo-shard", "fifo-parquet", "directory-shard"])
def test_what_is_not_a_file_is_refused_without_a_hang(tmp_path: Path, kind: str) -> None:
    if kind == "fifo":
        target, fragment = _fifo(tmp_path / "val.npz"), "is a FIFO"
    elif kind == "device":
        target, fragment = Path("/dev/zero"), "is a device"
    else:
        target = tmp_path / "shards"
        target.mkdir()
        np.savez(target / "a.npz", pixels=PIXELS)
        if kind == "fifo-shard":
            fragment = "b.npz' is a FIFO"
            _fifo(target / "b.npz")
        elif kind == "fifo-parquet":
            fragment = "b.parquet' is a FIFO"
            _fifo(target / "b.parquet")
        else:
            fragment = "b.npz' is a directory"
            (target / "b.npz").mkdir()
    process = _load_in_child(target)
    assert process.returncode == 2, process.stderr
    assert len(process.stdout.splitlines()) == 1 and fragment in process.stdout, process.stdout


def test_fifo_through_the_cli(cli, tmp_path: Path) -> None:
    fifo = _fifo(tmp_path / "val.npz")
    assert_bad_input(cli("convert", MODELS / "digits_resnet.pt2", "--val-data", fifo, "--out", tmp_path / "out"),
                     "is a FIFO")


# 4. Damaged headers: one line naming the array and the file, with the true reason


@pytest.mark.parametrize(("member", "fragment"), [
    (npy("{'descr': '<f4', 'fortran_order': False, 'shape': (-3, 8), }", bytes(96)),
     "declares a negative dimension (shape (-3, 8))"),
    (npy("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 8), "), "has a damaged header"),
    (npy("{'descr': '<f4', 'shape': (3, 8), }", bytes(96)), "has a damaged header"),
    (npy("{'descr': 'not a dtype', 'fortran_order': False, 'shape': (3,), }"), "has a damaged header"),
    (npy("{'descr': '<f4', 'fortran_order': False, 'shape': (" + "(" * 300 + "3" + ")" * 300 + ",), }"),
     "has a damaged header"),
    (b"\x93NUMPY\x09\x00" + bytes(64), "has a damaged header"),
    (b"not numpy at all", "has a damaged header"),
    (npy("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 8), }", bytes(10)), "is damaged"),
    (npy("{'descr': '|O', 'fortran_order': False, 'shape': (2,), }", bytes(16)), "holds Python objects"),
    (npy("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }", bytes(8)), "not a number type"),
])
def test_damaged_header(tmp_path: Path, member: bytes, fragment: str) -> None:
    path = zip_of(tmp_path / "val.npz", {"pixels.npy": member})
    line = refused(path, fragment)
    assert "array 'pixels' in" in line and "val.npz" in line


def test_negative_dimension_through_the_cli(cli, tmp_path: Path) -> None:
    path = zip_of(tmp_path / "val.npz", {"pixels.npy": npy(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (-3, 8), }", bytes(96))})
    assert_bad_input(cli("convert", MODELS / "digits_resnet.pt2", "--val-data", path, "--out", tmp_path / "out"),
                     "negative dimension", "'pixels'")


def test_members_that_are_not_arrays(tmp_path: Path) -> None:
    refused(zip_of(tmp_path / "a.npz", {"pixels.npy": saved(PIXELS), "notes.txt": b"x" * 10}),
            "notes.txt', which is not a .npy array")
    refused(zip_of(tmp_path / "b.npz", {}), "holds no arrays")


def test_corrupt_member_is_found_when_read(tmp_path: Path) -> None:
    """Stored (not deflated): flipping a data byte keeps the header sound; the CRC catches it."""
    path = zip_of(tmp_path / "val.npz", {"pixels.npy": saved(PIXELS + 1)}, method=zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    data[data.index(b"PK\x01\x02") - 8] ^= 0xFF
    path.write_bytes(bytes(data))
    refused(path, "not a readable .npz file", "CRC")


def test_later_shard_with_other_samples(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    np.savez(shards / "a.npz", pixels=PIXELS)
    np.savez(shards / "b.npz", pixels=np.zeros((4, 3, 8, 8), np.float32))
    refused(shards, "array 'pixels' in shard 'b.npz' has samples of shape (3, 8, 8), the first shard (1, 8, 8)")


def test_headers_alone_give_the_sizes(tmp_path: Path) -> None:
    headers = npz_headers(DIGITS_VAL)
    assert {name: (header.shape, header.dtype.name) for name, header in headers.items()} == {
        "pixels": ((360, 1, 8, 8), "float32"), "labels": ((360,), "int64")}
    assert headers["pixels"].nbytes == 360 * 64 * 4


# 3. Labels


def _with_labels(tmp_path: Path, labels: np.ndarray) -> Path:
    path = tmp_path / "val.npz"
    np.savez(path, pixels=np.zeros((len(labels), 1, 8, 8), np.float32), labels=labels)
    return path


@pytest.mark.parametrize(("labels", "fragment"), [
    (np.array([0.0, 1.5, 2.0, 3.0]), "1 fractional value (e.g. 1.5)"),
    (np.array([0, -1, 2, 3]), "negative values (e.g. -1)"),
    (np.array([0.0, np.nan, 2.0, 3.0], np.float32), "1 NaN/Inf value"),
    (np.array([[0], [1], [-7], [3]]), "negative values (e.g. -7)"),
])
def test_labels_that_are_not_class_indices(tmp_path: Path, labels: np.ndarray, fragment: str) -> None:
    refused(_with_labels(tmp_path, labels), "labels in", "val.npz", fragment, "class indices")


def test_labels_refused_in_a_later_batch(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    np.savez(shards / "a.npz", pixels=PIXELS, labels=np.arange(4))
    np.savez(shards / "b.npz", pixels=PIXELS, labels=np.array([1.0, 2.0, 2.5, 3.0]))
    refused(shards, "labels in", "b.npz", "fractional")


def test_labels_that_are_whole_numbers(tmp_path: Path) -> None:
    floats = load_validation_data(_with_labels(tmp_path, np.array([0.0, 1.0, 2.0, 9.0], np.float32)))
    assert list(next(floats.batches(8))["labels"]) == [0, 1, 2, 9]
    column = load_validation_data(_with_labels(tmp_path, np.array([[3], [1], [4], [1]])))
    assert next(column.batches(8))["labels"].shape == (4,)
    tokens = np.array([[1, 2, -100, -100]] * 4)  # a label per token, -100 for "ignore": left as it is
    assert next(load_validation_data(_with_labels(tmp_path, tokens)).batches(8))["labels"].shape == (4, 4)


def test_labels_beyond_the_classes() -> None:
    check_label_classes(np.array([0, 9, 3]), 10, "val.npz")
    check_label_classes(np.array([[0, 42]]), 10, "val.npz")  # per token: not compared with one row of scores
    with pytest.raises(MpexportError, match=r"labels in 'val.npz' go up to 12, the model scores 10 classes"):
        check_label_classes(np.array([0, 12, 3]), 10, "val.npz")
    with pytest.raises(MpexportError, match=r"labels in the validation data go up to 10"):
        check_label_classes(np.array([[10], [2]]), 10)


# 5. File names that are not UTF-8


def _odd(directory: Path, name: bytes) -> Path:
    return Path(os.fsdecode(os.fsencode(directory) + b"/" + name))


def test_file_name_that_is_not_utf8(tmp_path: Path, digits: dict[str, np.ndarray]) -> None:
    good = _odd(tmp_path, b"val\xff.npz")
    np.savez(good, **digits)
    assert load_validation_data(good).num_samples == 360
    shards = _odd(tmp_path, b"shards\xfe")
    shards.mkdir()
    np.savez(_odd(shards, b"a\xff.npz"), **digits)
    assert sum(len(batch["labels"]) for batch in load_validation_data(shards).batches(100)) == 360
    bad = _odd(tmp_path, b"bad\xff.npz")
    bad.write_bytes(b"not a zip")
    line = refused(bad, "bad\\xff.npz' is not a readable .npz file")
    line.encode("utf-8")  # printable on any stream
    assert shown(bad).endswith("bad\\xff.npz")


def test_file_name_that_is_not_utf8_through_the_cli(cli, tmp_path: Path, digits: dict[str, np.ndarray]) -> None:
    path = _odd(tmp_path, b"val\xff.npz")
    np.savez(path, **digits)
    result = cli("convert", MODELS / "digits_resnet.pt2", "--val-data", path, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.stderr


# 6. Deep or huge inputs from user code and metadata


DATA_MODULE = '''
import sys
import numpy as np

def deep():
    value = 0.0
    for _ in range(100_000):
        value = [value]
    yield {"pixels": value}

def recurse():
    return recurse()

def huge():
    raise MemoryError()

def leave():
    sys.exit(3)
'''


@pytest.mark.parametrize(("function", "fragment"), [
    ("deep", "failed: setting an array element with a sequence"),
    ("recurse", "recursed too deeply"),
    ("huge", "ran out of memory"),
    ("leave", "called sys.exit(3)"),
])
def test_user_function_that_breaks(tmp_path: Path, function: str, fragment: str) -> None:
    (tmp_path / "hostile_batches.py").write_text(DATA_MODULE)
    refused(f"hostile_batches:{function}", fragment, import_path=tmp_path)


def test_user_module_that_exits_on_import(tmp_path: Path) -> None:
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(0)\n")
    refused("exits_on_import:batches", "module 'exits_on_import' called sys.exit(0) on import", import_path=tmp_path)


def test_datasets_metadata_nested_too_deep(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("[" * 200_000 + "]" * 200_000)
    refused(tmp_path / "ds", "state.json' is not readable datasets metadata")


def test_parquet_whose_rows_decode_to_more_than_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One row of 2^20 run-length-encoded zeros: under a kilobyte on disk, 4 MiB decoded; refused from metadata."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "bomb.parquet"
    pq.write_table(pa.table({"pixels": pa.array([np.zeros(2**20, np.float32)], type=pa.list_(pa.float32())),
                             "labels": pa.array([1])}), path)
    assert path.stat().st_size < 4096
    monkeypatch.setenv(MAX_ARRAY_BYTES_ENV, "1M")
    refused(path, "bomb.parquet' would take 4.0 MiB in memory per 1024 rows", "over the limit of 1.0 MiB")
    monkeypatch.setenv(MAX_ARRAY_BYTES_ENV, "8M")
    assert load_validation_data(path).num_samples == 1


def test_table_that_runs_out_of_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from mpexport.data import tables

    path = tmp_path / "val.parquet"
    pq.write_table(pa.table({"pixels": pa.array([[0.0, 1.0]] * 4), "labels": pa.array([1, 2, 3, 4])}), path)

    def no_memory(*_: object, **__: object) -> np.ndarray:
        raise MemoryError

    monkeypatch.setattr(tables, "column_to_numpy", no_memory)
    refused(path, "val.parquet': 1024 rows do not fit in the memory left")
