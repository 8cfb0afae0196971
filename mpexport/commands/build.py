"""``build``: (re)build a bundle's TensorRT engine from its mixed ONNX and plan, and commit it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mpexport.base.errors import MpexportError
from mpexport.base.status import StageClock
from mpexport.bundle.names import ENGINE, TIMING_CACHE
from mpexport.deploy.tensorrt import (
    DEFAULT_WORKSPACE,
    ENGINE_FILE,
    PROFILE_BATCH,
    PROFILE_SAMPLES,
    STAGE,
    EngineResult,
    Profile,
    build_engine,
    derive_profiles,
    tensorrt_status,
)
from mpexport.precision.plan import read_plan
from mpexport.sources.inputs import recorded_validation_data


def build(directory: Path, *, shapes: dict[str, Profile] | None = None, allow_tf32: bool = False,
            workspace: int = DEFAULT_WORKSPACE, builder: Callable[..., EngineResult] | None = None) -> EngineResult:
    """(Re)build the engine of a bundle from its mixed ONNX and plan, reusing its timing cache; profiles from
    ``shapes`` or the validation data recorded at convert time. The new engine replaces the old one atomically,
    and every verdict that covered the old engine (verify's included) turns stale. ``builder`` takes
    :func:`build_engine`'s arguments (default: it; tests without a GPU give a stand-in to exercise the bundle)."""
    from mpexport.bundle.names import MIXED_ONNX, PLAN
    from mpexport.bundle.records import EngineRecord
    from mpexport.bundle.store import Bundle

    clock = StageClock()
    with clock.stage("open"):
        bundle = Bundle.open(directory, uses=(MIXED_ONNX, PLAN))
    builder = builder or build_engine
    if builder is build_engine and not (status := tensorrt_status()).available:
        raise MpexportError(f"cannot build a TensorRT engine here: {status.why}", stage=STAGE)
    plan = read_plan(bundle)
    with clock.stage("profiles"):
        profiles = derive_profiles([spec.to_json() for spec in bundle.manifest.inputs],
                                   _observed_shapes(bundle, shapes), shapes)
    with bundle.transaction("build") as transaction:
        with clock.stage("engine"):
            result = builder(bundle.path(MIXED_ONNX), transaction.staging, profiles, plan.precisions(),
                             workspace=workspace, allow_tf32=allow_tf32, timing_cache=bundle.directory / TIMING_CACHE,
                             module_of={node.name: node.module or "" for node in plan.nodes})
        transaction.put(ENGINE, ENGINE_FILE, result.companions)
        bundle.manifest.engine = EngineRecord.from_build(result.metadata, bundle.digests(ENGINE, PLAN))
        bundle.manifest.stages["build"] = clock.stages
    result.path = bundle.directory / ENGINE_FILE
    return result


def _observed_shapes(bundle: Any, shapes: dict[str, Profile] | None) -> list[dict[str, tuple[int, ...]]]:
    """Input shapes of the validation batches recorded at convert time (none when ``shapes`` are given, or when the
    data came from a ``module:function``: a manifest never decides what code runs)."""
    from mpexport.data.base import check_against

    record = bundle.manifest.validation
    from_code = record is not None and record.kind == "callable"
    data = None if shapes or from_code else recorded_validation_data(bundle)
    if data is None:
        return []
    check_against(data, bundle.manifest.inputs)  # a table's other columns are left out
    return [{name: tuple(array.shape) for name, array in batch.items()}
            for batch in data.batches(PROFILE_BATCH, limit=PROFILE_SAMPLES, inputs=bundle.manifest.inputs)]
