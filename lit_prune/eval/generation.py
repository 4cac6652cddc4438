"""Greedy, batched, left-padded generation with per-sample bookkeeping for evaluation.

The paper ("Exploring the Limits of Pruning", arXiv 2604.27115, Appendix D and F.2) decodes greedily
(``do_sample=False``, ``num_beams=1``) and, for the mitigated runs, stops a math generation as soon as it
contains a complete ``\\boxed{...}``. :func:`generate` does both and returns, per prompt, the new tokens, their
text, and whether the sample ended with EOS, hit ``max_new_tokens`` or was stopped at its boxed answer: the
inputs of the exact-match, pass@1 and trap metrics.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from lit_prune.data.prompts import render_prompt
from lit_prune.eval.gsm8k import extract_last_boxed

__all__ = ["BoxedAnswerStoppingCriteria", "GenerationRecord", "generate"]

log = logging.getLogger(__name__)


@dataclass
class GenerationRecord:
    """One prompt's greedy generation.

    Attributes:
        prompt: The prompt as given (before any chat template).
        text: The new tokens decoded with special tokens skipped.
        token_ids: The new token ids, up to and including the first EOS; the padding a finished sequence
            receives while the rest of its batch is still generating is removed.
        num_new_tokens: ``len(token_ids)``.
        ended_with_eos: Whether the generation emitted an EOS token.
        hit_max_new_tokens: Whether the generation was cut off by ``max_new_tokens`` (no EOS, not stopped at a
            boxed answer).
        stopped_at_boxed: Whether :class:`BoxedAnswerStoppingCriteria` ended the generation.
    """

    prompt: str
    text: str
    token_ids: list[int]
    num_new_tokens: int
    ended_with_eos: bool
    hit_max_new_tokens: bool
    stopped_at_boxed: bool = False


class BoxedAnswerStoppingCriteria(StoppingCriteria):
    """Stop a sequence once its generated part contains a complete, non-empty ``\\boxed{...}``.

    Only the tokens after the prompt are decoded, so a ``\\boxed{}`` in the prompt (the instruction "put your
    final answer within \\boxed{}") never triggers a stop, and neither does an empty box echoed by the model.
    The criterion records, per sequence, how many new tokens it had when it first fired
    (:attr:`stopped_at`), which lets the caller cut the padding added afterwards.

    Args:
        tokenizer: Tokenizer used to decode the new tokens.
        prompt_length: Length of the (left-padded) prompt block in ``input_ids``; new tokens start there.

    Raises:
        ValueError: If ``prompt_length`` is negative.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_length: int) -> None:
        if not isinstance(prompt_length, int) or prompt_length < 0:
            raise ValueError(f"`prompt_length` must be an int >= 0; got {prompt_length!r}")
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.stopped_at: dict[int, int] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs) -> torch.BoolTensor:
        """Return a ``(batch,)`` bool tensor, ``True`` for sequences whose new text holds a complete box."""
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        num_new = input_ids.shape[1] - self.prompt_length
        if num_new <= 0:
            return done
        for row in range(input_ids.shape[0]):
            if row in self.stopped_at:
                done[row] = True
                continue
            new_text = self.tokenizer.decode(input_ids[row, self.prompt_length :], skip_special_tokens=True)
            # Cheap pre-check before the brace matching.
            if "\\boxed" not in new_text and "\\fbox" not in new_text:
                continue
            if extract_last_boxed(new_text) is not None:
                self.stopped_at[row] = num_new
                done[row] = True
        return done


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids from the model's generation config and the tokenizer, without duplicates."""
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids.extend([configured] if isinstance(configured, int) else list(configured))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(int(token) for token in ids))


