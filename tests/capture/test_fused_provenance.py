"""Nodes torch's exporter fused take the precision of the op that computes them. ``torch.onnx.export(..., dynamo=True)``
optimizes by default: BatchNorm folds into the Conv, ConvTranspose or Gemm before it (the fused node records the
BatchNorm's aten op), a Pad into the Conv after it, successive Relus and Clips into one. Each such ONNX, given to
``convert``, must plan what its ``.pt2`` plans: every Conv/ConvTranspose/MatMul/Gemm low, every norm and softmax FP32
(under ``cuda-fp16``), compared node by node under all four policies on a CNN, a model of every fusion, a ViT and a
BERT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mpexport
from mpexport.capture.fused import computed_op, weight_owner
from mpexport.capture.provenance import collect_provenance, read_provenance
from mpexport.precision.agreement import plan_agreement
from mpexport.precision.plan import PrecisionPlan
from tests.capture.test_onnx_input import POLICIES, plan_of
from tests.toy_models import ImageLogits, TextLogits, build_bert, build_cnn, build_vit

COMPUTE = ("Conv", "ConvTranspose", "MatMul", "Gemm", "LayerNormalization", "Softmax", "Gelu")
"""Op types whose precision autocast decides by the op they compute; paired between two plans in graph order."""
LOW = ("Conv", "ConvTranspose", "MatMul", "Gemm")
FP32 = ("LayerNormalization", "Softmax")


def node(op_type: str, weight_rank: int = 4) -> ir.Node:
    """A bare node of ``op_type`` whose second input is a weight of ``weight_rank``."""
    inputs = [ir.Value(name="x"), ir.Value(name="w", shape=ir.Shape([2] * weight_rank))]
    return ir.Node("", op_type, inputs)


@pytest.mark.parametrize(("op_type", "rank", "recorded", "expected"), [
    ("Conv", 4, "aten._native_batch_norm_legit_no_training.default", "aten.conv2d"),
    ("Conv", 3, "aten._native_batch_norm_legit_no_training.default", "aten.conv1d"),
    ("ConvTranspose", 4, "aten.batch_norm.default", "aten.conv_transpose2d.input"),
    ("Conv", 4, "aten.conv2d.default", None),
    ("Conv", 5, "aten.convolution.default", None),
    ("Gemm", 2, "aten._native_batch_norm_legit_no_training.default", "aten.linear"),
    ("Gemm", 2, "aten.add.Tensor", "aten.linear"),
    ("Gemm", 2, "aten.addmm.default", None),
    ("MatMul", 2, "aten.add.Tensor", "aten.matmul"),
    ("MatMul", 2, "aten.view.default", "aten.matmul"),
    ("MatMul", 4, "aten.scaled_dot_product_attention.default", None),  # a decomposed fused kernel, not a fusion
    ("MatMul", 2, "aten.cdist.default", None),  # an FP32 op decomposed into a MatMul keeps its class
    ("MatMul", 2, "aten.linear.default", None),
    ("LayerNormalization", 1, "aten.add.Tensor", "aten.layer_norm"),
    ("LayerNormalization", 1, "aten.layer_norm.default", None),
    ("LayerNormalization", 1, "aten.native_layer_norm.default", None),
    ("Relu", 1, "aten.add.Tensor", None),  # not an op autocast decides by what it computes
])
def test_the_op_a_fused_node_computes(op_type: str, rank: int, recorded: str, expected: str | None) -> None:
    assert computed_op(node(op_type, rank), recorded) == expected


@pytest.mark.parametrize(("weight", "recorded", "expected"), [
    ("layer1.0.conv1.weight", "layer1.0.bn1", "layer1.0.conv1"),
    ("conv.weight", "bn", "conv"),
    ("layer2.0.conv1.weight", "layer1.0.bn1", None),  # another container: not the BatchNorm's neighbour
    ("layer1.0.conv1.bias", "layer1.0.bn1", None),  # not a weight
    ("val_17", "layer1.0.bn1", None),  # an optimizer's name says nothing
])
def test_a_fused_node_takes_the_module_of_its_weight(weight: str, recorded: str, expected: str | None) -> None:
    graph = ir.Graph([ir.Value(name="x")], [], nodes=[], initializers=[
        ir.Value(name=weight, const_value=ir.tensor(np.zeros((2, 2, 1, 1), np.float32)))])
    fused = ir.Node("", "Conv", [graph.inputs[0], graph.initializers[weight]], graph=graph)
    assert weight_owner(fused, recorded) == expected
    assert weight_owner(ir.Node("", "Conv", [ir.Value(name="x"), ir.Value(name=weight)]), recorded) is None


class Fusions(nn.Module):
    """Every fusion torch's exporter optimizer makes on common layers: Pad + Conv + BatchNorm, successive Relus,
    ConvTranspose + BatchNorm, two clamps (one Clip), Linear + BatchNorm1d (a Gemm), Conv1d + BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.bn_up = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 16)
        self.bn_fc = nn.BatchNorm1d(16)
        self.conv1d = nn.Conv1d(1, 2, 3)
        self.bn_1d = nn.BatchNorm1d(2)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = torch.relu(torch.relu(self.bn(self.conv(F.pad(pixels, (1, 1, 1, 1))))))
        x = self.bn_up(self.up(F.max_pool2d(x, 2))).clamp(min=-3).clamp(max=3)
        h = self.bn_fc(self.fc(x.flatten(1)))
        return self.bn_1d(self.conv1d(h.unsqueeze(1))).flatten(1)


