"""Module-name templates per architecture, as data (keyed by ``config.model_type``).

``{}`` in a template is the layer index. ``mlp_out`` is the edited weight W
(its input is the key, its output the value); ``layers`` the list of blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchTemplates:
    layers: str
    mlp_out: str
    final_norm: str

    def block(self, layer: int) -> str:
        return f"{self.layers}.{layer}"

    def weight_module(self, layer: int) -> str:
        return self.mlp_out.format(layer)


ARCHITECTURES: dict[str, ArchTemplates] = {
    "gpt2": ArchTemplates("transformer.h", "transformer.h.{}.mlp.c_proj", "transformer.ln_f"),
    "gptj": ArchTemplates("transformer.h", "transformer.h.{}.mlp.fc_out", "transformer.ln_f"),
    "gpt_neox": ArchTemplates(
        "gpt_neox.layers", "gpt_neox.layers.{}.mlp.dense_4h_to_h", "gpt_neox.final_layer_norm"
    ),
    "llama": ArchTemplates("model.layers", "model.layers.{}.mlp.down_proj", "model.norm"),
    "mistral": ArchTemplates("model.layers", "model.layers.{}.mlp.down_proj", "model.norm"),
    "qwen2": ArchTemplates("model.layers", "model.layers.{}.mlp.down_proj", "model.norm"),
}


def templates_for(model_type: str) -> ArchTemplates:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"no module-name templates for architecture {model_type!r} (known: {known}); "
            "pass a preset file with 'layers_module', 'mlp_out_module' and "
            "'final_norm_module' (--hparams)"
        ) from None
