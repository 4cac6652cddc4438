"""Calibration batches: ``(prompt, response)`` texts tokenized, cut, sorted by length and right-padded.

The one batcher of the capture, weight-sparsity and depth callbacks and of the sweep, so every statistic is
computed on the same tokens. Kept hand-written rather than ``tokenizer(..., padding=True)``: the prompt and
the response are tokenized apart (labels on the response only, as fine-tuning sees them), too-long texts are cut
and counted (the capture warns how many), rows are sorted by length so batches pad little, and the padding is
always on the right (see :class:`~lit_prune.data.datamodule.SupervisedCollator` for why).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["labelled_batches"]


def labelled_batches(tokenizer, texts: Sequence[tuple[str, str | None]], capture: str = "response",
                     max_length: int = 512, batch_size: int = 8,
                     ) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], int]:
    """Tokenize ``(formatted prompt, reference response or None)`` pairs into ``(input_ids, attention_mask,
    labels)`` batches.

    With ``capture="response"`` a text is its prompt, its response and EOS (teacher-forced, as the fine-tune set),
    labelled on the response only; with ``prompt`` (or without a response) it is the prompt, every token labelled.
    Texts longer than ``max_length`` tokens are cut (and counted); rows are sorted by length so batches pad little.

    Args:
        tokenizer: A Hugging Face tokenizer with a pad token.
        texts: The pairs (prompts already in the chat template).
        capture: ``response`` or ``prompt``.
        max_length: Tokens kept per text.
        batch_size: Texts per batch.

    Returns:
        The batches (long tensors; labels ``-100`` on padding and prompt tokens) and how many texts were cut.
    """
    if not texts:
        return [], 0
    prompts = tokenizer([p for p, _ in texts], add_special_tokens=False)["input_ids"]
    rows, cut = [], 0
    for (_, response), ids in zip(texts, prompts):
        labels = list(ids)
        if capture == "response" and response:
            answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            labels = [-100] * len(ids) + answer
            ids = ids + answer
        if len(ids) > max_length:
            cut += 1
            ids, labels = ids[:max_length], labels[:max_length]
        rows.append((ids, labels))
    rows.sort(key=lambda row: len(row[0]))
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(1, max(len(ids) for ids, _ in chunk))
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for i, (ids, row_labels) in enumerate(chunk):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = 1
            labels[i, : len(ids)] = torch.tensor(row_labels, dtype=torch.long)
        batches.append((input_ids, mask, labels))
    return batches, cut
