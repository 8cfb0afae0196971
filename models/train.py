"""Train the bundled example models with mixed precision (torch.autocast + GradScaler) on scikit-learn's
handwritten digits (8x8 images, shipped inside scikit-learn), and save them for mpexport:

    models/digits_resnet.pt2        ResNet-style CNN (conv, batch norm, residual adds, pooling, linear)
    models/digits_transformer.pt2   ViT-style transformer (patch conv, attention with softmax, RMSNorm,
                                    LayerNorm, GELU MLP)
    models/<name>.val.npz           the held-out validation set: 'pixels' (N, 1, 8, 8) float32, 'labels'

Each .pt2 is a torch.export archive with a dynamic batch dimension, written by ``mpexport.save``: it records how
it was trained (autocast device and dtype, GradScaler, torch version, accuracies) in its extra file
'mpexport.json'.

    python models/train.py            # both models (about a minute on 2 CPU cores)
    python models/train.py resnet     # one of them
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F

import mpexport

HERE = Path(__file__).resolve().parent
SEED = 0
VAL_FRACTION = 0.2


class ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a (projected) shortcut."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut = nn.Identity() if stride == 1 and channels_in == channels_out else nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    """A small ResNet for 1x8x8 digits."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = ResidualBlock(width, width, 1)
        self.layer2 = ResidualBlock(width, 2 * width, 2)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(pixels)))
        return self.head(x.mean(dim=(2, 3)))


class Attention(nn.Module):
    """Multi-head self-attention written out: q k^T / sqrt(d), softmax, weighted sum of v."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(dim // self.heads)
        weights = torch.softmax(scores, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block: RMSNorm before attention, LayerNorm before the GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitsTransformer(nn.Module):
    """A ViT for 1x8x8 digits: 2x2 patches (16 tokens), learned positions, 2 blocks, mean pooling."""

    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 2, 2)
        self.position = nn.Parameter(torch.zeros(1, 16, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixels).flatten(2).transpose(1, 2) + self.position
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


EXAMPLES = {
    # name: (model class, autocast dtype on CPU, use GradScaler, epochs, learning rate)
    "resnet": (DigitsResNet, torch.bfloat16, False, 30, 3e-3),
    "transformer": (DigitsTransformer, torch.float16, True, 60, 2e-3),
}


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train/validation split of scikit-learn's digits, pixels scaled to [0, 1], shape (N, 1, 8, 8)."""
    data = load_digits()
    pixels = (data.images / 16.0).astype(np.float32)[:, None]
    labels = data.target.astype(np.int64)
    return train_test_split(pixels, labels, test_size=VAL_FRACTION, random_state=SEED, stratify=labels)


def accuracy(model: nn.Module, pixels: np.ndarray, labels: np.ndarray, autocast: dict | None = None) -> float:
    """Top-1 accuracy, in FP32 or under ``torch.autocast(**autocast)``."""
    model.eval()
    with torch.no_grad(), torch.autocast(**(autocast or {"device_type": "cpu", "enabled": False})):
        logits = model(torch.from_numpy(pixels))
    return float((logits.argmax(1).numpy() == labels).mean())


def train(name: str) -> dict:
    """Train one example with AMP, save its .pt2 and validation set, and return what was recorded."""
    model_class, amp_dtype, use_scaler, epochs, lr = EXAMPLES[name]
    torch.manual_seed(SEED)
    train_x, val_x, train_y, val_y = digits()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        amp_dtype = torch.float16 if use_scaler else torch.bfloat16
    model = model_class().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train_x) / 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler(device, enabled=use_scaler)
    inputs, targets = torch.from_numpy(train_x).to(device), torch.from_numpy(train_y).to(device)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(inputs), generator=generator).split(64):
            with torch.autocast(device, dtype=amp_dtype):
                loss = F.cross_entropy(model(inputs[batch]), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
    model = model.cpu().eval()
    record = {
        "example": name,
        "epochs": epochs,
        "data": "sklearn.datasets.load_digits",
        "val_samples": len(val_x),
        "val_accuracy_fp32": round(accuracy(model, val_x, val_y), 4),
        "val_accuracy_amp_cpu": round(
            accuracy(model, val_x, val_y, {"device_type": "cpu", "dtype": amp_dtype}), 4),
    }
    # The recommended last line of a training script: the FP32 model as a .pt2 with how it was trained.
    mpexport.save(model, HERE / f"digits_{name}.pt2", (torch.from_numpy(val_x[:4]),),
                  dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1, max=65536)}},
                  autocast=torch.autocast(device, dtype=amp_dtype), grad_scaler=scaler, extra=record)
    np.savez(HERE / f"digits_{name}.val.npz", pixels=val_x, labels=val_y)
    return mpexport.load_model(HERE / f"digits_{name}.pt2").training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("examples", nargs="*", metavar="EXAMPLE", help=f"any of {', '.join(EXAMPLES)} (default: all)")
    names = parser.parse_args().examples or list(EXAMPLES)
    unknown = [name for name in names if name not in EXAMPLES]
    if unknown:
        parser.error(f"unknown example(s) {', '.join(unknown)}; choose from {', '.join(EXAMPLES)}")
    for name in names:
        print(json.dumps(train(name), indent=2))


if __name__ == "__main__":
    main()
