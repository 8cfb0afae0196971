"""Extract the autocast policy table of every torch release into ``mpexport/precision/policies/``, each in a
throwaway venv.

For each version: a new venv, ``pip install torch==VERSION`` (the registry's build, CUDA, also for a release that
lies on this machine's disk as a CPU build; the CUDA libraries come along, no GPU is needed to read the tables), then
``mpexport.precision.extract`` run from this checkout writes ``autocast-torch-<minor>.json``; the venv is
removed. What each release cost (seconds, download, venv size) is printed as a table and written as JSON.

    python scripts/extract_policy_tables.py                      # 2.6 .. newest on the registry
    python scripts/extract_policy_tables.py 2.8.0 2.10.0 --keep  # some releases; keep the venvs

The registry cap on this machine (pip's constraint file) is lifted for these throwaway installs only
(``PIP_CONFIG_FILE=/dev/null``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VERSIONS = ("2.6.0", "2.7.1", "2.8.0", "2.9.1", "2.10.0", "2.11.0", "2.12.1", "2.13.0", "2.14.1", "2.15.0")
EXTRACT = ("import sys, types; package = types.ModuleType('mpexport'); package.__path__ = [sys.argv[1] + '/mpexport']; "
           "sys.modules['mpexport'] = package; from mpexport.precision.extract import main; main()")
"""Runs the extractor from this checkout without the package's ``__init__`` (its imports need more than torch)."""
EXTRACT_NEEDS = ("numpy", "ml_dtypes", "onnx-ir")
"""What the extractor imports besides torch (the CUDA probe's oracle uses mpexport.base.dtypes)."""
LOCAL_WHEEL_SETTINGS = ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_NO_INDEX", "PIP_CONSTRAINT")
"""Settings that point pip at local wheels or caps: dropped, so that each release comes from the registry."""


def directory_mb(path: Path) -> float:
    """Size of everything under ``path``, in MB."""
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file() and not file.is_symlink()) / 1e6


def extract(version: str, workdir: Path, keep: bool) -> dict[str, object]:
    """Install torch ``version`` in a new venv under ``workdir`` and write its table; what it cost."""
    venv = workdir / f"torch-{version}"
    row: dict[str, object] = {"torch": version}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # the registry's own build: no pip configuration, and none of this machine's local wheel folders (a CPU build
    # of the release on disk there would be taken first, and its CPU-only table lacks CUDA's autocast kernels)
    environment = {key: value for key, value in os.environ.items() if key not in LOCAL_WHEEL_SETTINGS}
    environment.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    command = [str(python), "-m", "pip", "install", "--no-cache-dir", "--quiet", f"torch=={version}", *EXTRACT_NEEDS]
    install = subprocess.run(command, env=environment, capture_output=True, text=True)
    row["install_s"] = round(time.perf_counter() - started, 1)
    row["venv_mb"] = round(directory_mb(venv))
    if install.returncode != 0:
        row["error"] = (install.stderr.strip().splitlines() or ["pip failed"])[-1][:300]
    else:
        started = time.perf_counter()
        run = subprocess.run([str(python), "-c", EXTRACT, str(REPO)], capture_output=True, text=True)
        row["extract_s"] = round(time.perf_counter() - started, 1)
        row["result"] = (run.stdout.strip().splitlines() or [""])[-1][:300]
        if run.returncode != 0:
            row["error"] = (run.stderr.strip().splitlines() or ["extract failed"])[-1][:300]
    if not keep:
        shutil.rmtree(venv, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("versions", nargs="*", default=list(DEFAULT_VERSIONS))
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mpexport-torch-tables")
    parser.add_argument("--keep", action="store_true", help="keep each venv")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for version in args.versions:
        row = extract(version, args.workdir, args.keep)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| torch | install s | venv MB | extract s | result |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['torch']} | {row.get('install_s')} | {row.get('venv_mb')} | {row.get('extract_s', '-')} | "
              f"{row.get('error') or row.get('result')} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
