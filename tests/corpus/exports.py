"""Models as other pipelines hand them over: the tiny transformers BERT of ``tests/toy_models.py`` through the
TorchScript exporter (module scopes in node names, no aten ops) at opsets 13, 14 and 17, through ONNX Runtime's
transformer optimizer (``com.microsoft`` contrib ops), and through torch's dynamo exporter with its default graph
optimizer; a tiny GPT-2; the toy CNN through the dynamo exporter (BatchNorm folded into the Conv); an LSTM through
the TorchScript exporter.

ORT's BERT fusions match the eager attention's ``MatMul/Div/Add/Softmax/MatMul`` pattern, so the models meant for
the optimizer are built with ``attn_implementation="eager"`` (as Optimum's ORT-optimization recipes were, before
transformers defaulted to SDPA); ``bert_sdpa_ortopt_op14`` keeps SDPA and shows what the optimizer leaves then.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tests.corpus.entry import (
    HERE,
    ORT,
    ORT_COMMIT,
    SAMPLES,
    Built,
    Entry,
    Expect,
    Origin,
    Planned,
    normal,
    rng,
    token_batch,
)
from tests.toy_models import TextLogits, bert_config, build_cnn

HEADS, HIDDEN = 4, 32  # bert_config(): what optimize_model is told
TEXT_INPUTS = ["input_ids", "attention_mask"]


def tiny_bert(attention: str = "sdpa") -> nn.Module:
    """``tests.toy_models.build_bert`` (seed 0) returning plain logits, with the attention implementation named."""
    from transformers import BertForSequenceClassification

    config = bert_config()
    config._attn_implementation = attention
    torch.manual_seed(0)
    return TextLogits(BertForSequenceClassification(config).eval())


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The dynamo exporter without its warnings and log lines (torchvision ops it skips, deprecations)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def text_example() -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of 16 tokens for tracing."""
    ids = torch.randint(1, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def torchscript_export(module: nn.Module, example: tuple[torch.Tensor, ...], names: list[str], path: Path,
                       opset: int, dynamic: dict[str, dict[int, str]]) -> Path:
    """The TorchScript (legacy) exporter, as Optimum and older pipelines call it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), dynamo=False, opset_version=opset, input_names=names,
                          output_names=["logits"], dynamic_axes=dynamic)
    return path


def text_axes() -> dict[str, dict[int, str]]:
    """Dynamic batch and sequence for the token inputs, dynamic batch for the logits."""
    return {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}


def finish(directory: Path, model_path: Path, arrays: dict[str, np.ndarray]) -> Built:
    """Write the validation set beside an exported ``model.onnx``."""
    np.savez(directory / "val.npz", **arrays)
    return Built(model_path, directory / "val.npz")


def bert_data(seed: int) -> dict[str, np.ndarray]:
    """16 padded sequences of 16 tokens and a label each (3 classes)."""
    generator = rng(seed)
    return {**token_batch(generator, 200), "labels": generator.integers(0, 3, SAMPLES)}


def bert_torchscript(opset: int, attention: str = "sdpa"):
    """A builder: the tiny BERT through the TorchScript exporter at ``opset``."""

    def build(directory: Path) -> Built:
        path = torchscript_export(tiny_bert(attention), text_example(), TEXT_INPUTS, directory / "model.onnx", opset,
                                  text_axes())
        return finish(directory, path, bert_data(30 + opset))

    return build


def bert_ort_optimized(opset: int, attention: str = "eager"):
    """A builder: the tiny BERT through the TorchScript exporter at ``opset``, then
    ``optimize_model(path, model_type="bert", num_heads=4, hidden_size=32)``."""

    def build(directory: Path) -> Built:
        from onnxruntime.transformers.optimizer import optimize_model

        source = torchscript_export(tiny_bert(attention), text_example(), TEXT_INPUTS, directory / "exported.onnx",
                                    opset, text_axes())
        optimized = optimize_model(str(source), model_type="bert", num_heads=HEADS, hidden_size=HIDDEN)
        optimized.save_model_to_file(str(directory / "model.onnx"))
        source.unlink()
        return finish(directory, directory / "model.onnx", bert_data(40 + opset))

    return build


def bert_dynamo(directory: Path) -> Built:
    """The tiny BERT through ``torch.onnx.export(dynamo=True)`` with its default optimizer (``optimize=True``):
    LayerNorm as ``LayerNormalization``, GELU as ``Gelu``, each node with the exporter's metadata."""
    directory.mkdir(parents=True, exist_ok=True)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=2, max=64)
    with quiet_exporter():
        program = torch.onnx.export(tiny_bert(), text_example(), dynamo=True, input_names=TEXT_INPUTS,
                                    output_names=["logits"], dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
                                    verbose=False)
    program.save(str(directory / "model.onnx"))
    return finish(directory, directory / "model.onnx", bert_data(50))


