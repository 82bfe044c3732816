"""Loading models: a preset name, a hub id or a local folder, the embedded SmolLM2,
and the tiny in-process test models; :class:`LoadedModel` is what a load gives.

What the load leans on lives beside it: ``devices`` (device, dtype and device
map, where the weights went), ``hub`` (reachability, the cache, quiet loading)
and ``embedded`` (the GGUF SmolLM2 and its safetensors copy).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .arch import templates_for
from .devices import (
    check_edited_layer_placement,
    memory_per_device,
    placement_of,
    resolve_device,
    resolve_device_map,
    resolve_dtype,
)
from .embedded import EMBEDDED_PREFIX, embedded_smollm2_dir
from .errors import (
    DeviceMapError,
    LayerOutOfRangeError,
    UnknownPresetError,
    UnsupportedArchitectureError,
    WeightsUnavailableError,
)
from .hparams import EditHparams, check_modules, find_preset, for_model, list_presets, load_preset
from .hub import hub_reachable, in_hub_cache, no_load_bars, quiet_hub, raise_offline
from .paths import cache_dir, slug
from .testing import TESTING_PREFIX, tiny_model

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    hparams: EditHparams
    name: str
    source: str
    device: torch.device  # where the edited layer lives (keys, v*, the update)
    dtype: torch.dtype
    seconds: float = 0.0
    device_map: dict[str, Any] | None = field(default=None)  # accelerate's, when loaded with one

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)  # type: ignore[union-attr, arg-type]

    def memory_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def edited_layer_device(self, layer: int | None = None) -> str:
        """Where the edited weight lives: ``cuda:1``, ``cpu``, or ``disk``/``meta`` if offloaded."""
        name = self.hparams.weight_module(self.hparams.layer if layer is None else layer)
        return placement_of(self.model, name, self.device_map)

    def memory_per_device(self) -> dict[str, int]:
        """Bytes of parameters and buffers per device (offloaded ones under ``disk`` / ``cpu``)."""
        return memory_per_device(self.model, self.device_map)


def hparams_for(
    name: str,
    model_type: str | None = None,
    hparams: str | Path | EditHparams | None = None,
    layer: int | None = None,
) -> EditHparams:
    """The preset for ``name`` (or the file ``hparams``), with ``layer`` overriding its layer.

    A model with no preset needs ``layer``; its module names then come from
    the architecture table.
    """
    if hparams is not None:
        hp = hparams if isinstance(hparams, EditHparams) else load_preset(hparams)
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
    device_map: str | dict[str, Any] | None = None,
    hparams: str | Path | None = None,
    layer: int | None = None,
    max_memory: dict[Any, Any] | None = None,
) -> LoadedModel:
    """Load a model and its preset: a preset name, a hub id, or a local folder.

    ``device_map`` (``auto``, ``balanced``, ``balanced_low_0``, ``sequential``
    or a dict) spreads a model larger than one GPU over the devices through
    accelerate; ``device`` is then not used, and ``max_memory`` is passed on.
    Weights the map sends to disk go under the cache's ``offload/`` folder.
    The tiny in-process models take no device map (:class:`DeviceMapError`).
    """
    t0 = time.perf_counter()
    preset = for_model(name, load_preset(hparams)) if hparams is not None else find_preset(name)
    source = preset.model if preset is not None else name
    torch_dtype = resolve_dtype(dtype)
    dmap = resolve_device_map(device_map)
    dev = resolve_device(device)
    if source.startswith(TESTING_PREFIX):
        return _load_tiny(name, source, preset, dev, torch_dtype, layer, t0, dmap)
    if dmap is not None and device != "auto":
        log.info("--device %s is not used with a device map (%s)", device, dmap)
    path, local_only = _weights_path(name, source, preset)
    kwargs = _load_kwargs(source, torch_dtype, local_only, dmap, max_memory)
    config, tok, model = _from_pretrained(name, source, path, preset, local_only, kwargs)
    if dmap is None:
        model.to(dev)  # type: ignore[arg-type]
    model.eval()
    hp = hparams_for(name, config.model_type, preset if hparams is not None else None, layer)
    n_layers = int(config.num_hidden_layers)
    if not 0 <= hp.layer < n_layers:
        raise LayerOutOfRangeError(
            f"layer {hp.layer} is out of range: {name} has 0..{n_layers - 1}"
        )
    hf_map = getattr(model, "hf_device_map", None) if dmap is not None else None
    hf_map = dict(hf_map) if hf_map is not None else ({"": "cpu"} if dmap is not None else None)
    check_modules(model, hp, name)
    try:
        edit_dev = check_edited_layer_placement(model, hp.weight_module(hp.layer), hf_map)
    except LookupError as exc:
        raise UnsupportedArchitectureError(
            f"{exc}: the preset's module names do not fit {name!r} (pass --hparams FILE)"
        ) from None
    return LoadedModel(
        model=model,
        tokenizer=_prepare_tokenizer(tok),
        hparams=hp,
        name=hp.name,
        source=str(path),
        device=edit_dev,
        dtype=torch_dtype,
        seconds=time.perf_counter() - t0,
        device_map=hf_map,
    )


def _weights_path(name: str, source: str, preset: EditHparams | None) -> tuple[str | Path, bool]:
    """Where ``source``'s weights load from, and whether only from local files (a hub id
    already in the cache while the hub is unreachable); offline and not cached raises."""
    if source.startswith(EMBEDDED_PREFIX):
        return embedded_smollm2_dir(), False
    if Path(source).exists() or hub_reachable():
        return source, False
    if not in_hub_cache(source):
        raise_offline(name, source, preset)
    return source, True  # cached: load it without a round of retries


def _load_kwargs(
    source: str,
    torch_dtype: torch.dtype,
    local_only: bool,
    dmap: str | dict[str, Any] | None,
    max_memory: dict[Any, Any] | None,
) -> dict[str, Any]:
    """The keyword arguments of ``AutoModelForCausalLM.from_pretrained``."""
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if local_only:
        kwargs["local_files_only"] = True
    if dmap is not None:
        kwargs["device_map"] = dmap
        kwargs["offload_folder"] = str(cache_dir() / "offload" / slug(str(source)))
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
    return kwargs


def _from_pretrained(
    name: str,
    source: str,
    path: str | Path,
    preset: EditHparams | None,
    local_only: bool,
    kwargs: dict[str, Any],
) -> tuple[Any, PreTrainedTokenizerBase, nn.Module]:
    """The config, tokenizer and model at ``path``; a load that fails raises one of the
    package's errors (unknown model, weights unavailable, a device map that does not fit)."""
    try:
        with quiet_hub(), no_load_bars(local=local_only or Path(path).exists()):
            config = AutoConfig.from_pretrained(path, local_files_only=local_only)
            tok = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        if preset is None and not Path(name).exists():
            names = ", ".join(sorted(list_presets()))
            raise UnknownPresetError(
                f"unknown model {name!r}: not a preset ({names}), not a local folder, "
                "and not loadable from the hub"
            ) from None
        raise WeightsUnavailableError(
            f"cannot load {source!r}: {str(exc).splitlines()[0]} "
            "Offline, download it first where there is a network (huggingface-cli download "
            f"{source}) and pass the local folder, or use the embedded smollm2-135m."
        ) from None
    except ValueError as exc:
        if "device_map" not in kwargs:
            raise
        raise DeviceMapError(
            f"cannot place {source!r} with device map {kwargs['device_map']!r}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    return config, tok, model


def _load_tiny(
    name: str,
    source: str,
    preset: EditHparams | None,
    dev: torch.device,
    dtype: torch.dtype,
    layer: int | None,
    t0: float,
    dmap: str | dict[str, Any] | None,
) -> LoadedModel:
    """A tiny in-process test model (:mod:`rome.testing`): built here, no device map."""
    if dmap is not None:
        raise DeviceMapError(
            f"device maps do not apply to {name!r}: it is built in-process, not loaded "
            "from weights; use --device instead"
        )
    assert preset is not None
    model, tok = tiny_model(source[len(TESTING_PREFIX) :])
    model.to(device=dev, dtype=dtype)
    hp = preset.replace(layer=layer) if layer is not None else preset
    n_layers = int(model.config.num_hidden_layers)  # type: ignore[union-attr, arg-type]
    if not 0 <= hp.layer < n_layers:
        raise LayerOutOfRangeError(f"layer {hp.layer} is out of range: 0..{n_layers - 1}")
    check_modules(model, hp, hp.name)
    return LoadedModel(model, tok, hp, hp.name, source, dev, dtype, time.perf_counter() - t0)
