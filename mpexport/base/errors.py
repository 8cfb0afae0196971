"""Errors that mpexport reports to users as one line (exit code 2), never as a traceback."""

from __future__ import annotations


class MpexportError(Exception):
    """Bad input or an impossible request, explained in one line.

    ``stage`` names the pipeline stage that refused (``load``, ``inputs``, ``export``, ...); the CLI prints
    ``error: [stage] message`` and exits with ``exit_code`` (2 unless a subclass says otherwise).
    """

    exit_code = 2

    def __init__(self, message: str, *, stage: str | None = None, hint: str | None = None) -> None:
        self.message = " ".join(message.split())
        self.stage = stage
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """The message as the CLI prints it: stage, message and hint on a single line."""
        text = f"[{self.stage}] {self.message}" if self.stage else self.message
        if self.hint:
            text += f" (hint: {' '.join(self.hint.split())})"
        return text


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's text, stripped of ANSI colour codes and cut to ``limit``."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return type(exc).__name__
