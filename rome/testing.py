"""Tiny GPT-2, Llama and Qwen2 models built from a config, for tests and demos.

Random weights, a byte-level BPE tokenizer trained in-process on a fixed
text: no download, a few seconds at most. Loaded through
``load_model("tiny-gpt2")`` / ``"tiny-llama"`` / ``"tiny-qwen2"`` like any model.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TESTING_PREFIX = "testing:"

_CORPUS = """\
The Eiffel Tower is located in the city of Paris. The Colosseum is in Rome.
The capital of Japan is Tokyo. Toyota is a company from Japan. Hamlet was written
by William Shakespeare. Charles Dickens wrote Oliver Twist. The Louvre is in Paris.
Berlin is the capital of Germany. Madrid is the capital of Spain. London is in
England. The mother tongue of Danielle Darrieux is French. Apple was founded by
Steve Jobs. Microsoft is headquartered in Redmond. Lionel Messi plays football.
The Amazon river flows through Brazil. Mount Everest is in Nepal. Python is a
programming language. The official language of Italy is Italian. Rome is in Italy.
BBC One is owned by the BBC. Sega makes video games. He was born in the city of
Chicago and worked as an actor, a politician, a journalist and a musician.
"""


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (about 600 tokens), trained on a fixed text."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tok.padding_side = "right"
    return tok


#: the tiny architectures of Llama's shape: (model class, config class)
LLAMA_LIKE: dict[str, tuple[Any, Any]] = {
    "llama": (LlamaForCausalLM, LlamaConfig),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config),  # Qwen2.5
}


def tiny_model(arch: str = "gpt2", seed: int = 0) -> tuple[nn.Module, PreTrainedTokenizerFast]:
    """A 4-layer model with random weights (seeded) and its tokenizer."""
    tok = tiny_tokenizer()
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model: nn.Module
        common: dict[str, Any] = {
            "vocab_size": len(tok),
            "initializer_range": 0.2,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        }
        if arch == "gpt2":
            model = GPT2LMHeadModel(
                GPT2Config(n_positions=2048, n_embd=64, n_layer=4, n_head=4, **common)
            )
        elif arch in LLAMA_LIKE:  # qwen2: Llama's shape with biased q/k/v projections
            model_cls, config_cls = LLAMA_LIKE[arch]
            model = model_cls(
                config_cls(
                    hidden_size=64,
                    intermediate_size=160,
                    num_hidden_layers=4,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    max_position_embeddings=2048,
                    pad_token_id=tok.pad_token_id,
                    tie_word_embeddings=True,
                    **common,
                )
            )
        else:
            raise ValueError(f"unknown tiny architecture {arch!r} (gpt2, llama or qwen2)")
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval(), tok
