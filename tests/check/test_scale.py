"""verify across machines: shards of whole batches that skip what they do not read, tallies that merge into exactly
the whole pass, and ``verify --ray`` (a local Ray instance of 2 CPUs) giving the single-process report."""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mpexport.backends import onnxruntime as runners
from mpexport.bundle.store import Bundle
from mpexport.check.forms import build_forms, load_inputs
from mpexport.check.ray import RayOptions, plan_shards
from mpexport.check.report import VerifyOptions
from mpexport.commands.verify import verify
from mpexport.data.base import ValidationData
from mpexport.data.open import load_validation_data
from tests.helpers import DIGITS_VAL, assert_bad_input

TIGHT = VerifyOptions(batch_size=32, atol=0.02)
"""A gate the strict emulation breaks on some samples: the verdict, failing samples and localisation must agree."""


@pytest.fixture(scope="module")
def npz_shards(tmp_path_factory: pytest.TempPathFactory, digits: dict[str, np.ndarray]) -> Path:
    """The digits in three .npz shards of uneven sizes (batches do not span .npz shards)."""
    root = tmp_path_factory.mktemp("npz_shards")
    for name, (start, stop) in {"a": (0, 100), "b": (100, 137), "c": (137, 360)}.items():
        np.savez(root / f"{name}.npz", **{key: array[start:stop] for key, array in digits.items()})
    return root


def _parquet_dir(root: Path, digits: dict[str, np.ndarray], nan_at: int | None = None) -> Path:
    """The digits in two Parquet files (150 + 210 rows) of 50-row groups; ``nan_at``: a NaN pixel in that row."""
    pixels = digits["pixels"].copy()
    if nan_at is not None:
        pixels[nan_at, 0, 0, 0] = np.nan
    root.mkdir()
    for name, (start, stop) in {"part-0": (0, 150), "part-1": (150, 360)}.items():
        table = pa.table({"pixels": pa.array(pixels[start:stop].tolist(),
                                             type=pa.list_(pa.list_(pa.list_(pa.float32())))),
                          "labels": pa.array(digits["labels"][start:stop])})
        pq.write_table(table, root / f"{name}.parquet", row_group_size=50)
    return root


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory: pytest.TempPathFactory, digits: dict[str, np.ndarray]) -> Path:
    return _parquet_dir(tmp_path_factory.mktemp("parquet") / "val", digits)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """This process's backends on one thread, as a Ray actor of one CPU runs them (the same arithmetic)."""
    threads, sessions = torch.get_num_threads(), runners.SESSION_THREADS
    runners.limit_threads(1)
    yield
    runners.SESSION_THREADS = sessions
    torch.set_num_threads(threads)


def _sources(npz_shards: Path, parquet_dir: Path) -> list[ValidationData]:
    return [load_validation_data(DIGITS_VAL), load_validation_data(npz_shards), load_validation_data(parquet_dir)]


def test_skipped_batches_are_the_rest_of_a_whole_pass(npz_shards: Path, parquet_dir: Path) -> None:
    for data in _sources(npz_shards, parquet_dir):
        for batch_size, limit in [(64, None), (30, None), (32, 250)]:
            whole = list(data.batches(batch_size, limit=limit))
            assert data.batch_count(batch_size, limit) == len(whole), (data.path, batch_size, limit)
            for skip in range(len(whole) + 1):
                rest = list(data.batches(batch_size, limit=limit, skip=skip))
                assert len(rest) == len(whole) - skip
                for got, want in zip(rest, whole[skip:], strict=True):
                    assert all(np.array_equal(got[name], want[name]) for name in want)
                before = sum(len(batch["pixels"]) for batch in whole[:skip])
                assert data.samples_before(batch_size, skip, limit) == before


