"""The autocast policy tables agree with the installed torch's registered autocast kernels."""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import pytest
import torch

import mpexport
from mpexport.precision.extract import extract_policy_table, registered_ops
from mpexport.precision.plan import PrecisionPlan
from mpexport.precision.policy import (
    FP32,
    FP32_SET_OPT_DTYPE,
    LOWER,
    PROMOTE,
    available_tables,
    diff_tables,
    load_table,
    op_key,
    resolve_policy,
    torch_minor,
)
from tests.toy_models import build_cnn

INSTALLED = torch_minor(torch.__version__)
CUDA_BUILD_ONLY = {"cuda": {"aten._cudnn_rnn"}, "cpu": set()} if torch.version.cuda is None else {"cuda": set(),
                                                                                                  "cpu": set()}
"""Kernels only a CUDA build of torch registers (the tables come from the registry's CUDA builds; a CPU wheel has no
cuDNN): left out when the installed torch is a CPU build."""


def shipped(device: str) -> dict[str, str]:
    """The shipped table of the installed torch for ``device``, as the installed build can register it."""
    table = load_table(INSTALLED)["devices"][device]
    return {op: cls for op, cls in table.items() if op not in CUDA_BUILD_ONLY[device]}


@pytest.fixture(scope="module")
def extracted() -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return extract_policy_table()


def test_a_table_ships_for_the_installed_torch() -> None:
    assert load_table(INSTALLED)["torch"] == INSTALLED


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_table_lists_exactly_the_registered_ops(device: str) -> None:
    """A torch upgrade that adds or drops an autocast kernel fails here."""
    registered = {op_key(name) for name in registered_ops(device)}
    assert set(shipped(device)) == registered


def test_table_classes_match_the_installed_kernels(extracted: dict) -> None:
    """Re-reading every wrapper of the installed torch gives the shipped table, class for class."""
    assert extracted["unresolved"] == {}
    assert extracted["devices"] == {device: shipped(device) for device in extracted["devices"]}


@pytest.mark.parametrize(
    ("device", "op", "cls"),
    [
        # As listed in ATen's autocast_mode.cpp / autocast_mode.h.
        ("cuda", "aten.linear", LOWER), ("cuda", "aten.matmul", LOWER), ("cuda", "aten.conv2d", LOWER),
        ("cuda", "aten.scaled_dot_product_attention", LOWER), ("cuda", "aten.layer_norm", FP32),
        ("cuda", "aten.rms_norm", FP32), ("cuda", "aten.exp", FP32), ("cuda", "aten.log", FP32),
        ("cuda", "aten.pow.Tensor_Scalar", FP32), ("cuda", "aten.rsqrt", FP32),
        ("cuda", "aten.softmax.int", FP32_SET_OPT_DTYPE), ("cuda", "aten.sum", FP32_SET_OPT_DTYPE),
        ("cuda", "aten.addcmul", PROMOTE), ("cuda", "aten.index_put", PROMOTE),
        ("cpu", "aten.conv1d", LOWER), ("cpu", "aten.bmm", LOWER), ("cpu", "aten.cdist", FP32),
        ("cpu", "aten.mse_loss", FP32), ("cpu", "aten.stack", PROMOTE), ("cpu", "aten.cat", PROMOTE),
    ],
)
def test_classes_agree_with_the_source(device: str, op: str, cls: str) -> None:
    assert load_table(INSTALLED)["devices"][device][op] == cls


def test_cpu_keeps_layer_norm_and_softmax_unlisted() -> None:
    table = load_table(INSTALLED)["devices"]["cpu"]
    assert "aten.layer_norm" not in table and "aten.softmax.int" not in table


def test_policy_for_an_unknown_torch_version_uses_the_nearest_table() -> None:
    policy, note = resolve_policy("cuda-fp16", "2.99.1")
    assert policy.torch_version == max(available_tables(), key=_release) and "2.99" in note
    policy, note = resolve_policy("cpu-bf16")
    assert note is None and policy.device == "cpu" and policy.low == "bf16"
    assert policy.op_class("aten.linear.default") == LOWER and policy.op_class("aten.softmax.int") is None


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


