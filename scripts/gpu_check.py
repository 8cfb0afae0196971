"""GPU proof script: what this machine can check of mpexport's GPU path, in one short run.

    python scripts/gpu_check.py [--out gpu_check.json] [--cpu-only]

Runs as it is on a machine with CUDA torch (nothing fetched; the project's code travels with the tree):

1. the policy oracle with **real CUDA autocast**: for the bundled examples and tiny transformers models
   (BERT, Llama) built from their configs, the ``cuda-fp16`` and ``cuda-bf16`` plans must agree node by node
   with the dtypes ``torch.autocast("cuda", ...)`` produces. Without a GPU the same comparison runs on the
   installed torch's CUDA autocast kernels with fake CUDA tensors (``--cpu-only`` forces that), and the
   summary says which one ran;
2. numerics: for the bundled examples converted under cuda-fp16, the errors against FP32 of torch-amp (real
   CUDA autocast on a GPU; the CPU emulation otherwise) next to those of the CPU strict-fp16 emulation, so how
   well the CPU gate predicts GPU FP16 numerics is a number;
3. convert's data pass: the PyTorch FP32 reference runs on the GPU where one exists (TF32 off), and the
   export check must still pass against ONNX Runtime's CPU FP32;
4. SDPA: the mean error of the plan's attention rule (scores rounded once, softmax FP32) next to the CUDA kernels'
   and the CUDA math path's under CUDA autocast (the CPU paths are measured by the test suite);
5. TensorRT: where it imports and a GPU exists, builds each example's engine (`--engine on`), verifies it (the
   engine's layers checked against the plan, the engine as a verify backend) and packages the bundle (the Triton
   repository's ``<name>_trt`` model must hold the very engine verify ran): convert -> verify -> package with the real
   engine; else says why it skipped.

Prints a one-screen summary and writes it as JSON. Exit 0 when every oracle comparison agreed, every export
check passed, every built engine matched its plan and went through verify (run by TensorRT itself, not a stand-in)
into its repository, 1 otherwise (verify verdicts are reported, not gated: they measure; a bundle that failed verify
is packaged with ``allow_unverified``, and the summary says so).
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


EXAMPLES = ("digits_resnet", "digits_transformer")
TEXT_MODELS = (("bert", 200), ("llama", 100))
MODELS = (*EXAMPLES, *(name for name, _ in TEXT_MODELS))


def _cases(tmp: Path, models: tuple[str, ...] = MODELS) -> list[dict[str, Any]]:
    """(name, .pt2, validation .npz, inputs for the oracle, positional?) for every model checked."""
    cases = []
    for example in (name for name in EXAMPLES if name in models):
        val = ROOT / "models" / f"{example}.val.npz"
        with np.load(val) as data:
            inputs = {"pixels": torch.from_numpy(data["pixels"][:8])}
        cases.append({"name": example, "pt2": ROOT / "models" / f"{example}.pt2", "val": val, "inputs": inputs,
                      "positional": True})
    for name, vocab in ((name, vocab) for name, vocab in TEXT_MODELS if name in models):
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


def oracle_check(cpu_only: bool, models: tuple[str, ...] = MODELS) -> dict[str, Any]:
    """Plan vs CUDA autocast for every case and both CUDA policies."""
    import onnx_ir as ir

    import mpexport
    from mpexport.bundle.names import FP32_ONNX, PROVENANCE
    from mpexport.bundle.store import Bundle
    from mpexport.capture.provenance import read_provenance
    from mpexport.precision.options import PlanOptions
    from mpexport.precision.oracle import compare_with_plan, observe_autocast
    from mpexport.precision.planner import make_plan

    real = torch.cuda.is_available() and not cpu_only
    results = []
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        for case in _cases(tmp, models):
            out = tmp / f"out-{case['name']}"
            mpexport.convert(case["pt2"], out=out, val_data=case["val"])
            bundle = Bundle.open(out, uses=(FP32_ONNX, PROVENANCE))
            model = ir.load(bundle.path(FP32_ONNX))
            records = read_provenance(bundle)
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


def numerics_and_engines(cpu_only: bool,
                         models: tuple[str, ...] = MODELS) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per bundled example (cuda-fp16 plan): torch-amp vs strict-fp16 errors, and the engine where possible."""
    import mpexport
    from mpexport.commands.verify import verify
    from mpexport.deploy.tensorrt import tensorrt_status
    from mpexport.precision.options import PlanOptions

    status = tensorrt_status()
    build = status.available and not cpu_only
    rows = []
    with tempfile.TemporaryDirectory() as folder, _fake_cuda_only(cpu_only):
        for example in (name for name in EXAMPLES if name in models):
            out = Path(folder) / example
            val = ROOT / "models" / f"{example}.val.npz"
            result = mpexport.convert(ROOT / "models" / f"{example}.pt2", out=out, val_data=val,
                                      plan_options=PlanOptions(policy="cuda-fp16"), engine="on" if build else "off")
            report = verify(out, write=build)  # package reads the verdict written
            metrics = {name: outputs["output"].to_json() for name, outputs in report.metrics.items()}
            row = {"model": example, "verdict": report.verdict,
                   "torch_amp": {key: metrics["torch-amp"][key] for key in ("max_abs", "p99_abs", "min_cosine")},
                   "strict_fp16": {key: metrics["strict-fp16"][key] for key in ("max_abs", "p99_abs", "min_cosine")},
                   "torch_amp_mode": report.backends["torch-amp"].get("mode"),
                   "export_check": {"reference": result.manifest.export_check.comparison["reference"],
                                    "passed": result.manifest.export_check.passed,
                                    "seconds": next(stage.seconds for stage in result.manifest.stages["convert"]
                                                    if stage.stage == "data pass")}}
            if build:
                row["engine"] = result.manifest.engine.check
                row["tensorrt"] = {key: metrics["tensorrt"][key] for key in ("max_abs", "min_cosine")} \
                    if "tensorrt" in metrics else None  # None: the backend failed (engine_path says why)
                row["engine_path"] = engine_path(out, Path(folder) / f"{example}-repo", example, report)
            rows.append(row)
    engines = {"status": status.to_json(),
               "engines": "built, verified and packaged" if build else
               f"skipped: {status.why or 'CPU-only mode'}"}
    return rows, engines


