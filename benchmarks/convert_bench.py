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

``--onnx-in`` measures what a user with an FP32 ONNX from elsewhere runs: a TorchScript-exporter ONNX (opset 17, the
file Optimum and older pipelines produce) of BERT-base (``--model bert-base``) or of a GPT-2-large-sized decoder
(``--model gpt2-large``: 774 M parameters, 3.1 GB of FP32 weights in external data). Each converter takes that file
in its own process: ``mpexport.convert(model.onnx)`` end to end (read and check, plan by op types and patterns, write,
lint; no validation data, so no calibration), onnxconverter-common and ModelOpt AutoCast as above. Then, each in its
own process: does ONNX Runtime load and run the result, and its strict-FP16 parity against the FP32 ONNX on 2 x 128
tokens (every FP16 node's result rounded to FP16, mpexport's strict emulation, so that ONNX Runtime's CPU kernels
computing in FP32 hide nothing): largest error relative to the output's scale, cosine, non-finite values.

    python benchmarks/convert_bench.py --onnx-in --model bert-base [--workdir DIR] \
        [--python onnxconverter-common=/path/to/venv/bin/python] [--python modelopt-autocast=...]

``--python`` runs a converter with another interpreter (ModelOpt installs onnxruntime-gpu, which cannot share an
environment with onnxruntime); the parity checks run with this one.
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
TOKENS = np.random.default_rng(1).integers(0, 30000, (2, 128))


def export_bert(workdir: Path, layers: int) -> Path:
    """BERT-base classifier from its config, converted by mpexport; returns the output directory."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    import mpexport
    from mpexport.precision.options import PlanOptions

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
    from mpexport.capture.provenance import read_provenance
    warnings.simplefilter("ignore")
    if name == "mpexport":
        import onnx_ir as ir

        from mpexport.bundle.names import FP32_ONNX
        from mpexport.bundle.store import Bundle
        from mpexport.graph.onnxfile import save_model
        from mpexport.graph.rewrite import apply_plan
        from mpexport.precision.options import PlanOptions
        from mpexport.precision.planner import make_plan

        start = time.perf_counter()
        bundle = Bundle.open(source)
        model = ir.load(str(bundle.path(FP32_ONNX)))
        plan = make_plan(model, read_provenance(bundle), PlanOptions(policy="cuda-fp16", range_check=False))
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


def export_onnx_in(workdir: Path, model_name: str) -> Path:
    """The TorchScript exporter's FP32 ONNX of ``model_name`` (random weights), with external data above 2 GB."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.toy_models import TextLogits

    path = workdir / model_name / "model.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if model_name == "bert-base":
        model = BertForSequenceClassification(BertConfig()).eval()
    else:
        model = GPT2LMHeadModel(GPT2Config(n_layer=36, n_embd=1280, n_head=20, use_cache=False)).eval()
    ids = torch.from_numpy(TOKENS[:2])
    torch.onnx.export(TextLogits(model), (ids, torch.ones_like(ids)), str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                    "logits": {0: "batch"}})
    return path


def convert_onnx_in(name: str, source: Path, target: Path) -> dict:
    """Convert the FP32 ONNX file ``source`` with one converter in this process; the mixed model lands at
    ``target`` (mpexport: its bundle directory). Seconds exclude imports; peak RSS is this process's."""
    warnings.simplefilter("ignore")
    if name == "mpexport":
        from mpexport.commands.convert import convert

        start = time.perf_counter()
        convert(source, out=target, force=True)
    else:
        import onnx

        start = time.perf_counter()
        if name == "onnxconverter-common":
            from onnxconverter_common import float16

            converted = float16.convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        else:
            from modelopt.onnx.autocast import convert_to_mixed_precision

            converted = convert_to_mixed_precision(str(source), keep_io_types=True)
        external = converted.ByteSize() > (1 << 31) - (1 << 26)
        onnx.save(converted, str(target), save_as_external_data=external, location=f"{target.name}.data")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if name == "mpexport":  # its stages reset the kernel's high-water mark (to measure each): take theirs too
        stages = json.loads((target / "manifest.json").read_text())["stages"]["convert"]
        peak = max([peak, *(stage["peak_rss_mb"] for stage in stages)])
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak)}


