"""Small real models for the tests, importable as factories (``tests.toy_models:build_cnn``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SmallCNN(nn.Module):
    """conv -> batch norm -> relu -> linear, on 1x8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(pixels))).flatten(1))


def build_cnn() -> nn.Module:
    """A SmallCNN with fixed weights (seed 0)."""
    torch.manual_seed(0)
    return SmallCNN()


def bert_config():
    """A tiny BERT classifier configuration (no download)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, num_labels=3)


def build_bert() -> nn.Module:
    """A tiny BertForSequenceClassification from its config, seed 0."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(bert_config()).eval()


def build_vit() -> nn.Module:
    """A tiny ViTForImageClassification (16x16 RGB, 4x4 patches) from its config, seed 0."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, num_labels=5)
    return ViTForImageClassification(config).eval()


def build_broken() -> nn.Module:
    """A factory that fails."""
    raise RuntimeError("cannot build the model without its config")


def build_not_a_module() -> dict:
    """A factory that returns the wrong thing."""
    return {"weights": 1}


class DataDependent(nn.Module):
    """Python control flow on a tensor value: torch.export cannot capture it, tracing can."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if y.sum() > 0:
            return y * 2
        return y * 3


def build_data_dependent() -> nn.Module:
    """A DataDependent model with fixed weights."""
    torch.manual_seed(0)
    return DataDependent()


@torch.library.custom_op("mpexport_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    """A custom op with no ONNX translation."""
    return x.clone() * 2


@mystery.register_fake
def _mystery_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class UsesCustomOp(nn.Module):
    """A model whose forward calls an op the ONNX exporters cannot translate."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mystery(self.fc(x))


def build_custom_op() -> nn.Module:
    """A UsesCustomOp model."""
    return UsesCustomOp()
