"""The ``mpexport`` command line (entry point ``mpexport.cli:main``)."""

from mpexport.cli.main import main

__all__ = ["main"]
