"""The workbench's screens and tab panes, one per module."""
