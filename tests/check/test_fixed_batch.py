"""Models with a fixed batch size (13 of the 34 peer models of issue #24): convert and verify feed them batches of
their own size, a set whose size is not a multiple of it loses no sample (the short last batch is padded with repeats
and only its real samples are counted and measured), and ONNX Runtime's run errors keep the line that says what
was wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import mpexport
from mpexport.backends.onnxruntime import OrtRunError, OrtRunner, one_line
from mpexport.base.specs import (
    UNKNOWN_DTYPE,
    PaddedBatch,
    TensorSpec,
    batch_samples,
    fixed_batch,
    pad_batch,
    real_rows,
)
from mpexport.check.forms import model_batch_size
from mpexport.check.report import VerifyOptions
from mpexport.commands.fp32 import typed_by_runtime
from mpexport.data.base import check_against
from mpexport.data.open import load_validation_data
from tests.toy_models import build_rare_overflow, rare_overflow_data


def linear_softmax(path: Path, batch: int | str, *, seed: int = 0) -> Path:
    """A MatMul + Softmax classifier of 8 features into 4 classes whose batch axis is ``batch`` (an int: fixed)."""
    weight = np.random.default_rng(seed).standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Softmax", ["h"], ["y"], name="sm", axis=-1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])], [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def samples(path: Path, count: int) -> Path:
    """``count`` samples of 8 features (and labels) as an ``.npz``."""
    rng = np.random.default_rng(count)
    np.savez(path, x=rng.standard_normal((count, 8)).astype(np.float32), labels=rng.integers(0, 4, count))
    return path


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize(("batch", "count"), [(1, 5), (4, 10), (4, 3)])
def test_a_fixed_batch_model_converts_and_verifies_every_sample_with_default_options(cli, tmp_path: Path,
                                                                                    batch: int, count: int) -> None:
    out = tmp_path / "out"
    assert cli("convert", linear_softmax(tmp_path / "m.onnx", batch), "--val-data", samples(tmp_path / "v.npz", count),
               "--out", out).exit_code == 0
    ranges = json.loads((out / "ranges.json").read_text())
    assert ranges["samples"] == count  # calibration saw every sample, each once (the padding is not counted)
    result = cli("verify", out)
    assert result.exit_code == 0, result.stdout + result.stderr
    report = report_of(out)
    assert report["verdict"] == "pass"
    assert report["samples"] == count and report["batches"] == -(-count // batch)
    assert report["options"]["batch_size"] == batch
    assert all(metrics["samples"] == count for outputs in report["metrics"].values() for metrics in outputs.values())
    assert any(f"fixes its batch size at {batch}" in note for note in report["notes"])


def test_padding_changes_no_metric(cli, tmp_path: Path) -> None:
    """The same weights with a fixed batch of 4 and with a dynamic batch, verified in batches of 4 on 10 samples (the
    last batch 2 real samples, padded or not): every metric of every backend, and the accuracy, are the same."""
    data = samples(tmp_path / "v.npz", 10)
    reports = []
    for name, batch in (("fixed", 4), ("dynamic", "batch")):
        out = tmp_path / name
        assert cli("convert", linear_softmax(tmp_path / f"{name}.onnx", batch), "--val-data", data,
                   "--out", out).exit_code == 0
        assert cli("verify", out, "--batch-size", "4").exit_code == 0
        reports.append(report_of(out))
    fixed, dynamic = reports
    assert fixed["samples"] == dynamic["samples"] == 10 and fixed["batches"] == dynamic["batches"] == 3
    assert fixed["metrics"].keys() == dynamic["metrics"].keys()
    for backend, outputs in fixed["metrics"].items():
        for output, metrics in outputs.items():
            for key, value in metrics.items():
                assert value == pytest.approx(dynamic["metrics"][backend][output][key], rel=1e-4, abs=1e-9), \
                    (backend, output, key)
    reference = fixed["reference"]
    assert fixed["backends"][reference]["accuracy"] == dynamic["backends"][reference]["accuracy"]


def test_an_explicit_batch_size_is_overridden_by_a_fixed_batch_with_a_note(cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli("convert", linear_softmax(tmp_path / "m.onnx", 4), "--val-data", samples(tmp_path / "v.npz", 10),
               "--out", out).exit_code == 0
    result = cli("verify", out, "--batch-size", "8", "--max-samples", "7")
    assert result.exit_code == 0, result.stdout + result.stderr
    report = report_of(out)
    assert report["options"]["batch_size"] == 4 and report["samples"] == 7 and report["batches"] == 2
    assert any("not --batch-size 8" in note for note in report["notes"])


class TwoLayers(torch.nn.Module):
    """8 features -> 16 -> 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


