"""Widgets of the workbench app, one per module."""
