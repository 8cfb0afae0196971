"""Runs ``mpexport`` command lines in this process the way a user's shell would, each with the process's real
standard error (file descriptor 2) captured, and writes what happened as JSON. Used by ``test_fuzz.py``.

    python tests/fuzz_driver.py CASES.json RESULTS.json

CASES.json: a list of argument lists. RESULTS.json: per case the exit code and everything written to fd 2 (our
one-line errors, and anything a library printed, by Python or by C code).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path


def run(args: list[str]) -> dict:
    """One command line: its exit code and the bytes written to fd 2 while it ran."""
    from mpexport.cli import main

    with tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            try:
                main(args, standalone_mode=False)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException as exc:  # noqa: BLE001 - what escapes the CLI is the finding
                import traceback

                traceback.print_exc()
                code = f"escaped: {type(exc).__name__}"
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        return {"args": args, "code": code, "stderr": capture.read().decode(errors="replace")}


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps([run(args) for args in cases], indent=1))


if __name__ == "__main__":
    main()
