"""``verify --ray``: the same verify, its batches spread over a Ray cluster.

The validation set is cut into shards, each a run of whole batches (the batches a single-process verify folds,
numbered globally, so Parquet row groups and files before a shard are never read by it). Ray Data runs the shards
through ``map_batches`` on a pool of actors; each actor opens the bundle, loads the model and builds every backend
once, then folds its shards into a :class:`mpexport.check.tally.Tally`. The driver joins the tallies in shard
order with :meth:`Tally.merge`: maxima, minima, counts and exactly-rounded sums, and the p99 subsample is keyed by
global batch index, so it is the same subsample a single pass draws (an exact merge of the same estimator, no
sketch). The report therefore equals the single-process one up to the backends' own arithmetic on another thread
count, provided the workers are alike: workers that built different backends (a GPU, a kernel or the memory one
had and another had not) end the run, as does a backend that ran on part of the data. Actors get an equal share of
the cluster's GPUs by default: Ray hides the GPUs from an actor that asks for none. The driver then gates and
localises as verify does (:mod:`mpexport.commands.verify` writes the result).

Failures: a worker that dies is restarted and its shard retried by Ray (:data:`RETRIES` times); a shard whose
data or backends raise ends the run with one line naming the shard (exit 2, nothing written); a merged run that
covers fewer samples than the data holds is refused, never reported as passed.

Workers must be able to import mpexport and read the bundle, the source model and the validation data at the
same paths as the driver (one machine, or a shared file system).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpexport.base.errors import MpexportError, first_line
from mpexport.base.status import FAILED, RAN, StageClock
from mpexport.bundle.names import ENGINE, FP32_ONNX, MIXED_ONNX, PLAN
from mpexport.bundle.store import Bundle
from mpexport.check.forms import (
    build_forms,
    check_unchanged,
    judging_forms,
    load_inputs,
    model_batch_size,
    source_to_load,
    validation_data_for,
)
from mpexport.check.report import STAGE, ParityReport, VerifyOptions
from mpexport.check.tally import Tally
from mpexport.check.verify import finish
from mpexport.data.base import ValidationData, check_against
from mpexport.data.callable import CallableValidationData

RETRIES = 2
"""Times Ray restarts a dead worker and retries its shard before the run fails."""
SHARDS_PER_WORKER = 4
"""Default shards per worker: enough to balance uneven workers, few enough that each shard's fixed cost is small."""
RAY_HINT = "pip install 'mpexport[ray]'"


@dataclass
class RayOptions:
    """Where and how wide: ``address`` of a running cluster (None: start a local Ray instance, or join the one
    ``RAY_ADDRESS`` names), ``workers`` actors (None: the cluster's CPUs // ``cpus_per_worker``), their CPUs and
    GPUs, ``batches_per_shard`` (None: about :data:`SHARDS_PER_WORKER` shards per worker)."""

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: int = 1
    gpus_per_worker: float | None = None
    """None: an equal share of the cluster's GPUs (at most one each), none without GPUs. Ray hides the GPUs from an
    actor that asks for none, and torch-amp, torch-cuda and tensorrt then run as on a machine without one."""
    batches_per_shard: int | None = None


@dataclass(frozen=True)
class Shard:
    """A run of whole batches: batch numbers ``first_batch`` .. ``first_batch + batches - 1``, holding samples
    ``first_sample`` .. ``first_sample + samples - 1`` of the validation set."""

    number: int
    first_batch: int
    batches: int
    first_sample: int
    samples: int

    def describe(self) -> str:
        """E.g. ``shard 3 (samples 192-255)``."""
        return f"shard {self.number} (samples {self.first_sample}-{self.first_sample + self.samples - 1})"


