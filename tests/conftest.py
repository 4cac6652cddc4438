"""Shared fixtures: tiny random SwiGLU models and a tokenizer built locally (nothing is downloaded), the paths of
the offline data sets beside the checkout, and a fine-tune file whose rows all have the same token count."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Before anything imports huggingface_hub, which reads these once: tests never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lit_prune.tiny import save_tiny_model  # noqa: E402
from lit_prune.tokenizer import build_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
GSM8K = str(SHARED / "gsm8k" / "train.jsonl")
SQUAD = str(SHARED / "squad" / "small-v2.json")
DIALOG = str(SHARED / "dailydialog" / "validation.txt")

_CORPUS = [
    "Tom has 12 apples and buys 7 more. How many apples does Tom have? 12 + 7 = 19. \\boxed{19}",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "The Eiffel Tower is in Paris. Where is the Eiffel Tower? Paris.",
    "Hello, how are you today? I am fine, thank you. Shall we go to the park?",
    "def add(a, b):\n    return a + b\n",
] * 20

TINY_VOCAB = 384


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer(_CORPUS, vocab_size=TINY_VOCAB)


_TINY = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=256, pad_token_id=0, eos_token_id=2)


def make_tiny_qwen2(seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(**{**_TINY, "num_key_value_heads": 2, "tie_word_embeddings": False, **overrides})
    return Qwen2ForCausalLM(config).eval()


def make_tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """Llama with biases in the MLP, so slicing is tested with biases too."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**_TINY, "num_key_value_heads": 4, "mlp_bias": True, **overrides})).eval()


@pytest.fixture
def tiny_qwen2():
    return make_tiny_qwen2()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A Hugging Face folder with the tiny Qwen2 model and its tokenizer (``lit_prune.tiny``), one per module."""
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def equal_length_data(tmp_path_factory):
    """Fine-tune rows that all have the same token count, so per-rank and global loss means agree."""
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    with path.open("w") as handle:
        for i in range(32):
            a, b = 10 + i, 20 + (i * 7) % 38  # two-digit sums: every row has the same token count
            handle.write(json.dumps({"prompt": f"What is {a} plus {b}?", "response": f"\\boxed{{{a + b}}}",
                                     "kind": "text"}) + "\n")
    return str(path)


def make_trainer(callbacks, tmp_path, **overrides):
    """A quiet one-device CPU Trainer for tests: 2 steps, no logger, checkpoints, progress bar or validation."""
    import lightning as L

    kwargs = dict(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                  num_sanity_val_steps=0, limit_val_batches=0)
    kwargs.update(overrides)
    return L.Trainer(callbacks=callbacks, **kwargs)
