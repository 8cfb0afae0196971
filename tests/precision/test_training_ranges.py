"""Range evidence from training: the monitor's record, where it lands, the join, and the plan's range rule.

The acceptance test (issue 25): a tiny model trained a few steps on the CPU under BF16 autocast, where one rare
training input drives ``big.fc``'s output beyond 65504 and the validation data never does. With the record, an
FP16 convert on the clean validation set keeps ``big.fc`` FP32 citing training evidence and verify on data holding
the rare input passes; without it, the same verify fails.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mpexport
from mpexport.capture.provenance import NodeProvenance
from mpexport.precision.options import PlanOptions
from mpexport.precision.training_ranges import join_ranges, op_base, range_reason
from mpexport.sources.range_monitor import RangeMonitor, function_name
from mpexport.sources.training_ranges import find_training_ranges, parse_ranges

RARE = 2000.0


class Big(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * 0.001


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big = Big()
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.big(x))))


def make_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.big.fc.weight[:, 0] = 60.0
    return net


def batches(steps: int, rare_step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    found = [torch.randn(16, 8, generator=generator) for _ in range(steps)]
    found[rare_step][3, 0] = RARE
    return found


def train(net: nn.Module, data: list[torch.Tensor], every: int = 1) -> RangeMonitor:
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-9)
    with mpexport.RangeMonitor(net, every=every) as monitor:
        for batch in data:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = net(batch).float().square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            monitor.step()
    return monitor


def test_monitor_records_per_module_op_and_call() -> None:
    net = make_net()
    monitor = train(net, batches(4, rare_step=2), every=2)
    assert (monitor.steps, monitor.sampled_steps) == (4, 2)  # steps 0 and 2
    record = monitor.ops[("big.fc", "linear", 0)]
    assert record.max_abs > 65504 and record.steps_over == 1 and record.over_fp16 >= 1 and record.steps == 2
    assert ("big", "mul", 0) in monitor.ops and ("", "relu", 0) in monitor.ops and ("head", "linear", 0) in monitor.ops
    assert not any(key[1] in ("t", "addmm", "view") for key in monitor.ops)  # the autocast level, no data movement
    assert "1 exceeded the FP16 range (max 65504), in big.fc" in monitor.summary()
    assert not net.big.fc._forward_hooks and not net._forward_pre_hooks  # nothing left installed


def test_unsampled_steps_install_nothing() -> None:
    net = make_net()
    seen = []
    with mpexport.RangeMonitor(net, every=3) as monitor:
        for _ in range(5):
            seen.append(bool(net.big._forward_pre_hooks))
            net(torch.randn(2, 8))
            monitor.step()
    assert seen == [True, False, False, True, False]


def test_grad_scaler_skipped_steps_are_not_evidence() -> None:
    net = make_net()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-9)
    with mpexport.RangeMonitor(net, every=1, scaler=scaler) as monitor:
        for batch in (torch.randn(4, 8), torch.full((4, 8), float("inf"))):
            scaler.scale(net(batch).square().mean()).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            monitor.step()
    assert (monitor.sampled_steps, monitor.skipped_steps) == (1, 1)
    assert monitor.ops[("big.fc", "linear", 0)].nonfinite == 0


def test_function_names_match_the_exported_ops() -> None:
    assert function_name(torch.Tensor.__add__) == "add" and function_name(torch.Tensor.__radd__) == "add"
    assert function_name(torch.Tensor.__truediv__) == "div" and function_name(torch.nn.functional.linear) == "linear"
    assert op_base("aten.add_.Tensor") == "add" and op_base("aten.linear.default") == "linear"


def records(*rows: tuple[str, str, str, str]) -> list[NodeProvenance]:
    return [NodeProvenance(name, "MatMul", module, None, op, origin=origin, autocast_op=op)
            for name, module, op, origin in rows]


def ranges_json(ops: list[dict], modules: list[str], sampled: int = 10) -> bytes:
    return json.dumps({"format": "mpexport.training_ranges", "version": 1, "every": 1, "steps": sampled,
                       "sampled_steps": sampled, "skipped_steps": 0, "modules": modules, "ops": ops}).encode()


def op(module: str, name: str, index: int, peak: float, over: int = 0) -> dict:
    return {"module": module, "op": name, "index": index, "max_abs": peak, "nonfinite": 0, "over_fp16": over,
            "steps_over": over, "steps": 10}


def test_join_by_module_op_and_call_order() -> None:
    graph = records(("n_mm", "a", "aten.linear.default", "linear"), ("n_add", "a", "aten.linear.default", "linear"),
                    ("n_mm2", "a", "aten.linear.default", "linear_1"), ("n_relu", "", "aten.relu.default", "relu"))
    parsed, notes = parse_ranges(ranges_json([op("a", "linear", 1, 9e4, 3), op("", "relu", 0, 1.0),
                                              op("a", "linear", 2, 5.0), op("a", "dropout", 0, 1.0)],
                                             ["", "a"]), "test")
    assert parsed is not None and not notes
    evidence, refused = join_ranges(graph, parsed)
    assert evidence is not None and not refused
    assert set(evidence.nodes) == {"n_mm2", "n_relu"} and evidence.nodes["n_mm2"].max_abs == 9e4
    assert len(evidence.notes) == 1 and "1 of 4 recorded ops join no node (e.g. a:linear#2)" in evidence.notes[0]
    reason = range_reason("fp16", 32752.0, 2.0, 100.0, evidence.nodes["n_mm2"], 10)
    assert reason == "range: training: max |x| 9e+04 on 3 of 10 sampled steps > 65504, the FP16 max"
    assert range_reason("fp16", 32752.0, 2.0, 1e5, evidence.nodes["n_mm2"], 10).startswith(
        "range: output reached 1e+05 on calibration data")


def test_a_record_of_another_model_is_not_used() -> None:
    graph = records(("n_mm", "encoder.fc", "aten.linear.default", "linear"))
    parsed, _ = parse_ranges(ranges_json([op("fc", "linear", 0, 9e4, 3)], ["", "fc"]), "other")
    assert parsed is not None
    evidence, refused = join_ranges(graph, parsed)
    assert evidence is None and "recorded on another model (it has no module encoder.fc)" in refused[0]


@pytest.mark.parametrize("data", [b"not json", b"[]", ranges_json([{"module": "a"}], ["a"]),
                                  ranges_json([op("a", "linear", 0, -1.0)], ["a"]), b"x" * (9 << 20)])
def test_bad_records_are_noted_not_used(data: bytes) -> None:
    parsed, notes = parse_ranges(data, "bad")
    assert parsed is None and notes and notes[0].startswith("training ranges bad not used")


def test_records_are_found_in_the_archive_and_beside_a_checkpoint(tmp_path: Path) -> None:
    net = make_net()
    monitor = train(net, batches(2, rare_step=1))
    archive = mpexport.save(net, tmp_path / "m.pt2", (torch.randn(2, 8),), ranges=monitor)
    names = zipfile.ZipFile(archive).namelist()
    assert any(name.endswith("/extra/training_ranges.json") for name in names)
    found, notes = find_training_ranges(archive)
    assert found is not None and not notes and found.sampled_steps == 2
    checkpoint = tmp_path / "ckpt.pt"
    torch.save(net.state_dict(), checkpoint)
    assert find_training_ranges(checkpoint) == (None, [])
    monitor.save(tmp_path)
    beside, _ = find_training_ranges(checkpoint)
    assert beside is not None and beside.evidence.endswith("mpexport_ranges.json")
    fifo = tmp_path / "fifo" / "mpexport_ranges.json"
    fifo.parent.mkdir()
    import os
    os.mkfifo(fifo)
    refused, notes = find_training_ranges(fifo.parent / "ckpt.pt")
    assert refused is None and "FIFO" in notes[0]


def test_acceptance_training_evidence_makes_fp16_deployment_safe(tmp_path: Path) -> None:
    """Issue 25's first acceptance bullet (see the module docstring)."""
    net = make_net()
    monitor = train(net, batches(6, rare_step=4))
    example = (torch.randn(4, 8),)
    dim = {"x": {0: torch.export.Dim("batch")}}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with_record = mpexport.save(net, tmp_path / "with.pt2", example, dynamic_shapes=dim, ranges=monitor)
        without = mpexport.save(net, tmp_path / "without" / "m.pt2", example, dynamic_shapes=dim)
    generator = np.random.default_rng(2)
    clean = generator.standard_normal((64, 8)).astype(np.float32)
    rare = clean.copy()
    rare[5, 0] = rare[40, 0] = RARE
    np.savez(tmp_path / "clean.npz", x=clean)
    np.savez(tmp_path / "rare.npz", x=rare)
    options = PlanOptions(target="fp16")
    mpexport.convert(with_record, val_data=tmp_path / "clean.npz", out=tmp_path / "kept", plan_options=options,
                     engine="off")
    plan = mpexport.read_plan(mpexport.Bundle.open(tmp_path / "kept"))
    fc = [node for node in plan.nodes if node.module == "big.fc" and node.precision != "none"]
    assert fc and all(node.precision == "fp32" and node.reason.startswith("range: training: max |x|")
                      and "sampled steps > 65504, the FP16 max" in node.reason for node in fc)
    assert any(note.startswith("training ranges (training_ranges.json in with.pt2): 6 sampled steps")
               for note in plan.notes)
    assert mpexport.Bundle.open(tmp_path / "kept").has("training_ranges")
    assert any(note.startswith("training ranges") for note in mpexport.inspect(tmp_path / "kept").to_json()["notes"])
    assert mpexport.verify(tmp_path / "kept", val_data=tmp_path / "rare.npz").verdict == "pass"

    mpexport.convert(without, val_data=tmp_path / "clean.npz", out=tmp_path / "plain", plan_options=options,
                     engine="off")
    assert mpexport.verify(tmp_path / "plain", val_data=tmp_path / "rare.npz").verdict == "fail"
    mpexport.convert(with_record, val_data=tmp_path / "clean.npz", out=tmp_path / "off", engine="off",
                     plan_options=PlanOptions(target="fp16", training_ranges=False))
    assert not mpexport.Bundle.open(tmp_path / "off").has("training_ranges")
    assert mpexport.verify(tmp_path / "off", val_data=tmp_path / "rare.npz").verdict == "fail"
