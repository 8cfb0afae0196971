"""GPU proof script: what this machine can check of mpexport's GPU path, in one short run.

    python scripts/gpu_check.py [--out gpu_check.json] [--cpu-only]

Runs as it is on a machine with CUDA torch (nothing fetched; the project's code travels with the tree):

1. the policy oracle with **real CUDA autocast**: for the bundled examples and tiny transformers models
   (BERT, Llama) built from their configs, the ``cuda-fp16`` and ``cuda-bf16`` plans must agree node by node
   with the dtypes ``torch.autocast("cuda", ...)`` produces. Without a GPU the same comparison runs on the
   installed torch's CUDA autocast kernels with fake CUDA tensors (``--cpu-only`` forces that), and the
   summary says which one ran;
2. TensorRT: reports whether it is importable (engine building is not part of mpexport yet).

Prints a one-screen summary and writes it as JSON. Exit 0 when every comparison agreed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POLICIES = {"cuda-fp16": torch.float16, "cuda-bf16": torch.bfloat16}


def _text_model(name: str) -> torch.nn.Module:
    from tests.toy_models import build_bert, build_llama

    return {"bert": build_bert, "llama": build_llama}[name]()


def _cases(tmp: Path) -> list[dict[str, Any]]:
    """(name, .pt2, validation .npz, inputs for the oracle, positional?) for every model checked."""
    cases = []
    for example in ("digits_resnet", "digits_transformer"):
        val = ROOT / "models" / f"{example}.val.npz"
        with np.load(val) as data:
            inputs = {"pixels": torch.from_numpy(data["pixels"][:8])}
        cases.append({"name": example, "pt2": ROOT / "models" / f"{example}.pt2", "val": val, "inputs": inputs,
                      "positional": True})
    for name, vocab in (("bert", 200), ("llama", 100)):
        model = _text_model(name)
        ids = torch.randint(1, vocab, (8, 12), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[::2, 9:] = 0
        batch, seq = torch.export.Dim("batch", min=1, max=256), torch.export.Dim("seq", min=2, max=64)
        program = torch.export.export(model, (), {"input_ids": ids, "attention_mask": mask},
                                      dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                      "attention_mask": {0: batch, 1: seq}})
        torch.export.save(program, tmp / f"{name}.pt2")
        np.savez(tmp / f"{name}.npz", input_ids=ids.numpy(), attention_mask=mask.numpy())
        cases.append({"name": name, "pt2": tmp / f"{name}.pt2", "val": tmp / f"{name}.npz",
                      "inputs": {"input_ids": ids, "attention_mask": mask}, "positional": False})
    return cases


class _fake_cuda_only:
    """Hide a present GPU from the oracle (``--cpu-only``) so it uses fake CUDA tensors."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.saved = torch.cuda.is_available

    def __enter__(self) -> None:
        if self.active:
            torch.cuda.is_available = lambda: False  # type: ignore[method-assign]

    def __exit__(self, *exc_info: object) -> None:
        torch.cuda.is_available = self.saved  # type: ignore[method-assign]


def oracle_check(cpu_only: bool) -> dict[str, Any]:
    """Plan vs CUDA autocast for every case and both CUDA policies."""
    import onnx_ir as ir

    import mpexport
    from mpexport import provenance
    from mpexport.oracle import compare_with_plan, observe_autocast
    from mpexport.plan import PlanOptions, make_plan

    real = torch.cuda.is_available() and not cpu_only
    results = []
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        for case in _cases(tmp):
            out = tmp / f"out-{case['name']}"
            mpexport.convert(case["pt2"], out=out, val_data=case["val"])
            model = ir.load(out / "model.fp32.onnx")
            records = provenance.from_json(json.loads((out / "provenance.json").read_text()))
            program = torch.export.load(case["pt2"])
            inputs = case["inputs"]
            args, kwargs = (tuple(inputs.values()), {}) if case["positional"] else ((), inputs)
            for policy, dtype in POLICIES.items():
                if real and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
                    continue
                plan = make_plan(model, records, PlanOptions(policy=policy))
                with _fake_cuda_only(not real):
                    observed = observe_autocast(program, args, kwargs, "cuda", dtype)
                agreement = compare_with_plan(plan, observed)
                results.append({"model": case["name"], "policy": policy, "checked": agreement["checked"],
                                "agreed": agreement["agreed"], "kernel_internal": agreement["kernel_internal"],
                                "unobserved": len(agreement["unobserved"]),
                                "mismatches": agreement["mismatches"][:5]})
    return {"autocast": "real CUDA" if real else "CUDA autocast kernels on fake CUDA tensors (no GPU used)",
            "results": results,
            "all_agree": all(r["checked"] == r["agreed"] and not r["unobserved"] for r in results)}


def tensorrt_status() -> dict[str, Any]:
    """Whether TensorRT imports here, and its version."""
    try:
        import tensorrt
    except ImportError as exc:
        return {"importable": False, "why": str(exc), "engines": "skipped: TensorRT is not installed"}
    return {"importable": True, "version": tensorrt.__version__,
            "engines": "skipped: mpexport does not build engines yet"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="Where to write the JSON summary.")
    parser.add_argument("--cpu-only", action="store_true", help="Do not use a GPU even if one exists.")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    summary: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.cuda.is_available(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "oracle": oracle_check(args.cpu_only),
        "tensorrt": tensorrt_status(),
    }
    summary["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"machine: torch {summary['machine']['torch']}, GPU {summary['machine']['gpu'] or 'none'}")
    print(f"oracle ({summary['oracle']['autocast']}):")
    for row in summary["oracle"]["results"]:
        verdict = "ok" if row["checked"] == row["agreed"] and not row["unobserved"] else "MISMATCH"
        print(f"  {row['model']:<20} {row['policy']:<10} {row['agreed']}/{row['checked']} nodes agree, "
              f"{row['kernel_internal']} kernel-internal  {verdict}")
    print(f"tensorrt: {summary['tensorrt']['engines']}")
    print(f"done in {summary['seconds']} s; summary in {args.out}")
    return 0 if summary["oracle"]["all_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
