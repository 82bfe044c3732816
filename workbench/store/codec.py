"""How values go into and out of the database: JSON text, timestamps, run ids and
the rank-one factors (a safetensors blob, bit-exact, dtype included)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidFieldError

if TYPE_CHECKING:
    import torch

_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: Top-level keys of an engine record that hold the factors themselves; they
#: live in the safetensors blob, not in the JSON record.
FACTOR_KEYS = frozenset({"u", "v", "factors"})


def now() -> str:
    """The current UTC time as ISO 8601 with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def jsonable(obj: Any) -> Any:
    """Convert dataclasses, numpy/torch scalars, paths, tuples to plain JSON values."""
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        # rome's EditResult.to_dict(factors=False) skips the factor lists.
        try:
            takes_factors = "factors" in inspect.signature(obj.to_dict).parameters
        except (TypeError, ValueError):
            takes_factors = False
        return jsonable(obj.to_dict(factors=False) if takes_factors else obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and hasattr(obj, "ndim"):  # numpy arrays / torch tensors
        if obj.ndim == 0:
            return obj.item()
        n = obj.numel() if hasattr(obj, "numel") else int(obj.size)
        if n > 64:
            raise InvalidFieldError(
                f"refusing to store a {tuple(obj.shape)} array as JSON; "
                "pass factors as u= and v=, and summarise other arrays"
            )
        return obj.tolist()
    if hasattr(obj, "item"):  # numpy scalar
        return obj.item()
    raise InvalidFieldError(f"cannot store a {type(obj).__name__} as JSON")


def dumps(obj: Any) -> str | None:
    """JSON text of ``obj`` (``None`` stays NULL)."""
    if obj is None:
        return None
    return json.dumps(jsonable(obj))


def loads(text: str | None, default: Any) -> Any:
    """The value of a JSON column, ``default`` for NULL."""
    if text is None:
        return default
    return json.loads(text)


def opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def opt_int(x: Any) -> int | None:
    return None if x is None else int(x)


def check_run_id(run_id: str) -> str:
    """``run_id`` if it is 1-64 letters, digits, '-' or '_' (it names lock files)."""
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise InvalidFieldError(f"invalid run id {run_id!r}: use 1-64 letters, digits, '-' or '_'")
    return run_id


def nan_to_none(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    return obj


def pack_factors(u: torch.Tensor, v: torch.Tensor, metadata: dict[str, str]) -> bytes:
    """``u`` and ``v`` as one safetensors blob (CPU copies, dtype kept)."""
    import safetensors.torch

    tensors = {
        "u": u.detach().to("cpu").contiguous().clone(),
        "v": v.detach().to("cpu").contiguous().clone(),
    }
    return safetensors.torch.save(tensors, metadata=metadata)


def unpack_factors(blob: bytes, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, v)`` from :func:`pack_factors`' blob, moved to ``device`` if given."""
    import safetensors.torch

    tensors = safetensors.torch.load(bytes(blob))
    u, v = tensors["u"], tensors["v"]
    if device is not None:
        u, v = u.to(device), v.to(device)
    return u, v
