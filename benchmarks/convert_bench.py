"""The plan + rewrite step of mpexport against onnxconverter-common and ModelOpt AutoCast, on BERT-base.

    pip install onnxconverter-common "nvidia-modelopt[onnx]"   # the baselines (not mpexport dependencies)
    python benchmarks/convert_bench.py [--layers 12] [--workdir DIR]

BERT-base is built from its config (no download), exported once by `mpexport convert` (FP32 ONNX +
provenance). Then each converter turns that FP32 ONNX into a mixed FP16 model in its own process, timed
from reading the ONNX file to writing the result, with its peak RSS:

Times exclude each converter's imports; peak RSS is the converter process's own.

* mpexport: plan (cuda-fp16 policy, no calibration) + rewrite + save;
* onnxconverter-common: ``float16.convert_float_to_float16(keep_io_types=True)`` + save;
* ModelOpt AutoCast: ``convert_to_mixed_precision(keep_io_types=True)`` (random calibration data, its
  default) + save.

Each result is then loaded in ONNX Runtime and run once on a batch of 2 x 128 tokens.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

CONVERTERS = ("mpexport", "onnxconverter-common", "modelopt-autocast")


def export_bert(workdir: Path, layers: int) -> Path:
    """BERT-base classifier from its config, converted by mpexport; returns the output directory."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    import mpexport
    from mpexport.plan import PlanOptions

    out = workdir / "bert"
    if (out / "manifest.json").exists():
        return out
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_hidden_layers=layers)).eval()
    torch.save(model, workdir / "bert.pt")
    ids = np.random.default_rng(0).integers(0, 30000, (4, 128))
    np.savez(workdir / "val.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    mpexport.convert(workdir / "bert.pt", out=out, val_data=workdir / "val.npz", trust_pickle=True,
                     plan_options=PlanOptions(policy="cuda-fp16", range_check=False), force=True)
    return out


def convert_one(name: str, source: Path, target: Path) -> dict:
    """Run one converter in this process; returns seconds (imports excluded) and peak RSS (MB)."""
    warnings.simplefilter("ignore")
    if name == "mpexport":
        import onnx_ir as ir

        from mpexport.bundle import FP32_ONNX, Bundle
        from mpexport.onnxfile import save_model
        from mpexport.plan import PlanOptions, make_plan
        from mpexport.rewrite import apply_plan

        start = time.perf_counter()
        bundle = Bundle.open(source)
        model = ir.load(str(bundle.path(FP32_ONNX)))
        plan = make_plan(model, bundle.provenance(), PlanOptions(policy="cuda-fp16", range_check=False))
        apply_plan(model, plan.precisions())
        save_model(model, target)
    elif name == "onnxconverter-common":
        import onnx
        from onnxconverter_common import float16

        start = time.perf_counter()
        model = onnx.load(str(source / "model.fp32.onnx"))
        onnx.save(float16.convert_float_to_float16(model, keep_io_types=True), str(target))
    else:
        import onnx
        from modelopt.onnx.autocast import convert_to_mixed_precision

        start = time.perf_counter()
        onnx.save(convert_to_mixed_precision(str(source / "model.fp32.onnx"), keep_io_types=True), str(target))
    seconds = time.perf_counter() - start
    peak_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"seconds": round(seconds, 2), "peak_rss_mb": peak_mb}


def runs_in_ort(path: Path) -> str:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ids = np.random.default_rng(1).integers(0, 30000, (2, 128))
        feeds = {value.name: (ids if value.name == "input_ids" else np.ones_like(ids))
                 for value in session.get_inputs()}
        session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - the benchmark reports what failed
        return f"fails: {str(exc).splitlines()[0][:120]}"
    return "runs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--child", nargs=3, metavar=("NAME", "SOURCE", "TARGET"), help=argparse.SUPPRESS)
    parser.add_argument("--export", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.export:
        export_bert(args.export, args.layers)
        return
    if args.child:
        name, source, target = args.child
        print(json.dumps(convert_one(name, Path(source), Path(target))))
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mpexport-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # The export runs in its own process: a child inherits its parent's peak RSS, so the parent stays small.
    subprocess.run([sys.executable, __file__, "--export", str(workdir), "--layers", str(args.layers)], check=True,
                   capture_output=True)
    source = workdir / "bert"
    rows = []
    for name in CONVERTERS:
        target = workdir / f"{name}.onnx"
        process = subprocess.run([sys.executable, __file__, "--child", name, str(source), str(target)],
                                 capture_output=True, text=True)
        if process.returncode != 0:
            rows.append((name, None, None, f"converter failed: {process.stderr.strip().splitlines()[-1][:120]}"))
            continue
        result = json.loads(process.stdout.strip().splitlines()[-1])
        rows.append((name, result["seconds"], result["peak_rss_mb"], runs_in_ort(target)))
    print(f"BERT-base ({args.layers} layers), FP32 ONNX {(source / 'model.fp32.onnx').stat().st_size / 1e6:.0f} MB")
    print(f"{'converter':<22} {'seconds':>8} {'peak RSS MB':>12}  ONNX Runtime")
    for name, seconds, rss, status in rows:
        shown_seconds = seconds if seconds is not None else "-"
        shown_rss = rss if rss is not None else "-"
        print(f"{name:<22} {shown_seconds:>8} {shown_rss:>12}  {status}")


if __name__ == "__main__":
    main()
