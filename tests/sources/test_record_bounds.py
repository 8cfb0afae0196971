"""Training records bounded (what is read, what is kept), and the validation accuracy they report: read from
every framework's record, and set beside the FP32 reference's by verify (issue #22, item D)."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import mpexport
from mpexport.check.report import trained_accuracy
from mpexport.sources.bounds import MAX_KEPT_BYTES
from mpexport.sources.loading import load_model
from tests.helpers import DIGITS_VAL
from tests.toy_models import build_bert, build_cnn

CNN_FACTORY = "tests.toy_models:build_cnn"


def save_cnn(path: Path, model: torch.nn.Module, extra: dict) -> Path:
    example = torch.zeros(4, 1, 8, 8)
    return mpexport.save(model, path, (example,), dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}},
                         autocast="cpu-bf16", extra=extra)


def test_bulky_fields_are_dropped_from_the_kept_record_with_a_note(tmp_path: Path) -> None:
    path = save_cnn(tmp_path / "bulky.pt2", build_cnn().eval(), {"history": "x" * (200 << 10), "epochs": 3})
    loaded = load_model(path)
    assert "history" not in loaded.training and loaded.training["epochs"] == 3
    assert loaded.training["autocast"]["dtype"] == "bfloat16"  # what the planner reads is kept
    assert "evidence" in loaded.training
    assert any("dropped history (200 KiB)" in note and "artifact of its own" in note for note in loaded.notes)
    kept = loaded.source_record(tmp_path).training
    assert len(json.dumps(kept)) <= MAX_KEPT_BYTES and "history" not in kept


def test_a_record_over_a_mebibyte_is_not_read(tmp_path: Path) -> None:
    path = save_cnn(tmp_path / "huge.pt2", build_cnn().eval(), {"history": "x" * (2 << 20)})
    loaded = load_model(path)
    assert loaded.training == {}
    assert any("mpexport.json in huge.pt2 not read: it takes 2.0 MiB, over the 1.0 MiB" in note
               for note in loaded.notes)


def test_mpexport_save_records_the_validation_accuracy(tmp_path: Path) -> None:
    path = save_cnn(tmp_path / "m.pt2", build_cnn().eval(),
                    {"validation": {"accuracy": 93.5, "loss": 0.2, "data": "val.npz", "data_sha256": "AB" * 32}})
    assert load_model(path).training["validation"] == {
        "accuracy": 0.935, "loss": 0.2, "data": "val.npz", "data_sha256": "ab" * 32,
        "evidence": "mpexport.json in m.pt2: validation: accuracy, loss, data, data_sha256 (a percentage)"}


def test_the_bundled_models_records_give_their_fp32_accuracy() -> None:
    validation = load_model(Path("models/digits_resnet.pt2").resolve()).training["validation"]
    assert validation["accuracy"] == pytest.approx(0.9944)
    assert "val_accuracy_fp32" in validation["evidence"]


def test_trainer_state_gives_the_last_evaluation(tmp_path: Path) -> None:
    directory = tmp_path / "trainer_out"
    build_bert().save_pretrained(directory)
    log = [{"step": 100, "eval_accuracy": 0.5}, {"step": 150, "loss": 0.4},
           {"step": 200, "eval_accuracy": 0.91, "eval_loss": 0.3}]
    (directory / "trainer_state.json").write_text(json.dumps({"log_history": log}))
    assert load_model(directory).training["validation"] == {
        "accuracy": 0.91, "loss": 0.3, "evidence": "trainer_state.json: log_history step 200: eval_accuracy, eval_loss"}


def test_lightning_and_timm_checkpoints_give_their_scores(tmp_path: Path) -> None:
    state = build_cnn().state_dict()
    torch.save({"state_dict": state, "pytorch-lightning_version": "2.4.0",
                "callbacks": {"ModelCheckpoint{'monitor': 'val_acc'}": {"monitor": "val_acc",
                                                                        "current_score": torch.tensor(0.93)}}},
               tmp_path / "lightning.ckpt")
    lightning = load_model(tmp_path / "lightning.ckpt", factory=CNN_FACTORY).training["validation"]
    assert lightning["accuracy"] == pytest.approx(0.93) and "ModelCheckpoint" in lightning["evidence"]
    torch.save({"arch": "small_cnn", "state_dict": state, "metric": 87.5,
                "args": argparse.Namespace(amp=True, eval_metric="top1")}, tmp_path / "timm.pth.tar")
    timm = load_model(tmp_path / "timm.pth.tar", factory=CNN_FACTORY).training["validation"]
    assert timm["accuracy"] == pytest.approx(0.875) and "metric (top1)" in timm["evidence"]


def test_trained_accuracy_notes_only_a_gap_on_the_same_data() -> None:
    recorded = {"accuracy": 0.95, "data_sha256": "a" * 64, "evidence": "mpexport.json"}
    close, note = trained_accuracy(recorded, "torch-fp32", 0.94, "a" * 64)
    assert note is None and close["same_data"] is True and close["likely_not_trained_model"] is False
    _, note = trained_accuracy(recorded, "torch-fp32", 0.5, "b" * 64)  # other data: not comparable
    assert note is None
    _, note = trained_accuracy({"accuracy": 0.95}, "torch-fp32", 0.5, None)  # the record names no data
    assert note is None
    far, note = trained_accuracy(recorded, "torch-fp32", 0.5, "a" * 64)
    assert far["likely_not_trained_model"] and note is not None and "45.0 points below" in note


@pytest.fixture(scope="module")
def damaged_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    """A small CNN trained on the digits, its accuracy recorded by ``mpexport.save`` with the SHA-256 of the data,
    then its weights scrambled and saved again with the same record (a loadable model that is not the one
    trained). Returns the damaged ``.pt2``, the validation data and the recorded accuracy."""
    root = tmp_path_factory.mktemp("damaged")
    with np.load(DIGITS_VAL) as data:
        pixels, labels = data["pixels"], data["labels"]
    val = root / "val.npz"
    np.savez(val, pixels=pixels, labels=labels)
    model = build_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    inputs, targets = torch.from_numpy(pixels), torch.from_numpy(labels).long()
    for _ in range(80):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(inputs).argmax(1) == targets).float().mean())
    record = {"validation": {"accuracy": accuracy, "data": "val.npz",
                             "data_sha256": hashlib.sha256(val.read_bytes()).hexdigest()}}
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.flatten()[torch.randperm(parameter.numel(), generator=generator)]
                            .view_as(parameter))
    return save_cnn(root / "damaged.pt2", model, record), val, accuracy


def test_verify_notes_a_model_that_is_not_the_one_trained(cli, tmp_path: Path,
                                                           damaged_model: tuple[Path, Path, float]) -> None:
    damaged, val, accuracy = damaged_model
    assert accuracy > 0.9
    out = tmp_path / "out"
    assert cli("convert", damaged, "--val-data", val, "--out", out, "--engine", "off").exit_code == 0
    result = cli("verify", out, "--json")
    report = json.loads(result.stdout)
    trained = report["trained_accuracy"]
    assert trained["recorded_accuracy"] == pytest.approx(accuracy) and trained["same_data"] is True
    assert trained["reference"] == "torch-fp32" and trained["reference_accuracy"] < accuracy - 0.02
    assert trained["likely_not_trained_model"] is True
    assert any("likely not the model trained" in note for note in report["notes"])
    assert not any("trained" in failure for failure in report["failures"])  # a note, never a parity failure
    assert result.exit_code == (0 if report["verdict"] == "pass" else 1)
    table = cli("verify", out)
    assert "trained accuracy:" in table.stdout and "the same data" in table.stdout
    assert "likely not the model trained" in table.stdout
    page = (out / "report.html").read_text()
    assert "<p class='fail'>trained accuracy:" in page and "reference <b>torch-fp32</b>" in page
