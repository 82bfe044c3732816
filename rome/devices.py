"""Where a model's tensors live: the input device and the edited module's device."""

from __future__ import annotations

import torch
from torch import nn


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
