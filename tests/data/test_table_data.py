"""Validation data as teams keep it: Parquet (a file or a directory of them), Arrow IPC (file and stream formats), a
``datasets`` directory, with columns mapped by ``--columns``; the same report as the same data in ``.npz``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mpexport
from mpexport.data import tables as tabledata
from mpexport.data.open import load_validation_data
from tests.helpers import DIGITS_VAL, MODELS, assert_bad_input


def pixel_table(digits: dict[str, np.ndarray], image: str = "pixels", label: str = "labels") -> pa.Table:
    """The digits as a table: a nested-list column of 1x8x8 images and an integer label column."""
    pixels = digits["pixels"]
    return pa.table({image: pa.array(pixels.tolist(), type=pa.list_(pa.list_(pa.list_(pa.float32())))),
                     label: pa.array(digits["labels"])})


def write_forms(root: Path, digits: dict[str, np.ndarray]) -> dict[str, Path]:
    """The same validation set as Parquet (nested lists, and a fixed-shape tensor column), a directory of Parquet
    files, Arrow IPC file and stream, and datasets directories (nested lists, and an Array3D feature)."""
    import datasets

    table = pixel_table(digits)
    forms = {"parquet": root / "val.parquet", "arrow-file": root / "val.arrow", "arrow-stream": root / "val.stream",
             "parquet-dir": root / "parts", "datasets": root / "ds", "datasets-array3d": root / "ds3",
             "parquet-tensor": root / "tensor.parquet"}
    pq.write_table(table, forms["parquet"], row_group_size=100)
    pq.write_table(pa.table({"pixels": pa.FixedShapeTensorArray.from_numpy_ndarray(digits["pixels"]),
                             "labels": pa.array(digits["labels"])}), forms["parquet-tensor"])
    with pa.ipc.new_file(forms["arrow-file"], table.schema) as writer:
        writer.write_table(table, max_chunksize=70)
    with pa.ipc.new_stream(forms["arrow-stream"], table.schema) as writer:
        writer.write_table(table, max_chunksize=130)
    forms["parquet-dir"].mkdir()
    pq.write_table(table.slice(0, 200), forms["parquet-dir"] / "part-0.parquet")
    pq.write_table(table.slice(200), forms["parquet-dir"] / "part-1.parquet")
    datasets.Dataset.from_dict({"pixels": digits["pixels"], "labels": digits["labels"]}).save_to_disk(forms["datasets"])
    features = datasets.Features({"pixels": datasets.Array3D(shape=(1, 8, 8), dtype="float32"),
                                  "labels": datasets.Value("int64")})
    datasets.Dataset.from_dict({"pixels": digits["pixels"], "labels": digits["labels"]},
                               features=features).save_to_disk(forms["datasets-array3d"])
    return forms


def comparable(report: mpexport.ParityReport) -> dict:
    """What two runs on the same samples must agree on: verdict, samples, every metric, thresholds."""
    data = report.to_json()
    return {key: data[key] for key in ("verdict", "samples", "metrics", "thresholds", "failures")}


def test_every_table_form_gives_the_npz_report(tmp_path: Path, digits: dict[str, np.ndarray], bundle: Path) -> None:
    forms = write_forms(tmp_path, digits)
    expected = comparable(mpexport.verify(bundle, val_data=DIGITS_VAL, write=False))
    assert expected["samples"] == len(digits["labels"])
    for name, path in forms.items():
        data = load_validation_data(path)
        assert data.num_samples == len(digits["labels"]), name
        assert comparable(mpexport.verify(bundle, val_data=path, write=False)) == expected, name


def test_rows_stream_in_pieces(tmp_path: Path, digits: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "val.parquet"
    pq.write_table(pixel_table(digits), path, row_group_size=360)
    monkeypatch.setattr(tabledata, "ROWS_PER_PIECE", 50)
    data = load_validation_data(path)
    pieces = [arrays["pixels"] for arrays in data._pieces()]
    assert max(len(piece) for piece in pieces) == 50 and sum(len(piece) for piece in pieces) == 360
    batches = list(data.batches(64))
    assert np.array_equal(np.concatenate([batch["pixels"] for batch in batches]), digits["pixels"])
    exact = [len(batch["pixels"]) for batch in data.batches(100, exact=True)]  # batches span the pieces
    assert exact == [100, 100, 100]


def test_columns_map_other_names_through_convert_and_verify(cli, tmp_path: Path,
                                                              digits: dict[str, np.ndarray]) -> None:
    table = pixel_table(digits, image="image", label="label").append_column(
        "caption", pa.array([f"digit {label}" for label in digits["labels"]]))
    path = tmp_path / "val.parquet"
    pq.write_table(table, path)
    out = tmp_path / "out"
    result = cli("convert", MODELS / "digits_resnet.pt2", "--val-data", path, "--columns", "pixels=image,labels=label",
                 "--out", out)
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["validation"]["columns"] == {"pixels": "image", "labels": "label"}
    verified = cli("verify", out, "--json")  # reads the recorded data with the recorded mapping
    assert verified.exit_code == 0, verified.stderr
    report = json.loads(verified.stdout)
    assert report["samples"] == 360
    assert report["metrics"]["onnx-fp32"]["output"]["top1_agreement"] == 1.0
    assert_bad_input(cli("verify", out, "--val-data", path), "missing pixels")  # without the mapping
    mapped = cli("verify", out, "--val-data", path, "--columns", "pixels=image", "--columns", "labels=label")
    assert mapped.exit_code == 0, mapped.stderr
    for command in ("verify", "repair"):  # a mapping without the data it maps would be silently ignored
        assert_bad_input(cli(command, out, "--columns", "pixels=image"), "--columns maps the columns of --val-data")
    assert_bad_input(cli("convert", MODELS / "digits_resnet.pt2", "--columns", "pixels=image", "--out",
                         tmp_path / "none"), "--columns maps the columns of --val-data")
    assert not (tmp_path / "none").exists()


def test_a_text_table_keeps_only_what_the_model_reads(tmp_path: Path) -> None:
    from tests.toy_models import build_bert

    build_bert().save_pretrained(tmp_path / "bert")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 200, (20, 12))
    table = pa.table({"idx": pa.array(range(20)), "text": pa.array([f"sample {i}" for i in range(20)]),
                      "input_ids": pa.array(ids.tolist()), "attention_mask": pa.array(np.ones_like(ids).tolist()),
                      "label": pa.array(rng.integers(0, 3, 20))})
    pq.write_table(table, tmp_path / "val.parquet")
    result = mpexport.convert(tmp_path / "bert", out=tmp_path / "out", val_data=tmp_path / "val.parquet",
                              columns={"labels": "label"})
    assert [spec.name for spec in result.manifest.inputs] == ["input_ids", "attention_mask"]
    assert result.export_check_passed
    assert mpexport.verify(tmp_path / "out").samples == 20


def bad_tables(root: Path, digits: dict[str, np.ndarray]) -> dict[str, tuple[Path, list[str], str]]:
    """name -> (validation data, extra CLI arguments, fragment of the one-line error)."""
    ragged = root / "ragged.parquet"
    pq.write_table(pa.table({"pixels": pa.array([[[[1.0] * 8] * 8], [[[1.0] * 7] * 8]])}), ragged)
    nan = root / "nan.parquet"
    pixels = digits["pixels"][:4].copy()
    pixels[2, 0, 3, 3] = np.nan
    pq.write_table(pixel_table({"pixels": pixels, "labels": digits["labels"][:4]}), nan)
    empty = root / "empty.parquet"
    pq.write_table(pixel_table(digits).slice(0, 0), empty)
    text = root / "text.parquet"
    pq.write_table(pa.table({"image": pa.array(["a", "b"])}), text)
    nulls = root / "nulls.parquet"
    pq.write_table(pa.table({"pixels": pa.array([[[[1.0] * 8] * 8], None])}), nulls)
    good = root / "good.parquet"
    pq.write_table(pixel_table(digits), good)
    mixed_shapes = root / "mixed_shapes"
    mixed_shapes.mkdir()
    pq.write_table(pixel_table(digits), mixed_shapes / "a.parquet")
    pq.write_table(pa.table({"pixels": pa.array([[[[1.0] * 4] * 4]] * 3), "labels": pa.array([1, 2, 3])}),
                   mixed_shapes / "b.parquet")
    splits = root / "splits"
    import datasets

    split = datasets.Dataset.from_dict({"pixels": digits["pixels"][:4]})
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(splits)
    return {
        "ragged": (ragged, [], "lists of different lengths"), "nan": (nan, [], "NaN/Inf"),
        "empty": (empty, [], "no samples"), "text": (text, ["--columns", "pixels=image"], "not numbers"),
        "nulls": (nulls, [], "missing values"),
        "unknown column": (good, ["--columns", "pixels=image"], "no column image"),
        "bad mapping": (good, ["--columns", "pixels"], "INPUT=COLUMN"), "dataset dict": (splits, [], "choose a split"),
        "shapes differ between files": (mixed_shapes, ["--calibration-samples", "512", "--check-samples", "512"],
                                        "samples of shape"),
        "npz with columns": (DIGITS_VAL, ["--columns", "pixels=x"], "--columns maps the columns of Parquet/Arrow"),
    }


def test_bad_tables_are_one_line(cli, tmp_path: Path, digits: dict[str, np.ndarray]) -> None:
    for name, (path, extra, fragment) in bad_tables(tmp_path, digits).items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        result = cli("convert", MODELS / "digits_resnet.pt2", "--val-data", path, *extra, "--out", out)
        assert_bad_input(result, fragment)
        assert not out.exists(), name
    shutil.rmtree(tmp_path / "splits")
