"""The headless services both faces call: the CLI (``workbench.cli``) and the app
(``workbench.tui``) parse or lay out, call these, and render. No textual, no rich.

| module | holds |
|---|---|
| ``errors`` | the one table from error type to exit code, title, message and hint |
| ``stores`` | open / close the history database, recover stale runs, resumable runs |
| ``forms`` | :class:`EditForm` (an edit request with its probes) and its validation |
| ``limits`` | the stated limits of one edit (prompt and target tokens, generated tokens) |
| ``edits`` | previewing an edit: compute in one mode or all, text before / after |
| ``session`` | :class:`Session`: load, compute, compare, apply, record, undo, revert, re-apply |
| ``verdict`` | whether an update looks disabling; the compare verdict |
| ``generation`` | greedy continuations and their word diff |
| ``replay`` | one validation of a replay's settings; the event driver |
| ``summary`` | a run's summary as (label, value) rows |
| ``save`` | rebuild a run's edited model from the store and save it as a HF folder |
| ``history`` | the store's edits as history rows |
| ``records`` | what the session hands back (outcomes, model facts, points, rows) |
| ``format`` | number formatting shared by the faces |

Import the modules you need (``from workbench.core.replay import make_config``);
this package imports none of them eagerly.
"""

from __future__ import annotations

__all__ = [
    "edits",
    "errors",
    "format",
    "forms",
    "generation",
    "history",
    "limits",
    "records",
    "replay",
    "save",
    "session",
    "stores",
    "summary",
    "verdict",
]
