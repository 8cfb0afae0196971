"""``python -m mpexport.cli``: the command line."""

from mpexport.cli.main import main

main()
