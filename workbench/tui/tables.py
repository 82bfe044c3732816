"""The row under a :class:`DataTable`'s cursor, read the one way every pane reads it."""

from __future__ import annotations

from textual.widgets import DataTable
from textual.widgets._data_table import CellDoesNotExist


def cursor_key(table: DataTable) -> str | None:
    """The key of the row under the cursor, or None for an empty table or no such cell."""
    if table.row_count == 0:
        return None
    try:
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
    except CellDoesNotExist:
        return None
    return None if key is None else str(key)
