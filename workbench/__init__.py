"""rome-workbench's user-facing layer: the SQLite store (``workbench.store``),
the headless services both faces call (``workbench.core``), the typer CLI
(``workbench.cli``), plots (``workbench.plot``) and the Textual app
(``workbench.tui``).

Nothing is imported here, so ``import workbench.store`` stays light (no torch,
no matplotlib, no textual until they are needed).
"""
