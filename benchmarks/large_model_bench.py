"""Peak memory of converting a model whose FP32 weights exceed 2 GB: a GPT-2-large-sized decoder built from its
config (36 layers, hidden 1280, 20 heads, vocabulary 50,257: 774 M parameters, 3.1 GB in FP32, no download).

    .venv/bin/python benchmarks/large_model_bench.py [--workdir DIR] [--layers 36] [--hidden 1280] [--heads 20]

Each step runs in its own process, and peak RSS is that process's own (``ru_maxrss``):

1. prepare: the model with random weights, saved as a pickled module, and 8 sequences of 128 tokens;
2. convert: ``mpexport.convert`` end to end (load, export, FP32 ONNX with external data, the data pass - export
   check against PyTorch and the range rule's statistics -, plan, mixed-precision rewrite, lint). Seconds and
   peak RSS per stage are the manifest's own record (``stages.convert``);
3. writer: the mixed-precision writer alone on the FP32 ONNX that step 2 wrote (read with external data, plan
   without calibration, rewrite, save with external data, lint), in a fresh process;
4. verify: ``mpexport.verify`` of step 2's bundle on its 8 sequences (every backend: PyTorch FP32, torch-amp,
   ONNX Runtime FP32 and mixed, strict emulation). Seconds and peak RSS per stage from the report's stages.

Targets: the conversion peaks below twice the model's FP16 size (= its FP32 weight bytes; issue 4); verify below
2.5x its FP32 weights (issue 16). ``--steps verify`` reruns one step on an existing workdir.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SEQUENCE, SAMPLES = 128, 8
MB = 1 << 20


def prepare(workdir: Path, layers: int, hidden: int, heads: int) -> None:
    """GPT-2 LM head model of the given size, random weights, pickled; validation token ids beside it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, use_cache=False)
    model = GPT2LMHeadModel(config).eval()
    torch.save(model, workdir / "model.pt")
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (SAMPLES, SEQUENCE))
    np.savez(workdir / "val.npz", input_ids=ids)


def convert(workdir: Path) -> dict:
    """``mpexport.convert`` of the prepared model; seconds and peak RSS overall and per stage, as the manifest
    records them (``stages.convert``)."""
    import mpexport
    from mpexport.precision.options import PlanOptions

    started = time.perf_counter()
    result = mpexport.convert(workdir / "model.pt", out=workdir / "build", val_data=workdir / "val.npz",
                              trust_pickle=True, force=True, plan_options=PlanOptions(policy="cuda-fp16"))
    manifest = result.manifest
    stages = {stage.stage: stage.peak_rss_mb for stage in manifest.stages["convert"]}
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": max(stages.values()),
            "stage_peak_rss_mb": stages,
            "stage_seconds": {stage.stage: stage.seconds for stage in manifest.stages["convert"]},
            "export_check_passed": result.export_check_passed, "lint_passed": result.lint_passed,
            "external_data": manifest.export.external_data,
            "precision": manifest.plan.summary["precision"]}


def writer(workdir: Path) -> dict:
    """Plan + rewrite + save + lint from the FP32 ONNX in ``workdir/build`` into ``workdir/writer``."""
    import onnx_ir as ir

    from mpexport.bundle.names import FP32_ONNX, PROVENANCE
    from mpexport.bundle.store import Bundle
    from mpexport.capture.provenance import read_provenance
    from mpexport.graph.lint import lint_model
    from mpexport.graph.onnxfile import save_model
    from mpexport.graph.rewrite import apply_plan
    from mpexport.precision.options import PlanOptions
    from mpexport.precision.planner import make_plan

    target = workdir / "writer"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    bundle = Bundle.open(workdir / "build", uses=(PROVENANCE,))
    baseline = _status_kb("VmRSS") // 1024
    started = time.perf_counter()
    model = ir.load(str(bundle.path(FP32_ONNX)))
    plan = make_plan(model, read_provenance(bundle), PlanOptions(policy="cuda-fp16"))
    apply_plan(model, plan.precisions())
    save_model(model, target / "model.mixed.onnx", external_data="model.mixed.onnx.data")
    rewrite_seconds = time.perf_counter() - started
    rewrite_peak = _peak_mb()
    lint = lint_model(target / "model.mixed.onnx", plan)
    return {"seconds": round(rewrite_seconds, 1), "peak_rss_mb": rewrite_peak, "rss_after_imports_mb": baseline,
            "with_lint_seconds": round(time.perf_counter() - started, 1), "with_lint_peak_rss_mb": _peak_mb(),
            "lint_ok": lint.ok, "mixed_data_mb": round((target / "model.mixed.onnx.data").stat().st_size / MB)}


