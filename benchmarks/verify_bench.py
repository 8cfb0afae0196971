"""Verify overhead and the strict emulation's speed.

    .venv/bin/python benchmarks/verify_bench.py [--samples 512] [--layers 4] [--strict-only | --amp-only]

1. A BERT (hidden 256, --layers layers, 128 tokens) converted by mpexport; `verify` on --samples samples.
   Reports verify's total wall time against the sum of raw backend inference time on the same batches
   (each backend run alone over the batches, nothing else), i.e. what metrics, batching, emulation
   building and reporting add.
2. The strict-fp16 emulation against onnx.reference (ONNX's reference evaluator, faithful but slow) on the
   bundled examples' mixed models (cuda-fp16 plans), 360 samples in one batch: time for each.
3. (--amp-only) the emulated torch-amp pass of a CUDA policy against a plain FP32 pass, BERT-base 64 x 64 tokens.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def overhead(samples: int, layers: int, root: Path) -> None:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    import mpexport
    from mpexport.backends.onnxruntime import OrtRunner
    from mpexport.backends.torch import TorchRunner
    from mpexport.base.specs import TensorSpec
    from mpexport.bundle.names import FP32_ONNX, MIXED_ONNX
    from mpexport.bundle.store import Bundle
    from mpexport.check.amp import TorchAmpRunner
    from mpexport.check.report import VerifyOptions
    from mpexport.commands.verify import verify
    from mpexport.data.open import load_validation_data
    from mpexport.graph.emulate import load_strict_emulation
    from mpexport.precision.options import PlanOptions
    from mpexport.sources.loading import load_model

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=256, num_hidden_layers=layers,
                                                     num_attention_heads=4, intermediate_size=1024)).eval()
    torch.save(model, root / "bert.pt")
    ids = np.random.default_rng(0).integers(0, 30000, (samples, 128))
    np.savez(root / "val.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    out = root / "out"
    mpexport.convert(root / "bert.pt", out=out, val_data=root / "val.npz", trust_pickle=True,
                     plan_options=PlanOptions(policy="cuda-fp16"), calibration_samples=64)
    options = VerifyOptions(batch_size=64)
    start = time.perf_counter()
    report = verify(out, options=options, trust_pickle=True)
    total = time.perf_counter() - start

    loaded = load_model(root / "bert.pt", trust_pickle=True)
    names = ["input_ids", "attention_mask"]
    data = load_validation_data(root / "val.npz")
    specs = [TensorSpec(name, "int64", ("batch", 128)) for name in names]
    batches = list(data.batches(64, inputs=specs))
    bundle = Bundle.open(out)
    runners = [TorchRunner(loaded.callable(), names), TorchAmpRunner(loaded, names, "cuda-fp16", batches[0]),
               OrtRunner(bundle.path(FP32_ONNX)), OrtRunner(bundle.path(MIXED_ONNX)),
               OrtRunner.from_model(load_strict_emulation(bundle.path(MIXED_ONNX)), out, name="strict-fp16")]
    raw = 0.0
    for runner in runners:
        start = time.perf_counter()
        for batch in batches:
            runner.run(batch)
        raw += time.perf_counter() - start
    print(f"verify on {report.samples} samples ({report.verdict}): {total:.1f} s total; raw inference of the "
          f"{len(runners)} backends on the same batches: {raw:.1f} s; ratio {total / raw:.2f}")


def strict_speed(root: Path) -> None:
    import mpexport
    import mpexport.precision.plan

    models = Path(__file__).resolve().parents[1] / "models"
    for example in ("digits_transformer", "digits_resnet"):
        out = root / example
        mpexport.convert(models / f"{example}.pt2", out=out, val_data=models / f"{example}.val.npz",
                         plan_options=mpexport.precision.plan.PlanOptions(policy="cuda-fp16"))
        feeds = {"pixels": np.load(models / f"{example}.val.npz")["pixels"]}
        _time_strict(example, out, feeds, root)


def _time_strict(example: str, out: Path, feeds: dict[str, np.ndarray], root: Path) -> None:
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    from mpexport.bundle.names import MIXED_ONNX
    from mpexport.bundle.store import Bundle
    from mpexport.graph.emulate import strict_emulation

    mixed = Bundle.open(out).path(MIXED_ONNX)
    strict = root / "strict.onnx"
    ir.save(strict_emulation(ir.load(str(mixed))), strict)
    session = ort.InferenceSession(str(strict), providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    start = time.perf_counter()
    for _ in range(10):
        session.run(None, feeds)
    emulated = (time.perf_counter() - start) / 10
    evaluator = ReferenceEvaluator(onnx.load(str(mixed)))
    start = time.perf_counter()
    evaluator.run(None, feeds)
    reference = time.perf_counter() - start
    print(f"{example}, {len(feeds['pixels'])} samples: strict-fp16 emulation {emulated * 1e3:.1f} ms, "
          f"onnx.reference on the mixed model {reference * 1e3:.0f} ms: {reference / emulated:.0f}x faster")


def amp_speed(repeats: int = 2) -> None:
    """The emulated torch-amp pass (cuda-fp16 without a GPU) against a plain FP32 pass of the same program:
    BERT-base (12 layers, hidden 768), 64 samples of 64 tokens."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from mpexport.check.amp import TorchAmpRunner
    from mpexport.sources.model import FORMAT_EXPORT, LoadedModel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.toy_models import TextLogits

    torch.manual_seed(0)
    model = TextLogits(BertForSequenceClassification(BertConfig()).eval())
    ids = np.random.default_rng(0).integers(1, 1000, (64, 64))
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    tensors = tuple(torch.from_numpy(array) for array in batch.values())
    dim = torch.export.Dim("batch")
    program = torch.export.export(model, tuple(t[:2] for t in tensors), dynamic_shapes=({0: dim}, {0: dim}))
    loaded = LoadedModel(format=FORMAT_EXPORT, path=Path("bert.pt2"), sha256="", program=program, positional=True)
    runner = TorchAmpRunner(loaded, list(batch), "cuda-fp16", batch)
    plain = program.module()
    for run in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            plain(*tensors)
        fp32 = time.perf_counter() - start
        start = time.perf_counter()
        runner.run(batch)
        emulated = time.perf_counter() - start
        print(f"BERT-base 64x64, run {run}: plain FP32 pass {fp32:.2f} s, emulated torch-amp (cuda-fp16) "
              f"{emulated:.2f} s: {emulated / fp32:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--strict-only", action="store_true", help="Only the strict-emulation timing.")
    parser.add_argument("--amp-only", action="store_true", help="Only the emulated torch-amp pass vs a plain one.")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.amp_only:
        amp_speed()
        return
    with tempfile.TemporaryDirectory() as folder:
        strict_speed(Path(folder))
        if not args.strict_only:
            overhead(args.samples, args.layers, Path(folder))


if __name__ == "__main__":
    main()