def strict_parity(fp32: Path, mixed: Path) -> dict:
    """ONNX Runtime loads and runs ``mixed``; its strict-FP16 emulation against the FP32 model on 2 x 128 tokens."""
    import onnx_ir as ir
    import onnxruntime as ort

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mpexport.backends.onnxruntime import OrtRunner
    from mpexport.graph.emulate import strict_emulation

    feeds = {"input_ids": TOKENS[:2], "attention_mask": np.ones_like(TOKENS[:2])}
    try:
        session = ort.InferenceSession(str(mixed), providers=["CPUExecutionProvider"])
        session.run(None, {value.name: feeds[value.name] for value in session.get_inputs()})
    except Exception as exc:  # noqa: BLE001 - the benchmark reports what failed
        return {"ort": f"fails: {str(exc).splitlines()[0][:120]}"}
    del session
    (expected,) = OrtRunner(fp32, name="fp32").run(feeds)
    try:
        emulated = OrtRunner.from_model(strict_emulation(ir.load(str(mixed))), mixed.parent, name="strict")
        (actual,) = emulated.run(feeds)
    except Exception as exc:  # noqa: BLE001
        return {"ort": "runs", "strict": f"cannot emulate: {str(exc).splitlines()[0][:120]}"}
    want, have = expected.astype(np.float64).ravel(), actual.astype(np.float64).ravel()
    finite = np.isfinite(have)
    error = float(np.abs(np.where(finite, want - have, 0)).max() / np.abs(want).max())
    cosine = float(np.dot(want, np.where(finite, have, 0)) / (np.linalg.norm(want) * np.linalg.norm(
        np.where(finite, have, 0)) or 1.0))
    return {"ort": "runs", "strict": "ok", "relative_error": round(error, 5), "cosine": round(cosine, 6),
            "non_finite": int((~finite).sum())}


def onnx_in(workdir: Path, model_name: str, pythons: dict[str, str]) -> None:
    """Every converter on the same FP32 ONNX, each in its own process (``pythons``: the interpreter per converter,
    default this one); a table."""
    subprocess.run([sys.executable, __file__, "--export-onnx", str(workdir), "--model", model_name], check=True,
                   capture_output=True)
    source = workdir / model_name / "model.onnx"
    weights = sum(path.stat().st_size for path in source.parent.iterdir() if path.is_file())
    rows = []
    for name in CONVERTERS:
        target = workdir / model_name / (name if name == "mpexport" else f"{name}.onnx")
        process = subprocess.run([pythons.get(name, sys.executable), __file__, "--onnx-child", name, str(source),
                                  str(target)], capture_output=True, text=True)
        if process.returncode != 0:
            lines = (process.stderr.strip() or "no output").splitlines()
            rows.append({"converter": name, "error": lines[-1][:160]})
            continue
        result = json.loads(process.stdout.strip().splitlines()[-1])
        mixed = target / "model.mixed.onnx" if name == "mpexport" else target
        check = subprocess.run([sys.executable, __file__, "--parity", str(source), str(mixed)], capture_output=True,
                               text=True)
        parity = json.loads(check.stdout.strip().splitlines()[-1]) if check.returncode == 0 else \
            {"ort": f"check failed: {(check.stderr.strip() or '?').splitlines()[-1][:120]}"}
        rows.append({"converter": name, **result, **parity})
    print(json.dumps(rows, indent=1))
    print(f"\n{model_name}: TorchScript-exporter FP32 ONNX, {weights / 1e6:,.0f} MB")
    print("| converter | seconds | peak RSS MB | ONNX Runtime | strict-FP16 rel. error | cosine | non-finite |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        if "error" in row:
            print(f"| {row['converter']} | - | - | converter failed: {row['error']} | - | - | - |")
            continue
        print(f"| {row['converter']} | {row['seconds']} | {row['peak_rss_mb']:,} | {row['ort']} | "
              f"{row.get('relative_error', row.get('strict', '-'))} | {row.get('cosine', '-')} | "
              f"{row.get('non_finite', '-')} |")


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
    parser.add_argument("--onnx-in", action="store_true", help="convert an FP32 ONNX from elsewhere (see above)")
    parser.add_argument("--model", choices=("bert-base", "gpt2-large"), default="bert-base")
    parser.add_argument("--export-onnx", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--onnx-child", nargs=3, metavar=("NAME", "SOURCE", "TARGET"), help=argparse.SUPPRESS)
    parser.add_argument("--python", action="append", default=[], metavar="CONVERTER=PYTHON",
                        help="run CONVERTER's process with another interpreter")
    parser.add_argument("--parity", nargs=2, metavar=("FP32", "MIXED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.export_onnx:
        export_onnx_in(args.export_onnx, args.model)
        return
    if args.onnx_child:
        name, source, target = args.onnx_child
        print(json.dumps(convert_onnx_in(name, Path(source), Path(target))))
        return
    if args.parity:
        print(json.dumps(strict_parity(Path(args.parity[0]), Path(args.parity[1]))))
        return
    if args.export:
        export_bert(args.export, args.layers)
        return
    if args.child:
        name, source, target = args.child
        print(json.dumps(convert_one(name, Path(source), Path(target))))
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mpexport-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.onnx_in:
        onnx_in(workdir, args.model, dict(item.split("=", 1) for item in args.python))
        return
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
