"""Allows ``python -m fedge``."""

from fedge.cli import main

main()