@contextlib.contextmanager
def _left_padding(tokenizer: PreTrainedTokenizerBase, fallback_pad_token: str | None) -> Iterator[None]:
    """Left padding (and, if missing, a pad token) for the duration of the block; restored afterwards."""
    padding_side = tokenizer.padding_side
    pad_token = tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad_token is None:
        tokenizer.pad_token = fallback_pad_token
    try:
        yield
    finally:
        tokenizer.padding_side = padding_side
        if pad_token is None:
            tokenizer.pad_token = None


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _render_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    apply_chat_template: bool,
    system_prompt: str | None,
) -> tuple[list[str], bool]:
    """Prompts as strings for the tokenizer, and whether they already hold the special tokens.

    With ``apply_chat_template`` they are rendered as fine-tuning renders them
    (:func:`lit_prune.data.prompts.render_prompt`); without it they are used as given (after ``system_prompt`` and
    a blank line).
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if apply_chat_template:
        if not has_template:
            log.info("The tokenizer has no chat template; the prompts are rendered as plain text.")
        return [render_prompt(tokenizer, prompt, system_prompt) for prompt in prompts], has_template
    if system_prompt is not None:
        return [f"{system_prompt}\n\n{prompt}" for prompt in prompts], False
    return list(prompts), False


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]generate"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=False,
    )


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    stop_at_boxed: bool = False,
    apply_chat_template: bool = True,
    system_prompt: str | None = None,
    progress: bool = True,
) -> list[GenerationRecord]:
    """Greedy generation for a list of prompts, in left-padded batches.

    Decoding is greedy (``do_sample=False``, ``num_beams=1``), as in the paper's Appendix D; the other
    settings of ``model.generation_config`` (e.g. a ``repetition_penalty``) still apply, as they do for a plain
    ``model.generate(do_sample=False)``. EOS is any id in the generation config's ``eos_token_id`` or the
    tokenizer's EOS token. The tokenizer's
    ``padding_side`` is set to ``"left"`` for the call and restored afterwards; a tokenizer without a pad
    token borrows its EOS token as pad for the call. With ``apply_chat_template`` each prompt is rendered as
    fine-tuning renders it (:func:`lit_prune.data.prompts.render_prompt`: the chat template when the tokenizer has
    one, else the system prompt, a blank line, the prompt and a newline); without it the plain prompt is used (a
    ``system_prompt`` is then prepended, separated by a blank line). The model is put in eval mode for the call and
    its mode restored.

    Args:
        model: A Hugging Face causal language model.
        tokenizer: Its tokenizer.
        prompts: Prompts (user messages), at least one.
        max_new_tokens: Upper bound on generated tokens per prompt, ``>= 1``.
        batch_size: Prompts per ``model.generate`` call, ``>= 1``.
        stop_at_boxed: Stop each sample once its output contains a complete ``\\boxed{...}`` (paper F.2).
        apply_chat_template: Wrap prompts with the tokenizer's chat template when it has one.
        system_prompt: Optional system message.
        progress: Show a rich progress bar over the batches.

    Returns:
        One :class:`GenerationRecord` per prompt, in input order.

    Raises:
        ValueError: If ``prompts`` is empty or holds a non-string, if ``max_new_tokens < 1`` or
            ``batch_size < 1``, or if the tokenizer has neither a pad nor an EOS token.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"`prompts` must be a list of strings; got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("`prompts` must hold at least one prompt; got an empty list")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"`prompts[{index}]` must be a str; got {type(prompt).__name__}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be an int >= 1; got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1; got {batch_size!r}")
    if tokenizer.pad_token is None and tokenizer.eos_token is None:
        raise ValueError("`tokenizer` must have a pad token or an EOS token to pad batches; it has neither")

    eos_ids = _eos_token_ids(model, tokenizer)
    eos_set = set(eos_ids)
    device = next(model.parameters()).device
    rendered, has_special_tokens = _render_prompts(tokenizer, prompts, apply_chat_template, system_prompt)
    records: list[GenerationRecord] = []

    with _left_padding(tokenizer, tokenizer.eos_token), _eval_mode(model), _progress(progress) as bar:
        task = bar.add_task("generate", total=len(prompts))
        for start in range(0, len(prompts), batch_size):
            batch = rendered[start : start + batch_size]
            encoded = tokenizer(
                batch, return_tensors="pt", padding=True, add_special_tokens=not has_special_tokens
            ).to(device)
            prompt_length = encoded["input_ids"].shape[1]
            criteria = StoppingCriteriaList()
            boxed = BoxedAnswerStoppingCriteria(tokenizer, prompt_length) if stop_at_boxed else None
            if boxed is not None:
                criteria.append(boxed)
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=eos_ids or None,
                pad_token_id=tokenizer.pad_token_id,
                stopping_criteria=criteria,
            )
            new_tokens = output[:, prompt_length:].tolist()
            for row, ids in enumerate(new_tokens):
                eos_position = next((i for i, token in enumerate(ids) if token in eos_set), None)
                stopped_at = boxed.stopped_at.get(row) if boxed is not None else None
                if eos_position is not None and (stopped_at is None or eos_position < stopped_at):
                    kept, ended_with_eos, stopped_at_boxed = ids[: eos_position + 1], True, False
                elif stopped_at is not None:
                    kept, ended_with_eos, stopped_at_boxed = ids[:stopped_at], False, True
                else:
                    kept, ended_with_eos, stopped_at_boxed = ids, False, False
                records.append(
                    GenerationRecord(
                        prompt=prompts[start + row],
                        text=tokenizer.decode(kept, skip_special_tokens=True),
                        token_ids=kept,
                        num_new_tokens=len(kept),
                        ended_with_eos=ended_with_eos,
                        hit_max_new_tokens=not ended_with_eos
                        and not stopped_at_boxed
                        and len(kept) >= max_new_tokens,
                        stopped_at_boxed=stopped_at_boxed,
                    )
                )
            bar.advance(task, len(batch))
    log.debug("Generated %d samples (max_new_tokens=%d, batch_size=%d)", len(records), max_new_tokens, batch_size)
    return records
