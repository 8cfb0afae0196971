"""``inspect``: the precision plan of an output directory, summarised for people and for CI."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpexport.artifacts import read_manifest
from mpexport.errors import MpexportError


@dataclass
class InspectReport:
    """The plan of one directory, its FP32 keep-list grouped by reason and module, and the difference from
    converting every floating-point node to low precision."""

    directory: Path
    plan: dict[str, Any]
    keep_list: list[dict[str, Any]]
    naive_difference: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """Policy, target, summary, keep-list and naive difference (the per-node plan stays in plan.json)."""
        return {"directory": str(self.directory), "policy": self.plan["policy"], "target": self.plan["target"],
                "summary": self.plan["summary"], "notes": self.plan.get("notes", []),
                "keep_list": self.keep_list, "naive_difference": self.naive_difference}


def inspect_plan(directory: str | Path) -> InspectReport:
    """Read ``DIR/plan.json`` (via the manifest) and group its FP32 nodes."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    name = manifest["artifacts"].get("plan")
    if not name:
        raise MpexportError(f"'{directory}' has no precision plan", stage="inspect",
                            hint="run mpexport convert with this version to make one")
    try:
        plan = json.loads((directory / name).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MpexportError(f"cannot read the plan '{directory / name}': {exc}", stage="inspect") from None
    float_nodes = [node for node in plan["nodes"] if node["precision"] != "none"]
    kept = [node for node in float_nodes if node["precision"] != plan["target"]]
    return InspectReport(directory, plan, _group(kept), {
        "float_nodes": len(float_nodes), "kept_fp32": len(kept),
        "by_rule": dict(sorted(Counter(node["rule"] for node in kept).items())),
    })


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
