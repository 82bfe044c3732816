"""The random-weight models of ``benchmarks/gpu_check.py``: GPT-2 XL and GPT-J-6B shapes
(or small ones for a CPU) built from their configs on the device, no download, with the
locally trained tokenizer of ``rome.testing`` and the preset's settings for a random model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

TEMPLATES = [
    "{}",
    "The news today. {}",
    "In the city of Paris. {}",
    "He said that the. {}",
    "A new study shows. {}",
    "The company was founded. {}",
    "Last year the team. {}",
    "She wrote a book. {}",
    "It was a long day. {}",
    "The river flows through. {}",
    "According to the report. {}",
]


@dataclass
class Shape:
    name: str
    arch: str  # gpt2 or gptj
    preset: str
    n_layer: int
    width: int
    n_head: int
    vocab: int
    dtype: torch.dtype
    layer: int
    extra: dict[str, Any] = field(default_factory=dict)


def shapes(small: bool) -> list[Shape]:
    if small:
        return [
            Shape("gpt2-xl-shape (small)", "gpt2", "gpt2-xl", 6, 256, 4, 4096, torch.float32, 3),
            Shape(
                "gpt-j-6b-shape (small)",
                "gptj",
                "gpt-j-6b",
                4,
                256,
                4,
                4096,
                torch.bfloat16,
                2,
                {"rotary_dim": 16},
            ),
        ]
    return [
        Shape("gpt2-xl-shape", "gpt2", "gpt2-xl", 48, 1600, 25, 50257, torch.float32, 17),
        Shape(
            "gpt-j-6b-shape",
            "gptj",
            "gpt-j-6b",
            28,
            4096,
            16,
            50400,
            torch.bfloat16,
            5,
            {"rotary_dim": 64},
        ),
    ]


def build(shape: Shape, device: torch.device):
    """The model from its config, random weights, built on ``device`` in its dtype."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM

    from rome.hparams import find_preset
    from rome.models import LoadedModel
    from rome.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    common = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config: Any
    if shape.arch == "gpt2":
        config = GPT2Config(
            vocab_size=shape.vocab,
            n_positions=1024,
            n_embd=shape.width,
            n_layer=shape.n_layer,
            n_head=shape.n_head,
            **common,
        )
        cls: Any = GPT2LMHeadModel
    else:
        config = GPTJConfig(
            vocab_size=shape.vocab,
            n_positions=2048,
            n_embd=shape.width,
            n_layer=shape.n_layer,
            n_head=shape.n_head,
            **shape.extra,
            **common,
        )
        cls = GPTJForCausalLM
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(shape.dtype)
    try:
        with device:
            model = cls(config).eval()
    finally:
        torch.set_default_dtype(old)
    preset = find_preset(shape.preset)
    assert preset is not None
    hp = preset.replace(
        name=f"random-{shape.preset}",
        model=f"random-{shape.preset}",
        layer=shape.layer,
        mom2_dataset="sampled",
        mom2_n_samples=64,
        mom2_max_len=64,
        context_templates=TEMPLATES,
        max_update_ratio=1e9,  # random weights: the safety limit is not the point here
    )
    tok.padding_side = "right"
    return LoadedModel(model, tok, hp, hp.name, "random", device, shape.dtype)
