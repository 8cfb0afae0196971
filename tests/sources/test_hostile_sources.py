"""Hostile and damaged model files (issue #22): `.pt2` archives that would run code on load, zip entries with
flipped bytes, Hugging Face configs that do not describe their weights, records that are too deep or too large.
Every hostile file is real (written with torch and rewritten as a zip); a marker file proves that nothing ran."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mpexport.base.errors import MpexportError
from mpexport.sources.guard import no_code_from_file, unsafe_expression
from mpexport.sources.loading import load_model
from tests.helpers import MODELS, assert_bad_input, assert_nothing_written
from tests.toy_models import build_bert, build_cnn

CNN_FACTORY = "tests.toy_models:build_cnn"


class MakesMarker:
    """Unpickling it runs ``os.system`` (what an attacker's ``__reduce__`` does): it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., int], tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """Where a hostile file's code would write; it must never exist."""
    return tmp_path / "code-ran"


@pytest.fixture
def linear_pt2(tmp_path: Path) -> Path:
    """A real `.pt2` of a tiny linear model (weight and bias)."""
    torch.manual_seed(0)
    path = tmp_path / "linear.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(3, 2), (torch.randn(1, 3),)), path)
    return path


def rewrite_zip(source: Path, target: Path, edit: Callable[[str, bytes], bytes | None],
                added: dict[str, bytes] | None = None) -> Path:
    """Copy the zip ``source`` to ``target`` with each entry's data passed through ``edit`` (None drops it), plus
    ``added`` entries under the archive's root folder; CRCs are those of the new data."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        root = old.namelist()[0].split("/", 1)[0]
        for info in old.infolist():
            data = edit(info.filename.split("/", 1)[-1], old.read(info))
            if data is not None:
                new.writestr(info.filename, data)
        for name, data in (added or {}).items():
            new.writestr(f"{root}/{name}", data)
    return target


def torch_saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def pickled_weight(source: Path, target: Path, payload: bytes) -> Path:
    """``source`` with its weight ``weight`` stored as a pickle (``use_pickle: true``) holding ``payload``."""
    def edit(name: str, data: bytes) -> bytes:
        if name == "data/weights/model_weights_config.json":
            config = json.loads(data)
            config["config"]["weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        weight_file = "data/weights/" + json.loads(_entry(source, "data/weights/model_weights_config.json"))[
            "config"]["weight"]["path_name"]
        return payload if name == weight_file else data

    return rewrite_zip(source, target, edit)


def opaque_constant(source: Path, target: Path, marker: Path) -> Path:
    """``source`` with an opaque constant (``pickle.loads`` in torch's loader) whose unpickling makes ``marker``."""
    def edit(name: str, data: bytes) -> bytes:
        if name == "data/constants/model_constants_config.json":
            return json.dumps({"config": {"lifted_constant": {"path_name": "opaque_obj_0", "is_param": False,
                                                              "use_pickle": True, "tensor_meta": None}}}).encode()
        return data

    return rewrite_zip(source, target, edit, {"data/constants/opaque_obj_0": pickle.dumps(MakesMarker(marker))})


def sample_inputs(source: Path, target: Path, marker: Path) -> Path:
    """``source`` whose sample inputs are an object ``weights_only`` refuses (torch retries with full trust)."""
    payload = torch_saved(MakesMarker(marker))
    return rewrite_zip(source, target, lambda name, data: payload if name == "data/sample_inputs/model.pt" else data)


def symbolic_shape(source: Path, target: Path, marker: Path) -> Path:
    """``source`` whose graph gives a size as a string torch hands to ``sympy.sympify`` (which evaluates it)."""
    def edit(name: str, data: bytes) -> bytes:
        if name != "models/model.json":
            return data
        text = data.decode()
        code = json.dumps(f"__import__('os').system('touch {marker}')")
        size = json.dumps({"as_expr": {"expr_str": "CODE", "hint": {"as_int": 1}}}).replace('"CODE"', code)
        return text.replace('{"as_int": 1}', size, 1).encode()

    return rewrite_zip(source, target, edit)


def _entry(path: Path, leaf: str) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(name for name in archive.namelist() if name.split("/", 1)[-1] == leaf))


