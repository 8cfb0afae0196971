"""--help teaches with an example."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("command", [[], ["convert"]])
def test_help_has_an_example(cli, command: list[str]) -> None:
    result = cli(*command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout
    assert "mpexport convert models/digits_resnet.pt2 --val-data" in result.stdout
