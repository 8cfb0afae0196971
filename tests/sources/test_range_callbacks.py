"""The training-framework callbacks (:mod:`mpexport.integrations`) with the real frameworks: each writes
``mpexport_ranges.json`` where its checkpoints go, and the record joins the graph ``convert`` exports."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mpexport.capture.provenance import NodeProvenance
from mpexport.precision.training_ranges import join_ranges
from mpexport.sources.training_ranges import find_training_ranges
from tests.precision.test_training_ranges import batches, make_net


def test_hugging_face_trainer_callback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    transformers = pytest.importorskip("transformers")
    from mpexport.integrations.hf import RangeMonitorCallback

    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    rows = [{"input_ids": torch.randint(0, 64, (8,)), "labels": torch.tensor(i % 2)} for i in range(16)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, save_steps=2,
                                          per_device_train_batch_size=4, use_cpu=True, bf16=True, report_to=[],
                                          logging_strategy="no", disable_tqdm=True)
    callback = RangeMonitorCallback(every=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    assert (tmp_path / "out" / "checkpoint-2" / "mpexport_ranges.json").is_file()
    assert "mpexport ranges: 2 sampled steps of 4" in capsys.readouterr().out
    ranges, notes = find_training_ranges(tmp_path / "out")
    assert ranges is not None and not notes and ranges.sampled_steps == 2
    keys = {(op.module, op.op) for op in ranges.ops}
    assert ("bert.encoder.layer.0.attention.self.query", "linear") in keys


def test_lightning_callback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if importlib.util.find_spec("lightning") is None:
        pytest.skip("lightning is not installed")
    import lightning

    from mpexport.integrations.lightning import RangeMonitorCallback

    class Wrapped(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net()

        def training_step(self, batch: torch.Tensor, index: int) -> torch.Tensor:
            return self.net(batch).float().square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-9)

    trainer = lightning.Trainer(max_steps=4, accelerator="cpu", precision="bf16-mixed", logger=False,
                                enable_progress_bar=False, enable_model_summary=False,
                                default_root_dir=str(tmp_path), callbacks=[RangeMonitorCallback(every=1)])
    trainer.fit(Wrapped(), torch.utils.data.DataLoader(batches(4, rare_step=2), batch_size=None))
    checkpoint = next((tmp_path / "checkpoints").glob("*.ckpt"))
    assert "1 exceeded the FP16 range (max 65504), in net.big.fc" in capsys.readouterr().out
    ranges, notes = find_training_ranges(checkpoint)
    assert ranges is not None and not notes and ranges.sampled_steps == 4
    graph = [NodeProvenance("n_fc", "Gemm", "big.fc", None, "aten.linear.default", origin="linear",
                            autocast_op="aten.linear.default")]
    evidence, refused = join_ranges(graph, ranges)  # the factory builds the inner model: paths without "net."
    assert evidence is not None and not refused and evidence.nodes["n_fc"].steps_over == 1