HOSTILE = {
    "pickled-weight": lambda source, target, marker: pickled_weight(source, target, torch_saved(MakesMarker(marker))),
    "opaque-constant": opaque_constant,
    "sample-inputs": sample_inputs,
    "symbolic-shape": symbolic_shape,
}
REFUSAL = {
    "pickled-weight": ("weight 'weight'", "use_pickle in data/weights/model_weights_config.json"),
    "opaque-constant": ("constant 'lifted_constant'", "opaque_obj_0"),
    "sample-inputs": ("sample inputs data/sample_inputs/model.pt",),
    "symbolic-shape": ("symbolic shape in models/model.json",),
}


# ---------------------------------------------------------------------------------------------------------------
# A. a .pt2 never runs code without --trust-pickle


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_pt2_is_refused_by_name_and_runs_nothing(cli, tmp_path: Path, linear_pt2: Path, marker: Path,
                                                          kind: str) -> None:
    hostile = HOSTILE[kind](linear_pt2, tmp_path / f"{kind}.pt2", marker)
    out = tmp_path / "out"
    result = cli("convert", hostile, "--out", out, "--engine", "off")
    assert_bad_input(result, *REFUSAL[kind], "nothing was run", "--trust-pickle")
    assert not marker.exists()
    assert_nothing_written(out)


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_the_hostile_files_run_code_in_plain_torch(tmp_path: Path, linear_pt2: Path, marker: Path,
                                                   kind: str) -> None:
    """What the refusals prevent: torch.export.load alone runs each file's code (here: it creates the marker)."""
    hostile = HOSTILE[kind](linear_pt2, tmp_path / f"{kind}.pt2", marker)
    try:
        torch.export.load(hostile)
    except Exception:  # noqa: BLE001 - the stand-in payloads are not what torch expects once they have run
        pass
    assert marker.exists(), kind


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_guard_refuses_what_a_scan_could_miss(tmp_path: Path, linear_pt2: Path, marker: Path, kind: str) -> None:
    """Defence in depth: torch's own loader, run under the guard, refuses each hostile payload; then the guard
    is gone and torch is as it was."""
    from torch._export.serde import serialize
    from torch.export.pt2_archive import _package

    hostile = HOSTILE[kind](linear_pt2, tmp_path / f"{kind}.pt2", marker)
    before = (torch.load, torch._C._pickle_load_obj, _package.pickle, _package._load_aoti, serialize.sympy)
    with pytest.raises(Exception), no_code_from_file(False) as refused:  # noqa: B017 - torch wraps some of them
        torch.export.load(hostile)
    assert refused, kind
    assert not marker.exists()
    assert (torch.load, torch._C._pickle_load_obj, _package.pickle, _package._load_aoti, serialize.sympy) == before


def test_verify_reference_is_refused_the_same_way(cli, tmp_path: Path, bundle: Path, marker: Path) -> None:
    hostile = sample_inputs(MODELS / "digits_resnet.pt2", tmp_path / "reference.pt2", marker)
    result = cli("verify", bundle, "--reference", hostile, "--json")
    assert_bad_input(result, "sample inputs", "nothing was run")
    assert not marker.exists()


def test_a_pickled_weight_loads_when_trusted(tmp_path: Path, linear_pt2: Path) -> None:
    """torch writes tensor subclasses as pickled weights; a plain Parameter stored the same way stands in for one
    (same config flag, same loader path): refused by name unless trusted, then loaded exactly."""
    weight = torch.export.load(linear_pt2).state_dict["weight"]
    pickled = pickled_weight(linear_pt2, tmp_path / "pickled.pt2", torch_saved(torch.nn.Parameter(weight.clone())))
    with pytest.raises(MpexportError, match=r"weight 'weight' .*use_pickle"):
        load_model(pickled)
    loaded = load_model(pickled, trust_pickle=True)
    assert loaded.program is not None
    assert torch.equal(loaded.program.state_dict["weight"], weight)


