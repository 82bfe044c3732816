"""Write the perplexity probe's held-out text from the Python documentation.

The text is prose from the language reference as it ships with the interpreter
(``pydoc_data.topics``, PSF licence), re-flowed into paragraphs. Run it with
the Python that wrote the bundled file (3.11.7) to reproduce it byte for byte:

    python scripts/make_heldout_text.py evals/data/heldout/python-docs.txt
"""

from __future__ import annotations

import pydoc_data.topics
import re
import sys
from pathlib import Path

TOPICS = ("objects", "execmodel", "exceptions", "truth")


def paragraphs(text: str) -> list[str]:
    """Paragraphs of a topic: headings, rules and indented code blocks left out."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or lines[0].startswith(" ") or re.fullmatch(r"[*=\-^]+", lines[-1].strip()):
            continue
        para = " ".join(line.strip() for line in lines)
        if len(para.split()) >= 8:
            out.append(para)
    return out


def main(path: str) -> None:
    paras = [p for t in TOPICS for p in paragraphs(pydoc_data.topics.topics[t])]
    Path(path).write_text("\n\n".join(paras) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
