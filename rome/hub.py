"""The Hugging Face hub and transformers' loading: is the hub reachable, is a model
in its cache, and loading without retry warnings or progress bars on the terminal.

A hub id that is neither cached nor reachable fails at once with one line: the
hub is probed with a short timeout (or ``HF_HUB_OFFLINE`` is honoured) before
huggingface_hub gets a chance to retry for half a minute.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
from collections.abc import Iterator
from typing import NoReturn
from urllib.parse import urlparse

from .errors import UnknownPresetError, WeightsUnavailableError
from .hparams import EditHparams, list_presets

HUB_PROBE_TIMEOUT_S = 1.5


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub can be reached: ``False`` at once under ``HF_HUB_OFFLINE``,
    else a TCP connection to the endpoint with a short timeout (DNS included)."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return False
    from huggingface_hub import constants

    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)  # a DNS lookup that hangs does not hold the caller
    return bool(result and result[0])


def in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the hub would reject (bad characters...) is not cached either
        return False
    return isinstance(found, str)


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """huggingface_hub's retry WARNINGs stay off the terminal; errors still raise."""
    hub_log = logging.getLogger("huggingface_hub")
    old = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_log.setLevel(old)


@contextlib.contextmanager
def no_load_bars(local: bool = True) -> Iterator[None]:
    """transformers' "Loading weights" / GGUF bars stay off the terminal for a local load
    (the caller reports progress); a download from the hub keeps its bars."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    gguf_bar = getattr(gguf_utils, "tqdm", None)  # the GGUF reader calls tqdm directly
    if local:
        hf_logging.disable_progress_bar()
        if gguf_bar is not None:
            gguf_utils.tqdm = functools.partial(gguf_bar, disable=True)
    try:
        yield
    finally:
        if local:
            if gguf_bar is not None:
                gguf_utils.tqdm = gguf_bar
            if was:
                hf_logging.enable_progress_bar()


def raise_offline(name: str, source: str, preset: EditHparams | None) -> NoReturn:
    """The hub is unreachable and ``source`` is not in its cache: one line, at once."""
    why = "HF_HUB_OFFLINE is set" if _env_true("HF_HUB_OFFLINE") else "the hub is unreachable"
    if preset is None:
        names = ", ".join(sorted(list_presets()))
        raise UnknownPresetError(
            f"unknown model {name!r}: not a preset ({names}), not a local folder, and not "
            f"in the Hugging Face cache ({why})"
        )
    raise WeightsUnavailableError(
        f"{source!r} (preset {preset.name}) is not in the Hugging Face cache and {why}: "
        f"download it where there is a network (huggingface-cli download {source}) and pass "
        "the local folder, or use the embedded smollm2-135m"
    )
