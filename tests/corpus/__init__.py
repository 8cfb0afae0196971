"""Other people's ONNX models: small graphs rebuilt from the test material of onnxconverter-common, NVIDIA ModelOpt's
AutoCast and ONNX Runtime's transformer optimizer, plus exports of this repository's toy models through the pipelines
users run (TorchScript exporter, ORT optimizer, dynamo exporter) and layouts the peers' files have (IR 3, GRU, a
scalar input). Each entry says what ``mpexport convert MODEL --val-data V`` must plan and what ``mpexport verify``
must say; ``tests/corpus/test_corpus.py`` holds mpexport to it and ``benchmarks/peer_corpus.py`` tabulates it.

Origins and licences: ``tests/corpus/README.md`` and each builder's docstring.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

from tests.corpus import exports, layouts, modelopt, onnxconverter_common, onnxruntime_graphs
from tests.corpus.entry import Built, Entry

ENTRIES: list[Entry] = [*onnxconverter_common.ENTRIES, *modelopt.ENTRIES, *onnxruntime_graphs.ENTRIES,
                        *exports.ENTRIES, *layouts.ENTRIES]
BY_NAME = {entry.name: entry for entry in ENTRIES}
assert len(BY_NAME) == len(ENTRIES), "corpus names must be unique"

HERE = Path(__file__).resolve().parent
# what a built model depends on besides the corpus' own modules
SOURCES = (HERE.parent / "toy_models.py",)
PACKAGES = ("onnx", "onnxruntime", "torch", "transformers", "numpy")


def fingerprint() -> str:
    """A digest of the corpus' sources and the versions of the libraries that build it: a cached model is reused
    only while both are unchanged."""
    digest = hashlib.sha256()
    for path in sorted(HERE.glob("*.py")) + list(SOURCES):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for package in PACKAGES:
        digest.update(f"{package}=={importlib.metadata.version(package)}".encode())
    return digest.hexdigest()[:16]


def build(entry: Entry, root: Path) -> Built:
    """Build ``entry`` into ``root/<name>-<fingerprint>`` (``model.onnx``, ``val.npz``), or reuse what an earlier
    build with the same fingerprint left there. The directory appears whole or not at all (built beside it, then
    renamed), so concurrent builders never see half a model."""
    target = root / f"{entry.name}-{fingerprint()}"
    if not (target / "val.npz").is_file():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=root))
        try:
            entry.build(staging)
            try:
                os.rename(staging, target)
            except OSError:  # another process built it first
                if not (target / "val.npz").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return Built(target / "model.onnx", target / "val.npz")
