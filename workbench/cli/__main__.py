"""``python -m workbench.cli`` (torchrun uses it too)."""

from workbench.cli import main

main()