def verify(workdir: Path) -> dict:
    """``mpexport.verify`` of the bundle in ``workdir/build``; seconds and peak RSS overall and per stage."""
    import mpexport

    started = time.perf_counter()
    report = mpexport.verify(workdir / "build", trust_pickle=True, write=False)
    stages = {stage.stage: stage.peak_rss_mb for stage in report.stages}
    peak = max([_peak_mb(), *(value for value in stages.values() if value)])
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": peak,
            "stage_peak_rss_mb": stages, "stage_seconds": {stage.stage: stage.seconds for stage in report.stages},
            "verdict": report.verdict, "samples": report.samples,
            "backends": {name: state.get("state") for name, state in report.backends.items()}}


def fp32_weight_bytes(build: Path) -> int:
    """Bytes of the FP32 ONNX's initializers (its external data file and the inline ones)."""
    import onnx_ir as ir

    from mpexport.bundle.names import FP32_ONNX
    from mpexport.bundle.store import Bundle

    model = ir.load(str(Bundle.open(build).path(FP32_ONNX)))
    return sum(value.const_value.nbytes for value in model.graph.initializers.values()
               if value.const_value is not None and value.dtype == ir.DataType.FLOAT)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def _peak_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _child(step: str, workdir: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", step, "--workdir", str(workdir), "--layers", str(args.layers),
               "--hidden", str(args.hidden), "--heads", str(args.heads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{step} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--hidden", type=int, default=1280)
    parser.add_argument("--heads", type=int, default=20)
    parser.add_argument("--steps", default="convert,writer,verify", help="comma-separated steps to run")
    parser.add_argument("--child", choices=("prepare", "convert", "writer", "verify"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mpexport-large-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.child:
        steps = {"prepare": lambda: prepare(workdir, args.layers, args.hidden, args.heads) or {},
                 "convert": lambda: convert(workdir), "writer": lambda: writer(workdir),
                 "verify": lambda: verify(workdir)}
        print(json.dumps(steps[args.child]()))
        return
    if not (workdir / "model.pt").exists():
        _child("prepare", workdir, args)
    results: dict = {step: _child(step, workdir, args) for step in args.steps.split(",")}
    fp32_mb = fp32_weight_bytes(workdir / "build") / MB
    results["fp32_weights_mb"] = round(fp32_mb)
    results["fp16_size_mb"] = round(fp32_mb / 2)
    print(json.dumps(results, indent=1))
    fp16_mb = fp32_mb / 2
    print(f"\nFP32 weights {fp32_mb:,.0f} MB, FP16 size {fp16_mb:,.0f} MB (target: peak < {fp32_mb:,.0f} MB)")
    rows = []
    if "writer" in results:
        rows += [("writer: plan + rewrite + save", results["writer"]["seconds"], results["writer"]["peak_rss_mb"]),
                 ("writer + lint (ORT loads the mixed model)", results["writer"]["with_lint_seconds"],
                  results["writer"]["with_lint_peak_rss_mb"])]
    for step in ("convert", "verify"):
        if step in results:
            rows.append((f"{step} end to end", results[step]["seconds"], results[step]["peak_rss_mb"]))
            rows += [(f"- {step} stage '{stage}'", results[step]["stage_seconds"][stage], peak)
                     for stage, peak in results[step]["stage_peak_rss_mb"].items()]
    print("| step | seconds | peak RSS MB | / FP16 size |\n| --- | --- | --- | --- |")
    for name, seconds, peak in rows:
        print(f"| {name} | {seconds} | {peak:,} | {peak / fp16_mb:.2f} |")

if __name__ == "__main__":
    main()
