"""Rank-0 (scalar) model inputs, such as a temperature: a scalar has no batch axis, so every batch feeds it one
value. The validation data gives it as a 0-d array or an array of shape (1,) (that value for every batch), or one
value per sample (N,) when they are all equal; anything else is one line saying why."""

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
from mpexport.base.specs import TensorSpec, batch_samples, sample_rows
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


@pytest.mark.parametrize(("temperature", "fragments"), [
    (np.linspace(1, 2, SAMPLES).astype(np.float32), ("'temperature' holds different values (1.0 and", "scalar")),
    (np.full((SAMPLES, 1), 2.0, np.float32), ("'temperature' has shape (10, 1)", "scalar (shape ())")),
], ids=["different values", "(N, 1)"])
def test_a_scalar_input_refuses_what_is_not_one_value(cli, tmp_path: Path, temperature: np.ndarray,
                                                      fragments: tuple[str, ...]) -> None:
    out = tmp_path / "out"
    result = cli("convert", tempered(tmp_path / "m.onnx"), "--val-data", data(tmp_path / "v.npz", temperature),
                 "--out", out)
    assert_bad_input(result, *fragments, "no batch axis")
    assert_nothing_written(out)


def test_one_value_for_a_per_sample_input_is_refused(tmp_path: Path) -> None:
    """Only a rank-0 input takes one value for every sample; one row beside others of 10 is refused for the rest."""
    np.savez(tmp_path / "v.npz", x=np.zeros((SAMPLES, 8), np.float32), scale=np.ones(1, np.float32))
    specs = [TensorSpec("x", "float32", ("batch", 8)), TensorSpec("scale", "float32", ("batch",))]
    with pytest.raises(MpexportError, match=r"'scale' has shape \(1,\), one value beside 10 samples"):
        check_against(load_validation_data(tmp_path / "v.npz"), specs)
    np.savez(tmp_path / "rows.npz", x=np.zeros((1, 8), np.float32), scale=np.ones(SAMPLES, np.float32))
    with pytest.raises(MpexportError, match="disagree on the number of samples"):
        load_validation_data(tmp_path / "rows.npz")


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
