"""The precision plan: node-by-node agreement with real autocast, the cuda-fp16 rules, regions, the range
rule, overrides, determinism and `mpexport inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

import mpexport
from mpexport.bundle.names import FP32_ONNX
from mpexport.bundle.store import Bundle
from mpexport.capture.provenance import read_provenance
from mpexport.precision.options import Overrides, PlanOptions
from mpexport.precision.oracle import compare_with_plan, observe_autocast
from mpexport.precision.plan import read_plan
from mpexport.precision.planner import make_plan
from tests.helpers import MODELS, REPO, assert_bad_input
from tests.toy_models import build_fp32_head, build_outliers

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
POLICIES = ["cpu-fp16", "cpu-bf16", "cuda-fp16", "cuda-bf16"]


def converted(tmp_path: Path, model: Path, val: Path, **options) -> Path:
    out = tmp_path / model.stem
    mpexport.convert(model, out=out, val_data=val, **options)
    return out


def plan_for(out: Path, policy: str, **options) -> mpexport.precision.plan.PrecisionPlan:
    bundle = Bundle.open(out)
    return make_plan(ir.load(bundle.path(FP32_ONNX)), read_provenance(bundle), PlanOptions(policy=policy, **options))


def oracle_inputs(val: Path, names: list[str], count: int = 4) -> dict[str, torch.Tensor]:
    with np.load(val) as data:
        return {name: torch.from_numpy(data[name][:count]) for name in names}


def assert_oracle_agrees(out: Path, program: torch.export.ExportedProgram, inputs: dict[str, torch.Tensor],
                         positional: bool, floor: int) -> None:
    """Every floating-point node of every policy's plan compared with real autocast (none left out: a node whose
    origin did not line up would be unobserved, and is a failure), at least ``floor`` of them."""
    for policy in POLICIES:
        device, low = policy.split("-")
        args, kwargs = (tuple(inputs.values()), {}) if positional else ((), inputs)
        observed = observe_autocast(program, args, kwargs, device, DTYPES[low])
        plan = plan_for(out, policy)
        result = compare_with_plan(plan, observed)
        assert result["mismatches"] == [], (policy, result["mismatches"][:5])
        assert result["unobserved"] == [], (policy, result["unobserved"][:5])
        floating = [node for node in plan.nodes if node.precision != "none" and node.rule != "subgraph"]
        assert result["checked"] + result["kernel_internal"] == len(floating), (policy, result)
        assert result["checked"] >= floor, (policy, result["checked"], floor)


@pytest.mark.parametrize(("example", "floor"), [("digits_resnet", 20), ("digits_transformer", 70)])
def test_oracle_bundled_examples(tmp_path: Path, example: str, floor: int) -> None:
    """Every floating-point node's plan equals the dtype real autocast produced for its op, for the CPU
    policies (autocast runs here) and the CUDA policies (the installed CUDA autocast kernels on fake tensors)."""
    pt2, val = MODELS / f"{example}.pt2", MODELS / f"{example}.val.npz"
    out = converted(tmp_path, pt2, val)
    assert_oracle_agrees(out, torch.export.load(pt2), oracle_inputs(val, ["pixels"]), positional=True, floor=floor)


@pytest.mark.parametrize(("model", "floor"), [("bert", 60), ("llama", 60)])
def test_oracle_transformers_models(tmp_path: Path, model: str, floor: int, request: pytest.FixtureRequest) -> None:
    files = request.getfixturevalue(f"{model}_files")
    out = converted(tmp_path, files["pt2"], files["val"])
    inputs = oracle_inputs(files["val"], ["input_ids", "attention_mask"])
    assert_oracle_agrees(out, torch.export.load(files["pt2"]), inputs, positional=False, floor=floor)
    plan = plan_for(out, "cuda-fp16")
    attention = [node for node in plan.nodes if node.rule == "kernel"]
    assert attention, "SDPA's decomposition should keep its scores and softmax FP32 inside the kernel"
    assert {node.op_type for node in attention} >= {"Softmax"}
    assert all(node.precision == "fp16" for node in plan.nodes
               if node.origin and "scaled_dot_product_attention" in node.origin and node.op_type == "MatMul")


def test_cuda_fp16_rules(tmp_path: Path, llama_files: dict[str, Path]) -> None:
    transformer = converted(tmp_path, MODELS / "digits_transformer.pt2", MODELS / "digits_transformer.val.npz",
                            plan_options=PlanOptions(policy="cuda-fp16"))
    plan = json.loads((transformer / "plan.json").read_text())
    assert plan["policy"] == "cuda-fp16" and plan["target"] == "fp16"
    by_op: dict[str, set[str]] = {}
    for node in plan["nodes"]:
        by_op.setdefault(node["op_type"], set()).add(node["precision"])
    for op in ("LayerNormalization", "Softmax", "Pow", "ReduceMean", "Sqrt", "Reciprocal"):
        assert by_op[op] == {"fp32"}, op
    for op in ("MatMul", "Gemm", "Conv"):
        assert by_op[op] == {"fp16"}, op
    rms = [node for node in plan["nodes"] if node["module"] == "blocks.0.norm1"]
    assert rms and all(node["reason"] == "policy: aten.rms_norm is FP32 under cuda-fp16" for node in rms)
    assert plan["summary"]["macs"]["low_precision_share"] == 1.0


def test_exp_log_fp32_and_autocast_disabled_head(cli, tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt.pt"
    torch.save(build_fp32_head().state_dict(), checkpoint)
    out = tmp_path / "m"
    result = cli("convert", checkpoint, "--factory", "tests.toy_models:build_fp32_head", "--input", "x:batch,8",
                 "--amp-policy", "cuda-fp16", "--out", out)
    assert result.exit_code == 0, result.stderr
    nodes = json.loads((out / "plan.json").read_text())["nodes"]
    body = [n for n in nodes if n["module"] == "body"]
    assert body and all(n["precision"] == "fp16" for n in body)
    assert {n["precision"] for n in nodes if n["op_type"] in ("Exp", "Log")} == {"fp32"}
    head = [n for n in nodes if n["module"] and n["module"].startswith("head")]
    assert {n["op_type"] for n in head} >= {"Gemm", "LogSoftmax"}
    assert all(n["precision"] == "fp32" and n["rule"] == "region" for n in head), head

    # The same holds against real autocast, the model's own region included.
    program = torch.export.export(build_fp32_head(), (torch.randn(2, 8),))
    observed = observe_autocast(program, (torch.randn(2, 8),), {}, "cuda", torch.float16)
    plan = plan_for(out, "cuda-fp16")
    assert compare_with_plan(plan, observed)["mismatches"] == []


def test_range_rule_keeps_overflowing_nodes_fp32_and_says_why(cli, tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt.pt"
    torch.save(build_outliers().state_dict(), checkpoint)
    val = tmp_path / "val.npz"
    np.savez(val, x=np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32))
    out = tmp_path / "m"
    result = cli("convert", checkpoint, "--factory", "tests.toy_models:build_outliers", "--val-data", val,
                 "--amp-policy", "cuda-fp16", "--out", out)
    assert result.exit_code == 0, result.stderr
    nodes = {n["name"]: n for n in json.loads((out / "plan.json").read_text())["nodes"]}
    ranged = [n for n in nodes.values() if n["rule"] == "range"]
    assert {n["module"] for n in ranged} >= {"", "fc2", "big"}
    scaled = next(n for n in ranged if n["op_type"] == "Mul")
    assert scaled["precision"] == "fp32" and "output reached 5.92e+04" in scaled["reason"]
    weight = next(n for n in ranged if n["module"] == "big")
    assert "weight" in weight["reason"] and "1e+05" in weight["reason"]
    assert all(n["precision"] == "fp16" for n in nodes.values() if n["module"] == "fc1")

    unchecked = tmp_path / "unchecked"
    cli("convert", checkpoint, "--factory", "tests.toy_models:build_outliers", "--val-data", val,
        "--amp-policy", "cuda-fp16", "--no-range-check", "--out", unchecked)
    unchecked_ranges = [n for n in json.loads((unchecked / "plan.json").read_text())["nodes"] if n["rule"] == "range"]
    # Weights (the 1e5 entry of `big`, the constant 1e5 divisor) are always checked; activations were not.
    assert {n["module"] for n in unchecked_ranges} == {"", "big"}
    assert all("weight" in n["reason"] for n in unchecked_ranges)


def test_overrides_from_cli_and_policy_file(cli, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('target = "bf16"\n[keep_fp32]\nmodules = ["^blocks\\\\.1\\\\."]\n'
                      '[force_low]\nops = ["Softmax"]\n')
    out = tmp_path / "m"
    result = cli("convert", MODELS / "digits_transformer.pt2", "--val-data", MODELS / "digits_transformer.val.npz",
                 "--amp-policy", "cuda-fp16", "--policy", policy, "--keep-fp32-op", "Gelu", "--out", out)
    assert result.exit_code == 0, result.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert plan["target"] == "bf16"
    nodes = plan["nodes"]
    block1 = [n for n in nodes if (n["module"] or "").startswith("blocks.1.") and n["precision"] != "none"]
    assert block1 and all(n["precision"] == "fp32" and n["rule"] == "override" for n in block1)
    assert "module 'blocks.1" in block1[0]["reason"]
    assert [n["precision"] for n in nodes if n["op_type"] == "Softmax" and n["module"] == "blocks.0.attn"] == ["bf16"]
    assert {n["precision"] for n in nodes if n["op_type"] == "Gelu"} == {"fp32"}
    assert {n["precision"] for n in nodes if n["op_type"] == "MatMul" and n["module"].startswith("blocks.0")} == \
        {"bf16"}


def test_policy_file_in_the_library_gives_the_plan_the_cli_gives(cli, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('policy = "cuda-fp16"\ntarget = "bf16"\nheadroom = 4.0\n'
                      '[keep_fp32]\nmodules = ["^blocks\\\\.1\\\\."]\n')
    model, val = MODELS / "digits_transformer.pt2", MODELS / "digits_transformer.val.npz"
    by_cli = tmp_path / "cli"
    assert cli("convert", model, "--val-data", val, "--policy", policy, "--keep-fp32-op", "Gelu",
               "--out", by_cli).exit_code == 0
    by_api = mpexport.convert(model, out=tmp_path / "api", val_data=val, policy_file=policy,
                              plan_options=PlanOptions(overrides=Overrides(keep_fp32_ops=["Gelu"])))
    assert (by_cli / "plan.json").read_bytes() == (by_api.out / "plan.json").read_bytes()
    plan = by_api.manifest.plan
    assert plan.policy == "cuda-fp16" and plan.target == "bf16" and plan.policy_source.startswith("given")
    options = read_plan(Bundle.open(by_api.out)).options
    assert options.headroom == 4.0 and options.overrides.keep_fp32_ops == ["Gelu"]
    assert options.overrides.keep_fp32_modules == ["^blocks\\.1\\."]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [("[keep_fp32\nmodules = 1", "not valid TOML"), ("colour = 1\n", "unknown key"),
     ("[keep_fp32]\nmodules = 'x'\n", "list of strings"), ("[keep_fp32]\nmodules = ['(']\n", "regular expression"),
     ("policy = 'gpu-fp8'\n", "unknown policy"), ("target = 'fp8'\n", "unknown target"),
     ("headroom = 'lots'\n", "headroom a number")],
)
def test_bad_policy_files(cli, tmp_path: Path, content: str, fragment: str) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(content)
    out = tmp_path / "m"
    assert_bad_input(cli("convert", MODELS / "digits_resnet.pt2", "--policy", policy, "--out", out), fragment)
    assert not out.exists()


def test_plan_defaults_to_the_recorded_training_policy(tmp_path: Path) -> None:
    out = converted(tmp_path, MODELS / "digits_resnet.pt2", MODELS / "digits_resnet.val.npz")
    manifest = Bundle.open(out).manifest
    assert manifest.artifacts["plan"].file == "plan.json"
    assert manifest.plan.policy == "cpu-bf16"
    assert "mpexport.json" in manifest.plan.policy_source and "dtype=bfloat16" in manifest.plan.policy_source


def test_inspect(cli, tmp_path: Path) -> None:
    out = tmp_path / "t"
    assert cli("convert", MODELS / "digits_transformer.pt2", "--val-data", MODELS / "digits_transformer.val.npz",
               "--amp-policy", "cuda-fp16", "--out", out).exit_code == 0
    text = cli("inspect", out)
    assert text.exit_code == 0, text.stderr
    assert "FP32 keep-list" in text.stdout and "aten.rms_norm is FP32" in text.stdout
    assert "blocks.*.norm1" in text.stdout
    as_json = cli("inspect", out, "--json")
    report = json.loads(as_json.stdout)
    assert report["policy"] == "cuda-fp16"
    assert report["naive_difference"]["kept_fp32"] == report["summary"]["precision"]["fp32"]
    assert sum(group["count"] for group in report["keep_list"]) == report["naive_difference"]["kept_fp32"]
    assert_bad_input(cli("inspect", tmp_path / "nowhere"), "not an mpexport output directory")


def test_python_api_matches_cli(tmp_path: Path) -> None:
    options = PlanOptions(policy="cuda-fp16", overrides=Overrides(keep_fp32_modules=["^head$"]))
    result = mpexport.convert(MODELS / "digits_resnet.pt2", out=tmp_path / "r",
                              val_data=MODELS / "digits_resnet.val.npz", plan_options=options)
    nodes = json.loads((result.out / "plan.json").read_text())["nodes"]
    assert [n["precision"] for n in nodes if n["module"] == "head"] == ["fp32"]
    assert REPO.exists()


def test_explicit_fp32_cast_in_the_model_is_honoured(tmp_path: Path) -> None:
    """``y.float()`` on an FP32 tensor vanishes from the FP32 graph; under autocast it made sigmoid FP32."""
    from tests.toy_models import build_explicit_cast

    model = build_explicit_cast()
    example = torch.randn(2, 8)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "m.pt2")
    out = converted(tmp_path, tmp_path / "m.pt2", None, inputs=[mpexport.parse_input_option("x:batch,8")])
    plan = plan_for(out, "cuda-fp16")
    by_op = {node.op_type: node for node in plan.nodes}
    assert by_op["Sigmoid"].precision == "fp32" and by_op["Tanh"].precision == "fp16"
    observed = observe_autocast(program, (example,), {}, "cuda", torch.float16)
    assert compare_with_plan(plan, observed)["mismatches"] == []


def test_oracle_checkpoint_and_torchscript_inputs(tmp_path: Path, cnn_checkpoint: Path, pixels_npz: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The same module reaching convert as a checkpoint (+ factory) and as a TorchScript file: every node's plan
    agrees with autocast run on the program each path captured."""
    from mpexport.base.specs import TensorSpec
    from mpexport.capture.export import torchscript_program
    from tests.toy_models import build_cnn

    monkeypatch.chdir(REPO)
    inputs = oracle_inputs(pixels_npz, ["pixels"])
    checkpoint = tmp_path / "checkpoint"
    mpexport.convert(cnn_checkpoint, out=checkpoint, val_data=pixels_npz, factory="tests.toy_models:build_cnn")
    program = torch.export.export(build_cnn().eval(), (inputs["pixels"],), strict=False)
    assert_oracle_agrees(checkpoint, program, inputs, positional=True, floor=4)

    traced = torch.jit.trace(build_cnn().eval(), (inputs["pixels"],))
    torch.jit.save(traced, tmp_path / "cnn.ts")
    scripted = tmp_path / "scripted"
    mpexport.convert(tmp_path / "cnn.ts", out=scripted, val_data=pixels_npz)
    assert Bundle.open(scripted).manifest.export.strategy == "torchscript-converter"
    specs = [TensorSpec("pixels", "float32", ("batch", 1, 8, 8))]
    program = torchscript_program(torch.jit.load(tmp_path / "cnn.ts"), (inputs["pixels"],), specs)
    assert_oracle_agrees(scripted, program, inputs, positional=True, floor=4)


