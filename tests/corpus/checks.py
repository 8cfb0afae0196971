"""Holding a corpus entry's convert and verify to its expectations, from what the commands leave: exit codes, the
error line, and the bundle's ``plan.json``, ``report.json`` and ``model.fp32.onnx``.

Every converted entry is held to three rules besides its own expectations: no node whose outputs ONNX Runtime types
as floating point is planned "not floating point"; every node that multiplies and accumulates is counted in the
plan's MAC total (so the printed low-precision share is the true one); verify covers every sample of the set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from tests.corpus.entry import Entry

# Op types whose work is multiply-accumulates: a plan that leaves one of them out of its MAC total misreports the
# low-precision share (the contrib ops and the recurrent ones included).
MAC_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "Attention", "MultiHeadAttention",
                     "LSTM", "GRU", "RNN", "FusedMatMul", "FusedConv", "FusedGemm"})
FLOAT_TYPES = frozenset({"tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"})


@dataclass
class Outcome:
    """What ``convert`` and ``verify`` did with one entry."""

    convert_exit: int
    convert_error: str
    bundle: Path
    convert_output: str = ""
    verify_exit: int | None = None
    verify_error: str = ""
    plan: dict | None = None
    report: dict | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def low_mac_share(self) -> float | None:
        """The plan's low-precision MAC share, as convert prints it."""
        return ((self.plan or {}).get("summary", {}).get("macs") or {}).get("low_precision_share")

    @property
    def verdict(self) -> str:
        """``pass``/``fail`` from the report, ``refused`` (exit 2), or ``-`` when verify did not run."""
        if self.report is not None:
            return str(self.report.get("verdict"))
        if self.verify_exit == 2:
            return "refused"
        return "-" if self.verify_exit is None else f"exit {self.verify_exit}"


def first_line(text: str) -> str:
    """The first non-empty line of ``text`` ('' when none)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def failure_line(outcome: Outcome) -> str:
    """Why convert failed: its error line, or for exit 1 (a failed lint or export check, said on stdout) the first
    line of its output that says "fail"."""
    return first_line(outcome.convert_error) or next(
        (line.strip(" │┃") for line in outcome.convert_output.splitlines() if "fail" in line.lower()), "")


def samples_in(val: Path) -> int:
    """The number of samples in an ``.npz`` validation set (the length of its arrays; a scalar input's array holds
    one value per sample)."""
    with np.load(val) as data:
        return int(data[data.files[0]].shape[0])


def load_bundle_files(outcome: Outcome) -> None:
    """Read ``plan.json`` and ``report.json`` from the bundle where they exist."""
    plan, report = outcome.bundle / "plan.json", outcome.bundle / "report.json"
    outcome.plan = json.loads(plan.read_text()) if plan.is_file() else None
    outcome.report = json.loads(report.read_text()) if report.is_file() else None


def float_producers(model_path: Path) -> set[str] | None:
    """Names of the main-graph nodes with a floating-point output, as ONNX Runtime types them (every node output
    made a graph output, the session built without optimisations; contrib ops included). None when ONNX Runtime
    cannot load the model that way."""
    import onnxruntime as ort

    model = onnx.load(str(model_path), load_external_data=False)
    declared = {value.name for value in model.graph.output}
    producer = {}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in declared:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
            if name:
                producer[name] = node.name
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - a model ORT cannot type this way is not judged by this rule
        return None
    return {producer[output.name] for output in session.get_outputs()
            if output.type in FLOAT_TYPES and output.name in producer}


def plan_problems(entry: Entry, plan: dict, fp32_model: Path) -> list[str]:
    """What the plan gets wrong against the entry's expectations and the rules every plan follows."""
    problems = []
    nodes = plan.get("nodes", [])
    for rule in entry.expect.planned:
        matching = [node for node in nodes if node["op_type"] == rule.op_type]
        precisions = sorted({node["precision"] for node in matching})
        if not matching:
            problems.append(f"no {rule.op_type} node in the plan (expected {rule.describe()})")
        elif rule.every and precisions != [rule.precision]:
            wrong = next(node for node in matching if node["precision"] != rule.precision)
            problems.append(f"expected {rule.describe()}: {wrong['name']} is {wrong['precision']} "
                            f"({wrong['reason']})")
        elif not rule.every and rule.precision not in precisions:
            problems.append(f"expected {rule.describe()}: all are {'/'.join(precisions)}")
    floats = float_producers(fp32_model) if fp32_model.is_file() else None
    if floats is not None:
        misjudged = [node for node in nodes if node.get("rule") == "non-float" and node["name"] in floats]
        if misjudged:
            ops = sorted({node["op_type"] for node in misjudged})
            problems.append(f"{len(misjudged)} floating-point nodes planned 'not floating point' ({', '.join(ops)})")
    uncounted = sorted({node["op_type"] for node in nodes if node["op_type"] in MAC_OPS and not node.get("macs")})
    if uncounted:
        problems.append(f"MACs not counted for {', '.join(uncounted)}: the printed share leaves them out")
    macs = plan.get("summary", {}).get("macs") or {}
    if macs.get("total") != sum(node.get("macs") or 0 for node in nodes):
        problems.append(f"MAC total {macs.get('total')} is not the sum of the nodes' MACs")
    share = macs.get("low_precision_share")
    if entry.expect.min_low_mac_share is not None and (share is None or share < entry.expect.min_low_mac_share):
        problems.append(f"low-precision MAC share {share} below {entry.expect.min_low_mac_share}")
    return problems


def refusal_problems(step: str, exit_code: int | None, error: str, fragments: tuple[str, ...]) -> list[str]:
    """A refusal is exit 2 with one line on stderr, ``error:`` first, naming every fragment, no traceback."""
    lines = [line for line in error.splitlines() if line.strip()]
    if exit_code != 2:
        return [f"{step}: expected a refusal (exit 2), got exit {exit_code}"]
    problems = [f"{step}: the refusal is {len(lines)} lines, not one"] if len(lines) != 1 else []
    if "Traceback" in error:
        problems.append(f"{step}: a traceback")
    problems += [f"{step}: the refusal does not name {fragment!r}" for fragment in fragments
                 if fragment not in (lines[0] if lines else "")]
    return problems


def judge(entry: Entry, outcome: Outcome, samples: int) -> list[str]:
    """Every way ``outcome`` falls short of ``entry``'s expectations (empty: as expected)."""
    expect = entry.expect
    if expect.convert == "refused":
        return refusal_problems("convert", outcome.convert_exit, outcome.convert_error, expect.refusal)
    if outcome.convert_exit != 0:
        return [f"convert exit {outcome.convert_exit}: {failure_line(outcome)}"]
    problems = plan_problems(entry, outcome.plan or {}, outcome.bundle / "model.fp32.onnx") \
        if outcome.plan is not None else ["convert wrote no plan.json"]
    if expect.verify == "refused":
        return problems + refusal_problems("verify", outcome.verify_exit, outcome.verify_error, expect.refusal)
    if outcome.verify_exit != 0 or outcome.verdict != "pass":
        detail = first_line(outcome.verify_error) or "; ".join(map(str, (outcome.report or {}).get("failures", [])))
        return [*problems, f"verify exit {outcome.verify_exit}, verdict {outcome.verdict}: {detail[:300]}"]
    covered = (outcome.report or {}).get("samples")
    if covered != samples:
        problems.append(f"verify covered {covered} samples of {samples}")
    return problems
