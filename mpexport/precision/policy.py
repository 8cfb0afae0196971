"""Autocast policies as data: which aten ops autocast runs in low precision, FP32, or the widest input type.

PyTorch defines autocast per aten op (``aten/src/ATen/autocast_mode.h/.cpp``) and registers one wrapper kernel per op
under the ``AutocastCPU`` / ``AutocastCUDA`` dispatch keys. :func:`mpexport.precision.extract.extract_policy_table`
reads those registrations from the installed torch and classifies every registered op by *calling its autocast wrapper*:
a dispatch mode below autocast records which dtypes the wrapper passes on, and aborts before any kernel runs. CUDA
wrappers are exercised with fake CUDA tensors, so the CUDA policy is read from the binary on a machine without a GPU.
The tables shipped in ``mpexport/precision/policies/`` were made this way (``python -m mpexport.precision.extract``); a
test re-extracts them from the installed torch so an upgrade cannot silently change the policy. This module only reads
the tables and needs no torch.

Classes (``CastPolicy`` in ATen): ``lower_precision_fp``, ``fp32``, ``fp32_set_opt_dtype`` (FP32 unless a
dtype is given), ``fp32_append_dtype``, ``promote`` (widest floating input), plus ``banned``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import metadata, resources
from typing import Any

from mpexport.base.policies import POLICY_NAMES

LOWER = "lower_precision_fp"
FP32 = "fp32"
FP32_SET_OPT_DTYPE = "fp32_set_opt_dtype"
FP32_APPEND_DTYPE = "fp32_append_dtype"
PROMOTE = "promote"
BANNED = "banned"
FP32_CLASSES = (FP32, FP32_SET_OPT_DTYPE, FP32_APPEND_DTYPE)

DEVICE_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


@dataclass(frozen=True)
class AutocastPolicy:
    """One training policy: device, low-precision dtype and the per-op classes for that device.

    ``classes`` maps op names as ``aten.<name>`` or ``aten.<name>.<overload>`` (``default`` overloads drop the
    suffix, as in :func:`op_key`) to a class.
    """

    name: str
    device: str
    low: str
    torch_version: str
    classes: dict[str, str]

    def op_class(self, aten: str | None) -> str | None:
        """The class of an aten op such as ``aten.softmax.int`` or ``aten.linear.default``; None if unlisted."""
        if not aten:
            return None
        return self.classes.get(op_key(aten))


def op_key(aten: str) -> str:
    """Canonical op name: ``aten.linear.default`` -> ``aten.linear``; ``aten::softmax.int`` -> ``aten.softmax.int``."""
    name = aten.replace("::", ".")
    return name.removesuffix(".default")


def torch_minor(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13``."""
    return ".".join(version.split("+")[0].split(".")[:2])


def available_tables() -> list[str]:
    """Torch versions (``major.minor``) with a shipped policy table."""
    folder = resources.files("mpexport.precision") / "policies"
    return sorted(p.name.removeprefix("autocast-torch-").removesuffix(".json") for p in folder.iterdir()
                  if p.name.startswith("autocast-torch-") and p.name.endswith(".json"))


@cache
def load_table(version: str) -> dict[str, Any]:
    """The shipped table for a torch ``major.minor`` version."""
    path = resources.files("mpexport.precision") / "policies" / f"autocast-torch-{version}.json"
    return json.loads(path.read_text())


def resolve_policy(name: str, torch_version: str | None = None) -> tuple[AutocastPolicy, str | None]:
    """The policy ``name`` (``cuda-fp16``...) for the torch version training used (default: installed).

    Returns the policy and a note when the table of another torch version had to stand in (the nearest
    older one, else the newest).
    """
    from mpexport.base.errors import MpexportError

    if name not in POLICY_NAMES:
        raise MpexportError(f"unknown autocast policy '{name}'", stage="plan",
                            hint=f"use one of {', '.join(POLICY_NAMES)}")
    device, low = name.split("-")
    wanted = torch_minor(torch_version or metadata.version("torch"))
    versions = available_tables()
    chosen = wanted if wanted in versions else _nearest(wanted, versions)
    note = None if chosen == wanted else (
        f"no autocast table for torch {wanted}; using the table of torch {chosen}")
    table = load_table(chosen)
    return AutocastPolicy(name, device, low, table["torch"], dict(table["devices"][device])), note


def diff_tables(old: str, new: str) -> dict[str, dict[str, Any]]:
    """What changed in the autocast lists between two shipped tables (torch ``major.minor``), per device: ops
    ``added`` and ``removed`` (with their class) and ops whose class ``changed`` (``[old, new]``)."""
    before, after = load_table(old)["devices"], load_table(new)["devices"]
    diff: dict[str, dict[str, Any]] = {}
    for device in sorted(set(before) | set(after)):
        was, now = before.get(device, {}), after.get(device, {})
        diff[device] = {
            "added": {op: now[op] for op in sorted(set(now) - set(was))},
            "removed": {op: was[op] for op in sorted(set(was) - set(now))},
            "changed": {op: [was[op], now[op]] for op in sorted(set(was) & set(now)) if was[op] != now[op]},
        }
    return diff


def _nearest(wanted: str, versions: list[str]) -> str:
    def key(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in version.split("."))

    older = [v for v in versions if key(v) <= key(wanted)]
    return max(older, key=key) if older else max(versions, key=key)