def test_oracle_legacy_exporter_by_module(tmp_path: Path, pixels_npz: Path) -> None:
    """The TorchScript exporter records module scopes but no aten ops: the plan infers ops from op types. Checked
    against real CPU autocast module by module (each module's output dtype; the CUDA policies need eager CUDA
    autocast, a GPU). This found Conv's stand-in naming aten.convolution, which CPU autocast does not list: a
    legacy-exported convolution was planned FP32 under CPU policies."""
    from mpexport.base.specs import TensorSpec
    from mpexport.capture import provenance
    from mpexport.capture.export import ExportRequest, LegacyTorchScriptStrategy, export_onnx
    from mpexport.precision.oracle import compare_modules_with_plan, observe_module_outputs
    from mpexport.sources.loading import load_model
    from tests.toy_models import build_cnn

    model = build_cnn().eval()
    torch.save(model, tmp_path / "cnn.pt")
    loaded = load_model(tmp_path / "cnn.pt", trust_pickle=True)
    inputs = oracle_inputs(pixels_npz, ["pixels"])
    spec = TensorSpec("pixels", "float32", ("batch", 1, 8, 8))
    exported = export_onnx(ExportRequest(loaded, [spec], inputs, ["logits"]), [LegacyTorchScriptStrategy()])
    records = provenance.collect_provenance(exported.model, exported.provenance_kind)
    for policy in ("cpu-fp16", "cpu-bf16"):
        plan = make_plan(exported.model, records, PlanOptions(policy=policy))
        assert all("inferred from" in node.reason for node in plan.nodes if node.op_type in ("Conv", "Gemm"))
        observed = observe_module_outputs(model, (inputs["pixels"],), "cpu", DTYPES[policy.split("-")[1]])
        result = compare_modules_with_plan(plan, observed)
        assert result["mismatches"] == [], (policy, result["mismatches"])
        # the TorchScript exporter folds the batch norm into the convolution: "bn" has no node of its own
        assert result["checked"] == 3 and set(observed) - set(result["unobserved"]) == {"", "conv", "fc"}, result


