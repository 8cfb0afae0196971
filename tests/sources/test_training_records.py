"""Models as training frameworks leave them, and the training precision read from the frameworks' own records:
a Hugging Face Trainer output directory, timm's train-script checkpoint, a Lightning checkpoint, a `.pt2` written
by ``mpexport.save``; records read without running code from them."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import mpexport
from mpexport.bundle.store import Bundle
from mpexport.sources.loading import load_model
from mpexport.sources.records import find_training_args, read_trainer_args
from tests.helpers import assert_bad_input, assert_nothing_written
from tests.toy_models import build_bert, build_cnn

CNN_FACTORY = "tests.toy_models:build_cnn"


def trainer_directory(root: Path, **training_args: object) -> Path:
    """What ``Trainer.save_model`` leaves: the model's ``save_pretrained`` files and the pickled
    ``TrainingArguments`` (a real one, saved as the Trainer saves it)."""
    from transformers import TrainingArguments

    directory = root / "trainer_out"
    build_bert().save_pretrained(directory)
    args = TrainingArguments(output_dir=str(directory), report_to=[], **training_args)  # type: ignore[arg-type]
    torch.save(args, directory / "training_args.bin")
    return directory


@pytest.fixture(scope="module")
def text_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Token ids and a padded attention mask for the tiny BERT (vocabulary 200), 24 samples of 12 tokens."""
    path = tmp_path_factory.mktemp("text") / "val.npz"
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 200, (24, 12))
    mask = np.ones_like(ids)
    mask[::3, 8:] = 0
    np.savez(path, input_ids=ids, attention_mask=mask)
    return path


