"""Recurrent layers (LSTM, GRU, RNN) are planned as autocast runs the kernel they dispatch to: cuDNN's
``aten._cudnn_rnn`` under CUDA policies (low precision), oneDNN's ``aten.mkldnn_rnn_layer`` for a CPU LSTM, a plain
RNN's cell ``aten.linear`` on the CPU, and a CPU GRU following its inputs; from an ONNX op type (the TorchScript
exporter's LSTM node) as from a ``.pt2``'s ``aten.lstm.input``, checked against real (CPU) and fake-tensor (CUDA)
autocast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from torch import nn

import mpexport
from mpexport.bundle.names import FP32_ONNX
from mpexport.bundle.store import Bundle
from mpexport.capture.provenance import read_provenance
from mpexport.precision.options import PlanOptions
from mpexport.precision.oracle import (
    compare_modules_with_plan,
    compare_with_plan,
    observe_autocast,
    observe_module_outputs,
)
from mpexport.precision.plan import PrecisionPlan, read_plan, read_ranges
from mpexport.precision.planner import make_plan

FEATURES, HIDDEN, STEPS, SAMPLES = 4, 8, 5, 16
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Recurrent(nn.Module):
    """A recurrent layer over (batch, steps, features) and a linear head on its last step."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(FEATURES, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states, _ = self.rnn(x)
        return self.head(states[:, -1])


def build(kind: str) -> Recurrent:
    torch.manual_seed(0)
    return Recurrent(kind).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per kind, the TorchScript exporter's ONNX (an ONNX ``LSTM``/``GRU``/``RNN`` node, no aten ops); the data."""
    root = tmp_path_factory.mktemp("recurrent")
    found = {}
    for kind in GATES:
        path = root / f"{kind}.onnx"
        torch.onnx.export(build(kind), (torch.randn(2, STEPS, FEATURES),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}})
        found[kind] = path
    found["val"] = root / "x.npz"
    np.savez(found["val"], x=np.random.default_rng(0).standard_normal((SAMPLES, STEPS, FEATURES)).astype(np.float32))
    return found


def cpu_autocast_runs(kind: str, low: str) -> bool:
    """Whether this CPU runs the layer under CPU autocast at ``low``: oneDNN's low-precision LSTM needs AVX-512
    (an AVX2-only CPU refuses it, "could not create a primitive descriptor"), so real CPU autocast, the oracle,
    cannot run it there."""
    try:
        with torch.autocast("cpu", dtype=DTYPES[low]):
            build(kind)(torch.randn(1, STEPS, FEATURES))
    except RuntimeError as exc:
        if "primitive descriptor" in str(exc):
            return False
        raise
    return True


def replan(out: Path, policy: str) -> PrecisionPlan:
    bundle = Bundle.open(out)
    return make_plan(ir.load(bundle.path(FP32_ONNX)), read_provenance(bundle), PlanOptions(policy=policy),
                     read_ranges(bundle))


@pytest.mark.parametrize("kind", list(GATES))
def test_onnx_recurrent_layer_runs_as_cudnn(kind: str, files: dict[str, Path], tmp_path: Path) -> None:
    """Under cuda-fp16 the layer is FP16 with a reason naming ``aten._cudnn_rnn``, its multiply-accumulates are
    counted, and the bundle verifies (ONNX Runtime's CPU provider runs the FP16 layer; the strict emulation too)."""
    out = tmp_path / kind
    mpexport.convert(files[kind], out=out, val_data=files["val"], plan_options=PlanOptions(policy="cuda-fp16"))
    plan = read_plan(Bundle.open(out))
    layer = next(node for node in plan.nodes if node.op_type == kind)
    assert layer.precision == "fp16" and "aten._cudnn_rnn" in layer.reason, layer.reason
    assert f"inferred from {kind}" in layer.reason
    samples = layer.macs // (STEPS * GATES[kind] * HIDDEN * (FEATURES + HIDDEN)) if layer.macs else 0
    assert samples >= 1 and layer.macs == samples * STEPS * GATES[kind] * HIDDEN * (FEATURES + HIDDEN), layer.macs
    assert plan.summary()["macs"]["uncounted_nodes"] == 0
    report = mpexport.verify(out)
    assert report.passed, report.failures
    assert report.ran("onnx-mixed") and report.ran("strict-fp16"), report.backends
    expected = {"LSTM": ("bf16", "aten.mkldnn_rnn_layer"), "GRU": ("fp32", "aten.gru.input"),
                "RNN": ("bf16", "aten.linear")}[kind]
    unable = []
    for policy in ("cpu-fp16", "cpu-bf16"):  # module by module against real CPU autocast
        cpu_plan = replan(out, policy)
        low = policy.split("-")[1]
        if not cpu_autocast_runs(kind, low):
            unable.append(policy)
            continue
        observed = observe_module_outputs(build(kind), (torch.randn(2, STEPS, FEATURES),), "cpu", DTYPES[low])
        result = compare_modules_with_plan(cpu_plan, observed)
        assert result["mismatches"] == [] and result["checked"] >= 2, (policy, result)
    cpu = next(node for node in cpu_plan.nodes if node.op_type == kind)
    assert (cpu.precision, expected[1] in cpu.reason) == (expected[0], True), cpu.reason
    if unable:
        pytest.skip(f"this CPU cannot run {kind} under CPU autocast ({', '.join(unable)}: oneDNN needs AVX-512): "
                    "the plan was not compared with it there")


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_pt2_recurrent_layer_agrees_with_autocast(kind: str, files: dict[str, Path], tmp_path: Path) -> None:
    """A ``.pt2``'s ``aten.lstm.input``/``aten.gru.input`` node, every floating-point node compared with what autocast
    produces for its op under all four policies (CUDA's through the installed torch's autocast kernels on fake
    tensors, cuDNN's layer on meta tensors)."""
    pt2, x = tmp_path / f"{kind}.pt2", torch.randn(2, STEPS, FEATURES)
    mpexport.save(build(kind), pt2, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    out = tmp_path / "bundle"
    mpexport.convert(pt2, out=out, val_data=files["val"])
    program = torch.export.load(pt2)
    unable = []
    for policy in ("cpu-fp16", "cpu-bf16", "cuda-fp16", "cuda-bf16"):
        device, low = policy.split("-")
        plan = replan(out, policy)
        if device == "cpu" and not cpu_autocast_runs(kind, low):
            unable.append(policy)
            continue
        result = compare_with_plan(plan, observe_autocast(program, (x,), {}, device, DTYPES[low]))
        assert result["mismatches"] == [] and result["unobserved"] == [], (policy, result)
        layer = next(node for node in plan.nodes if node.op_type == kind)
        if device == "cuda":
            assert layer.precision == low and "aten._cudnn_rnn" in layer.reason, (policy, layer.reason)
    report = mpexport.verify(out)
    assert report.passed and report.ran("torch-amp"), (report.failures, report.backends)
    if unable:
        pytest.skip(f"this CPU cannot run {kind} under CPU autocast ({', '.join(unable)}: oneDNN needs AVX-512): "
                    "the plan was not compared with it there")
