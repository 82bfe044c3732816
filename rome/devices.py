"""Devices: what ``--device``, ``--dtype`` and ``--device-map`` mean, and where a
loaded model's tensors live (the input device, the edited module's device, what a
device map offloaded).

A model larger than one device loads with ``device_map`` (``auto``,
``balanced``, ``balanced_low_0``, ``sequential`` or an explicit dict, through
accelerate). The edited layer must then live on a real device (a GPU or the
CPU, not the meta device or disk offload): its keys, v* and the update are
computed there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import DeviceMapError, InvalidDeviceError
from .nethook import get_module

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def model_device(model: nn.Module) -> torch.device:
    """Where input ids go: the first parameter's device (the embedding's).

    With an accelerate device map the model's hooks move activations on from
    there; tensors that meet the edited layer (keys, δ, the update) belong on
    :func:`module_device` instead.
    """
    return next(model.parameters()).device


def module_device(model: nn.Module, name: str) -> torch.device:
    """The device of module ``name``'s weight (the edited layer under a device map)."""
    module = model.get_submodule(name)
    for p in module.parameters():
        return p.device
    return model_device(model)


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