def build_fusions() -> nn.Module:
    """:class:`Fusions` with fixed weights and running statistics that are not the identity (seed 0)."""
    torch.manual_seed(0)
    module = Fusions().eval()
    for norm in (module.bn, module.bn_up, module.bn_fc, module.bn_1d):
        norm.running_mean = torch.empty(norm.num_features).uniform_(-1, 1)
        norm.running_var = torch.empty(norm.num_features).uniform_(0.5, 2)
    return module


def export_both(module: nn.Module, example: tuple[torch.Tensor, ...], names: list[str], root: Path) -> dict[str, Path]:
    """``module`` as a ``.pt2`` and as torch's dynamo ONNX with its default optimizer (``optimize=True``)."""
    module = module.eval()
    dims = tuple({0: torch.export.Dim("batch")} for _ in example)
    torch.export.save(torch.export.export(module, example, dynamic_shapes=dims), root / "model.pt2")
    torch.onnx.export(module, example, str(root / "model.onnx"), dynamo=True, input_names=names,
                      output_names=["logits"], dynamic_shapes=dims, verbose=False)
    return {"pt2": root / "model.pt2", "onnx": root / "model.onnx"}


def convert_both(files: dict[str, Path], val: Path, root: Path) -> dict[str, Path]:
    """Both files converted with ``val``: their bundles."""
    for kind in ("pt2", "onnx"):
        mpexport.convert(files[kind], out=root / f"{kind}-bundle", val_data=val)
    return {"pt2": root / "pt2-bundle", "onnx": root / "onnx-bundle"}


def assert_compute_nodes_agree(bundles: dict[str, Path], *, at_least: int) -> None:
    """Under every policy, the ONNX's plan gives each op of :data:`COMPUTE` the precision the ``.pt2``'s plan gives
    the same op (paired by op type in graph order, the same count in both), and every node the two plans pair by
    module and op type agrees too. Under ``cuda-fp16``: :data:`LOW` low, :data:`FP32` FP32 in both."""
    for policy in POLICIES:
        reference, other = plan_of(bundles["pt2"], policy), plan_of(bundles["onnx"], policy)
        compared = 0
        for op_type in COMPUTE:
            ours = [node for node in reference.nodes if node.op_type == op_type]
            theirs = [node for node in other.nodes if node.op_type == op_type]
            assert len(ours) == len(theirs), (policy, op_type, len(ours), len(theirs))
            for a, b in zip(ours, theirs, strict=True):
                assert a.precision == b.precision, (policy, a.name, a.precision, a.reason, b.name, b.reason)
                if policy == "cuda-fp16" and op_type in LOW + FP32:
                    assert a.precision == ("fp32" if op_type in FP32 else "fp16"), (a.name, a.reason)
                compared += 1
        assert compared >= at_least, (policy, compared)
        agreement = plan_agreement(reference, other)
        assert agreement.share == 1.0, (policy, agreement.to_json())