def test_a_static_batch_export_checks_and_calibrates_every_sample(tmp_path: Path) -> None:
    """The PyTorch path: an archive exported with batch 2 fixed, 5 samples: the export check compares all 5 (the
    last batch padded), calibration records 5, verify covers 5."""
    torch.manual_seed(0)
    archive = mpexport.save(TwoLayers().eval(), tmp_path / "m.pt2", (torch.randn(2, 8),), autocast="cpu-bf16")
    out = tmp_path / "out"
    mpexport.convert(archive, out=out, val_data=samples(tmp_path / "v.npz", 5))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"][0] == 2
    assert manifest["export_check"]["passed"] and manifest["export_check"]["comparison"]["samples"] == 5
    assert json.loads((out / "ranges.json").read_text())["samples"] == 5
    report = mpexport.verify(out)
    assert report.passed and report.samples == 5 and report.batches == 3


def test_padded_batches_say_how_many_samples_are_real(tmp_path: Path) -> None:
    data = load_validation_data(samples(tmp_path / "v.npz", 10))
    specs = [TensorSpec("x", "float32", (4, 8))]
    batches = list(data.batches(4, inputs=specs))
    assert [batch_samples(batch) for batch in batches] == [4, 4, 2]
    last = batches[-1]
    assert isinstance(last, PaddedBatch) and last["x"].shape == (4, 8) and len(last["labels"]) == 4
    assert np.array_equal(last["x"][2:], last["x"][:2])  # the padding repeats the real samples
    assert [batch_samples(batch) for batch in data.batches(4, limit=6, inputs=specs)] == [4, 2]
    assert [len(batch["x"]) for batch in data.batches(4, inputs=[TensorSpec("x", "float32", ("batch", 8))])] == \
        [4, 4, 2]  # a dynamic batch is never padded
    outputs = real_rows([np.zeros((4, 3)), np.zeros(()), np.zeros((5,))], last)
    assert [output.shape for output in outputs] == [(2, 3), (), (5,)]
    assert pad_batch({"x": np.zeros((4, 8))}, 4).__class__ is dict  # a full batch stays as it is


def test_which_models_fix_their_batch(tmp_path: Path) -> None:
    assert fixed_batch([TensorSpec("x", "float32", (1, 8)), TensorSpec("t", "float32", ())]) == 1
    assert fixed_batch([TensorSpec("x", "float32", ("batch", 8)), TensorSpec("table", "float32", (16,))]) is None
    assert fixed_batch([TensorSpec("t", "float32", ())]) is None
    assert fixed_batch([TensorSpec("scales", "float32", (4,)), TensorSpec("x", "float32", (2, 8))],
                       unbatched=("scales",)) == 2
    specs = [TensorSpec("x", "float32", (1, 8))]
    np.savez(tmp_path / "v.npz", x=np.zeros((3, 8), np.float32))
    data = load_validation_data(tmp_path / "v.npz")
    check_against(data, specs)
    options, note = model_batch_size(VerifyOptions(batch_size=64), specs, data)
    assert options.batch_size == 1 and note is not None
    assert model_batch_size(VerifyOptions(batch_size=1), specs, data) == (VerifyOptions(batch_size=1), None)


def test_onnx_runtime_run_errors_keep_the_shape_mismatch_on_one_line(tmp_path: Path) -> None:
    runner = OrtRunner(linear_softmax(tmp_path / "m.onnx", 1), name="onnx-fp32")
    with pytest.raises(OrtRunError) as caught:
        runner.run({"x": np.zeros((64, 8), np.float32)})
    message = str(caught.value)
    assert "\n" not in message and "index: 0 Got: 64 Expected: 1" in message and message.startswith("onnx-fp32: ")
    assert "Please fix" not in message
    assert one_line("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : what\n where\n") == "INVALID_ARGUMENT : what where"


