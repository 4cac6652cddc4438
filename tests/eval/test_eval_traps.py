"""Repetition-loop detection and trap classification on hand-made token sequences."""

from __future__ import annotations

import random

import pytest
import torch

from lit_prune.eval import LoopInfo, TrapRate, classify_trap, find_repetition_loop


def _varied(length: int, seed: int = 0) -> list[int]:
    """Text-like tokens with no periodic tail: no token repeats within any window of 64."""
    rng = random.Random(seed)
    tokens: list[int] = []
    while len(tokens) < length:
        token = rng.randrange(1000, 50_000)
        if token not in tokens[-64:]:
            tokens.append(token)
    return tokens


@pytest.mark.parametrize(("period", "repeats"), [(1, 30), (2, 12), (3, 8), (5, 6), (17, 4)])
def test_loop_at_the_tail_is_found(period, repeats):
    unit = list(range(100, 100 + period))
    prefix = _varied(40)
    tokens = prefix + unit * repeats
    loop = find_repetition_loop(tokens)
    assert loop == LoopInfo(start=len(prefix), period=period, repeats=repeats, num_tokens=period * repeats)


def test_loop_cut_off_mid_unit():
    unit = [7, 8, 9, 10, 11]
    tokens = _varied(10) + unit * 6 + unit[:3]
    loop = find_repetition_loop(tokens)
    assert loop is not None and loop.period == 5 and loop.repeats == 6 and loop.num_tokens == 33
    assert loop.start == 10


def test_smallest_period_is_reported():
    # "ab" * 20 is also periodic with period 4, 6, ...; the unit is 2.
    assert find_repetition_loop(_varied(5) + [1, 2] * 20).period == 2


def test_long_varied_generation_is_not_a_loop():
    assert find_repetition_loop(_varied(1024)) is None


def test_short_repetition_is_not_a_loop():
    assert find_repetition_loop(_varied(30) + [5] * 19) is None  # 19 < min_loop_tokens
    assert find_repetition_loop(_varied(30) + [1, 2, 3] * 3) is None  # 3 repeats < min_repeats
    assert find_repetition_loop([5] * 19) is None


def test_loop_in_the_middle_but_not_the_tail():
    tokens = _varied(20, seed=1) + [9, 8, 7] * 20 + _varied(40, seed=2)
    assert find_repetition_loop(tokens) is None


def test_period_above_max_period_is_ignored():
    unit = _varied(70, seed=3)
    assert find_repetition_loop(unit * 4, max_period=64) is None
    assert find_repetition_loop(unit * 4, max_period=70).period == 70
    paragraph = _varied(520, seed=4)
    assert find_repetition_loop(paragraph * 4) is None  # the default max_period is 512
    assert find_repetition_loop(paragraph * 4, max_period=520).period == 520


