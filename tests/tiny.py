"""A tiny random GPT-2 with a locally trained byte-level BPE tokenizer, for fast tests."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

EVALS_DATA = Path(__file__).resolve().parents[1] / "evals" / "data"
EOS = "<|endoftext|>"


def _corpus() -> list[str]:
    rows = json.loads((EVALS_DATA / "counterfact" / "sample.json").read_text())
    texts = [
        r[k] for r in rows for k in ("prompt", "rephrase_prompt", "target_new", "ground_truth")
    ]
    return texts + [
        "Review: Sentiment: positive negative Answer: yes no Premise: Hypothesis:",
        "Sentence 1: Sentence 2: Do the two sentences mean the same thing?",
    ]


@lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (vocab 512) trained on the bundled CounterFact sample."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, pad_token=EOS)


def tiny_gpt2(seed: int = 0) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """A 2-layer GPT-2 (width 64) with random weights, in eval mode, and its tokenizer."""
    tok = tiny_tokenizer()
    cfg = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_positions=2048,
        vocab_size=len(tok),
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg).eval(), tok