def test_aotinductor_code_in_a_pt2_is_refused(tmp_path: Path, linear_pt2: Path) -> None:
    hostile = rewrite_zip(linear_pt2, tmp_path / "aoti.pt2", lambda name, data: data,
                          {"data/aotinductor/model/model.so": b"\x7fELF not really"})
    with pytest.raises(MpexportError, match="AOTInductor compiled code"):
        load_model(hostile)


def test_sympy_expressions_torch_writes_are_plain() -> None:
    for text in ("Symbol('s77', positive=True, integer=True)", "FloorDiv(Symbol('s0'), Integer(2))", "2*s0 + 1",
                 "Mul(Integer(2), Symbol('s77', positive=True, integer=True))", "-oo", "int_oo"):
        assert not unsafe_expression(text), text
    for text in ("__import__('os').system('x')", "exec(bytes((105,)))", "Symbol('s0').func", "Max(*[1])",
                 "Symbol('a b')", "lambda: 1", "[s0][0]", "preview(s0)"):
        assert unsafe_expression(text), text


def test_the_bundled_pt2s_still_load(linear_pt2: Path) -> None:
    for path in (MODELS / "digits_resnet.pt2", MODELS / "digits_transformer.pt2", linear_pt2):
        assert load_model(path).program is not None


# ---------------------------------------------------------------------------------------------------------------
# B. zip CRCs checked on load


def flip_bytes(path: Path, leaf: str, count: int = 64) -> str:
    """Flip ``count`` bytes in the middle of the zip entry named ``leaf`` (inside the root folder), in place;
    return the entry's full name."""
    from mpexport.sources.archives import local_data_offset

    with zipfile.ZipFile(path) as archive:
        info = next(info for info in archive.infolist() if info.filename.split("/", 1)[-1] == leaf)
    start = local_data_offset(path, info) + (info.file_size - count) // 2
    with path.open("r+b") as handle:
        handle.seek(start)
        data = handle.read(count)
        handle.seek(start)
        handle.write(bytes(byte ^ 0xFF for byte in data))
    return info.filename