@pytest.mark.parametrize("period", [65, 100, 200, 500])
def test_long_periods_are_found(period):
    """A repeated sentence or paragraph: periods above the old limit of 64 tokens, with the defaults."""
    prefix = _varied(40, seed=10)
    unit = _varied(period, seed=period)
    assert unit[-1] != prefix[-1]  # the loop starts exactly after the prefix
    loop = find_repetition_loop(prefix + unit * 4 + unit[: period // 2])
    assert loop == LoopInfo(start=len(prefix), period=period, repeats=4, num_tokens=period * 4 + period // 2)
    assert find_repetition_loop(prefix + unit * 3) is None  # 3 repeats < min_repeats


def _reference_loop(tokens, min_period=1, max_period=512, min_repeats=4, min_loop_tokens=20):
    """The definition, spelled out: extend every period separately (O(max_period * n))."""
    length = len(tokens)
    for period in range(min_period, min(max_period, length // min_repeats) + 1):
        matched = 0
        index = length - 1
        while index - period >= 0 and tokens[index] == tokens[index - period]:
            matched += 1
            index -= 1
        tail = matched + period
        if tail // period >= min_repeats and tail >= min_loop_tokens:
            return LoopInfo(start=length - tail, period=period, repeats=tail // period, num_tokens=tail)
    return None


def test_matches_the_definition_on_many_near_periodic_sequences():
    """Small alphabets and nested repeats make many periods match partly: the hard cases for the Z-algorithm."""
    rng = random.Random(0)
    for case in range(400):
        unit = [rng.randrange(3) for _ in range(rng.randrange(1, 40))]
        tokens = [rng.randrange(3) for _ in range(rng.randrange(0, 60))] + unit * rng.randrange(1, 7)
        tokens += unit[: rng.randrange(len(unit) + 1)]
        if case % 3 == 0:
            tokens = tokens + tokens[-rng.randrange(1, len(tokens) + 1) :] if tokens else tokens
        kwargs = {"min_repeats": rng.randrange(2, 6), "min_loop_tokens": rng.randrange(1, 30), "max_period": 64}
        assert find_repetition_loop(tokens, **kwargs) == _reference_loop(tokens, **kwargs), (tokens, kwargs)


def _fibonacci_word(length):
    previous, word = [0], [0, 1]
    while len(word) < length:
        previous, word = word, word + previous
    return word[:length]


class _CountedToken(int):
    comparisons = 0

    def __eq__(self, other):
        _CountedToken.comparisons += 1
        return int.__eq__(self, other)

    __hash__ = int.__hash__


@pytest.mark.parametrize(
    "tokens",
    [
        _varied(8192, seed=6),  # no loop: every period fails at once
        _varied(100, seed=7) + _varied(300, seed=8) * 20,  # a long loop matched over 6000 tokens
        [1, 2] * 4096,  # every even period matches the whole sequence
        _fibonacci_word(8192),  # long partial matches at many periods, none enough for 4 repeats
        [bin(index).count("1") % 2 for index in range(8192)],  # Thue-Morse: cube-free, so never a loop
    ],
    ids=["varied", "paragraph-loop", "short-unit", "fibonacci", "thue-morse"],
)
def test_cost_is_linear_in_the_length(tokens):
    """Token comparisons stay within 2 * (n + max_period), whatever the structure of the tail."""
    counted = [_CountedToken(token) for token in tokens]
    for min_repeats in (2, 4):
        _CountedToken.comparisons = 0
        loop = find_repetition_loop(counted, min_repeats=min_repeats)
        assert _CountedToken.comparisons <= 2 * (len(tokens) + 512)
        assert loop == _reference_loop(tokens, min_repeats=min_repeats)


def test_accepts_a_tensor():
    assert find_repetition_loop(torch.tensor(_varied(10) + [3] * 25)).period == 1
    with pytest.raises(ValueError, match=r"`token_ids` must be 1-D; got a tensor of shape \(2, 3\)"):
        find_repetition_loop(torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_period": 0}, "`min_period` must be an int >= 1; got 0"),
        ({"max_period": 0}, r"`max_period` must be an int >= `min_period` \(1\); got 0"),
        ({"min_repeats": 1}, "`min_repeats` must be an int >= 2"),
        ({"min_loop_tokens": 0}, "`min_loop_tokens` must be an int >= 1; got 0"),
    ],
)
def test_bad_loop_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        find_repetition_loop([1, 2, 3], **kwargs)
    with pytest.raises(ValueError, match=message):
        TrapRate(**kwargs)


LOOPING = _varied(50) + [11, 12] * 20
VARIED = _varied(90, seed=5)


@pytest.mark.parametrize(
    ("token_ids", "eos", "complete", "expected"),
    [
        (LOOPING, False, True, "type1"),  # answer, then no EOS and a loop
        (LOOPING, False, False, "type2"),  # loop without an answer
        (LOOPING + [2], True, True, "none"),  # EOS present: never a trap
        (LOOPING, True, False, "none"),
        (VARIED, False, False, "none"),  # hit max_new_tokens without looping
        (VARIED, False, True, "none"),  # e.g. stopped right after the boxed answer
    ],
)
def test_classify_trap(token_ids, eos, complete, expected):
    assert classify_trap(token_ids, eos, complete) == expected


def test_trap_rate():
    metric = TrapRate()
    metric.update([LOOPING, LOOPING, VARIED, LOOPING], [False, False, False, True], [True, False, False, True])
    metric.update([LOOPING], [False], [False])
    rates = metric.compute()
    assert float(rates["type1"]) == pytest.approx(1 / 5)
    assert float(rates["type2"]) == pytest.approx(2 / 5)
    assert float(rates["total"]) == pytest.approx(3 / 5)
    assert (metric.type1.item(), metric.type2.item(), metric.total.item()) == (1, 2, 5)

    other = TrapRate()
    other.update([LOOPING], [False], [True])
    metric.reset()
    metric.update([VARIED], [False], [False])
    metric.merge_state(other)  # DDP-style sum of the counts
    assert {key: float(value) for key, value in metric.compute().items()} == pytest.approx(
        {"type1": 0.5, "type2": 0.0, "total": 0.5}
    )


def test_trap_rate_empty_and_mismatch():
    with pytest.warns(UserWarning, match="called before the ``update``"):
        assert {key: float(value) for key, value in TrapRate().compute().items()} == {
            "type1": 0.0,
            "type2": 0.0,
            "total": 0.0,
        }
    with pytest.raises(ValueError, match="same length; got 2, 1 and 2"):
        TrapRate().update([[1], [2]], [True], [False, True])


def test_trap_rate_uses_its_loop_settings():
    strict = TrapRate(min_loop_tokens=100)
    strict.update([LOOPING], [False], [False])
    assert float(strict.compute()["total"]) == 0.0
