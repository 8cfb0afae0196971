"""--input parsing and tensor specs."""

from __future__ import annotations

import numpy as np
import pytest

from mpexport.base.errors import MpexportError
from mpexport.base.specs import TensorSpec, parse_input_option, spec_from_array


def test_input_option_with_symbolic_and_fixed_dims() -> None:
    spec = parse_input_option("pixels:batch,3,224,224:float32")
    assert spec == TensorSpec("pixels", "float32", ("batch", 3, 224, 224))
    assert spec.dynamic_dims() == {0: "batch"}
    assert spec.example_shape() == (2, 3, 224, 224)


def test_input_option_example_size_and_alias_dtype() -> None:
    spec = parse_input_option("ids:batch,seq=128:long")
    assert spec.dtype == "int64"
    assert spec.shape == ("batch", "seq")
    assert spec.example_shape() == (2, 128)


def test_input_option_dtype_defaults_to_float32() -> None:
    assert parse_input_option("x:4,8").dtype == "float32"


@pytest.mark.parametrize("text", ["pixels", "pixels::float32", "x:1,2:float99", "x:1,-2", "x:a b:float32"])
def test_bad_input_options_are_one_line_errors(text: str) -> None:
    with pytest.raises(MpexportError) as info:
        parse_input_option(text)
    assert "\n" not in str(info.value)


def test_spec_from_array_names_batch_and_accepts_other_batches() -> None:
    spec = spec_from_array("pixels", np.zeros((5, 1, 8, 8), np.float32))
    assert spec.shape == ("batch", 1, 8, 8)
    assert spec.accepts_shape((7, 1, 8, 8))
    assert not spec.accepts_shape((7, 1, 8, 9))
    assert not spec.accepts_shape((7, 8, 8))