def engine_path(out: Path, repository: Path, name: str, report: Any) -> dict[str, Any]:
    """The last step of convert -> verify -> package with a real engine: the Triton repository's ``<name>_trt``
    model holds the engine verify ran, named for this GPU's compute capability. ``ok`` when TensorRT itself (no
    stand-in) ran in verify and the packaged plan is the bundle's engine, byte for byte."""
    from mpexport.base.errors import MpexportError
    from mpexport.commands.package import package

    backend = report.backends.get("tensorrt", {})
    row = {"tensorrt_backend": backend.get("state"), "why": backend.get("why"), "mode": backend.get("mode")}
    try:
        result = package(out, repository, allow_unverified=report.verdict != "pass")
    except MpexportError as exc:
        return {**row, "models": {}, "plan": None, "package_error": exc.message, "ok": False}
    plans = sorted((repository / f"{name}_trt" / "1").glob("model_sm*.plan"))
    same = len(plans) == 1 and plans[0].read_bytes() == (out / "model.plan").read_bytes()
    return {**row, "models": result.models, "plan": plans[0].name if plans else None, "plan_is_the_engine": same,
            "notes": result.notes, "ok": backend.get("state") == "ran" and not backend.get("mode") and same}


class _Attention(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def sdpa_kernels(cpu_only: bool) -> dict[str, Any]:
    """Mean error against FP64 of the plan's SDPA rule (the strict emulation of the mixed model, on the CPU) next to
    the CUDA kernels under CUDA autocast (default backend and the math path), per low type."""
    import mpexport
    from mpexport.backends.onnxruntime import OrtRunner
    from mpexport.bundle.names import MIXED_ONNX
    from mpexport.bundle.store import Bundle
    from mpexport.graph.emulate import load_strict_emulation
    from mpexport.precision.options import PlanOptions

    if cpu_only or not torch.cuda.is_available():
        return {"skipped": "no GPU: the CPU paths are measured by test_sdpa_kernel_rule_against_the_cpu_autocast_paths"}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    generator = torch.Generator().manual_seed(0)
    q, k, v = (3 * torch.randn(8, 4, 64, 32, generator=generator) for _ in range(3))
    reference = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        program = torch.export.export(_Attention(), (q[:2], k[:2], v[:2]),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},) * 3)
        torch.export.save(program, root / "attention.pt2")
        np.savez(root / "val.npz", q=q.numpy(), k=k.numpy(), v=v.numpy())
        for low, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            out = root / low
            mpexport.convert(root / "attention.pt2", out=out, val_data=root / "val.npz", engine="off",
                             plan_options=PlanOptions(policy=f"cuda-{low}", range_check=False))
            bundle = Bundle.open(out)
            strict = OrtRunner.from_model(load_strict_emulation(bundle.path(MIXED_ONNX)), out, name="strict")
            (planned,) = strict.run({"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})
            row = {"plan_strict_emulation": float(np.abs(planned - reference.numpy()).mean())}
            cuda = [tensor.cuda() for tensor in (q, k, v)]
            with torch.autocast("cuda", dtype=dtype):
                row["cuda_default_kernel"] = _mean_error(cuda, reference)
                with sdpa_kernel(SDPBackend.MATH):
                    row["cuda_math_path"] = _mean_error(cuda, reference)
            rows[low] = row
    return rows


def _mean_error(inputs: list[torch.Tensor], reference: torch.Tensor) -> float:
    result = torch.nn.functional.scaled_dot_product_attention(*inputs)
    return float((result.float().cpu() - reference).abs().mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="Where to write the JSON summary.")
    parser.add_argument("--cpu-only", action="store_true", help="Do not use a GPU even if one exists.")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"Comma-separated models to check (default: all of {', '.join(MODELS)}).")
    args = parser.parse_args()
    models = tuple(name.strip() for name in args.models.split(",") if name.strip())
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    summary: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.cuda.is_available(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "oracle": oracle_check(args.cpu_only, models),
    }
    summary["numerics"], summary["tensorrt"] = numerics_and_engines(args.cpu_only, models)
    summary["sdpa"] = sdpa_kernels(args.cpu_only)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"machine: torch {summary['machine']['torch']}, GPU {summary['machine']['gpu'] or 'none'}")
    print(f"oracle ({summary['oracle']['autocast']}):")
    for row in summary["oracle"]["results"]:
        verdict = "ok" if row["checked"] == row["agreed"] and not row["unobserved"] else "MISMATCH"
        print(f"  {row['model']:<20} {row['policy']:<10} {row['agreed']}/{row['checked']} nodes agree, "
              f"{row['kernel_internal']} kernel-internal  {verdict}")
    print("numerics vs FP32 (cuda-fp16 plan): torch-amp | strict-fp16 emulation")
    for row in summary["numerics"]:
        amp, strict = row["torch_amp"], row["strict_fp16"]
        print(f"  {row['model']:<20} max abs {amp['max_abs']} | {strict['max_abs']}, min cosine {amp['min_cosine']} | "
              f"{strict['min_cosine']}  ({row['torch_amp_mode']}; verify {row['verdict']})")
        check = row["export_check"]
        print(f"  {'':<20} convert's export check against {check['reference']}: "
              f"{'pass' if check['passed'] else 'FAIL'} ({check['seconds']} s data pass)")
    print(f"sdpa (mean error vs FP64): {json.dumps(summary['sdpa'])}")
    print(f"tensorrt: {summary['tensorrt']['engines']}")
    for row in (row for row in summary["numerics"] if "engine_path" in row):
        path = row["engine_path"]
        print(f"  {row['model']:<20} engine check {'ok' if row['engine'].get('ok') else 'MISMATCH'}; verify: tensorrt "
              f"{path['tensorrt_backend']}{' (' + path['why'] + ')' if path['why'] else ''}, {row['tensorrt']}; "
              f"package: {', '.join(path['models']) or path.get('package_error')} ({path['plan']}); "
              f"{path['mode'] or 'TensorRT'}  {'ok' if path['ok'] else 'FAIL'}")
    print(f"done in {summary['seconds']} s; summary in {args.out}")
    engines_ok = all(row.get("engine", {}).get("ok", True) and row.get("engine_path", {}).get("ok", True)
                     for row in summary["numerics"])
    checks_ok = all(row["export_check"]["passed"] for row in summary["numerics"])
    return 0 if summary["oracle"]["all_agree"] and engines_ok and checks_ok else 1


if __name__ == "__main__":
    sys.exit(main())
