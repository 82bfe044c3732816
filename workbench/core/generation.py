"""Greedy continuations before / after an edit, and a word-level diff of the two."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedTokenizerBase

GEN_TOKENS = 24
_TOKEN = re.compile(r"\s+|\w+|[^\w\s]")


def greedy(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = GEN_TOKENS,
) -> list[str]:
    """Greedy continuations (without the prompt) of each prompt."""
    if not prompts:
        return []
    from evals.metrics import generate

    return generate(model, tok, list(prompts), max_new_tokens, greedy=True)


@dataclass(frozen=True)
class GenerationPair:
    prompt: str
    before: str
    after: str

    @property
    def changed(self) -> bool:
        return self.before != self.after


def _flat(text: str) -> str:
    """One line: leading space dropped, line breaks shown as ⏎."""
    text = re.sub(r"\n\s*\n+", "\n", text.strip())
    return text.replace("\n", " ⏎ ")


Span = tuple[str, str]  # (text, kind) with kind in "same", "removed", "added"


def word_diff(before: str, after: str) -> tuple[list[Span], list[Span]]:
    """The two texts split into spans marked same / removed (before) / added (after)."""
    a = _TOKEN.findall(_flat(before))
    b = _TOKEN.findall(_flat(after))
    left: list[Span] = []
    right: list[Span] = []
    sm = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal":
            left.append(("".join(a[i1:i2]), "same"))
            right.append(("".join(b[j1:j2]), "same"))
        else:
            if i2 > i1:
                left.append(("".join(a[i1:i2]), "removed"))
            if j2 > j1:
                right.append(("".join(b[j1:j2]), "added"))
    return left, right
