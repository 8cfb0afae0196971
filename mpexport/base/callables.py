"""User code named on the command line (``package.module:function``): recognised, and imported from a
directory that is importable only for as long as the import takes."""

from __future__ import annotations

import contextlib
import importlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mpexport.base.errors import MpexportError, first_line

STAGE = "load"


@contextlib.contextmanager
def importable_from(directory: str | Path | None) -> Iterator[None]:
    """Make ``directory`` (default: the working directory) importable for the body; ``sys.path`` is restored
    afterwards, so importing a user's factory or data function leaves no trace on the interpreter's path."""
    entry = str(Path(directory) if directory is not None else Path.cwd())
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def import_callable(spec: str, *, what: str = "--factory", stage: str = STAGE,
                    import_path: str | Path | None = None) -> Any:
    """Import ``package.module:function`` from ``import_path`` (default: the working directory) and return the
    function (``sys.path`` restored afterwards, see :func:`importable_from`).

    Raises :class:`MpexportError` when the spec is malformed, the module does not import or lacks the name.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise MpexportError(f"{what} '{spec}' is not of the form package.module:function", stage=stage)
    try:
        with importable_from(import_path):
            target: Any = importlib.import_module(module_name)
    except SystemExit as exc:  # a module that exits on import would end mpexport silently, with its code
        raise MpexportError(f"{what} module '{module_name}' called sys.exit({exc.code!r}) on import", stage=stage,
                            hint="guard the module's script part with if __name__ == '__main__'") from None
    except Exception as exc:  # noqa: BLE001 - user code may fail in any way on import
        raise MpexportError(f"{what} module '{module_name}' does not import: {first_line(exc)}",
                            stage=stage) from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise MpexportError(f"{what}: '{module_name}' has no attribute '{attr}'", stage=stage)
        target = getattr(target, part)
    return target


_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_callable_spec(text: str) -> bool:
    """True for ``package.module:function`` (a validation-data source to import, not a path)."""
    return bool(_CALLABLE.match(text))
