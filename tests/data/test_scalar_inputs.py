"""Model inputs without a batch axis: rank 0 (a temperature), or given one axis more than the model declares (Resize
scales of shape (4) given as (N, 4)). The validation data gives one value for every sample (a 0-d array, one row,
or N equal rows: it is fed once per batch), or a value per sample (N rows that differ: then no two samples can share a
run, and each runs alone); anything else is one line saying why."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import mpexport
from mpexport.base.errors import MpexportError
from mpexport.base.specs import OneSample, TensorSpec, batch_samples, real_rows, sample_rows
from mpexport.data.base import check_against
from mpexport.data.open import load_validation_data
from tests.helpers import assert_bad_input, assert_nothing_written

SAMPLES = 10


def tempered(path: Path, batch: int | str = "batch") -> Path:
    """softmax(x @ w / temperature): ``x`` of 8 features per sample, ``temperature`` a scalar (shape ())."""
    weight = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Div", ["h", "temperature"], ["scaled"], name="div"),
         helper.make_node("Softmax", ["scaled"], ["y"], name="sm", axis=-1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8]),
         helper.make_tensor_value_info("temperature", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])], [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def data(path: Path, temperature: np.ndarray, count: int = SAMPLES) -> Path:
    np.savez(path, x=np.random.default_rng(1).standard_normal((count, 8)).astype(np.float32),
             temperature=temperature)
    return path


@pytest.mark.parametrize("temperature", [np.float32(2.0), np.array([2.0], np.float32),
                                         np.full(SAMPLES, 2.0, np.float32)], ids=["0-d", "(1,)", "(N,) equal"])
def test_a_scalar_input_takes_one_value_for_every_batch(cli, tmp_path: Path, temperature: np.ndarray) -> None:
    out = tmp_path / "out"
    result = cli("convert", tempered(tmp_path / "m.onnx"), "--val-data", data(tmp_path / "v.npz", temperature),
                 "--out", out)
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "ranges.json").read_text())["samples"] == SAMPLES
    result = cli("verify", out)
    assert result.exit_code == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "pass" and report["samples"] == SAMPLES


def test_a_scalar_input_of_a_fixed_batch_model(cli, tmp_path: Path) -> None:
    """Batch 1 fixed, 5 samples, a temperature per sample (all equal): 5 batches of one sample, one value each."""
    out = tmp_path / "out"
    assert cli("convert", tempered(tmp_path / "m.onnx", 1), "--val-data",
               data(tmp_path / "v.npz", np.full(5, 0.5, np.float32), 5), "--out", out).exit_code == 0
    assert cli("verify", out).exit_code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == 5 and report["batches"] == 5


def test_a_temperature_per_sample_runs_one_sample_per_run(cli, tmp_path: Path) -> None:
    """Different values per sample for an input without a batch axis: no two samples can share a run, so each runs
    alone, and each sample's output is compared with what the model gives that sample alone."""
    out = tmp_path / "out"
    temperature = np.linspace(1, 2, SAMPLES).astype(np.float32)
    result = cli("convert", tempered(tmp_path / "m.onnx"), "--val-data", data(tmp_path / "v.npz", temperature),
                 "--out", out)
    assert result.exit_code == 0, result.stderr
    assert "'temperature' has no batch axis and holds a different value per sample" in result.stdout
    assert json.loads((out / "ranges.json").read_text())["samples"] == SAMPLES
    result = cli("verify", out, "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == SAMPLES and report["batches"] == SAMPLES
    assert any("each run takes one sample (not --batch-size 64)" in note for note in report["notes"])
    assert "reference <b>onnx-fp32</b>" in (out / "report.html").read_text()  # no PyTorch model: the FP32 ONNX


def test_a_scalar_input_refuses_what_is_not_one_value(cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli("convert", tempered(tmp_path / "m.onnx"), "--val-data",
                 data(tmp_path / "v.npz", np.full((SAMPLES, 1), 2.0, np.float32)), "--out", out)
    assert_bad_input(result, "'temperature' has shape (10, 1)", "scalar (shape ())", "no batch axis")
    assert_nothing_written(out)


def test_per_sample_values_need_a_model_that_takes_one_sample(tmp_path: Path) -> None:
    """A value per sample means a run per sample: a model whose other input fixes a batch of 4 cannot take that."""
    specs = [TensorSpec("x", "float32", (4, 8)), TensorSpec("temperature", "float32", ())]
    source = load_validation_data(data(tmp_path / "v.npz", np.linspace(1, 2, SAMPLES).astype(np.float32)))
    with pytest.raises(MpexportError, match="so each run takes one sample, but input 'x' fixes the batch at 4"):
        check_against(source, specs)


def test_one_value_for_a_per_sample_input_is_refused(tmp_path: Path) -> None:
    """Only a rank-0 input takes one value for every sample; one row beside others of 10 is refused for the rest."""
    np.savez(tmp_path / "v.npz", x=np.zeros((SAMPLES, 8), np.float32), scale=np.ones(1, np.float32))
    specs = [TensorSpec("x", "float32", ("batch", 8)), TensorSpec("scale", "float32", ("batch",))]
    with pytest.raises(MpexportError, match=r"'scale' has shape \(1,\), one value beside 10 samples"):
        check_against(load_validation_data(tmp_path / "v.npz"), specs)
    np.savez(tmp_path / "rows.npz", x=np.zeros((1, 8), np.float32), scale=np.ones(SAMPLES, np.float32))
    with pytest.raises(MpexportError, match=r"'x' has shape \(1, 8\), one value beside 10 samples"):
        check_against(load_validation_data(tmp_path / "rows.npz"), specs)


def test_labels_must_have_one_per_sample(cli, tmp_path: Path) -> None:
    np.savez(tmp_path / "v.npz", x=np.zeros((SAMPLES, 8), np.float32), temperature=np.float32(2.0),
             labels=np.array([1]))
    out = tmp_path / "out"
    assert_bad_input(cli("convert", tempered(tmp_path / "m.onnx"), "--val-data", tmp_path / "v.npz", "--out", out),
                     "disagree on the number of samples")


def test_a_later_shard_with_different_values_in_a_batch_is_one_line(cli, tmp_path: Path) -> None:
    """The first shard is checked whole before any run; a later one batch by batch, naming where."""
    shards = tmp_path / "shards"
    shards.mkdir()
    data(shards / "a.npz", np.full(SAMPLES, 2.0, np.float32))
    data(shards / "b.npz", np.linspace(1, 2, SAMPLES).astype(np.float32))
    out = tmp_path / "out"
    assert_bad_input(cli("convert", tempered(tmp_path / "m.onnx"), "--val-data", shards, "--out", out),
                     "'temperature' holds different values", "in one batch: shard 'b.npz', samples from 0")
    assert_nothing_written(out)


def test_batches_feed_a_scalar_one_value_after_the_per_sample_arrays(tmp_path: Path) -> None:
    source = load_validation_data(data(tmp_path / "v.npz", np.array([3.0], np.float32)))
    specs = [TensorSpec("temperature", "float32", ()), TensorSpec("x", "float32", ("batch", 8))]
    check_against(source, specs)
    batches = list(source.batches(4, inputs=specs))
    assert [batch_samples(batch) for batch in batches] == [4, 4, 2]
    assert all(batch["temperature"].shape == () and float(batch["temperature"]) == 3.0 for batch in batches)
    assert list(batches[0]) == ["x", "temperature"]
    assert sample_rows(batches[0], 1, 2)["x"].shape == (1, 8) and sample_rows(batches[0], 1, 2)["temperature"].shape \
        == ()


class Tempered(torch.nn.Module):
    """softmax(linear(x) / temperature), the temperature a 0-d tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(x) / temperature, dim=-1)


def test_a_pytorch_model_with_a_scalar_input(tmp_path: Path) -> None:
    torch.manual_seed(0)
    archive = mpexport.save(Tempered().eval(), tmp_path / "m.pt2", (torch.randn(2, 8), torch.tensor(2.0)),
                            dynamic_shapes=({0: torch.export.Dim("batch")}, None), autocast="cpu-bf16")
    out = tmp_path / "out"
    mpexport.convert(archive, out=out, val_data=data(tmp_path / "v.npz", np.full(SAMPLES, 2.0, np.float32)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["export_check"]["passed"] and manifest["export_check"]["comparison"]["samples"] == SAMPLES
    report = mpexport.verify(out)
    assert report.passed and report.samples == SAMPLES


def scaled(path: Path) -> Path:
    """x * scales: ``x`` (batch, 4) per sample, ``scales`` (4) with no batch axis."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scales"], ["y"], name="mul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("scales", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_rows_for_an_input_without_a_batch_axis(tmp_path: Path) -> None:
    """(N, 4) for a (4) input: equal rows are one value fed to whole batches; differing rows make one-sample runs,
    each fed its own row, whose outputs each gain a sample axis."""
    specs = [TensorSpec("x", "float32", ("batch", 4)), TensorSpec("scales", "float32", (4,))]
    x = np.arange(SAMPLES * 4, dtype=np.float32).reshape(SAMPLES, 4)
    np.savez(tmp_path / "same.npz", x=x, scales=np.ones((SAMPLES, 4), np.float32))
    same = load_validation_data(tmp_path / "same.npz")
    check_against(same, specs)
    assert same.unbatched == ("scales",) and same.one_sample_runs is None and same.whole_batches(specs)
    assert [batch["scales"].shape for batch in same.batches(4, inputs=specs)] == [(4,)] * 3
    np.savez(tmp_path / "rows.npz", x=x, scales=np.arange(SAMPLES * 4, dtype=np.float32).reshape(SAMPLES, 4))
    rows = load_validation_data(tmp_path / "rows.npz")
    check_against(rows, specs)
    batches = list(rows.batches(4, inputs=specs))
    assert len(batches) == SAMPLES == rows.batch_count(4) and rows.samples_before(4, 3) == 3
    assert isinstance(batches[3], OneSample) and batches[3]["x"].shape == (1, 4)
    assert batches[3]["scales"].tolist() == [12.0, 13.0, 14.0, 15.0] and sample_rows(batches[3], 0, 1) is batches[3]
    assert [array.shape for array in real_rows([np.zeros(()), np.zeros((1, 4)), np.zeros(3)], batches[3])] == \
        [(1,), (1, 4), (1, 3)]
    np.savez(tmp_path / "short.npz", x=x, scales=np.ones((3, 4), np.float32))
    with pytest.raises(MpexportError, match=r"disagree on the number of samples \(x: 10, scales: 3\)"):
        load_validation_data(tmp_path / "short.npz")
    np.savez(tmp_path / "wide.npz", x=x, scales=np.ones((SAMPLES, 5), np.float32))
    with pytest.raises(MpexportError, match=r"'scales' has values of shape \(5,\), the model input is of shape "
                                            r"\(4\), with no batch axis"):
        check_against(load_validation_data(tmp_path / "wide.npz"), specs)


def test_per_sample_rows_convert_and_verify(cli, tmp_path: Path) -> None:
    np.savez(tmp_path / "v.npz", x=np.random.default_rng(2).standard_normal((6, 4)).astype(np.float32),
             scales=np.random.default_rng(3).uniform(0.5, 2, (6, 4)).astype(np.float32))
    out = tmp_path / "out"
    assert cli("convert", scaled(tmp_path / "m.onnx"), "--val-data", tmp_path / "v.npz", "--out", out).exit_code == 0
    result = cli("verify", out, "--batch-size", "4")
    assert result.exit_code == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == 6 and report["batches"] == 6


def test_one_row_for_every_sample_and_padding_keep_the_value_whole(tmp_path: Path) -> None:
    """One row (1, 4) stands for every sample; a fixed batch of 8 pads a short last batch of 4 samples without
    padding the value (it holds 4 numbers, as many as the samples: it must not be taken for their rows)."""
    specs = [TensorSpec("x", "float32", (8, 4)), TensorSpec("scales", "float32", (4,))]
    np.savez(tmp_path / "v.npz", x=np.zeros((12, 4), np.float32), scales=np.full((1, 4), 2.0, np.float32))
    data = load_validation_data(tmp_path / "v.npz")
    check_against(data, specs)
    batches = list(data.batches(64, inputs=specs))
    assert data.run_batch(specs) == 8 and [batch_samples(batch) for batch in data.batches(8, inputs=specs)] == [8, 4]
    last = list(data.batches(8, inputs=specs))[-1]
    assert last["x"].shape == (8, 4) and last["scales"].tolist() == [2.0] * 4
    assert batches[0]["scales"].shape == (4,)


def test_data_of_another_rank_for_a_batched_input_is_refused(tmp_path: Path) -> None:
    """Only an input whose axis 0 is fixed can be given an extra axis: a dynamic batch axis is the batch."""
    np.savez(tmp_path / "v.npz", x=np.zeros((5, 2, 8), np.float32))
    with pytest.raises(MpexportError, match=r"'x' has shape \(5, 2, 8\), the model expects \(batch, 8\)"):
        check_against(load_validation_data(tmp_path / "v.npz"), [TensorSpec("x", "float32", ("batch", 8))])


def test_a_model_without_any_batch_axis_runs_one_sample_per_run(tmp_path: Path) -> None:
    """Equal rows for every input and no batched input: each run is one sample, counted once."""
    specs = [TensorSpec("scales", "float32", (4,))]
    np.savez(tmp_path / "v.npz", scales=np.ones((5, 4), np.float32))
    data = load_validation_data(tmp_path / "v.npz")
    check_against(data, specs)
    assert data.one_sample_runs == "no input has a batch axis: each run takes one sample"
    assert [batch_samples(batch) for batch in data.batches(64, inputs=specs)] == [1] * 5
