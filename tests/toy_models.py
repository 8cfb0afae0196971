"""Small real models for the tests, importable as factories (``tests.toy_models:build_cnn``)."""

from __future__ import annotations

import os
import sys

import numpy as np
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


class TextLogits(nn.Module):
    """A transformers text model returning plain logits (a `.pt2` whose output is a ModelOutput cannot be loaded
    back by torch), taking ``input_ids`` and ``attention_mask`` positionally."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class ImageLogits(nn.Module):
    """A transformers vision model returning plain logits, taking ``pixel_values``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def build_bert() -> nn.Module:
    """A tiny BertForSequenceClassification from its config, seed 0."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(bert_config()).eval()


def build_llama() -> nn.Module:
    """A tiny LlamaForCausalLM from its config (no cache), seed 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    return LlamaForCausalLM(config).eval()


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


class Head(nn.Module):
    """A classifier head the model's author keeps out of autocast."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return torch.log_softmax(self.fc(x.float()), dim=-1)


class WithFp32Head(nn.Module):
    """linear -> gelu -> exp/log in the body, an autocast(enabled=False) head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.head = Head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.body(x))
        h = torch.log1p(torch.exp(-h.abs())) + h
        return self.head(h)


def build_fp32_head() -> nn.Module:
    """A WithFp32Head model, seed 0."""
    torch.manual_seed(0)
    return WithFp32Head().eval()


class Outliers(nn.Module):
    """Activations beyond the FP16 range in a node the policy would run in FP16 (as trained LLMs show in a
    few residual channels), and a weight beyond it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 4)
        self.big = nn.Linear(8, 4)
        with torch.no_grad():
            self.big.weight[0, 0] = 1.0e5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x) * 3.0e4
        return self.fc2(h) / 1.0e5 + self.big(x)


def build_outliers() -> nn.Module:
    """An Outliers model, seed 0."""
    torch.manual_seed(0)
    return Outliers().eval()


class ExplicitCast(nn.Module):
    """``y.float()`` before an op autocast does not list: the op runs in FP32 though ``y`` came out FP16.
    (``y`` itself is not used again: torch.export aliases a no-op cast with its input.)"""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.gate = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return self.fc2(torch.sigmoid(y.float()) + torch.tanh(self.gate(x)))


def build_explicit_cast() -> nn.Module:
    """An ExplicitCast model, seed 0."""
    torch.manual_seed(0)
    return ExplicitCast().eval()


def build_hf_resnet() -> nn.Module:
    """A tiny transformers ResNetForImageClassification (conv, batch norm, residual stages), seed 0."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)
    return ResNetForImageClassification(config).eval()


def build_gpt2() -> nn.Module:
    """A tiny transformers GPT2LMHeadModel (causal mask, Conv1D projections, tanh GELU), no cache, seed 0."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


class OverflowHazard(nn.Module):
    """Llama-style RMSNorm over activations in the hundreds: x**2 overflows FP16 (max 65504), which the
    training policy avoids (autocast runs pow and rsqrt in FP32) and a naive all-FP16 conversion does not."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 32)
        self.head = nn.Linear(32, 4)
        with torch.no_grad():
            self.up.weight.mul_(120.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        variance = h.pow(2).mean(-1, keepdim=True)
        return self.head(h * torch.rsqrt(variance + 1e-6))


def build_overflow_hazard() -> nn.Module:
    """An OverflowHazard model, seed 0."""
    torch.manual_seed(0)
    return OverflowHazard().eval()


class SquaredMLP(nn.Module):
    """up -> square -> down (a squared-ReLU-style feed-forward block)."""

    def __init__(self, width: int = 64, hidden: int = 256) -> None:
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u = self.up(h)
        return self.down(u * u)


class RareOverflow(nn.Module):
    """Three residual squared-MLP blocks. Input feature 15 is 0 except in rare samples, where it drives one hidden
    unit of ``blocks.1.up`` to ~300: its square (9e4) overflows FP16 (max 65504) but not BF16. Trained under
    cuda-bf16 and deployed as FP16, only those samples break; calibration on the first samples never sees them.
    The unit's weight out of the block is small, so the overflow stays inside ``blocks.1``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 64)
        self.blocks = nn.ModuleList(SquaredMLP() for _ in range(3))
        self.head = nn.Linear(64, 10)
        with torch.no_grad():
            self.embed.weight[:, 15] = 0.0
            self.embed.weight[3, 15] = 20.0
            for block in self.blocks:
                block.up.weight[:, 3] = 0.0
            self.blocks[1].up.weight[7, 3] = 15.0
            self.blocks[1].down.weight[:, 7] *= 1e-3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.embed(x))
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def build_rare_overflow() -> nn.Module:
    """A RareOverflow model, seed 0."""
    torch.manual_seed(0)
    return RareOverflow().eval()


def rare_overflow_data(samples: int = 320, rare: int = 40) -> np.ndarray:
    """Inputs for RareOverflow: feature 15 set only in the last ``rare`` samples."""
    x = np.random.default_rng(0).standard_normal((samples, 16)).astype(np.float32)
    x[:, 15] = 0.0
    x[samples - rare:, 15] = 1.0
    return x


class DiesOnceInRayWorker(nn.Module):
    """A small MLP whose first call inside a Ray actor ends that actor's process (as an out-of-memory kill would),
    once: the file ``marker`` records that it happened."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ray = sys.modules.get("ray")
        in_actor = ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
        if in_actor and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return self.net(x)
