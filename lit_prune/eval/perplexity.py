"""Teacher-forced negative log-likelihood and perplexity, as Wanda, FLAP and LLM-Pruner report for pruned models.

Two kinds of text are scored:

- *responses*: a prompt formatted with the chat template exactly as for generation and fine-tuning
  (:func:`lit_prune.data.tokenize_supervised`), followed by the reference response and EOS; only the response
  tokens (and EOS) carry labels. Target solutions (GSM8K) and distractor answers (SQuAD, DailyDialog) are scored
  this way, which ranks models that cannot solve the task (SmolLM2-135M on GSM8K) by how well they still
  predict it.
- *plain text* (e.g. SQuAD paragraphs), no template: every token after a one-token prefix (BOS, or EOS when the
  tokenizer has no BOS, as lm-evaluation-harness does) is scored, cut at ``max_length``.

The mean is token-weighted: ``NLL = sum of token NLLs / number of tokens`` and ``PPL = exp(NLL)``, with both
sums accumulated in torchmetrics ``SumMetric`` objects, so that ranks add up to the single-process numbers.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import SumMetric

from lit_prune.data.datamodule import SupervisedCollator, tokenize_supervised
from lit_prune.data.sources import Example

__all__ = ["IGNORE_INDEX", "TokenNLL", "perplexity_batch", "sequence_nll", "text_tokens"]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


def text_tokens(tokenizer, text: str, max_length: int) -> dict[str, list[int]]:
    """Token ids of a one-token prefix + ``text`` (cut at ``max_length`` tokens), labels on every text token."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_length - 1]
    return {"input_ids": [prefix, *ids], "labels": [IGNORE_INDEX, *ids]}


def perplexity_batch(tokenizer, prompts: Sequence[str | None], responses: Sequence[str], kinds: Sequence[str],
                     max_length: int) -> tuple[dict[str, torch.Tensor] | None, list[bool]]:
    """Tokenize and right-pad one batch; a None prompt marks plain text.

    Returns:
        The padded ``input_ids``, ``attention_mask`` and ``labels`` (None when no row is kept) and, per row,
        whether it was kept (a prompt + response longer than ``max_length`` is dropped, never cut).
    """
    rows, kept = [], []
    for prompt, response, kind in zip(prompts, responses, kinds):
        if prompt is None:
            row = text_tokens(tokenizer, response, max_length)
        else:
            row = tokenize_supervised(tokenizer, Example(prompt, response, kind), max_length)
        kept.append(row is not None)
        if row is not None:
            rows.append(row)
    return (SupervisedCollator(tokenizer.pad_token_id)(rows) if rows else None), kept


@torch.no_grad()
def sequence_nll(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed NLL (float32) of the labelled next tokens, and how many there are.

    Position ``t`` predicts label ``t + 1``, as in transformers' causal-LM loss; labels equal to
    :data:`IGNORE_INDEX` (prompt, padding) are not scored. The log-softmax runs row by row in float32, so a
    batch never holds more than one row's float32 logits beyond what the model returns.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    targets = labels[:, 1:]
    sums = torch.stack([F.cross_entropy(logits[i, :-1].float(), targets[i], ignore_index=IGNORE_INDEX,
                                        reduction="sum") for i in range(len(targets))])
    return sums, (targets != IGNORE_INDEX).sum(dim=1)


class TokenNLL(nn.Module):
    """Token-weighted NLL of one text set: two ``SumMetric`` (NLL and tokens), summed over ranks by torchmetrics."""

    def __init__(self) -> None:
        super().__init__()
        self.nll_sum = SumMetric()
        self.tokens = SumMetric()

    def update(self, nll_sums: torch.Tensor, token_counts: torch.Tensor) -> None:
        self.nll_sum.update(nll_sums.float())
        self.tokens.update(token_counts.float())

    def reset(self) -> None:
        self.nll_sum.reset()
        self.tokens.reset()

    def compute(self) -> dict[str, float] | None:
        """``{"nll", "ppl", "tokens"}``, or None when no token was scored on any rank.

        Every rank must call it (it synchronises), whether or not it saw a batch of this set.
        """
        with warnings.catch_warnings():  # a rank that got no batch of this set still takes part in the sync
            warnings.filterwarnings("ignore", message=".*compute.*before the ``update``.*")
            nll_sum, tokens = float(self.nll_sum.compute()), int(self.tokens.compute())
        if tokens == 0:
            return None
        nll = nll_sum / tokens
        return {"nll": nll, "ppl": math.exp(nll), "tokens": tokens}
