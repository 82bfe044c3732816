"""The stated limits on what one edit may ask for, checked before any model work.

- :data:`MAX_REQUEST_TOKENS` (256): the prompt with its subject filled in, and
  each target, in the model's own tokens. v* optimises over every context
  template times the prompt, so the cost grows with the prompt's length; a
  2,000-character subject took 39 s on the tiny model. CounterFact prompts are
  under 30 tokens.
- :data:`MAX_GENERATE_TOKENS` (1000): the greedy text shown before and after.
"""

from __future__ import annotations

from typing import Any

from rome import BadRequestError, EditRequest
from rome.request import MAX_REQUEST_TOKENS

__all__ = [
    "MAX_GENERATE_TOKENS",
    "MAX_REQUEST_TOKENS",
    "check_generate_tokens",
    "check_request_length",
]

MAX_GENERATE_TOKENS = 1000


def check_generate_tokens(n: int) -> int:
    """``n`` if it is a token count for the greedy text (0 to the limit)."""
    if n < 0 or n > MAX_GENERATE_TOKENS:
        raise BadRequestError(
            f"--generate-tokens must be between 0 and {MAX_GENERATE_TOKENS}, not {n}"
        )
    return n


def check_request_length(tokenizer: Any, req: EditRequest) -> None:
    """Refuse a request whose prompt (subject filled in) or a target is longer than
    :data:`MAX_REQUEST_TOKENS` tokens of ``tokenizer``."""
    problem = req.length_problem(tokenizer, MAX_REQUEST_TOKENS)
    if problem is not None:
        raise BadRequestError(problem)