RELEASES = [f"2.{minor}" for minor in range(6, 16)]
"""torch 2.6 to the newest release on the registry when the tables were extracted (scripts/extract_policy_tables.py)."""


def test_a_table_ships_for_every_release_from_2_6() -> None:
    assert set(RELEASES) <= set(available_tables())
    for version in RELEASES:
        table = load_table(version)
        assert table["torch"] == version and table["unresolved"] == {}
        assert len(table["devices"]["cuda"]) > 100 and len(table["devices"]["cpu"]) > 100


@pytest.mark.parametrize(("device", "op", "cls"), [
    ("cuda", "aten.linear", LOWER), ("cuda", "aten.conv2d", LOWER), ("cuda", "aten.matmul", LOWER),
    ("cuda", "aten.layer_norm", FP32), ("cuda", "aten.softmax.int", FP32_SET_OPT_DTYPE), ("cuda", "aten.exp", FP32),
    ("cpu", "aten.linear", LOWER), ("cpu", "aten.conv2d", LOWER), ("cpu", "aten.bmm", LOWER),
])
def test_every_release_agrees_on_the_core_ops(device: str, op: str, cls: str) -> None:
    assert {version: load_table(version)["devices"][device].get(op) for version in RELEASES} == \
        dict.fromkeys(RELEASES, cls)


def test_what_changed_between_releases() -> None:
    """The changes the README lists, release by release (a re-extraction that finds others fails here)."""
    changes = {}
    for old, new in itertools.pairwise(RELEASES):
        for device, diff in diff_tables(old, new).items():
            for kind, ops in diff.items():
                for op in ops:
                    changes.setdefault(f"{old}->{new}", set()).add(f"{device} {kind} {op}")
    assert changes == EXPECTED_CHANGES


NAMED_TENSOR_OVERLOADS = {
    "cpu removed aten.index_copy.dimname", "cpu removed aten.prod.dim_Dimname", "cuda removed aten.cumprod.dimname",
    "cuda removed aten.cumsum.dimname", "cuda removed aten.log_softmax.Dimname",
    "cuda removed aten.norm.names_ScalarOpt_dim", "cuda removed aten.prod.dim_Dimname",
    "cuda removed aten.softmax.Dimname", "cuda removed aten.sum.dim_DimnameList",
}
EXPECTED_CHANGES: dict[str, set[str]] = {
    "2.11->2.12": {"cuda added aten.rms_norm"},  # before 2.12 CUDA autocast ran rms_norm in its input type
    # every table comes from the registry's CUDA build (a CPU wheel registers no cuDNN RNN kernel)
    "2.12->2.13": NAMED_TENSOR_OVERLOADS,
    "2.13->2.14": {"cpu added aten.linalg_matrix_sqrth", "cpu removed aten.cholesky", "cpu removed aten.qr",
                   "cuda added aten.linalg_matrix_sqrth"},
}


def test_a_model_recording_torch_2_8_plans_with_the_2_8_table(tmp_path: Path) -> None:
    record = {"training": {"autocast": {"device_type": "cuda", "dtype": "float16"}, "torch": "2.8.0+cu128"}}
    program = torch.export.export(build_cnn(), (torch.zeros(2, 1, 8, 8),))
    torch.export.save(program, tmp_path / "m.pt2", extra_files={"mpexport.json": json.dumps(record)})
    result = mpexport.convert(tmp_path / "m.pt2", out=tmp_path / "out")
    plan = PrecisionPlan.load(tmp_path / "out" / "plan.json")
    assert plan.policy.torch_version == "2.8" and plan.policy.name == "cuda-fp16"
    assert not any("no autocast table" in note for note in result.notes)