class _Attention(torch.nn.Module):
    """One scaled dot-product attention over inputs that are already projected (q, k, v)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("low", ["bf16", "fp16"])
def test_sdpa_kernel_rule_against_the_cpu_autocast_paths(tmp_path: Path, low: str) -> None:
    """The plan for a decomposed SDPA (matmuls low, scale and softmax FP32) against what CPU autocast computes,
    on its math path and its flash kernel. Both of those keep the attention scores in FP32; the ONNX graph cannot
    (a MatMul outputs its inputs' type), so the plan rounds the scores to the low type once. Measured here and in
    the README: the plan's error is below 2x the kernels' (verify's default budget factor over the noise floor)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mpexport.backends.onnxruntime import OrtRunner
    from mpexport.bundle.names import MIXED_ONNX
    from mpexport.graph.emulate import load_strict_emulation

    generator = torch.Generator().manual_seed(0)
    q, k, v = (3 * torch.randn(8, 4, 64, 32, generator=generator) for _ in range(3))
    program = torch.export.export(_Attention(), (q[:2], k[:2], v[:2]),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},) * 3)
    torch.export.save(program, tmp_path / "attention.pt2")
    np.savez(tmp_path / "val.npz", q=q.numpy(), k=k.numpy(), v=v.numpy())
    result = mpexport.convert(tmp_path / "attention.pt2", out=tmp_path / "m", val_data=tmp_path / "val.npz",
                              plan_options=PlanOptions(policy=f"cpu-{low}", range_check=False))
    bundle = Bundle.open(result.out)
    plan = read_plan(bundle)
    assert {node.op_type for node in plan.nodes if node.rule == "kernel"} >= {"Softmax"}
    assert {node.precision for node in plan.nodes if node.op_type == "MatMul"} == {low}

    reference = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
    strict = OrtRunner.from_model(load_strict_emulation(bundle.path(MIXED_ONNX)), bundle.directory, name="strict")
    (planned,) = strict.run({"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})
    errors = {"plan": np.abs(planned - reference.numpy()).mean()}
    with torch.autocast("cpu", dtype=DTYPES[low]):
        for name, backend in (("math", SDPBackend.MATH), ("flash", SDPBackend.FLASH_ATTENTION)):
            with sdpa_kernel(backend):
                kernel = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            errors[name] = (kernel.float() - reference).abs().mean().item()
    assert errors["math"] == pytest.approx(errors["flash"], rel=0.1), errors  # both keep the scores in FP32
    assert errors["flash"] < errors["plan"] < 2 * errors["flash"], errors  # the one rounding of the scores
