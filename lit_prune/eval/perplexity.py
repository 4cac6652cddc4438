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

Its sampling error over texts (:func:`nll_standard_error`, :func:`paired_nll_difference`) is the standard
linearisation of a ratio estimator (Cochran, *Sampling Techniques*, 3rd ed., 1977, §6.3): with per-text sums
``x_i`` over ``t_i`` tokens and ``R = sum x / sum t``, ``SE(R) = sqrt(n / (n - 1) * sum (x_i - R t_i)^2) / sum t``.
Two models scored on the same texts differ by ``D = sum d_i / sum t`` with ``d_i`` the per-text difference, and
the same formula on ``d_i`` gives the paired error, which is far smaller than either model's own error when
the texts' difficulty dominates.
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

__all__ = ["IGNORE_INDEX", "TokenNLL", "nll_standard_error", "paired_nll_difference", "per_text_nll",
           "perplexity_batch", "sequence_nll", "text_tokens"]

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


def per_text_nll(records: Sequence[dict]) -> dict[str, dict[str, list[float]]]:
    """Per perplexity set, ``{text id: [summed NLL, tokens]}`` of the scored records (skipped texts left out)."""
    texts: dict[str, dict[str, list[float]]] = {}
    for record in records:
        if record.get("task") == "perplexity" and "nll" in record:
            texts.setdefault(record["set"], {})[record["id"]] = [float(record["nll"]), int(record["tokens"])]
    return texts


def _ratio_error(sums: Sequence[float], tokens: Sequence[float]) -> float | None:
    n, total = len(sums), float(sum(tokens))
    if n < 2 or total <= 0:
        return None
    ratio = sum(sums) / total
    return math.sqrt(n / (n - 1) * sum((x - ratio * t) ** 2 for x, t in zip(sums, tokens))) / total


def nll_standard_error(texts: dict[str, list[float]]) -> float | None:
    """Standard error over texts of the token-weighted NLL of ``{id: [summed NLL, tokens]}`` (None for < 2 texts)."""
    values = list(texts.values())
    return _ratio_error([v[0] for v in values], [v[1] for v in values])


def paired_nll_difference(a: dict[str, list[float]], b: dict[str, list[float]]) -> tuple[float, float | None, int]:
    """``NLL(a) - NLL(b)`` on the texts both scored with the same token count, its paired standard error, and the
    number of texts used.

    Raises:
        ValueError: If the two share no text.
    """
    shared = sorted(k for k in a.keys() & b.keys() if a[k][1] == b[k][1])
    if not shared:
        raise ValueError("the two evaluations share no scored text: they cannot be compared text by text")
    diffs, tokens = [a[k][0] - b[k][0] for k in shared], [a[k][1] for k in shared]
    return sum(diffs) / sum(tokens), _ratio_error(diffs, tokens), len(shared)
