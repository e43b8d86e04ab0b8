"""`python -m controller ...` is the `relay` command (for environments without the console script)."""

from controller.cli import main

main()
