"""The edit request and its validation."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import BadRequestError

#: the longest prompt (its subject filled in) or target one edit takes, in tokens of
#: the model's tokenizer (v* optimises over every context template times the prompt)
MAX_REQUEST_TOKENS = 256
#: a target_true that says there is no true object: the end-of-text token as text, the
#: target_true of every zsRE request in the published code (kmeng01/memit dsets/zsre.py)
END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class EditRequest:
    """One fact edit: ``prompt.format(subject)`` should continue with ``target_new``."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def validate(self) -> EditRequest:
        """Raise :class:`BadRequestError` on a request that cannot be run; returns it.

        Checked once: the request is frozen, so one that passed is remembered as
        valid and carried on, and validating it again (the editor does, for
        callers that did not) returns at once.
        """
        if self.validated:
            return self
        n = self.prompt.count("{}")
        if n != 1:
            raise BadRequestError(
                f"the prompt must contain exactly one '{{}}' where the subject goes "
                f"(found {n}): {self.prompt!r}"
            )
        stripped = self.prompt.replace("{}", "")
        if "{" in stripped or "}" in stripped:
            raise BadRequestError(f"the prompt has a stray brace besides '{{}}': {self.prompt!r}")
        if not self.subject.strip():
            raise BadRequestError("the subject is empty")
        if not self.target_new.strip():
            raise BadRequestError("target_new is empty")
        if self.target_true is not None and not self.target_true.strip():
            raise BadRequestError("target_true is empty (leave it out instead)")
        if self.target_true is not None and self.target_true.strip() == self.target_new.strip():
            raise BadRequestError("target_new equals target_true: nothing to edit")
        object.__setattr__(self, "_validated", True)  # not a field: equality and to_dict unchanged
        return self

    @property
    def true_object(self) -> str | None:
        """The object ``target_new`` replaces, for probes that compare the two: None where
        there is none (no ``target_true``, or the end-of-text marker, as zsRE requests
        have). Editing never reads it (v* and the solves see ``target_new`` only)."""
        if self.target_true is None or self.target_true.strip() == END_OF_TEXT:
            return None
        return self.target_true

    @property
    def validated(self) -> bool:
        """Whether :meth:`validate` passed on this request."""
        return bool(self.__dict__.get("_validated", False))

    def length_problem(self, tokenizer: Any, limit: int = MAX_REQUEST_TOKENS) -> str | None:
        """Why the request is too long for ``tokenizer`` (``None``: within ``limit``)."""
        fields = [
            ("the prompt with its subject", self.text, "the subject or the prompt"),
            ("target_new", self.target_new, "target_new"),
        ]
        if self.target_true is not None:
            fields.append(("target_true", self.target_true, "target_true"))
        for what, text, fix in fields:
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if n > limit:
                return f"{what} is {n} tokens long; the limit is {limit} tokens (shorten {fix})"
        return None

    @property
    def text(self) -> str:
        """The bare prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)
