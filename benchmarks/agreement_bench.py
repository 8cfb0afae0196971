"""Plan agreement: the same model planned from its `.pt2` (dynamo export, aten provenance) and from an ONNX exported
elsewhere (the TorchScript exporter: module scopes, no aten ops), per training policy.

    .venv/bin/python benchmarks/agreement_bench.py [--workdir DIR]

Models (random weights, no download): the bundled digits ResNet, and from transformers a tiny BERT (SDPA
attention), GPT-2, ViT, ResNet and Llama (tests/toy_models.py). For each: `mpexport convert` of the `.pt2`, of its
own FP32 ONNX (which keeps the dynamo exporter's metadata: must give exactly the `.pt2` plan) and of a TorchScript
exporter ONNX (opset 17); then for every policy the share of nodes (paired by module and op type) with the same
precision, how many were compared and how many could not be paired, and verify of the TorchScript ONNX's bundle
(onnx-fp32 as the reference). The digits transformer is left out: the TorchScript exporter cannot export
`nn.RMSNorm` (aten::rms_norm) at any opset it supports.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
POLICIES = ("cpu-fp16", "cpu-bf16", "cuda-fp16", "cuda-bf16")


def cases() -> list[tuple[str, torch.nn.Module, dict[str, np.ndarray], dict[str, dict[int, str]]]]:
    """(name, module, validation arrays, dynamic axes) per model."""
    from tests import toy_models

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, (16, 12))
    mask = np.ones_like(ids)
    mask[::3, 9:] = 0
    text = {"input_ids": ids, "attention_mask": mask}
    text_axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    images = {"pixel_values": rng.standard_normal((16, 3, 16, 16)).astype(np.float32)}
    image_axes = {"pixel_values": {0: "batch"}}
    with np.load(ROOT / "models" / "digits_resnet.val.npz") as data:
        digits = {"pixels": data["pixels"][:64]}
    sys.path.insert(0, str(ROOT / "models"))
    import train

    resnet = train.DigitsResNet()
    resnet.load_state_dict(torch.export.load(ROOT / "models" / "digits_resnet.pt2").state_dict, strict=False)
    return [("digits_resnet", resnet.eval(), digits, {"pixels": {0: "batch"}}),
            ("bert", toy_models.TextLogits(toy_models.build_bert()), text, text_axes),
            ("gpt2", toy_models.TextLogits(toy_models.build_gpt2()), text, text_axes),
            ("llama", toy_models.TextLogits(toy_models.build_llama()), text, text_axes),
            ("vit", toy_models.ImageLogits(toy_models.build_vit()), images, image_axes),
            ("hf_resnet", toy_models.ImageLogits(toy_models.build_hf_resnet()), images, image_axes)]


def measure(name: str, module: torch.nn.Module, arrays: dict[str, np.ndarray], axes: dict[str, dict[int, str]],
            root: Path) -> dict:
    import onnx_ir as ir

    import mpexport
    from mpexport.bundle.names import FP32_ONNX
    from mpexport.bundle.store import Bundle
    from mpexport.capture.provenance import read_provenance
    from mpexport.precision.agreement import plan_agreement
    from mpexport.precision.options import PlanOptions
    from mpexport.precision.plan import read_ranges
    from mpexport.precision.planner import make_plan

    np.savez(root / f"{name}.npz", **arrays)
    example = {key: torch.from_numpy(value[:2]) for key, value in arrays.items()}
    shared = {label: torch.export.Dim(label, min=2, max=64) if label != "batch" else torch.export.Dim("batch")
              for spec in axes.values() for label in spec.values()}
    program = torch.export.export(module, tuple(example.values()), dynamic_shapes=tuple(
        {axis: shared[label] for axis, label in spec.items()} for spec in axes.values()))
    torch.export.save(program, root / f"{name}.pt2")
    val = root / f"{name}.npz"
    record: dict = {}
    pt2_out, dyn_out, ts_out = root / f"{name}-pt2", root / f"{name}-dynamo-onnx", root / f"{name}-ts-onnx"
    mpexport.convert(root / f"{name}.pt2", out=pt2_out, val_data=val, force=True)
    mpexport.convert(pt2_out / "model.fp32.onnx", out=dyn_out, val_data=val, force=True)
    names = list(arrays)
    torch.onnx.export(module, tuple(example.values()), str(root / f"{name}.onnx"), dynamo=False, opset_version=17,
                      input_names=names, output_names=["output"], dynamic_axes={**axes, "output": {0: "batch"}})
    mpexport.convert(root / f"{name}.onnx", out=ts_out, val_data=val, force=True)
    report = mpexport.verify(ts_out)
    record["ts_onnx_verify"] = report.verdict

    def plan(out: Path, policy: str):
        bundle = Bundle.open(out)
        return make_plan(ir.load(str(bundle.path(FP32_ONNX))), read_provenance(bundle), PlanOptions(policy=policy),
                         read_ranges(bundle))

    for policy in POLICIES:
        reference, dynamo, scripted = plan(pt2_out, policy), plan(dyn_out, policy), plan(ts_out, policy)
        agreement = plan_agreement(reference, scripted)
        record[policy] = {"dynamo_onnx_identical": reference.precisions() == dynamo.precisions(),
                          **agreement.to_json()}
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--models", nargs="+")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="mpexport-agreement-"))
    root.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, module, arrays, axes in cases():
        if args.models and name not in args.models:
            continue
        try:
            results[name] = measure(name, module, arrays, axes, root)
        except Exception as exc:  # noqa: BLE001 - a benchmark reports what failed and goes on
            results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    print(json.dumps(results, indent=1))
    print("\n| model | policy | dynamo ONNX = .pt2 plan | TorchScript ONNX: agreed / compared | not paired | verify |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, record in results.items():
        if "error" in record:
            print(f"| {name} | - | - | {record['error']} | - | - |")
            continue
        for policy in POLICIES:
            row = record[policy]
            print(f"| {name} | {policy} | {row['dynamo_onnx_identical']} | {row['agreed']} / {row['compared']} "
                  f"({row['share']:.1%}) | {row['not_comparable']} | {record['ts_onnx_verify']} |")


if __name__ == "__main__":
    main()
