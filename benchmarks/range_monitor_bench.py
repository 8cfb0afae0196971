"""Cost of ``mpexport.RangeMonitor`` in a training loop (issue 25): step time without the monitor, on a sampled
step, and averaged over training with ``--every`` (default 100), under CPU BF16 autocast.

    .venv/bin/python benchmarks/range_monitor_bench.py --model bert --layers 12 --hidden 768 --seq 128 --batch 8
    .venv/bin/python benchmarks/range_monitor_bench.py --model resnet --width 64 --batch 16   # ResNet-50-sized
    .venv/bin/python benchmarks/range_monitor_bench.py --model bert --layers 2 --hidden 128 --steps 20   # quick

Targets: a sampled step at most 2x a plain step; the average overhead at most 3% with ``every`` <= 100.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from mpexport.sources.range_monitor import RangeMonitor


def bert(layers: int, hidden: int) -> nn.Module:
    layer = nn.TransformerEncoderLayer(hidden, max(hidden // 64, 2), 4 * hidden, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, layers), nn.Linear(hidden, 2))


def resnet(width: int) -> nn.Module:
    def block(channels: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
    stages = [block(width * 2 ** (i // 4)) if i % 4 else nn.Conv2d(width * 2 ** max(i // 4 - 1, 0) if i else 3,
                                                                     width * 2 ** (i // 4), 3, stride=2, padding=1)
              for i in range(16)]
    return nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width * 8, 10))


def step_times(model: nn.Module, batch: torch.Tensor, steps: int, every: int | None) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    monitor = RangeMonitor(model, every=every).start() if every else None
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if monitor is not None:
            monitor.step()
        times.append(time.perf_counter() - started)
    if monitor is not None:
        monitor.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("bert", "resnet"), default="bert")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.model == "bert":
        model, batch = bert(args.layers, args.hidden), torch.randn(args.batch, args.seq, args.hidden)
    else:
        model, batch = resnet(args.width), torch.randn(args.batch, 3, 224, 224)
    step_times(model, batch, 2, None)  # warm-up
    plain = statistics.median(step_times(model, batch, args.steps, None))
    print(f"{args.model}: plain step {plain * 1e3:.1f} ms (median of {args.steps})", flush=True)
    sampled = statistics.median(step_times(model, batch, args.steps, 1))
    average = (sampled + (args.every - 1) * plain) / args.every  # unsampled steps install nothing
    print(f"{args.model}: plain step {plain * 1e3:.1f} ms, sampled step {sampled * 1e3:.1f} ms "
          f"({sampled / plain:.2f}x), average with every={args.every}: {(average / plain - 1) * 100:.2f}% overhead")


if __name__ == "__main__":
    main()
