"""``python -m edgeinspect`` runs the CLI."""

from edgeinspect.cli import main

main()
