"""The graph transforms as onnx-ir passes, on small graphs built here: what each requires, does and ensures."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from mpexport.backends.onnxruntime import ir_session
from mpexport.base.errors import MpexportError
from mpexport.graph.emulate import ROUNDING, EmulationError, StrictEmulation
from mpexport.graph.probes import AddRangeProbes, ExposeIntermediates
from mpexport.graph.rewrite import ApplyPlan, apply_plan
from mpexport.graph.walk import added_role

RNG = np.random.default_rng(0)


def linear_model(weight: np.ndarray | None = None) -> ir.Model:
    """x @ W + b -> Relu, FP32, with named nodes (mm, add, relu)."""
    weight = RNG.normal(size=(4, 4)).astype(np.float32) if weight is None else weight
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["z"], name="add"),
             helper.make_node("Relu", ["z"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor("W", TensorProto.FLOAT, [4, 4], weight.ravel()),
                               helper.make_tensor("b", TensorProto.FLOAT, [4], np.ones(4, np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    from onnx import shape_inference

    return ir.from_proto(shape_inference.infer_shapes(model))


def run(model: ir.Model, tmp_path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ir_session(model, tmp_path).run(None, feeds)


def node_types(model: ir.Model) -> dict[str, ir.DataType | None]:
    return {node.name or "": node.outputs[0].dtype for node in model.graph}


def test_apply_plan_retypes_and_keeps_its_contract(tmp_path) -> None:
    weight = RNG.normal(size=(4, 4)).astype(np.float32)
    model = linear_model(weight)
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    expected = run(linear_model(weight), tmp_path, {"x": x})[0]
    rewrite = ApplyPlan({"mm": "fp16", "add": "fp16", "relu": "fp32"})
    result = rewrite(model)
    assert result.modified and result.model is model
    types = node_types(model)
    assert types["mm"] == types["add"] == ir.DataType.FLOAT16 and types["relu"] == ir.DataType.FLOAT
    assert model.graph.initializers["W"].dtype == ir.DataType.FLOAT16  # converted once, in place
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT  # outputs keep FP32 unless io_types="native"
    assert rewrite.report is not None and rewrite.report.casts_inserted >= 2
    added = [node for node in model.graph if added_role(node) is not None]
    assert added and all(node.op_type == "Cast" for node in added)
    np.testing.assert_allclose(run(model, tmp_path, {"x": x})[0], expected, rtol=1e-2, atol=1e-2)


def test_apply_plan_requires_a_plan_of_this_graph() -> None:
    with pytest.raises(ir.passes.PreconditionError, match="made from another graph"):
        ApplyPlan({"mm": "fp16", "not_here": "fp16"})(linear_model())
    with pytest.raises(MpexportError, match=r"\[rewrite\] the rewrite cannot apply this plan"):
        apply_plan(linear_model(), {"not_here": "fp16"})  # the library function answers in one line
    with pytest.raises(MpexportError, match="unknown io types"):
        ApplyPlan({}, io_types="fp8")


def test_apply_plan_ensures_fail_on_a_model_that_breaks_the_plan() -> None:
    """The ensures are lint's contract: a model whose planned FP16 node computes in FP32 fails them."""
    rewrite = ApplyPlan({"mm": "fp16"})
    with pytest.raises(ir.passes.PostconditionError, match="realized precision = plan"):
        rewrite.ensures(linear_model())  # never rewritten: mm is still FP32


def test_strict_emulation_rounds_every_low_value_and_shows_overflow(tmp_path) -> None:
    big = np.full((4, 4), 300.0, np.float32)  # 4 * 300 * x: beyond 65504 for x of 60 and more
    model = linear_model(big)
    ApplyPlan({"mm": "fp16", "add": "fp16", "relu": "fp32"})(model)
    emulation = StrictEmulation()
    emulation(model)
    for node in model.graph:
        for output in node.outputs:
            if output.dtype == ir.DataType.FLOAT16:
                assert added_role(node) == ROUNDING, node.name
    x = np.full((1, 4), 60.0, np.float32)
    (y,) = run(model, tmp_path, {"x": x})
    assert np.isinf(y).all()  # 72000 does not fit FP16: the emulation says so, as a GPU would


def test_strict_emulation_requires_low_precision_outside_subgraph_bodies() -> None:
    body = helper.make_graph([helper.make_node("Cast", ["x"], ["inner"], name="inner_cast", to=TensorProto.FLOAT16)],
                             "then", [], [helper.make_tensor_value_info("inner", TensorProto.FLOAT16, ["n", 4])])
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], name="branch", then_branch=body, else_branch=body)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["n", 4])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    with pytest.raises(EmulationError, match="inside the subgraph of 'branch'"):
        StrictEmulation()(model)


def test_range_probes_measure_every_float_value(tmp_path) -> None:
    weight = RNG.normal(size=(4, 4)).astype(np.float32)
    model = linear_model(weight)
    probes = AddRangeProbes()
    probes(model)
    assert [probe.value for probe in probes.probes] == ["h", "z", "y"]
    names = [value.name for value in model.graph.outputs]
    assert names[0] == "y" and len(names) == 1 + 4 * 3
    x = RNG.normal(size=(2, 4)).astype(np.float32)
    results = dict(zip(names, run(model, tmp_path, {"x": x}), strict=True))
    plain = run(linear_model(weight), tmp_path, {"x": x})[0]
    probe = probes.probes[-1]
    assert float(results[probe.high]) == pytest.approx(float(plain.max()))
    assert float(results[probe.low]) == pytest.approx(float(plain.min()))
    assert tuple(results[probe.shape]) == (2, 4)


def test_exposed_intermediates_come_back_in_graph_order(tmp_path) -> None:
    model = linear_model()
    exposed = ExposeIntermediates()
    exposed(model)
    assert exposed.names == ["h", "z", "y"]
    outputs = [value.name for value in model.graph.outputs]
    assert set(exposed.names) <= set(outputs) and outputs.count("y") == 1


def test_apply_plan_answers_only_for_what_it_changes() -> None:
    """A model's own low -> FP32 -> low casts (``x.half().float().half()`` in its code) are the model's: lint reports
    them, the rewrite's ensures do not blame the rewrite for them."""
    nodes = [helper.make_node("Cast", ["x"], ["a"], name="c1", to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["a"], ["b"], name="c2", to=TensorProto.FLOAT),
             helper.make_node("Cast", ["b"], ["c"], name="c3", to=TensorProto.FLOAT16),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    report = apply_plan(model, {"c1": "fp16", "c2": "fp32", "c3": "fp16", "relu": "fp16"})
    assert report.casts_inserted == 0 and node_types(model)["relu"] == ir.DataType.FLOAT16