def test_flipped_bytes_in_a_pt2_weight_are_refused(cli, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.pt2"
    shutil.copy(MODELS / "digits_resnet.pt2", damaged)
    entry = flip_bytes(damaged, "data/weights/weight_12")
    out = tmp_path / "out"
    result = cli("convert", damaged, "--out", out, "--engine", "off")
    assert_bad_input(result, f"entry '{entry}'", "damaged", "CRC")
    assert_nothing_written(out)


@pytest.mark.parametrize("kind", ["checkpoint", "torchscript"])
def test_flipped_bytes_in_other_zip_formats_are_refused(tmp_path: Path, kind: str) -> None:
    model = build_cnn().eval()
    path = tmp_path / f"{kind}.pt"
    if kind == "checkpoint":
        torch.save(model.state_dict(), path)
    else:
        torch.jit.save(torch.jit.trace(model, torch.randn(1, 1, 8, 8)), path)
    with zipfile.ZipFile(path) as archive:
        largest = max(archive.infolist(), key=lambda info: info.file_size).filename.split("/", 1)[-1]
    entry = flip_bytes(path, largest)
    with pytest.raises(MpexportError, match=f"entry '{entry}' fails its check .*CRC"):
        load_model(path, factory=CNN_FACTORY)


def test_a_zip_bomb_entry_is_refused_before_torch_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "bomb.pt"
    torch.save(build_cnn().state_dict(), path)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        archive.writestr(f"{root}/padding", bytes(80 << 20))
    with pytest.raises(MpexportError, match=f"entry '{root}/padding' expands .* a zip bomb"):
        load_model(path, factory=CNN_FACTORY)


# ---------------------------------------------------------------------------------------------------------------
# C. weights the model does not use, nonsense configs, deep records


@pytest.fixture
def bert_directory(tmp_path: Path) -> Path:
    directory = tmp_path / "bert"
    build_bert().save_pretrained(directory)
    return directory


def set_config(directory: Path, **values: object) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(values)
    (directory / "config.json").write_text(json.dumps(config))


def test_negative_size_in_config_is_refused_by_name(cli, tmp_path: Path, bert_directory: Path) -> None:
    set_config(bert_directory, num_hidden_layers=-5)
    result = cli("convert", bert_directory, "--out", tmp_path / "out", "--engine", "off")
    assert_bad_input(result, "num_hidden_layers to -5", "cannot be negative")


@pytest.mark.parametrize(("layers", "unused"), [(0, 32), (1, 16)])
def test_weights_the_config_does_not_build_are_an_error(cli, tmp_path: Path, bert_directory: Path, layers: int,
                                                        unused: int) -> None:
    set_config(bert_directory, num_hidden_layers=layers)
    out = tmp_path / "out"
    result = cli("convert", bert_directory, "--out", out, "--engine", "off")
    assert_bad_input(result, f"{unused} weights in the files are not used by the model built from bert/config.json",
                     f"(e.g. bert.encoder.layer.{layers}.")
    assert_nothing_written(out)


def test_a_head_the_files_have_no_weights_for_is_an_error(bert_directory: Path) -> None:
    with pytest.raises(MpexportError, match="weights the model built from bert/config.json needs are not in the "
                                            r"files \(e.g. cls\.predictions.*would be random"):
        load_model(bert_directory, task="masked-lm")


def test_a_smaller_task_head_drops_the_saved_head_with_a_note(bert_directory: Path) -> None:
    loaded = load_model(bert_directory, task="feature-extraction")
    assert any("--task feature-extraction: 2 weights of the saved head are not used" in note for note in loaded.notes)


def test_checkpoint_weight_of_another_shape_is_one_line(tmp_path: Path) -> None:
    state = build_cnn().state_dict()
    state["fc.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(MpexportError, match=r"1 weights of other shapes \(e.g. fc.weight: \(3, 3\) in the file"):
        load_model(tmp_path / "ckpt.pt", factory=CNN_FACTORY)


def test_checkpoint_with_unused_weights_is_refused(tmp_path: Path) -> None:
    state = {**build_cnn().state_dict(), "extra.weight": torch.zeros(2)}
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(MpexportError, match=r"1 unexpected \(e.g. extra.weight\)"):
        load_model(tmp_path / "ckpt.pt", factory=CNN_FACTORY)


def test_deeply_nested_record_is_one_line(cli, tmp_path: Path) -> None:
    nested: list = []
    for _ in range(20_000):
        nested = [nested]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)
    try:
        torch.save({"state_dict": build_cnn().state_dict(), "hyper_parameters": {"layers": nested},
                    "pytorch-lightning_version": "2.4.0"}, tmp_path / "deep.ckpt")
    finally:
        sys.setrecursionlimit(limit)
    result = cli("convert", tmp_path / "deep.ckpt", "--factory", CNN_FACTORY, "--out", tmp_path / "out",
                 "--engine", "off")
    assert_bad_input(result, "nested too deeply", "RecursionError")


def test_a_fifo_is_refused_without_being_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "model.pt2"
    os.mkfifo(fifo)
    with pytest.raises(MpexportError, match="is a FIFO, not a regular file"):
        load_model(fifo)


@pytest.mark.parametrize(("shard", "why"), [("../outside.safetensors", "not a file beside it"),
                                            ("model-00001-of-00002.safetensors", "is a FIFO")])
def test_a_weights_index_names_only_files_beside_it(tmp_path: Path, shard: str, why: str) -> None:
    directory = tmp_path / "sharded"
    build_bert().save_pretrained(directory, max_shard_size="100KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    if why == "is a FIFO":
        (directory / shard).unlink()
        os.mkfifo(directory / shard)
    with pytest.raises(MpexportError, match=why):
        load_model(directory)