def test_every_fusion_of_the_exporter_plans_as_its_pt2(tmp_path: Path) -> None:
    files = export_both(build_fusions(), (torch.randn(2, 3, 8, 8),), ["pixels"], tmp_path)
    records = {record.op_type: record for record in collect_provenance(ir.load(str(files["onnx"])))
               if record.fused}
    assert set(records) == {"Conv", "ConvTranspose", "Gemm"}, records  # what the BatchNorms were folded into
    assert records["ConvTranspose"].aten == "aten.conv_transpose2d.input"
    assert records["Gemm"].aten == "aten.linear"
    # each takes the module whose weight it computes with, not the folded BatchNorm's
    fused = [(record.op_type, record.module) for record in collect_provenance(ir.load(str(files["onnx"])))
             if record.fused]
    assert fused == [("Conv", "conv"), ("ConvTranspose", "up"), ("Gemm", "fc"), ("Conv", "conv1d")], fused
    for record in records.values():
        assert record.fused == ("aten._native_batch_norm_legit_no_training.default",), record
        assert record.fused_by is not None and "FuseBatchNormInto" in record.fused_by

    val = tmp_path / "val.npz"
    np.savez(val, pixels=np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
    bundles = convert_both(files, val, tmp_path)
    provenance = read_provenance(mpexport.Bundle.open(bundles["onnx"]))
    convs = [record for record in provenance if record.op_type == "Conv"]
    assert [record.aten for record in convs] == ["aten.conv2d", "aten.conv1d"]  # Pad + Conv + BN, Conv1d + BN
    assert all(record.fused for record in convs)
    assert_compute_nodes_agree(bundles, at_least=4)
    plan = PrecisionPlan.load(bundles["onnx"] / "plan.json")
    assert plan.summary()["macs"]["low_precision_share"] == 1.0, plan.summary()["macs"]
    assert mpexport.verify(bundles["onnx"]).verdict == "pass"


def test_cnn_with_batch_norm_folded_plans_as_its_pt2(tmp_path: Path, pixels_npz: Path) -> None:
    files = export_both(build_cnn(), (torch.zeros(2, 1, 8, 8),), ["pixels"], tmp_path)
    bundles = convert_both(files, pixels_npz, tmp_path)
    conv = next(node for node in PrecisionPlan.load(bundles["onnx"] / "plan.json").nodes if node.op_type == "Conv")
    assert conv.precision == "fp16" and conv.aten == "aten.conv2d", conv  # was: propagate, FP32
    assert_compute_nodes_agree(bundles, at_least=2)


def test_vit_from_the_optimized_dynamo_export_plans_as_its_pt2(tmp_path: Path) -> None:
    files = export_both(ImageLogits(build_vit()), (torch.randn(2, 3, 16, 16),), ["pixel_values"], tmp_path)
    val = tmp_path / "val.npz"
    np.savez(val, pixel_values=np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32))
    assert_compute_nodes_agree(convert_both(files, val, tmp_path), at_least=25)


def test_bert_from_the_optimized_dynamo_export_plans_as_its_pt2(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 200, (8, 12))
    mask = np.ones_like(ids)
    mask[::3, 8:] = 0
    np.savez(tmp_path / "val.npz", input_ids=ids, attention_mask=mask)
    files = export_both(TextLogits(build_bert()), (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])),
                        ["input_ids", "attention_mask"], tmp_path)
    assert_compute_nodes_agree(convert_both(files, tmp_path / "val.npz", tmp_path), at_least=25)
