"""The bundle against tampering and races: a manifest cannot point a command at another file (or outside the
directory), a replaced directory refuses a stale writer, a commit that fails halfway leaves the old state, what
killed commands left is swept, and what leaves the bundle is what was hashed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from mpexport.base.errors import MpexportError
from mpexport.bundle.names import FP32_ONNX, MANIFEST, MIXED_ONNX, REPORT, REPORT_HTML, TEMP_PREFIX
from mpexport.bundle.records import MAX_MANIFEST_BYTES
from mpexport.bundle.staging import bundle_ownership, check_output_dir, staged_output, sweep_leftovers
from mpexport.bundle.store import Bundle

DEAD_PID = 2**22 + 12345  # above the kernel's pid_max default: never a live process


@pytest.fixture
def copy(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "m"
    shutil.copytree(bundle, target)
    return target


def _edit_manifest(directory: Path, change) -> None:
    path = directory / MANIFEST
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _listing(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_an_artifact_cannot_be_pointed_at_another_file_of_the_bundle(copy: Path) -> None:
    def swap(data: dict) -> None:  # the mixed model "is" the FP32 one, hash included: the check alone would pass
        fp32 = data["artifacts"][FP32_ONNX]
        data["artifacts"][MIXED_ONNX].update(file=fp32["file"], sha256=dict(fp32["sha256"]))

    _edit_manifest(copy, swap)
    with pytest.raises(MpexportError, match=r"damaged.*mixed_onnx.*names the file 'model.fp32.onnx'"):
        Bundle.open(copy, uses=(MIXED_ONNX,))


@pytest.mark.parametrize("name", ["../../secret", "/etc/passwd", "sub/report.html"])
def test_an_artifact_cannot_name_a_file_outside_the_bundle(copy: Path, name: str) -> None:
    def point(data: dict) -> None:
        data["artifacts"][REPORT] = {"file": "report.json", "sha256": {"report.json": "0" * 64, name: "0" * 64},
                                     "written_by": "verify", "revision": 1}

    _edit_manifest(copy, point)
    with pytest.raises(MpexportError, match=r"lists files mpexport does not write"):
        Bundle.open(copy)


def test_unknown_manifest_fields_and_huge_manifests_are_refused(copy: Path) -> None:
    _edit_manifest(copy, lambda data: data.update(run_this="os:system"))
    with pytest.raises(MpexportError, match=r"damaged: .*unknown field.*run_this"):
        Bundle.open(copy)
    with (copy / MANIFEST).open("w") as handle:
        handle.write(" " * (MAX_MANIFEST_BYTES + 1))
    with pytest.raises(MpexportError, match=r"MiB: mpexport writes manifests of kilobytes"):
        Bundle.open(copy)


def test_a_writer_of_a_replaced_bundle_cannot_commit_into_its_replacement(copy: Path, tmp_path: Path) -> None:
    stale = Bundle.open(copy)
    # another convert --force replaces the directory: its revisions restart, so a revision check alone passes
    replacement = tmp_path / "replacement"
    shutil.copytree(copy, replacement)
    _edit_manifest(replacement, lambda data: data.update(bundle_id="another", revision=stale.manifest.revision))
    shutil.rmtree(copy)
    replacement.rename(copy)
    before = _listing(copy)
    with pytest.raises(MpexportError, match=r"replaced by another convert"):
        stale.commit("verify")
    assert _listing(copy) == before


def test_a_commit_that_fails_halfway_leaves_the_old_state(copy: Path) -> None:
    bundle = Bundle.open(copy)
    report_before = (copy / "report.json").read_bytes() if (copy / "report.json").exists() else None
    manifest_before = (copy / MANIFEST).read_bytes()
    (copy / "report.html").unlink(missing_ok=True)
    (copy / "report.html").mkdir()  # where the commit must write a file
    with pytest.raises(MpexportError, match=r"report.html' is a directory where mpexport writes a file"):
        with bundle.transaction("verify") as transaction:
            transaction.write_text(REPORT, "report.json", "{}\n")
            transaction.write_text(REPORT_HTML, "report.html", "<html></html>\n")
    assert (copy / MANIFEST).read_bytes() == manifest_before
    assert ((copy / "report.json").read_bytes() if (copy / "report.json").exists() else None) == report_before
    assert [p.name for p in copy.iterdir() if p.name.startswith(".")] == []


def test_a_manifest_that_cannot_be_replaced_rolls_the_files_back(copy: Path) -> None:
    bundle = Bundle.open(copy)
    blocker = copy / f"{TEMP_PREFIX}{os.getpid()}-{MANIFEST}"
    blocker.mkdir()  # the new manifest cannot be written: the files moved before it must go back
    files_before = _listing(copy)
    with pytest.raises(MpexportError, match=r"cannot write .*manifest.json.*the bundle was left as it was"):
        with bundle.transaction("verify") as transaction:
            transaction.write_text(REPORT, "report.json", "{}\n")
    assert _listing(copy) == files_before
    blocker.rmdir()
    assert [p.name for p in copy.iterdir() if p.name.startswith(".")] == []


def test_force_replaces_only_a_provable_bundle(copy: Path, tmp_path: Path) -> None:
    assert bundle_ownership(copy) is None
    (copy / "index.html").write_text("a user's web app that happens to hold a manifest.json")
    assert "index.html" in (bundle_ownership(copy) or "")
    with pytest.raises(MpexportError, match=r"not an output directory mpexport wrote"):
        check_output_dir(copy, force=True)
    webapp = tmp_path / "webapp"
    webapp.mkdir()
    (webapp / MANIFEST).write_text('{"name": "my extension", "manifest_version": 3}')
    (webapp / "background.js").write_text("// mine")
    with pytest.raises(MpexportError, match=r"manifest.json is not one mpexport wrote"):
        check_output_dir(webapp, force=True)


def test_force_never_replaces_a_directory_holding_the_commands_inputs(copy: Path) -> None:
    model = copy / "model.fp32.onnx"
    with pytest.raises(MpexportError, match=r"holds this command's own input"):
        check_output_dir(copy, force=True, inputs=[model])


def test_leftovers_of_killed_runs_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    out = tmp_path / "m"
    dead = tmp_path / f".m.{DEAD_PID}-x1y2.partial"
    dead.mkdir()
    (dead / "model.fp32.onnx").write_bytes(b"half a model")
    live = tmp_path / f".m.{os.getpid()}-a1b2.partial"
    live.mkdir()
    (tmp_path / f".m.old-{DEAD_PID}").symlink_to(tmp_path)
    (tmp_path / ".other.123.partial").mkdir()  # another output's, or not ours: untouched
    assert sweep_leftovers(out) == sorted([dead.name, f".m.old-{DEAD_PID}"])
    assert live.is_dir() and (tmp_path / ".other.123.partial").is_dir() and tmp_path.is_dir()


def test_force_through_a_symlink_replaces_the_directory_it_points_to(copy: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(copy)
    with staged_output(link, force=True) as staging:
        shutil.copytree(copy, staging, dirs_exist_ok=True)
        (staging / "extra").write_text("")  # stands for the new bundle's contents
    assert link.is_symlink() and (link / "extra").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_what_leaves_the_bundle_is_what_was_hashed(copy: Path, tmp_path: Path) -> None:
    bundle = Bundle.open(copy, uses=(MIXED_ONNX,))
    (copy / "model.mixed.onnx").write_bytes(b"swapped after the check")
    target = tmp_path / "shipped.onnx"
    with pytest.raises(MpexportError, match=r"changed while it was copied"):
        bundle.copy_file(MIXED_ONNX, "model.mixed.onnx", target)
    assert not target.exists()
