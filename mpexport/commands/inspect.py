"""``inspect``: the precision plan of an output directory, summarised for people and for CI."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpexport.bundle.names import PLAN
from mpexport.bundle.store import Bundle
from mpexport.precision.plan import read_plan


@dataclass
class InspectReport:
    """The plan of one bundle, its FP32 keep-list grouped by reason and module, the difference from converting
    every floating-point node to low precision, where the policy came from, and the state of every verdict."""

    directory: Path
    plan: dict[str, Any]
    keep_list: list[dict[str, Any]]
    naive_difference: dict[str, Any]
    policy_source: str = ""
    verdicts: dict[str, str] = field(default_factory=dict)
    damaged: dict[str, str] = field(default_factory=dict)
    """Artifacts whose files no longer match the manifest, and how (verdicts over them mean nothing)."""
    repair: dict[str, Any] | None = None
    """What ``repair`` changed in the plan, if it ran."""

    def to_json(self) -> dict[str, Any]:
        """Policy, target, summary, keep-list, naive difference and verdicts (the per-node plan stays in
        plan.json)."""
        return {"directory": str(self.directory), "policy": self.plan["policy"], "target": self.plan["target"],
                "policy_source": self.policy_source, "summary": self.plan["summary"],
                "notes": self.plan.get("notes", []), "keep_list": self.keep_list,
                "naive_difference": self.naive_difference, "verdicts": self.verdicts, "damaged": self.damaged,
                "repair": self.repair}


def inspect(directory: str | Path) -> InspectReport:
    """Open the bundle (its plan checked against the manifest), read the plan back and group its FP32 nodes;
    report every verdict's state and any artifact that changed on disk."""
    bundle = Bundle.open(directory, uses=(PLAN,))
    plan = read_plan(bundle).to_json()
    float_nodes = [node for node in plan["nodes"] if node["precision"] != "none"]
    kept = [node for node in float_nodes if node["precision"] != plan["target"]]
    record = bundle.manifest.plan
    return InspectReport(bundle.directory, plan, _group(kept), {
        "float_nodes": len(float_nodes), "kept_fp32": len(kept),
        "by_rule": dict(sorted(Counter(node["rule"] for node in kept).items())),
    }, record.policy_source if record else "", verdicts(bundle),
        {key: problem for key, problem in bundle.integrity().items() if problem}, bundle.manifest.repair)


def verdicts(bundle: Bundle) -> dict[str, str]:
    """Each verdict of the bundle in one line: its result and whether it still holds."""
    manifest = bundle.manifest
    states = {}
    for name, record, result in (
            ("export check", manifest.export_check, manifest.export_check and
             ("pass" if manifest.export_check.passed else "FAIL")),
            ("lint", manifest.lint, manifest.lint and ("pass" if manifest.lint.ok else "FAIL")),
            ("engine check", manifest.engine, manifest.engine and
             ("pass" if manifest.engine.check.get("ok", True) else "FAIL")),
            ("verify", manifest.verify, manifest.verify and
             ("pass" if manifest.verify.verdict == "pass" else "FAIL"))):
        if record is None:
            states[name] = "not run"
            continue
        stale = bundle.staleness(record)
        states[name] = f"{result}" + (f" (stale: {stale})" if stale else "")
    return states


def _group(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for node in nodes:
        module = node["module"] if node["module"] is not None else "<unknown>"
        groups[(_generic_reason(node["reason"]), _module_pattern(module or "<root>"))].append(node)
    rows = [{"reason": reason, "module": module, "count": len(members),
             "op_types": sorted({member["op_type"] for member in members}),
             "nodes": [member["name"] for member in members]}
            for (reason, module), members in groups.items()]
    return sorted(rows, key=lambda row: (-row["count"], row["reason"], row["module"]))


def _generic_reason(reason: str) -> str:
    """Reasons without the per-node numbers, so nodes kept for the same rule group together."""
    return re.sub(r"reached [^ ]+ ", "reached … ", reason)


def _module_pattern(module: str) -> str:
    """``blocks.3.attn`` -> ``blocks.*.attn``: repeated layers group together."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", module)
