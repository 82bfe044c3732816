"""What the CLI test modules share: the runner, a small edit command, the one-message check."""

from __future__ import annotations

from typer.testing import CliRunner

runner = CliRunner()

#: one request on the tiny model
REQUEST = [
    "edit",
    "--model",
    "tiny-gpt2",
    "--prompt",
    "The city of {}",
    "--subject",
    "the Eiffel Tower",
    "--target-new",
    "Rome",
]
#: an edit on the tiny model that runs in a second or two
EDIT = [*REQUEST, "--generate-tokens", "2"]


def one_line(text: str) -> str:
    """The one error message in ``text`` (rich may wrap it at 80 columns when piped)."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error:"), text
    assert sum(line.startswith("error:") for line in lines) == 1, text
    assert "Traceback" not in text
    return " ".join(line.strip() for line in lines)
