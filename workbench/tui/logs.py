"""Keep log lines off the terminal while the app owns it; they go to a log file instead.

A handler that was set up before the app started (the CLI's
``logging.basicConfig(stream=sys.stderr)``, or a library's own stderr
handler such as transformers') holds the real stderr and would paint its
lines over the app. :class:`QuietTerminal` swaps every such handler for the
app's file handler while the app runs (``logging.lastResort`` and Python
warnings too) and puts everything back afterwards.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import IO, Any

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY = ("httpx", "urllib3", "filelock")


def default_log_file() -> Path:
    from rome.paths import cache_dir

    return cache_dir() / "logs" / "tui.log"


def writes_to_terminal(handler: logging.Handler) -> bool:
    """A stream handler on stdout or stderr (a file handler is not one)."""
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return False
    stream: IO[Any] | None = getattr(handler, "stream", None)
    if stream is None:
        return False
    if stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        return True
    if getattr(stream, "closed", False):
        # a stale stream (e.g. left by an in-process CLI run): a handler that re-binds to
        # the stderr of the moment, as the CLI's does, would write to the terminal
        return True
    try:
        return stream.fileno() in (1, 2)
    except (AttributeError, OSError, ValueError):  # StringIO, closed or detached streams
        return False


def _loggers() -> list[logging.Logger]:
    found = [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    return [logging.getLogger(), *found]


class QuietTerminal:
    """Route logging to ``log_file`` and away from the terminal until :meth:`restore`."""

    def __init__(self, log_file: str | Path | None = None) -> None:
        self.path = Path(log_file) if log_file is not None else default_log_file()
        self.handler: logging.FileHandler | None = None
        self._swapped: list[tuple[logging.Logger, logging.Handler]] = []
        self._root_level = logging.NOTSET
        self._levels: dict[str, int] = {}
        self._last_resort: logging.Handler | None = None
        self._captured_warnings = False
        self._depth = 0

    @property
    def active(self) -> bool:
        return self.handler is not None

    def install(self) -> None:
        """Swap the terminal handlers out (nested calls only count; see :meth:`restore`)."""
        self._depth += 1
        if self.handler is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.path, encoding="utf-8")
        handler.setFormatter(logging.Formatter(FORMAT))
        self.handler = handler
        for lg in _loggers():
            terminal = [h for h in lg.handlers if writes_to_terminal(h)]
            for h in terminal:
                lg.removeHandler(h)
                self._swapped.append((lg, h))
            if terminal and not lg.propagate:  # its lines would reach nothing, or lastResort
                lg.addHandler(handler)
        root = logging.getLogger()
        root.addHandler(handler)
        self._root_level = root.level
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        for name in NOISY:
            self._levels[name] = logging.getLogger(name).level
            logging.getLogger(name).setLevel(logging.WARNING)
        self._last_resort = logging.lastResort
        logging.lastResort = handler
        self._captured_warnings = _warnings_captured()
        logging.captureWarnings(True)

    def restore(self) -> None:
        """Put the handlers, levels and warning routing back (at the outermost call)."""
        self._depth = max(0, self._depth - 1)
        handler = self.handler
        if handler is None or self._depth:
            return
        self.handler = None
        logging.captureWarnings(self._captured_warnings)
        logging.lastResort = self._last_resort
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        self._levels = {}
        root = logging.getLogger()
        root.setLevel(self._root_level)
        for lg in _loggers():
            if handler in lg.handlers:
                lg.removeHandler(handler)
        for lg, h in self._swapped:
            lg.addHandler(h)
        self._swapped = []
        handler.close()

    def __enter__(self) -> QuietTerminal:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _warnings_captured() -> bool:
    import warnings

    return getattr(warnings.showwarning, "__module__", "") == "logging"
