"""verify on one process against verify --ray with 1 and 2 local workers: throughput, Ray's overhead, merge exactness.

    .venv/bin/python benchmarks/verify_scale.py [--samples 512] [--layers 4] [--workdir DIR]

A BERT (hidden 256, --layers layers, 128 tokens, random weights, cuda-fp16 plan) converted by mpexport, its
validation set --samples samples in .npz shards of 128. Each verify runs as its own `mpexport verify --json`
process, as a user runs it (the Ray runs start and stop their own local instance, included in the wall time):

- one process (PyTorch and ONNX Runtime on every core);
- --ray with 1 worker of every core (--cpus-per-worker = cores): Ray's overhead over the single process, target at
  most 15%;
- --ray with one worker per core.

Reports wall seconds, samples per second, overhead, and how far each Ray report's numbers are from the single
process's (largest relative difference over every metric; the verdict, sample count and failing backends must be
equal). The merge itself is exact (tests/check/test_scale.py checks it bit for bit); differences here come from the
backends' arithmetic on another thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MPEXPORT = [sys.executable, "-m", "mpexport.cli"]


def build(root: Path, samples: int, layers: int) -> tuple[Path, Path]:
    """The converted BERT bundle and its validation shards."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    import mpexport
    from mpexport.precision.options import PlanOptions

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=256, num_hidden_layers=layers,
                                                     num_attention_heads=4, intermediate_size=1024)).eval()
    torch.save(model, root / "bert.pt")
    ids = np.random.default_rng(0).integers(0, 30000, (samples, 128))
    shards = root / "val"
    shards.mkdir()
    for start in range(0, samples, 128):
        np.savez(shards / f"{start // 128:04d}.npz", input_ids=ids[start:start + 128],
                 attention_mask=np.ones_like(ids[start:start + 128]))
    out = root / "out"
    mpexport.convert(root / "bert.pt", out=out, val_data=shards, trust_pickle=True,
                     plan_options=PlanOptions(policy="cuda-fp16"), calibration_samples=64)
    return out, shards


def run(out: Path, shards: Path, extra: list[str]) -> tuple[float, dict[str, Any]]:
    """Wall seconds and the JSON report of one `mpexport verify` process."""
    command = [*MPEXPORT, "verify", str(out), "--val-data", str(shards), "--trust-pickle", "--json", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return wall, json.loads(done.stdout)


def largest_difference(first: Any, second: Any) -> float:
    """The largest relative difference between two reports' metrics (0 when equal)."""
    if isinstance(first, dict):
        return max((largest_difference(first[key], second[key]) for key in first), default=0.0)
    if isinstance(first, float) and isinstance(second, float) and math.isfinite(first) and first != second:
        return abs(first - second) / max(abs(first), abs(second))
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as temporary:
        root = args.workdir or Path(temporary)
        root.mkdir(parents=True, exist_ok=True)
        out, shards = (root / "out", root / "val") if (root / "out").is_dir() else build(root, args.samples,
                                                                                         args.layers)
        runs = {"one process": [], f"ray, 1 worker x {cores} CPUs": ["--ray", "--workers", "1", "--cpus-per-worker",
                                                                      str(cores)],
                f"ray, {cores} workers x 1 CPU": ["--ray", "--workers", str(cores)]}
        results = {name: run(out, shards, extra) for name, extra in runs.items()}
    base_wall, base = results["one process"]
    print(f"BERT hidden 256 x {args.layers} layers, {base['samples']} samples x 128 tokens, {cores} cores")
    print("| run | wall s | samples/s | vs one process | verdict | max rel. metric difference |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (wall, report) in results.items():
        same = (report["verdict"], report["samples"]) == (base["verdict"], base["samples"])
        difference = largest_difference(base["metrics"], report["metrics"])
        print(f"| {name} | {wall:.1f} | {report['samples'] / wall:.2f} | {wall / base_wall - 1:+.1%} | "
              f"{report['verdict']}{'' if same else ' (DIFFERS)'} | {difference:.2g} |")


if __name__ == "__main__":
    main()
