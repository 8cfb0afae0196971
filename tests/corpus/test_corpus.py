"""Every corpus model through ``mpexport convert MODEL --val-data V --out B`` and ``mpexport verify B`` (no other
option), held to its expectations (``tests/corpus/checks.py``). Entries whose fix is not in place are marked
``xfail(strict=True)`` with the issue item: when the fix lands they pass, the strict mark fails, and the mark goes.

Built models are cached under pytest's cache directory (``.pytest_cache/d/mpexport-corpus``), keyed by the corpus'
sources and the library versions that build them: the first run exports (the dynamo BERT is most of it), later runs
only convert and verify.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from mpexport.cli import main
from tests.corpus import ENTRIES, build
from tests.corpus.checks import Outcome, judge, load_bundle_files, samples_in
from tests.corpus.entry import Entry
from tests.helpers import REPO

MAX_MODEL_BYTES = 1_000_000


def marked(entry: Entry) -> object:
    """The entry as a parameter, xfail (strict) while its issue item is open."""
    marks = [pytest.mark.xfail(strict=True, reason=entry.expect.xfail)] if entry.expect.xfail else []
    return pytest.param(entry, id=entry.name, marks=marks)


@pytest.fixture(scope="session")
def corpus_root(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where built models live: pytest's cache directory when the cache plugin is on, else a temporary one."""
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("mpexport-corpus")) if cache is not None else tmp_path_factory.mktemp("corpus")


def invoke(*args: str) -> tuple[int, str, str]:
    """``mpexport ARGS`` in this process from the repository root: exit code, stderr and stdout (an exception that
    escapes the CLI is exit 1 with its text on stderr, so that it is reported as what it is)."""
    result = CliRunner().invoke(main, list(args))
    error = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        error = f"crash: {type(result.exception).__name__}: {result.exception}\n{error}"
    return result.exit_code, error, result.stdout


def convert_and_verify(model: Path, val: Path, bundle: Path) -> Outcome:
    """The two commands a new user runs, with no option beyond ``--val-data``."""
    code, error, output = invoke("convert", str(model), "--val-data", str(val), "--out", str(bundle))
    outcome = Outcome(code, error, bundle, output)
    if code == 0:
        outcome.verify_exit, outcome.verify_error, _ = invoke("verify", str(bundle))
    load_bundle_files(outcome)
    return outcome


@pytest.mark.parametrize("entry", [marked(entry) for entry in ENTRIES])
def test_corpus_model_converts_and_verifies(entry: Entry, corpus_root: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    built = build(entry, corpus_root)
    monkeypatch.chdir(REPO)
    outcome = convert_and_verify(built.model, built.val, tmp_path / "bundle")
    assert judge(entry, outcome, samples_in(built.val)) == []


def feeds_for(session: ort.InferenceSession, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One run's inputs from a validation set laid out as mpexport reads it (samples along axis 0): a leading
    batch of the model's fixed size (two where dynamic), or one sample where the input has no batch axis (an array
    one rank above the input: a scalar input's values, ModelOpt's ``scales_input``)."""
    feeds = {}
    for spec in session.get_inputs():
        array = data[spec.name]
        if array.ndim == len(spec.shape) + 1:
            feeds[spec.name] = np.ascontiguousarray(array[0])
        else:
            batch = spec.shape[0] if isinstance(spec.shape[0], int) else 2
            feeds[spec.name] = array[:batch]
    return feeds


def test_the_corpus_is_what_it_says(corpus_root: Path) -> None:
    """20 to 30 models, each under 1 MB, with an origin and a licence, each run by ONNX Runtime (in scope) on its
    validation set's first inputs, the set holding one array per model input (plus optional labels) of realistic
    values: token ids inside the vocabulary, masks of 0/1."""
    assert 20 <= len(ENTRIES) <= 30
    for entry in ENTRIES:
        built = build(entry, corpus_root)
        assert built.model.stat().st_size < MAX_MODEL_BYTES, entry.name
        assert entry.origin.licence and entry.origin.repository and entry.tests, entry.name
        session = ort.InferenceSession(str(built.model), providers=["CPUExecutionProvider"])
        with np.load(built.val) as archive:
            data = {name: archive[name] for name in archive.files}
        assert set(data) - {"labels"} == {spec.name for spec in session.get_inputs()}, entry.name
        assert len({array.shape[0] for array in data.values()}) == 1, entry.name
        if "attention_mask" in data:
            assert set(np.unique(data["attention_mask"])) <= {0, 1}, entry.name
        outputs = session.run(None, feeds_for(session, data))
        assert all(np.isfinite(output).all() for output in outputs), entry.name
