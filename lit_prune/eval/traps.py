"""Generation "traps": no EOS plus a repetition loop at the end of the output.

The paper ("Exploring the Limits of Pruning", arXiv 2604.27115, Sec. 4.7 and Appendix F) counts two kinds of
degenerate generations in pruned models:

* Type 1: a complete, properly formatted answer, then no EOS and a loop of repeated symbols/tokens/sequences.
* Type 2: a loop (no EOS) without a complete answer: the reasoning collapsed.

A loop here is an exactly periodic token pattern that covers the *tail* of the generation: the last tokens
repeat with some period ``p`` (up to 512 tokens by default, so a repeated paragraph counts) at least
``min_repeats`` times and cover at least ``min_loop_tokens`` tokens. Length alone is never a loop (a long
varied generation that hit ``max_new_tokens`` is not a trap), and a loop the model escaped from before the end
is not one either. Drifting loops (``1, 2, 3, 4, ...``) are not exactly periodic and are not detected.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torchmetrics import Metric

__all__ = ["LoopInfo", "TrapRate", "TrapType", "classify_trap", "find_repetition_loop"]

log = logging.getLogger(__name__)

TrapType = Literal["none", "type1", "type2"]

_DEFAULT_MIN_PERIOD = 1
_DEFAULT_MAX_PERIOD = 512
_DEFAULT_MIN_REPEATS = 4
_DEFAULT_MIN_LOOP_TOKENS = 20


@dataclass(frozen=True)
class LoopInfo:
    """A periodic pattern at the end of a token sequence.

    Attributes:
        start: Index of the first token of the periodic tail.
        period: Length of the repeated unit, in tokens (the smallest period that qualifies).
        repeats: Number of complete repetitions of the unit in the tail.
        num_tokens: Number of tokens in the periodic tail (``len(token_ids) - start``); it may end with a
            partial unit when generation was cut off mid-repetition.
    """

    start: int
    period: int
    repeats: int
    num_tokens: int


def _check_loop_arguments(min_period: int, max_period: int, min_repeats: int, min_loop_tokens: int) -> None:
    if not isinstance(min_period, int) or min_period < 1:
        raise ValueError(f"`min_period` must be an int >= 1; got {min_period!r}")
    if not isinstance(max_period, int) or max_period < min_period:
        raise ValueError(f"`max_period` must be an int >= `min_period` ({min_period}); got {max_period!r}")
    if not isinstance(min_repeats, int) or min_repeats < 2:
        raise ValueError(f"`min_repeats` must be an int >= 2 (one occurrence is not a repetition); got {min_repeats!r}")
    if not isinstance(min_loop_tokens, int) or min_loop_tokens < 1:
        raise ValueError(f"`min_loop_tokens` must be an int >= 1; got {min_loop_tokens!r}")


def find_repetition_loop(
    token_ids: Sequence[int] | torch.Tensor,
    *,
    min_period: int = _DEFAULT_MIN_PERIOD,
    max_period: int = _DEFAULT_MAX_PERIOD,
    min_repeats: int = _DEFAULT_MIN_REPEATS,
    min_loop_tokens: int = _DEFAULT_MIN_LOOP_TOKENS,
) -> LoopInfo | None:
    """Find an exactly periodic pattern that covers the end of ``token_ids``.

    For a period ``p`` the periodic tail is the longest suffix with ``token_ids[i] == token_ids[i - p]``
    throughout, plus the ``p`` tokens it repeats. The smallest ``p`` from ``min_period`` to ``max_period``
    whose periodic tail holds at least ``min_repeats`` full units and at least ``min_loop_tokens`` tokens is
    returned. With the defaults, 30 identical tokens, 8 repeats of a 3-token unit (24 tokens), 4 repeats of a
    17-token unit or 4 repeats of a 500-token paragraph are loops; 19 identical tokens, or ordinary text whose
    last tokens do not repeat, are not.

    Cost: the suffix-match length of every period is the Z-function of the reversed sequence at that shift,
    computed for shifts ``1 .. max_period`` with the Z-algorithm. Each token comparison either fails (at most
    once per shift) or moves the right end of the matched window forward (at most ``n`` times), so the search
    takes ``O(n + max_period)`` time and memory for ``n`` tokens, instead of ``O(max_period * n)`` when every
    period is extended separately.

    Args:
        token_ids: Generated token ids (new tokens only), a sequence of ints or a 1-D tensor.
        min_period: Smallest unit length to consider.
        max_period: Largest unit length to consider.
        min_repeats: Complete repetitions of the unit required.
        min_loop_tokens: Tokens the periodic tail must cover (stops short units like ``"ab" * 4`` from counting).

    Returns:
        A :class:`LoopInfo`, or ``None`` if the tail is not a loop.

    Raises:
        ValueError: If a parameter is out of range or ``token_ids`` is a tensor that is not 1-D.
    """
    _check_loop_arguments(min_period, max_period, min_repeats, min_loop_tokens)
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1:
            raise ValueError(f"`token_ids` must be 1-D; got a tensor of shape {tuple(token_ids.shape)}")
        token_ids = token_ids.tolist()
    tokens = list(token_ids)
    length = len(tokens)
    largest = min(max_period, length // min_repeats)
    for period, matched in _tail_match_lengths(tokens, largest):
        tail = matched + period
        repeats = tail // period
        if period >= min_period and repeats >= min_repeats and tail >= min_loop_tokens:
            return LoopInfo(start=length - tail, period=period, repeats=repeats, num_tokens=tail)
    return None


def _tail_match_lengths(tokens: list[int], max_shift: int) -> Iterator[tuple[int, int]]:
    """Yield ``(p, matched)`` for ``p = 1 .. max_shift``: how many trailing tokens equal the token ``p`` before.

    ``matched`` is the Z-function of the reversed sequence (the common-prefix length of ``reverse`` and
    ``reverse[p:]``); see :func:`find_repetition_loop` for the cost. Values come lazily, so a caller that
    stops at a small period does not pay for the larger ones.
    """
    reverse = tokens[::-1]
    count = len(reverse)
    matched = [0] * (max_shift + 1)
    # reverse[left:right] equals reverse[:right - left], with the largest right seen so far.
    left = right = 0
    for shift in range(1, max_shift + 1):
        length = min(matched[shift - left], right - shift) if shift < right else 0
        if shift + length >= right:
            while shift + length < count and reverse[length] == reverse[shift + length]:
                length += 1
            left, right = shift, shift + length
        matched[shift] = length
        yield shift, length


def classify_trap(
    record_token_ids: Sequence[int] | torch.Tensor,
    ended_with_eos: bool,
    answer_complete: bool,
    *,
    min_period: int = _DEFAULT_MIN_PERIOD,
    max_period: int = _DEFAULT_MAX_PERIOD,
    min_repeats: int = _DEFAULT_MIN_REPEATS,
    min_loop_tokens: int = _DEFAULT_MIN_LOOP_TOKENS,
) -> TrapType:
    """Classify one generation as no trap, a Type 1 trap or a Type 2 trap (paper Sec. 4.7).

    A generation that ended with EOS is never a trap. Without EOS, a repetition loop at the tail (see
    :func:`find_repetition_loop`) is a Type 1 trap when the answer was complete (e.g. a closed ``\\boxed{}``)
    and a Type 2 trap otherwise. No EOS and no loop (e.g. long but varied text, or a generation stopped by a
    custom criterion right after the answer) is not a trap.

    Args:
        record_token_ids: The generated token ids (new tokens only).
        ended_with_eos: Whether the generation emitted an EOS token.
        answer_complete: Whether the generation contains a complete answer.
        min_period: See :func:`find_repetition_loop`.
        max_period: See :func:`find_repetition_loop`.
        min_repeats: See :func:`find_repetition_loop`.
        min_loop_tokens: See :func:`find_repetition_loop`.

    Returns:
        ``"none"``, ``"type1"`` or ``"type2"``.

    Raises:
        ValueError: If a loop parameter is out of range.
    """
    if ended_with_eos:
        _check_loop_arguments(min_period, max_period, min_repeats, min_loop_tokens)
        return "none"
    loop = find_repetition_loop(
        record_token_ids,
        min_period=min_period,
        max_period=max_period,
        min_repeats=min_repeats,
        min_loop_tokens=min_loop_tokens,
    )
    if loop is None:
        return "none"
    return "type1" if answer_complete else "type2"


class TrapRate(Metric):
    """Fractions of generations that are Type 1 and Type 2 traps.

    States ``type1``, ``type2`` and ``total`` are counts summed across processes.
    :meth:`compute` returns ``{"type1": r1, "type2": r2, "total": r1 + r2}`` (all ``0.0`` before any update).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    type1: torch.Tensor
    type2: torch.Tensor
    total: torch.Tensor

    def __init__(
        self,
        *,
        min_period: int = _DEFAULT_MIN_PERIOD,
        max_period: int = _DEFAULT_MAX_PERIOD,
        min_repeats: int = _DEFAULT_MIN_REPEATS,
        min_loop_tokens: int = _DEFAULT_MIN_LOOP_TOKENS,
        **kwargs,
    ) -> None:
        """Create the metric.

        Args:
            min_period: See :func:`find_repetition_loop`.
            max_period: See :func:`find_repetition_loop`.
            min_repeats: See :func:`find_repetition_loop`.
            min_loop_tokens: See :func:`find_repetition_loop`.
            **kwargs: Forwarded to :class:`torchmetrics.Metric`.

        Raises:
            ValueError: If a loop parameter is out of range.
        """
        super().__init__(**kwargs)
        _check_loop_arguments(min_period, max_period, min_repeats, min_loop_tokens)
        self.loop_kwargs = {
            "min_period": min_period,
            "max_period": max_period,
            "min_repeats": min_repeats,
            "min_loop_tokens": min_loop_tokens,
        }
        for name in ("type1", "type2", "total"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        token_ids: Sequence[Sequence[int] | torch.Tensor],
        ended_with_eos: Sequence[bool],
        answer_complete: Sequence[bool],
    ) -> None:
        """Classify a batch of generations (three parallel lists).

        Args:
            token_ids: Generated token ids of each sample.
            ended_with_eos: Whether each sample emitted EOS.
            answer_complete: Whether each sample contains a complete answer.

        Raises:
            ValueError: If the three lists differ in length.
        """
        if not len(token_ids) == len(ended_with_eos) == len(answer_complete):
            raise ValueError(
                "`token_ids`, `ended_with_eos` and `answer_complete` must have the same length; got "
                f"{len(token_ids)}, {len(ended_with_eos)} and {len(answer_complete)}"
            )
        for ids, eos, complete in zip(token_ids, ended_with_eos, answer_complete):
            kind = classify_trap(ids, bool(eos), bool(complete), **self.loop_kwargs)
            if kind == "type1":
                self.type1 += 1
            elif kind == "type2":
                self.type2 += 1
        self.total += len(token_ids)

    def compute(self) -> dict[str, torch.Tensor]:
        """Return the Type 1, Type 2 and total trap rates; all ``0.0`` when ``total == 0``."""
        if self.total == 0:
            zero = torch.tensor(0.0)
            return {"type1": zero, "type2": zero.clone(), "total": zero.clone()}
        rate1 = self.type1.float() / self.total
        rate2 = self.type2.float() / self.total
        return {"type1": rate1, "type2": rate2, "total": rate1 + rate2}
