"""The autocast policy tables agree with the installed torch's registered autocast kernels."""

from __future__ import annotations

import warnings

import pytest
import torch

from mpexport.autocast_extract import extract_policy_table, registered_ops
from mpexport.autocast_policy import (
    FP32,
    FP32_SET_OPT_DTYPE,
    LOWER,
    PROMOTE,
    load_table,
    op_key,
    resolve_policy,
    torch_minor,
)

INSTALLED = torch_minor(torch.__version__)


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
    assert set(load_table(INSTALLED)["devices"][device]) == registered


def test_table_classes_match_the_installed_kernels(extracted: dict) -> None:
    """Re-reading every wrapper of the installed torch gives the shipped table, class for class."""
    assert extracted["unresolved"] == {}
    assert extracted["devices"] == load_table(INSTALLED)["devices"]


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
    assert policy.torch_version == INSTALLED and "2.99" in note
    policy, note = resolve_policy("cpu-bf16")
    assert note is None and policy.device == "cpu" and policy.low == "bf16"
    assert policy.op_class("aten.linear.default") == LOWER and policy.op_class("aten.softmax.int") is None