def test_a_shard_reads_only_its_own_parquet_row_groups(parquet_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[list[int]] = []
    original = pq.ParquetFile.iter_batches

    def recording(self: Any, *args: Any, row_groups: list[int] | None = None, **kwargs: Any) -> Any:
        read.append(list(row_groups or []))
        return original(self, *args, row_groups=row_groups, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recording)  # records the real reads
    data = load_validation_data(parquet_dir)
    read.clear()
    batch = next(data.batches(50, skip=5))  # rows 250-299: the second file's groups 2 and on
    assert read == [[2, 3, 4]] and len(batch["pixels"]) == 50


def test_shard_plans_cover_every_batch_once(npz_shards: Path, parquet_dir: Path) -> None:
    for data in _sources(npz_shards, parquet_dir):
        for options in (VerifyOptions(batch_size=32), VerifyOptions(batch_size=50, max_samples=333)):
            for workers in (1, 2, 5):
                shards = plan_shards(data, options, workers)
                total = data.batch_count(options.batch_size, options.max_samples)
                assert [shard.first_batch for shard in shards] == list(itertools.accumulate(
                    [0] + [shard.batches for shard in shards[:-1]]))
                assert sum(shard.batches for shard in shards) == total
                assert sum(shard.samples for shard in shards) == min(360, options.max_samples or 360)
                assert len(shards) <= workers * 4


def test_tallies_of_shards_merge_into_the_whole_pass_exactly(bundle: Path) -> None:
    opened = Bundle.open(bundle)
    inputs = load_inputs(opened, batch_size=32)
    forms = build_forms(opened, inputs)
    whole = forms.tally(inputs)
    whole.fold(forms.backends, inputs.data.batches(32, inputs=inputs.specs))
    parts = []
    for shard in plan_shards(inputs.data, TIGHT, workers=1, batches_per_shard=3):
        part = forms.tally(inputs)
        part.offset = shard.first_sample
        batches = inputs.data.batches(32, inputs=inputs.specs, skip=shard.first_batch)
        part.fold(forms.backends, itertools.islice(batches, shard.batches), first=shard.first_batch)
        parts.append(part)
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    reports = [tally.report(forms.backends.states, TIGHT, "digits", gated=forms.gated, required=forms.required)
               for tally in (whole, merged)]
    first, second = (_without_seconds(report.to_json()) for report in reports)
    assert first == second and first["verdict"] == "fail"  # every number, bit for bit
    assert reports[0].failing_samples(forms.strict) == reports[1].failing_samples(forms.strict) != []
    assert reports[0].worst.index == reports[1].worst.index  # type: ignore[union-attr]
    for backend, outputs in reports[0].metrics.items():
        for name, metrics in outputs.items():
            other = reports[1].metrics[backend][name]
            assert np.array_equal(metrics.error_sample(), other.error_sample())  # the same p99 subsample
            assert np.array_equal(metrics.scatter_points(), other.scatter_points())
            assert metrics.sum_abs == other.sum_abs and metrics.noise == other.noise


def test_workers_that_built_different_backends_end_the_run() -> None:
    from mpexport.base.errors import MpexportError
    from mpexport.check.ray import Shard, _same_backends
    from mpexport.check.tally import Tally

    shards = [Shard(0, 0, 2, 0, 64), Shard(1, 2, 2, 64, 64)]
    emulated = {"torch-fp32": {"state": "ran"}, "torch-amp": {"state": "ran", "mode": "cuda-fp16 emulated"},
                "tensorrt": {"state": "skipped", "why": "no GPU"}}
    on_gpu = {**emulated, "torch-amp": {"state": "ran", "mode": "real CUDA autocast"}}
    tally = Tally.start(["torch-fp32", "torch-amp"], ["output"], whole_batches=False, watch=None)
    _same_backends(shards, {0: (tally, emulated), 1: (tally, dict(emulated))})
    with pytest.raises(MpexportError, match=r"torch-amp was ran \(cuda-fp16 emulated\) for shard 0 \(samples "
                                            r"0-63\) and ran \(real CUDA autocast\) for shard 1"):
        _same_backends(shards, {0: (tally, emulated), 1: (tally, on_gpu)})
    with pytest.raises(MpexportError, match=r"tensorrt was skipped for shard 0 .* and ran for shard 1"):
        _same_backends(shards, {0: (tally, emulated), 1: (tally, {**emulated, "tensorrt": {"state": "ran"}})})


def _without_seconds(report: dict[str, Any]) -> dict[str, Any]:
    report = json.loads(json.dumps(report))
    for state in report["backends"].values():
        state.pop("seconds", None)
    report.pop("stages")
    return report


def _close(first: Any, second: Any, path: str = "") -> None:
    """Equal, numbers within 1e-6 relative (the backends' arithmetic in another process)."""
    if isinstance(first, dict):
        assert first.keys() == second.keys(), path
        for key in first:
            _close(first[key], second[key], f"{path}.{key}")
    elif isinstance(first, list):
        assert len(first) == len(second), path
        for index, (a, b) in enumerate(zip(first, second, strict=True)):
            _close(a, b, f"{path}[{index}]")
    elif isinstance(first, float):
        assert second == pytest.approx(first, rel=1e-6), path
    else:
        assert first == second, path


@pytest.fixture(scope="module")
def ray() -> Any:
    return pytest.importorskip("ray")


def test_verify_on_ray_reports_what_one_process_reports(bundle: Path, one_thread: None, ray: Any) -> None:
    alone = verify(bundle, options=TIGHT, write=False)
    shards: list[tuple[int, int]] = []
    spread = verify(bundle, options=TIGHT, write=False, ray=RayOptions(workers=2, batches_per_shard=3),
                    on_shard=lambda done, total: shards.append((done, total)))
    assert not ray.is_initialized()  # the local instance verify started is shut down
    assert shards[-1] == (4, 4) and len(shards) == 4
    assert (spread.verdict, spread.samples, spread.batches) == (alone.verdict, alone.samples, alone.batches) \
        == ("fail", 360, 12)
    assert spread.failures == alone.failures
    assert spread.failing_samples("strict-bf16") == alone.failing_samples("strict-bf16")
    assert spread.worst.index == alone.worst.index  # type: ignore[union-attr]
    assert spread.localisation == alone.localisation
    first, second = _without_seconds(alone.to_json()), _without_seconds(spread.to_json())
    assert second["notes"][-1].startswith("ran on Ray: 4 shards of up to 3 batches on 2 workers")
    second["notes"] = second["notes"][:-1]
    _close(first, second)
    assert {name: state["state"] for name, state in spread.backends.items()} == \
        {name: state["state"] for name, state in alone.backends.items()}


@pytest.fixture(scope="module")
def local_ray(ray: Any) -> Iterator[None]:
    """One local Ray instance (2 CPUs) for the CLI tests below; verify joins it instead of starting its own."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_shard_that_raises_fails_the_run_naming_it(cli, bundle: Path, tmp_path: Path, digits: dict[str, np.ndarray],
                                                     local_ray: None) -> None:
    copy = tmp_path / "resnet"
    shutil.copytree(bundle, copy)
    before = (copy / "manifest.json").read_text()
    data = _parquet_dir(tmp_path / "val", digits, nan_at=300)  # the first rows read fine: the driver's checks pass
    result = cli("verify", copy, "--val-data", data, "--ray", "--workers", "2", "--batch-size", "32")
    assert_bad_input(result, "shard 4 (samples 256-319) failed in a Ray worker", "NaN/Inf")
    assert (copy / "manifest.json").read_text() == before and not (copy / "report.json").exists()


def test_a_worker_that_dies_is_restarted_and_its_shard_retried(cli, tmp_path: Path, local_ray: None) -> None:
    from tests.toy_models import DiesOnceInRayWorker

    marker = tmp_path / "an actor died"
    torch.save(DiesOnceInRayWorker(str(marker)), tmp_path / "model.pt")
    np.savez(tmp_path / "val.npz", x=np.random.default_rng(0).standard_normal((256, 8)).astype(np.float32))
    out = tmp_path / "out"
    converted = cli("convert", tmp_path / "model.pt", "--val-data", tmp_path / "val.npz", "--out", out,
                    "--trust-pickle")
    assert converted.exit_code == 0, converted.stderr
    result = cli("verify", out, "--ray", "--workers", "2", "--batch-size", "32", "--trust-pickle", "--json")
    assert result.exit_code == 0, result.stderr
    assert marker.exists()  # an actor did die, and Ray's restart finished its shard
    report = json.loads(result.stdout)
    assert report["verdict"] == "pass" and report["samples"] == 256


def test_ray_options_without_ray_or_with_data_workers_cannot_read(cli, bundle: Path) -> None:
    usage = cli("verify", bundle, "--workers", "2")
    assert usage.exit_code == 2 and "--workers, --cpus-per-worker and --gpus-per-worker go with --ray" in usage.stderr
    usage = cli("verify", "--ray", bundle)  # --ray takes an optional ADDRESS: the directory went there
    assert usage.exit_code == 2 and "put DIRECTORY before --ray" in usage.stderr
    result = cli("verify", bundle, "--ray", "--val-data", "tests.valdata_sources:digits_dicts")
    assert_bad_input(result, "verify --ray needs validation data on disk")


def test_cli_verify_ray_writes_the_report_of_the_fixed_batch(cli, tmp_path: Path, local_ray: None) -> None:
    """``verify --ray`` from the command line writes the report and the verdict; Ray's shards are runs of the model's
    batches: 10 samples in batches of 4 (the last padded) on 2 workers, the report a single process gives."""
    import mpexport
    from tests.check.test_fixed_batch import linear_softmax, samples

    out = tmp_path / "out"
    mpexport.convert(linear_softmax(tmp_path / "m.onnx", 4), out=out, val_data=samples(tmp_path / "v.npz", 10))
    alone = mpexport.verify(out, write=False)
    result = cli("verify", out, "--ray", "--workers", "2", "--json")
    assert result.exit_code == 0, result.stderr
    spread = json.loads(result.stdout)
    assert (spread["verdict"], spread["samples"], spread["batches"]) == (alone.verdict, alone.samples, alone.batches) \
        == ("pass", 10, 3)
    assert spread["options"]["batch_size"] == 4
    assert any("fixes its batch size at 4" in note for note in spread["notes"])
    assert any(note.startswith("ran on Ray: ") for note in spread["notes"])
    assert json.loads((out / "manifest.json").read_text())["verify"]["verdict"] == "pass"
