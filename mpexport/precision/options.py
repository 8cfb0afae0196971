"""What a plan is asked for: the policy, the target type, the user's overrides (modules, ops and nodes forced to FP32
or low precision) and the range rule's settings, from options or a TOML policy file."""

from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mpexport.base.dtypes import BF16, FP16
from mpexport.base.errors import MpexportError
from mpexport.base.policies import DEFAULT_POLICY, POLICY_NAMES
from mpexport.capture.provenance import NodeProvenance
from mpexport.precision.policy import op_key

STAGE = "plan"
DEFAULT_HEADROOM = 2.0


@dataclass
class Overrides:
    """User overrides: regexes on module paths, op types (``Softmax``) or aten ops (``aten.gelu``), node names."""

    keep_fp32_modules: list[str] = field(default_factory=list)
    keep_fp32_ops: list[str] = field(default_factory=list)
    keep_fp32_nodes: list[str] = field(default_factory=list)
    force_low_modules: list[str] = field(default_factory=list)
    force_low_ops: list[str] = field(default_factory=list)
    force_low_nodes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for pattern in (*self.keep_fp32_modules, *self.force_low_modules):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise MpexportError(f"module pattern '{pattern}' is not a regular expression: {exc}",
                                    stage=STAGE) from None

    def merged(self, other: Overrides) -> Overrides:
        """These overrides plus ``other``'s."""
        return Overrides(**{key: [*getattr(self, key), *getattr(other, key)] for key in asdict(self)})

    def decide(self, record: NodeProvenance) -> tuple[str, str] | None:
        """``("fp32"|"low", reason)`` when an override applies to this node (keep FP32 wins)."""
        for kind, modules, ops, nodes in (
            ("fp32", self.keep_fp32_modules, self.keep_fp32_ops, self.keep_fp32_nodes),
            ("low", self.force_low_modules, self.force_low_ops, self.force_low_nodes),
        ):
            verb = "kept FP32" if kind == "fp32" else "forced to low precision"
            if record.name in nodes:
                return kind, f"override: node {record.name} {verb}"
            for pattern in modules:
                if record.module is not None and re.search(pattern, record.module):
                    return kind, f"override: module '{record.module or '<root>'}' {verb} (pattern '{pattern}')"
            for op in ops:
                if op == record.op_type or (record.aten and op_key(record.aten) == op_key(op)) or (
                        record.autocast_op and op_key(record.autocast_op) == op_key(op)):
                    return kind, f"override: op {op} {verb}"
        return None


@dataclass
class PlanOptions:
    """How to plan: the training ``policy`` (``cuda-fp16``...), the deployment ``target`` low type (default:
    the policy's), overrides, and the range rule (on when statistics are given; ``headroom`` divides the
    type's max to get the safe limit)."""

    policy: str = ""
    """Empty: what the model file records about its training, else ``cuda-fp16``."""
    target: str | None = None
    torch_version: str | None = None
    overrides: Overrides = field(default_factory=Overrides)
    range_check: bool = True
    headroom: float = DEFAULT_HEADROOM
    training_ranges: bool = True
    """Use range evidence recorded in training (``RangeMonitor``) where the model has it."""

    @property
    def low(self) -> str:
        """The low-precision type of the deployed model."""
        return self.target or (self.policy or DEFAULT_POLICY).split("-")[1]

    @staticmethod
    def from_file(path: str | Path) -> PlanOptions:
        """Options from a TOML policy file (see :func:`load_overrides`); one-line errors for a bad file."""
        overrides, settings = load_overrides(path)
        policy = settings.get("policy", "")
        if policy and policy not in POLICY_NAMES:
            raise MpexportError(f"policy file '{path}': unknown policy '{policy}'", stage=STAGE,
                                hint=f"use one of {', '.join(POLICY_NAMES)}")
        target = settings.get("target")
        if target is not None and target not in (FP16, BF16):
            raise MpexportError(f"policy file '{path}': unknown target '{target}'", stage=STAGE,
                                hint="use fp16 or bf16")
        range_check = settings.get("range_check", True)
        headroom = settings.get("headroom", DEFAULT_HEADROOM)
        if not isinstance(range_check, bool) or not isinstance(headroom, (int, float)) or headroom < 1:
            raise MpexportError(f"policy file '{path}': range_check must be true/false and headroom a number >= 1",
                                stage=STAGE)
        return PlanOptions(policy=policy, target=target, overrides=overrides, range_check=range_check,
                           headroom=float(headroom))

    def overlaid(self, other: PlanOptions | None) -> PlanOptions:
        """These options with ``other``'s on top (a command line over a policy file): ``other``'s policy, target,
        torch version and headroom win where set, overrides are merged, the range rule runs only if both
        want it."""
        if other is None:
            return replace(self)
        return PlanOptions(policy=other.policy or self.policy, target=other.target or self.target,
                           torch_version=other.torch_version or self.torch_version,
                           overrides=self.overrides.merged(other.overrides),
                           range_check=self.range_check and other.range_check,
                           headroom=other.headroom if other.headroom != DEFAULT_HEADROOM else self.headroom,
                           training_ranges=self.training_ranges and other.training_ranges)


def top_module(module: str | None) -> str:
    """The first part of a module path (``<root>`` for the model itself, ``<unknown>`` without one)."""
    if module is None:
        return "<unknown>"
    return module.split(".")[0] if module else "<root>"


def load_overrides(path: str | Path) -> tuple[Overrides, dict[str, Any]]:
    """Read a TOML policy file: ``[keep_fp32]`` and ``[force_low]`` tables with ``modules``/``ops``/``nodes``
    lists, plus optional top-level ``policy``, ``target`` and ``range_check``. Returns the overrides and the
    top-level settings."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise MpexportError(f"policy file '{path}' does not exist", stage=STAGE) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MpexportError(f"policy file '{path}' is not valid TOML: {exc}", stage=STAGE) from None
    known = {"keep_fp32", "force_low", "policy", "target", "range_check", "headroom"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise MpexportError(f"policy file '{path}': unknown key(s) {', '.join(unknown)}", stage=STAGE,
                            hint=f"known keys: {', '.join(sorted(known))}")
    lists: dict[str, list[str]] = {}
    for table, prefix in (("keep_fp32", "keep_fp32"), ("force_low", "force_low")):
        section = data.get(table, {})
        if not isinstance(section, dict) or set(section) - {"modules", "ops", "nodes"}:
            raise MpexportError(f"policy file '{path}': [{table}] takes modules, ops and nodes lists", stage=STAGE)
        for key in ("modules", "ops", "nodes"):
            values = section.get(key, [])
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise MpexportError(f"policy file '{path}': {table}.{key} must be a list of strings", stage=STAGE)
            lists[f"{prefix}_{key}"] = values
    settings: dict[str, Any] = {key: data[key] for key in ("policy", "target", "range_check", "headroom")
                                if key in data}
    return Overrides(**lists), settings