def manifest_plan(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["plan"]


def test_trainer_directory_converts_with_the_policy_its_training_args_record(cli, tmp_path: Path,
                                                                             text_val: Path) -> None:
    directory = trainer_directory(tmp_path, bf16=True, use_cpu=True)
    out = tmp_path / "out"
    result = cli("convert", directory, "--val-data", text_val, "--out", out)
    assert result.exit_code == 0, result.stderr
    plan = manifest_plan(out)
    assert plan["policy"] == "cpu-bf16"
    assert "training_args.bin" in plan["policy_source"] and "bf16=True" in plan["policy_source"]
    bundle = Bundle.open(out)
    assert bundle.manifest.source is not None and bundle.manifest.source.format == "huggingface"
    assert [spec.name for spec in bundle.manifest.outputs] == ["logits"]
    assert bundle.manifest.inputs[0].shape == ("batch", "sequence")  # the sequence stays dynamic
    inspected = cli("inspect", out)
    assert "training_args.bin" in inspected.stdout
    assert cli("verify", out).exit_code == 0  # verify rebuilds the model from the directory


def test_trainer_directory_converts_without_validation_data(tmp_path: Path) -> None:
    directory = trainer_directory(tmp_path, fp16=False, bf16=False, use_cpu=True)
    result = mpexport.convert(directory, out=tmp_path / "out")
    assert result.manifest.plan is not None
    assert result.manifest.plan.policy == "cuda-fp16"  # trained in FP32: the default, said as such
    assert "default" in result.manifest.plan.policy_source
    assert "without autocast" in result.manifest.plan.policy_source


def test_amp_policy_contradicting_the_record_is_allowed_and_noted(cli, tmp_path: Path) -> None:
    directory = trainer_directory(tmp_path, bf16=True, use_cpu=True)
    out = tmp_path / "out"
    result = cli("convert", directory, "--amp-policy", "cuda-fp16", "--out", out)
    assert result.exit_code == 0, result.stderr
    plan = manifest_plan(out)
    assert plan["policy"] == "cuda-fp16"
    assert "contradicts" in plan["policy_source"] and "cpu-bf16" in plan["policy_source"]
    assert "contradicts the training record" in " ".join(result.stdout.split())


def test_vision_directory_converts_from_its_config_alone(tmp_path: Path) -> None:
    from tests.toy_models import build_vit

    build_vit().save_pretrained(tmp_path / "vit")
    result = mpexport.convert(tmp_path / "vit", out=tmp_path / "out")
    spec = result.manifest.inputs[0]
    config = json.loads((tmp_path / "vit" / "config.json").read_text())
    assert spec.name == "pixel_values"
    assert spec.shape == ("batch", config["num_channels"], config["image_size"], config["image_size"])
    assert [output.name for output in result.manifest.outputs] == ["logits"]


def test_task_chooses_the_head(tmp_path: Path) -> None:
    build_bert().save_pretrained(tmp_path / "bert")
    result = mpexport.convert(tmp_path / "bert", out=tmp_path / "out", task="feature-extraction")
    assert [output.name for output in result.manifest.outputs] == ["last_hidden_state", "pooler_output"]
    assert result.manifest.source is not None and result.manifest.source.task == "feature-extraction"
    assert "BertModel" in " ".join(result.notes)


@pytest.mark.parametrize("layout", ["sharded-safetensors", "pytorch_model.bin"])
def test_trainer_directory_weights_in_every_layout_load_exactly(tmp_path: Path, layout: str) -> None:
    model = build_bert()
    directory = tmp_path / layout
    if layout == "sharded-safetensors":
        model.save_pretrained(directory, max_shard_size="100KB")
        assert (directory / "model.safetensors.index.json").exists()
    else:  # what older transformers saved (transformers 5 writes safetensors only)
        model.save_pretrained(directory)
        (directory / "model.safetensors").unlink()
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    loaded = load_model(directory)
    assert loaded.module is not None
    for (name, want), have in zip(model.state_dict().items(), loaded.module.state_dict().values(), strict=True):
        assert torch.equal(want, have), name
    assert loaded.training == {}  # no training_args.bin: no record


def test_training_args_found_in_the_newest_checkpoint_folder(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    for step, bf16 in ((500, False), (1500, True)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        torch.save(TrainingArguments(output_dir=str(tmp_path), bf16=bf16, use_cpu=True, report_to=[]),
                   folder / "training_args.bin")
    found = find_training_args(tmp_path)
    assert found == tmp_path / "checkpoint-1500" / "training_args.bin"
    assert read_trainer_args(found).dtype == "bfloat16"


class RunsCode:
    """What a malicious pickle holds: unpickling calls ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_training_args_are_read_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    loop: list = []
    loop += [loop, loop]  # shared and self-referencing: read once, not expanded forever
    state = {"output_dir": "x", "fp16": True, "bf16": False, "use_cpu": False, "payload": RunsCode(marker),
             "loop": loop}
    path = tmp_path / "training_args.bin"
    with path.open("wb") as handle:
        pickle.dump(state, handle, protocol=2)
    record = read_trainer_args(path)
    assert not marker.exists()
    assert (record.device, record.dtype, record.grad_scaler) == ("cuda", "float16", True)
    torch.save(state, path)  # the same in torch's zip format
    assert read_trainer_args(path).dtype == "float16"
    assert not marker.exists()


def test_hf_directory_bad_inputs_are_one_line(cli, tmp_path: Path) -> None:
    no_weights = tmp_path / "no_weights"
    build_bert().config.save_pretrained(no_weights)
    assert_bad_input(cli("convert", no_weights, "--out", tmp_path / "a"), "no weights")
    assert_nothing_written(tmp_path / "a")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert_bad_input(cli("convert", broken, "--out", tmp_path / "b"), "config.json")
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    assert_bad_input(cli("convert", plain_dir, "--out", tmp_path / "c"), "without a config.json")


def timm_checkpoint(path: Path, args: argparse.Namespace) -> Path:
    """What timm's ``train.py`` saves (``CheckpointSaver``): arch, state dict, optimizer, version, args."""
    model = build_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.save({"epoch": 3, "arch": "small_cnn", "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(), "version": 2, "args": args, "metric": 0.91}, path)
    return path


def test_timm_checkpoint_plans_its_amp_dtype_without_trusting_the_pickle(cli, tmp_path: Path,
                                                                         pixels_npz: Path) -> None:
    checkpoint = timm_checkpoint(tmp_path / "ckpt.pth.tar", argparse.Namespace(
        model="small_cnn", amp=True, amp_dtype="bfloat16", amp_impl="native", device="cuda", lr=0.1))
    out = tmp_path / "out"
    result = cli("convert", checkpoint, "--factory", CNN_FACTORY, "--val-data", pixels_npz, "--out", out)
    assert result.exit_code == 0, result.stderr
    plan = manifest_plan(out)
    assert plan["policy"] == "cuda-bf16"
    assert "args" in plan["policy_source"] and "amp_dtype='bfloat16'" in plan["policy_source"]
    loaded = load_model(checkpoint, factory=CNN_FACTORY)
    assert all(torch.equal(a, b) for a, b in zip(build_cnn().state_dict().values(),
                                                 loaded.callable().state_dict().values(), strict=True))


def test_timm_args_yaml_fills_what_the_checkpoint_lacks(tmp_path: Path) -> None:
    checkpoint = timm_checkpoint(tmp_path / "last.pth.tar", argparse.Namespace(model="small_cnn", lr=0.1))
    (tmp_path / "args.yaml").write_text("amp: true\namp_dtype: float16\ndevice: cuda:0\n")
    training = load_model(checkpoint, factory=CNN_FACTORY).training
    assert training["autocast"] == {"device_type": "cuda", "dtype": "float16", "enabled": True}


def test_timm_checkpoint_without_factory_or_timm_is_one_line(cli, tmp_path: Path) -> None:
    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed: it builds the model")
    checkpoint = timm_checkpoint(tmp_path / "ckpt.pth.tar", argparse.Namespace(amp=False))
    assert_bad_input(cli("convert", checkpoint, "--out", tmp_path / "out"), "timm checkpoint", "small_cnn")


def lightning_checkpoint(path: Path, *, scaler: bool) -> Path:
    """A LightningModule's checkpoint (``Trainer.save_checkpoint``): its ``self.model`` prefix on every key, loop
    and callback state, and under 16-mixed precision the precision plugin's GradScaler state."""
    state = {f"model.{key}": value for key, value in build_cnn().state_dict().items()}
    checkpoint: dict[str, object] = {
        "epoch": 4, "global_step": 120, "pytorch-lightning_version": "2.4.0", "state_dict": state,
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 4}}}}, "callbacks": {},
        "optimizer_states": [], "lr_schedulers": [], "hyper_parameters": {"lr": 0.01, "hidden": 4},
    }
    if scaler:
        checkpoint["MixedPrecision"] = {"scale": 32768.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                        "growth_interval": 2000, "_growth_tracker": 17}
    torch.save(checkpoint, path)
    return path


def test_lightning_checkpoint_with_a_grad_scaler_plans_fp16(cli, tmp_path: Path, pixels_npz: Path) -> None:
    checkpoint = lightning_checkpoint(tmp_path / "epoch=4.ckpt", scaler=True)
    out = tmp_path / "out"
    result = cli("convert", checkpoint, "--factory", CNN_FACTORY, "--val-data", pixels_npz, "--out", out)
    assert result.exit_code == 0, result.stderr
    plan = manifest_plan(out)
    assert plan["policy"] == "cuda-fp16"
    assert "MixedPrecision" in plan["policy_source"]
    assert "CUDA" in " ".join(result.stdout.split())  # the device assumed, and why


class AttributeDict(dict):
    """Lightning's hyper-parameter container: a dict subclass, which torch's weights_only loader refuses."""


def test_lightning_hyper_parameters_in_a_dict_subclass_are_read(tmp_path: Path) -> None:
    state = {f"model.{key}": value for key, value in build_cnn().state_dict().items()}
    torch.save({"state_dict": state, "pytorch-lightning_version": "2.4.0",
                "hyper_parameters": AttributeDict(lr=0.1, precision="bf16-mixed")}, tmp_path / "last.ckpt")
    training = load_model(tmp_path / "last.ckpt", factory=CNN_FACTORY).training
    assert training["autocast"] == {"device_type": "cuda", "dtype": "bfloat16", "enabled": True}


def test_lightning_checkpoint_without_precision_state_says_the_record_does_not_settle_it(tmp_path: Path) -> None:
    checkpoint = lightning_checkpoint(tmp_path / "last.ckpt", scaler=False)
    loaded = load_model(checkpoint, factory=CNN_FACTORY)
    assert "autocast" not in loaded.training
    assert any("does not settle" in note for note in loaded.training["assumptions"])


def test_save_inside_autocast_records_the_live_policy(tmp_path: Path, pixels_npz: Path) -> None:
    model = build_cnn()
    example = (torch.zeros(2, 1, 8, 8),)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        path = mpexport.save(model, tmp_path / "model.pt2", example,
                             dynamic_shapes=({0: torch.export.Dim("batch")},), extra={"epochs": 3})
    loaded = load_model(path)
    assert loaded.training["autocast"] == {"device_type": "cpu", "dtype": "bfloat16", "enabled": True}
    assert loaded.training["torch"] == torch.__version__ and loaded.training["epochs"] == 3
    assert loaded.program is not None
    dtypes = {node.meta["val"].dtype for node in loaded.program.graph.nodes if hasattr(node.meta.get("val"), "dtype")}
    assert torch.float32 in dtypes and not dtypes & {torch.float16, torch.bfloat16}  # FP32 although inside autocast
    result = mpexport.convert(path, out=tmp_path / "out", val_data=pixels_npz)
    assert result.manifest.plan is not None and result.manifest.plan.policy == "cpu-bf16"
    assert "mpexport.json" in result.manifest.plan.policy_source


def test_save_takes_a_policy_name_or_an_autocast_object_and_a_grad_scaler(tmp_path: Path) -> None:
    model = build_cnn()
    example = (torch.zeros(2, 1, 8, 8),)
    scaler = torch.amp.GradScaler("cpu")
    training = load_model(mpexport.save(model, tmp_path / "a.pt2", example, autocast="cuda-fp16",
                                        grad_scaler=scaler)).training
    assert training["autocast"]["device_type"] == "cuda" and training["grad_scaler"] is True
    autocast = torch.autocast("cpu", dtype=torch.float16)
    training = load_model(mpexport.save(model, tmp_path / "b.pt2", example, autocast=autocast)).training
    assert training["autocast"] == {"device_type": "cpu", "dtype": "float16", "enabled": True}
    training = load_model(mpexport.save(model, tmp_path / "c.pt2", example)).training
    assert training["autocast"]["enabled"] is False  # saved outside autocast: trained without it
    with pytest.raises(mpexport.MpexportError, match="unknown autocast policy"):
        mpexport.save(model, tmp_path / "d.pt2", example, autocast="tpu-fp8")
    assert not (tmp_path / "d.pt2").exists()
