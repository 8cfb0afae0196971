"""Constants a converter changed beyond rounding: found by name in the candidate, said by ``verify --candidate``.

The candidate is onnxconverter-common's real FP16 model (it clamps constants into [1e-7, 1e4]); mpexport's own mixed
model of the same graph, which saturates an attention mask's sentinel to FP16's largest value, changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import mpexport
from mpexport.graph.constants import changed_constants

MASK = np.float32(-3.4028234663852886e38)
EPSILON = np.float32(1e-12)


def masked_norm(path: Path) -> Path:
    """scores = x @ w + (1 - mask) * MASK; y = scores / sqrt(mean(scores^2) + EPSILON): a mask sentinel and a tiny
    epsilon, as a BERT exported by the TorchScript exporter has them."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Sub", ["one", "mask"], ["inverted"], name="invert"),
             helper.make_node("Mul", ["inverted", "sentinel"], ["bias"], name="scale_mask"),
             helper.make_node("Add", ["h", "bias"], ["scores"], name="add_mask"),
             helper.make_node("Mul", ["scores", "scores"], ["square"], name="square"),
             helper.make_node("ReduceMean", ["square"], ["mean"], name="mean", keepdims=1),
             helper.make_node("Add", ["mean", "eps"], ["shifted"], name="add_eps"),
             helper.make_node("Sqrt", ["shifted"], ["root"], name="sqrt"),
             helper.make_node("Div", ["scores", "root"], ["y"], name="div")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
                     helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w"),
         numpy_helper.from_array(np.float32(1.0), "one"), numpy_helper.from_array(MASK, "sentinel"),
         numpy_helper.from_array(EPSILON, "eps")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from onnxconverter_common.float16 import convert_float_to_float16

    root = tmp_path_factory.mktemp("constants")
    fp32 = masked_norm(root / "fp32.onnx")
    with pytest.warns(UserWarning, match="truncated"):
        converted = convert_float_to_float16(onnx.load(fp32), keep_io_types=True)
    onnx.save(converted, root / "occ.onnx")
    rng = np.random.default_rng(1)
    np.savez(root / "val.npz", x=rng.standard_normal((16, 8)).astype(np.float32),
             mask=np.ones((16, 4), np.float32))  # nothing masked: the data cannot show the mask's change
    return {"fp32": fp32, "occ": root / "occ.onnx", "val": root / "val.npz", "root": root}


def test_the_clamped_constants_are_found_by_name(files: dict[str, Path]) -> None:
    changed = {item.name: item for item in changed_constants(ir.load(str(files["fp32"])), ir.load(str(files["occ"])))}
    assert set(changed) == {"sentinel", "eps"}, changed
    assert (changed["sentinel"].reference, changed["sentinel"].candidate) == (float(MASK), -10000.0)
    assert changed["eps"].candidate == pytest.approx(1e-7, rel=0.2)  # 1e-7 as FP16 holds it (a subnormal)
    assert changed["eps"].describe() == "'eps' 1e-12 -> 1.19e-07"


def test_verify_candidate_says_what_the_converter_changed(cli, files: dict[str, Path]) -> None:
    result = cli("verify", "--reference", files["fp32"], "--candidate", files["occ"], "--val-data", files["val"],
                 "--json")
    report = json.loads(result.stdout)
    note = next(note for note in report["notes"] if "constants are not the reference's rounded" in note)
    assert note.startswith("2 of the candidate's constants") and "'sentinel' -3.4e+38 -> -1e+04" in note, note
    ours = files["root"] / "ours"
    mpexport.convert(files["fp32"], out=ours, val_data=files["val"])
    mixed = cli("verify", "--reference", files["fp32"], "--candidate", ours / "model.mixed.onnx", "--val-data",
                files["val"], "--json")
    assert mixed.exit_code == 0, mixed.stdout + mixed.stderr
    assert not any("constants are not" in note for note in json.loads(mixed.stdout)["notes"])


@pytest.mark.parametrize(("written", "changed"), [
    (np.float16(-np.inf), False),  # FP16 rounding of -3.4e38
    (np.float16(-65504.0), False),  # saturated to the largest finite value, as mpexport writes a mask sentinel
    (np.float16(-10000.0), True),  # clamped: another value
])
def test_overflow_rounds_to_infinity_or_the_largest_value(written: np.float16, changed: bool) -> None:
    def model(value: np.ndarray) -> ir.Model:
        graph = helper.make_graph([helper.make_node("Identity", ["c"], ["y"])], "g", [],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
                                  [numpy_helper.from_array(np.asarray(value), "c")])
        return ir.from_proto(helper.make_model(graph))

    assert bool(changed_constants(model(MASK), model(written))) == changed
