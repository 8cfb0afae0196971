"""convert end to end on real models: the bundled examples and transformers models, every model format."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import mpexport
from mpexport.bundle.store import Bundle
from mpexport.capture.provenance import read_provenance
from mpexport.precision.plan import read_plan
from tests.helpers import DIGITS_VAL, EXAMPLES, MODELS, assert_bad_input
from tests.toy_models import build_cnn, build_vit


def ort_outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.abs(reference - candidate).max() / np.abs(reference).max())


@pytest.mark.parametrize("example", EXAMPLES)
def test_bundled_example_converts_and_matches_pytorch(cli, tmp_path: Path, example: str) -> None:
    out = tmp_path / example
    result = cli("convert", MODELS / f"{example}.pt2", "--val-data", MODELS / f"{example}.val.npz", "--out", out)
    assert result.exit_code == 0, result.stderr
    manifest = Bundle.open(out).manifest
    assert manifest.artifacts["fp32_onnx"].file == "model.fp32.onnx"
    assert [spec.to_json() for spec in manifest.inputs] == [{"name": "pixels", "dtype": "float32",
                                                             "shape": ["batch", 1, 8, 8]}]
    assert manifest.source.training["autocast"]["device_type"] in ("cpu", "cuda")
    assert manifest.export_check.passed and manifest.export_check.comparison["samples"] == 256  # --check-samples
    assert manifest.provenance["coverage"] == 1.0
    assert [(stage.stage, stage.status) for stage in manifest.stages["convert"]] == [
        (name, "ran") for name in ("load", "inputs", "export", "write", "data pass", "plan", "rewrite", "lint")
    ] + [("engine", "skipped")]  # no TensorRT here
    assert manifest.skip_reason("engine") and manifest.skip_reason("lint") is None

    # Independent of mpexport's own check: ONNX Runtime against the archive's own PyTorch module.
    with np.load(MODELS / f"{example}.val.npz") as data:
        pixels = data["pixels"]
    reference = torch.export.load(MODELS / f"{example}.pt2").module()(torch.from_numpy(pixels)).detach().numpy()
    (candidate,) = ort_outputs(out / "model.fp32.onnx", {"pixels": pixels})
    assert relative_error(reference, candidate) <= 1e-4
    onnx.checker.check_model(str(out / "model.fp32.onnx"), full_check=True)


def test_provenance_names_module_and_aten_op_per_node(cli, tmp_path: Path) -> None:
    out = tmp_path / "t"
    assert cli("convert", MODELS / "digits_transformer.pt2", "--val-data",
               MODELS / "digits_transformer.val.npz", "--out", out).exit_code == 0
    records = json.loads((out / "provenance.json").read_text())
    by_op = {}
    for record in records:
        by_op.setdefault(record["op_type"], []).append(record)
    assert {r["module"] for r in by_op["Softmax"]} == {"blocks.0.attn", "blocks.1.attn"}
    assert {r["aten"] for r in by_op["Softmax"]} == {"aten.softmax.int"}
    assert {r["module"] for r in by_op["LayerNormalization"]} == {"blocks.0.norm2", "blocks.1.norm2", "norm"}
    assert {r["module"] for r in by_op["Pow"]} == {"blocks.0.norm1", "blocks.1.norm1"}  # the RMSNorm
    assert {r["aten"] for r in by_op["Conv"]} == {"aten.conv2d.default"}


def test_conv_and_batch_norm_keep_their_own_provenance(cli, tmp_path: Path) -> None:
    """The exporter's optimizer would fuse BatchNorm into Conv under the batch norm's name."""
    out = tmp_path / "r"
    assert cli("convert", MODELS / "digits_resnet.pt2", "--val-data", MODELS / "digits_resnet.val.npz",
               "--out", out).exit_code == 0
    records = json.loads((out / "provenance.json").read_text())
    assert all(r["aten"] == "aten.conv2d.default" for r in records if r["op_type"] == "Conv")
    assert any(r["op_type"] == "BatchNormalization" for r in records)


ARTIFACT_FILES = ("model.fp32.onnx", "provenance.json", "plan.json", "model.mixed.onnx")


def test_output_is_deterministic(tmp_path: Path, bundle: Path) -> None:
    """The same inputs give byte-identical artifacts: the ResNet against the session's conversion of it, the
    transformer (attention, layer norms) converted twice."""
    again = mpexport.convert(MODELS / "digits_resnet.pt2", out=tmp_path / "resnet", val_data=DIGITS_VAL).out
    pairs = [(bundle, again)]
    pairs.append(tuple(mpexport.convert(MODELS / "digits_transformer.pt2", out=tmp_path / name,
                                        val_data=MODELS / "digits_transformer.val.npz").out for name in ("a", "b")))
    for first, second in pairs:
        for name in ARTIFACT_FILES:
            assert (first / name).read_bytes() == (second / name).read_bytes(), (first.name, name)


class _Wide(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(37, 1291), torch.nn.Linear(1291, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def test_pytorch_weights_do_not_outlive_the_export_stage(tmp_path: Path) -> None:
    """From the plan stage on nothing holds the PyTorch weights, so plan, rewrite and lint of a large model do
    not hold its FP32 weights twice (onnxscript's rewrite rules kept the last exported graph alive)."""
    import gc

    from torch._subclasses.fake_tensor import FakeTensor

    torch.export.save(torch.export.export(_Wide().eval(), (torch.randn(2, 37),)), tmp_path / "m.pt2")
    np.savez(tmp_path / "val.npz", x=np.random.default_rng(0).normal(size=(16, 37)).astype(np.float32))
    alive: dict[str, int] = {}

    def count_weights(stage: str) -> None:
        gc.collect()
        alive[stage] = sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor)
                           and not isinstance(obj, FakeTensor) and tuple(obj.shape) == (1291, 37))

    result = mpexport.convert(tmp_path / "m.pt2", out=tmp_path / "out", val_data=tmp_path / "val.npz",
                              on_stage=count_weights)
    assert result.export_check_passed
    assert alive["data pass"] >= 1  # the weight exists while PyTorch is the reference
    assert alive["plan"] == alive["rewrite"] == 0


