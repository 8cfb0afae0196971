"""Planning time against export time on BERT-base (built from its config, no download).

    .venv/bin/python benchmarks/plan_bench.py [--layers 12] [--samples 16]

Prints the export time, the plan time without and with the range rule (calibration on --samples
sequences of 128 tokens), and the node count.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from transformers import BertConfig, BertForSequenceClassification

    from mpexport.base.specs import TensorSpec
    from mpexport.capture.export import ExportRequest, export_onnx
    from mpexport.capture.provenance import collect_provenance
    from mpexport.precision.options import PlanOptions
    from mpexport.precision.planner import make_plan
    from mpexport.precision.ranges import collect_ranges
    from mpexport.sources.loading import load_model

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_hidden_layers=args.layers)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bert.ckpt"
        torch.save(model, path)
        loaded = load_model(path, trust_pickle=True)
        specs = [TensorSpec(name, "int64", ("batch", "seq")) for name in ("input_ids", "attention_mask")]
        ids = torch.randint(0, 30000, (2, 128))
        request = ExportRequest(loaded, specs, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ["logits"])
        start = time.perf_counter()
        exported = export_onnx(request)
        export_seconds = time.perf_counter() - start
        records = collect_provenance(exported.model, exported.provenance_kind, exported.facts)
        start = time.perf_counter()
        plan = make_plan(exported.model, records, PlanOptions(policy="cuda-fp16"))
        plan_seconds = time.perf_counter() - start
        import onnx_ir as ir

        onnx_path = Path(tmp) / "bert.onnx"
        ir.save(exported.model, onnx_path)
        rng = np.random.default_rng(0)
        batches = [{"input_ids": rng.integers(0, 30000, (8, 128)), "attention_mask": np.ones((8, 128), np.int64)}
                   for _ in range(max(1, args.samples // 8))]
        start = time.perf_counter()
        ranges = collect_ranges(onnx_path, batches)
        ranged = make_plan(exported.model, records, PlanOptions(policy="cuda-fp16"), ranges)
        range_seconds = time.perf_counter() - start
    print(f"BERT-base ({args.layers} layers), {len(plan.nodes)} ONNX nodes")
    print(f"export (torch.export + ONNX translation + optimize): {export_seconds:.2f} s")
    print(f"plan without range rule:                            {plan_seconds:.3f} s")
    print(f"plan with range rule ({ranges.samples} samples x 128 tokens):       {range_seconds:.2f} s")
    print(f"precision: {ranged.summary()['precision']}, low-precision MAC share "
          f"{ranged.summary()['macs']['low_precision_share']}")


if __name__ == "__main__":
    main()
