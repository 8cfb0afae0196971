"""Loading by content: torch.export archives, TorchScript, checkpoints + factory, pickles (trusted only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mpexport.base.errors import MpexportError
from mpexport.sources.loading import load_model
from mpexport.sources.model import FORMAT_CHECKPOINT, FORMAT_EXPORT, FORMAT_PICKLE, FORMAT_TORCHSCRIPT
from tests.helpers import MODELS, REPO
from tests.toy_models import build_cnn


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def test_bundled_pt2_records_inputs_and_training_policy() -> None:
    loaded = load_model(MODELS / "digits_resnet.pt2")
    assert loaded.format == FORMAT_EXPORT
    assert [spec.to_json() for spec in loaded.input_specs] == [
        {"name": "pixels", "dtype": "float32", "shape": ["batch", 1, 8, 8]}
    ]
    assert loaded.training["autocast"] == {"device_type": "cpu", "dtype": "bfloat16"}


def test_format_is_read_from_content_not_extension(tmp_path: Path) -> None:
    model = build_cnn().eval()
    misleading = tmp_path / "model.onnx"
    torch.jit.save(torch.jit.trace(model, torch.randn(2, 1, 8, 8)), misleading)
    loaded = load_model(misleading)
    assert loaded.format == FORMAT_TORCHSCRIPT
    assert loaded.input_names == ["pixels"]


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "data_parallel"])
def test_checkpoint_with_factory(tmp_path: Path, wrap: str) -> None:
    state = build_cnn().state_dict()
    if wrap == "data_parallel":
        state = {f"module.{key}": value for key, value in state.items()}
    payload = state if wrap in ("plain", "data_parallel") else {wrap: state, "epoch": 3, "scaler": {"scale": 1.0}}
    path = tmp_path / "ckpt.pt"
    torch.save(payload, path)
    loaded = load_model(path, factory="tests.toy_models:build_cnn")
    assert loaded.format == FORMAT_CHECKPOINT
    assert loaded.factory == "tests.toy_models:build_cnn"
    for key, value in build_cnn().state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value)
    if wrap in ("state_dict", "model"):
        assert loaded.training["grad_scaler"] is True  # a GradScaler state: FP16 autocast, CUDA assumed (noted)
        assert loaded.training["autocast"] == {"device_type": "cuda", "dtype": "float16", "enabled": True}
        assert "scaler" in loaded.training["evidence"] and loaded.training["assumptions"]


def test_checkpoint_without_factory_asks_for_one(cnn_checkpoint: Path) -> None:
    with pytest.raises(MpexportError, match="--factory"):
        load_model(cnn_checkpoint)


def test_checkpoint_that_does_not_fit_the_factory(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"other.weight": torch.zeros(3)}, path)
    with pytest.raises(MpexportError, match=r"missing .*unexpected"):
        load_model(path, factory="tests.toy_models:build_cnn")


def test_pickled_module_needs_trust(tmp_path: Path) -> None:
    path = tmp_path / "full.pt"
    torch.save(build_cnn(), path)
    with pytest.raises(MpexportError, match="arbitrary code") as info:
        load_model(path)
    assert "SmallCNN" in str(info.value)
    loaded = load_model(path, trust_pickle=True)
    assert loaded.format == FORMAT_PICKLE
    assert not loaded.module.training


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("no_such_package.models:build", "does not import"),
        ("tests.toy_models:no_such_function", "no attribute"),
        ("tests.toy_models", "not of the form"),
        ("tests.toy_models:build_broken", "failed: cannot build"),
        ("tests.toy_models:build_not_a_module", "not a torch.nn.Module"),
    ],
)
def test_bad_factories(cnn_checkpoint: Path, factory: str, message: str) -> None:
    with pytest.raises(MpexportError, match=message):
        load_model(cnn_checkpoint, factory=factory)


def test_unreadable_files(tmp_path: Path) -> None:
    cases = {
        "empty.pt": b"",
        "notes.pt2": b"this is a text file, not a model\n",
        "garbage.pt": bytes(range(256)) * 4,
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(MpexportError) as info:
            load_model(tmp_path / name)
        assert "\n" not in str(info.value)
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes((MODELS / "digits_resnet.pt2").read_bytes()[:5000])
    with pytest.raises(MpexportError, match="corrupt or truncated"):
        load_model(truncated)