def untyped_output_model(path: Path) -> Path:
    """A model whose second graph output is declared without a type (ONNX Runtime runs it and types it itself)."""
    weight = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Softmax", ["h"], ["y"], name="sm", axis=-1),
         helper.make_node("Relu", ["h"], ["r"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]), onnx.ValueInfoProto(name="r")],
        [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_an_untyped_output_is_typed_by_onnx_runtime(tmp_path: Path) -> None:
    model = untyped_output_model(tmp_path / "m.onnx")
    specs = [TensorSpec("y", "float32", ("batch", 4)), TensorSpec("r", UNKNOWN_DTYPE, ())]
    typed = typed_by_runtime(specs, model)
    assert typed[0] is specs[0]
    assert typed[1].dtype == "float32" and typed[1].shape[-1] == 4


def test_an_untyped_output_converts_and_is_compared_by_verify(cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli("convert", untyped_output_model(tmp_path / "m.onnx"), "--val-data", samples(tmp_path / "v.npz", 10),
                 "--out", out)
    assert result.exit_code == 0, result.stderr
    assert "declare no type" in result.stdout
    outputs = json.loads((out / "manifest.json").read_text())["outputs"]
    assert [(spec["name"], spec["dtype"]) for spec in outputs] == [("y", "float32"), ("r", "float32")]
    assert cli("verify", out).exit_code == 0
    report = report_of(out)
    assert report["samples"] == 10 and all("r" in outputs for outputs in report["metrics"].values())


def test_the_padded_last_batch_is_verified_and_repaired(cli, tmp_path: Path) -> None:
    """A fixed batch of 4 and 299 samples, only the last 3 (the padded batch) overflowing FP16: verify finds them
    (they are not dropped), and repair, whose trials run the same padded batch, fixes the plan."""
    x = rare_overflow_data(samples=299, rare=3)
    np.savez(tmp_path / "val.npz", x=x)
    torch.onnx.export(build_rare_overflow(), (torch.from_numpy(x[:4]),), str(tmp_path / "trap.onnx"), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["output"])
    out = tmp_path / "out"
    assert cli("convert", tmp_path / "trap.onnx", "--val-data", tmp_path / "val.npz", "--amp-policy", "cuda-bf16",
               "--target", "fp16", "--out", out).exit_code == 0
    assert cli("verify", out).exit_code == 1
    report = report_of(out)
    assert report["samples"] == 299 and report["batches"] == 75
    assert report["localised_on"]["sample"] >= 296
    repaired = cli("repair", out, "--json")
    assert repaired.exit_code == 0, repaired.stdout + repaired.stderr
    assert json.loads(repaired.stdout)["status"] == "repaired"
    report = report_of(out)
    assert report["verdict"] == "pass" and report["samples"] == 299


def test_a_table_pads_its_last_batch_for_a_fixed_batch_model(cli, tmp_path: Path) -> None:
    """The same 10 samples as a Parquet table (batches span its pieces): the same padded batches, the same report."""
    pa = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    arrays = np.load(samples(tmp_path / "v.npz", 10))
    parquet.write_table(pa.table({"x": list(arrays["x"]), "labels": arrays["labels"]}), tmp_path / "v.parquet")
    specs = [TensorSpec("x", "float32", (4, 8))]
    table = load_validation_data(tmp_path / "v.parquet")
    assert [batch_samples(batch) for batch in table.batches(4, inputs=specs)] == [4, 4, 2]
    assert all(len(batch["x"]) == 4 for batch in table.batches(4, inputs=specs))
    out = tmp_path / "out"
    assert cli("convert", linear_softmax(tmp_path / "m.onnx", 4), "--val-data", tmp_path / "v.parquet",
               "--out", out).exit_code == 0
    assert cli("verify", out).exit_code == 0
    assert report_of(out)["samples"] == 10