def cnn_dynamo(directory: Path) -> Built:
    """``tests.toy_models.build_cnn`` (Conv, BatchNorm, ReLU, Linear) through the dynamo exporter with its default
    optimizer, which folds the BatchNorm into the Conv (the fused node keeps the BatchNorm's metadata)."""
    directory.mkdir(parents=True, exist_ok=True)
    module = build_cnn().eval()
    generator = rng(51)
    with torch.no_grad():  # running statistics of a trained model, so that the fold changes the weights
        module.bn.running_mean.copy_(torch.from_numpy(normal(generator, 4, scale=0.1)))
        module.bn.running_var.copy_(torch.from_numpy(generator.uniform(0.5, 2.0, 4).astype(np.float32)))
    with quiet_exporter():
        program = torch.onnx.export(module, (torch.zeros(2, 1, 8, 8),), dynamo=True, input_names=["pixels"],
                                    output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    verbose=False)
    program.save(str(directory / "model.onnx"))
    return finish(directory, directory / "model.onnx", {"pixels": generator.random((SAMPLES, 1, 8, 8),
                                                                                   dtype=np.float32),
                                                        "labels": generator.integers(0, 10, SAMPLES)})


class GPT2Logits(nn.Module):
    """A tiny GPT-2 language model (2 layers, 4 heads, 32 wide, 200 tokens) returning its logits."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        config = GPT2Config(vocab_size=200, n_positions=64, n_embd=32, n_layer=2, n_head=4, use_cache=False,
                            bos_token_id=0, eos_token_id=0)
        self.model = GPT2LMHeadModel(config).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def gpt2_torchscript(directory: Path) -> Built:
    """The tiny GPT-2 through the TorchScript exporter at opset 14 (a causal mask filled with the FP32 minimum,
    GELU's tanh form with ``Pow 3``, LayerNorm decomposed)."""
    axes = {**text_axes(), "logits": {0: "batch", 1: "seq"}}
    path = torchscript_export(GPT2Logits(), text_example(), TEXT_INPUTS, directory / "model.onnx", 14, axes)
    return finish(directory, path, token_batch(rng(52), 200))


class LSTMClassifier(nn.Module):
    """A one-layer LSTM over 8 steps of 12 features and a linear head on its last step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lstm = nn.LSTM(12, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(features)
        return self.head(out[:, -1])


def lstm_torchscript(directory: Path) -> Built:
    """The LSTM classifier through the TorchScript exporter at opset 14: an ONNX ``LSTM`` node between
    Transposes, dynamic batch."""
    path = torchscript_export(LSTMClassifier().eval(), (torch.zeros(2, 8, 12),), ["features"],
                              directory / "model.onnx", 14, {"features": {0: "batch"}, "logits": {0: "batch"}})
    generator = rng(53)
    return finish(directory, path, {"features": normal(generator, SAMPLES, 8, 12),
                                    "labels": generator.integers(0, 4, SAMPLES)})


def here(changes: str, path: str = "tests/toy_models.py") -> Origin:
    """A model this repository builds (from its own toy models, or defined in ``path``)."""
    return Origin(HERE, path, "-", "Apache-2.0", changes)


def ort_tool(changes: str) -> Origin:
    """A toy model run through ONNX Runtime's optimizer."""
    return Origin(f"{HERE} + {ORT}", "onnxruntime/python/tools/transformers/optimizer.py", ORT_COMMIT,
                  "Apache-2.0 / MIT", changes)


ENTRIES = [
    Entry("bert_ts_op13", here("build_bert (eager attention: SDPA exports from opset 14) through the TorchScript "
                               "exporter, opset 13"),
          "module scopes, LayerNorm decomposed (opset < 17), eager attention", bert_torchscript(13, "eager"),
          Expect(planned=(Planned("MatMul", "fp16", every=False), Planned("Softmax", "fp32"),
                          Planned("ReduceMean", "fp32")), min_low_mac_share=0.9)),
    Entry("bert_ortopt_op14", ort_tool("build_bert (eager attention), TorchScript opset 14, optimize_model(bert, "
                                       "num_heads=4, hidden_size=32)"),
          "contrib ops Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu (item 1)",
          bert_ort_optimized(14),
          Expect(planned=(Planned("Attention", "fp16"), Planned("SkipLayerNormalization", "fp32")),
                 min_low_mac_share=0.9)),
    Entry("bert_ortopt_op17", ort_tool("as bert_ortopt_op14 at opset 17: the benchmark's hidden-size BERT"),
          "contrib ops at opset 17 (item 1); the model onnxconverter-common and AutoCast are judged on",
          bert_ort_optimized(17),
          Expect(planned=(Planned("Attention", "fp16"), Planned("SkipLayerNormalization", "fp32")),
                 min_low_mac_share=0.9)),
    Entry("bert_sdpa_ortopt_op14", ort_tool("build_bert (SDPA), TorchScript opset 14, optimize_model(bert, "
                                            "num_heads=4, hidden_size=32)"),
          "LayerNormalization at opset 14 written by the optimizer (item 2), SkipLayerNormalization, BiasGelu",
          bert_ort_optimized(14, attention="sdpa"),
          Expect(planned=(Planned("LayerNormalization", "fp32"), Planned("SkipLayerNormalization", "fp32"),
                          Planned("MatMul", "fp16", every=False)), min_low_mac_share=0.9)),
    Entry("bert_dynamo", here("build_bert through torch.onnx.export(dynamo=True), default optimizer"),
          "the exporter's metadata through its optimizer's fusions (item 7)", bert_dynamo,
          Expect(planned=(Planned("MatMul", "fp16", every=False), Planned("LayerNormalization", "fp32"),
                          Planned("Softmax", "fp32")), min_low_mac_share=0.9)),
    Entry("cnn_dynamo", here("build_cnn through torch.onnx.export(dynamo=True), default optimizer"),
          "BatchNorm folded into the Conv keeps the BatchNorm's aten op (item 7)", cnn_dynamo,
          Expect(planned=(Planned("Conv", "fp16"), Planned("Gemm", "fp16")), min_low_mac_share=1.0)),
    Entry("gpt2_ts_op14", here("a tiny transformers GPT-2 through the TorchScript exporter, opset 14",
                                    "tests/corpus/exports.py"),
          "causal mask of FP32 minimum, GELU tanh form (Pow 3), decomposed LayerNorm", gpt2_torchscript,
          Expect(planned=(Planned("MatMul", "fp16", every=False), Planned("Softmax", "fp32")),
                 min_low_mac_share=0.9)),
    Entry("lstm_ts_op14", here("an nn.LSTM classifier through the TorchScript exporter, opset 14",
                                    "tests/corpus/exports.py"),
          "LSTM planned as cuDNN's RNN runs under CUDA autocast (item 5)", lstm_torchscript,
          Expect(planned=(Planned("LSTM", "fp16"), Planned("Gemm", "fp16")), min_low_mac_share=0.9)),
]
