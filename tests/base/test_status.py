"""One status record per stage: ran, skipped or failed, why, seconds and peak memory."""

from __future__ import annotations

import pytest

from mpexport.base.status import FAILED, RAN, SKIPPED, StageClock, StageStatus


def test_stages_ran_skipped_and_failed_are_recorded_with_why() -> None:
    heard: list[str] = []
    clock = StageClock(heard.append)
    with clock.stage("export"):
        pass
    clock.skip("engine", "no TensorRT here")
    with pytest.raises(ValueError, match="bad"), clock.stage("plan"):
        raise ValueError("bad input\nmore")
    assert heard == ["export", "plan"]
    assert [(s.stage, s.status, s.why) for s in clock.stages] == [
        ("export", RAN, None), ("engine", SKIPPED, "no TensorRT here"), ("plan", FAILED, "bad input")]
    assert all(s.seconds >= 0 for s in clock.stages) and clock.stages[0].peak_rss_mb
    assert clock.total_seconds == round(sum(s.seconds for s in clock.stages), 3)


def test_a_status_record_writes_why_only_where_there_is_one() -> None:
    assert "why" not in StageStatus("load", seconds=1.5).to_json()
    assert StageStatus("engine", SKIPPED, "off").to_json() == {"stage": "engine", "status": "skipped", "why": "off",
                                                                "seconds": 0.0, "peak_rss_mb": None}