def test_transformers_bert_pt2(bert_files: dict[str, Path], tmp_path: Path) -> None:
    result = mpexport.convert(bert_files["pt2"], out=tmp_path / "bert", val_data=bert_files["val"])
    manifest = result.manifest
    assert result.export_check_passed, manifest.export_check
    assert [spec.shape for spec in manifest.inputs] == [("batch", "dim1"), ("batch", "dim1")]
    assert manifest.outputs[0].name == "logits"
    assert manifest.provenance["coverage"] >= 0.95, manifest.provenance
    for group in manifest.provenance["unattributed"]:
        assert group["why"]  # every unattributed node is named with a reason
    records = json.loads((result.out / "provenance.json").read_text())
    attention = [r for r in records if r["op_type"] == "Softmax"]
    assert attention and all(r["module"].endswith("attention.self") for r in attention)


def test_transformers_bert_checkpoint_with_factory(bert_files: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.helpers import REPO

    monkeypatch.chdir(REPO)
    path_before = list(sys.path)
    result = mpexport.convert(bert_files["ckpt"], out=tmp_path / "bert", val_data=bert_files["val"],
                              factory="tests.toy_models:build_bert")
    assert sys.path == path_before  # importing the factory left no trace
    manifest = result.manifest
    assert manifest.source.format == "checkpoint"
    assert manifest.source.import_path == str(REPO)  # recorded, so verify imports the factory from anywhere
    assert manifest.export.strategy == "dynamo"
    assert result.export_check_passed, manifest.export_check
    assert manifest.inputs[0].shape[0] == "batch"
    assert manifest.provenance["coverage"] >= 0.95, manifest.provenance


def test_transformers_vit_pickled_module_needs_trust(cli, tmp_path: Path) -> None:
    path = tmp_path / "vit.pt"
    torch.save(build_vit(), path)
    pixels = np.random.default_rng(0).standard_normal((6, 3, 16, 16)).astype(np.float32)
    val = tmp_path / "val.npz"
    np.savez(val, pixel_values=pixels)
    refused = cli("convert", path, "--val-data", val, "--out", tmp_path / "refused")
    assert refused.exit_code == 2 and "--trust-pickle" in refused.stderr
    assert not (tmp_path / "refused").exists()
    result = cli("convert", path, "--val-data", val, "--out", tmp_path / "vit", "--trust-pickle", "--json")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads(result.stdout)["manifest"]
    assert manifest["source"]["format"] == "pickle"
    assert manifest["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 16, 16]}]
    assert manifest["provenance"]["coverage"] >= 0.95, manifest["provenance"]
    assert manifest["export_check"]["passed"]


def test_torchscript_input(cli, tmp_path: Path, pixels_npz: Path) -> None:
    path = tmp_path / "cnn.ts"
    torch.jit.save(torch.jit.trace(build_cnn().eval(), torch.randn(2, 1, 8, 8)), path)
    result = cli("convert", path, "--val-data", pixels_npz, "--out", tmp_path / "ts", "--json")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads(result.stdout)["manifest"]
    assert manifest["source"]["format"] == "torchscript"
    assert manifest["export_check"]["passed"]
    assert manifest["inputs"][0]["shape"][1:] == [1, 8, 8]
    provenance = manifest["provenance"]
    assert provenance["with_aten"] >= 0.95 * provenance["nodes"], provenance


def test_input_option_without_validation_data(cli, tmp_path: Path, cnn_checkpoint: Path) -> None:
    result = cli("convert", cnn_checkpoint, "--factory", "tests.toy_models:build_cnn", "--input",
                 "pixels:batch,1,8,8:float32", "--out", tmp_path / "m", "--json")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads(result.stdout)["manifest"]
    assert manifest["inputs"] == [{"name": "pixels", "dtype": "float32", "shape": ["batch", 1, 8, 8]}]
    assert manifest["export_check"]["data"].startswith("example inputs")


def test_static_batch(cli, tmp_path: Path, pixels_npz: Path, cnn_checkpoint: Path) -> None:
    result = cli("convert", cnn_checkpoint, "--factory", "tests.toy_models:build_cnn", "--val-data", pixels_npz,
                 "--static-batch", "--out", tmp_path / "m", "--json")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads(result.stdout)["manifest"]
    assert manifest["inputs"][0]["shape"] == [2, 1, 8, 8]
    assert manifest["export_check"]["passed"] and manifest["export_check"]["comparison"]["samples"] == 24


def test_fallback_strategy_is_reported(cli, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    from tests.toy_models import build_data_dependent

    torch.save(build_data_dependent().state_dict(), path)
    result = cli("convert", path, "--factory", "tests.toy_models:build_data_dependent", "--input", "x:batch,4",
                 "--out", tmp_path / "m", "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    attempts = payload["manifest"]["export"]["attempts"]
    assert [a["strategy"] for a in attempts] == ["dynamo", "legacy-torchscript"]
    assert attempts[0]["ok"] is False and "data-dependent" in attempts[0]["error"]
    assert payload["manifest"]["export"]["strategy"] == "legacy-torchscript"
    assert any("legacy-torchscript strategy instead" in note for note in payload["notes"])
    # No aten ops from this exporter: the plan infers them from op types, and says so.
    nodes = json.loads((tmp_path / "m" / "plan.json").read_text())["nodes"]
    gemm = next(node for node in nodes if node["op_type"] == "Gemm")
    assert gemm["precision"] == "fp16" and "inferred from Gemm" in gemm["reason"]


def test_force_replaces_only_mpexport_directories(cli, tmp_path: Path, pixels_npz: Path) -> None:
    out = tmp_path / "m"
    args = ("convert", MODELS / "digits_resnet.pt2", "--val-data", pixels_npz, "--out", out)
    assert cli(*args).exit_code == 0
    assert_bad_input(cli(*args), "already exists")
    result = cli(*args, "--force")
    assert result.exit_code == 0, result.stderr
    assert (out / "manifest.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # a bundle the user added a file to is no longer provably mpexport's: kept, with the file
    (out / "old.txt").write_text("old")
    assert_bad_input(cli(*args, "--force"), "not an output directory mpexport wrote", "old.txt")
    assert (out / "old.txt").read_text() == "old" and (out / "manifest.json").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert_bad_input(cli("convert", MODELS / "digits_resnet.pt2", "--out", mine, "--force", "--input",
                         "pixels:batch,1,8,8"), "not an output directory mpexport wrote")
    assert (mine / "notes.txt").read_text() == "keep me"


def test_export_check_catches_a_trace_that_took_one_branch(cli, tmp_path: Path) -> None:
    """The TorchScript exporter follows the example's path through data-dependent control flow; validation
    batches that take the other path make the export check fail (exit 1), with the directory kept."""
    from tests.toy_models import build_data_dependent

    model = build_data_dependent()
    path = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), path)
    weight_sum = model.fc.weight.sum(dim=0).detach().numpy()
    direction = np.sign(weight_sum).astype(np.float32)
    x = np.concatenate([np.tile(direction * 5, (64, 1)), np.tile(-direction * 5, (64, 1))]).astype(np.float32)
    val = tmp_path / "val.npz"
    np.savez(val, x=x)
    out = tmp_path / "m"
    result = cli("convert", path, "--factory", "tests.toy_models:build_data_dependent", "--val-data", val,
                 "--out", out)
    assert result.exit_code == 1, result.stdout + result.stderr
    assert "export check FAILED" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["export"]["strategy"] == "legacy-torchscript" and not manifest["export_check"]["passed"]


def test_one_data_pass_gives_the_export_check_and_the_range_statistics(tmp_path: Path) -> None:
    """The fused pass: the export check on the first --check-samples, the range rule's statistics on the first
    --calibration-samples, in one ONNX Runtime pass; the plan equals one calibrated in a separate pass."""
    import onnx_ir as ir

    from mpexport.bundle.names import FP32_ONNX
    from mpexport.precision.planner import make_plan
    from mpexport.precision.ranges import collect_ranges

    model, val = MODELS / "digits_transformer.pt2", MODELS / "digits_transformer.val.npz"
    progress: list[tuple[int, int | None]] = []
    result = mpexport.convert(model, out=tmp_path / "m", val_data=val, check_samples=128, calibration_samples=192,
                              on_progress=lambda done, total: progress.append((done, total)))
    assert result.manifest.export_check.comparison["samples"] == 128 and result.export_check_passed
    assert progress == [(64, 192), (128, 192), (192, 192)]
    bundle = Bundle.open(result.out)
    plan = read_plan(bundle)
    assert plan.calibration_samples == 192
    with np.load(val) as data:
        batches = [{"pixels": data["pixels"][start:start + 64]} for start in range(0, 192, 64)]
    fp32 = bundle.path(FP32_ONNX)
    separate = make_plan(ir.load(str(fp32)), read_provenance(bundle), plan.options, collect_ranges(fp32, batches))
    assert separate.to_json() == plan.to_json()
