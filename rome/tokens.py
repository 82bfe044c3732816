"""Tokenising templated prompts and finding the subject's last token."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from .errors import SubjectNotFoundError


@dataclass(frozen=True)
class Encoded:
    """Token ids of a filled prompt and the index of the subject's last token."""

    ids: list[int]
    subject_last: int
    text: str


def encode_with_subject(tok: PreTrainedTokenizerBase, template: str, subject: str) -> Encoded:
    """Fill ``template`` (one ``{}``) with ``subject``; locate the subject's last token.

    The subject's character span is known from where ``{}`` sits, and the
    token is found through the tokenizer's offsets, so a subject at the start
    of a prompt (no leading space) and one after a prefix both resolve.
    """
    start = template.index("{}")
    text = template.replace("{}", subject, 1)
    end = start + len(subject.rstrip())
    if end <= start:
        raise SubjectNotFoundError(f"the subject {subject!r} is empty")
    enc = tok(text, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    last = -1
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and a < end and b > start:
            last = i
    if last < 0:
        raise SubjectNotFoundError(
            f"the subject {subject!r} was not found among the tokens of {text!r}"
        )
    return Encoded(ids=ids, subject_last=last, text=text)
