"""`mpexport convert` end to end on BERT-base or ViT-base from a `.pt2`, stage by stage as the manifest records
them, and optionally `mpexport verify` after it.

    .venv/bin/python benchmarks/pipeline_bench.py [--model bert|vit] [--layers 12] [--samples 64] [--verify]
    .venv/bin/python benchmarks/pipeline_bench.py --source /tmp/before   # another checkout, e.g. a git worktree

BERT-base (``BertForSequenceClassification``) or ViT-base (``ViTForImageClassification``, 224x224 images), random
weights, seed 0, no download, is exported once to a `.pt2` with a dynamic batch (BERT: and sequence), with
``--samples`` validation samples (BERT: ``--tokens`` tokens, a quarter of them padded). Every run is its own
process: wall seconds of ``mpexport.convert`` (imports excluded) and its peak RSS, the manifest's per-stage
seconds and peak RSS where the checkout records them, and what the conversion decided (export check, the plan's
SHA-256 and precision counts), so two checkouts can be compared for time and sameness.
``--source DIR`` imports mpexport from another checkout instead of this one (``git worktree add DIR <commit>``).
The CLI sets ``OMP_WAIT_POLICY=PASSIVE``; this library-level run inherits the caller's setting, so run it both
ways to separate that effect from the others.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def prepare(workdir: Path, model: str, layers: int, samples: int, tokens: int) -> None:
    """The model as a `.pt2` with a dynamic batch (and sequence), and its validation set."""
    import torch

    torch.manual_seed(0)
    if model == "vit":
        from transformers import ViTConfig, ViTForImageClassification

        class Logits(torch.nn.Module):
            """ViT returning its logits tensor: a `.pt2` whose output is a ModelOutput cannot be loaded back (torch
            does not deserialize that pytree type), and this ViT breaks with return_dict=False."""

            def __init__(self) -> None:
                super().__init__()
                self.vit = ViTForImageClassification(ViTConfig(num_hidden_layers=layers))

            def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
                return self.vit(pixel_values=pixel_values).logits

        vit = Logits().eval()
        pixels = np.random.default_rng(0).standard_normal((samples, 3, 224, 224)).astype(np.float32)
        program = torch.export.export(vit, (), {"pixel_values": torch.from_numpy(pixels[:2])},
                                      dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", max=1024)}})
        torch.export.save(program, workdir / "model.pt2")
        np.savez(workdir / "val.npz", pixel_values=pixels)
        return
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(num_hidden_layers=layers, return_dict=False)).eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 30000, (samples, tokens))
    mask = np.ones_like(ids)
    mask[::4, tokens // 2:] = 0
    example = {"input_ids": torch.from_numpy(ids[:2]), "attention_mask": torch.from_numpy(mask[:2])}
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=512)
    program = torch.export.export(model, (), example, dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                                      "attention_mask": {0: batch, 1: seq}})
    torch.export.save(program, workdir / "model.pt2")
    np.savez(workdir / "val.npz", input_ids=ids, attention_mask=mask, labels=np.arange(samples) % 2)


def run_convert(workdir: Path, out: Path, verify: bool) -> dict:
    """One conversion (and verify) in this process, with whatever mpexport is importable."""
    import mpexport

    started = time.perf_counter()
    result = mpexport.convert(workdir / "model.pt2", out=out, val_data=workdir / "val.npz", force=True)
    record: dict = {"convert_seconds": round(time.perf_counter() - started, 2),
                    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                    "export_check_passed": result.export_check_passed}
    plan_file = out / "plan.json"
    record["plan_sha256"] = hashlib.sha256(plan_file.read_bytes()).hexdigest()[:16]
    record["precision"] = json.loads(plan_file.read_text())["summary"]["precision"]
    manifest = result.manifest
    # "stages" from manifest version 3 on, "timings" before (this benchmark also runs older checkouts)
    recorded = getattr(manifest, "stages", None) or getattr(manifest, "timings", {})
    timings = recorded.get("convert") if not isinstance(manifest, dict) else None
    if timings:
        record["stages"] = {stage.stage: [stage.seconds, stage.peak_rss_mb] for stage in timings}
    if verify:
        started = time.perf_counter()
        report = mpexport.verify(out)
        record["verify_seconds"] = round(time.perf_counter() - started, 2)
        record["verdict"] = report.verdict
        record["verify_backends"] = {name: state.get("seconds") for name, state in report.backends.items()}
        verify_stages = getattr(report, "stages", None) or getattr(report, "timings", None)
        if verify_stages:
            record["verify_stages"] = {stage.stage: [stage.seconds, stage.peak_rss_mb] for stage in verify_stages}
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("bert", "vit"), default="bert")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--source", type=Path, help="Import mpexport from this checkout instead.")
    parser.add_argument("--verify", action="store_true", help="Also run mpexport verify on the result.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mpexport-pipeline-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(run_convert(workdir, workdir / "out", args.verify)))
        return
    if not (workdir / "model.pt2").exists():
        prepare(workdir, args.model, args.layers, args.samples, args.tokens)
    source = (args.source or ROOT).resolve()
    env = {**os.environ, "PYTHONPATH": str(source)}  # OMP_WAIT_POLICY as the caller sets it (the CLI: PASSIVE)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--workdir", str(workdir)]
    command += ["--verify"] if args.verify else []
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=source, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the run failed:\n{done.stderr[-3000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record["source"] = str(source)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