def plan_shards(data: ValidationData, options: VerifyOptions, workers: int,
                batches_per_shard: int | None = None) -> list[Shard]:
    """Cut ``data`` into shards of whole batches (``options.batch_size``, up to ``options.max_samples``): a given
    number of batches each, or about :data:`SHARDS_PER_WORKER` per worker."""
    total = data.batch_count(options.batch_size, options.max_samples)
    if total is None:
        raise _not_on_disk()
    size = batches_per_shard or max(1, -(-total // (workers * SHARDS_PER_WORKER)))
    shards = []
    for number, first in enumerate(range(0, total, size)):
        count = min(size, total - first)
        start = data.samples_before(options.batch_size, first, options.max_samples)
        stop = data.samples_before(options.batch_size, first + count, options.max_samples)
        shards.append(Shard(number, first, count, start, stop - start))
    return shards


def verify_on_ray(directory: str | Path, ray_options: RayOptions, *, val_data: str | Path | None = None,
                  options: VerifyOptions | None = None, trust_pickle: bool = False,
                  reference: str | Path | None = None, factory: str | None = None,
                  on_shard: Callable[[int, int], None] | None = None) -> tuple[ParityReport, Bundle]:
    """Verify the bundle in ``directory`` on a Ray cluster (see the module docstring) without writing anything;
    returns the report (the one a single-process verify gives, with the shard count in its notes) and the opened
    bundle. ``on_shard`` hears (shards done, shards in all)."""
    options = options or VerifyOptions()
    clock = StageClock()
    with clock.stage("open"):
        bundle = Bundle.open(directory, uses=(FP32_ONNX, MIXED_ONNX, PLAN, ENGINE))
    with clock.stage("load"):
        data = _validation_data(bundle, val_data, options)
        check_against(data, bundle.manifest.inputs)
        options, batch_note = model_batch_size(options, bundle.manifest.inputs, data)
        has_model = _check_source(bundle, trust_pickle, reference, factory)
        example = next(data.batches(options.batch_size, limit=options.batch_size, inputs=bundle.manifest.inputs))
    ray = _import_ray()
    # Ray's driver prints what its workers report (a task retried after its actor died; an actor killed when a
    # failed run stops the pool) on stdout, from a thread: held until Ray is done, then on stderr when the run
    # succeeds, so that stdout stays the report (--json) and a failure stays one line
    messages = io.StringIO()
    with contextlib.redirect_stdout(messages):
        with clock.stage("ray start"):
            started = _connect(ray, ray_options)
        try:
            workers = _workers(ray, ray_options)
            shards = plan_shards(data, options, workers, ray_options.batches_per_shard)
            workers = min(workers, len(shards))
            gpus = _gpus_per_worker(ray, ray_options, workers)
            job = _Job(str(bundle.directory.absolute()), _data_path(data), getattr(data, "columns", {}), options,
                       trust_pickle, str(Path(reference).absolute()) if reference else None,
                       ray_options.cpus_per_worker, factory, os.getcwd())
            with clock.stage("passes"):
                tally, states = _run_shards(ray, job, shards, workers, ray_options, gpus, on_shard)
        finally:
            if started:
                ray.shutdown()
    sys.stderr.write(messages.getvalue())
    expected = sum(shard.samples for shard in shards)
    if tally.samples != expected:
        raise MpexportError(f"the Ray run verified {tally.samples} of {expected} samples: no verdict on part of "
                            "the data", stage=STAGE)
    forms = judging_forms(bundle, has_model=has_model)
    forms.backends.states = states
    report = finish(bundle, forms, tally, options, data.describe(), example, clock=clock, source=data)
    share = f" and {gpus:g} GPU" if gpus else ""
    report.notes.append(f"ran on Ray: {len(shards)} shards of up to {shards[0].batches} batches on {workers} "
                        f"workers of {ray_options.cpus_per_worker} CPU{share} each; backend seconds are summed over "
                        "the workers")
    report.notes += [batch_note] if batch_note else []
    report.stages = clock.stages
    return report, bundle


@dataclass
class _Job:
    """What every worker needs to rebuild the verify: absolute paths and the options."""

    directory: str
    val_data: str
    columns: dict[str, str]
    """The table columns the data was opened with (``--columns``, or what convert recorded)."""
    options: VerifyOptions
    trust_pickle: bool
    reference: str | None
    threads: int
    factory: str | None = None
    import_path: str | None = None
    """The factory the command line named, and the driver's working directory the workers import it from."""


class ShardVerifier:
    """A Ray Data actor: on its first shard it opens the bundle and builds the backends, then folds each shard it
    is given into a tally. A row in is a shard (its fields and the pickled :class:`_Job`); a row out is the shard
    number and its pickled tally and backend states, or the one-line error that stopped it. (The job travels with
    the rows, not as constructor arguments, so a restarted actor never depends on an object that went out of
    scope.)"""

    def __init__(self) -> None:
        self.job: _Job | None = None
        self.error: str | None = None

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Verify the shards in ``rows``."""
        shards = [Shard(*(int(rows[key][index]) for key in _SHARD_FIELDS)) for index in range(len(rows["number"]))]
        if self.job is None:
            self._build(pickle.loads(rows["job"][0]))
        results, errors = [], []
        for shard in shards:
            try:
                if self.error is not None:
                    raise RuntimeError(self.error)
                results.append(pickle.dumps(self._fold(shard)))
                errors.append("")
            except Exception as exc:  # noqa: BLE001 - the driver names the shard and stops the run
                results.append(b"")
                errors.append(first_line(exc, 300))
        return {"number": np.array([shard.number for shard in shards]),
                "result": np.array(results, dtype=object), "error": np.array(errors, dtype=object)}

    def _build(self, job: _Job) -> None:
        from mpexport.backends.onnxruntime import limit_threads

        self.job = job
        limit_threads(job.threads)
        try:
            bundle = Bundle.open(job.directory, uses=(FP32_ONNX, MIXED_ONNX, PLAN, ENGINE))
            self.inputs = load_inputs(bundle, val_data=job.val_data, trust_pickle=job.trust_pickle,
                                      batch_size=job.options.batch_size, reference=job.reference,
                                      columns=job.columns or None, factory=job.factory,
                                      import_path=job.import_path)
            self.forms = build_forms(bundle, self.inputs)
        except Exception as exc:  # noqa: BLE001 - reported with the shard it stopped, as one line
            self.error = f"the worker could not build the backends: {first_line(exc, 300)}"

    def _fold(self, shard: Shard) -> tuple[Tally, dict[str, dict[str, Any]]]:
        options, inputs, forms = self.job.options, self.inputs, self.forms  # type: ignore[union-attr]
        tally = forms.tally(inputs)
        tally.offset = shard.first_sample
        batches = inputs.data.batches(options.batch_size, limit=options.max_samples, inputs=inputs.specs,
                                      skip=shard.first_batch)
        tally.fold(forms.backends, itertools.islice(batches, shard.batches), first=shard.first_batch)
        return tally, forms.backends.states


_SHARD_FIELDS = ("number", "first_batch", "batches", "first_sample", "samples")


def _run_shards(ray: Any, job: _Job, shards: list[Shard], workers: int, ray_options: RayOptions, gpus: float,
                on_shard: Callable[[int, int], None] | None) -> tuple[Tally, dict[str, dict[str, Any]]]:
    """Every shard through Ray Data on ``workers`` actors; the tallies joined in shard order."""
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-run INFO lines; mpexport reports progress
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    packed = pickle.dumps(job)
    rows = [{**{key: getattr(shard, key) for key in _SHARD_FIELDS}, "job": packed} for shard in shards]
    with warnings.catch_warnings():  # Ray Data names no parameter for bounded retries; its default is unbounded
        warnings.simplefilter("ignore")
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            ShardVerifier, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=ray_options.cpus_per_worker, num_gpus=gpus or None,
            batch_format="numpy", max_restarts=RETRIES, max_task_retries=RETRIES)
    results: dict[int, tuple[Tally, dict[str, dict[str, Any]]]] = {}
    try:
        for row in dataset.iter_rows():
            number = int(row["number"])
            if row["error"]:
                raise MpexportError(f"{shards[number].describe()} failed in a Ray worker: {row['error']}",
                                    stage=STAGE)
            results[number] = pickle.loads(row["result"])
            if on_shard:
                on_shard(len(results), len(shards))
    except MpexportError:
        raise
    except Exception as exc:  # noqa: BLE001 - a worker that died past its retries, or Ray itself
        raise MpexportError(f"the Ray run failed after {len(results)} of {len(shards)} shards: "
                            f"{first_line(exc, 300)}", stage=STAGE) from None
    missing = [shard.describe() for shard in shards if shard.number not in results]
    if missing:
        raise MpexportError(f"the Ray run returned no result for {', '.join(missing[:3])}", stage=STAGE)
    _same_backends(shards, results)
    tally, states = results[0]
    for number in range(1, len(shards)):
        other, other_states = results[number]
        tally.merge(other)
        states = _merge_states(states, other_states)
    expected = sum(shard.samples for shard in shards)
    partial = [name for name, comparison in tally.comparisons.items()
               if states[name]["state"] == RAN and comparison.samples != expected]
    if partial:
        raise MpexportError(f"{', '.join(partial)} ran on part of the data only: no verdict", stage=STAGE)
    return tally, states


def _same_backends(shards: list[Shard], results: dict[int, tuple[Tally, dict[str, dict[str, Any]]]]) -> None:
    """Every worker built the same backends the same way (a worker without the GPU, the kernel or the memory another
    had would otherwise mix two verifies in one report); a backend that failed while running is judged later."""
    def built(states: dict[str, dict[str, Any]], tally: Tally) -> dict[str, tuple[str, str]]:
        return {name: (state["state"], str(state.get("mode", ""))) for name, state in states.items()
                if name not in tally.failed}

    first = built(results[0][1], results[0][0])
    for shard in shards[1:]:
        tally, states = results[shard.number]
        other = built(states, tally)
        differing = sorted(name for name in first.keys() & other.keys() if first[name] != other[name])
        if differing or first.keys() != other.keys():
            name = differing[0] if differing else sorted(first.keys() ^ other.keys())[0]
            raise MpexportError(f"the Ray workers built different backends: {name} was {_built(first, name)} for "
                                f"{shards[0].describe()} and {_built(other, name)} for {shard.describe()} (workers "
                                "must be alike)", stage=STAGE)


def _built(backends: dict[str, tuple[str, str]], name: str) -> str:
    state, mode = backends.get(name, ("absent", ""))
    return f"{state} ({mode})" if mode else state


def _workers(ray: Any, ray_options: RayOptions) -> int:
    """The actor pool's size: as asked, or as many as the cluster's CPUs hold; more than it holds is refused (a
    pool that cannot start would wait forever)."""
    cpus = int(ray.cluster_resources().get("CPU", 0))
    workers = ray_options.workers or max(1, cpus // ray_options.cpus_per_worker)
    if workers * ray_options.cpus_per_worker > cpus:
        raise MpexportError(f"{workers} workers of {ray_options.cpus_per_worker} CPUs need "
                            f"{workers * ray_options.cpus_per_worker} CPUs; the Ray cluster has {cpus}", stage=STAGE,
                            hint="pass fewer --workers or --cpus-per-worker")
    return workers


def _gpus_per_worker(ray: Any, ray_options: RayOptions, workers: int) -> float:
    """GPUs per actor: as asked, else an equal share of the cluster's (at most one each)."""
    if ray_options.gpus_per_worker is not None:
        return ray_options.gpus_per_worker
    gpus = float(ray.cluster_resources().get("GPU", 0))
    return min(1.0, gpus / workers) if gpus else 0.0


def _merge_states(mine: dict[str, dict[str, Any]], theirs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Backend states from two workers: a backend that failed on either failed."""
    merged = dict(mine)
    for name, state in theirs.items():
        if name not in merged or (state["state"] == FAILED and merged[name]["state"] != FAILED):
            merged[name] = state
    return merged


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise MpexportError("verify --ray needs Ray (with Ray Data)", stage=STAGE, hint=RAY_HINT) from None
    return ray


def _connect(ray: Any, ray_options: RayOptions) -> bool:
    """Join the cluster (or start a local instance); True when this call started Ray here (and shuts it down)."""
    if ray.is_initialized():
        return False
    # Ray Data's own actor wrapper trips a C++ warning about restarting actors with stored constructor arguments
    # (ray-project/ray#53727; mpexport's job travels with the rows): the C++ log level, which Ray announces on
    # stderr while it starts, is set quietly
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    try:
        with _quiet_stderr():
            ray.init(address=ray_options.address, include_dashboard=False, logging_level=logging.ERROR,
                     log_to_driver=False, configure_logging=True)
    except Exception as exc:  # noqa: BLE001 - an unreachable cluster is a one-line error
        where = ray_options.address or os.environ.get("RAY_ADDRESS") or "a local instance"
        raise MpexportError(f"cannot start or join Ray ({where}): {first_line(exc)}", stage=STAGE) from None
    return True


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the block (C++ code writes there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _validation_data(bundle: Bundle, val_data: str | Path | None, options: VerifyOptions) -> ValidationData:
    data = validation_data_for(bundle, val_data, options.columns or None)
    if isinstance(data, CallableValidationData):
        raise _not_on_disk()
    return data


def _not_on_disk() -> MpexportError:
    return MpexportError("verify --ray needs validation data on disk (.npz, Parquet, Arrow, datasets), which every "
                         "worker reads its own shards of; a module:function source is read in one process",
                         stage=STAGE, hint="save the validation set with numpy.savez or as Parquet")


def _data_path(data: ValidationData) -> str:
    return str(Path(data.path).absolute())


def _check_source(bundle: Bundle, trust_pickle: bool, reference: str | Path | None, factory: str | None) -> bool:
    """The driver's checks of the PyTorch model the workers will load (without loading it): True when there is
    one. One-line errors for an untrusted pickle or a source model changed since convert."""
    if reference is not None:
        if not Path(reference).is_file():
            raise MpexportError(f"--reference '{reference}' is not a file", stage=STAGE)
        return True
    found = source_to_load(bundle, trust_pickle, factory)
    if found is None:
        return False
    source, path = found
    check_unchanged(source, path)
    return True
