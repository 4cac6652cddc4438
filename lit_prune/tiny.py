"""A tiny random Qwen2 model with a locally built tokenizer, for tests and the tiny CPU config.

``python -m lit_prune.tiny checkpoints/tiny-random-qwen2`` writes it (the folder is committed). The
weights are random: it exercises every code path in seconds but has no task to find.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from lit_prune.tokenizer import build_tokenizer

__all__ = ["TINY_CORPUS", "make_tiny_model", "save_tiny_model"]

log = logging.getLogger(__name__)

TINY_CORPUS = [
    "Tom has 12 apples and buys 7 more. How many apples does Tom have? 12 + 7 = 19. \\boxed{19}",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Answer the question from the passage. Passage: The Eiffel Tower is in Paris. Question: Where is it? Paris.",
    "Hello, how are you today? I am fine, thank you. Shall we go to the park?",
    "def add(a, b):\n    return a + b\n",
] * 20


def make_tiny_model(seed: int = 0, vocab_size: int = 384, **overrides):
    """A (model, tokenizer) pair: 2 layers, hidden 64, d_ff 256, random weights."""
    tokenizer = build_tokenizer(TINY_CORPUS, vocab_size=vocab_size)
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    kwargs.update(overrides)
    model = Qwen2ForCausalLM(Qwen2Config(**kwargs)).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def save_tiny_model(path: str | Path, seed: int = 0, **overrides) -> Path:
    """Write the tiny model and tokenizer to ``path`` (a Hugging Face folder)."""
    path = Path(path)
    model, tokenizer = make_tiny_model(seed, **overrides)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", nargs="?", default="checkpoints/tiny-random-qwen2")
    print(save_tiny_model(parser.parse_args().path))
