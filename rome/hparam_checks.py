"""The type and range checks of a preset's shared fields (:meth:`EditHparams.validate`).

Each check answers with one :class:`~rome.errors.BadRequestError` naming the first
field that is wrong, in the words of JSON (a preset is a JSON file). The checks take the
:class:`~rome.hparams.EditHparams` untyped (``Any``): that module imports this one, and
the import graph has no cycles, type hints included (tests/test_imports.py).
"""

from __future__ import annotations

import math
from typing import Any

from .errors import BadRequestError

#: numeric fields: (whole number?, lowest value, whether the lowest value itself is allowed)
_NUMBERS: dict[str, tuple[bool, float, bool]] = {
    "layer": (True, 0, True),
    "v_num_grad_steps": (True, 1, True),
    "v_max_requests": (True, 1, True),
    "v_norm_anchor_samples": (True, 1, True),
    "template_seed": (True, -(2**63), True),
    "mom2_n_samples": (True, 1, True),
    "mom2_max_len": (True, 1, True),
    "v_lr": (False, 0, False),
    "v_weight_decay": (False, 0, True),
    "clamp_norm_factor": (False, 0, False),
    "kl_factor": (False, 0, True),
    "v_early_stop_loss": (False, 0, True),
    "mom2_ridge": (False, 0, True),
    "max_update_ratio": (False, 0, False),
}
_TEXTS = (
    "name",
    "model",
    "layers_module",
    "mlp_out_module",
    "final_norm_module",
    "fact_token",
    "key_averaging",
    "v_stop",
    "covariance",
    "mom2_dataset",
    "mom2_dtype",
    "default_mode",
)


def json_kind(value: Any) -> str:
    """How JSON names ``value``'s type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, (list, tuple)) else "an object"


def _number_problem(value: Any, whole: bool, low: float, inclusive: bool) -> str | None:
    kind = "a whole number" if whole else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be {kind}, not {json_kind(value)} ({value!r})"
    if whole and not isinstance(value, int):
        return f"must be a whole number, not {value!r}"
    if not math.isfinite(value):
        return f"must be a finite number, not {value!r}"
    if value < low or (value == low and not inclusive):
        bound = f"at least {low:g}" if inclusive else f"above {low:g}"
        return f"must be {bound}, not {value!r}"
    return None


def _texts_problem(value: Any, optional: bool) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return f"must be a list of strings, not {json_kind(value)}"
    return None


def check_types(hp: Any) -> None:
    """One :class:`BadRequestError` for the first field whose type or range is wrong."""
    problems: dict[str, str | None] = {}
    for name, (whole, low, inclusive) in _NUMBERS.items():
        problems[name] = _number_problem(getattr(hp, name), whole, low, inclusive)
    for name in _TEXTS:
        value = getattr(hp, name)
        problems[name] = (
            None
            if isinstance(value, str) and value.strip()
            else f"must be a non-empty string, not {json_kind(value)} ({value!r})"
        )
    for name in ("v_autocast", "extends", "notes"):
        value = getattr(hp, name)
        ok = isinstance(value, str) or (value is None and name != "notes")
        problems[name] = None if ok else f"must be a string, not {json_kind(value)}"
    if hp.v_loss_layer is not None:
        problems["v_loss_layer"] = _number_problem(hp.v_loss_layer, True, 0, True)
    for name in ("v_norm_anchor", "v_prefix_reuse", "v_length_buckets"):
        value = getattr(hp, name)
        if not isinstance(value, bool):
            problems[name] = f"must be true or false, not {value!r}"
    problems["aliases"] = _texts_problem(hp.aliases, optional=False)
    problems["context_templates"] = _texts_problem(hp.context_templates, optional=True)
    lengths = hp.context_template_length_params
    if not isinstance(lengths, list) or not all(
        isinstance(p, list)
        and len(p) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in p)
        for p in lengths
    ):
        problems["context_template_length_params"] = (
            "must be a list of [tokens, count] pairs of whole numbers, e.g. [[5, 10], [10, 10]]"
        )
    for name, why in problems.items():
        if why is not None:
            raise BadRequestError(f"preset field {name} {why}")


def check_module_templates(hp: Any) -> None:
    """``mlp_out_module`` names the layer with one ``{}``; every module name is a
    dotted path."""
    if "{}" not in hp.mlp_out_module:
        raise BadRequestError("mlp_out_module must contain '{}' for the layer index")
    try:
        hp.mlp_out_module.format(0)
    except (IndexError, KeyError, ValueError):
        raise BadRequestError(
            f"mlp_out_module {hp.mlp_out_module!r} must hold one '{{}}' for the layer index "
            "and no other braces"
        ) from None
    for name in ("layers_module", "mlp_out_module", "final_norm_module"):
        value = getattr(hp, name)
        if any(not part or part.strip() != part for part in value.split(".")):
            raise BadRequestError(
                f"preset field {name} {value!r} is not a module name "
                "(dotted, e.g. transformer.h.{}.mlp.c_proj)"
            )
